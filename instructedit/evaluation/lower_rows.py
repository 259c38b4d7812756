"""Decoding rows that share their lower layers: an edited row runs the unedited blocks once with its unedited twin.

An edit changes only the blocks from ``split_at`` on (``SplitModel.first_layer``). While an edited row
has been fed the same tokens as the unedited row of the same prompt (its twin), their keys, values and
hidden states below ``split_at`` are equal, so a decoding step runs those blocks for one of them: the
cache's lower layers hold one row per *lower row*, its upper layers one row per decoding row, and hooks
on the upper blocks widen what the lower blocks pass up (the hidden state, the attention mask, the
positional embeddings: every per-row tensor) from lower rows to rows. Rows fed different tokens
part: the lower row is copied (``RoomyLayer.append_copies``) and goes on as two.

In the evaluation runner most pairs agree: locality prompts (the edit keeps their answers), the plain
and chat questions (which the edit moves less), and, for the training validation, every step-size
multiplier's row of a prompt until it says something else. A decoding step on the default model then
runs the 27 lower blocks for fewer rows (30 held-out ZsRE cases: 216 lower rows for 300 rows at the first step).
The answers are those of every row on its own up to float rounding (the same computations on fewer rows: a
matrix product's rounding may depend on how many rows it holds).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn


class LowerRows:
    """Which lower row each decoding row reads below ``split_at``, kept through splits and compaction.

    ``lower[r]``: the lower row of decoding row ``r`` (rows sharing one were fed the same tokens so far: the caller's
    construction, kept by ``inputs``).
    """

    def __init__(self, layers: Sequence[nn.Module], split_at: int, lower: Sequence[int]) -> None:
        if not 0 <= split_at < len(layers):
            raise ValueError(f"rows share the blocks below {split_at}, which must lie within the model's {len(layers)} blocks")
        self.layers, self.split_at, self.lower = layers, split_at, list(lower)
        self.count = max(self.lower) + 1 if self.lower else 0
        if sorted(set(self.lower)) != list(range(self.count)):
            raise ValueError(f"lower rows must number 0..{self.count - 1}, each read by some row")
        self._reindex(torch.device("cpu"))

    def inputs(self, ids: torch.Tensor, done: torch.Tensor, cache: Any) -> list[int]:
        """Before a decoding step with next tokens ``ids`` (rows, 1): rows still decoding whose token differs from their
        lower row's other rows get a lower row of their own (a copy in ``cache``'s lower layers). Returns, per lower
        row, a decoding row that reads it (its token, mask and positions are the lower row's)."""
        tokens, finished = ids[:, 0].tolist(), done.tolist()
        fed: dict[int, int] = {}  # lower row -> its token this step
        parted: dict[tuple[int, int], list[int]] = {}  # (lower row, other token) -> rows
        for r, (u, token) in enumerate(zip(self.lower, tokens)):
            if finished[r]:
                continue
            if fed.setdefault(u, token) != token:
                parted.setdefault((u, token), []).append(r)
        if parted:
            sources = [u for u, _ in parted]
            for layer in cache.layers[: self.split_at]:
                layer.append_copies(sources)
            for k, rows in enumerate(parted.values()):
                for r in rows:
                    self.lower[r] = self.count + k
            self.count += len(parted)
            self._reindex(ids.device)
        reader = [-1] * self.count
        for r, u in enumerate(self.lower):
            if reader[u] < 0 or (finished[reader[u]] and not finished[r]):
                reader[u] = r
        return reader

    def select(self, keep: torch.Tensor, cache: Any) -> None:
        """The decoding rows ``keep`` stay (in this order, as ``batch_select_indices``): lower rows no row reads leave the
        cache's lower layers, the upper layers keep ``keep``."""
        lower = [self.lower[r] for r in keep.tolist()]
        unread = torch.ones(self.count, dtype=torch.bool)
        unread[lower] = False
        order = compacted(unread).to(keep.device)
        for i, layer in enumerate(cache.layers):
            layer.batch_select_indices(order if i < self.split_at else keep)
        place = {u: j for j, u in enumerate(order.tolist())}
        self.lower = [place[u] for u in lower]
        self.count = len(order)
        self._reindex(keep.device)

    def _reindex(self, device: torch.device) -> None:
        self._index = torch.tensor(self.lower, dtype=torch.long, device=device)
        self._same = self.lower == list(range(len(self.lower)))  # every row its own lower row: nothing to widen

    @contextmanager
    def widened(self) -> Iterator[None]:
        """Within the block, the upper blocks' per-row inputs are widened from lower rows to decoding rows: the first
        upper block's hidden state, and every block's other per-row tensors (batch first, at least 2-D: the attention
        mask, the positions and their embeddings; after the first block the hidden state has a row per decoding row)."""
        def hook_for(first: bool):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
                if self._same:
                    return None
                if args:
                    args = (self._widen(args[0]) if first else args[0], *(self._widen(a) for a in args[1:]))
                kwargs = {k: v if k == "hidden_states" and not first else self._widen(v) for k, v in kwargs.items()}
                return args, kwargs
            return hook

        handles = [self.layers[i].register_forward_pre_hook(hook_for(i == self.split_at), with_kwargs=True)
                   for i in range(self.split_at, len(self.layers))]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _widen(self, value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            if value.dim() >= 2 and value.shape[0] == self.count:
                if self._index.device != value.device:  # made on the CPU: moved once, not at every block
                    self._index = self._index.to(value.device)
                return value.index_select(0, self._index)
            return value
        if isinstance(value, (tuple, list)):
            return type(value)(self._widen(v) for v in value)
        return value


def compacted(done: torch.Tensor) -> torch.Tensor:
    """The rows to keep (``~done``) as an order that moves few of them: a kept row stays where it is unless it lies past
    the kept count, then it fills a finished row's place (the batch's row order changes; the caller maps rows back)."""
    keep = int((~done).sum())
    order = torch.arange(keep, device=done.device)
    holes = done[:keep].nonzero()[:, 0]
    order[holes] = (~done[keep:]).nonzero()[:, 0] + keep
    return order
