"""What the edit benchmarks share: their model / data / seed / threads / output options.

Imported by the scripts beside it (``python benchmarks/bench_x.py`` puts this folder on ``sys.path``).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from instructedit.config import DEFAULT_MODEL


def add_common_arguments(parser: argparse.ArgumentParser, results: Path, threads: int = 2) -> None:
    """``--model``, ``--data-dir``, ``--seed``, ``--threads`` and ``--output`` (default ``results``)."""
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--data-dir", default=None, help="data folder (default: $INSTRUCTEDIT_DATA or the project's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=threads)
    parser.add_argument("--output", type=Path, default=results)
