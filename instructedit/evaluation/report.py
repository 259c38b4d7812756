"""The typed evaluation report, and its writers: JSON (atomic) and Markdown tables of post/pre-edit metrics."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructedit.evaluation.metrics import FAMILIES, MARGIN, MetricSummary, task_average
from instructedit.io import atomic_write, write_json

COLUMNS = {"reliability": "Rel.", "generalization": "Gen.", "locality": "Loc.", "portability": "Port."}
PRE_FAMILIES = ("reliability", "generalization", "portability")  # pre-edit locality is 100% by definition


@dataclass
class EvalSettings:
    """Everything needed to reproduce a run; saved with its results."""

    task: str = ""
    method: str = ""
    method_options: dict[str, Any] = field(default_factory=dict)
    editor_path: str | None = None
    editor_sha256: str | None = None  # of editor.safetensors, for folder editors
    model_name: str = ""
    instruction: int | None = None  # description index; None: no instruction (plain MEND baselines)
    instruction_text: str | None = None  # the raw description (ConvSent's [LABEL]/[TOPIC] are filled per record)
    instruction_source: str | None = None  # which instruction pool
    data_file: str | None = None
    split: str | None = None
    split_seed: int | None = None
    limit: int | None = None
    sequential: bool = False
    batch_size: int = 16
    convsent_pairs: int = 2
    max_length: int = 0
    fast_path: bool = False  # MEND scored functionally on cached prefix states
    packed_rows: bool = False  # a case's rows packed into one row, sharing the instruction
    device: str = ""
    torch_version: str = ""
    date: str = ""

    @property
    def label(self) -> str:
        """Row name in tables: method, editor folder, instruction."""
        name = self.method + (f":{Path(self.editor_path).name}" if self.editor_path else "")
        name += " (no instruction)" if self.instruction is None else f" (instruction {self.instruction})"
        return name + (" [sequential]" if self.sequential else "")


@dataclass
class CaseResult:
    """One edited case: its metrics before and after the edit."""

    index: int
    source: str
    task: str
    pre: dict[str, float]
    post: dict[str, float]


@dataclass
class SequentialPoint:
    """After ``edits`` kept edits: reliability over every case edited so far, locality over the same cases."""

    edits: int
    reliability: float
    reliability_n: int
    locality: float | None
    locality_n: int


@dataclass
class EvalReport:
    settings: EvalSettings
    cases: list[CaseResult]
    aggregates: dict[str, dict[str, dict[str, MetricSummary]]]  # task -> "pre"/"post" -> metric -> summary
    timing: dict[str, float]
    skipped: list[dict[str, str]] = field(default_factory=list)  # {"source", "reason"}
    restoration: dict[str, Any] = field(default_factory=dict)
    sequential: list[SequentialPoint] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": dataclasses.asdict(self.settings),
            "aggregates": {
                task: {phase: {k: s.to_dict() for k, s in metrics.items()} for phase, metrics in phases.items()}
                for task, phases in self.aggregates.items()
            },
            "timing": dict(self.timing),
            "restoration": dict(self.restoration),
            "sequential": [dataclasses.asdict(p) for p in self.sequential],
            "skipped": list(self.skipped),
            "cases": [dataclasses.asdict(c) for c in self.cases],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "EvalReport":
        """Read back what ``to_dict`` wrote (e.g. to tabulate several saved runs)."""
        aggregates = {
            task: {phase: {k: MetricSummary(v["mean"], v["n"]) for k, v in metrics.items()} for phase, metrics in phases.items()}
            for task, phases in data["aggregates"].items()
        }
        return cls(
            settings=EvalSettings(**data["settings"]), cases=[CaseResult(**c) for c in data.get("cases", [])],
            aggregates=aggregates, timing=data.get("timing", {}), skipped=data.get("skipped", []),
            restoration=data.get("restoration", {}), sequential=[SequentialPoint(**p) for p in data.get("sequential", [])],
        )


def write_report_json(report: EvalReport, path: str | Path) -> Path:
    return write_json(path, report.to_dict())


def load_report_json(path: str | Path) -> EvalReport:
    return EvalReport.from_dict(json.loads(Path(path).read_text()))


# --- Markdown ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _rows(reports: Sequence[EvalReport], phase: str) -> tuple[list[str], dict[str, dict[str, dict[str, MetricSummary]]]]:
    """Merge reports by label: label -> task -> metric -> summary (a later report of the same task wins)."""
    merged: dict[str, dict[str, dict[str, MetricSummary]]] = {}
    for report in reports:
        row = merged.setdefault(report.settings.label, {})
        for task, phases in report.aggregates.items():
            row[task] = dict(phases.get(phase, {}))
    return list(merged), merged


def _table(reports: Sequence[EvalReport], phase: str, families: Sequence[str]) -> list[str]:
    labels, merged = _rows(reports, phase)
    tasks = list(dict.fromkeys(task for r in reports for task in r.aggregates))
    header = ["method"] + [f"{task} {COLUMNS[f]}" for task in tasks for f in families] + [f"avg {COLUMNS[f]}" for f in families]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        per_task = merged[label]
        cells = [label]
        for task in tasks:
            metrics = per_task.get(task, {})
            cells += [_pct(metrics[f].mean) if f in metrics else "–" for f in families]
        cells += [_pct(task_average(per_task, f)) for f in families]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _source(s: EvalSettings) -> str:
    if s.data_file:
        return f"`{s.data_file}`"
    return f"split {s.split} (seed {s.split_seed})" if s.split else "given records"


def _details(report: EvalReport) -> list[str]:
    lines = []
    for task, phases in report.aggregates.items():
        pre, post = phases.get("pre", {}), phases.get("post", {})
        lines += [f"#### {report.settings.label} — {task}", "", "| metric | pre-edit | post-edit | n |", "|---|---|---|---|"]
        for key in dict.fromkeys([*post, *pre]):
            fmt = (lambda s: "–" if s is None else f"{s.mean:+.3f}") if key == MARGIN else (lambda s: "–" if s is None else _pct(s.mean))
            summary = post.get(key) or pre.get(key)
            lines.append(f"| {key} | {fmt(pre.get(key))} | {fmt(post.get(key))} | {summary.n} |")
        lines.append("")
    return lines


def markdown_report(reports: Sequence[EvalReport]) -> str:
    """Tables: post-edit metrics (%) per method and task with the task average, pre-edit values, details."""
    if not reports:
        raise ValueError("markdown_report needs at least one report")
    lines = ["# Editing evaluation", "", "## Post-edit (%)", ""]
    lines += _table(reports, "post", FAMILIES)
    lines += ["", "## Pre-edit (%)", ""]
    lines += _table(reports, "pre", PRE_FAMILIES)
    lines += ["", "Reliability, generalization and portability are teacher-forced token accuracies of the answer; "
              "locality is the share of answer tokens whose argmax the edit left unchanged. "
              "Averages are unweighted over tasks; '–' means no case had that probe.", "", "## Details", ""]
    for report in reports:
        s = report.settings
        lines += [f"- **{s.label}** on {s.task}: model `{s.model_name}`, {len(report.cases)} cases "
                  f"({len(report.skipped)} skipped), data {_source(s)}, "
                  f"instructions from {s.instruction_source or '—'}, {report.timing.get('cases_per_s', 0):.2f} cases/s", ""]
        lines += _details(report)
        if report.sequential:
            lines += [f"#### {s.label} — sequential editing", "", "| edits | reliability (all edited) | n | locality | n |", "|---|---|---|---|---|"]
            lines += [f"| {p.edits} | {_pct(p.reliability)} | {p.reliability_n} | {_pct(p.locality)} | {p.locality_n} |" for p in report.sequential]
            lines.append("")
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(reports: Sequence[EvalReport], path: str | Path) -> Path:
    text = markdown_report(reports)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))
