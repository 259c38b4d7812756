"""Arguments and helpers that several subcommands share (the editor to apply, the model it was trained for)."""

from __future__ import annotations

import argparse
from typing import Any

from instructedit.config import DEFAULT_MODEL


def add_editor_arguments(parser: argparse.ArgumentParser) -> None:
    """``--editor`` and ``--model``, as every command that applies a trained editor takes them."""
    parser.add_argument("--editor", required=True, metavar="DIR|ORG/NAME", help="a trained editor folder (e.g. RUN/best) or a hub repo id")
    parser.add_argument("--model", default=None, help=f"model to edit (default: the editor's model_name, else {DEFAULT_MODEL})")


def load_editor_model(editor_dir: str, model: str | None, device: str) -> tuple[Any, Any, str]:
    """The model ``--model`` names, else the one the editor folder was trained for, else the default; with its tokenizer and name."""
    from instructedit.editors.card import editor_model_name
    from instructedit.models.loading import load_model

    name = model or editor_model_name(editor_dir) or DEFAULT_MODEL
    m, tok = load_model(name, device=device)
    return m, tok, name


def load_editor_and_model(source: str, model: str | None, instruction: str | None, device: str) -> tuple[Any, Any, Any, str]:
    """A trained editor (``api.load_editor``: instruction, template and answer stop as it was trained) and the model to edit.

    The model is the one ``--model`` names, else the one the editor was trained for, else the default;
    returned with its tokenizer and name: ``(editor, model, tokenizer, name)``.
    """
    from instructedit.api import load_editor
    from instructedit.models.loading import load_model

    editor = load_editor(source, instruction=instruction, device=device)
    name = model or editor.model_name or DEFAULT_MODEL
    m, tok = load_model(name, device=device)
    return editor, m, tok, name


def per_editor(values: list[str], editors: list[str], flag: str, default: Any) -> list[Any]:
    """One value of a repeatable option per ``--editor`` (``default`` for each when the option is not given)."""
    if not values:
        return [default] * len(editors)
    if len(values) != len(editors):
        raise ValueError(f"{flag} was given {len(values)} time(s) for {len(editors)} --editor(s); give it once per --editor or not at all")
    return values


def aggregation(editor: Any) -> str:
    """How ``editor`` combines the edits of one call: its ``editor.aggregation`` (MEND: sum or least_squares); others sum."""
    return getattr(getattr(editor, "config", None), "aggregation", "sum")
