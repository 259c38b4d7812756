"""Seconds per edit of N edits in one call against one edit per call; writes benchmarks/results/batch_edit.json.

For each ``--editor`` (a summing and a least-squares MEND editor, say), on the default model and
held-out ZsRE edits (test split): ``InstructEditor.apply`` with ONE edit (each of ``--singles``
different edits, the median) and with ``--n`` edits in one call (``--reps`` times), the two
interleaved in one process so that machine noise hits both alike. Every call is rolled back, and
the weights are checked bit for bit at the end. The ratio is (seconds per edit at N) / (seconds of
one edit): issue "Many edits" asks for at most 1/20.

    .venv/bin/python benchmarks/bench_batch_edit.py --editor runs/ls8/best --editor runs/r400/best [--n 256] [--threads 2]
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from instructedit.api import Edit, load_editor
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.splits import load_task_splits

from common import add_common_arguments  # benchmarks/common.py

logger = logging.getLogger("bench_batch_edit")
RESULTS = Path(__file__).resolve().parent / "results" / "batch_edit.json"


def zsre_edits(n: int, data_dir: str | None, seed: int) -> list[Edit]:
    """The first ``n`` held-out ZsRE cases as edits (the file the studies of issue "Many edits" use)."""
    records = load_task_splits("zsre", data_dir, seed=seed).test
    if len(records) < n:
        raise SystemExit(f"the ZsRE test file has {len(records)} cases, fewer than the {n} asked for")
    return [Edit(r.prompt, r.target_new, task=r.task, subject=r.subject) for r in records[:n]]


def timed_apply(editor, model, edits, tokenizer) -> float:
    start = time.perf_counter()
    edited = editor.apply(model, edits, tokenizer)
    seconds = time.perf_counter() - start
    edited.rollback()
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", action="append", required=True, help="a trained MEND editor folder; only read (repeatable)")
    parser.add_argument("--n", type=int, default=256, help="edits in the batched call (default 256)")
    parser.add_argument("--singles", type=int, default=12, help="single-edit calls per repetition (default 12)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions, batched and single calls interleaved (default 3)")
    add_common_arguments(parser, RESULTS)
    args = parser.parse_args()
    if args.n < 2 or args.singles < 1 or args.reps < 1:
        parser.error("--n must be >= 2, --singles and --reps >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    edits = zsre_edits(args.n, args.data_dir, args.seed)
    editors = [(path, load_editor(path)) for path in args.editor]
    times: dict[str, dict[str, list[float]]] = {path: {"single": [], "batched": []} for path in args.editor}
    for rep in range(args.reps):
        for path, editor in editors:
            for i in range(args.singles):
                times[path]["single"].append(timed_apply(editor, model, [edits[(rep * args.singles + i) % args.n]], tok))
            times[path]["batched"].append(timed_apply(editor, model, edits, tok))
            logger.info("rep %d %s: single median %.3f s, %d edits %.1f s", rep, path, statistics.median(times[path]["single"]),
                        args.n, times[path]["batched"][-1])
    bitwise = all(torch.equal(v, original[k]) for k, v in model.state_dict().items())

    rows = {}
    for path, editor in editors:
        single = statistics.median(times[path]["single"])
        batched = statistics.median(times[path]["batched"])
        rows[path] = {
            "aggregation": getattr(getattr(editor.editor, "config", None), "aggregation", "sum"),
            "single_edit_s": single,
            "batched_call_s": batched,
            "batched_s_per_edit": batched / args.n,
            "ratio_per_edit": batched / args.n / single,
            "target_ratio": "<= 1/20 = 0.05",
            "meets_target": batched / args.n / single <= 0.05,
            "all_times_s": times[path],
        }
    report = {
        "benchmark": "seconds per edit: N edits in one call vs one edit per call (InstructEditor.apply, rolled back each time)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "model": args.model,
        "task": "zsre (held-out test file)",
        "n_edits": args.n,
        "singles_per_rep": args.singles,
        "reps": args.reps,
        "threads": args.threads,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "load_average_1min": list(os.getloadavg()),
        "weights_restored_bitwise": bitwise,
        "editors": rows,
    }
    write_json(args.output, report)
    for path, row in rows.items():
        print(f"{path} ({row['aggregation']}): one edit {row['single_edit_s']:.3f} s; {args.n} in one call {row['batched_call_s']:.1f} s "
              f"= {row['batched_s_per_edit']:.4f} s/edit, ratio {row['ratio_per_edit']:.3f}")
    if not bitwise:
        raise SystemExit("the weights were not restored bit for bit")


if __name__ == "__main__":
    main()
