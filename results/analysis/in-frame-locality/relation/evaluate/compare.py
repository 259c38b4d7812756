"""Each editor's evaluation with neighbours (``evaluate --neighbours``) against the same evaluation without, case by case
(the first cases both hold); writes paired.json beside this script.

    .venv/bin/python results/analysis/in-frame-locality/relation/evaluate/compare.py
"""

from __future__ import annotations

from pathlib import Path

from instructedit.evaluation.report import paired_differences, paired_lines
from instructedit.io import read_json, write_json

HERE = Path(__file__).resolve().parent
METRICS = (("gen_reliability", "gen_post"), ("gen_generalization", "gen_post"), ("gen_locality", "gen_post"),
           ("gen_locality_in_frame", "gen_post"), ("gen_in_frame_target", "gen_post"),
           ("gen_locality_same_relation", "gen_post"), ("gen_same_relation_target", "gen_post"),
           ("gen_locality_same_relation_plain", "gen_post"), ("gen_locality_same_relation_chat", "gen_post"),
           ("gen_portability", "gen_post"), ("reliability", "post"), ("generalization", "post"), ("locality", "post"))


def main() -> None:
    out: dict = {}
    # held-out ZsRE with each editor; CounterFact's test split with A, against its calibrated 4 rounds and against 8 rounds
    # without neighbours (as many rounds as the neighbours' edits are made in)
    for editor, none in (("A", "A-none"), ("I", "I-none"), ("cf-A", "cf-A-none"), ("cf-A, 8 rounds without", "cf-A-none-r8")):
        paths = {"none": HERE / f"{none}.json.gz", "neighbours": HERE / f"{editor.split(',')[0]}-neighbours.json.gz"}
        if not all(p.is_file() for p in paths.values()):
            continue
        runs = {k: read_json(p) for k, p in paths.items()}
        n = min(len(r["cases"]) for r in runs.values())
        for r in runs.values():
            r["cases"] = r["cases"][:n]
        entry = {"n_cases": n, "cases_per_s": {k: r["timing"]["cases_per_s"] for k, r in runs.items()},
                 "settings": {k: {s: r["settings"][s] for s in ("editor_path", "edit_rounds", "neighbours", "neighbours_held_cases",
                                                                 "same_relation")} for k, r in runs.items()}}
        entry |= paired_differences(runs["none"], runs["neighbours"], METRICS, labels=("none", "neighbours"),
                                    difference="neighbours_minus_none")
        out[editor] = entry
        print(f"{editor} (n = {n}; {entry['cases_per_s']['none']:.2f} / {entry['cases_per_s']['neighbours']:.2f} cases/s):")
        for line in paired_lines(entry, ("none", "neighbours"), "neighbours_minus_none"):
            print(f"  {line}")
    write_json(HERE / "paired.json", out)


if __name__ == "__main__":
    main()
