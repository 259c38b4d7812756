"""The recommended (wrapped-only) run with every edit made in the three forms and in four rounds (this folder: at ×1.25,
the 0.9 locality floor's choice, and at ×1, the 0.93 floor's), case by case against the editor meta-trained for the three
forms, in rounds (``../trained-three-loss/more-rounds/``), and against the recommended editor as it is used by default
(wrapped only, four rounds: ``../../edit-rounds/more-rounds/``), on the whole held-out ZsRE file (n = 1,037) and
CounterFact's test split (n = 143); writes paired.json beside this script.

    .venv/bin/python results/analysis/plain-edit-row/more-rounds/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
TRAINED = HERE.parent / "trained-three-loss" / "more-rounds"
WRAPPED = HERE.parents[1] / "edit-rounds" / "more-rounds"
METRICS = (("gen_reliability", "gen_post"), ("gen_reliability_plain", "gen_post"), ("gen_reliability_chat", "gen_post"),
           ("gen_generalization", "gen_post"), ("gen_locality", "gen_post"), ("reliability", "post"), ("locality", "post"))


def compared(title: str, a: dict, b: dict, labels: tuple[str, str]) -> dict:
    """``paired_differences`` (b − a) of two reports of the same cases, each metric printed as one line under ``title``."""
    entry = paired_differences(a, b, METRICS, labels=labels, difference="difference")
    for metric, v in entry.items():
        print(f"{title} {metric} ({v['protocol']}, n={v['n']}): {labels[0]} {100 * v[labels[0]]:.1f}, {labels[1]} {100 * v[labels[1]]:.1f}, "
              f"difference {100 * v['difference']:+.1f} [{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}]")
    return entry


def reports(folder: Path, zsre: str, counterfact: str) -> dict[str, dict]:
    """An editor's two reports in ``folder``, by task."""
    return {"zsre": read_json(folder / zsre), "counterfact": read_json(folder / counterfact)}


def main() -> None:
    ours = reports(HERE, "zsre-all-three-at-use.json.gz", "counterfact-test-three-at-use.json.gz")
    floor93 = reports(HERE, "zsre-all-three-at-use-floor93.json.gz", "counterfact-test-three-at-use-floor93.json.gz")
    trained = reports(TRAINED, "zsre-all-three-r3.json.gz", "counterfact-test-three-r3.json.gz")
    wrapped = reports(WRAPPED, "zsre-all-r4.json.gz", "counterfact-r4.json.gz")
    out = {}
    for task in ours:
        out[f"{task}_vs_trained_three_forms"] = compared(f"{task} vs trained three-form", trained[task], ours[task],
                                                         ("trained_three_forms", "three_forms_at_use"))
        out[f"{task}_vs_wrapped_only"] = compared(f"{task} vs wrapped only", wrapped[task], ours[task], ("wrapped_only", "three_forms_at_use"))
        out[f"{task}_x1_vs_trained_three_forms"] = compared(f"{task} x1 vs trained three-form", trained[task], floor93[task],
                                                            ("trained_three_forms", "three_forms_at_use_x1"))
        out[f"{task}_x1_vs_x1.25"] = compared(f"{task} x1 vs x1.25", ours[task], floor93[task], ("three_forms_at_use", "three_forms_at_use_x1"))
    write_json(HERE / "paired.json", out)


if __name__ == "__main__":
    main()
