"""The paper's Table 1 (cross-task transfer): single-task editors, each scored on every task, and what it loses off its task.

``instructedit experiment transfer --config configs/experiments/table1-transfer-smollm2.yaml``. One editor per
task trains on that task alone (its training config's ``data.tasks``; ZsRE, held out from InstructEdit, needs
``data.allow_held_out=true``), through the train-or-reuse rule and the evaluation cache Table 3 uses
(``experiments.base``), and is scored on the test split of every task. Per protocol and metric the matrix
holds each (trained on, evaluated on) cell's post-edit value with its n and 95 % bootstrap interval and,
off the diagonal, its drop: the value minus the in-task value of the evaluated task's column (the editor
trained on that task), as the paper reports, with a paired bootstrap interval over the cases both were
scored on. Writes ``<output>.json``, ``<output>.md`` and ``<output>.png``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructedit.analysis import plots
from instructedit.evaluation.metrics import summarize
from instructedit.evaluation.report import EvalReport
from instructedit.experiments.base import ExperimentBase, evaluate_cell, provenance, train_editors
from instructedit.io import atomic_write, write_json
from instructedit.models.loading import load_model
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits

logger = logging.getLogger(__name__)

SHOWN = ("reliability", "generalization", "portability")  # the paper's Table 1 columns (Markdown, figure)
METRICS = (*SHOWN, "locality")  # the JSON adds locality: did the editor leave unrelated answers alone?
NAMES = {"reliability": "Reliability", "generalization": "Generalization", "portability": "Portability", "locality": "Locality"}
# protocol -> (post-edit phase, pre-edit phase, metric-name prefix) of an EvalReport
PHASES = {"teacher_forced": ("post", "pre", ""), "generation": ("gen_post", "gen_pre", "gen_")}
TITLES = {"teacher_forced": "Teacher-forced protocol (the paper's)", "generation": "Generation protocol (what the edited model says)"}

PAPER_MODEL = "GPT2-XL"
# InstructEdit paper, Table 1 (teacher-forced, %; Rel / Gen / Port): trained on -> evaluated on -> values.
# The diagonal is the in-task value; the other cells are drops from the diagonal of their column.
PAPER_TABLE1: dict[str, dict[str, tuple[float, float, float]]] = {
    "counterfact": {"counterfact": (84.62, 46.01, 42.46), "zsre": (-56.31, -64.90, -1.35)},
    "wikirecent": {"counterfact": (-25.50, -21.34, -7.33), "zsre": (-86.40, -91.33, -0.60)},
    "zsre": {"counterfact": (-25.26, -18.36, -4.79), "zsre": (96.62, 94.60, 48.85)},
}


@dataclass
class TransferConfig(ExperimentBase):
    """Single-task editors (``editors``, one per trained task) and the tasks each is scored on (``tasks``)."""

    runs_dir: str = "runs/table1"
    budget_steps: int = 300
    tasks: list[str] = field(default_factory=lambda: ["counterfact", "wikirecent", "zsre"])
    limit: int | None = 100

    def check(self, where: str) -> None:
        names = [e.name for e in self.editors]
        if not names:
            raise ValueError(f"{where}: editors is empty; list one single-task editor per task (data.tasks=[TASK] in its overrides)")
        if len(set(names)) != len(names):
            raise ValueError(f"{where}: editor names must be unique, got {names}")

    def trained_on(self) -> dict[str, str]:
        """Trained task -> editor name, in the order of ``tasks``; each editor must train on one task that is evaluated."""
        out: dict[str, str] = {}
        for run in self.editors:
            data = self.training_config(run).data
            if len(data.tasks) != 1:
                raise ValueError(f"editor {run.name!r} trains on {data.tasks}: the transfer matrix needs single-task editors "
                                 "(override data.tasks=[TASK])")
            task = data.tasks[0]
            if task in out:
                raise ValueError(f"editors {out[task]!r} and {run.name!r} both train on {task!r}: one editor per task")
            if task not in self.tasks:
                raise ValueError(f"editor {run.name!r} trains on {task!r}, which is not evaluated: add it to tasks {self.tasks}")
            if data.split_seed != self.split_seed:
                raise ValueError(f"editor {run.name!r} splits its data with seed {data.split_seed}, the experiment with split_seed "
                                 f"{self.split_seed}: its training records could be test cases; make them equal")
            out[task] = run.name
        return {task: out[task] for task in self.tasks if task in out}

    def protocols(self) -> list[str]:
        return list(PHASES) if self.protocol == "both" else [self.protocol]


def run_transfer(config: TransferConfig, show_progress: bool = True, command: str | None = None) -> dict[str, Any]:
    """Train (or reuse) every editor, score each on every task (cached), write ``<output>.json`` / ``.md`` / ``.png``."""
    started = time.time()
    trained = config.trained_on()  # checked before anything trains
    summaries = train_editors(config, show_progress)
    model, tokenizer = load_model(config.model)
    pool = InstructionPool.default()
    records = {task: load_task_splits(task, seed=config.split_seed).test for task in config.tasks}
    reports: dict[str, dict[str, EvalReport]] = {}
    for train_task, name in trained.items():
        instruction = "seen" if config.training_config(config.editor(name)).data.instructions else "none"
        reports[train_task] = {task: evaluate_cell(config, name, task, records[task], model, tokenizer, pool, instruction,
                                                   editor=name, show_progress=show_progress) for task in config.tasks}
    protocols = config.protocols()
    payload = provenance(config, summaries, started) | {
        "command": command,
        "trained_on": list(trained),
        "evaluated_on": list(config.tasks),
        "editors": {task: {"name": name, "run_dir": str(config.run_dir(name)), "steps": summaries[name]["steps"],
                           "best_step": summaries[name]["best_step"], "stopped_early": summaries[name]["stopped_early"],
                           "train_counts": ((summaries[name].get("data") or {}).get("train") or {}).get("counts")}
                    for task, name in trained.items()},
        "cases": {task: len(records[task][: config.limit_of(task)]) for task in config.tasks},
        "matrix": transfer_matrix(reports, protocols),
        "pre_edit": pre_edit(reports, protocols),
        "paper": {"model": PAPER_MODEL, "protocol": "teacher_forced", "unit": "%", "metrics": list(SHOWN),
                  "note": "diagonal: in-task value; off-diagonal: drop from the diagonal of the evaluated task's column",
                  "cells": {t: {e: dict(zip(SHOWN, v)) for e, v in row.items()} for t, row in PAPER_TABLE1.items()}},
        "figure": f"{Path(config.output).name}.png",
    }
    figure(payload, f"{config.output}.png", config.model)
    write_json(f"{config.output}.json", payload)
    atomic_write(f"{config.output}.md", lambda tmp: Path(tmp).write_text(markdown(payload, config.model)))
    return payload


# --- the matrix --------------------------------------------------------------------------------------


def _summary(report: EvalReport, phase: str, key: str) -> dict[str, Any] | None:
    for phases in report.aggregates.values():
        if key in phases.get(phase, {}):
            return phases[phase][key].to_dict()
    return None


def _case_values(report: EvalReport, phase: str, key: str) -> dict[str, float]:
    """source -> the case's value of ``key`` in ``phase``, for the cases that have one."""
    values = {case.source: getattr(case, phase).get(key) for case in report.cases}
    return {source: float(v) for source, v in values.items() if v is not None and not math.isnan(v)}


def _drop(off: EvalReport, diagonal: EvalReport, protocol: str, metric: str) -> dict[str, Any] | None:
    """Off-diagonal value minus the column's in-task value, and a paired bootstrap interval over the shared cases."""
    phase, _, prefix = PHASES[protocol]
    off_summary, in_task = _summary(off, phase, prefix + metric), _summary(diagonal, phase, prefix + metric)
    if off_summary is None or in_task is None:
        return None
    a, b = _case_values(off, phase, prefix + metric), _case_values(diagonal, phase, prefix + metric)
    diffs = [a[s] - b[s] for s in a if s in b]
    paired = summarize(diffs, protocol, intervals=True) if diffs else None
    return {"mean": off_summary["mean"] - in_task["mean"], "ci_low": paired.low if paired else None,
            "ci_high": paired.high if paired else None, "n": len(diffs), "protocol": protocol}


def transfer_matrix(reports: dict[str, dict[str, EvalReport]], protocols: list[str]) -> dict[str, Any]:
    """protocol -> metric -> trained on -> evaluated on -> cell: ``{mean, n, ci_low, ci_high, protocol, in_task, drop}``.

    ``reports``: trained on -> evaluated on -> report. ``drop`` is None on the diagonal and where the
    evaluated task has no in-task editor; a cell whose task has no probe of the metric has mean None and ``note``.
    """
    matrix: dict[str, Any] = {}
    for protocol in protocols:
        phase, _, prefix = PHASES[protocol]
        for metric in METRICS:
            rows = matrix.setdefault(protocol, {}).setdefault(metric, {})
            for trained, per_task in reports.items():
                for task, report in per_task.items():
                    summary = _summary(report, phase, prefix + metric)
                    cell = summary or {"mean": None, "n": 0, "ci_low": None, "ci_high": None, "protocol": protocol,
                                       "note": f"n/a: {task}'s test cases have no {metric} probes"}
                    diagonal = reports.get(task, {}).get(task)
                    drop = None if trained == task or diagonal is None else _drop(report, diagonal, protocol, metric)
                    rows.setdefault(trained, {})[task] = cell | {"in_task": trained == task, "drop": drop}
    return matrix


def pre_edit(reports: dict[str, dict[str, EvalReport]], protocols: list[str]) -> dict[str, Any]:
    """protocol -> metric -> evaluated on -> the unedited model's summary (the same for every editor: read from the first)."""
    first = next(iter(reports.values()))
    out: dict[str, Any] = {}
    for protocol in protocols:
        _, phase, prefix = PHASES[protocol]
        out[protocol] = {metric: {task: _summary(report, phase, prefix + metric) for task, report in first.items()} for metric in METRICS}
    return out


# --- Markdown and figure -------------------------------------------------------------------------------


def _pct(value: float) -> str:
    return f"{100 * value:.1f}"


def _value(summary: dict[str, Any] | None) -> str:
    if summary is None or summary["mean"] is None:
        return "n/a"
    interval = f" [{_pct(summary['ci_low'])}, {_pct(summary['ci_high'])}]" if summary.get("ci_low") is not None else ""
    return f"{_pct(summary['mean'])}{interval}"


def _signed(summary: dict[str, Any]) -> str:
    interval = f" [{100 * summary['ci_low']:+.1f}, {100 * summary['ci_high']:+.1f}]" if summary["ci_low"] is not None else ""
    return f"{100 * summary['mean']:+.1f}{interval}"


def _cell_text(cell: dict[str, Any]) -> str:
    if cell["mean"] is None:
        return "n/a"
    text = f"{_value(cell)}, n={cell['n']}"
    if cell["in_task"]:
        return f"**{text}**"
    return text + (f"; Δ {_signed(cell['drop'])}" if cell["drop"] else "")


def _paper_text(trained: str, task: str, metric: str) -> str:
    value = PAPER_TABLE1.get(trained, {}).get(task)
    if value is None:
        return "–"
    number = value[SHOWN.index(metric)]
    return f"**{number:.2f}**" if trained == task else f"Δ {number:+.2f}"


def markdown(payload: dict[str, Any], model: str) -> str:
    """One table per protocol and metric: rows = trained on, columns = evaluated on (teacher-forced: the paper's beside)."""
    trained, tasks = payload["trained_on"], payload["evaluated_on"]
    paper_tasks = [t for t in tasks if any(t in row for row in PAPER_TABLE1.values())]
    cases = ", ".join(f"{t} {n}" for t, n in payload["cases"].items())
    lines = [f"# Table 1: cross-task transfer of single-task editors on {model}", "",
             "Each row is one editor trained on one task alone, each column a task it is scored on (test split; "
             f"cases: {cases}). A cell is the post-edit value in % with its 95 % bootstrap interval and n, the cases "
             "that have such probes; in-task cells are bold. Off the diagonal, Δ is the value minus the in-task value of "
             "its column (the editor trained on the evaluated task), as the paper reports, with a paired bootstrap "
             "interval over the cases both editors were scored on. n/a: the task's test cases have no probes of that kind. "
             f"The paper's numbers ({PAPER_MODEL}, teacher-forced only) stand beside the teacher-forced tables; "
             "they come from a 1.5B model trained to convergence and are for orientation, not comparison.", ""]
    for protocol, by_metric in payload["matrix"].items():
        lines += [f"## {TITLES[protocol]}", ""]
        for metric in SHOWN:
            # (task, is the paper's column): the paper's value of a task stands right after ours
            columns = [(t, paper) for t in tasks for paper in (False, True) if not paper or (protocol == "teacher_forced" and t in paper_tasks)]
            header = ["trained on ↓ / evaluated on →", *(f"paper ({PAPER_MODEL})" if paper else t for t, paper in columns)]
            lines += [f"### {NAMES[metric]}", "", "| " + " | ".join(header) + " |", "|---" * len(header) + "|"]
            for row in trained:
                cells = [_paper_text(row, t, metric) if paper else _cell_text(by_metric[metric][row][t]) for t, paper in columns]
                lines.append(f"| {row} | " + " | ".join(cells) + " |")
            before = payload["pre_edit"][protocol][metric]
            unedited = ["–" if paper else _value(before.get(t)) + (f", n={before[t]['n']}" if before.get(t) else "") for t, paper in columns]
            lines += ["| unedited model | " + " | ".join(unedited) + " |", ""]
    lines += ["## Editors", "", "| trained on | editor | run folder | steps | best step | stopped early | training records |",
              "|---|---|---|---|---|---|---|"]
    for task, e in payload["editors"].items():
        counts = ", ".join(f"{k} {v}" for k, v in (e["train_counts"] or {}).items()) or "–"
        lines.append(f"| {task} | {e['name']} | `{e['run_dir']}` | {e['steps']} | {e['best_step']} | {e['stopped_early']} | {counts} |")
    experiment = payload["experiment"]
    lines += ["", f"Budget: up to {experiment['budget_steps']} optimizer steps per editor; split seed {experiment['split_seed']}. "
              f"Locality is in the JSON. Command: `{payload['command'] or 'run_transfer (library call)'}`."]
    return "\n".join(lines) + "\n"


def figure(payload: dict[str, Any], path: str | Path, model: str) -> Path:
    """Heat maps: a row per protocol, a panel per metric of Table 1; cells annotated with value and drop."""
    trained, tasks = payload["trained_on"], payload["evaluated_on"]

    def grid(by_metric: dict[str, Any], key: str) -> list[list[float]]:
        def value(cell: dict[str, Any]) -> float:
            found = cell["mean"] if key == "mean" else (cell["drop"] or {}).get("mean")
            return math.nan if found is None else 100 * found
        return [[value(by_metric[row][t]) for t in tasks] for row in trained]

    rows = [[{"title": f"{NAMES[m]} ({protocol.replace('_', '-')})", "values": grid(by_metric[m], "mean"), "drops": grid(by_metric[m], "drop")}
             for m in SHOWN] for protocol, by_metric in payload["matrix"].items()]
    return plots.transfer_heatmaps(path, rows, trained, tasks, f"Cross-task transfer of single-task editors on {model} (post-edit %, Δ from the in-task value)")
