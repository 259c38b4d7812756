"""The model's linear layers through oneDNN where CPU BLAS is slower: inference passes of a float32 model on the CPU.

PyTorch multiplies a float32 ``nn.Linear`` on the CPU with its BLAS (MKL in the x86 wheels). On an AMD EPYC (Zen 4,
two threads) MKL ran the default model's products well below the machine's speed: a decoding step's 2 rows × 576 →
1536 read the weight at 7 GB/s where the machine reads 26, and 168 rows ran at 144 GFLOPS; the same products through
oneDNN (``torch.ops.mkldnn._linear_pointwise``, in the same wheels) took 2.2× and 1.5× less time, the vocabulary
projection (49,152 × 576) 4.0× and 1.5× less, the other shapes 1.0-1.8× (``benchmarks/bench_decode_kernels.py``,
``benchmarks/results/decode_kernels.json``). Which library is faster depends on the CPU
and the row count, so it is timed, not assumed.

``fast_linears(model)`` routes, within the block, the calls without gradients of ``model``'s float32 CPU ``nn.Linear``
layers through oneDNN where ``onednn_faster`` says so: timed once per process for each weight shape, thread count and
row range (up to ``FEW_ROWS`` rows: at ``FEW_ROWS``; more: at ``MANY_ROWS``), over enough of the model's weights of
that shape to pass ``TIMED_BYTES`` (so the timing reads them from memory as a pass does), and taken only when more than
``1 / MARGIN`` times faster. The outputs equal BLAS's up to float32 rounding (another summation order). Calls with
gradients, other dtypes and devices, and a PyTorch without oneDNN run as before. ``$INSTRUCTEDIT_FAST_KERNELS=0`` switches
this, ``decode_attention`` and the head's timed products off (``models.split.fast_kernels_wanted``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

# best of 3 after a warm-up, as the head's products are timed; one switch for every product chosen by timing
from instructedit.models.split import FAST_KERNELS_ENV, _best_of, fast_kernels_wanted  # noqa: F401 (re-exported)

logger = logging.getLogger(__name__)

FEW_ROWS = 8  # row counts up to this are timed at this count; more at MANY_ROWS
MANY_ROWS = 128
MARGIN = 0.9  # oneDNN only where timed this much faster (a near tie keeps BLAS)
TIMED_SIZE = 2**18  # smaller weights (a tiny test model's) keep BLAS: microseconds either way
TIMED_BYTES = 48 * 2**20  # the timing passes over this much of the model's weights of a shape (or all of them)
_FASTER: dict[tuple, bool] = {}  # (weight shape, dtype, threads, timed rows) -> whether oneDNN was the faster


@functools.cache
def onednn_available() -> bool:
    """Whether this PyTorch has oneDNN's linear (x86 and ARM wheels do) and it gives F.linear's numbers."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        x, w, b = torch.randn(3, 5, 16), torch.randn(8, 16), torch.randn(8)
        return bool(torch.allclose(onednn_linear(x, w, b), torch.nn.functional.linear(x, w, b), atol=1e-5, rtol=1e-5))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` through oneDNN (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def timed_rows(rows: int) -> int:
    """The row count a call of ``rows`` rows is decided by."""
    return FEW_ROWS if rows <= FEW_ROWS else MANY_ROWS


def onednn_faster(rows: int, weights: Sequence[torch.Tensor]) -> bool:
    """Whether ``rows`` rows multiply these weights (one shape) faster through oneDNN: timed once per process for each
    shape, dtype, thread count and ``timed_rows`` (best of 3 passes over ``TIMED_BYTES`` of ``weights``)."""
    weight = weights[0]
    n = timed_rows(rows)
    key = (tuple(weight.shape), weight.dtype, torch.get_num_threads(), n)
    if key not in _FASTER:
        count = max(1, TIMED_BYTES // (weight.numel() * weight.element_size()))
        sample = list(weights[:count])
        x = torch.randn((n, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            blas = _best_of(lambda: [torch.nn.functional.linear(x, w) for w in sample])
            onednn = _best_of(lambda: [onednn_linear(x, w, None) for w in sample])
        _FASTER[key] = onednn < MARGIN * blas
        logger.debug("linear %s, %d rows, %d threads: BLAS %.2f ms, oneDNN %.2f ms", tuple(weight.shape), n, torch.get_num_threads(),
                     blas * 1e3, onednn * 1e3)
    return _FASTER[key]


@contextmanager
def fast_linears(model: nn.Module, decide=onednn_faster) -> Iterator[None]:
    """Within the block, calls without gradients of ``model``'s float32 CPU ``nn.Linear`` layers run through oneDNN where
    ``decide(rows, weights of the layer's shape)`` says so (default ``onednn_faster``; layers with a forward of their own
    are left alone). Nested blocks route once."""
    # plain nn.Linear layers only: a subclass with a forward of its own (a quantized or adapter layer) keeps it
    linears = [m for m in model.modules() if isinstance(m, nn.Linear) and type(m).forward is nn.Linear.forward and "forward" not in m.__dict__
               and m.weight.device.type == "cpu" and m.weight.dtype == torch.float32
               and (m.weight.numel() >= TIMED_SIZE or decide is not onednn_faster)]
    if not linears or not fast_kernels_wanted() or not onednn_available():
        yield
        return
    by_shape: dict[tuple, list[torch.Tensor]] = {}
    for m in linears:
        by_shape.setdefault(tuple(m.weight.shape), []).append(m.weight)
    for m in linears:
        same = by_shape[tuple(m.weight.shape)]

        def forward(x: torch.Tensor, m: nn.Linear = m, same: list = same) -> torch.Tensor:
            rows = x.numel() // x.shape[-1] if x.dim() and x.shape[-1] else 0
            if (rows and not torch.is_grad_enabled() and x.dtype == m.weight.dtype == torch.float32 and x.device.type == "cpu"
                    and m.weight.device.type == "cpu" and decide(rows, same)):
                return onednn_linear(x, m.weight, m.bias)
            return nn.Linear.forward(m, x)

        m.forward = forward
    try:
        yield
    finally:
        for m in linears:
            m.__dict__.pop("forward", None)
