"""Where the generation protocol's time goes in an evaluation; writes benchmarks/results/eval_generation_profile.json.

The runner (``evaluate``) on the default model with the recommended editor, ``--n`` test cases of ``--task`` (held-out ZsRE), first with
``protocol="teacher_forced"``, then ``"both"``; during the latter the model's forward passes are timed and their
tokens counted (the teacher-forced passes, which run the model too, are left out): prefill passes (the unedited
prompts the generation protocol prefills, several tokens per row), decoding steps (one token per lower row: rows
that share the blocks below the edited ones with their unedited twin, ``lower_rows``, feed one token for both), and
the edited blocks' replay on the prefill's inputs (``before_after._Prefill.replay``). Beside them, the throughput of
one matrix product the size of an MLP projection at several row counts (what a CPU thread can do: the passes are
compared with it). This is the evidence for what generation can cost at least: every prompt token is prefilled
once, every answer token decoded once, before and after the edit.

    .venv/bin/python benchmarks/profile_eval_generation.py [--editor runs/ls8-answer/calibrated] [--task zsre] [--n 30] [--threads 1]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch

from instructedit.config import DEFAULT_MODEL
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation import before_after
from instructedit.evaluation.runner import evaluate
from instructedit.io import write_json
from instructedit.models.loading import load_model
from instructedit.tasks.splits import load_task_splits

from common import trained_queries  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "eval_generation_profile.json"


def matmul_gflops(rows: int, d_in: int = 576, d_out: int = 1536, seconds: float = 0.5) -> float:
    """GFLOP/s of (rows × d_in) @ (d_in × d_out) on this thread count."""
    a, b = torch.randn(rows, d_in), torch.randn(d_in, d_out)
    for _ in range(3):
        a @ b
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        n += 1
    return 2 * rows * d_in * d_out * n / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--editor", default="runs/ls8-answer/calibrated")
    parser.add_argument("--task", default="zsre", help="the test split whose first --n cases are evaluated")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(DEFAULT_MODEL)
    editor = MENDEditor.from_pretrained(args.editor).eval()
    pool, made = trained_queries(args.editor)
    instruction = pool.evaluation_index("seen")
    records = load_task_splits(args.task).test[: args.n]

    def run(protocol: str) -> float:
        start = time.perf_counter()
        evaluate(model, tokenizer, editor, records, pool, instruction, progress=False, protocol=protocol, **made)
        return time.perf_counter() - start

    run("both")  # warm-up
    teacher_forced = run("teacher_forced")
    seconds: dict[str, float] = defaultdict(float)
    tokens: Counter = Counter()
    forward, replay = model.forward, before_after._Prefill.replay

    @functools.wraps(forward)  # the runner inspects forward's signature (logits_to_keep, cache): it must see the model's
    def timed_forward(*a, **k):
        ids = k.get("input_ids")
        if "logits_to_keep" not in k and "num_logits_to_keep" not in k:  # generation's passes project the last position only
            return forward(*a, **k)  # the teacher-forced passes (SplitModel.prefix): not generation's
        part = "decoding steps" if ids is not None and ids.shape[1] == 1 else "prefill passes"
        start = time.perf_counter()
        out = forward(*a, **k)
        seconds[part] += time.perf_counter() - start
        tokens[part] += 0 if ids is None else ids.numel()
        return out

    def timed_replay(self):
        start = time.perf_counter()
        out = replay(self)
        seconds["edited blocks' replay"] += time.perf_counter() - start
        return out

    model.forward, before_after._Prefill.replay = timed_forward, timed_replay
    try:
        both = run("both")
    finally:
        model.forward, before_after._Prefill.replay = forward, replay
    gflops = {rows: matmul_gflops(rows) for rows in (1, 32, 256)}
    report = {
        "benchmark": "where generation's time goes in an evaluation (protocol both against teacher_forced), default model",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "editor": args.editor, "task": args.task, "n_cases": len(records), "threads": args.threads, "torch": torch.__version__,
        "platform": platform.platform(), "load_average": list(os.getloadavg()),
        "teacher_forced_s": teacher_forced, "both_s": both, "generation_s": both - teacher_forced,
        "ratio_both_over_teacher_forced": both / teacher_forced,
        "budget_for_generation_at_1_5x_s": 0.5 * teacher_forced,
        "parts_s": dict(seconds), "tokens": dict(tokens),
        "ms_per_token": {part: 1000 * seconds[part] / tokens[part] for part in tokens if tokens[part]},
        "matmul_gflops_576x1536": gflops,
    }
    write_json(args.output, report)
    print({k: report[k] for k in ("teacher_forced_s", "both_s", "ratio_both_over_teacher_forced", "parts_s", "tokens")})


if __name__ == "__main__":
    main()
