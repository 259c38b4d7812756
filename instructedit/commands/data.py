"""``instructedit data stats``: records per task and split, and per file."""

from __future__ import annotations

import argparse
from typing import Any


def cmd_data_stats(args: argparse.Namespace) -> int:
    from instructedit.tasks.splits import format_stats

    print(format_stats(args.data_dir, seed=args.seed))
    return 0


def add_data_parser(subparsers: Any) -> None:
    """Register ``data`` (and its ``stats``) on an ``add_subparsers()`` object."""
    data = subparsers.add_parser("data", help="inspect the editing datasets").add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.required = True
    stats = data.add_parser("stats", help="records per task and split, and per file")
    stats.add_argument("--data-dir", default=None, help="data folder (default: $INSTRUCTEDIT_DATA, else ../shared/data beside the repo)")
    stats.add_argument("--seed", type=int, default=0, help="split seed")
    stats.set_defaults(func=cmd_data_stats)
