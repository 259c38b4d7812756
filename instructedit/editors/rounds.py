"""An edit made in rounds (``LearnedEditor.apply(rounds=...)``): where its rounds go, written into the model one after
another or kept beside it as thin factors, and ``rounds_result``, the edit they make as one ``EditResult``."""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from instructedit.editors.base import EditResult, ThinParams, ThinUpdates, apply_in_place, write_weights
from instructedit.models.architectures import transposed_of
from instructedit.models.split import PrefixState
from instructedit.records import TokenBatch


def side_by_side(kept: list[dict[str, tuple[torch.Tensor, torch.Tensor]]]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Rounds' thin factors (each ``EditResult.low_rank``) side by side: x · left · right = the sum of their x · ΔW."""
    return {name: (torch.cat([f[name][0] for f in kept], dim=1), torch.cat([f[name][1] for f in kept], dim=0)) for name in kept[0]}


class WrittenRounds:
    """An edit's rounds written into the model one after another (``apply``): the handle that undoes them all, the tensors
    the edited weights now equal (``written``: the last kept round's ``new_params``, held, not copied) and the ones
    before (the round before's: what undoing the last round writes back), each kept round's thin factors (``kept``)."""

    def __init__(self, model: nn.Module, first: EditResult) -> None:
        self.model, self.handle = model, apply_in_place(model, first)
        self.written, self.undo = first.new_params, None
        self.kept = [first.low_rank]

    @property
    def rounds_made(self) -> int:
        return self.handle.rounds_made

    def running(self) -> contextlib.AbstractContextManager:
        """The model as the kept rounds edited it, for the next round: the model itself."""
        return contextlib.nullcontext()

    def add(self, result: EditResult) -> None:
        self.undo, self.written = self.written, result.new_params
        self.kept.append(result.low_rank)
        write_weights(self.model, self.written)
        self.handle.rounds_made += 1

    def drop_last(self) -> None:
        write_weights(self.model, self.undo)
        self.written = self.undo
        self.kept.pop()
        self.handle.rounds_made -= 1

    def rollback(self) -> None:
        self.handle.rollback()


class NoFactors(Exception):
    """A round's update came without thin factors: the rounds cannot be kept beside the model (``HookedRounds``)."""


class HookedRounds:
    """An edit's rounds kept as their thin factors beside the model, which is never written: each round after the first
    is made with the kept rounds' factors added by hooks (``evaluation.row_edits.per_row_updates``, on every row of the
    edit batch: x · W + x · ΔW, the written weights' x · (W + ΔW) up to float rounding)."""

    def __init__(self, model: nn.Module, first: EditResult, rows: int, transposed: dict[str, bool]) -> None:
        self.model, self.rows, self.transposed = model, rows, transposed
        self.kept = []
        self.add(first)

    @property
    def rounds_made(self) -> int:
        return len(self.kept)

    def factors(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        return side_by_side(self.kept)

    def running(self) -> contextlib.AbstractContextManager:
        from instructedit.evaluation.row_edits import per_row_updates  # (evaluation imports this module)

        return per_row_updates(self.model, [self.factors()] * self.rows, self.transposed)

    def add(self, result: EditResult) -> None:
        if result.low_rank is None:
            raise NoFactors
        self.kept.append(result.low_rank)

    def drop_last(self) -> None:
        self.kept.pop()

    def rollback(self) -> None:
        """Nothing was written."""


def rounds_result(editor: Any, model: nn.Module, batch: TokenBatch, rounds: int, state: PrefixState | None = None) -> EditResult:
    """The edit ``editor.apply(model, batch, rounds=rounds)`` makes (its rules: a round that raises the edits' loss is
    undone), as an ``EditResult`` against the model's weights as found. ``state``: the blocks below the edited ones' pass
    over ``batch`` (``round_state``), where the caller has it (an evaluation's pass over a case's probe rows holds its
    edit row: ``SplitModel.row_state``).

    Where every round's update comes as thin factors of float32 weights (a least-squares or summing MEND editor without
    gradients), nothing is written: each round is made with the rounds before it added by hooks (``HookedRounds``: equal to
    writing them up to float rounding), and ``low_rank`` holds every kept round's factors side by side, ``new_params``
    forms W + ΔW only where read (``ThinParams``), ``updates`` ΔW (``ThinUpdates``). Otherwise (a round without factors,
    a half-precision model) the rounds are written into the model, read back and rolled back bit for bit before this
    returns: ``new_params`` are the tensors the last kept round wrote (no copy of the model's), ``updates`` the written
    minus the original weights, and ``low_rank`` the kept rounds' factors side by side where each had them."""
    transposed = transposed_of(editor.weights)
    if all(model.get_parameter(w.name).dtype == torch.float32 for w in editor.weights):
        try:
            low_rank = editor.edit_in_rounds(model, batch, rounds=rounds, state=state, hooked=True).factors()
        except NoFactors:
            pass  # the rounds are made again, written
        else:
            return EditResult(new_params=ThinParams(model, low_rank, transposed), updates=ThinUpdates(low_rank, transposed),
                              low_rank=low_rank)
    written = editor.edit_in_rounds(model, batch, rounds=rounds, state=state)
    try:
        originals = written.handle.originals()
        new_params = {name: written.written[name] for name in originals}
        if all(factors is not None for factors in written.kept):
            low_rank = side_by_side(written.kept)
            return EditResult(new_params=new_params, updates=ThinUpdates(low_rank, transposed), low_rank=low_rank)
        return EditResult(new_params=new_params, updates={name: new_params[name] - originals[name] for name in originals})
    finally:
        written.rollback()
