"""64 sequential edits with same-relation neighbours (``evaluate --sequential --neighbours``) against the same sequence
without, case by case; per block of the sequence, the in-frame answers kept; after the last edit, every edit so far.
Writes paired.json beside this script.

    .venv/bin/python results/analysis/in-frame-locality/sequential/neighbours/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences, paired_lines
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
METRICS = (("gen_reliability", "gen_post"), ("gen_generalization", "gen_post"), ("gen_locality", "gen_post"),
           ("gen_locality_in_frame", "gen_post"), ("gen_in_frame_target", "gen_post"),
           ("gen_locality_same_relation", "gen_post"), ("gen_same_relation_target", "gen_post"), ("gen_portability", "gen_post"),
           ("reliability", "post"), ("generalization", "post"), ("locality", "post"))
SETTINGS = ("editor_path", "sequential", "key_memory", "neighbours", "neighbours_held_cases", "same_relation", "step_scale",
            "edit_rounds")
BLOCKS = ((0, 8), (8, 16), (16, 32), (32, 64))
PAIRS = (("A", "seq64-A-none", "seq64-A-neighbours"), ("A, key memory", "seq64-A-memory-none", "seq64-A-memory-neighbours"),
         ("A, 2 rounds each", "seq64-A-r2-none", "seq64-A-r2-neighbours"),
         ("A: neighbours in 2 rounds against the sequence as it is (1 round, none)", "seq64-A-none", "seq64-A-r2-neighbours"),
         ("CounterFact test, A: neighbours in 2 rounds against 1 round, none", "cf-seq64-A-none", "cf-seq64-A-r2-neighbours"),
         ("CounterFact test, A: one round", "cf-seq64-A-none", "cf-seq64-A-neighbours"))


def blocks(report: dict) -> dict[str, dict[str, float]]:
    """Per block of edits: the share of in-frame and same-relation questions still answered as the unedited model did."""
    out = {}
    for lo, hi in BLOCKS:
        cases = report["cases"][lo:hi]
        out[f"{lo + 1}-{hi}"] = {key: sum(c["gen_post"][key] for c in cases if key in c["gen_post"]) /
                                 max(1, sum(key in c["gen_post"] for c in cases))
                                 for key in ("gen_locality_in_frame", "gen_locality_same_relation", "gen_reliability")}
    return out


def main() -> None:
    out: dict = {}
    for name, none, held in PAIRS:
        paths = {"none": HERE / f"{none}.json.gz", "neighbours": HERE / f"{held}.json.gz"}
        if not all(p.is_file() for p in paths.values()):
            continue
        runs = {k: read_json(p) for k, p in paths.items()}
        paired = paired_differences(runs["none"], runs["neighbours"], METRICS, labels=("none", "neighbours"),
                                    difference="neighbours_minus_none")
        speed = {k: r["timing"]["cases_per_s"] for k, r in runs.items()}
        print(f"{name} (n = {len(runs['none']['cases'])}; {speed['none']:.2f} / {speed['neighbours']:.2f} cases/s):")
        print("\n".join(f"  {line}" for line in paired_lines(paired, ("none", "neighbours"), "neighbours_minus_none")))
        entry = out[name] = {"n_cases": len(runs["none"]["cases"]), "cases_per_s": speed,
                             "settings": {k: {s: r["settings"][s] for s in SETTINGS} for k, r in runs.items()},
                             "after_last_edit": {k: r["sequential"][-1] for k, r in runs.items()},
                             "blocks": {k: blocks(r) for k, r in runs.items()}} | paired
        for k, b in entry["blocks"].items():
            print(f"  {k} by block: " + "; ".join(f"{span}: frame {100 * v['gen_locality_in_frame']:.1f}, same relation "
                                                  f"{100 * v['gen_locality_same_relation']:.1f}, said {100 * v['gen_reliability']:.1f}"
                                                  for span, v in b.items()))
        for k, p in entry["after_last_edit"].items():
            iv = p.get("intervals", {})
            print(f"  {k} after edit {p['edits']}: every edit so far said {100 * p['gen_reliability']:.1f} {iv.get('gen_reliability')}, "
                  f"kept {100 * p['gen_locality']:.1f}; teacher-forced {100 * p['reliability']:.1f} / {100 * p['locality']:.1f}")
    write_json(HERE / "paired.json", out)


if __name__ == "__main__":
    main()
