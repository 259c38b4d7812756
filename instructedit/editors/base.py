"""What every editor returns, and applying an edit to a model in place with exact rollback."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


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
    """Edited weights written into a model; ``rollback()`` restores the originals bit for bit.

    Usable as a context manager: the weights are restored on exit unless ``keep()`` was called.
    """

    def __init__(self, model: nn.Module, result: EditResult) -> None:
        self.model = model
        self._originals: dict[str, torch.Tensor] = {}
        self._active = True
        with torch.no_grad():
            for name, value in result.new_params.items():
                param = model.get_parameter(name)
                self._originals[name] = param.detach().clone()
                param.copy_(value.detach().to(param.dtype))

    @property
    def active(self) -> bool:
        return self._active

    def rollback(self) -> None:
        if not self._active:
            return
        with torch.no_grad():
            for name, original in self._originals.items():
                self.model.get_parameter(name).copy_(original)
        self._active = False

    def keep(self) -> None:
        """Make the edit permanent: exiting the context no longer restores the weights."""
        self._originals.clear()
        self._active = False

    def __enter__(self) -> "EditHandle":
        return self

    def __exit__(self, *exc: object) -> None:
        self.rollback()


def apply_in_place(model: nn.Module, result: EditResult) -> EditHandle:
    """Write ``result``'s weights into ``model``; the returned handle rolls them back exactly."""
    return EditHandle(model, result)
