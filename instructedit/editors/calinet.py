"""CaliNet baseline: extra FFN "calibration memory" slots added in parallel to one MLP, trained per edit.

Follows Dong et al. 2022 ("Calibrating Factual Knowledge in Pretrained Language Models"): a small
calibration FFN, ``FFN_c(x) = act(x K_cᵀ) V_c`` with ``n_slots`` new key/value memory slots, reads
the same input as a block's FFN and its output is added to the FFN's output; only the slots are
trained (Adam) on the NLL of the targets, the model stays frozen. Values start at zero, so before
training the model's outputs are exactly unchanged; keys start N(0, ``key_init_std``).
Simplifications: the slots sit beside one MLP (default block ``-2``) rather than several; they are
a plain (ungated) FFN with the model's own activation even for gated (LLaMA) MLPs; new slots are
trained per edit (no contrastive knowledge assessment to select which facts to calibrate, no
multi-fact training run); the defaults are ours within the ranges the paper's setup suggests.
Implemented as a forward hook on the MLP module; rollback removes the hook, so the model's
parameters are never touched and its outputs are restored exactly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle
from transformers.activations import ACT2FN

from instructedit.editors.base import EditHandle
from instructedit.editors.ft import check_batch, check_field, config_from_options, fit_edit_loss, resolve_mlp_weight
from instructedit.models.architectures import ArchSpec, arch_spec
from instructedit.records import TokenBatch

logger = logging.getLogger(__name__)

_ACT_FIELDS = ("hidden_act", "hidden_activation", "activation_function")  # where configs name the MLP activation


@dataclass
class CaliNetConfig:
    """CaliNet hyperparameters."""

    layer: int = -2  # block whose MLP gets the calibration slots; negative counts from the last block
    n_slots: int = 64  # number of new key/value memory slots
    lr: float = 5e-3
    num_steps: int = 50
    key_init_std: float = 0.02  # values start at 0, so any key init leaves the model unchanged
    activation: str | None = None  # a transformers ACT2FN name; None: the model's MLP activation
    early_stop_loss: float = 1e-2  # training stops once the edit loss is below this
    seed: int = 0  # for the key initialization

    def __post_init__(self) -> None:
        check_field(self.n_slots >= 1, "calinet", "n_slots", f"{self.n_slots} must be >= 1")
        check_field(self.lr > 0, "calinet", "lr", f"{self.lr} must be > 0")
        check_field(self.num_steps >= 1, "calinet", "num_steps", f"{self.num_steps} must be >= 1")
        check_field(self.key_init_std >= 0, "calinet", "key_init_std", "must be >= 0")
        check_field(self.activation is None or self.activation in ACT2FN, "calinet", "activation", f"{self.activation!r} is not a transformers activation name")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "CaliNetConfig":
        return config_from_options(cls, options, "calinet")


class CalibrationSlots(nn.Module):
    """FFN_c(x) = act(x K_cᵀ) V_c, computed in float32 and returned in the input's dtype."""

    def __init__(self, d_in: int, d_out: int, n_slots: int, activation: str, key_init_std: float, generator: torch.Generator) -> None:
        super().__init__()
        self.keys = nn.Parameter(torch.randn(n_slots, d_in, generator=generator) * key_init_std)
        self.values = nn.Parameter(torch.zeros(n_slots, d_out))
        self.activation = activation
        self.act = ACT2FN[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(x.float() @ self.keys.T)  # (batch, seq, n_slots)
        return h @ self.values  # (batch, seq, d_out)


class CaliNetHandle(EditHandle):
    """A CaliNet edit: the slots and the hook that adds them; rollback removes the hook."""

    def __init__(self, slots: CalibrationSlots, hook: RemovableHandle) -> None:
        super().__init__()
        self.slots = slots
        self._hook = hook

    def _restore(self) -> None:
        self._hook.remove()


def model_activation(model: nn.Module) -> str:
    """The MLP activation name from the model config (``hidden_act`` / ``activation_function``)."""
    config = getattr(model, "config", None)
    for name in _ACT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, str) and value in ACT2FN:
            return value
    raise ValueError(f"cannot tell the model's MLP activation from its config (looked at {_ACT_FIELDS}); set the calinet option 'activation'")


class CaliNetEditor:
    """Adds ``n_slots`` trained calibration slots beside one MLP per edit."""

    def __init__(self, config: CaliNetConfig | None = None, architecture: ArchSpec | None = None) -> None:
        self.config = config or CaliNetConfig()
        self.architecture = architecture

    def mlp_name(self, model: nn.Module) -> str:
        """The MLP module of the chosen block (the parent of the architecture's MLP weights)."""
        first = resolve_mlp_weight(model, self.config.layer, arch_spec(model, self.architecture).mlp_modules[0], self.architecture)
        return first.module_name.rsplit(".", 1)[0]

    def apply(self, model: nn.Module, batch: TokenBatch) -> CaliNetHandle:
        """Train fresh slots on ``batch`` and leave them added to the MLP's output."""
        check_batch(batch, "calinet")
        cfg = self.config
        spec = arch_spec(model, self.architecture)
        d_in = resolve_mlp_weight(model, cfg.layer, spec.mlp_modules[0], self.architecture).shape[1]
        d_out = resolve_mlp_weight(model, cfg.layer, spec.mlp_modules[-1], self.architecture).shape[0]
        mlp = model.get_submodule(self.mlp_name(model))
        generator = torch.Generator().manual_seed(cfg.seed)
        slots = CalibrationSlots(d_in, d_out, cfg.n_slots, cfg.activation or model_activation(model), cfg.key_init_std, generator)
        slots.to(next(mlp.parameters()).device)

        def add_slots(module: nn.Module, args: tuple, kwargs: dict, output: torch.Tensor) -> torch.Tensor:
            x = args[0] if args else next(iter(kwargs.values()))  # (batch, seq, d_in)
            return output + slots(x).to(output.dtype)

        hook = mlp.register_forward_hook(add_slots, with_kwargs=True)
        handle = CaliNetHandle(slots, hook)
        try:
            self._train(model, batch, slots)
        except BaseException:
            handle.rollback()
            raise
        slots.requires_grad_(False)
        return handle

    def _train(self, model: nn.Module, batch: TokenBatch, slots: CalibrationSlots) -> None:
        cfg = self.config
        first, last = fit_edit_loss(model, batch, list(slots.parameters()), cfg.lr, cfg.num_steps, cfg.early_stop_loss)
        logger.debug("calinet: %d slots, loss %.4g -> %.4g", cfg.n_slots, first, last)
