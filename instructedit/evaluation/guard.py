"""Proof that edits were undone: bitwise checks of a model's parameters against their state before evaluation."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from instructedit.editors.base import tensor_digest as _digest


class RestorationError(RuntimeError):
    """The model's parameters differ from the originals after an edit was rolled back."""


class WeightGuard:
    """Proves that edits were undone: after each case, bitwise checks of every parameter that may have changed.

    ``watch`` names parameters kept as full copies (the editor's editable weights; every parameter in
    sequential mode, which restores from these copies). All others get a CRC-32 fingerprint; an
    in-place write or a swapped tensor (version counter, data pointer) marks them for re-checking,
    and ``verify(full=True)`` re-checks everything.
    """

    def __init__(self, model: nn.Module, watch: Iterable[str] = ()) -> None:
        self.model = model
        params = dict(model.named_parameters())
        self.names = tuple(params)
        self.originals = {name: params[name].detach().clone() for name in watch}
        self.digests = {name: _digest(p) for name, p in params.items() if name not in self.originals}
        self._marks = {name: self._mark(p) for name, p in params.items()}
        self.verified = 0

    @staticmethod
    def _mark(param: torch.Tensor) -> tuple[int, int]:
        return param._version, param.data_ptr()

    def verify(self, full: bool = False, where: str = "") -> int:
        """Raise ``RestorationError`` unless the parameters equal the originals; returns how many were compared."""
        params = dict(self.model.named_parameters())
        if tuple(params) != self.names:
            added, removed = sorted(set(params) - set(self.names)), sorted(set(self.names) - set(params))
            raise RestorationError(f"{where}: the model's parameters changed after rollback (added {added[:5]}, removed {removed[:5]})")
        bad, checked = [], 0
        for name, param in params.items():
            if not (full or name in self.originals or self._mark(param) != self._marks[name]):
                continue
            checked += 1
            same = torch.equal(param, self.originals[name]) if name in self.originals else _digest(param) == self.digests[name]
            if not same:
                bad.append(name)
            self._marks[name] = self._mark(param)
        if bad:
            raise RestorationError(f"{where}: {len(bad)} parameter(s) differ from the originals after rollback: {bad[:5]}")
        self.verified += 1
        return checked

    @torch.no_grad()
    def restore(self) -> None:
        """Copy the kept originals back (sequential editing), then check every parameter."""
        params = dict(self.model.named_parameters())
        for name, original in self.originals.items():
            params[name].copy_(original)
        self.verify(full=True, where="after sequential editing")
