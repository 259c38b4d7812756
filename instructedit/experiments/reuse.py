"""Train or reuse: the one rule the quickstart, the Table 3 experiment and the studies follow for a run folder."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from instructedit.config import Config, check_resumable
from instructedit.runs import finished_summary
from instructedit.training import Trainer

logger = logging.getLogger(__name__)


def train_or_reuse(config: Config, run_dir: str | Path, model: Any = None, tokenizer: Any = None,
                   progress: bool = True) -> tuple[dict[str, Any], Trainer | None]:
    """Train ``config`` into ``run_dir`` unless a finished run is there (an interrupted one resumes).

    Returns the run's summary and the Trainer when it trained now (its model and tokenizer are loaded),
    else None. A folder holding a run of another configuration is refused (``check_resumable``).
    """
    run_dir = Path(run_dir)
    check_resumable(config, run_dir)
    summary = finished_summary(run_dir, config.training.max_steps)
    if summary is not None:
        logger.info("%s: finished run found (%d steps); not retraining", run_dir, summary.get("steps", 0))
        return summary, None
    logger.info("training into %s (tasks %s, %d steps)", run_dir, config.data.tasks, config.training.max_steps)
    trainer = Trainer(config, run_dir, model=model, tokenizer=tokenizer, show_progress=progress)
    return trainer.run(), trainer
