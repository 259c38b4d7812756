"""``instructedit experiment NAME --config FILE``: one of the paper's experiments end to end (resumable)."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


def _table3(config_path: str, progress: bool, command: str) -> tuple[str, dict[str, Any]]:
    from instructedit.experiments.table3 import ExperimentConfig, run_experiment

    config = ExperimentConfig.from_yaml(config_path)
    return config.output, run_experiment(config, show_progress=progress)


def _transfer(config_path: str, progress: bool, command: str) -> tuple[str, dict[str, Any]]:
    from instructedit.experiments.transfer import TransferConfig, run_transfer

    config = TransferConfig.from_yaml(config_path)
    return config.output, run_transfer(config, show_progress=progress, command=command)


# name -> (help, runner(config path, progress, command line) -> (output prefix, payload)); imports stay lazy
EXPERIMENTS: dict[str, tuple[str, Callable[[str, bool, str], tuple[str, dict[str, Any]]]]] = {
    "table3": ("the paper's main table: train the MEND variants, evaluate every method", _table3),
    "transfer": ("Table 1, cross-task transfer: single-task MEND editors, each scored on every task, with the drop off its "
                 "own task (JSON, Markdown, heat-map PNG)", _transfer),
}


def add_experiment_parser(subparsers: Any) -> None:
    """Register ``experiment`` on an ``add_subparsers()`` object."""
    p = subparsers.add_parser("experiment", help="run one of the paper's experiments end to end (resumable): "
                              "table3 (Table 3), transfer (Table 1, cross-task transfer)")
    p.add_argument("name", choices=list(EXPERIMENTS), help="; ".join(f"{name}: {h}" for name, (h, _) in EXPERIMENTS.items()))
    p.add_argument("--config", required=True, help="experiment YAML (see configs/experiments/)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run_experiment_command)


def run_experiment_command(args: argparse.Namespace) -> int:
    command = f"instructedit experiment {args.name} --config {args.config}"
    output, payload = EXPERIMENTS[args.name][1](args.config, not args.no_progress, command)
    print(Path(f"{output}.md").read_text())
    logger.info("wrote %s.md and %s.json (%.0f s)", output, output, payload["elapsed_s"])
    return 0
