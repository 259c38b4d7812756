"""The held-out ZsRE evaluation of the least-squares editor at ×2 with a CounterFact preservation sample, run in three
parts (cases 0-299, 300-668, 669-1036; ``../train-scale/evaluate_scaled.py``), summarised as the recommended editor's
whole-file run is (``results/recommended-zsre-smollm2/subsets.py``): the first 300 cases, the 737 after them, all, and
generation locality split by whether the unedited answer has words; writes summary.json beside this script.

    .venv/bin/python results/analysis/ls-keys/heldout-eval/combine.py
    .venv/bin/python results/analysis/ls-keys/heldout-eval/combine.py --output OUT.json PART.json ...   # other parts, in case order
"""

import argparse
from pathlib import Path

from instructedit.evaluation.generation import bootstrap_ci, normalize_answer, same_answer
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
PARTS = ("zsre-0-300.json.gz", "zsre-300-669.json.gz", "zsre-669-1037.json.gz")
METRICS = [("generation", "gen_post", "gen_reliability"), ("generation", "gen_post", "gen_reliability_plain"),
           ("generation", "gen_post", "gen_reliability_chat"), ("generation", "gen_post", "gen_generalization"),
           ("generation", "gen_post", "gen_locality"), ("teacher_forced", "post", "reliability"),
           ("teacher_forced", "post", "generalization"), ("teacher_forced", "post", "locality"), ("teacher_forced", "post", "portability")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("parts", nargs="*", help="runner JSON reports, in case order (default: this folder's three parts)")
    parser.add_argument("--output", default=str(HERE / "summary.json"))
    args = parser.parse_args()
    parts = [Path(p) for p in args.parts] or [HERE / part for part in PARTS]
    cases = [case for part in parts for case in read_json(part)["cases"]]
    out = {"cases": len(cases), "parts": [p.name for p in parts]}
    for label, lo, hi in (("cases 0-299", 0, 300), ("cases 300-1036", 300, len(cases)), ("all", 0, len(cases))):
        row = {}
        for protocol, phase, metric in METRICS:
            row[metric] = bootstrap_ci([c[phase][metric] for c in cases[lo:hi] if metric in c[phase]]).to_dict() | {"protocol": protocol}
        out[label] = row
        print(label, "; ".join(f"{m} {100 * v['mean']:.1f} [{100 * v['ci_low']:.1f}, {100 * v['ci_high']:.1f}]" for m, v in row.items()))
    answers = [a for c in cases for a in c["answers"] if a["family"] == "locality"]
    for label, chosen in (("unedited answer has words", [a for a in answers if normalize_answer(a["pre"])]),
                          ("unedited answer is punctuation only", [a for a in answers if not normalize_answer(a["pre"])])):
        kept = bootstrap_ci([float(same_answer(a["post_text"], a["pre_text"])) for a in chosen])
        out[f"gen_locality, {label}"] = kept.to_dict() | {"protocol": "generation"}
        print(f"gen_locality, {label}: {100 * kept.mean:.1f} [{100 * kept.low:.1f}, {100 * kept.high:.1f}] (n = {kept.n})")
    write_json(args.output, out)


if __name__ == "__main__":
    main()
