"""The paper's main experiment (Table 3) as one resumable command: train the MEND variants, evaluate every method.

``instructedit experiment table3 --config configs/experiments/table3-smollm2.yaml``. Each editor
trains into its own run folder (the Trainer resumes from ``last/``; a finished run is reused) and
each (row, task) evaluation is cached as JSON, so an interrupted experiment picks up where it was.
The result is one Markdown table and one JSON file: a row per method, reliability /
generalization / locality / portability per task, and the average over tasks.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from instructedit.config import load_config, read_yaml_mapping
from instructedit.api import query_setup
from instructedit.editors.registry import load_trained_editor, make_editor
from instructedit.evaluation.metrics import FAMILIES, task_average
from instructedit.evaluation.cache import evaluate_cached
from instructedit.evaluation.report import EvalReport, EvalSettings
from instructedit.experiments.reuse import train_or_reuse
from instructedit.io import atomic_write, file_sha256, write_json
from instructedit.models.loading import load_model
from instructedit.runs import BEST, EDITOR_WEIGHTS
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits

logger = logging.getLogger(__name__)


@dataclass
class EditorRun:
    """A MEND editor to train: a training config, overrides, and where it trains."""

    name: str
    config: str
    overrides: list[str] = field(default_factory=list)
    run_dir: str | None = None  # default: <runs_dir>/<name>
    max_steps: int | None = None  # default: the experiment's budget


@dataclass
class Row:
    """One table row: a trained editor (by name) or a registry baseline, with its instruction setting."""

    label: str
    editor: str | None = None  # name of an EditorRun
    method: str | None = None  # registry method (ft, grace, calinet)
    options: dict[str, Any] = field(default_factory=dict)
    instruction: str = "none"  # "seen", "unseen", an index, or "none"
    tasks: list[str] | None = None  # default: every task of the experiment
    editor_per_task: dict[str, str] = field(default_factory=dict)  # task -> EditorRun name (single-task MEND)
    limit: int | None = None  # default: the experiment's limit


@dataclass
class ExperimentConfig:
    output: str  # results/table3-smollm2 -> .md and .json
    runs_dir: str = "runs/table3"
    model: str = "smollm2-135m-instruct"
    budget_steps: int = 1000
    tasks: list[str] = field(default_factory=lambda: ["counterfact", "wikirecent", "convsent", "zsre"])
    limit: int | None = 30  # test cases per task; None: the whole test split
    limits: dict[str, int | None] = field(default_factory=dict)  # per-task limits (e.g. {zsre: 300}); override ``limit``
    protocol: str = "both"  # teacher_forced | generation | both (DESIGN.md §5)
    split_seed: int = 0
    batch_size: int = 16
    editors: list[EditorRun] = field(default_factory=list)
    rows: list[Row] = field(default_factory=list)

    @classmethod
    def from_yaml(cls, path: str | Path) -> "ExperimentConfig":
        data = read_yaml_mapping(path, "experiment config")
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; valid keys: {sorted(known)}")
        try:
            editors = [EditorRun(**e) for e in data.pop("editors", [])]
            rows = [Row(**r) for r in data.pop("rows", [])]
        except TypeError as e:
            raise ValueError(f"{path}: bad editor or row entry: {e}") from None
        config = cls(**data, editors=editors, rows=rows)
        if config.protocol not in ("teacher_forced", "generation", "both"):
            raise ValueError(f"{path}: protocol {config.protocol!r} is not teacher_forced, generation or both")
        names = {e.name for e in editors}
        for row in rows:
            wanted = [row.editor] if row.editor else list(row.editor_per_task.values())
            missing = [n for n in wanted if n not in names]
            if missing or (not wanted and not row.method):
                raise ValueError(f"{path}: row {row.label!r} needs an editor from {sorted(names)} or a method (missing: {missing})")
        return config


def train_editors(config: ExperimentConfig, show_progress: bool = True) -> dict[str, dict[str, Any]]:
    """Train (or resume, or reuse) every editor; returns name -> run summary."""
    summaries = {}
    for run in config.editors:
        steps = run.max_steps or config.budget_steps
        run_dir = Path(run.run_dir or Path(config.runs_dir) / run.name)
        train_config = load_config(run.config, [*run.overrides, f"training.max_steps={steps}"])
        logger.info("editor %s: %d steps in %s", run.name, steps, run_dir)
        summaries[run.name], _ = train_or_reuse(train_config, run_dir, progress=show_progress)
    return summaries


def _instruction(value: str, pool: InstructionPool) -> int | None:
    return None if value == "none" else pool.evaluation_index(value)


def run_experiment(config: ExperimentConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train, evaluate every row on every task (cached), and write ``<output>.md`` / ``.json``."""
    started = time.time()
    summaries = train_editors(config, show_progress)
    model, tokenizer = load_model(config.model)
    pool = InstructionPool.default()
    records = {t: load_task_splits(t, seed=config.split_seed).test for t in config.tasks}
    cache = Path(config.runs_dir) / "evals"
    results: dict[str, dict[str, EvalReport]] = {}
    for row in config.rows:
        results[row.label] = {}
        for task in row.tasks or config.tasks:
            editor_name = row.editor or row.editor_per_task.get(task)
            if row.editor_per_task and editor_name is None:
                continue  # a single-task editor exists only for its own task
            path = cache / f"{_slug(row.label)}-{task}.json"
            limit = row.limit or config.limits.get(task, config.limit)
            if editor_name:
                run_dir = Path(next(e.run_dir or Path(config.runs_dir) / e.name for e in config.editors if e.name == editor_name))
                settings = EvalSettings(method=row.label, editor_path=str(run_dir / BEST), editor_sha256=file_sha256(run_dir / BEST / EDITOR_WEIGHTS))
            else:
                settings = EvalSettings(method=row.label, method_options=row.options)
            settings.task, settings.split, settings.split_seed, settings.limit = task, "test", config.split_seed, limit
            settings.model_name = config.model  # the name asked for, as `evaluate` records it (not the loaded folder's path)
            settings.protocol = config.protocol
            # asked as the editor was trained: its template and answer stop
            queries = query_setup(run_dir / BEST) if editor_name else {"template": None, "answer_stop": "none"}
            row_pool = dataclasses.replace(pool, template=queries["template"]) if queries["template"] else pool

            def load() -> Any:  # called at once by evaluate_cached, only when the cache is stale
                if editor_name:
                    return load_trained_editor(run_dir / BEST)  # MEND or KE, as the folder says
                return make_editor(row.method, model, tokenizer, row.options)

            results[row.label][task] = evaluate_cached(
                path, model, tokenizer, load, records[task][:limit], row_pool, _instruction(row.instruction, pool), settings,
                batch_size=config.batch_size, progress=show_progress, protocol=config.protocol, answer_stop=queries["answer_stop"])
    table = _table(config, results)
    payload = {
        "experiment": dataclasses.asdict(config),
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__,
        "elapsed_s": time.time() - started,
        "budgets": {name: {"steps": s["steps"], "best_step": s["best_step"], "stopped_early": s["stopped_early"]} for name, s in summaries.items()},
        "training_data": {name: s.get("data") for name, s in summaries.items()},
        "rows": {label: {task: _post(r) | {"n": len(r.cases)} for task, r in per_task.items()} for label, per_task in results.items()},
        "pre_edit": {label: {task: _phase(r, "pre") for task, r in per_task.items()} for label, per_task in results.items()},
        "intervals": {label: {task: _summaries(r) for task, r in per_task.items()} for label, per_task in results.items()},
    }
    write_json(f"{config.output}.json", payload)
    atomic_write(f"{config.output}.md", lambda tmp: Path(tmp).write_text(table))
    return payload


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")


def _phase(report: EvalReport, phase: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for phases in report.aggregates.values():
        for key, summary in phases.get(phase, {}).items():
            if key in FAMILIES and summary.mean is not None:
                out[key] = summary.mean
    return out


def _post(report: EvalReport) -> dict[str, float]:
    return _phase(report, "post")


def _summaries(report: EvalReport) -> dict[str, dict[str, dict[str, Any]]]:
    """phase -> metric -> {mean, ci_low, ci_high, n, protocol}, for every phase the report has."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    for phases in report.aggregates.values():
        for phase, metrics in phases.items():
            out.setdefault(phase, {}).update({k: s.to_dict() for k, s in metrics.items()})
    return out


GEN_COLUMNS = (("gen_reliability", "Rel"), ("gen_reliability_plain", "Rel plain"), ("gen_reliability_chat", "Rel chat"),
               ("gen_generalization", "Gen"), ("gen_locality", "Loc"), ("gen_portability", "Port"), ("gen_fluency", "Fluency (×100)"))


def _ci(summary: Any) -> str:
    if summary is None:
        return "–"
    interval = f" [{100 * summary.low:.1f}, {100 * summary.high:.1f}]" if summary.low is not None else ""
    return f"{100 * summary.mean:.1f}{interval}"


def _generation_table(config: ExperimentConfig, results: dict[str, dict[str, EvalReport]]) -> list[str]:
    """Per task: one row per method, the generation protocol's post-edit exact match (%) with 95 % intervals."""
    lines = []
    for task in config.tasks:
        reports = {label: per_task[task] for label, per_task in results.items() if task in per_task}
        post = {label: next(iter(r.aggregates.values())).get("gen_post", {}) for label, r in reports.items()}
        columns = [(k, name) for k, name in GEN_COLUMNS if any(k in p for p in post.values())]
        if not columns:
            continue
        lines += [f"### {task} (n = {', '.join(sorted({str(len(r.cases)) for r in reports.values()}))})", "",
                  "| method | " + " | ".join(name for _, name in columns) + " |", "|---|" + "---|" * len(columns)]
        lines += ["| " + label + " | " + " | ".join(_ci(p.get(k)) for k, _ in columns) + " |" for label, p in post.items()]
        lines.append("")
    return lines


def _table(config: ExperimentConfig, results: dict[str, dict[str, EvalReport]]) -> str:
    short = {"reliability": "Rel", "generalization": "Gen", "locality": "Loc", "portability": "Port"}
    header = ["method"] + [f"{t} {short[f]}" for t in config.tasks for f in FAMILIES] + [f"avg {short[f]}" for f in FAMILIES]
    lines = [f"# Table 3 on {config.model}", "", "## Teacher-forced protocol (the paper's)", "",
             "Post-edit metrics in % (teacher-forced token accuracy; locality = share of answer tokens "
             "whose argmax is unchanged). Averages are over the tasks a row was evaluated on.", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label, per_task in results.items():
        cells = [label]
        merged = {}
        for task in config.tasks:
            report = per_task.get(task)
            metrics = _post(report) if report else {}
            cells += [f"{100 * metrics[f]:.1f}" if f in metrics else "–" for f in FAMILIES]
            if report:
                merged[task] = {k: v for k, v in next(iter(report.aggregates.values())).get("post", {}).items()}
        cells += [f"{100 * v:.1f}" if (v := task_average(merged, f)) is not None else "–" for f in FAMILIES]
        lines.append("| " + " | ".join(cells) + " |")
    limits = {t: config.limits.get(t, config.limit) for t in config.tasks}
    sizes = ", ".join(f"{t} {v or 'all'}" for t, v in limits.items())
    lines += ["", f"Cases per task: {sizes} (test splits with seed {config.split_seed}; "
              f"ZsRE is the held-out file). Editors trained for up to {config.budget_steps} optimizer steps each "
              "(see the JSON for each run's steps, best step and data; 95 % bootstrap intervals are in the JSON)."]
    if config.protocol != "teacher_forced":
        lines += ["", "## Generation protocol (what the edited model says)", "",
                  "Greedy decoding, stop at EOS or a newline, first line compared with the target after normalization: exact match (%) "
                  "with 95 % bootstrap intervals. Rel = the instruction-wrapped edit prompt (as edited), Rel plain = the prompt without "
                  "instruction, Rel chat = the question as the user turn of the chat template, Gen = rephrases, Loc = locality prompts "
                  "whose answer the edit left unchanged, Port = portability questions. ConvSent has no single answer: its response to the "
                  "wrapped question (up to 48 tokens) is scored for Fluency, the weighted bi-/tri-gram entropy ×100 (ROME, EasyEdit), "
                  "pre-edit and post-edit in the JSON.", ""]
        lines += _generation_table(config, results)
    return "\n".join(lines) + "\n"
