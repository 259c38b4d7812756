"""``instructedit serve``: the local demo web page (``serve.py``) for one model and one trained editor."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from instructedit.commands.common import (
    add_answer_stop_argument, add_dtype_argument, add_editor_arguments, add_neighbour_arguments, load_editor_and_model,
    neighbours_from_arguments,
)
from instructedit.models.loading import resolve_device
from instructedit.serve import INSTALL_HINT, LOOPBACK_HOSTS, create_app, is_loopback

logger = logging.getLogger(__name__)


def add_serve_parser(subparsers: Any) -> None:
    """Register ``serve`` on an ``add_subparsers()`` object; ``func(args) -> int`` runs it."""
    serve = subparsers.add_parser(
        "serve", help="a local demo web page: apply edits, compare predictions before/after, roll back",
        description="Starts a local web app (FastAPI + uvicorn) where edits are entered, applied to the model and rolled back. "
                    "It binds to 127.0.0.1 by default: anyone who can reach the port can edit the model.",
    )
    add_editor_arguments(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    serve.add_argument("--instruction", default="seen", help="'seen' (default), 'unseen', a description index, or 'none'")
    serve.add_argument("--device", default="auto", help="'auto' (cuda if available), 'cpu', 'cuda', ...")
    add_answer_stop_argument(serve)
    add_dtype_argument(serve)
    add_neighbour_arguments(serve, "the edit's (its Subject field, which the prompt must name)")
    serve.set_defaults(func=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ModuleNotFoundError:
        raise ValueError(INSTALL_HINT) from None
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    loopback = is_loopback(args.host)
    if not loopback:
        logger.warning("--host %s is not a loopback address: anyone who can reach port %d can edit this model, and there is no "
                       "authentication; use --host 127.0.0.1 unless you mean it", args.host, args.port)
    neighbours = neighbours_from_arguments(args)
    device = resolve_device(args.device)
    editor, model, tokenizer, model_name = load_editor_and_model(args.editor, args.model, args.instruction, device, args.dtype,
                                                                 args.answer_stop)
    app = create_app(editor, model, tokenizer, model_name=model_name, editor_name=str(args.editor),
                     allowed_hosts=[*LOOPBACK_HOSTS, args.host.lower()] if loopback else None, neighbours=neighbours)
    shown = f"[{args.host}]" if ":" in args.host else args.host
    logger.info("demo page: http://%s:%d/  (Ctrl+C stops the server)", shown, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0
