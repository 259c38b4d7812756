"""Where a meta-training step's time goes on the default model; writes benchmarks/results/train_step_profile.json.

``Trainer.train_step`` of the recommended recipe (configs/smollm2-135m/instructedit.yaml: one record
per micro-batch, 2 micro-batches per step) runs ``--steps`` times after warm-up, at 1 and at 2
threads. Each part of the step is timed exclusively (a part's time leaves out the parts it calls):

- data collation: ``Collator.meta_batch`` (tokenizing and padding the step's records);
- prefix passes: ``SplitModel.prefix``, the frozen blocks up to the first edited one, once per micro-batch (its inputs
  packed into one row: ``objective._packed_inputs``);
- suffix passes: ``SplitModel.suffix``, the edited blocks (pre-edit for the edit gradient, post-edit for every scored input);
- vocabulary projection: ``SplitModel.logits_at`` / ``logits_at_many`` at the scored positions only;
- factor capture: ``FactorCapture.factors``, the backward that gives δ at the edited weights;
- MEND network: ``MENDEditor.transform`` (or the least-squares solve);
- backward: the meta-loss backward into the MEND network (it recomputes checkpointed blocks);
- optimizer: the two optimizer steps (network, step sizes α) and gradient clipping;
- the rest of the step: losses, Python bookkeeping, logging.

A ``torch.profiler`` table of the operators with the most self CPU time is kept beside it (one
thread). Proportions are what this measures: on a busy machine all parts slow down together
(the load average is recorded).

    .venv/bin/python benchmarks/profile_train_step.py [--steps 8] [--threads 1,2]
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import statistics
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from instructedit.config import load_config
from instructedit.editors.hooks import FactorCapture
from instructedit.editors.mend import MENDEditor
from instructedit.io import write_json
from instructedit.models.split import SplitModel
from instructedit.tasks.collate import Collator
from instructedit.training import Trainer

RESULTS = Path(__file__).resolve().parent / "results" / "train_step_profile.json"
CONFIG = Path(__file__).resolve().parents[1] / "configs" / "smollm2-135m" / "instructedit.yaml"
REST = "rest of the step (losses, Python, logging)"


class ExclusiveTimers:
    """Wall time per label, each label's time without the labelled calls made inside it."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.stack: list[list[Any]] = []  # [label, time the label last resumed]

    def timed(self, label: str, fn: Callable) -> Callable:
        @functools.wraps(fn)
        def inner(*args: Any, **kwargs: Any) -> Any:
            now = time.perf_counter()
            if self.stack:
                self.seconds[self.stack[-1][0]] += now - self.stack[-1][1]
            self.stack.append([label, now])
            try:
                return fn(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds[label] += end - self.stack.pop()[1]
                if self.stack:
                    self.stack[-1][1] = end

        return inner

    def patch(self, owner: Any, name: str, label: str) -> None:
        setattr(owner, name, self.timed(label, getattr(owner, name)))


def instrument(timers: ExclusiveTimers, trainer: Trainer) -> None:
    timers.patch(Collator, "meta_batch", "data collation")
    timers.patch(SplitModel, "prefix", "prefix passes")
    timers.patch(SplitModel, "suffix", "suffix passes")
    timers.patch(SplitModel, "logits_at", "vocabulary projection")
    timers.patch(SplitModel, "logits_at_many", "vocabulary projection")
    timers.patch(FactorCapture, "factors", "factor capture (edit gradient backward)")
    timers.patch(MENDEditor, "transform", "MEND network")
    timers.patch(MENDEditor, "solve", "MEND network")
    timers.patch(torch.Tensor, "backward", "backward (meta-loss into MEND)")
    timers.patch(torch.nn.utils, "clip_grad_norm_", "optimizer (clip + steps)")
    for opt in filter(None, trainer.optimizers.values()):
        timers.patch(opt, "step", "optimizer (clip + steps)")


def profile(trainer: Trainer, timers: ExclusiveTimers, steps: int, threads: int) -> dict[str, Any]:
    """``steps`` timed steps at ``threads`` threads (after two warm-up steps), with the parts ``timers`` (instrumented) saw."""
    torch.set_num_threads(threads)
    for _ in range(2):
        trainer.train_step()
    timers.seconds.clear()
    step = timers.timed(REST, trainer.train_step)
    per_step: list[float] = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        per_step.append(time.perf_counter() - start)
    parts = dict(sorted(((k, v / steps) for k, v in timers.seconds.items()), key=lambda kv: -kv[1]))
    total = sum(parts.values())
    return {"threads": threads, "steps": steps, "step_s_median": statistics.median(per_step), "step_s": per_step,
            "parts_s_per_step": parts, "parts_share": {k: v / total for k, v in parts.items()}}


def operator_table(trainer: Trainer, steps: int) -> list[dict[str, Any]]:
    torch.set_num_threads(1)
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            trainer.train_step()
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:20]
    return [{"op": e.key, "self_cpu_ms_per_step": e.self_cpu_time_total / 1000 / steps, "calls_per_step": e.count / steps} for e in rows]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="timed steps per thread count (default 8)")
    parser.add_argument("--threads", default="1,2", help="thread counts (default 1,2)")
    parser.add_argument("--config", type=Path, default=CONFIG)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.manual_seed(0)
    config = load_config(args.config, ["training.checkpoint_every=100000", "training.val_size=2"])
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, show_progress=False)
        timers = ExclusiveTimers()
        instrument(timers, trainer)
        runs = []
        for threads in (int(t) for t in args.threads.split(",")):
            result = profile(trainer, timers, args.steps, threads)
            runs.append(result)
            print(f"{threads} thread(s): {result['step_s_median']:.2f} s/step;",
                  ", ".join(f"{k} {v:.0%}" for k, v in result["parts_share"].items()))
        ops = operator_table(trainer, max(2, args.steps // 4))
    report = {
        "benchmark": "exclusive wall time of the parts of Trainer.train_step (recommended recipe, default model)",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": str(args.config.relative_to(Path.cwd()) if args.config.is_relative_to(Path.cwd()) else args.config),
        "records_per_step": config.training.edits_per_call * config.training.grad_accumulation,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "load_average": list(os.getloadavg()),
        "runs": runs,
        "top_operators_one_thread": ops,
    }
    write_json(args.output, report)
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
