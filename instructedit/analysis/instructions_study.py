"""Seen vs unseen instructions: one trained editor evaluated with each description of a task in turn.

DESIGN.md §6, "comparable results": the unseen description's scores are compared with the spread
of the seen ones. Reads a saved editor and evaluates it (cached per description); trains nothing.
The ConvSent balance study, which trains editors, is ``experiments/balance.py``.
"""

from __future__ import annotations

import logging
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from instructedit.analysis import plots
from instructedit.evaluation.cache import evaluate_editor_dir
from instructedit.evaluation.report import EvalSettings, post_pre
from instructedit.io import write_json
from instructedit.records import EditRecord
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

STUDY_METRICS = ("reliability", "generalization", "locality")


def spread(values: Sequence[float]) -> dict[str, float | None]:
    if not values:
        return {"mean": None, "std": None, "min": None, "max": None}
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def seen_unseen_summary(rows: Sequence[Mapping[str, Any]], metrics: Sequence[str] = STUDY_METRICS) -> dict[str, Any]:
    """Per metric: the seen descriptions' mean/std/range and where each unseen one falls relative to it."""
    summary: dict[str, Any] = {}
    for metric in metrics:
        seen = [r["metrics"][metric] for r in rows if r["seen"] and r["metrics"].get(metric) is not None]
        if not seen:
            continue
        stats = spread(seen)
        unseen = []
        for r in rows:
            value = r["metrics"].get(metric)
            if r["seen"] or value is None:
                continue
            z = (value - stats["mean"]) / stats["std"] if stats["std"] else None
            unseen.append({"index": r["index"], "value": value, "minus_seen_mean": value - stats["mean"], "z_score": z,
                           "within_seen_range": stats["min"] <= value <= stats["max"]})
        summary[metric] = {"seen": stats, "unseen": unseen}
    return summary


def description_study(
    model: Any, tokenizer: Any, editor_dir: str | Path, records: Sequence[EditRecord], pool: InstructionPool, task: str,
    output: str | Path, settings: EvalSettings, batch_size: int = 16, progress: bool = True,
) -> dict[str, Any]:
    """Evaluate the editor in ``editor_dir`` with every description of ``task``; reports are cached per description."""
    if task not in pool.descriptions:
        raise ValueError(f"instruction pool {pool.source} has no descriptions for task {task!r}")
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    rows = []
    for index, text in enumerate(pool.descriptions[task]):
        report = evaluate_editor_dir(output / f"description-{index}.json", editor_dir, model, tokenizer, records, pool, index,
                                 settings, batch_size, progress)
        values = post_pre(report, task)
        status = "seen" if index in pool.seen else "unseen" if index in pool.unseen else "other"
        rows.append({"index": index, "seen": status == "seen", "status": status, "text": text, "metrics": values["post"],
                     "pre": values["pre"], "n": values["n"], "cases": len(report.cases)})
    return write_description_outputs(rows, task, output, pool.source, settings, editor_dir)


def write_description_outputs(rows: list[dict[str, Any]], task: str, output: Path, pool_source: str, settings: EvalSettings,
                              editor_dir: str | Path | None = None) -> dict[str, Any]:
    """descriptions-TASK.json (every description's scores + the seen/unseen summary) and descriptions-TASK.png."""
    metrics = [m for m in STUDY_METRICS[:2] if any(r["metrics"].get(m) is not None for r in rows)]
    figure = plots.description_bars(output / f"descriptions-{task}.png", rows, task, metrics or ["reliability"])
    result = {"study": "seen vs unseen instructions", "task": task, "instruction_pool": pool_source,
              "editor": str(editor_dir) if editor_dir is not None else None, "model_name": settings.model_name, "split": settings.split, "limit": settings.limit,
              "descriptions": rows, "summary": seen_unseen_summary(rows), "figure": figure.name}
    write_json(output / f"descriptions-{task}.json", result)
    return result
