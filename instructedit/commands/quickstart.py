"""``instructedit quickstart``: train (or reuse) a small InstructEdit editor and show a few edits (``quickstart.py``)."""

from __future__ import annotations

import argparse
from typing import Any

from instructedit.config import DEFAULT_MODEL


def add_quickstart_parser(subparsers: Any) -> None:
    """Register ``quickstart`` on an ``add_subparsers()`` object."""
    quick = subparsers.add_parser(
        "quickstart", help="train (or reuse) a small InstructEdit editor on the default model and show a few edits",
        description="The first run trains and calibrates a short-budget least-squares editor (24 steps, about 4 minutes on 2 CPU cores) into the cache; later "
                    "runs reuse it and take seconds. Then a few edits are applied one at a time and rolled back.",
    )
    quick.add_argument("--budget-steps", type=int, default=None, metavar="N", help="optimizer steps (default: the packaged quickstart.yaml's)")
    quick.add_argument("--output", default=None, metavar="DIR", help="run folder (default: the cache, keyed by the config's hash)")
    quick.add_argument("--retrain", action="store_true", help="train again even if a finished editor is there")
    quick.add_argument("--model", default=None, help=f"model to train the editor for (default: {DEFAULT_MODEL})")
    quick.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a quickstart config value (repeatable)")
    quick.add_argument("--editor", default=None, metavar="DIR",
                       help="show the demo with this trained editor (e.g. runs/ls/calibrated, the recommended one) instead of training one")
    quick.add_argument("--no-progress", action="store_true", help="no progress bar")
    quick.set_defaults(func=run_quickstart_command)


def run_quickstart_command(args: argparse.Namespace) -> int:
    from instructedit.quickstart import format_report, run_quickstart

    if args.budget_steps is not None and args.budget_steps < 1:
        raise ValueError(f"--budget-steps must be >= 1, got {args.budget_steps}")
    if args.editor is not None:
        training = [flag for flag, given in (("--budget-steps", args.budget_steps is not None), ("--output", args.output is not None),
                                             ("--retrain", args.retrain), ("--set", bool(args.set))) if given]
        if training:
            raise ValueError(f"{', '.join(training)}: {'shapes' if len(training) == 1 else 'shape'} the editor the quickstart "
                             "trains; --editor shows a trained one")
    result = run_quickstart(model_name=args.model, overrides=args.set, budget_steps=args.budget_steps, output=args.output,
                            retrain=args.retrain, show_progress=not args.no_progress, editor=args.editor)
    print(format_report(result))
    return 0
