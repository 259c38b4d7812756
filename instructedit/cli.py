"""Command-line interface: parse, load config, seed, configure logging, call the library."""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import sys
from pathlib import Path

import numpy as np
import torch

from instructedit.analysis.commands import add_analysis_parsers
from instructedit.calibration import add_calibrate_parser
from instructedit.evaluation.commands import add_evaluate_parser
from instructedit.experiments import add_experiment_parser
from instructedit.commands.memory import add_memory_parser
from instructedit.serve import add_serve_parser
from instructedit.user_commands import add_user_parsers

logger = logging.getLogger("instructedit")


def _setup_logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for noisy in ("transformers", "httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cmd_data_stats(args: argparse.Namespace) -> int:
    from instructedit.tasks.splits import format_stats

    print(format_stats(args.data_dir, seed=args.seed))
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from instructedit.config import load_config
    from instructedit.training import train

    config = load_config(args.config, args.set)
    _seed(config.training.seed)
    summary = train(config, args.output, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun, one process reports
        return 0
    first, last = summary["first_validation"], summary["last_validation"]
    print(f"trained {summary['steps']} steps{' (stopped early)' if summary['stopped_early'] else ''}; best checkpoint: {summary['best_checkpoint']} (step {summary['best_step']})")
    for name, v in (("start", first), ("end", last)):
        if v:
            print(f"  val @{v['step']:>6} [{name}]: edit_acc {v['edit_acc']:.3f} (pre-edit {v['edit_acc_pre']:.3f})  locality {v['locality']:.3f}  loss {v['loss']:.4f}")
    return 0


def cmd_config_show(args: argparse.Namespace) -> int:
    from instructedit.config import load_config

    print(json.dumps(load_config(args.config, args.set).to_dict(), indent=2))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="instructedit", description="Instruction-based knowledge editing of LLMs (InstructEdit / MEND).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data = sub.add_parser("data", help="inspect the editing datasets").add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.required = True
    stats = data.add_parser("stats", help="records per task and split, and per file")
    stats.add_argument("--data-dir", default=None, help="data folder (default: $INSTRUCTEDIT_DATA, else ../shared/data beside the repo)")
    stats.add_argument("--seed", type=int, default=0, help="split seed")
    stats.set_defaults(func=cmd_data_stats)

    train = sub.add_parser("train", help="meta-train an editor (MEND / multi-task MEND / InstructEdit)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    train.add_argument("--output", required=True, help="run folder: checkpoints (best/, last/), metrics.jsonl, summary.json; resumes if it holds a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)

    add_evaluate_parser(sub)
    add_calibrate_parser(sub)
    add_experiment_parser(sub)
    add_memory_parser(sub)
    add_analysis_parsers(sub)
    add_user_parsers(sub)
    add_serve_parser(sub)

    config = sub.add_parser("config", help="show the effective configuration")
    config.add_argument("--config", default=None)
    config.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    config.set_defaults(func=cmd_config_show)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, PermissionError, ConnectionError, FloatingPointError) as e:  # FloatingPointError: training diverged
        logger.error("%s", e)
        return 2
    except KeyboardInterrupt:
        logger.error("interrupted; the last checkpoint (if any) is intact and a rerun resumes from it")
        return 130


if __name__ == "__main__":
    sys.exit(main())
