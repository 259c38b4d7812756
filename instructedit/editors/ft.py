"""FT-L baseline: constrained fine-tuning of one MLP weight on the edit's target NLL.

Follows ROME's constrained fine-tuning baseline (Meng et al. 2022, "FT+L") as EasyEdit's ``FT``
implements it: Adam on one MLP weight (the down-projection / ``c_proj`` of one block), the loss is
the NLL of the target tokens only, a step is skipped once the loss is below ``early_stop_loss``, and
after every step each entry of the weight is clamped to within ±``norm_constraint`` of its
original value (an L∞ ball; 5e-4 is EasyEdit's GPT-2 XL value, its LLaMA-2 config is unconstrained:
``norm_constraint: null``). Simplifications: no KL term (EasyEdit's ``kl_factor`` 0 default), one
weight rather than a list of layers, the loss covers every target token (EasyEdit's ``target_new``
objective, not ``prompt_last``), and the weight is trained as a float32 master copy passed
functionally (``torch.func.functional_call``), so the base model is never touched while training
and the result is written with a ``WeightEditHandle`` (bit-exact rollback). Default layer: EasyEdit
uses block 0 of GPT-2 XL and 21 of LLaMA-2-7B's 32; we default to a middle-to-late block (``-4``).
This module also holds the helpers the other baselines share: option parsing and layer resolution.
"""

from __future__ import annotations

import dataclasses
import logging
import types
import typing
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import nn
from torch.func import functional_call

from instructedit.editors.base import EditResult, WeightEditHandle
from instructedit.losses import masked_nll
from instructedit.models.architectures import ArchSpec, EditableWeight, arch_spec, num_layers, resolve_editable_weights
from instructedit.records import TokenBatch

logger = logging.getLogger(__name__)

C = TypeVar("C")


def _coerce(value: Any, hint: Any, method: str, name: str) -> Any:
    """``value`` checked against the field type; numbers given as strings (YAML 1.1 reads ``5e-4`` so) are parsed."""
    kinds = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    if value is None and type(None) in kinds:
        return None
    if float in kinds and isinstance(value, (int, float, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            pass
    elif int in kinds and isinstance(value, int) and not isinstance(value, bool):
        return value
    elif str in kinds and isinstance(value, str):
        return value
    expected = " or ".join("null" if k is type(None) else k.__name__ for k in kinds)
    raise ValueError(f"{method} option '{name}': expected {expected}, got {value!r}")


def config_from_options(cls: type[C], options: dict[str, Any], method: str) -> C:
    """Build the dataclass ``cls`` from ``options``; an unknown key fails listing the valid ones."""
    valid = [f.name for f in dataclasses.fields(cls)]  # type: ignore[arg-type]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for method {method!r}; valid options: {valid}")
    hints = typing.get_type_hints(cls)
    return cls(**{k: _coerce(v, hints[k], method, k) for k, v in options.items()})


def check_field(cond: bool, method: str, name: str, message: str) -> None:
    if not cond:
        raise ValueError(f"{method} option '{name}': {message}")


def layer_index(model: nn.Module, spec: ArchSpec, layer: int) -> int:
    """``layer`` as a block index; negative values count from the last block (-1 = last)."""
    n = num_layers(model, spec)
    if not -n <= layer < n:
        raise ValueError(f"layer {layer} does not exist: the model has {n} blocks (use 0..{n - 1} or -{n}..-1)")
    return layer % n


def resolve_mlp_weight(model: nn.Module, layer: int, module: str | None = None, architecture: ArchSpec | None = None) -> EditableWeight:
    """The weight of MLP ``module`` (default: the table's last one, the down-projection) of block ``layer``."""
    spec = arch_spec(model, architecture)
    module = module or spec.mlp_modules[-1]
    if module not in spec.mlp_modules:
        raise ValueError(f"module {module!r} is not an MLP module of this architecture; choose one of {list(spec.mlp_modules)}")
    index = layer_index(model, spec, layer)
    return resolve_editable_weights(model, spec, names=[f"{spec.layers}.{index}.{module}.weight"])[0]


def edit_loss(logits: torch.Tensor, batch: TokenBatch) -> torch.Tensor:
    """Mean NLL of the batch's labelled (target) tokens; ``logits`` is (batch, seq, vocab)."""
    mask = batch.label_mask
    return masked_nll(logits[mask], batch.labels[mask])


def fit_edit_loss(model: nn.Module, batch: TokenBatch, params: list[torch.Tensor], lr: float, steps: int,
                  early_stop_loss: float) -> tuple[float, float]:
    """Adam on ``params`` (new memory: CaliNet's slots, GRACE's values) against the batch's edit loss, for at most ``steps``
    steps or until the loss is below ``early_stop_loss``; returns the first and the last loss."""
    opt = torch.optim.Adam(params, lr=lr)
    first = last = float("nan")
    with torch.enable_grad():
        for step in range(steps):
            logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = edit_loss(logits, batch)
            first = loss.item() if step == 0 else first
            last = loss.item()
            if last < early_stop_loss:
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return first, last


def check_batch(batch: TokenBatch, method: str) -> None:
    if not bool(batch.label_mask.any()):
        raise ValueError(f"{method}: the edit batch has no target tokens to learn")


@dataclass
class FTConfig:
    """FT-L hyperparameters (EasyEdit ``FT`` / ROME ``FT+L`` defaults)."""

    layer: int = -4  # block whose MLP weight is tuned; negative counts from the last block
    module: str | None = None  # one of the architecture's mlp_modules; None: the last (down_proj / c_proj)
    lr: float = 5e-4
    num_steps: int = 25
    norm_constraint: float | None = 5e-4  # L∞ radius around the original weight; None: unconstrained
    weight_decay: float = 0.0
    early_stop_loss: float = 1e-2  # no step is taken once the edit loss is below this

    def __post_init__(self) -> None:
        check_field(self.lr > 0, "ft", "lr", f"{self.lr} must be > 0")
        check_field(self.num_steps >= 1, "ft", "num_steps", f"{self.num_steps} must be >= 1")
        check_field(self.norm_constraint is None or self.norm_constraint > 0, "ft", "norm_constraint", "must be > 0 or null (unconstrained)")
        check_field(self.weight_decay >= 0, "ft", "weight_decay", "must be >= 0")

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> "FTConfig":
        return config_from_options(cls, options, "ft")


class FTEditor:
    """Fine-tunes one MLP weight on the edit batch; ``apply`` returns a bit-exact ``WeightEditHandle``."""

    def __init__(self, config: FTConfig | None = None, architecture: ArchSpec | None = None) -> None:
        self.config = config or FTConfig()
        self.architecture = architecture

    def weight(self, model: nn.Module) -> EditableWeight:
        return resolve_mlp_weight(model, self.config.layer, self.config.module, self.architecture)

    def edit(self, model: nn.Module, batch: TokenBatch) -> EditResult:
        """The tuned weight as an ``EditResult``; the model itself is not modified."""
        check_batch(batch, "ft")
        cfg = self.config
        name = self.weight(model).name
        param = model.get_parameter(name)
        original = param.detach().float()
        master = nn.Parameter(original.clone())  # float32 copy: Adam steps survive half-precision models
        opt = torch.optim.Adam([master], lr=cfg.lr, weight_decay=cfg.weight_decay)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        pre_loss: torch.Tensor | None = None
        loss = torch.tensor(float("nan"))
        with torch.enable_grad():
            for step in range(cfg.num_steps):
                logits = functional_call(model, {name: master.to(param.dtype)}, args=(), kwargs=inputs).logits
                loss = edit_loss(logits, batch)
                pre_loss = loss.detach() if pre_loss is None else pre_loss
                if loss.item() < cfg.early_stop_loss:
                    break
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if cfg.norm_constraint is not None:
                    with torch.no_grad():  # project back onto the L∞ ball around the original weight
                        master.copy_(torch.clamp(master, original - cfg.norm_constraint, original + cfg.norm_constraint))
        logger.debug("ft: %s, %d steps, loss %.4g -> %.4g", name, step + 1, float(pre_loss), loss.item())
        new = master.detach().to(param.dtype)
        return EditResult(new_params={name: new}, updates={name: new.float() - original}, pre_edit_loss=pre_loss)

    def apply(self, model: nn.Module, batch: TokenBatch) -> WeightEditHandle:
        """Write the tuned weight into ``model``; the handle restores the original bit for bit."""
        return WeightEditHandle(model, self.edit(model, batch))
