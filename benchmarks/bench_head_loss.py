"""An edit's vocabulary loss at its few answer rows: the two-pass autograd version (``rows · Wᵀ``, cross-entropy, backward:
``grad · W``, each a read of the output embedding) against one pass over the embedding (chunk by chunk with a running
log-sum-exp: ``rows · W_cᵀ`` then ``softmax · W_c`` while the chunk is in cache, loss and gradient together). Tried in
session 54 (docs/performance.md) and not kept: the per-chunk operations cost more than the second read saves.

Both are timed interleaved in one process, with the embedding hot in cache and cold (a 400 MB buffer touched before
each call, as the lower blocks' weights evict it in an edit), at the default model's shape (49,152 × 576) and a random
embedding; the JSON holds the medians and the largest differences from the autograd version's loss and gradient.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_head_loss.py --threads 2 [--rows 3] [--reps 100] [--output FILE]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from instructedit.io import write_json

from bench_mend import interleaved  # benchmarks/bench_mend.py
from common import cpu_name  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "head-loss-one-pass.json"
VOCAB, D_MODEL = 49_152, 576  # the default model's output embedding
CHUNKS = (1024, 2048, 4096, 8192, 16384)


def two_pass(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of ``rows · weightᵀ`` and its gradient in ``rows``, through autograd."""
    rows = rows.detach().requires_grad_()
    loss = torch.nn.functional.cross_entropy(rows @ weight.T, targets, reduction="sum")
    (grad,) = torch.autograd.grad(loss, rows)
    return loss.detach(), grad


@torch.no_grad()
def one_pass(rows: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The same loss and gradient, reading ``weight`` once: per chunk of its rows the logits, a running maximum and sum of
    exponentials, and the softmax-weighted sum of the chunk's rows, rescaled as the maximum grows."""
    n = rows.shape[0]
    top = torch.full((n, 1), -float("inf"))
    total = torch.zeros(n, 1)
    weighted = torch.zeros(n, weight.shape[1])
    for start in range(0, weight.shape[0], chunk):
        part = weight[start : start + chunk]
        logits = rows @ part.T
        new_top = torch.maximum(top, logits.amax(1, keepdim=True))
        shrink, p = torch.exp(top - new_top), torch.exp(logits - new_top)
        total = total * shrink + p.sum(1, keepdim=True)
        weighted = weighted * shrink + p @ part
        top = new_top
    gold = weight[targets]
    loss = (top + total.log() - (rows * gold).sum(1, keepdim=True)).sum()
    return loss, weighted / total - gold


def median_ms(calls: dict[str, Callable[[], object]], reps: int, before: Callable[[], object] | None = None) -> dict[str, float]:
    """Median milliseconds of each call, the calls interleaved (``bench_mend.interleaved``), ``before()`` run untimed before each."""
    return {name: 1e3 * statistics.median(t) for name, t in interleaved(calls, reps, before=before).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=3, help="answer rows (an edit of the benchmark's example: 3)")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(VOCAB, D_MODEL, generator=generator) * 0.05
    rows = torch.randn(args.rows, D_MODEL, generator=generator)
    targets = torch.randint(0, VOCAB, (args.rows,), generator=generator)
    loss, grad = two_pass(rows, weight, targets)
    agreement = {}
    for chunk in CHUNKS:
        other_loss, other_grad = one_pass(rows, weight, targets, chunk)
        agreement[str(chunk)] = {"loss": float((other_loss - loss).abs()), "grad_max": float((other_grad - grad).abs().max())}
    calls = {"two_pass": lambda: two_pass(rows, weight, targets)} | {
        f"one_pass_{chunk}": (lambda chunk=chunk: one_pass(rows, weight, targets, chunk)) for chunk in CHUNKS}
    evict = torch.empty(100_000_000)  # 400 MB, more than the last-level cache
    hot = median_ms(calls, args.reps)
    cold = median_ms(calls, max(20, args.reps // 2), lambda: evict.add_(1.0))
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "cpu": cpu_name(), "threads": args.threads,
              "torch": torch.__version__, "rows": args.rows, "vocab": VOCAB, "d_model": D_MODEL, "reps": args.reps,
              "median_ms_hot": hot, "median_ms_cold": cold, "difference_from_two_pass": agreement}
    write_json(args.output, result)
    for name in calls:
        print(f"{name}: hot {hot[name]:.2f} ms, cold {cold[name]:.2f} ms")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
