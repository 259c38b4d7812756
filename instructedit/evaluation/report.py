"""The typed evaluation report, and its writers: JSON (atomic) and Markdown tables of post/pre-edit metrics, one set per protocol.

``aggregates[task][phase][metric]`` is a ``MetricSummary`` (mean, n, 95 % bootstrap interval,
protocol). Phases: ``pre`` / ``post`` for the teacher-forced protocol (the paper's numbers) and
``gen_pre`` / ``gen_post`` for the generation protocol (``gen_*`` metrics); see ``PHASES``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructedit.evaluation.metrics import FAMILIES, MARGIN, MetricSummary, task_average
from instructedit.io import atomic_write, read_json, write_json

COLUMNS = {"reliability": "Rel.", "generalization": "Gen.", "locality": "Loc.", "portability": "Port."}
PRE_FAMILIES = ("reliability", "generalization", "portability")  # pre-edit locality is 100% by definition
GEN_COLUMNS = {"gen_reliability": "Rel.", "gen_reliability_plain": "Rel. plain", "gen_reliability_chat": "Rel. chat",
               "gen_generalization": "Gen.", "gen_locality": "Loc.", "gen_locality_in_frame": "Loc. in frame", "gen_portability": "Port.", "gen_reliability_judge": "Rel. judge",
               "gen_fluency": "Fluency (×100)"}
PHASES = {"pre": "teacher_forced", "post": "teacher_forced", "gen_pre": "generation", "gen_post": "generation"}  # phase -> protocol
TITLES = {"teacher_forced": "Teacher-forced", "generation": "Generation (greedy, exact match)"}
SAMPLE_ANSWERS = 5  # cases whose answers the Markdown shows
SKIPPED_SHOWN = 20  # skipped records the Markdown lists (the JSON has all)
LOAD_STAGE = "load"  # a record the data loader skipped (malformed); the runner's own skips carry no stage


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
    instruction_reason: str | None = None  # why this instruction setting (e.g. "the editor was trained without instructions")
    data_file: str | None = None
    split: str | None = None
    split_seed: int | None = None
    limit: int | None = None
    sequential: bool = False
    outlier_factor: float | None = None  # sequential: an edit moving a weight more than this × the median change is refused
    key_memory: dict[str, Any] | None = None  # sequential, least squares: the KeyMemory every solve held (KeyMemory.state())
    batch_size: int = 16
    convsent_pairs: int = 2
    max_length: int = 0
    fast_path: bool = False  # MEND scored functionally on cached prefix states
    packed_rows: bool = False  # a case's rows packed into one row, sharing the instruction
    protocol: str = "teacher_forced"  # teacher_forced | generation | both (reports from before protocols: teacher-forced)
    answer_stop: str = "none"  # what the edit input's answer ends with (the collator's answer_stop)
    edit_forms: list[str] = field(default_factory=lambda: ["wrapped"])  # the forms each edit is made in (wrapped, chat)
    edit_rounds: int = 1  # the rounds each edit is made in (the editor's queries.edit_rounds; calibrate --rounds)
    in_frame_locality: bool = False  # generation also asked each case another record's question in its frame (gen_locality_in_frame)
    same_relation: int = 0  # generation also asked each case this many questions of its relation about other entities, in its frame
    neighbours: dict[str, Any] | None = None  # each edit held subject-swapped neighbours still (Neighbours.about())
    neighbours_held_cases: int = 0  # the cases whose prompt names their subject: those edited with neighbours
    step_scale: float = 1.0  # the editor's step sizes x this in every edit (sequential: its queries.many_edit_scale)
    queries: list[str] = field(default_factory=list)  # forms of the edit prompt asked by the generation protocol
    generation_margin: int | None = None  # answer tokens allowed beyond the target's length
    judge: str | None = None  # the LLM judge of gen_reliability_judge, if any
    device: str = ""
    model_dtype: str = ""  # the model's weights' precision (evaluate --dtype); "" in reports from before it was recorded
    torch_version: str = ""
    # products chosen by timing on the CPU (INSTRUCTEDIT_FAST_KERNELS unset or 1; models.split.fast_kernels_wanted), which
    # can differ between processes in the last bits; False: reruns give the same numbers to the bit; None: from before
    fast_kernels: bool | None = None
    date: str = ""

    @property
    def label(self) -> str:
        """Row name in tables: method, editor folder, instruction."""
        name = self.method + (f":{Path(self.editor_path).name}" if self.editor_path else "")
        name += " (no instruction)" if self.instruction is None else f" (instruction {self.instruction})"
        return name + ((" [sequential, key memory]" if self.key_memory else " [sequential]") if self.sequential else "")


@dataclass
class CaseResult:
    """One edited case: its teacher-forced and generation metrics before and after the edit, and what the model said."""

    index: int
    source: str
    task: str
    pre: dict[str, float]
    post: dict[str, float]
    gen_pre: dict[str, float] = field(default_factory=dict)
    gen_post: dict[str, float] = field(default_factory=dict)
    answers: list[dict[str, str]] = field(default_factory=list)  # per query: family, form, question, target, pre, post, ...
    refused: bool = False  # sequential: the edit would have wrecked the model and was not kept (scored without it)
    # sequential, a weight edit: the most it moved one weight, ‖W_after − W_before‖ / ‖W_before‖ (``editors.base.largest_change``;
    # a refused edit: what it would have moved)
    weight_change: float | None = None


@dataclass
class SequentialPoint:
    """After ``edits`` kept edits: reliability over every case edited so far, locality over the same cases."""

    edits: int
    reliability: float
    reliability_n: int
    locality: float | None
    locality_n: int
    refused: int = 0  # of these edits, how many were not kept (each would have wrecked the model)
    # with the generation protocol: the share of those cases whose wrapped edit prompt the model now answers with the
    # target (exact match), and of their locality prompts whose greedy answer is still the unedited model's
    gen_reliability: float | None = None
    gen_reliability_n: int = 0
    gen_locality: float | None = None
    gen_locality_n: int = 0
    # per metric above (reliability, locality, gen_reliability, gen_locality): its 95 % bootstrap interval [low, high]
    # over the cases (reports from before intervals: none)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    # per case edited so far, by its index (a string: JSON's keys): its value of each metric above, what pairs two
    # sequences' points case by case (``paired_point``; reports from before: none)
    cases: dict[str, dict[str, float]] = field(default_factory=dict)


@dataclass
class EvalReport:
    settings: EvalSettings
    cases: list[CaseResult]
    aggregates: dict[str, dict[str, dict[str, MetricSummary]]]  # task -> phase (PHASES) -> metric -> summary
    timing: dict[str, float]
    # {"source", "reason"}: records the runner skipped; the loader's also carry "stage": "load", "file", "index"
    skipped: list[dict[str, Any]] = field(default_factory=list)
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
            task: {phase: {k: MetricSummary.from_dict(v) for k, v in metrics.items()} for phase, metrics in phases.items()}
            for task, phases in data["aggregates"].items()
        }
        return cls(
            settings=EvalSettings(**data["settings"]), cases=[CaseResult(**c) for c in data.get("cases", [])],
            aggregates=aggregates, timing=data.get("timing", {}), skipped=data.get("skipped", []),
            restoration=data.get("restoration", {}), sequential=[SequentialPoint(**p) for p in data.get("sequential", [])],
        )


def load_skips(file: str | Path, skipped: Sequence[tuple[int, str]]) -> list[dict[str, Any]]:
    """The records a data loader skipped in ``file`` ((record index, reason) pairs) as report entries."""
    name = Path(file).name
    return [{"source": f"{name}#{index}", "reason": reason, "stage": LOAD_STAGE, "file": str(file), "index": index}
            for index, reason in skipped]


def post_pre(report: EvalReport, task: str) -> dict[str, dict[str, float | None]]:
    """{"post": {metric: mean}, "pre": {...}, "n": {...}} of one task of a report."""
    phases = report.aggregates.get(task, {})
    out: dict[str, dict[str, Any]] = {}
    for phase in ("post", "pre"):
        values = phases.get(phase, {})
        out[phase] = {m: values[m].mean if m in values else None for m in FAMILIES}
    out["n"] = {m: phases.get("post", {})[m].n for m in FAMILIES if m in phases.get("post", {})}
    return out


def write_report_json(report: EvalReport, path: str | Path) -> Path:
    return write_json(path, report.to_dict())


def load_report_json(path: str | Path) -> EvalReport:
    return EvalReport.from_dict(read_json(path))


# --- Markdown ----------------------------------------------------------------------------------


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}"


def _ranged(point: SequentialPoint, metric: str) -> str:
    """A sequential point's ``metric`` in %, with its 95 % interval where the point has one."""
    value, interval = getattr(point, metric), point.intervals.get(metric)
    return _pct(value) if value is None or not interval else f"{_pct(value)} [{_pct(interval[0])}, {_pct(interval[1])}]"


def interval_cell(summary: MetricSummary | None) -> str:
    """'56.3 [50.1, 62.0]': the mean and its 95 % interval in %, or the mean alone when no interval was computed."""
    if summary is None:
        return "–"
    if summary.low is None or summary.high is None:
        return _pct(summary.mean)
    return f"{_pct(summary.mean)} [{_pct(summary.low)}, {_pct(summary.high)}]"


def _margin_cell(summary: MetricSummary | None) -> str:
    if summary is None:
        return "–"
    interval = f" [{summary.low:+.3f}, {summary.high:+.3f}]" if summary.low is not None and summary.high is not None else ""
    return f"{summary.mean:+.3f}{interval}"


def _rows(reports: Sequence[EvalReport], phase: str) -> tuple[list[str], dict[str, dict[str, dict[str, MetricSummary]]]]:
    """Merge reports by label: label -> task -> metric -> summary (a later report of the same task wins)."""
    merged: dict[str, dict[str, dict[str, MetricSummary]]] = {}
    for report in reports:
        row = merged.setdefault(report.settings.label, {})
        for task, phases in report.aggregates.items():
            if phase in phases or task not in row:
                row[task] = dict(phases.get(phase, {}))
    return list(merged), merged


def _table(reports: Sequence[EvalReport], phase: str, columns: dict[str, str]) -> list[str]:
    labels, merged = _rows(reports, phase)
    tasks = list(dict.fromkeys(task for r in reports for task in r.aggregates))
    header = ["method"] + [f"{task} {name}" for task in tasks for name in columns.values()] + [f"avg {name}" for name in columns.values()]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for label in labels:
        per_task = merged[label]
        cells = [label]
        for task in tasks:
            metrics = per_task.get(task, {})
            cells += [interval_cell(metrics.get(key)) for key in columns]
        cells += [_pct(task_average(per_task, key)) for key in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _has_phase(reports: Sequence[EvalReport], phase: str) -> bool:
    return any(phases.get(phase) for r in reports for phases in r.aggregates.values())


def _generation_columns(reports: Sequence[EvalReport], phase: str) -> dict[str, str]:
    """The generation metrics some report has in ``phase`` (the chat form exists only for models with a chat template)."""
    present = {key for r in reports for phases in r.aggregates.values() for key in phases.get(phase, {})}
    return {key: name for key, name in GEN_COLUMNS.items() if key in present}


def _source(s: EvalSettings) -> str:
    if s.data_file:
        return f"`{s.data_file}`"
    return f"split {s.split} (seed {s.split_seed})" if s.split else "given records"


def _details(report: EvalReport) -> list[str]:
    lines = []
    for task, phases in report.aggregates.items():
        for protocol, (pre_phase, post_phase) in (("teacher_forced", ("pre", "post")), ("generation", ("gen_pre", "gen_post"))):
            pre, post = phases.get(pre_phase, {}), phases.get(post_phase, {})
            if not pre and not post:
                continue
            lines += [f"#### {report.settings.label} — {task}, {TITLES[protocol].lower()}", "",
                      "| metric | pre-edit | post-edit | n |", "|---|---|---|---|"]
            for key in dict.fromkeys([*post, *pre]):
                fmt = _margin_cell if key == MARGIN else interval_cell
                summary = post.get(key) or pre.get(key)
                lines.append(f"| {key} | {fmt(pre.get(key))} | {fmt(post.get(key))} | {summary.n} |")
            lines.append("")
    return lines


def _text_cell(text: str) -> str:
    """Model output as a table cell: no pipes or control characters; an empty answer says so."""
    text = "".join(ch if ch.isprintable() else " " for ch in text).replace("|", "\\|").strip()
    return text or "(nothing)"


def _sample_answers(report: EvalReport, count: int = SAMPLE_ANSWERS) -> list[str]:
    """What the model said to the wrapped edit prompt, before and after the edit, on the first ``count`` cases that were asked."""
    rows = []
    for case in report.cases:
        for item in case.answers:
            if item["family"] == "reliability" and item["form"] == "wrapped":
                cells = [item["question"], item["target"], item["pre"], item["post"]]
                rows.append("| " + " | ".join(_text_cell(c) for c in cells) + " |")
                break
        if len(rows) == count:
            break
    if not rows:
        return []
    return [f"#### {report.settings.label} — answers to the edit prompt", "", "| question | target | pre-edit | post-edit |",
            "|---|---|---|---|", *rows, ""]


def _skipped(report: EvalReport, count: int = SKIPPED_SHOWN) -> list[str]:
    """The skipped records: where each was dropped (data loader or evaluation) and why."""
    if not report.skipped:
        return []
    rows = [f"| {_text_cell(str(s.get('source', '')))} | {'data loader' if s.get('stage') == LOAD_STAGE else 'evaluation'} | "
            f"{_text_cell(str(s.get('reason', '')))} |" for s in report.skipped[:count]]
    more = [f"... and {len(report.skipped) - count} more (all are in the JSON report's `skipped`)", ""] if len(report.skipped) > count else []
    return [f"#### {report.settings.label} — skipped records", "", "| record | skipped by | reason |", "|---|---|---|", *rows, "", *more]


def _notes(reports: Sequence[EvalReport], teacher_forced: bool, generation: bool) -> list[str]:
    """What the numbers of the protocols shown mean."""
    lines = []
    if teacher_forced:
        lines += ["Teacher-forced: reliability, generalization and portability are token accuracies of the gold answer fed in; "
                  "locality is the share of answer tokens whose argmax the edit left unchanged.", ""]
    if generation:
        margins = sorted({r.settings.generation_margin for r in reports if r.settings.generation_margin is not None})
        margin = f"{margins[0]}" if len(margins) == 1 else "a margin of"
        lines += [f"Generation: the model answers greedily (stop at EOS or a newline; at most the target's length + {margin} tokens); "
                  "the first line of its answer is compared with the expected answer after normalization (lowercase, no punctuation "
                  "or articles): exact match (`_f1`: token F1). Plain / chat: the edit prompt without the instruction / as the user "
                  "turn of the chat template. Locality: share of locality prompts whose answer the edit left unchanged.", ""]
    return lines + ["Cells: mean over cases [95 % bootstrap interval]. Averages are unweighted over tasks; '–' means no case had that probe."]


def markdown_report(reports: Sequence[EvalReport]) -> str:
    """Per protocol: post-edit and pre-edit metrics (%) per method and task with the task average; then details and sample answers."""
    if not reports:
        raise ValueError("markdown_report needs at least one report")
    lines = ["# Editing evaluation", ""]
    generation = _has_phase(reports, "gen_post")
    teacher_forced = _has_phase(reports, "post") or not generation
    if teacher_forced:
        title = TITLES["teacher_forced"]
        lines += [f"## {title}: post-edit (%)", "", *_table(reports, "post", {f: COLUMNS[f] for f in FAMILIES}), ""]
        lines += [f"## {title}: pre-edit (%)", "", *_table(reports, "pre", {f: COLUMNS[f] for f in PRE_FAMILIES}), ""]
    if generation:
        title = TITLES["generation"]
        lines += [f"## {title}: post-edit (%)", "", *_table(reports, "gen_post", _generation_columns(reports, "gen_post")), ""]
        lines += [f"## {title}: pre-edit (%)", "", *_table(reports, "gen_pre", _generation_columns(reports, "gen_pre")), ""]
    lines += [*_notes(reports, teacher_forced, generation), "", "## Details", ""]
    for report in reports:
        s = report.settings
        loader = sum(1 for x in report.skipped if x.get("stage") == LOAD_STAGE)
        lines += [f"- **{s.label}** on {s.task}: model `{s.model_name}`, {len(report.cases)} cases "
                  f"({len(report.skipped)} skipped{f': {loader} by the data loader' if loader else ''}), data {_source(s)}, instructions from {s.instruction_source or '—'}"
                  f"{f' ({s.instruction_reason})' if s.instruction_reason else ''}, "
                  f"protocol {s.protocol}, answer stop {s.answer_stop}, edits made in {' + '.join(s.edit_forms)}{f' in {s.edit_rounds} rounds' if s.edit_rounds != 1 else ''}{f' at step sizes x {s.step_scale:g}' if s.step_scale != 1 else ''}{f', judge {s.judge}' if s.judge else ''}, "
                  f"{report.timing.get('cases_per_s', 0):.2f} cases/s", ""]
        lines += _details(report)
        lines += _sample_answers(report)
        lines += _skipped(report)
        if report.sequential:
            said = any(p.gen_reliability is not None for p in report.sequential)
            lines += [f"#### {s.label} — sequential editing", "",
                      "| edits | reliability (all edited) | n | locality | n |" + (" said (all edited) | n | answers kept | n |" if said else "")
                      + " not kept |", "|---|---|---|---|---|" + ("---|---|---|---|" if said else "") + "---|"]
            lines += [f"| {p.edits} | {_ranged(p, 'reliability')} | {p.reliability_n} | {_ranged(p, 'locality')} | {p.locality_n} |"
                      + (f" {_ranged(p, 'gen_reliability')} | {p.gen_reliability_n} | {_ranged(p, 'gen_locality')} | {p.gen_locality_n} |"
                         if said else "")
                      + f" {p.refused} |" for p in report.sequential]
            lines += ["", "Teacher-forced: reliability and locality as above, over every case edited so far (95 % bootstrap intervals)"
                         + ("; generation: the greedy answer to each case's wrapped edit prompt is its target (said), and to "
                            "each locality prompt the unedited model's (answers kept)." if said else "."), ""]
            moved = [(c.weight_change, k) for k, c in enumerate(report.cases, start=1) if c.weight_change is not None]
            if moved:
                ordered = sorted(m for m, _ in moved)
                top, at = max(moved)
                lines += [f"Each edit's largest change of one weight (‖ΔW‖ / ‖W‖): median {ordered[len(ordered) // 2]:.3g}, largest "
                          f"{top:.3g} (edit {at} of {len(report.cases)}; a refused edit's counts too).", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_markdown(reports: Sequence[EvalReport], path: str | Path) -> Path:
    text = markdown_report(reports)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def paired_differences(a: dict[str, Any], b: dict[str, Any], metrics: Sequence[tuple[str, str]],
                       labels: tuple[str, str] = ("a", "b"), difference: str = "difference") -> dict[str, dict[str, Any]]:
    """Two reports' JSON (``read_json`` of what ``write_report_json`` wrote) of the same cases, compared case by case: per
    (metric, phase) of ``metrics`` (e.g. ``("gen_reliability", "gen_post")``), each report's mean over the cases both
    score, the paired difference b − a with its 95 % bootstrap interval (``difference``, ``ci_low``, ``ci_high``), the
    protocol, n and how many cases differ. ``labels``: the keys the two means go under. The reports must hold the same
    cases in the same order (a ValueError otherwise)."""
    _check_same_cases(a, b, "paired_differences")
    out: dict[str, dict[str, Any]] = {}
    for metric, phase in metrics:
        both = [(x[phase][metric], y[phase][metric]) for x, y in zip(a["cases"], b["cases"])
                if x[phase].get(metric) is not None and y[phase].get(metric) is not None]
        if both:
            out[metric] = _paired(both, labels, difference, "generation" if phase.startswith("gen") else "teacher_forced")
    return out


def paired_point(a: dict[str, Any], b: dict[str, Any], edits: int | None = None,
                 metrics: Sequence[str] = ("gen_reliability", "gen_locality", "reliability", "locality"),
                 labels: tuple[str, str] = ("a", "b"), difference: str = "difference") -> dict[str, dict[str, Any]]:
    """Two sequential evaluations' reports (JSON) of the same cases, compared case by case at one point of their curves
    (``edits``: after that many edits; None: the last, every case edited): per metric of ``metrics``, as
    ``paired_differences`` gives them. A ValueError where either curve lacks the point or its per-case values (a report
    from before they were recorded)."""
    _check_same_cases(a, b, "paired_point")
    points = []
    for name, report in zip(labels, (a, b)):
        curve = report.get("sequential") or []
        point = curve[-1] if edits is None and curve else next((p for p in curve if p["edits"] == edits), None)
        if point is None or not point.get("cases"):
            where = "its last point" if edits is None else f"a point after {edits} edits"
            raise ValueError(f"paired_point: report {name!r} has no per-case values at {where} of a sequential curve")
        points.append(point["cases"])
    if edits is None and set(points[0]) != set(points[1]):
        raise ValueError("paired_point: the two curves' last points score different cases")
    out: dict[str, dict[str, Any]] = {}
    for metric in metrics:
        both = [(points[0][k][metric], points[1][k][metric]) for k in points[0]
                if k in points[1] and metric in points[0][k] and metric in points[1][k]]
        if both:
            out[metric] = _paired(both, labels, difference, "generation" if metric.startswith("gen") else "teacher_forced")
    return out


def _check_same_cases(a: dict[str, Any], b: dict[str, Any], call: str) -> None:
    """A ValueError naming ``call`` unless two reports (JSON) hold the same cases (by source) in the same order."""
    if [c["source"] for c in a["cases"]] != [c["source"] for c in b["cases"]]:
        raise ValueError(f"{call}: the two reports do not hold the same cases in the same order")


def _paired(both: Sequence[tuple[float, float]], labels: tuple[str, str], difference: str, protocol: str) -> dict[str, Any]:
    """Paired values (a, b): each side's mean, b − a with its 95 % bootstrap interval, n, the protocol, how many differ."""
    from instructedit.evaluation.generation import bootstrap_ci  # here: reading and writing reports needs no torch

    xs, ys = zip(*both)
    ci = bootstrap_ci([y - x for x, y in both])
    return {labels[0]: sum(xs) / len(xs), labels[1]: sum(ys) / len(ys), difference: ci.mean, "ci_low": ci.low, "ci_high": ci.high,
            "n": len(both), "protocol": protocol, "cases_differing": sum(x != y for x, y in both)}


def paired_lines(differences: Mapping[str, Any], labels: tuple[str, str] = ("a", "b"), difference: str = "difference") -> list[str]:
    """``paired_differences``' metrics as lines a script prints: "metric (protocol): a -> b, b − a [low, high]", in points."""
    a, b = labels
    return [f"{key} ({v['protocol']}): {100 * v[a]:.1f} -> {100 * v[b]:.1f}, {100 * v[difference]:+.1f} "
            f"[{100 * v['ci_low']:+.1f}, {100 * v['ci_high']:+.1f}]"
            for key, v in differences.items() if isinstance(v, dict) and difference in v]
