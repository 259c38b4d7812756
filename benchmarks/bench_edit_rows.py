"""What an evaluation of an editor that makes each edit in rounds saves by leaving the edit rows out of its passes.

Such an edit is made from the case's edit input alone (``packing.score_functional(rounds > 1)``, ``rounds_result``), so
the edit rows a case's layout began with (``prepare_cases(edit_rows=True)``, what a one-round edit is taken from)
passed the model for nothing; ``evaluate`` now builds them only for one-round edits. Both layouts are timed side by
side in one process (interleaved repetitions, teacher-forced and both protocols), the operations of each counted once
(``count_flops.counted``: a ratio this machine's ±20 % speed drift does not move), and their reports compared: the JSON
records whether the greedy answers are the same and the largest teacher-forced score difference.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_edit_rows.py --editor runs/ls8-answer/calibrated-r2 --task zsre --threads 2
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


@contextlib.contextmanager
def edit_rows_carried() -> Iterator[None]:
    """Inside the block ``evaluate`` builds every case's layout with its edit rows, as before (the code being measured against)."""
    runner.prepare_cases = lambda *a, **k: prepare_cases(*a, **{**k, "edit_rows": True})
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
        parser.error(f"{args.editor} makes each edit in one round: its layouts keep their edit rows (it is made from them)")
    setup.evaluate("both", setup.records[:3])  # warm-up: kernel choices, memory touched for the first time
    runs = {f"{layout}/{protocol}": [] for layout in ("carried", "left_out") for protocol in ("teacher_forced", "both")}
    work = {}  # the operations each counts (count_flops.CountFlops), once: a ratio that this machine's noise does not move
    for key in runs:
        layout, protocol = key.split("/")
        with edit_rows_carried() if layout == "carried" else contextlib.nullcontext():
            work[key] = counted(lambda protocol=protocol: setup.evaluate(protocol)).total / 1e9
    reports = {}
    for _ in range(args.repeats):
        for key in runs:
            layout, protocol = key.split("/")
            with edit_rows_carried() if layout == "carried" else contextlib.nullcontext():
                start = time.perf_counter()
                reports[key] = setup.evaluate(protocol)
                runs[key].append(time.perf_counter() - start)
    medians = {key: statistics.median(times) for key, times in runs.items()}
    same_answers = answers(reports["carried/both"]) == answers(reports["left_out/both"])
    largest = max(abs(a.post[k] - b.post[k]) for a, b in zip(reports["carried/both"].cases, reports["left_out/both"].cases)
                  for k in a.post if isinstance(a.post[k], float) and isinstance(b.post.get(k), float))
    result = {
        "benchmark": "evaluation of an editor that makes each edit in rounds: edit rows carried in every case's passes (before) "
                     "or left out (now); medians of interleaved repetitions",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "editor": args.editor, "task": args.task, "n_cases": len(setup.records), "edit_rounds": setup.made["edit_rounds"],
        "threads": args.threads, "cpu": cpu_name(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "platform": platform.platform(), "load_average_1min": os.getloadavg()[0], "repeats": args.repeats,
        "seconds": runs, "median_s": medians, "gflop": work,
        "work_left_out_over_carried": {p: work[f"left_out/{p}"] / work[f"carried/{p}"] for p in ("teacher_forced", "both")},
        "work_both_over_teacher_forced": {layout: work[f"{layout}/both"] / work[f"{layout}/teacher_forced"] for layout in ("carried", "left_out")},
        "cases_per_s": {key: len(setup.records) / s for key, s in medians.items()},
        "left_out_over_carried": {p: medians[f"left_out/{p}"] / medians[f"carried/{p}"] for p in ("teacher_forced", "both")},
        "both_over_teacher_forced": {layout: medians[f"{layout}/both"] / medians[f"{layout}/teacher_forced"] for layout in ("carried", "left_out")},
        "same_answers": same_answers, "largest_teacher_forced_difference": largest,
    }
    write_json(args.output, result)
    for key, s in medians.items():
        print(f"{key:28s} {s:6.1f} s  {len(setup.records) / s:.2f} cases/s")
    print(f"left out / carried: time {result['left_out_over_carried']}, work {result['work_left_out_over_carried']}; "
          f"same answers: {same_answers}; largest TF difference {largest:.2e}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
