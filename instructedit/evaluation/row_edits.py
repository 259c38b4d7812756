"""Many single edits answered in one batch: each row of a forward pass sees its own case's weight update.

The generation protocol asks every case's queries after that case's edit alone. Writing each edit
into the model and decoding its few queries costs one decoding loop per case; here the updates
ΔW of several cases are added by forward hooks on the edited modules, row by row
(``out[rows of case c] += x[rows of case c] · ΔW_c``), so their queries decode together and the
model's weights are never written. The result equals decoding with W + ΔW_c up to float rounding
(x·W + x·ΔW instead of x·(W + ΔW)).

Thin updates (low-rank factors ΔW_c = L_c · R_c, a few columns each: MEND's) are added case by case, on that case's
rows only: out[rows of c] += (x[rows of c] · L_c) · (s · R_c), a slice where the rows are consecutive, a gather and
an ``index_add_`` where not. Their cost grows with the rows, not with rows × cases: one masked product over every
case's columns side by side (the earlier way) multiplied mostly by zeros; for 300 rows of 30 cases it cost 8-9 ms per
edited module and step at rank 40 (a summing editor's edit of ~40 tokens) and 1-2.6 ms at ranks 4-7 (the
least-squares editor's: its answer tokens), against 0.5-0.9 ms case by case (one thread); for 8 cases they cost the same.
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
            thin = [(*_scaled(updates[name], scale), _rows(index, updates[name][0].device))
                    for updates, scale, index in groups.values() if isinstance(updates.get(name), tuple)]
            dense = [(torch.tensor(index, device=updates[name].device), _oriented(updates[name], transposed[name]), scale)
                     for updates, scale, index in groups.values() if name in updates and not isinstance(updates[name], tuple)]
            handles.append(module.register_forward_hook(_adder(thin, dense)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _oriented(update: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The dense update M whose product x · M is the row's added output: ΔW (stored (d_in, d_out), Conv1D) or ΔWᵀ."""
    return update if transposed else update.T


def _scaled(factors: tuple[torch.Tensor, torch.Tensor], scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(left, right) with the row's scale on the right factor (r × d_out: the smaller copy); as given at scale 1."""
    left, right = factors
    return left, right if scale == 1.0 else right * scale


def _rows(index: Sequence[int], device: torch.device) -> slice | torch.Tensor:
    """The batch rows of one update: a slice where they are consecutive (a view, no gather), else an index tensor."""
    first = index[0]
    if list(index) == list(range(first, first + len(index))):
        return slice(first, first + len(index))
    return torch.tensor(index, device=device)


def _adder(thin: list[tuple[torch.Tensor, torch.Tensor, slice | torch.Tensor]], parts: list[tuple[torch.Tensor, torch.Tensor, float]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (rows, seq, d_in)
        output = output.clone()
        for left, right, rows in thin:  # (d_in, r), (r, d_out): this case's rows only
            if isinstance(rows, slice):
                output[rows] += ((x[rows].to(left.dtype) @ left) @ right).to(output.dtype)
            else:
                output.index_add_(0, rows, ((x.index_select(0, rows).to(left.dtype) @ left) @ right).to(output.dtype))
        for index, dense, scale in parts:  # (d_in, d_out)
            added = x[index].to(dense.dtype) @ dense
            output[index] += (added if scale == 1.0 else added * scale).to(output.dtype)
        return output

    return hook
