"""What every experiment YAML shares: the editors it trains, its evaluation settings, and the steps built on them.

An experiment (Table 3, Table 1's transfer matrix) names MEND-family editors to train (``EditorRun``), the
tasks and test cases to score them on, and the protocol. The shared steps: read and check the YAML, train
each editor or reuse its finished run (``experiments.reuse``), evaluate one trained editor on one task
through the evaluation cache (``evaluation.cache``), and the provenance every result JSON carries.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch

from instructedit.api import query_setup, untrained_queries
from instructedit.config import Config, load_config, read_yaml_mapping
from instructedit.editors.registry import load_trained_editor, make_editor
from instructedit.evaluation.cache import evaluate_cached
from instructedit.evaluation.metrics import PROTOCOL_CHOICES
from instructedit.evaluation.report import EvalReport, EvalSettings
from instructedit.experiments.reuse import train_or_reuse
from instructedit.experiments.study_config import build_study
from instructedit.records import EditRecord
from instructedit.runs import BEST, EDITOR_CONFIG, editor_sha256
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

ExperimentT = TypeVar("ExperimentT", bound="ExperimentBase")
EVALS_DIR = "evals"  # <runs_dir>/evals/: one cached report JSON per (row or editor, task)


@dataclass
class EditorRun:
    """A MEND editor to train: a training config, overrides, and where it trains."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None  # default: <runs_dir>/<name>
    max_steps: int | None = None  # default: the experiment's budget
    checkpoint: str = BEST  # the editor folder inside the run that is evaluated (e.g. "calibrated": `instructedit calibrate --output RUN/calibrated`)


@dataclass
class ExperimentBase:
    """The fields of every experiment YAML; subclasses add their own (Table 3's rows, ...) and ``check``."""

    output: str  # results/NAME -> NAME.md, NAME.json (and figures)
    runs_dir: str = "runs/experiment"
    model: str = "smollm2-135m-instruct"
    budget_steps: int = 1000
    tasks: list[str] = field(default_factory=lambda: ["counterfact", "wikirecent", "convsent", "zsre"])
    limit: int | None = 30  # test cases per task; None: the whole test split
    limits: dict[str, int | None] = field(default_factory=dict)  # per-task limits (e.g. {zsre: 300}); override ``limit``
    protocol: str = "both"  # teacher_forced | generation | both (DESIGN.md §5)
    split_seed: int = 0
    batch_size: int = 16
    editors: list[EditorRun] = field(default_factory=list)

    NESTED: ClassVar[tuple[tuple[str, type], ...]] = (("editors", EditorRun),)  # list fields read as dataclasses

    @classmethod
    def from_yaml(cls: type[ExperimentT], path: str | Path) -> ExperimentT:
        data = read_yaml_mapping(path, "experiment config")
        try:
            for key, item in cls.NESTED:
                data[key] = [item(**entry) for entry in data.get(key) or []]
        except TypeError as e:
            raise ValueError(f"{path}: bad {key} entry: {e}") from None
        config = build_study(cls, data, str(path))
        if config.protocol not in PROTOCOL_CHOICES:
            raise ValueError(f"{path}: protocol {config.protocol!r} is not teacher_forced, generation or both")
        config.check(str(path))
        return config

    def check(self, where: str) -> None:
        """Cross-field checks of a subclass, raising ValueError prefixed with ``where``."""

    def run_dir(self, name: str) -> Path:
        run = self.editor(name)
        return Path(run.run_dir or Path(self.runs_dir) / run.name)

    def editor(self, name: str) -> EditorRun:
        for run in self.editors:
            if run.name == name:
                return run
        raise ValueError(f"no editor named {name!r}; editors: {[e.name for e in self.editors]}")

    def limit_of(self, task: str) -> int | None:
        return self.limits.get(task, self.limit)

    def training_config(self, run: EditorRun) -> Config:
        """The editor's training config with the experiment's budget (or its own ``max_steps``)."""
        return load_config(run.config, [*run.overrides, f"training.max_steps={run.max_steps or self.budget_steps}"])

    def cache_path(self, label: str, task: str) -> Path:
        return Path(self.runs_dir) / EVALS_DIR / f"{slug(label)}-{task}.json"


def slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def train_editors(config: ExperimentBase, show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or resume, or reuse) every editor; returns name -> run summary."""
    summaries = {}
    for run in config.editors:
        train_config = config.training_config(run)
        run_dir = config.run_dir(run.name)
        logger.info("editor %s: %d steps in %s", run.name, train_config.training.max_steps, run_dir)
        summaries[run.name], _ = train_or_reuse(train_config, run_dir, progress=show_progress)
    return summaries


def instruction_index(value: str, pool: InstructionPool) -> int | None:
    """An experiment's ``instruction`` ("seen", "unseen", an index, or "none") as a description index."""
    return None if value == "none" else pool.evaluation_index(value)


def evaluate_cell(config: ExperimentBase, label: str, task: str, records: list[EditRecord], model: Any, tokenizer: Any,
                  pool: InstructionPool, instruction: str = "none", editor: str | None = None, method: str | None = None,
                  options: dict[str, Any] | None = None, show_progress: bool = True) -> EvalReport:
    """One (row, task) cell: the trained ``editor`` (by name) or the registry ``method``, scored on the first
    ``config.limit_of(task)`` of ``records``; read from ``config.cache_path(label, task)`` when it already answers this."""
    limit = config.limit_of(task)
    if editor is not None:
        editor_dir = config.run_dir(editor) / config.editor(editor).checkpoint
        if not (editor_dir / EDITOR_CONFIG).is_file():
            raise FileNotFoundError(f"editor {editor!r}: {editor_dir} holds no saved editor ({EDITOR_CONFIG} is missing)")
        settings = EvalSettings(method=label, editor_path=str(editor_dir), editor_sha256=editor_sha256(editor_dir))
        queries = query_setup(editor_dir)  # asked and made as the editor was trained: its template, answer stop, edit forms and rounds
    else:
        settings = EvalSettings(method=label, method_options=options or {})
        queries = untrained_queries()
    settings.task, settings.split, settings.split_seed, settings.limit = task, "test", config.split_seed, limit
    settings.model_name = config.model  # the name asked for, as `evaluate` records it (not the loaded folder's path)
    settings.protocol = config.protocol
    cell_pool = dataclasses.replace(pool, template=queries["template"]) if queries["template"] else pool

    def load() -> Any:  # called at once by evaluate_cached, only when the cache is stale
        if editor is not None:
            return load_trained_editor(editor_dir)  # MEND or KE, as the folder says
        return make_editor(method, model, tokenizer, options or {})

    return evaluate_cached(config.cache_path(label, task), model, tokenizer, load, records[:limit], cell_pool,
                           instruction_index(instruction, pool), settings, batch_size=config.batch_size, progress=show_progress,
                           protocol=config.protocol, answer_stop=queries["answer_stop"], edit_forms=queries["edit_forms"],
                           edit_rounds=queries["edit_rounds"])


def interval_summaries(report: EvalReport) -> dict[str, dict[str, dict[str, Any]]]:
    """phase -> metric -> {mean, ci_low, ci_high, n, protocol}, for every phase the report has."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for phases in report.aggregates.values():
        for phase, metrics in phases.items():
            out.setdefault(phase, {}).update({k: s.to_dict() for k, s in metrics.items()})
    return out


def provenance(config: ExperimentBase, summaries: dict[str, dict[str, Any]], started: float) -> dict[str, Any]:
    """What every experiment JSON starts with: its config, when and with what it ran, and each editor's budget and data."""
    return {
        "experiment": dataclasses.asdict(config),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "elapsed_s": time.time() - started,
        "budgets": {name: {"steps": s["steps"], "best_step": s["best_step"], "stopped_early": s["stopped_early"]} for name, s in summaries.items()},
        "training_data": {name: s.get("data") for name, s in summaries.items()},
    }
