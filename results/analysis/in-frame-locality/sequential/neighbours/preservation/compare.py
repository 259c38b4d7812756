"""64 CounterFact edits kept one after another with same-relation neighbours and a key memory whose preservation sample
is CounterFact's own locality questions (``--preserve-data``), continued with the data's answers, the unedited model's
(``--preserve-answers model``) or both, at 1,000 or 4,000 tokens: said / kept right after each edit and after all 64,
paired against the same sample without neighbours or memory (``../rerun/``) and against neighbours + the memory without a
sample of its own (``../draws/``, the editor's own sample held instead); and, right after each edit, the unrelated answers
kept split by what the unedited model said to them (``answer_kinds``). Writes summary.json beside this script.

    .venv/bin/python results/analysis/in-frame-locality/sequential/neighbours/preservation/compare.py
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from instructedit.evaluation.generation import exact_match
from instructedit.evaluation.report import paired_lines, paired_point
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent


def _module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


draws = _module("draws_compare", HERE.parent / "draws" / "compare.py")  # its report(): ../rerun and ../draws
rerun = draws.rerun  # its per-run summary and print_group, the same numbers for every study of these sequences

# (sample, run without neighbours or memory, the neighbours + memory run without a sample, runs here)
GROUPS = (("CounterFact test 0-63", "cf-none", "cf-memory-r2n-o6",
           ("cf-mem-r2n-pcf1000", "cf-mem-r2n-pcf4000", "cf-mem-r2n-pcf1000-model", "cf-mem-r2n-pcf4000-model",
            "cf-mem-r2n-pcf4000-both", "cf-mem-r2n-pcf4000-model-s1", "cf-mem-r2n-prome4000-model", "cf-mem-r4n-pcf4000-model",
            "cf-mem-r4n-pcf4000-model-s1", "cf-mem-r4n-pcf4000-model-s2", "cf-mem-r4n-peditor4000-model",
            "cf-mem-r4n-peditor4000-model-s1")),
          ("CounterFact validation 0-63", "val-none", "val-memory-r2n-o6", ("val-mem-r2n-pcf4000-model", "val-mem-r4n-pcf4000-model",
                                                                                       "val-mem-default")),
          ("ZsRE held-out 0-63", "zsre-none", "zsre-memory-r2n", ("zsre-mem-r2n-pzsre4000-model", "zsre-mem-r4n-pzsre4000-model",
                                                          "zsre-mem-r4n-peditor4000-model", "zsre-mem-default-s1")))


# runs on another draw of the neighbours (--neighbour-seed S) -> the no-sample run of the same draw (../draws/), which they
# are also paired against (the group's no-sample run is seed 0's)
SAME_DRAW = {"cf-mem-r2n-pcf4000-model-s1": "cf-memory-r2n-s1", "cf-mem-r4n-pcf4000-model-s1": "cf-memory-r2n-s1",
             "cf-mem-r4n-pcf4000-model-s2": "cf-memory-r2n-s2", "cf-mem-r4n-peditor4000-model-s1": "cf-memory-r2n-s1",
             "zsre-mem-default-s1": "zsre-memory-r2n-s1"}


def report(name: str) -> dict | None:
    found = HERE / f"{name}.json.gz"
    return read_json(found) if found.is_file() else draws.report(name)


def answer_kinds(run: dict) -> dict[str, dict[str, int]]:
    """Right after each edit, the unrelated (locality) answers kept, by what the unedited model said: a short answer (a
    line ended within the budget), a continuation cut at the budget, and (of either) the data's answer."""
    tally = {kind: {"kept": 0, "n": 0} for kind in ("short", "cut", "right")}
    for case in run["cases"]:
        for a in case["answers"]:
            if a["family"] != "locality":
                continue
            kept = a["pre"].strip() == a["post"].strip()
            kinds = ["short" if a["pre_text"].endswith("\n") else "cut"] + (["right"] if exact_match(a["pre_text"], a["target"]) else [])
            for kind in kinds:
                tally[kind]["kept"] += kept
                tally[kind]["n"] += 1
    return tally


def main() -> None:
    out: dict = {}
    for sample, base, beside, others in GROUPS:
        none, without_sample = report(base), report(beside)
        group = {base: rerun.summary(none) | {"answer_kinds": answer_kinds(none)},
                 beside: rerun.summary(without_sample) | {"answer_kinds": answer_kinds(without_sample)}}
        for name in others:
            run = report(name)
            if run is None:
                continue
            group[name] = rerun.summary(run) | {
                "after_all_paired": paired_point(none, run, labels=("none", name), difference="difference"),
                "after_all_paired_vs_no_sample": paired_point(without_sample, run, labels=(beside, name), difference="difference"),
                "answer_kinds": answer_kinds(run)}
            if name in SAME_DRAW:
                group[name]["same_draw_no_sample"] = SAME_DRAW[name]
                group[name]["after_all_paired_vs_same_draw"] = paired_point(report(SAME_DRAW[name]), run, labels=(SAME_DRAW[name], name),
                                                                            difference="difference")
        rerun.print_group(sample, len(none["cases"]), {k: v for k, v in group.items() if k != beside} | {beside: group[beside]})
        for name, s in group.items():
            if "after_all_paired_vs_no_sample" in s:
                print(f"  {name} against {beside}:")
                print("\n".join(f"      {line}" for line in paired_lines(s["after_all_paired_vs_no_sample"], (beside, name))))
            if "after_all_paired_vs_same_draw" in s:
                print(f"  {name} against {s['same_draw_no_sample']} (the same draw):")
                print("\n".join(f"      {line}" for line in paired_lines(s["after_all_paired_vs_same_draw"], (s["same_draw_no_sample"], name))))
        for name, s in group.items():
            print(f"  right after, unrelated answers kept by kind, {name}: "
                  + "; ".join(f"{kind} {v['kept']}/{v['n']}" for kind, v in s["answer_kinds"].items()))
        out[sample] = group
    write_json(HERE / "summary.json", out)


if __name__ == "__main__":
    main()
