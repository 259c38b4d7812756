"""``instructedit memory --config FILE``: the memory estimate of a training run, without loading the model."""

from __future__ import annotations

import argparse
import json
from typing import Any

from instructedit.config import load_config
from instructedit.memory import RUNTIME_BYTES, estimate_memory


def cmd_memory(args: argparse.Namespace) -> int:
    config = load_config(args.config, args.set)
    estimate = estimate_memory(config, device=args.device)
    if args.json:
        print(json.dumps(estimate.to_dict(), indent=2))
    else:
        print(f"memory estimate per training process: {config.model.name} on {args.device}")
        print(estimate.format())
    return 0


def add_memory_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``memory`` on an ``add_subparsers()`` object."""
    parser = subparsers.add_parser("memory", help="estimate the memory a training run needs (nothing is loaded)")
    parser.add_argument("--config", required=True, help="YAML config (see configs/ and configs/presets/)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    parser.add_argument("--device", choices=sorted(RUNTIME_BYTES), default="cuda", help="where training would run (default: cuda)")
    parser.add_argument("--json", action="store_true", help="print the terms as JSON (bytes)")
    parser.set_defaults(func=cmd_memory)
    return parser
