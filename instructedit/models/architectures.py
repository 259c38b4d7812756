"""Architecture table: where the blocks, the final norm and the editable MLP weights live, per model_type."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import nn


@dataclass(frozen=True)
class ArchSpec:
    """Where things are inside one architecture family.

    ``layers``: dotted path of the ModuleList of transformer blocks.
    ``final_norm``: dotted path of the norm applied before the vocabulary projection.
    ``mlp_modules``: the editable MLP modules, relative to one block.
    ``conv1d``: weights stored (d_in, d_out), as GPT-2's ``Conv1D`` does.
    """

    layers: str
    final_norm: str
    mlp_modules: tuple[str, ...]
    conv1d: bool = False

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "ArchSpec":
        """The spec a config's ``model.architecture`` or an ``editor_config.json``'s ``architecture`` spells out."""
        return cls(values["layers"], values["final_norm"], tuple(values["mlp_modules"]), bool(values.get("conv1d", False)))


_LLAMA_LIKE = ArchSpec("model.layers", "model.norm", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"))

ARCHITECTURES: dict[str, ArchSpec] = {
    "gpt2": ArchSpec("transformer.h", "transformer.ln_f", ("mlp.c_fc", "mlp.c_proj"), conv1d=True),
    "llama": _LLAMA_LIKE,
    "mistral": _LLAMA_LIKE,
    "qwen2": _LLAMA_LIKE,
    "qwen3": _LLAMA_LIKE,
    "gemma": _LLAMA_LIKE,
    "gemma2": _LLAMA_LIKE,
    "gemma3_text": _LLAMA_LIKE,
    "gemma3": ArchSpec(
        "model.language_model.layers",
        "model.language_model.norm",
        ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"),
    ),
    "gptj": ArchSpec("transformer.h", "transformer.ln_f", ("mlp.fc_in", "mlp.fc_out")),
    "gpt_neox": ArchSpec("gpt_neox.layers", "gpt_neox.final_layer_norm", ("mlp.dense_h_to_4h", "mlp.dense_4h_to_h")),
}


@dataclass(frozen=True)
class EditableWeight:
    """One inner weight the editor updates."""

    name: str  # parameter name, e.g. "model.layers.29.mlp.down_proj.weight"
    module_name: str  # its module, e.g. "model.layers.29.mlp.down_proj"
    layer: int  # index of the block it sits in
    transposed: bool  # stored (d_in, d_out) rather than nn.Linear's (d_out, d_in)
    shape: tuple[int, int]  # (d_out, d_in): the orientation of the gradient factors δ uᵀ


def transposed_of(weights: Iterable[EditableWeight]) -> dict[str, bool]:
    """Per weight name, whether it is stored transposed, (d_in, d_out) as GPT-2's Conv1D: the orientation map that
    updates given as factors are added and formed with (``row_edits.per_row_updates``, ``editors.base.ThinUpdates``)."""
    return {w.name: w.transposed for w in weights}


def arch_spec(model: nn.Module, override: ArchSpec | None = None) -> ArchSpec:
    """The table entry for ``model.config.model_type`` (or the user's override)."""
    if override is not None:
        return override
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ValueError(
            f"unknown architecture model_type={model_type!r}: known ones are {sorted(ARCHITECTURES)}; "
            "for another architecture set model.architecture (layers, final_norm, mlp_modules) in the config"
        )
    return ARCHITECTURES[model_type]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2 style Conv1D: weight stored (d_in, d_out). The one place orientation is decided."""
    return type(module).__name__ == "Conv1D"


def num_layers(model: nn.Module, spec: ArchSpec) -> int:
    return len(model.get_submodule(spec.layers))


def resolve_editable_weights(
    model: nn.Module,
    spec: ArchSpec,
    names: list[str] | None = None,
    last_n_layers: int = 3,
) -> list[EditableWeight]:
    """The inner weights: ``names`` if given, else the MLP weights of the last ``last_n_layers`` blocks."""
    if names:
        param_names = list(names)
    else:
        n = num_layers(model, spec)
        if not 1 <= last_n_layers <= n:
            raise ValueError(f"editor.last_n_layers={last_n_layers} must be between 1 and the model's {n} layers")
        param_names = [f"{spec.layers}.{i}.{m}.weight" for i in range(n - last_n_layers, n) for m in spec.mlp_modules]
    params = dict(model.named_parameters())
    layer_re = re.compile(rf"^{re.escape(spec.layers)}\.(\d+)\.")
    weights = []
    for name in param_names:
        if name not in params:
            close = [p for p in params if p.endswith(name.split(".")[-2] + ".weight")][:5]
            raise ValueError(f"editable weight {name!r} is not a parameter of the model; similar names: {close}")
        match = layer_re.match(name)
        if match is None:
            raise ValueError(f"editable weight {name!r} is not inside the transformer blocks ({spec.layers}.N.*)")
        module_name = name.rsplit(".", 1)[0]
        module = model.get_submodule(module_name)
        transposed = is_conv1d(module)
        w = params[name]
        if w.dim() != 2:
            raise ValueError(f"editable weight {name!r} has shape {tuple(w.shape)}; only 2-D weights can be edited")
        shape = (w.shape[1], w.shape[0]) if transposed else (w.shape[0], w.shape[1])
        weights.append(EditableWeight(name, module_name, int(match.group(1)), transposed, shape))
    return weights
