"""``instructedit config``: show the effective configuration (defaults, the YAML file, ``--set`` overrides)."""

from __future__ import annotations

import argparse
import json
from typing import Any


def cmd_config_show(args: argparse.Namespace) -> int:
    from instructedit.config import load_config

    print(json.dumps(load_config(args.config, args.set).to_dict(), indent=2))
    return 0


def add_config_parser(subparsers: Any) -> None:
    """Register ``config`` on an ``add_subparsers()`` object."""
    config = subparsers.add_parser("config", help="show the effective configuration")
    config.add_argument("--config", default=None)
    config.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    config.set_defaults(func=cmd_config_show)
