"""instructedit: instruction-based knowledge editing (InstructEdit / MEND); the public API is re-exported here, loaded lazily."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from instructedit.api import Edit, EditedModel, InstructEditor, TargetScore, load_editor, save_edited_model
    from instructedit.editors.aggregation import KeyMemory
    from instructedit.editors.neighbours import Neighbours
    from instructedit.hub import push_editor
    from instructedit.models.loading import load_model

# name -> module; resolved on first access so `import instructedit` (and the CLI's start-up) stays light.
_EXPORTS = {
    "Edit": "instructedit.api",
    "EditedModel": "instructedit.api",
    "InstructEditor": "instructedit.api",
    "KeyMemory": "instructedit.editors.aggregation",
    "Neighbours": "instructedit.editors.neighbours",
    "TargetScore": "instructedit.api",
    "load_editor": "instructedit.api",
    "save_edited_model": "instructedit.api",
    "push_editor": "instructedit.hub",
    "load_model": "instructedit.models.loading",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'instructedit' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
