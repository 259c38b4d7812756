"""Memory estimate vs measured peak memory of meta-training; writes benchmarks/results/memory.json.

A child process trains a few steps (default: the default model, the default config) and reports its
peak RSS; the estimate (instructedit.memory, device "cpu") is computed for the same config.
``--table`` prints the presets' markdown table of docs/distributed.md instead.

    .venv/bin/python benchmarks/bench_memory.py [--steps 3] [--set model.max_length=160]
    .venv/bin/python benchmarks/bench_memory.py --table
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from instructedit.config import load_config
from instructedit.io import write_json
from instructedit.memory import GIB, estimate_memory, markdown_table

from common import peak_rss_bytes  # benchmarks/common.py

RESULTS = Path(__file__).resolve().parent / "results" / "memory.json"
PRESETS = Path(__file__).resolve().parents[1] / "configs" / "presets"


def _config(steps: int, overrides: list[str], config_file: str | None):
    fixed = [f"training.max_steps={steps}", "training.val_size=2", f"training.val_every={steps}", "training.checkpoint_every=100000"]
    return load_config(config_file, [*fixed, *overrides])


def measure(steps: int, overrides: list[str], config_file: str | None) -> None:
    """Child process: train ``steps`` steps, print peak RSS and the estimate (GiB) as JSON."""
    from instructedit.training import Trainer

    torch.set_num_threads(1)
    config = _config(steps, overrides, config_file)
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(config, out, show_progress=False)
        trainer.run()
        estimate = estimate_memory(config, trainer.model, "cpu")
    peak = peak_rss_bytes()
    print(json.dumps({"peak_rss_gib": peak / GIB, "estimate_gib": estimate.peak / GIB, "estimate": estimate.to_dict()}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=None, help="config file (default: the default config)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--measure", action="store_true", help="train in this process and print JSON (what the parent runs)")
    parser.add_argument("--table", action="store_true", help="print the presets' memory table (markdown)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.table:
        print(markdown_table(sorted(PRESETS.glob("*.yaml"))))
        return
    if args.measure:
        measure(args.steps, args.set, args.config)
        return
    command = [sys.executable, __file__, "--measure", "--steps", str(args.steps)] + (["--config", args.config] if args.config else [])
    for item in args.set:
        command += ["--set", item]
    child = subprocess.run(command, capture_output=True, text=True, check=True)
    result = json.loads(child.stdout.strip().splitlines()[-1])
    report = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "config": args.config or "defaults",
        "overrides": args.set,
        "steps": args.steps,
        "torch": torch.__version__,
        **result,
        "estimate_over_measured": result["estimate_gib"] / result["peak_rss_gib"],
    }
    write_json(args.output, report)
    print(json.dumps({k: report[k] for k in ("peak_rss_gib", "estimate_gib", "estimate_over_measured")}, indent=2))


if __name__ == "__main__":
    main()
