"""The recommended editor's edits made in two rounds against the same trained editor calibrated with three and four rounds
allowed, case by case on the same held-out cases; writes paired.json beside this script.

    .venv/bin/python results/analysis/edit-rounds/more-rounds/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
PAIRS = {  # task: (two rounds at x2: runs/ls8-answer/calibrated-r2, four rounds at x1.5: calibrated with --rounds 3,4)
    "zsre": (HERE.parent.parent / "bf16-eval" / "zsre-all-float32.json.gz", HERE / "zsre-all-r4.json.gz"),
    "counterfact": (HERE / "counterfact-r2.json.gz", HERE / "counterfact-r4.json.gz"),
    "wikirecent": (HERE / "wikirecent-r2.json.gz", HERE / "wikirecent-r4.json.gz"),
}
METRICS = (("gen_reliability", "gen_post"), ("gen_reliability_plain", "gen_post"), ("gen_reliability_chat", "gen_post"),
           ("gen_generalization", "gen_post"), ("gen_locality", "gen_post"), ("gen_portability", "gen_post"),
           ("reliability", "post"), ("generalization", "post"), ("locality", "post"), ("portability", "post"))


def main() -> None:
    out: dict = {}
    for task, paths in PAIRS.items():
        if not all(p.is_file() for p in paths):
            continue
        a, b = (read_json(p) for p in paths)
        entry: dict = {"n_cases": len(a["cases"]), "files": [str(p.relative_to(HERE.parents[2])) for p in paths],
                       "editors": [r["settings"]["editor_sha256"] for r in (a, b)],
                       "edit_rounds": [r["settings"]["edit_rounds"] for r in (a, b)],
                       "cases_per_s": [r["timing"]["cases_per_s"] for r in (a, b)]}
        entry |= paired_differences(a, b, METRICS, labels=("two_rounds", "four_rounds"))
        out[task] = entry
        for metric, v in entry.items():
            if isinstance(v, dict):
                print(f"{task} {metric} ({v['protocol']}, n={v['n']}): two rounds {100 * v['two_rounds']:.1f}, four rounds "
                      f"{100 * v['four_rounds']:.1f}, difference {100 * v['difference']:+.1f} "
                      f"[{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}] ({v['cases_differing']} cases differ)")
    write_json(HERE / "paired.json", out)


if __name__ == "__main__":
    main()
