"""Greedy answers before and after an edit from ONE prefill: the blocks below the first edited one run once.

An edit changes only the blocks from ``split.first_layer`` on, so the prompt's keys, values and
hidden states below them are the same before and after it. Per batch of prompts, the unedited model
runs the prompts once (as ``greedy_generate`` would), while hooks keep what each edited block was
called with; the post-edit prefill then re-runs only the edited blocks on those inputs, every row
with its own edit (``rows_context``), writing into a copy of the cache whose lower layers are the
unedited ones. Both then decode in one loop over twice the rows (the unedited rows, then the edited
ones), so each decoding step reads the weights once. On the default model (30 blocks, 3 edited)
the post-edit prefill costs a tenth of a full one.

The answers equal a ``greedy_generate`` call without and one with ``rows_context`` up to float
rounding; the first batch of every call checks that re-running the suffix without edits gives the
unedited logits, and where it does not (an architecture whose final projection does more than
norm + head), the two calls are made separately instead.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache

from instructedit.evaluation.generation import (
    batch_order, greedy_loop, last_logits_only, returned_cache, encode_prompts, greedy_generate, left_padded, pad_id, stop_token_ids,
)
from instructedit.models.split import SplitModel

logger = logging.getLogger(__name__)

RowsContext = Callable[[list[int | None]], AbstractContextManager]  # prompt index per batch row (None: an unedited row)


class _Prefill:
    """The unedited prefill of one left-padded batch and what the edited blocks were called with."""

    def __init__(self, model: nn.Module, split: SplitModel, ids: torch.Tensor, mask: torch.Tensor) -> None:
        self.split = split
        calls: dict[int, tuple[tuple, dict]] = {}
        handles = [split.layers[i].register_forward_pre_hook(self._keeper(calls, i), with_kwargs=True) for i in split.suffix_indices]
        try:
            position = (mask.cumsum(-1) - 1).clamp(min=0)  # left padding does not shift positions
            out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **last_logits_only(model))
        finally:
            for handle in handles:
                handle.remove()
        self.logits = out.logits[:, -1]
        self.cache = returned_cache(out)
        self.calls = [calls[i] for i in split.suffix_indices]
        # the post-edit cache: the unedited layers below the first edited one, empty edited layers (filled by replay)
        self.post_cache = copy.deepcopy(self.cache)
        for i in split.suffix_indices:
            layer = self.post_cache.layers[i]
            layer.keys, layer.values = layer.keys[..., :0, :], layer.values[..., :0, :]

    @staticmethod
    def _keeper(calls: dict, index: int):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            calls[index] = (args, kwargs)

        return hook

    def replay(self, cache: Cache) -> torch.Tensor:
        """Last-position logits of the edited blocks re-run on the unedited inputs (with whatever edits are active), into ``cache``."""
        h = None
        for i, (args, kwargs) in zip(self.split.suffix_indices, self.calls):
            args = tuple(cache if isinstance(a, Cache) else a for a in args)
            kwargs = {k: cache if isinstance(v, Cache) else v for k, v in kwargs.items()}
            if args:
                h = args[0] if h is None else h
                out = self.split.layers[i](h, *args[1:], **kwargs)
            else:
                h = kwargs["hidden_states"] if h is None else h
                out = self.split.layers[i](**{**kwargs, "hidden_states": h})
            h = out[0] if isinstance(out, tuple) else out
        return self.split.head(self.split.norm(h[:, -1:]))[:, -1]

    def merged(self) -> Cache:
        """One cache of twice the rows: the unedited ones, then the edited ones (``post_cache`` after ``replay``)."""
        for layer, edited in zip(self.cache.layers, self.post_cache.layers, strict=True):
            layer.keys, layer.values = torch.cat([layer.keys, edited.keys]), torch.cat([layer.values, edited.values])
        return self.cache

    def replay_matches(self) -> bool:
        """Whether the suffix re-run without edits reproduces the unedited logits (on a scratch copy of the cache)."""
        scratch = copy.deepcopy(self.post_cache)
        return torch.allclose(self.replay(scratch).float(), self.logits.float(), atol=1e-4, rtol=1e-3)


@torch.no_grad()
def greedy_before_after(model: nn.Module, tokenizer: PreTrainedTokenizerBase, split: SplitModel, prompts: Sequence[str],
                        max_new_tokens: Sequence[int] | int, rows_context: RowsContext, batch_size: int = 32,
                        max_length: int | None = None) -> tuple[list[str], list[str]]:
    """(unedited, edited) greedy continuations of ``prompts``: ``greedy_generate`` without and with ``rows_context``
    (``row_edits.per_row_updates`` on blocks ``split.first_layer`` and later), sharing the prefill below the edits
    and one decoding loop. ``rows_context(prompt index per row)`` is also asked with None for a row to leave unedited."""
    budgets, encoded = encode_prompts(tokenizer, prompts, max_new_tokens, max_length)
    if not prompts:
        return [], []
    device = next(model.parameters()).device
    newline, blank = (t.to(device) for t in stop_token_ids(tokenizer))
    eos = tokenizer.eos_token_id
    before: list[str] = [""] * len(prompts)
    after: list[str] = [""] * len(prompts)
    order = batch_order(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        ids, mask = (t.to(device) for t in left_padded([encoded[i] for i in rows], pad_id(tokenizer)))
        prefill = _Prefill(model, split, ids, mask)
        if start == 0 and not prefill.replay_matches():
            logger.warning("re-running the edited blocks of %s does not reproduce its logits: before/after answers are decoded "
                           "separately (two full prefills)", type(model).__name__)
            return (greedy_generate(model, tokenizer, prompts, budgets, batch_size, max_length),
                    greedy_generate(model, tokenizer, prompts, budgets, batch_size, max_length, rows_context=rows_context))
        with rows_context(rows):
            edited_logits = prefill.replay(prefill.post_cache)
        # one decoding loop for both: the unedited rows, then the edited ones (each forward reads the weights once)
        n, owners = len(rows), [None] * len(rows) + list(rows)
        tokens = greedy_loop(model, torch.cat([ids, ids]), torch.cat([mask, mask]), [budgets[i] for i in rows] * 2, newline, blank, eos,
                             start=(torch.cat([prefill.logits, edited_logits]), prefill.merged()),
                             context=lambda active, owners=owners: rows_context([owners[a] for a in active]))
        for r, i in enumerate(rows):
            before[i] = tokenizer.decode(tokens[r], skip_special_tokens=True)
            after[i] = tokenizer.decode(tokens[n + r], skip_special_tokens=True)
    return before, after
