"""Sequences of 64 kept edits with same-relation neighbours, under the outlier check they now get by default (``--outlier-factor
auto``: 6× the median) and other draws of the entities swapped in (``--neighbour-seed``), and on CounterFact with a key memory
beside the neighbours: said / kept right after each edit and after all 64, paired against the same sample without
neighbours (``../rerun/``, case by case, ``report.paired_point``), and per setting the spread over draws. Writes
summary.json beside this script.

    .venv/bin/python results/analysis/in-frame-locality/sequential/neighbours/draws/compare.py
"""

from __future__ import annotations

import importlib.util
import math
import statistics
from pathlib import Path

import scipy.stats
from instructedit.evaluation.report import paired_point
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
RERUN = HERE.parent / "rerun"
_spec = importlib.util.spec_from_file_location("rerun_compare", RERUN / "compare.py")
rerun = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rerun)  # its per-run summary, the same numbers for both studies

# (sample, run without neighbours (../rerun), runs to compare with it: here, or ../rerun for seed 0)
GROUPS = (("CounterFact test 0-63", "cf-none", ("cf-memory", "cf-memory-r2n-o6", "cf-memory-r2n-s1", "cf-memory-r2n-s2",
                                              "cf-memory-r2n-w300", "cf-memory-r1n", "cf-r2n-s1", "cf-r2n-s2", "cf-r2n-s3")),
          ("CounterFact validation 0-63", "val-none", ("val-memory", "val-memory-r2n-o6", "val-memory-r2n-w300", "val-memory-r1n")),
          ("ZsRE held-out 0-63", "zsre-none", ("zsre-memory-r2n", "zsre-memory-r2n-s1", "zsre-memory-r2n-s2", "zsre-memory-r2n-s3")))
# the draws of one setting: seed 0 (../rerun or here) and seeds 1-3 (here)
DRAWS = {"ZsRE, neighbours + key memory, two rounds": ("zsre-memory-r2n", "zsre-memory-r2n-s1", "zsre-memory-r2n-s2", "zsre-memory-r2n-s3"),
         "CounterFact test, neighbours + key memory, two rounds": ("cf-memory-r2n-o6", "cf-memory-r2n-s1", "cf-memory-r2n-s2"),
         "CounterFact test, neighbours, two rounds, factor 5-6": ("cf-r2n-o5", "cf-r2n-s1", "cf-r2n-s2", "cf-r2n-s3")}


def report(name: str) -> dict | None:
    for folder in (HERE, RERUN):
        if (folder / f"{name}.json.gz").is_file():
            return read_json(folder / f"{name}.json.gz")
    return None


def over_draws(values: list[float]) -> dict[str, float | int]:
    """The mean over draws and its 95 % t interval (n = draws: the spread between draws, not between cases)."""
    mean = statistics.fmean(values)
    half = scipy.stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / len(values) ** 0.5 if len(values) > 1 else math.nan
    return {"mean": mean, "ci_low": mean - half, "ci_high": mean + half, "n": len(values)}


def shown(summary: dict) -> str:
    return f"mean {summary['mean']:.1f} [{summary['ci_low']:.1f}, {summary['ci_high']:.1f}] (n = {summary['n']} draws)"


def main() -> None:
    out: dict = {"groups": {}, "draws": {}}
    for sample, base, others in GROUPS:
        none = report(base)
        out["groups"][sample] = {base: rerun.summary(none)}
        for name in others:
            run = report(name)
            if run is None:
                continue
            out["groups"][sample][name] = rerun.summary(run) | {"after_all_paired": paired_point(none, run, labels=("none", name),
                                                                                                 difference="difference")}
        rerun.print_group(sample, len(none["cases"]), out["groups"][sample])
    for setting, names in DRAWS.items():
        runs = {n: r for n, r in zip(names, map(report, names)) if r is not None}
        said = [100 * r["sequential"][-1]["gen_reliability"] for r in runs.values()]
        kept = [100 * r["sequential"][-1]["gen_locality"] for r in runs.values()]
        out["draws"][setting] = {"runs": list(runs), "after_all_said": said, "after_all_kept": kept,
                                 "refused": [r["sequential"][-1]["refused"] for r in runs.values()],
                                 "said_over_draws": over_draws(said), "kept_over_draws": over_draws(kept)}
        print(f"{setting} ({len(runs)} draws): after all 64, said {', '.join(f'{x:.1f}' for x in said)}: {shown(over_draws(said))}; "
              f"kept {', '.join(f'{x:.1f}' for x in kept)}: {shown(over_draws(kept))}; refused {out['draws'][setting]['refused']}")
    write_json(HERE / "summary.json", out)


if __name__ == "__main__":
    main()
