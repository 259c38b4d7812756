"""A decoding step's attention on a CPU as two matrix products instead of PyTorch's fused kernel.

A greedy decoding step asks one query per row of a cache of tens of positions. On a CPU, PyTorch's fused
``scaled_dot_product_attention`` (its flash kernel) runs such a step well below memory speed: the step reads every
row's keys and values once (168 rows × 72 positions: 18.6 MB a layer on the default model), and on an AMD EPYC
(two threads) the fused kernel took 86 ms for the 30 layers against 60 ms for the same attention as
``softmax(q·Kᵀ·scale + mask)·V`` in two batched products (1.37-1.43× for 40-250 rows, about even for 4;
``benchmarks/bench_decode_kernels.py``, ``benchmarks/results/decode_kernels.json``); in an
evaluation with both protocols attention was a fifth of the decoding steps' time. The grouped query heads of a
key/value head are stacked as rows (as transformers' ``pack_gqa``), so the keys and values are read once, not
repeated per query head.

``decode_attention(model)`` routes the attention calls of one query position (decoding steps) of a float32 model on
the CPU through ``matmul_attention`` while the block runs; every other call (prefills, GPU, other dtypes, dropout,
soft-capping, attention biases) goes to the implementation the model was loaded with. The outputs equal the fused
kernel's up to float32 rounding (another summation order). ``$INSTRUCTEDIT_FAST_KERNELS=0`` switches it off.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import nn

from instructedit.evaluation.fast_linears import fast_kernels_wanted

try:  # transformers' registry of attention functions, looked up by name at every attention call
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
except ImportError:  # pragma: no cover - an older transformers without it: nothing is routed
    ALL_ATTENTION_FUNCTIONS = None

ROUTED = ("sdpa",)  # implementations whose one-query calls are routed (eager already multiplies; flash/flex are GPU kernels)


def matmul_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None,
                     scaling: float | None) -> torch.Tensor:
    """Attention of one query position: ``query`` (batch, heads, 1, d), ``key``/``value`` (batch, kv heads, length, d) with
    heads a multiple of kv heads, ``mask`` None or broadcastable to (batch, 1 | heads, 1, length) (bool: True attends;
    float: added to the scores). Returns (batch, 1, heads, d), as transformers' attention functions do."""
    b, h, _, d = query.shape
    kv, length = key.shape[1], key.shape[2]
    q = query.reshape(b, kv, h // kv, d)  # the query heads sharing a key/value head, as rows
    scores = torch.matmul(q, key.transpose(-1, -2))  # (batch, kv, group, length)
    scores.mul_(scaling if scaling is not None else 1.0 / math.sqrt(d))
    if mask is not None:
        if mask.dim() == 4 and mask.shape[1] not in (1, kv) and mask.shape[1] == h:
            mask = mask.reshape(mask.shape[0], kv, h // kv, mask.shape[-1])
        elif mask.dim() == 4:
            mask = mask.reshape(mask.shape[0], mask.shape[1], 1, mask.shape[-1])
        if mask.dtype == torch.bool:
            scores.masked_fill_(~mask, float("-inf"))
        else:
            scores.add_(mask)
    out = torch.matmul(torch.softmax(scores, dim=-1), value)  # (batch, kv, group, d)
    return out.reshape(b, h, 1, d).transpose(1, 2).contiguous()


def _routed(usual: Callable) -> Callable:
    def attention(module: nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attention_mask: torch.Tensor | None,
                  dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None, **kwargs):
        simple = (query.shape[2] == 1 and query.device.type == "cpu" and query.dtype == torch.float32 and key.dtype == torch.float32
                  and not dropout and kwargs.get("softcap") is None and kwargs.get("position_bias") is None
                  and kwargs.get("s_aux") is None and not kwargs.get("output_attentions", False)
                  and key.shape[1] > 0 and query.shape[1] % key.shape[1] == 0 and key.shape[-1] == value.shape[-1] == query.shape[-1])
        if not simple:
            return usual(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs)
        return matmul_attention(query, key, value, attention_mask, scaling), None

    attention.routes = usual  # what it routes the other calls to
    return attention


@contextmanager
def decode_attention(model: nn.Module) -> Iterator[None]:
    """Within the block, ``model``'s one-query attention calls on the CPU in float32 run as ``matmul_attention``.

    Does nothing for a model on another device or dtype, or whose attention implementation is not one of ``ROUTED``.
    The routing is by implementation name in transformers' registry, so another model of that implementation running at
    the same time in this process (another thread) is routed too: the same outputs up to float rounding."""
    name = getattr(getattr(model, "config", None), "_attn_implementation", None)
    parameter = next(model.parameters(), None)
    if (ALL_ATTENTION_FUNCTIONS is None or not fast_kernels_wanted() or name not in ROUTED or parameter is None or parameter.device.type != "cpu"
            or parameter.dtype != torch.float32):
        yield
        return
    usual = ALL_ATTENTION_FUNCTIONS[name]
    if getattr(usual, "routes", None) is not None:  # already routed by an enclosing block
        yield
        return
    local = name in getattr(ALL_ATTENTION_FUNCTIONS, "_local_mapping", {})  # an override someone set before: put back
    ALL_ATTENTION_FUNCTIONS[name] = _routed(usual)
    try:
        yield
    finally:
        if local:
            ALL_ATTENTION_FUNCTIONS[name] = usual
        else:
            del ALL_ATTENTION_FUNCTIONS[name]
