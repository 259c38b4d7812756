"""Editor registry: method name -> factory. Unknown names fail with the list of valid ones.

``EDITORS`` builds a ready editor (a trained one loaded from its folder, or a baseline);
``LEARNED_EDITORS`` names the classes meta-training can start fresh, each through its ``for_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from instructedit.config import Config
from instructedit.editors.base import Editor

if TYPE_CHECKING:
    from instructedit.editors.learned import LearnedEditor

EditorFactory = Callable[[nn.Module, Any, dict[str, Any]], Editor]  # (model, tokenizer, options) -> editor


def _trained(method: str, model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Editor:
    if "path" not in options:
        raise ValueError(f"method {method!r} needs a trained editor: pass its folder (--editor DIR / options['path'])")
    return load_trained_editor(Path(options["path"]), device=next(model.parameters()).device, method=method)


def _ft(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Editor:
    from instructedit.editors.ft import FTConfig, FTEditor

    editor = FTEditor(FTConfig.from_options(options))
    editor.weight(model)  # fail here, not at the first edit, when the layer/module does not exist
    return editor


def _grace(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Editor:
    from instructedit.editors.grace import GRACEConfig, GRACEEditor

    editor = GRACEEditor(GRACEConfig.from_options(options))
    editor.module_name(model)
    return editor


def _calinet(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Editor:
    from instructedit.editors.calinet import CaliNetConfig, CaliNetEditor

    editor = CaliNetEditor(CaliNetConfig.from_options(options))
    editor.mlp_name(model)
    return editor


EDITORS: dict[str, EditorFactory] = {
    "mend": partial(_trained, "mend"),
    "ke": partial(_trained, "ke"),
    "ft": _ft,
    "grace": _grace,
    "calinet": _calinet,
}


def make_editor(name: str, model: nn.Module, tokenizer: Any, options: dict[str, Any] | None = None) -> Editor:
    """Build the editor registered as ``name`` for ``model``."""
    if name not in EDITORS:
        raise ValueError(f"unknown editing method {name!r}; valid methods: {sorted(EDITORS)}")
    return EDITORS[name](model, tokenizer, dict(options or {}))


def _mend_class() -> type[LearnedEditor]:
    from instructedit.editors.mend import MENDEditor

    return MENDEditor


def _ke_class() -> type[LearnedEditor]:
    from instructedit.editors.ke import KEEditor

    return KEEditor


# editor.method -> the class whose ``for_model(model, model_config, editor_config)`` builds a fresh, trainable editor;
# its keys are config.LEARNED_METHODS (the config validates editor.method without importing the editors; a test checks they agree)
LEARNED_EDITORS: dict[str, Callable[[], type[LearnedEditor]]] = {
    "mend": _mend_class,
    "ke": _ke_class,
}


def build_editor(model: nn.Module, config: Config) -> LearnedEditor:
    """A fresh editor of ``config.editor.method`` for ``model``'s inner weights, as meta-training starts it."""
    name = config.editor.method
    if name not in LEARNED_EDITORS:
        raise ValueError(f"editor.method {name!r} cannot be meta-trained; trainable methods: {sorted(LEARNED_EDITORS)}")
    return LEARNED_EDITORS[name]().for_model(model, config.model, config.editor)


def saved_method(directory: str | Path) -> str:
    """The trained-editor method a folder's ``editor_config.json`` names; any other value fails naming the file."""
    from instructedit.editors.learned import CONFIG_NAME, read_editor_config

    saved = read_editor_config(directory).get("method")
    if saved not in LEARNED_EDITORS:
        raise ValueError(f"{Path(directory) / CONFIG_NAME}: method {saved!r} is not a trained editor's; valid methods: {sorted(LEARNED_EDITORS)}")
    return saved


def load_trained_editor(directory: str | Path, device: str | torch.device = "cpu", method: str | None = None) -> LearnedEditor:
    """The trained editor saved in ``directory`` (in eval mode), of the class its ``editor_config.json`` names;
    ``method``: the method it must be."""
    saved = saved_method(directory)
    if method is not None and saved != method:
        raise ValueError(f"{directory} holds a {saved!r} editor, not {method!r}: load it as method {saved!r}")
    return LEARNED_EDITORS[saved]().from_pretrained(directory, device=device).eval()
