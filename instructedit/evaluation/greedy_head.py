"""Greedy decoding's vocabulary projection in bfloat16, with the chosen token decided in float32.

A decoding step reads one thing from its logits: each row's largest. On a CPU with bfloat16 matrix units (Intel's AMX)
or bfloat16 dot-product instructions (AVX512-BF16: AMD Zen 4 and later) the projection onto the vocabulary (49,152 × 576
on the default model, the largest matrix a step multiplies) costs 3-5× less in bfloat16 (250 rows, one thread: 31
against 146 ms with AMX, 84 against 246 ms on an AMD EPYC with AVX512-BF16), but its logits are off by up to ~2⁻⁷ of Σᵢ|xᵢ||wⱼᵢ|,
enough to swap near-equal tokens. Here the bfloat16 logits only choose candidates: the ``TOP`` tokens of largest
bfloat16 logit plus error bound get their float32 logit, and the best of those is the row's token when it beats every
other token's bound (a proof, not a guess: else the row is projected whole in float32). The token equals
``argmax_ids(x @ Wᵀ)`` up to float32 rounding (a candidate's logit is summed in another order than in a full product).

The bound (u = 2⁻⁸, bfloat16's unit roundoff; products of two bfloat16 numbers are exact in float32, accumulated in
float32, the sum rounded to bfloat16): for the float32 logit fⱼ and the bfloat16 one ãⱼ,
|ãⱼ − fⱼ| ≤ u/(1 − u)·|ãⱼ| + (2u + u² + 3γ)·Sⱼ, with γ = d·2⁻²⁴/(1 − d·2⁻²⁴) for d inputs and
Sⱼ = Σᵢ|xᵢ||wⱼᵢ| ≤ ‖x‖·‖wⱼ‖ (Cauchy-Schwarz). On the default model's states the bound is ~50× the actual error, yet
only 9 of 1,479 rows needed the whole float32 projection (``tests/test_greedy_head.py``: ties, near-ties below
bfloat16's resolution, NaN rows).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import nn

from instructedit.config import env_switch

ROWS_PER_CHUNK = 64  # rows whose float32 bookkeeping (bounds, top-k) runs at a time, in cache; the bfloat16 product is one
TOP = 16  # tokens per row whose float32 logit is computed (a row whose bound leaves more candidates: projected whole)
_UNIT = 2.0**-8
BF16_HEAD_ENV = "INSTRUCTEDIT_BF16_HEAD"  # "0": never, "1": whenever the head qualifies (any CPU); unset: BF16_FLAGS only
BF16_FLAGS = ("amx_bf16", "avx512_bf16")  # CPU flags under which a bfloat16 product is faster than a float32 one


def has_bf16_units(cpuinfo: str) -> bool:
    """Whether a ``/proc/cpuinfo`` text lists a flag of ``BF16_FLAGS`` (without them, a bfloat16 product is emulated and
    slower than float32)."""
    return any(line.startswith("flags") and set(line.split(":", 1)[-1].split()) & set(BF16_FLAGS) for line in cpuinfo.splitlines())


@functools.cache
def _cpu_has_bf16_units() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return has_bf16_units(f.read())
    except OSError:
        return False


def bf16_head_wanted() -> bool:
    """Whether greedy decoding on a CPU projects in bfloat16: ``$INSTRUCTEDIT_BF16_HEAD`` ("0" or "1") if set, else
    whether the CPU has bfloat16 units (``has_bf16_units``)."""
    switch = env_switch(BF16_HEAD_ENV)
    return _cpu_has_bf16_units() if switch is None else switch


@dataclass
class HalfHead:
    """A float32 vocabulary projection's bfloat16 copy and its rows' norms (for the error bound)."""

    weight: torch.Tensor  # (vocab, d) float32, the model's own
    half: torch.Tensor  # (vocab, d) bfloat16
    norms: torch.Tensor  # (vocab,) float32: ‖wⱼ‖, rounded up
    largest_norm: float
    key: tuple

    @classmethod
    def of(cls, weight: torch.Tensor) -> "HalfHead":
        w = weight.detach()
        norms = w.norm(dim=1) * (1 + 1e-4)
        return cls(w, w.to(torch.bfloat16), norms, float(norms.max()), cls.key_of(weight))

    @staticmethod
    def key_of(weight: torch.Tensor) -> tuple:
        """What identifies the weight's current values: its memory, shape and version counter (bumped by in-place writes)."""
        return (weight.data_ptr(), tuple(weight.shape), weight._version)


def greedy_logits(x: torch.Tensor, head: HalfHead, out: torch.Tensor | None = None, top: int = TOP,
                  half_out: torch.Tensor | None = None) -> torch.Tensor:
    """Logits of ``x`` (rows, d) whose ``argmax_ids`` is that of the float32 logits ``x @ head.weightᵀ``.

    Per row the ``top`` tokens of largest bfloat16 logit plus bound get their float32 logit; they hold the argmax when
    the best of those beats every other token's bound (else, or for a row that is not finite, the row is projected whole
    in float32). The other entries are upper bounds, below that best: read nothing but the argmax. ``out``: a (rows,
    vocab) float32 tensor to write into; ``half_out``: a (rows, vocab) bfloat16 one for the bfloat16 logits."""
    rows, d = x.shape
    out = out if out is not None else x.new_empty((rows, head.half.shape[0]))
    gamma = d * 2.0**-24 / (1 - d * 2.0**-24)
    per_norm = (2 * _UNIT + _UNIT**2 + 3 * gamma) * (1 + 1e-4)  # ‖x‖ rounded up
    approx = torch.mm(x.to(torch.bfloat16), head.half.t(), out=half_out) if half_out is not None else x.to(torch.bfloat16) @ head.half.t()
    for start in range(0, rows, ROWS_PER_CHUNK):
        xs, o = x[start : start + ROWS_PER_CHUNK], out[start : start + ROWS_PER_CHUNK]
        o.copy_(approx[start : start + ROWS_PER_CHUNK])  # ãⱼ, (chunk, vocab)
        scale = xs.norm(dim=1) * per_norm
        o.addr_(scale, head.norms)  # oⱼ = ãⱼ + (2u + u² + 3γ)·‖x‖·‖wⱼ‖ ≥ fⱼ − u/(1-u)·|ãⱼ|
        bound, index = o.topk(top, dim=1)  # (chunk, top), largest first
        exact = torch.bmm(head.weight.index_select(0, index.flatten()).view(*index.shape, d), xs[:, :, None])[..., 0]  # float32 logits
        best = exact.max(1).values
        # any other token j has oⱼ ≤ bound[-1] and fⱼ ≤ oⱼ + u/(1-u)·|ãⱼ|: for ãⱼ ≥ 0 (then ãⱼ ≤ oⱼ) at most
        # bound[-1]·(1 + u/(1-u)); for ãⱼ < 0 below (2u + u² + 3γ)·‖x‖·maxⱼ‖wⱼ‖. The float32 sums behind these get a
        # generous slack.
        beaten = torch.maximum(bound[:, -1] + bound[:, -1].clamp(min=0) * (_UNIT / (1 - _UNIT)), scale * head.largest_norm)
        slack = 1e-4 * (1 + best.abs() + bound[:, 0].abs())
        o.scatter_(1, index, exact)
        whole = (~(best > beaten + slack) | ~torch.isfinite(xs).all(1)).nonzero()[:, 0]
        if len(whole):  # one product for the chunk's undecided rows (a matrix-vector product each cost ~10 ms here)
            o[whole] = xs[whole] @ head.weight.t()
    return out
