"""Meta-training's matrix products in bfloat16 where a CPU has bfloat16 units (``training.step_precision``).

A meta-training step on the default model spends a third of its time outside the frozen model's blocks: the MEND
network (every edit token's factors through 2,112 → 512 → 2,112 twice, forward and backward) and the projections of
the few scored rows onto the 49,152-token vocabulary (the output embedding, 113 MB, read four times a step). On a CPU
with bfloat16 matrix units (Intel's AMX, or AVX512-BF16 as on AMD Zen 4) both run 2-5× faster in bfloat16: the network
under ``torch.autocast`` (its statistics, residual sums and parameters stay float32; products accumulate in float32)
and the projections against a bfloat16 copy of the output embedding (float32 logits out, the gradient back in
float32). The frozen blocks, the edit's own arithmetic and everything outside a training step (validation, ``edit``,
``apply``, evaluation) stay float32.

Rounding moves the training curve as a change of thread count does (``benchmarks/results/curve-check/``); measured
side by side, one thread (Intel Xeon with AMX, 2026-12-06): a step of the paper recipe 245 → 211 ms, 1.99× → 1.71× a
forward pass (``benchmarks/results/mend.json``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator

import torch

from instructedit.config import STEP_PRECISIONS

BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags under which a bfloat16 product is faster than a float32 one

_ACTIVE: contextvars.ContextVar[bool] = contextvars.ContextVar("instructedit_bf16_step", default=False)
_HEADS: dict[tuple, torch.Tensor] = {}  # the bfloat16 copy of the output embedding, by what identifies its values


def has_bf16_units(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a flag of ``BF16_FLAGS`` (without them, a bfloat16 product is emulated and
    slower than float32)."""
    return any(line.startswith("flags") and set(line.split(":", 1)[-1].split()) & set(BF16_FLAGS) for line in cpuinfo.splitlines())


@functools.cache
def cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return has_bf16_units(f.read())
    except OSError:
        return False


def bf16_step_wanted(setting: str, device: torch.device, dtype: torch.dtype) -> bool:
    """Whether meta-training steps run their network and scored-row projections in bfloat16 (``training.step_precision``):
    "bfloat16", or "auto" on a CPU with bfloat16 units; never for a model that is not float32 (it is in half precision)."""
    if setting not in STEP_PRECISIONS:
        raise ValueError(f"training.step_precision must be one of {', '.join(STEP_PRECISIONS)}; got {setting!r}")
    if dtype != torch.float32 or setting == "float32":
        return False
    return setting == "bfloat16" or (device.type == "cpu" and cpu_has_bf16_units())


@contextlib.contextmanager
def bf16_step(enabled: bool = True) -> Iterator[None]:
    """Within the block (one meta-training step's loss and backward), ``network`` and ``project_rows`` run in bfloat16."""
    token = _ACTIVE.set(enabled)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def active() -> bool:
    return _ACTIVE.get()


def network(device: torch.device) -> contextlib.AbstractContextManager:
    """The MEND network's autocast: bfloat16 products inside a ``bf16_step`` block, nothing otherwise."""
    if not active():
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def half_copy(weight: torch.Tensor) -> torch.Tensor:
    """A frozen weight's bfloat16 copy, kept while its values stay (its memory, shape and version counter)."""
    key = (weight.data_ptr(), tuple(weight.shape), weight._version, weight.device)
    if key not in _HEADS:
        _HEADS.clear()  # one head at a time: the copy of the model being trained
        _HEADS[key] = weight.detach().to(torch.bfloat16)
    return _HEADS[key]


class _HalfRows(torch.autograd.Function):
    """rows · Wᵀ against W's bfloat16 copy, float32 out; the rows' gradient grad · W in bfloat16, float32 out."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, half: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(half)
        return (rows.to(torch.bfloat16) @ half.T).float()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (half,) = ctx.saved_tensors
        return (grad.to(torch.bfloat16) @ half).float(), None


def project_rows(rows: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """rows · Wᵀ (float32 rows, a frozen float32 (vocab, d) W) in bfloat16 products."""
    return _HalfRows.apply(rows, half_copy(weight))
