"""Seconds per single edit of the two calibrations of one trained editor, side by side in one process (interleaved, the
same held-out ZsRE edits, ``InstructEditor.apply`` as a user calls it: each editor's own rounds); writes
single-edit-seconds.json beside this script.

    OMP_NUM_THREADS=2 .venv/bin/python results/analysis/edit-rounds/more-rounds/time_single_edits.py \
        runs/ls8-answer/calibrated-r2 runs/ls8-answer/calibrated-r4 [--n 24]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time
from pathlib import Path

import torch

from instructedit.api import Edit, load_editor
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.loaders import load_records

HERE = Path(__file__).resolve().parent
DATA = HERE.parents[3].parent / "shared" / "data" / "zsre" / "zsre_mend_eval_portability_gpt4.json"


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("editors", nargs=2)
    p.add_argument("--n", type=int, default=24)
    p.add_argument("--data", default=str(DATA))
    args = p.parse_args()
    editors = [load_editor(path) for path in args.editors]
    model, tokenizer = load_model(editors[0].model_name)
    records = load_records(Path(args.data)).records[: args.n + 1]
    edits = [Edit(prompt=r.prompt, target=r.target_new, subject=r.subject, task="zsre") for r in records]
    seconds: list[list[float]] = [[], []]
    rounds: list[list[int]] = [[], []]
    with torch.no_grad():
        for editor in editors:  # warm-up: the process's one-time work
            editor.apply(model, edits[:1], tokenizer).rollback()
        for edit in edits[1:]:
            for i, editor in enumerate(editors):
                start = time.perf_counter()
                edited = editor.apply(model, [edit], tokenizer)
                seconds[i].append(time.perf_counter() - start)
                rounds[i].append(edited.rounds_made)
                edited.rollback()
    out = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "threads": torch.get_num_threads(),
           "data": args.data, "n": len(edits) - 1, "editors": {}}
    for path, editor, s, r in zip(args.editors, editors, seconds, rounds):
        out["editors"][path] = {"edit_rounds": editor.edit_rounds, "rounds_made_mean": sum(r) / len(r),
                                "median_s": statistics.median(s), "all_s": s}
        print(f"{path}: {editor.edit_rounds} rounds (made {sum(r) / len(r):.2f} on average), median {statistics.median(s):.3f} s per edit")
    a, b = (out["editors"][p]["median_s"] for p in args.editors)
    out["second_over_first"] = b / a
    print(f"{args.editors[1]} / {args.editors[0]}: {b / a:.2f}x")
    write_json(HERE / "single-edit-seconds.json", out)


if __name__ == "__main__":
    main()
