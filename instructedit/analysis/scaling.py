"""Task scaling: editors trained on 1, 2, 3 tasks with equal budgets, each tested on the held-out task (ZsRE).

DESIGN.md §6 (published, GPT-2 XL: hold-out ZsRE reliability ≈ 6 → 49 → 81). Every editor trains into
``OUTPUT/<n>-tasks/`` (``runs.train_resumable``: a finished run is not retrained, an interrupted one
resumes) and an evaluation whose settings match its cached JSON is not rerun. Also home of the
cached evaluate helpers the balance study shares.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar


from instructedit.analysis import plots
from instructedit.config import Config, load_config, read_yaml_mapping
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.report import EvalReport, EvalSettings, load_report_json, write_report_json
from instructedit.evaluation.runner import evaluate
from instructedit.io import file_sha256, write_json
from instructedit.models.loading import load_model, resolve_device
from instructedit.records import TASKS, EditRecord
from instructedit.tasks.instructions import instruction_pool
from instructedit.tasks.splits import load_task_splits
from instructedit.runs import train_resumable

logger = logging.getLogger(__name__)
StudyT = TypeVar("StudyT")

CHECKPOINTS = ("best", "last")
METRICS = ("reliability", "generalization", "locality", "portability")


# --- the study's YAML -------------------------------------------------------------------------------


def read_study_yaml(path: str | Path) -> tuple[dict[str, Any], Path]:
    return read_yaml_mapping(path, "study config"), Path(path).parent


def resolve_base_config(value: str, yaml_dir: Path | None) -> Path:
    """A relative ``base_config`` is looked up from the working directory, then beside the study YAML."""
    path = Path(value).expanduser()
    if path.is_absolute() or path.is_file() or yaml_dir is None:
        return path
    beside = yaml_dir / path
    return beside if beside.is_file() else path


def build_study(cls: type, values: dict[str, Any], where: str) -> Any:
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}: {e}") from None


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


def load_study(cls: type[StudyT], path: str | Path) -> tuple[StudyT, Path]:
    """A study config of type ``cls`` read from ``path``, and the resolved path of its base training config."""
    values, yaml_dir = read_study_yaml(path)
    cfg = build_study(cls, values, f"study config {path}")
    base = resolve_base_config(cfg.base_config, yaml_dir)
    if not base.is_file():
        raise FileNotFoundError(f"study config {path}: base_config {cfg.base_config} does not exist (relative paths: from the working directory or beside the study YAML)")
    return cfg, base


def load_scaling_config(path: str | Path) -> tuple[ScalingConfig, Path]:
    """The scaling study config and the resolved path of its base training config."""
    return load_study(ScalingConfig, path)


# --- cached evaluation ------------------------------------------------------------------------------


def _same_evaluation(cached: EvalSettings, wanted: EvalSettings) -> bool:
    keys = ("task", "editor_sha256", "model_name", "limit", "split", "split_seed", "instruction", "instruction_source")
    return all(getattr(cached, k) == getattr(wanted, k) for k in keys)


def evaluate_cached(cache: str | Path, editor_dir: str | Path, model: Any, tokenizer: Any, records: Sequence[EditRecord],
                    pool: Any, instruction: int | None, settings: EvalSettings, batch_size: int = 16, progress: bool = True) -> EvalReport:
    """``evaluate`` the editor saved in ``editor_dir``, or read the report cached at ``cache`` if it matches."""
    cache, editor_dir = Path(cache), Path(editor_dir)
    weights = editor_dir / "editor.safetensors"
    if not weights.is_file():
        raise FileNotFoundError(f"{editor_dir} holds no trained editor (editor.safetensors is missing)")
    wanted = dataclasses.replace(settings, method="mend", editor_path=str(editor_dir), editor_sha256=file_sha256(weights),
                                 instruction=instruction, instruction_source=pool.source if pool is not None and instruction is not None else None)
    if cache.is_file():
        report = load_report_json(cache)
        if _same_evaluation(report.settings, wanted):
            logger.info("%s: cached evaluation matches; not rerunning", cache)
            return report
        logger.info("%s: cached evaluation is for other settings; rerunning", cache)
    editor = MENDEditor.from_pretrained(editor_dir, device=next(model.parameters()).device).eval()
    report = evaluate(model, tokenizer, editor, records, pool, instruction, batch_size=batch_size, progress=progress, settings=wanted)
    write_report_json(report, cache)
    return report


def post_pre(report: EvalReport, task: str) -> dict[str, dict[str, float | None]]:
    """{"post": {metric: mean}, "pre": {...}, "n": {...}} of one task of a report."""
    phases = report.aggregates.get(task, {})
    out: dict[str, dict[str, Any]] = {}
    for phase in ("post", "pre"):
        values = phases.get(phase, {})
        out[phase] = {m: values[m].mean if m in values else None for m in METRICS}
    out["n"] = {m: phases.get("post", {})[m].n for m in METRICS if m in phases.get("post", {})}
    return out


def eval_records(task: str, split: str, limit: int | None, data_dir: str | None, seed: int) -> list[EditRecord]:
    records = load_task_splits(task, data_dir, seed=seed).split(split)
    return records[:limit] if limit is not None else records


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
        summary = train_resumable(config, run_dir, model, tokenizer, progress)
        settings = EvalSettings(task=cfg.eval_task, model_name=config.model.name, limit=cfg.eval_limit, split=cfg.eval_split,
                                split_seed=config.data.split_seed, batch_size=cfg.batch_size)
        report = evaluate_cached(run_dir / f"eval-{cfg.eval_task}.json", run_dir / cfg.checkpoint, model, tokenizer, records,
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
