"""Editor registry: method name -> factory. Unknown names fail with the list of valid ones.

``EDITORS`` builds a ready editor (a trained one loaded from its folder, or a baseline);
``LEARNED_EDITORS`` names the classes meta-training can start fresh, each through its ``for_model``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from torch import nn

from instructedit.config import Config
from instructedit.editors.base import Editor

if TYPE_CHECKING:
    from instructedit.editors.mend import MENDEditor

EditorFactory = Callable[[nn.Module, Any, dict[str, Any]], Editor]  # (model, tokenizer, options) -> editor


def _mend(model: nn.Module, tokenizer: Any, options: dict[str, Any]) -> Editor:
    from instructedit.editors.mend import MENDEditor

    if "path" not in options:
        raise ValueError("method 'mend' needs a trained editor: pass its folder (--editor DIR / options['path'])")
    editor = MENDEditor.from_pretrained(Path(options["path"]), device=next(model.parameters()).device)
    return editor.eval()


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
    "mend": _mend,
    "ft": _ft,
    "grace": _grace,
    "calinet": _calinet,
}


def make_editor(name: str, model: nn.Module, tokenizer: Any, options: dict[str, Any] | None = None) -> Editor:
    """Build the editor registered as ``name`` for ``model``."""
    if name not in EDITORS:
        raise ValueError(f"unknown editing method {name!r}; valid methods: {sorted(EDITORS)}")
    return EDITORS[name](model, tokenizer, dict(options or {}))


def _mend_class() -> type[MENDEditor]:
    from instructedit.editors.mend import MENDEditor

    return MENDEditor


# editor.method -> the class whose ``for_model(model, model_config, editor_config)`` builds a fresh, trainable editor
LEARNED_EDITORS: dict[str, Callable[[], type[MENDEditor]]] = {
    "mend": _mend_class,
}


def build_editor(model: nn.Module, config: Config) -> MENDEditor:
    """A fresh editor of ``config.editor.method`` for ``model``'s inner weights, as meta-training starts it."""
    name = config.editor.method
    if name not in LEARNED_EDITORS:
        raise ValueError(f"editor.method {name!r} cannot be meta-trained; trainable methods: {sorted(LEARNED_EDITORS)}")
    return LEARNED_EDITORS[name]().for_model(model, config.model, config.editor)
