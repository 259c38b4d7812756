"""``instructedit experiment table3 --config FILE``: one of the paper's experiments end to end (resumable)."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def add_experiment_parser(subparsers: Any) -> None:
    """Register ``experiment`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("experiment", help="run one of the paper's experiments end to end (resumable)")
    p.add_argument("name", choices=["table3"], help="which experiment")
    p.add_argument("--config", required=True, help="experiment YAML (see configs/experiments/)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> int:
    from instructedit.experiments.table3 import ExperimentConfig, run_experiment

    config = ExperimentConfig.from_yaml(args.config)
    payload = run_experiment(config, show_progress=not args.no_progress)
    print(Path(f"{config.output}.md").read_text())
    logger.info("wrote %s.md and %s.json (%.0f s)", config.output, config.output, payload["elapsed_s"])
    return 0
