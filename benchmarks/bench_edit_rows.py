"""What an evaluation of an editor that makes each edit in rounds saves by reading its edit input's state from the probe pass.

Such an edit is made from the case's edit input alone (``packing.score_functional(rounds > 1)``, ``rounds_result``).
Until 2026-12-06 (session 51) the blocks below the edited ones passed that input on their own, and the case's layout
left its edit row out (``prepare_cases(edit_rows=0)``: "own pass"). Now a case whose edit input is one row carries it
first in its probe rows (packed, it shares their instruction) and the rounds start from its state in that pass
(``packing._edit_state``, ``SplitModel.row_state``): "read". Both are timed side by side in one process (interleaved
repetitions, teacher-forced and both protocols), the operations of each counted once (``count_flops.counted``: a ratio
this machine's ±20 % speed drift does not move), and their reports compared: the JSON records whether the greedy
answers are the same and the largest teacher-forced score difference.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_edit_rows.py --editor runs/ls8-answer/calibrated-r4 --task zsre --threads 2
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import os
import platform
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import torch

import instructedit.evaluation.runner as runner
from instructedit.config import DEFAULT_MODEL
from instructedit.evaluation.packing import prepare_cases
from instructedit.io import write_json

from bench_eval import EvalSetup, answers  # benchmarks/bench_eval.py
from common import cpu_name  # benchmarks/common.py
from count_flops import counted  # benchmarks/count_flops.py

RESULTS = Path(__file__).resolve().parent / "results" / "edit_rows.json"
LAYOUTS = ("own_pass", "read")


@contextlib.contextmanager
def own_pass() -> Iterator[None]:
    """Inside the block ``evaluate`` builds every case's layout without its edit rows, and each edit's rounds pass the blocks
    below the edited ones over its edit input on their own, as before (the code being measured against)."""
    runner.prepare_cases = lambda *a, **k: prepare_cases(*a, **{**k, "edit_rows": 0})
    try:
        yield
    finally:
        runner.prepare_cases = prepare_cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", required=True, help="a trained editor folder whose edits are made in rounds (calibrate --rounds)")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--task", default="zsre")
    parser.add_argument("--n", type=int, default=30, help="test cases")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs of each, interleaved")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", default=str(RESULTS))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    setup = EvalSetup.load(args.editor, args.model, args.task, args.n)
    if setup.made["edit_rounds"] == 1:
        parser.error(f"{args.editor} makes each edit in one round: it is taken from the probe pass either way")
    setup.evaluate("both", setup.records[:3])  # warm-up: kernel choices, memory touched for the first time
    runs = {f"{layout}/{protocol}": [] for layout in LAYOUTS for protocol in ("teacher_forced", "both")}
    work = {}  # the operations each counts (count_flops.CountFlops), once: a ratio that this machine's noise does not move
    for key in runs:
        layout, protocol = key.split("/")
        with own_pass() if layout == "own_pass" else contextlib.nullcontext():
            work[key] = counted(lambda protocol=protocol: setup.evaluate(protocol)).total / 1e9
    reports = {}
    for _ in range(args.repeats):
        for key in runs:
            layout, protocol = key.split("/")
            with own_pass() if layout == "own_pass" else contextlib.nullcontext():
                start = time.perf_counter()
                reports[key] = setup.evaluate(protocol)
                runs[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(times) for key, times in runs.items()}
    same_answers = answers(reports["own_pass/both"]) == answers(reports["read/both"])
    largest = max(abs(a.post[k] - b.post[k]) for a, b in zip(reports["own_pass/both"].cases, reports["read/both"].cases)
                  for k in a.post if isinstance(a.post[k], float) and isinstance(b.post.get(k), float))
    result = {
        "benchmark": "evaluation of an editor that makes each edit in rounds: the edit input passes the lower blocks on its own "
                     "(own_pass, before) or its state is read from the case's probe pass (read, now); medians of interleaved repetitions",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "editor": args.editor, "task": args.task, "n_cases": len(setup.records), "edit_rounds": setup.made["edit_rounds"],
        "threads": args.threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "platform": platform.platform(), "load_average_1min": os.getloadavg()[0], "repeats": args.repeats,
        "seconds": runs, "median_s": medians, "gflop": work,
        "work_read_over_own_pass": {p: work[f"read/{p}"] / work[f"own_pass/{p}"] for p in ("teacher_forced", "both")},
        "work_both_over_teacher_forced": {layout: work[f"{layout}/both"] / work[f"{layout}/teacher_forced"] for layout in LAYOUTS},
        "cases_per_s": {key: len(setup.records) / s for key, s in medians.items()},
        "read_over_own_pass": {p: medians[f"read/{p}"] / medians[f"own_pass/{p}"] for p in ("teacher_forced", "both")},
        "both_over_teacher_forced": {layout: medians[f"{layout}/both"] / medians[f"{layout}/teacher_forced"] for layout in LAYOUTS},
        "same_answers": same_answers, "largest_teacher_forced_difference": largest,
    }
    write_json(args.output, result)
    for key, s in medians.items():
        print(f"{key:28s} {s:6.1f} s  {len(setup.records) / s:.2f} cases/s")
    print(f"read / own pass: time {result['read_over_own_pass']}, work {result['work_read_over_own_pass']}; "
          f"same answers: {same_answers}; largest TF difference {largest:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
