"""The editor protocol, what editors return, and in-place edits with exact rollback.

Every editor (MEND, FT-L, GRACE, CaliNet, ...) implements ``apply(model, batch) -> EditHandle``:
the model is edited in place and the handle restores it exactly (``rollback()``, or leaving the
``with`` block), unless ``keep()`` makes the edit permanent. Weight editors return a
``WeightEditHandle``; editors that add modules or hooks subclass ``EditHandle``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch
from torch import nn

from instructedit.records import TokenBatch


@dataclass
class EditResult:
    """Edited weights, to be used functionally (``torch.func.functional_call``) or applied in place.

    ``new_params`` maps full parameter names to the edited tensors (the base weights are not
    touched); ``updates`` holds the added deltas; ``pre_edit_loss`` is the edit NLL before the edit.
    """

    new_params: dict[str, torch.Tensor]
    updates: dict[str, torch.Tensor] = field(default_factory=dict)
    pre_edit_loss: torch.Tensor | None = None


class EditHandle:
    """An edit applied to a model. Subclasses implement ``_restore``; the rest is shared."""

    def __init__(self) -> None:
        self._active = True

    @property
    def active(self) -> bool:
        return self._active

    def _restore(self) -> None:
        raise NotImplementedError

    def _forget(self) -> None:
        """Drop what ``_restore`` would need (the edit becomes permanent)."""

    def rollback(self) -> None:
        """Undo the edit exactly; a second call does nothing."""
        if self._active:
            self._restore()
            self._active = False

    def keep(self) -> None:
        """Make the edit permanent: exiting the context no longer restores the model."""
        self._forget()
        self._active = False

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.rollback()


class WeightEditHandle(EditHandle):
    """Edited weights written into a model; rollback copies the originals back bit for bit."""

    def __init__(self, model: nn.Module, result: EditResult) -> None:
        super().__init__()
        self.model = model
        self._originals: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            for name, value in result.new_params.items():
                param = model.get_parameter(name)
                self._originals[name] = param.detach().clone()
                param.copy_(value.detach().to(param.dtype))

    def _restore(self) -> None:
        with torch.no_grad():
            for name, original in self._originals.items():
                self.model.get_parameter(name).copy_(original)

    def _forget(self) -> None:
        self._originals.clear()


def apply_in_place(model: nn.Module, result: EditResult) -> WeightEditHandle:
    """Write ``result``'s weights into ``model``; the returned handle rolls them back exactly."""
    return WeightEditHandle(model, result)


@runtime_checkable
class Editor(Protocol):
    """What the evaluation runner and the user API need from any editor."""

    def apply(self, model: nn.Module, batch: TokenBatch) -> EditHandle:
        """Edit ``model`` in place so it produces ``batch``'s labelled targets; return the undo handle."""
        ...
