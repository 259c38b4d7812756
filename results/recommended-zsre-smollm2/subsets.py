"""The whole-file ZsRE evaluations split into the first 300 cases (the ones read while choosing the recipe) and the
737 cases after them (never looked at before this evaluation), and the generation locality of the locality prompts
whose unedited answer holds words apart from those where it is punctuation only (mostly "?": the model continues the
question); writes subsets.json beside this script.

    .venv/bin/python results/recommended-zsre-smollm2/subsets.py
"""

from pathlib import Path

from instructedit.evaluation.generation import bootstrap_ci, normalize_answer, same_answer
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
METRICS = [("generation", "gen_post", "gen_reliability"), ("generation", "gen_post", "gen_reliability_plain"),
           ("generation", "gen_post", "gen_reliability_chat"), ("generation", "gen_post", "gen_generalization"),
           ("generation", "gen_post", "gen_locality"), ("teacher_forced", "post", "reliability"),
           ("teacher_forced", "post", "generalization"), ("teacher_forced", "post", "locality"), ("teacher_forced", "post", "portability")]


def main() -> None:
    out = {}
    for name in ("ctx1", "paper"):
        cases = read_json(HERE / f"{name}-zsre-all.json.gz")["cases"]
        out[name] = {}
        for label, lo, hi in (("cases 0-299", 0, 300), ("cases 300-1036", 300, len(cases)), ("all", 0, len(cases))):
            row = {}
            for protocol, phase, metric in METRICS:
                values = [case[phase][metric] for case in cases[lo:hi] if metric in case[phase]]
                row[metric] = bootstrap_ci(values).to_dict() | {"protocol": protocol}
            out[name][label] = row
            print(name, label, "; ".join(f"{m} {100 * v['mean']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]"
                                         for m, v in row.items()))
        answers = [a for case in cases for a in case["answers"] if a["family"] == "locality"]
        for label, chosen in (("unedited answer has words", [a for a in answers if normalize_answer(a["pre"])]),
                              ("unedited answer is punctuation only", [a for a in answers if not normalize_answer(a["pre"])])):
            kept = bootstrap_ci([float(same_answer(a["post_text"], a["pre_text"])) for a in chosen])
            out[name][f"gen_locality, {label}"] = kept.to_dict() | {"protocol": "generation"}
            print(name, f"gen_locality, {label}: {100 * kept.mean:.1f} [{100 * kept.low:.1f}, {100 * kept.high:.1f}] (n = {kept.n})")
    write_json(HERE / "subsets.json", out)


if __name__ == "__main__":
    main()
