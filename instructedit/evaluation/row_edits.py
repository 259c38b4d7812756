"""Many single edits answered in one batch: each row of a forward pass sees its own case's weight update.

The generation protocol asks every case's queries after that case's edit alone. Writing each edit
into the model and decoding its few queries costs one decoding loop per case; here the updates
ΔW of several cases are added by forward hooks on the edited modules, row by row
(``out[rows of case c] += x[rows of case c] · ΔW_c``), so their queries decode together and the
model's weights are never written. The result equals decoding with W + ΔW_c up to float rounding
(x·W + x·ΔW instead of x·(W + ΔW)).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
from torch import nn

# parameter name -> ΔW in the parameter's storage orientation, or its low-rank factors (left (d_in, r), right (r, d_out))
# with x · left · right = x · ΔW (``EditResult.low_rank``): the hook then costs r·(d_in + d_out) per row, not d_in·d_out
Updates = Mapping[str, torch.Tensor | tuple[torch.Tensor, torch.Tensor]]


@contextmanager
def per_row_updates(model: nn.Module, rows: Sequence[Updates | None], transposed: Mapping[str, bool],
                    scales: Sequence[float] | None = None) -> Iterator[None]:
    """Within the block, row ``i`` of every forward of ``model`` runs with its weights plus ``rows[i]`` (None: unedited),
    times ``scales[i]`` if given (an edit's step sizes scaled, without a scaled copy of its update).

    ``transposed[name]``: the weight is stored (d_in, d_out) (GPT-2 ``Conv1D``), so the added output
    is ``x · ΔW``; otherwise (``nn.Linear``, (d_out, d_in)) it is ``x · ΔWᵀ``. Factors (left, right) need
    no orientation: the added output is ``x · left · right``.
    """
    groups: dict[tuple[int, float], tuple[Updates, float, list[int]]] = {}
    for i, updates in enumerate(rows):
        if updates is not None:
            scale = 1.0 if scales is None else float(scales[i])
            groups.setdefault((id(updates), scale), (updates, scale, []))[2].append(i)
    names = sorted({name for updates, _, _ in groups.values() for name in updates})
    handles = []
    try:
        for name in names:
            module = model.get_submodule(name.rsplit(".", 1)[0])
            parts = [(torch.tensor(index, device=_device(updates[name])), _oriented(updates[name], transposed[name]), scale)
                     for updates, scale, index in groups.values() if name in updates]
            handles.append(module.register_forward_hook(_adder(parts)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _device(update: torch.Tensor | tuple[torch.Tensor, torch.Tensor]) -> torch.device:
    return update[0].device if isinstance(update, tuple) else update.device


def _oriented(update: torch.Tensor | tuple[torch.Tensor, torch.Tensor], transposed: bool) -> tuple[torch.Tensor, ...]:
    """The factors whose product x · f₁ (· f₂) is the row's added output: (ΔW,) or (ΔWᵀ,) dense, (left, right) low-rank."""
    if isinstance(update, tuple):
        return update
    return (update if transposed else update.T,)


def _adder(parts: list[tuple[torch.Tensor, tuple[torch.Tensor, ...], float]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (rows, seq, d_in)
        output = output.clone()
        for index, factors, scale in parts:  # factors: (d_in, d_out), or (d_in, r) and (r, d_out)
            added = x[index].to(factors[0].dtype)
            for factor in factors:
                added = added @ factor
            output[index] += (added if scale == 1.0 else added * scale).to(output.dtype)
        return output

    return hook
