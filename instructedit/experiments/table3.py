"""The paper's main experiment (Table 3) as one resumable command: train the MEND variants, evaluate every method.

``instructedit experiment table3 --config configs/experiments/table3-smollm2.yaml``. Each editor
trains into its own run folder (the Trainer resumes from ``last/``; a finished run is reused) and
each (row, task) evaluation is cached as JSON, so an interrupted experiment picks up where it was.
The result is one Markdown table and one JSON file: a row per method, reliability /
generalization / locality / portability per task, and the average over tasks.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from instructedit.evaluation.metrics import FAMILIES, task_average
from instructedit.evaluation.report import EvalReport
from instructedit.experiments.base import (EditorRun, ExperimentBase, evaluate_cell, interval_summaries, provenance,
                                           train_editors)
from instructedit.io import atomic_write, write_json
from instructedit.models.loading import load_model
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits

logger = logging.getLogger(__name__)


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
class ExperimentConfig(ExperimentBase):
    runs_dir: str = "runs/table3"
    rows: list[Row] = field(default_factory=list)

    NESTED: ClassVar[tuple[tuple[str, type], ...]] = (("editors", EditorRun), ("rows", Row))

    def check(self, where: str) -> None:
        names = {e.name for e in self.editors}
        for row in self.rows:
            wanted = [row.editor] if row.editor else list(row.editor_per_task.values())
            missing = [n for n in wanted if n not in names]
            if missing or (not wanted and not row.method):
                raise ValueError(f"{where}: row {row.label!r} needs an editor from {sorted(names)} or a method (missing: {missing})")


def run_experiment(config: ExperimentConfig, show_progress: bool = True) -> dict[str, Any]:
    """Train, evaluate every row on every task (cached), and write ``<output>.md`` / ``.json``."""
    started = time.time()
    summaries = train_editors(config, show_progress)
    model, tokenizer = load_model(config.model)
    pool = InstructionPool.default()
    records = {t: load_task_splits(t, seed=config.split_seed).test for t in config.tasks}
    results: dict[str, dict[str, EvalReport]] = {}
    for row in config.rows:
        results[row.label] = {}
        for task in row.tasks or config.tasks:
            editor_name = row.editor or row.editor_per_task.get(task)
            if row.editor_per_task and editor_name is None:
                continue  # a single-task editor exists only for its own task
            cell_config = config if row.limit is None else _with_limit(config, task, row.limit)
            results[row.label][task] = evaluate_cell(cell_config, row.label, task, records[task], model, tokenizer, pool, row.instruction,
                                                     editor=editor_name, method=row.method, options=row.options, show_progress=show_progress)
    table = _table(config, results)
    payload = provenance(config, summaries, started) | {
        "rows": {label: {task: _post(r) | {"n": len(r.cases)} for task, r in per_task.items()} for label, per_task in results.items()},
        "pre_edit": {label: {task: _phase(r, "pre") for task, r in per_task.items()} for label, per_task in results.items()},
        "intervals": {label: {task: interval_summaries(r) for task, r in per_task.items()} for label, per_task in results.items()},
    }
    write_json(f"{config.output}.json", payload)
    atomic_write(f"{config.output}.md", lambda tmp: Path(tmp).write_text(table))
    return payload


def _with_limit(config: ExperimentConfig, task: str, limit: int) -> ExperimentConfig:
    """``config`` with a row's own limit for ``task``."""
    return dataclasses.replace(config, limits={**config.limits, task: limit})


def _phase(report: EvalReport, phase: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for phases in report.aggregates.values():
        for key, summary in phases.get(phase, {}).items():
            if key in FAMILIES and summary.mean is not None:
                out[key] = summary.mean
    return out


def _post(report: EvalReport) -> dict[str, float]:
    return _phase(report, "post")


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
