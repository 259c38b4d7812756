"""Many single edits answered in one batch: each row of a forward pass sees its own case's weight update.

The generation protocol asks every case's queries after that case's edit alone. Writing each edit
into the model and decoding its few queries costs one decoding loop per case; here the updates
ΔW of several cases are added by forward hooks on the edited modules, row by row
(``out[rows of case c] += x[rows of case c] · ΔW_c``), so their queries decode together and the
model's weights are never written. The result equals decoding with W + ΔW_c up to float rounding
(x·W + x·ΔW instead of x·(W + ΔW)).

Thin updates (low-rank factors ΔW_c = L_c · R_c, a few columns each: MEND's) are added for all rows at
once: out += ((x · [L_1 … L_k]) ⊙ M) · [R_1; …; R_k], where M (rows × columns) holds row r's scale in its
own case's columns and zeros elsewhere. Two thin products and no per-case gathers: a decoding step of
200 rows of 16 cases made 16 gathers and scatters per edited module before.
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
            thin = [(updates[name], scale, index) for updates, scale, index in groups.values() if isinstance(updates.get(name), tuple)]
            dense = [(torch.tensor(index, device=updates[name].device), _oriented(updates[name], transposed[name]), scale)
                     for updates, scale, index in groups.values() if name in updates and not isinstance(updates[name], tuple)]
            handles.append(module.register_forward_hook(_adder(_masked_factors(thin, len(rows)) if thin else None, dense)))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _oriented(update: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The dense update M whose product x · M is the row's added output: ΔW (stored (d_in, d_out), Conv1D) or ΔWᵀ."""
    return update if transposed else update.T


def _masked_factors(thin: Sequence[tuple[tuple[torch.Tensor, torch.Tensor], float, list[int]]],
                    rows: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin updates of one module side by side: (left (d_in, R), mask (rows, R), right (R, d_out)), the mask holding
    each row's scale in its own update's R columns (zero for a row without one)."""
    lefts, rights = [left for (left, _), _, _ in thin], [right for (_, right), _, _ in thin]
    mask = torch.zeros((rows, sum(left.shape[1] for left in lefts)), dtype=lefts[0].dtype, device=lefts[0].device)
    at = 0
    for (left, _), scale, index in thin:
        mask[index, at : at + left.shape[1]] = scale
        at += left.shape[1]
    return torch.cat(lefts, dim=1), mask, torch.cat(rights, dim=0)


def _adder(thin: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None, parts: list[tuple[torch.Tensor, torch.Tensor, float]]):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        x = args[0]  # (rows, seq, d_in)
        if thin is not None:
            left, mask, right = thin
            mask = mask.view(mask.shape[0], *[1] * (x.dim() - 2), mask.shape[1])  # over the rows' positions
            output = output + (((x.to(left.dtype) @ left) * mask) @ right).to(output.dtype)
        else:
            output = output.clone()
        for index, dense, scale in parts:  # (d_in, d_out)
            added = x[index].to(dense.dtype) @ dense
            output[index] += (added if scale == 1.0 else added * scale).to(output.dtype)
        return output

    return hook
