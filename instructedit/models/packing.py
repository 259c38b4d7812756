"""Several token rows as ONE row: each keeps its own positions and sees only itself (and a shared start).

The wrapped probes of an evaluated case, or the inputs of a meta-training step, all begin with the same
instruction; packed, it runs once, and one forward pass (one read of every weight) serves them all.
The packed row carries a 4-D additive attention mask and its position ids (``positions_fed`` passes
them to forwards that do not take them, e.g. ``SplitModel.prefix``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

from instructedit.records import TokenBatch
from instructedit.tasks.collate import IGNORE

MIN_SHARED = 4  # tokens a packed row must share to be worth it


def pack(batch: TokenBatch, shareable: Sequence[bool], dtype: torch.dtype, min_shared: int = MIN_SHARED) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """All rows of a right-padded ``batch`` as one row; shareable rows that start alike hold their common start once.

    The wrapped probes of a case all begin with the same instruction, so it is run once. Each row
    keeps its own positions and sees only itself (and the shared start, if it shares it), so every
    logit equals the unpacked one up to float rounding. Returns the packed batch, whose
    ``attention_mask`` is a 4-D additive mask (1, 1, L, L) and whose ``owner`` is the row of each position (L,), -1 on
    the shared start; its position ids (1, L); and the owners again.
    """
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [batch.input_ids[i, :n] for i, n in enumerate(lengths)]
    labels = [batch.labels[i, :n] for i, n in enumerate(lengths)]
    group = [i for i, row in enumerate(rows) if shareable[i] and len(row) > min_shared and torch.equal(row[:min_shared], rows[0][:min_shared])]
    shared = 0
    if len(group) >= 2:
        limit = min(int((labels[i] != IGNORE).nonzero()[0]) for i in group)  # a label never falls in the shared part
        same = torch.stack([rows[i][:limit] == rows[group[0]][:limit] for i in group]).all(0)
        shared = int(same.long().cumprod(0).sum())
    if shared < min_shared:
        group, shared = [], 0
    device = batch.input_ids.device
    start_ids = rows[group[0]][:shared] if group else rows[0][:0]
    ids, pos = [start_ids], [torch.arange(shared, device=device)]
    lab, owner = [torch.full_like(start_ids, IGNORE)], [torch.full_like(start_ids, -1)]
    for i, row in enumerate(rows):
        start = shared if i in group else 0
        ids.append(row[start:])
        pos.append(torch.arange(start, len(row), device=device))
        lab.append(labels[i][start:])
        owner.append(torch.full((len(row) - start,), i, device=device))
    owner_t = torch.cat(owner)
    sees_shared = torch.tensor([i in group for i in range(len(rows))] + [True], device=device)[owner_t]  # -1 -> last
    visible = (owner_t[:, None] == owner_t[None, :]) | ((owner_t[None, :] == -1) & sees_shared[:, None])
    visible &= torch.ones_like(visible).tril()  # causal in packed order; the shared start comes first
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    packed = TokenBatch(torch.cat(ids)[None], mask[None, None], torch.cat(lab)[None], owner=owner_t)
    return packed, torch.cat(pos)[None], owner_t


def shareable_rows(n_rows: int, n_edit: int) -> list[bool]:
    """Which of ``n_rows`` rows, the first ``n_edit`` of them edit inputs, may share a packed row's common start.

    Only one edit row may: MEND transforms each token's (u, δ) on its own, so two edit rows must not
    merge their instruction tokens into one."""
    return [not 1 <= r < n_edit for r in range(n_rows)]


@contextmanager
def positions_fed(model: nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Feed ``position_ids`` to every forward of ``model`` (SplitModel.prefix calls the model itself)."""
    if positions is None:
        yield
        return
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "position_ids": positions}), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
