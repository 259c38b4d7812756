"""The run folder's layout, named once, and the one rule that says a training run is finished.

A training run folder (``instructedit train --output RUN``)::

    RUN/config.yaml        the effective training config (check_resumable compares a resume with it)
    RUN/data.json          what was trained on: records per task and split
    RUN/metrics.jsonl      one JSON line per logged step and validation
    RUN/summary.json       written when training ends: steps, best step, stopped early, ...
    RUN/best/  RUN/last/   saved editors (``editor_config.json`` + ``editor.safetensors``); last/ also the trainer state

A saved least-squares editor may also hold ``preservation.safetensors`` (the key covariance its solves keep still).

A leaf module: everything that reads or writes these names imports them from here.
"""

from __future__ import annotations

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


def finished_summary(run_dir: str | Path, max_steps: int) -> dict[str, Any] | None:
    """The summary of a finished run in ``run_dir`` (stopped early, or at least ``max_steps`` steps), else None."""
    path = Path(run_dir) / SUMMARY
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    if summary.get("stopped_early") or summary.get("steps", 0) >= max_steps:
        return summary
    return None
