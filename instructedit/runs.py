"""The run folder's layout, named once, and the one rule that says a training run is finished.

A training run folder (``instructedit train --output RUN``)::

    RUN/config.yaml        the effective training config (check_resumable compares a resume with it)
    RUN/data.json          what was trained on: records per task and split
    RUN/metrics.jsonl      one JSON line per logged step and validation
    RUN/summary.json       written when training ends: steps, best step, stopped early, ...
    RUN/best/  RUN/last/   saved editors (``editor_config.json`` + ``editor.safetensors``); last/ also the trainer state

A saved least-squares editor may also hold ``preservation.safetensors`` (the key covariance its solves keep still) and
``preservation_texts.json`` (the texts it was made of).

A leaf module: everything that reads or writes these names imports them from here.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

CONFIG = "config.yaml"
DATA = "data.json"
METRICS = "metrics.jsonl"
SUMMARY = "summary.json"
BEST = "best"
LAST = "last"
CHECKPOINTS = (BEST, LAST)
EDITOR_CONFIG = "editor_config.json"  # written by MENDEditor.save_pretrained
EDITOR_WEIGHTS = "editor.safetensors"
PRESERVATION_WEIGHTS = "preservation.safetensors"  # a least-squares editor's preservation sample (MENDEditor.set_preservation)
PRESERVATION_TEXTS = "preservation_texts.json"  # the (prompt, answer) texts of that sample (calibrate writes it beside it)
SUBJECTS_FILE = "subjects.json"  # the entity pool an editor swaps into its edits' questions (editors/neighbours.py; calibrate writes it)


def editor_sha256(directory: str | Path) -> str:
    """A saved editor's fingerprint: the SHA-256 of its ``editor.safetensors``, and, when it carries a preservation
    sample, the SHA-256 of both files' digests (so a cached evaluation of the editor without it is not reused)."""
    from instructedit.io import file_sha256

    weights = file_sha256(Path(directory) / EDITOR_WEIGHTS)
    preservation = Path(directory) / PRESERVATION_WEIGHTS
    if not preservation.is_file():
        return weights
    return hashlib.sha256(f"{weights}+{file_sha256(preservation)}".encode()).hexdigest()


def finished_summary(run_dir: str | Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of a finished run in ``run_dir`` (stopped early, or at least ``max_steps`` steps), else None."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("stopped_early") or summary.get("steps", 0) >= max_steps:
        return summary
    return None
