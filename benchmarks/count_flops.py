"""The arithmetic behind the speed bars: floating-point operations counted beside measured time; writes
benchmarks/results/flops.json.

Issue 15's training-step and edit bars and issue 17's cost of generation are ratios of times. On a CPU running these
matrix products near its float32 speed, a time ratio cannot fall much below the ratio of the work done, so this
counts the work: every matrix product, oneDNN linear and attention call (``torch.utils.flop_counter``'s formulas,
plus the CPU attention and ``torch.ops.mkldnn._linear_pointwise`` that it does not know), dispatched while

- ``bench_mend.py``'s example runs (a) a forward pass, (b) an edit, (c) a meta-training step of its recipe;
- ``bench_eval.py``'s cases are evaluated teacher-forced only and with both protocols (``--editor``, ``--task``);
- with ``--parts ...,many``: ``bench_batch_edit.py``'s N held-out ZsRE edits are made in one call (as the API makes them, and in
  one round) and each of ``--singles`` of them alone (work only: issue 16's seconds-per-edit bar).

Each is counted once (under the counting mode) and timed apart: medians of ``--reps`` interleaved repetitions, so the
JSON holds, per ratio, the work ratio beside the time ratio.

    .venv/bin/python benchmarks/count_flops.py [--threads 1] [--reps 10] [--editor runs/ls8-answer/calibrated]
        [--task zsre] [--n 30] [--eval-reps 3] [--parts mend,eval,many] [--many 256 --singles 12]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils import flop_counter
from torch.utils._python_dispatch import TorchDispatchMode

from instructedit.api import load_editor
from instructedit.config import DEFAULT_MODEL
from instructedit.io import write_json
from instructedit.models.loading import load_model

from bench_batch_edit import zsre_edits  # benchmarks/bench_batch_edit.py
from bench_eval import EvalSetup  # benchmarks/bench_eval.py
from bench_mend import example, interleaved  # benchmarks/bench_mend.py
from common import cpu_name  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "flops.json"


def _linear_flops(x: torch.Tensor, weight: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return 2 * (x.numel() // x.shape[-1]) * weight.shape[0] * weight.shape[1]


def _cpu_attention_flops(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_flop_count(q.shape, k.shape, v.shape)


def _cpu_attention_backward_flops(grad: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *args: Any, **kwargs: Any) -> int:
    return flop_counter.sdpa_backward_flop_count(grad.shape, q.shape, k.shape, v.shape)


def _extra_formulas() -> dict:
    """Formulas for ops ``flop_counter`` has none for: the CPU flash attention and oneDNN's linear (``fast_linears``)."""
    extra = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops,
             torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_attention_backward_flops}
    if hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        extra[torch.ops.mkldnn._linear_pointwise] = _linear_flops
    return extra


class CountFlops(TorchDispatchMode):
    """Floating-point operations of every counted op dispatched within the block, in total and per op and shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.known = dict(flop_counter.flop_registry)
        self.extra = _extra_formulas()
        self.by_op: Counter[str] = Counter()
        self.by_shapes: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func._overloadpacket
        if packet in self.known:
            flops = self.known[packet](*args, **kwargs, out_val=out)
        elif packet in self.extra:
            flops = self.extra[packet](*args, **kwargs)
        else:
            return out
        shapes = [tuple(a.shape) for a in args if isinstance(a, torch.Tensor)]
        self.by_op[str(packet)] += flops
        self.by_shapes[f"{packet} {shapes}"] += flops
        return out

    @property
    def total(self) -> int:
        return sum(self.by_op.values())

    def summary(self, top: int = 12) -> dict:
        return {"gflop": self.total / 1e9, "gflop_by_op": {k: v / 1e9 for k, v in self.by_op.most_common()},
                "largest_gflop_by_shapes": {k: v / 1e9 for k, v in self.by_shapes.most_common(top)}}


def counted(fn: Callable[[], Any]) -> CountFlops:
    """``fn()`` run once under ``CountFlops``."""
    with CountFlops() as count:
        fn()
    return count


def mend_part(threads: int, reps: int) -> dict:
    """bench_mend's forward, edit and training step: work and time, each against the forward pass."""
    ex = example(threads)
    calls = {"forward": ex.forward, "edit": ex.edit, "forward_step": ex.forward_step, "step": ex.step}  # step: its records' forwards
    for fn in calls.values():
        fn()
    counts = {name: counted(fn) for name, fn in calls.items()}
    times = interleaved(calls, reps)
    seconds = {name: statistics.median(t) for name, t in times.items()}
    out: dict[str, Any] = {"example": {"source": ex.record.source, "edit_tokens": int(ex.batch.edit_inner.input_ids.shape[1]),
                                       "loc_tokens": int(ex.batch.loc.input_ids.shape[1])},
                           "packed_step": ex.packed, "reps": reps, "median_s": seconds}
    for name in calls:
        out[name] = counts[name].summary() | {"gflop_per_s": counts[name].total / 1e9 / seconds[name]}
    for name, against in (("edit", "forward"), ("step", "forward_step")):  # the step per record: its micro-batch's records
        out[f"{name}_over_forward"] = {"work": counts[name].total / counts[against].total, "time": seconds[name] / seconds[against]}
    return out


def eval_part(editor: str, task: str, n: int, reps: int) -> dict:
    """The runner on ``n`` cases, teacher-forced only and with both protocols: work and time."""
    setup = EvalSetup.load(editor, DEFAULT_MODEL, task, n)
    setup.evaluate("both", setup.records[:3])  # warm-up (timings of the fast kernels, decoding memory)
    protocols = ("teacher_forced", "both")
    counts = {p: counted(lambda p=p: setup.evaluate(p)) for p in protocols}
    times = interleaved({p: lambda p=p: setup.evaluate(p) for p in protocols}, reps, warmup=0)  # warmed up above
    seconds = {p: statistics.median(t) for p, t in times.items()}
    out: dict[str, Any] = {"editor": editor, "task": task, "n_cases": len(setup.records), "reps": reps, "median_s": seconds,
                           "all_times_s": times}
    for p in protocols:
        out[p] = counts[p].summary() | {"gflop_per_case": counts[p].total / 1e9 / len(setup.records),
                                        "gflop_per_s": counts[p].total / 1e9 / seconds[p]}
    out["both_over_teacher_forced"] = {"work": counts["both"].total / counts["teacher_forced"].total,
                                       "time": seconds["both"] / seconds["teacher_forced"]}
    return out


def many_part(editor_path: str, n: int, singles: int) -> dict:
    """The work of ``n`` edits in one call (``rounds="auto"``, the API's default, and one round) per edit, against the mean
    work of ``singles`` of them made alone."""
    model, tokenizer = load_model(DEFAULT_MODEL)
    editor = load_editor(editor_path)
    edits = zsre_edits(n, None, 0)

    def apply(batch, **options) -> None:
        editor.apply(model, batch, tokenizer, **options).rollback()

    single = statistics.mean(counted(lambda e=e: apply([e])).total for e in edits[:singles])
    out: dict[str, Any] = {"editor": editor_path, "n_edits": n, "singles": singles, "single_edit_gflop": single / 1e9}
    for label, options in (("auto", {}), ("one_round", {"rounds": 1})):
        total = counted(lambda options=options: apply(edits, **options)).total
        out[label] = {"gflop": total / 1e9, "gflop_per_edit": total / n / 1e9, "per_edit_over_single": total / n / single}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="mend,eval", help="comma-separated: mend, eval, many (default mend,eval)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reps", type=int, default=10, help="interleaved repetitions of forward, edit and step")
    parser.add_argument("--editor", default="runs/ls8-answer/calibrated", help="the editor the eval and many parts use")
    parser.add_argument("--task", default="zsre")
    parser.add_argument("--n", type=int, default=30)
    parser.add_argument("--eval-reps", type=int, default=3, help="interleaved repetitions of the two evaluations")
    parser.add_argument("--many", type=int, default=256, help="edits in the many part's one call")
    parser.add_argument("--singles", type=int, default=12, help="single edits counted beside it")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    parts = set(args.parts.split(","))
    if not parts or parts - {"mend", "eval", "many"}:
        parser.error(f"--parts {args.parts}: choose among mend, eval, many")
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "threads": args.threads,
                              "torch": torch.__version__, "cpu": cpu_name(),
                              "counted": "matrix products, attention and oneDNN linears (flop_counter formulas); elementwise work is not"}
    if "mend" in parts:
        report["mend"] = mend_part(args.threads, args.reps)
        write_json(args.output, report)
        for name in ("edit", "step"):
            ratio = report["mend"][f"{name}_over_forward"]
            print(f"{name} / forward: work {ratio['work']:.2f}x, time {ratio['time']:.2f}x")
    if "eval" in parts:
        report["evaluation"] = eval_part(args.editor, args.task, args.n, args.eval_reps)
        write_json(args.output, report)
        ratio = report["evaluation"]["both_over_teacher_forced"]
        print(f"both protocols / teacher-forced ({args.task}): work {ratio['work']:.2f}x, time {ratio['time']:.2f}x")
    if "many" in parts:
        report["many_edits"] = many = many_part(args.editor, args.many, args.singles)
        write_json(args.output, report)
        print(f"{args.many} edits in one call, work per edit / a single edit's: {many['auto']['per_edit_over_single']:.2f}x "
              f"(one round: {many['one_round']['per_edit_over_single']:.2f}x)")
    print(f"wrote {args.output}")

if __name__ == "__main__":
    main()
