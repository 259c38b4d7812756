"""Sequences of 64 kept edits with and without same-relation neighbours, rerun on a retrained editor A and on a second
sample of CounterFact (its validation split), with the neighbours' weight nudged and with a tighter outlier check: how
far the "after all 64" outcome moves with small changes. Per run: said / kept right after each edit, and after all 64
(the curve's last point); paired against the run without neighbours case by case (``report.paired_point``). Writes
summary.json beside this script.

    .venv/bin/python results/analysis/in-frame-locality/sequential/neighbours/rerun/compare.py
"""

from __future__ import annotations

import statistics
from pathlib import Path

from instructedit.evaluation.report import paired_lines, paired_point
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
# (sample, run without neighbours, runs to compare with it)
GROUPS = (("CounterFact test 0-63", "cf-none", ("cf-r1n", "cf-r2n", "cf-r2n-w900", "cf-r2n-w1100", "cf-r2n-o5", "cf-r2n-w1100-o5")),
          ("CounterFact validation 0-63", "val-none", ("val-r1n", "val-r2n", "val-r2n-o5")),
          ("ZsRE held-out 0-63", "zsre-none", ("zsre-r2n", "zsre-r2n-o5", "zsre-memory-r2n", "zsre-memory-r2n-o5")))
SETTINGS = ("editor_sha256", "split", "edit_rounds", "neighbours", "outlier_factor", "step_scale")


def right_after(report: dict) -> dict[str, float]:
    """Means over the cases, each scored right after its own edit (generation)."""
    keys = ("gen_reliability", "gen_locality", "gen_locality_in_frame", "gen_locality_same_relation")
    return {k: statistics.fmean(c["gen_post"][k] for c in report["cases"] if k in c["gen_post"]) for k in keys}


def summary(report: dict) -> dict:
    last, changes = report["sequential"][-1], [c["weight_change"] for c in report["cases"]]
    top = max(range(len(changes)), key=changes.__getitem__)
    return {"settings": {k: report["settings"].get(k) for k in SETTINGS}, "right_after": right_after(report),
            "after_all": {k: last[k] for k in ("edits", "gen_reliability", "gen_locality", "reliability", "locality", "refused")},
            "after_all_intervals": last["intervals"], "weight_change_median": statistics.median(changes),
            "weight_change_max": changes[top], "weight_change_max_edit": top + 1, "cases_per_s": report["timing"]["cases_per_s"]}


def print_group(sample: str, n: int, runs: dict[str, dict]) -> None:
    """One sample's runs (``summary`` each, the first without neighbours), and each other's paired difference after all."""
    print(f"{sample} (n = {n}, generation, 95 % intervals):")
    for name, s in runs.items():
        a, iv = s["after_all"], s["after_all_intervals"]
        print(f"  {name:18s} right after: said {100 * s['right_after']['gen_reliability']:.1f}, kept "
              f"{100 * s['right_after']['gen_locality']:.1f}, same relation {100 * s['right_after']['gen_locality_same_relation']:.1f}"
              f" | after all {a['edits']}: said {100 * a['gen_reliability']:.1f} {[round(100 * x, 1) for x in iv['gen_reliability']]}, "
              f"kept {100 * a['gen_locality']:.1f} {[round(100 * x, 1) for x in iv['gen_locality']]}, refused {a['refused']}"
              f" | weight change median {s['weight_change_median']:.3f}, max {s['weight_change_max']:.3f} (edit {s['weight_change_max_edit']})"
              f", factor {s['settings']['outlier_factor']}")
        if "after_all_paired" in s:
            print("\n".join(f"      {line}" for line in paired_lines(s["after_all_paired"], ("none", name))))


def main() -> None:
    out: dict = {}
    for sample, base, others in GROUPS:
        if not (HERE / f"{base}.json.gz").is_file():
            continue
        none = read_json(HERE / f"{base}.json.gz")
        out[sample] = {base: summary(none)}
        for name in others:
            if not (HERE / f"{name}.json.gz").is_file():
                continue
            run = read_json(HERE / f"{name}.json.gz")
            out[sample][name] = summary(run) | {"after_all_paired": paired_point(none, run, labels=("none", name), difference="difference")}
        print_group(sample, len(none["cases"]), out[sample])
    write_json(HERE / "summary.json", out)


if __name__ == "__main__":
    main()
