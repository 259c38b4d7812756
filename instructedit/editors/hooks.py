"""Capture the gradient factors of the editable weights: per-token inputs u and output gradients δ.

For a linear map y = W u (any orientation) the weight gradient of a loss is Σ_t δ_t u_tᵀ with
δ_t = ∂loss/∂y_t, so keeping u (forward hook) and δ (autograd on the kept outputs) is enough to
rebuild it — and that is what MEND transforms.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from instructedit.models.architectures import EditableWeight


@dataclass
class Factors:
    """Gradient factors of one weight; rows are tokens with a non-zero output gradient."""

    u: torch.Tensor  # (n_tokens, d_in)
    delta: torch.Tensor  # (n_tokens, d_out)
    rows: torch.Tensor | None = None  # (n_tokens,): the batch row each token comes from
    positions: torch.Tensor | None = None  # (n_tokens,): its position in that row

    def select(self, keep: torch.Tensor) -> Factors:
        """The tokens where ``keep`` (n_tokens,) is true, every field alike; ``self`` where every token is kept (no copy:
        nothing changes a factor in place; an edit's lower edited blocks keep all their tokens)."""
        if bool(keep.all()):
            return self
        return Factors(self.u[keep], self.delta[keep], None if self.rows is None else self.rows[keep],
                       None if self.positions is None else self.positions[keep])


class FactorCapture:
    """What ``capture_factors`` yields: inputs and (graph-attached) outputs of every editable module."""

    def __init__(self, weights: Sequence[EditableWeight]) -> None:
        self.weights = list(weights)
        self.inputs: dict[str, torch.Tensor] = {}
        self.outputs: dict[str, torch.Tensor] = {}

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
            self.inputs[name] = args[0].detach()  # (batch, seq, d_in)
            if not output.requires_grad:
                # Frozen weights and a no-grad input: start the graph here, so δ can still be taken.
                output = output.detach().requires_grad_(True)
                self.outputs[name] = output
                return output
            self.outputs[name] = output  # (batch, seq, d_out)
            return None

        return hook

    def factors(self, loss: torch.Tensor, retain_graph: bool = False) -> dict[str, Factors]:
        """δ for every captured output from one backward of ``loss`` (no parameter gradients)."""
        missing = [w.name for w in self.weights if w.name not in self.outputs]
        if missing:
            raise RuntimeError(f"editable weights {missing} were not used in the forward pass")
        names = [w.name for w in self.weights]
        grads = torch.autograd.grad(loss, [self.outputs[n] for n in names], retain_graph=retain_graph)
        result = {}
        for name, grad in zip(names, grads):
            u = self.inputs[name].reshape(-1, self.inputs[name].shape[-1])
            delta = grad.reshape(-1, grad.shape[-1])
            keep = delta.ne(0).any(-1)  # tokens that do not influence the loss carry no gradient
            rows = torch.arange(grad.shape[0], device=grad.device)[:, None].expand(grad.shape[:-1]).reshape(-1)  # (batch·seq,)
            positions = torch.arange(grad.shape[1], device=grad.device)[None, :].expand(grad.shape[:-1]).reshape(-1)
            result[name] = Factors(u, delta, rows, positions).select(keep)
        return result


@contextmanager
def capture_factors(model: nn.Module, weights: Sequence[EditableWeight]) -> Iterator[FactorCapture]:
    """Register forward hooks on the editable modules; every handle is removed on exit."""
    capture = FactorCapture(weights)
    handles = []
    try:
        for w in weights:
            handles.append(model.get_submodule(w.module_name).register_forward_hook(capture._hook(w.name)))
        yield capture
    finally:
        for handle in handles:
            handle.remove()


def gradient_from_factors(factors: Factors, weight: EditableWeight) -> torch.Tensor:
    """Σ_t δ_t u_tᵀ in the parameter's own storage orientation (transposed for Conv1D)."""
    grad = factors.delta.T @ factors.u  # (d_out, d_in)
    return grad.T if weight.transposed else grad
