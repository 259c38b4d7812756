"""ConvSent balance in the training mixture: "unbalanced mixing blurs the gradient clusters" (DESIGN.md §6).

Editors trained on the same tasks with ConvSent capped (``data.balance``), uncapped, or oversampled
by repeating its records (``data.oversample``), compared on per-task reliability and on the gradient
separation score. Every editor trains into ``OUTPUT/<variant>/`` (``train_or_reuse``); evaluations
and gradient analyses are cached beside it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from instructedit.analysis import plots
from instructedit.analysis.gradients import GradientSettings, analyze_updates, collect_updates, slug, study_records
from instructedit.config import load_config
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.cache import evaluate_editor_dir
from instructedit.evaluation.report import EvalSettings, post_pre
from instructedit.experiments.reuse import train_or_reuse
from instructedit.experiments.study_config import build_study, load_study
from instructedit.io import write_json
from instructedit.models.loading import load_model, resolve_device
from instructedit.records import EditRecord
from instructedit.runs import CHECKPOINTS, editor_sha256
from instructedit.tasks.instructions import InstructionPool, instruction_pool
from instructedit.tasks.splits import eval_records

logger = logging.getLogger(__name__)


@dataclass
class BalanceVariant:
    """One training mixture: ConvSent capped (``balance``) or not, and its records repeated ``convsent_factor`` times."""

    name: str
    balance: bool = True
    convsent_factor: float = 1.0

    def __post_init__(self) -> None:
        if not self.name or slug(self.name) != self.name:
            raise ValueError(f"variant name {self.name!r} must be a plain folder name (letters, digits, . _ -)")
        if not isinstance(self.balance, bool):
            raise ValueError(f"variant {self.name}: balance must be true or false")
        if not self.convsent_factor > 0:
            raise ValueError(f"variant {self.name}: convsent_factor must be > 0, got {self.convsent_factor}")


@dataclass
class BalanceConfig:
    """One YAML: the base training config, the equal budget, the mixture variants and the measurement sizes."""

    base_config: str
    max_steps: int
    eval_limit: int | None = 100  # test records per task for reliability
    gradient_n: int = 100  # edits per task for the gradient separation score
    variants: list[BalanceVariant] = field(default_factory=lambda: [BalanceVariant("balanced", True), BalanceVariant("unbalanced", False)])
    instruction: str = "seen"
    checkpoint: str = "best"
    overrides: list[str] = field(default_factory=list)
    batch_size: int = 16
    embedding: str = "tsne"
    projection_dim: int = 2048

    def __post_init__(self) -> None:
        self.variants = [v if isinstance(v, BalanceVariant) else build_study(BalanceVariant, v, "variant") for v in self.variants]
        names = [v.name for v in self.variants]
        if not names or len(set(names)) != len(names):
            raise ValueError(f"variants need unique names, got {names}")
        if not isinstance(self.max_steps, int) or self.max_steps < 1:
            raise ValueError(f"max_steps must be a positive integer, got {self.max_steps!r}")
        if self.checkpoint not in CHECKPOINTS:
            raise ValueError(f"checkpoint {self.checkpoint!r} must be one of {list(CHECKPOINTS)}")
        if self.gradient_n < 2:
            raise ValueError("gradient_n must be >= 2")

    def with_factor(self, factor: float) -> "BalanceConfig":
        """Add a variant with ConvSent uncapped and repeated ``factor`` times (``--convsent-factor``)."""
        name = f"convsent-x{factor:g}"
        if name in [v.name for v in self.variants]:
            return self
        return dataclasses.replace(self, variants=[*self.variants, BalanceVariant(name, False, factor)])


def load_balance_config(path: str | Path) -> tuple[BalanceConfig, Path]:
    """The balance study config and the resolved path of its base training config."""
    return load_study(BalanceConfig, path)


def cached_gradients(cache: Path, editor_dir: Path, model: Any, tokenizer: Any, records: Sequence[EditRecord],
                     pool: InstructionPool | None, instruction: int | None, settings: GradientSettings, progress: bool) -> dict[str, Any]:
    """The gradient analysis of one editor, or its cached JSON when editor weights and settings match."""
    key = {"editor_sha256": editor_sha256(editor_dir), "settings": dataclasses.asdict(settings),
           "instruction": instruction, "records": [r.source for r in records]}
    if cache.is_file():
        cached = json.loads(cache.read_text())
        if cached.get("key") == json.loads(json.dumps(key)):
            logger.info("%s: cached gradient analysis matches; not recomputing", cache)
            return cached["analysis"]
    editor = MENDEditor.from_pretrained(editor_dir, device=next(model.parameters()).device)
    updates = collect_updates(editor, model, tokenizer, records, pool, instruction, settings.weight, settings.projection_dim,
                              settings.normalize, settings.seed, progress=progress)
    analysis = analyze_updates(updates, settings)
    analysis.pop("_coords")
    write_json(cache, {"key": key, "analysis": analysis})
    return analysis


def run_balance(cfg: BalanceConfig, base: Path, output: str | Path, device: str | None = None, progress: bool = True,
                model: Any = None, tokenizer: Any = None) -> dict[str, Any]:
    """Train (or resume / skip) one editor per variant; per-task reliability and gradient separation of each."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    extra = [f"training.device={device}"] if device is not None else []
    configs = [(v, load_config(base, [*cfg.overrides, f"data.balance={str(v.balance).lower()}", f"training.max_steps={cfg.max_steps}",
                                      *([f"data.oversample={{convsent: {v.convsent_factor}}}"] if v.convsent_factor != 1.0 else []), *extra]))
               for v in cfg.variants]
    first = configs[0][1]
    if "convsent" not in first.data.tasks:
        raise ValueError(f"the balance study needs convsent in data.tasks of {base}, got {first.data.tasks}")
    if model is None:
        model, tokenizer = load_model(first.model.name, dtype=first.model.dtype, device=resolve_device(first.training.device, "training.device"))
    pool = instruction_pool(first)
    instruction = pool.evaluation_index(cfg.instruction) if pool is not None else None
    tasks = list(first.data.tasks)
    grad_settings = GradientSettings(tasks=tuple(tasks), n=cfg.gradient_n, embedding=cfg.embedding, projection_dim=cfg.projection_dim,
                                     instruction=cfg.instruction, data_dir=first.data.data_dir, split_seed=first.data.split_seed)
    grad_records = study_records(grad_settings)
    variants, panels = [], []
    for variant, config in configs:
        run_dir = output / variant.name
        summary, _ = train_or_reuse(config, run_dir, model, tokenizer, progress)
        editor_dir = run_dir / cfg.checkpoint
        reliability, per_task = {}, {}
        for task in tasks:
            records = eval_records(task, "test", cfg.eval_limit, config.data.data_dir, config.data.split_seed)
            settings = EvalSettings(task=task, model_name=config.model.name, limit=cfg.eval_limit, split="test",
                                    split_seed=config.data.split_seed, batch_size=cfg.batch_size)
            report = evaluate_editor_dir(run_dir / f"eval-{task}.json", editor_dir, model, tokenizer, records, pool, instruction,
                                     settings, cfg.batch_size, progress)
            per_task[task] = post_pre(report, task)
            reliability[task] = per_task[task]["post"]["reliability"]
        analysis = cached_gradients(run_dir / "gradients.json", editor_dir, model, tokenizer, grad_records, pool, instruction,
                                    grad_settings, progress)
        points = analysis["embedding"]["points"]
        coords = np.array([[p["x"], p["y"]] for p in points])
        scores = analysis["scores"]
        panels.append({"coords": coords, "tasks": [p["task"] for p in points], "title": variant.name,
                       "subtitle": f"silhouette {scores['silhouette']:.3f}" if scores["silhouette"] is not None else ""})
        variants.append({"name": variant.name, "balance": variant.balance, "convsent_factor": variant.convsent_factor,
                         "run_dir": str(run_dir), "steps": summary.get("steps"), "best_step": summary.get("best_step"),
                         "train_counts": summary.get("data", {}).get("train", {}).get("counts"),
                         "reliability": reliability, "per_task": per_task, "silhouette": scores["silhouette"],
                         "between_within_ratio": scores["between_within_ratio"], "gradients": analysis})
    axis = "t-SNE" if cfg.embedding == "tsne" else "PC"
    scatter = plots.gradient_comparison(output / "balance-gradients.png", panels, "MEND updates by training mixture, coloured by task", axis)
    figure = plots.balance_plot(output / "balance.png", variants, tasks)
    result = {"study": "ConvSent balance", "config": dataclasses.asdict(cfg), "base_config": str(base), "tasks": tasks,
              "variants": variants, "figures": [figure.name, scatter.name]}
    write_json(output / "balance.json", result)
    return result
