"""``instructedit train --config FILE --output RUN``: meta-train an editor (resumes an interrupted run)."""

from __future__ import annotations

import argparse
import os
import random
from typing import Any

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Python, NumPy and torch seeds (only the command line seeds)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cmd_train(args: argparse.Namespace) -> int:
    from instructedit.config import load_config
    from instructedit.training import train

    config = load_config(args.config, args.set)
    seed_everything(config.training.seed)
    summary = train(config, args.output, show_progress=not args.no_progress)
    if int(os.environ.get("RANK", "0")) != 0:  # under accelerate/torchrun, one process reports
        return 0
    first, last = summary["first_validation"], summary["last_validation"]
    print(f"trained {summary['steps']} steps{' (stopped early)' if summary['stopped_early'] else ''}; best checkpoint: {summary['best_checkpoint']} (step {summary['best_step']})")
    for name, v in (("start", first), ("end", last)):
        if v:
            print(f"  val @{v['step']:>6} [{name}]: edit_acc {v['edit_acc']:.3f} (pre-edit {v['edit_acc_pre']:.3f})  locality {v['locality']:.3f}  loss {v['loss']:.4f}")
    return 0


def add_train_parser(subparsers: Any) -> None:
    """Register ``train`` on an ``add_subparsers()`` object."""
    train = subparsers.add_parser("train", help="meta-train an editor (MEND / multi-task MEND / InstructEdit)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config value (repeatable)")
    train.add_argument("--output", required=True, help="run folder: checkpoints (best/, last/), metrics.jsonl, summary.json; resumes if it holds a checkpoint")
    train.add_argument("--no-progress", action="store_true", help="no progress bar")
    train.set_defaults(func=cmd_train)
