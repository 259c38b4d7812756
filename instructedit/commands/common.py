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
