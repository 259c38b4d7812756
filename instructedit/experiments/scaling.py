"""Task scaling: editors trained on 1, 2, 3 tasks with equal budgets, each tested on the held-out task (ZsRE).

DESIGN.md §6 (published, GPT-2 XL: hold-out ZsRE reliability ≈ 6 → 49 → 81). Every editor trains into
``OUTPUT/<n>-tasks/`` (``experiments.reuse.train_or_reuse``: a finished run is not retrained, an interrupted one
resumes) and an evaluation whose settings match its cached JSON is not rerun (``evaluation.cache``).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructedit.analysis import plots
from instructedit.config import Config, load_config
from instructedit.evaluation.cache import evaluate_editor_dir
from instructedit.evaluation.report import EvalSettings, post_pre
from instructedit.experiments.reuse import train_or_reuse
from instructedit.experiments.study_config import load_study
from instructedit.io import write_json
from instructedit.models.loading import load_model, resolve_device
from instructedit.records import TASKS
from instructedit.runs import CHECKPOINTS
from instructedit.tasks.instructions import instruction_pool
from instructedit.tasks.splits import eval_records

logger = logging.getLogger(__name__)


@dataclass
class ScalingConfig:
    """One YAML: the base training config, the equal budget, and the task sets to train on."""

    base_config: str
    max_steps: int
    eval_limit: int | None = 200
    task_sets: list[list[str]] = field(default_factory=lambda: [["wikirecent"], ["wikirecent", "counterfact"], ["wikirecent", "counterfact", "convsent"]])
    eval_task: str = "zsre"
    eval_split: str = "test"  # ZsRE's test split is the held-out portability file, whole
    instruction: str = "seen"  # description of eval_task wrapping the held-out edits
    checkpoint: str = "best"
    overrides: list[str] = field(default_factory=list)  # SECTION.KEY=VALUE applied to the base config
    batch_size: int = 16

    def __post_init__(self) -> None:
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise ValueError(f"eval_limit must be >= 1 or null, got {self.eval_limit}")
        if not self.task_sets:
            raise ValueError("task_sets needs at least one list of tasks")
        for tasks in self.task_sets:
            if not isinstance(tasks, list) or not tasks or any(t not in TASKS for t in tasks):
                raise ValueError(f"task_sets entry {tasks!r} must be a non-empty list of tasks from {list(TASKS)}")
        sizes = [len(t) for t in self.task_sets]
        if len(set(sizes)) != len(sizes):
            raise ValueError(f"task_sets must have different sizes (one editor per number of tasks), got sizes {sizes}")
        if self.eval_task not in TASKS:
            raise ValueError(f"eval_task {self.eval_task!r} is not one of {list(TASKS)}")
        if self.eval_split not in ("train", "val", "test"):
            raise ValueError(f"eval_split {self.eval_split!r} must be train, val or test")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint {self.checkpoint!r} must be one of {list(CHECKPOINTS)}")


def load_scaling_config(path: str | Path) -> tuple[ScalingConfig, Path]:
    """The scaling study config and the resolved path of its base training config."""
    return load_study(ScalingConfig, path)


# --- the study ---------------------------------------------------------------------------------------


def scaling_run_config(base: Path, cfg: ScalingConfig, tasks: list[str], device: str | None = None) -> Config:
    overrides = list(cfg.overrides) + [f"data.tasks=[{', '.join(tasks)}]", f"training.max_steps={cfg.max_steps}", "data.instructions=true"]
    if device is not None:
        overrides.append(f"training.device={device}")
    return load_config(base, overrides)


def run_scaling(cfg: ScalingConfig, base: Path, output: str | Path, device: str | None = None, progress: bool = True,
                model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train (or resume / skip) one editor per task set, evaluate each on the held-out task, write JSON + PNG."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    configs = [(tasks, scaling_run_config(base, cfg, tasks, device)) for tasks in sorted(cfg.task_sets, key=len)]
    first = configs[0][1]
    if model is None:
        model, tokenizer = load_model(first.model.name, dtype=first.model.dtype, device=resolve_device(first.training.device, "training.device"))
    pool = instruction_pool(first)
    instruction = pool.evaluation_index(cfg.instruction)
    records = eval_records(cfg.eval_task, cfg.eval_split, cfg.eval_limit, first.data.data_dir, first.data.split_seed)
    points = []
    for tasks, config in configs:
        run_dir = output / f"{len(tasks)}-tasks"
        summary, _ = train_or_reuse(config, run_dir, model, tokenizer, progress)
        settings = EvalSettings(task=cfg.eval_task, model_name=config.model.name, limit=cfg.eval_limit, split=cfg.eval_split,
                                split_seed=config.data.split_seed, batch_size=cfg.batch_size)
        report = evaluate_editor_dir(run_dir / f"eval-{cfg.eval_task}.json", run_dir / cfg.checkpoint, model, tokenizer, records,
                                 pool, instruction, settings, cfg.batch_size, progress)
        points.append({"n_tasks": len(tasks), "tasks": list(tasks), "run_dir": str(run_dir), "steps": summary.get("steps"),
                       "best_step": summary.get("best_step"), "stopped_early": summary.get("stopped_early"),
                       "train_counts": summary.get("data", {}).get("train", {}).get("counts"), "cases": len(report.cases),
                       **post_pre(report, cfg.eval_task)})
    figure = plots.scaling_plot(output / "scaling.png", points, cfg.eval_task)
    result = {"study": "task scaling", "config": dataclasses.asdict(cfg), "base_config": str(base), "eval_task": cfg.eval_task,
              "instruction": instruction, "instruction_text": pool.descriptions[cfg.eval_task][instruction],
              "points": points, "figure": figure.name}
    write_json(output / "scaling.json", result)
    return result
