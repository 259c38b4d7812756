"""Training run folders that studies reuse: train into a folder unless a finished run is there, resume an interrupted one."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from instructedit.config import Config, check_resumable
from instructedit.training import Trainer

logger = logging.getLogger(__name__)


def train_resumable(config: Config, run_dir: str | Path, model: Any, tokenizer: Any, progress: bool = True) -> dict[str, Any]:
    """Train into ``run_dir`` unless a finished run is there; resume an interrupted one."""
    run_dir = Path(run_dir)
    check_resumable(config, run_dir)
    summary_path = run_dir / "summary.json"
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        if summary.get("stopped_early") or summary.get("steps", 0) >= config.training.max_steps:
            logger.info("%s: finished run found (%d steps); not retraining", run_dir, summary.get("steps", 0))
            return summary
    logger.info("training into %s (tasks %s, %d steps)", run_dir, config.data.tasks, config.training.max_steps)
    return Trainer(config, run_dir, model=model, tokenizer=tokenizer, show_progress=progress).run()
