"""Instruction construction (DESIGN.md §6): a proposer LLM writes candidate descriptions, a trial editor scores them,
the proposer sees the scores and improves, until no candidate beats the best for ``patience`` rounds.

Round 0 scores the base pool's own descriptions of the task (unless disabled), so the proposer starts
from known scores and the result says whether construction beat the hand-written pool. Outputs:
``descriptions.json`` (a pool file in the format of ``instructedit/tasks/descriptions.json``, the
task's descriptions replaced by, or extended with, the best ones), ``rounds.jsonl`` (every round:
raw answer, candidates with metrics, rejected lines, best so far), ``optimize.json`` and ``optimize.png``.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from instructedit.analysis import plots
from instructedit.analysis.proposers import MAX_CHARS, PLACEHOLDER_TASKS, Message, Proposer, parse_candidates
from instructedit.io import append_jsonl, write_json
from instructedit.records import TASKS, EditRecord
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

Scorer = Callable[[str], Mapping[str, float]]  # description text -> metrics in [0, 1] (reliability, ...)
SCORE_METRICS = ("reliability", "generalization", "locality", "portability")
MODES = ("replace", "extend")
TASK_GOALS = {  # what an edit of each task does, told to the proposer
    "counterfact": "overwrite a fact the model knows with a counterfactual one (subject, relation, new object)",
    "wikirecent": "insert a fact that was added to WikiData only recently, so the model did not know it",
    "convsent": "change the sentiment of the model's opinion about a topic: [LABEL] is filled with positive/negative, [TOPIC] with the topic",
    "zsre": "change the answer the model gives to a factual question (zero-shot relation extraction questions)",
}


@dataclass
class OptimizeSettings:
    task: str
    rounds: int = 10  # most proposal rounds (round 0, the baseline, not counted)
    patience: int = 2  # stop after this many consecutive rounds without a better candidate
    candidates: int = 5  # descriptions asked for per round
    metric: str = "reliability"
    tie_break: str | None = "locality"
    keep: int = 10  # descriptions written to the pool for the task
    mode: str = "replace"  # replace the task's descriptions by the best ``keep``, or append the best new ones
    baseline: bool = True  # round 0: score the base pool's descriptions
    show: int = 20  # best scored descriptions shown to the proposer each round
    max_chars: int = MAX_CHARS
    min_delta: float = 0.0  # an improvement must beat the best by more than this (metric units, 0-1)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"--task {self.task!r} is not one of {list(TASKS)}")
        for name in ("rounds", "patience", "candidates", "keep", "show"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be >= 1, got {getattr(self, name)}")
        for name in ("metric", "tie_break"):
            value = getattr(self, name)
            if value is not None and value not in SCORE_METRICS:
                raise ValueError(f"--{name.replace('_', '-')} {value!r} is not one of {list(SCORE_METRICS)}")
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r} is not one of {list(MODES)}")


def score_key(metrics: Mapping[str, float], settings: OptimizeSettings) -> tuple[float, float]:
    """Candidates compare by the metric, then the tie-break metric; a missing value ranks last."""
    def get(name: str | None) -> float:
        value = metrics.get(name) if name else None
        return -math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)

    return get(settings.metric), get(settings.tie_break)


def improves(new: tuple[float, float], best: tuple[float, float] | None, min_delta: float = 0.0) -> bool:
    """Lexicographic: a higher metric (by more than ``min_delta``), or the same metric and a higher tie-break."""
    if best is None:
        return True
    if new[0] > best[0] + min_delta:
        return True
    return math.isclose(new[0], best[0], abs_tol=1e-12) and new[1] > best[1] + min_delta


def _fmt(metrics: Mapping[str, float]) -> str:
    return ", ".join(f"{k} {100 * v:.1f}" for k, v in metrics.items() if k in SCORE_METRICS and v is not None)


def build_messages(task: str, template: str, scored: Sequence[Mapping[str, Any]], examples: Sequence[str], n: int,
                   settings: OptimizeSettings) -> list[Message]:
    """The conversation for one round: what instructions are, the task, every score so far (best first), the request."""
    system = (
        "You write task instructions for a knowledge editor, a network that edits a language model's knowledge. "
        "Every edit input is wrapped in this template before the edit:\n"
        f"{template}\n"
        "A good description tells the editor what kind of edit this is, so that the edit is reliable (the model then "
        "produces the new answer), generalizes to paraphrases, and leaves unrelated knowledge unchanged."
    )
    lines = [f"Task: {task}. An edit of this task should {TASK_GOALS.get(task, 'edit the model')}."]
    if scored:
        tie = f", ties broken by {settings.tie_break}" if settings.tie_break else ""
        lines.append(f"\nDescriptions scored so far, best first (ranked by {settings.metric}{tie}; scores in %):")
        for i, item in enumerate(scored[: settings.show], start=1):
            lines.append(f'{i}. [{_fmt(item["metrics"])}] "{item["text"]}"')
    elif examples:
        lines.append("\nExisting descriptions of this task (not scored yet):")
        lines += [f'- "{e}"' for e in examples]
    request = f"\nWrite {n} new, different descriptions for the task {task} that should score higher than the best one above."
    if task in PLACEHOLDER_TASKS:
        request += f" Each must contain the placeholders {' and '.join(PLACEHOLDER_TASKS[task])} literally."
    request += f" Each is one sentence of at most {settings.max_chars} characters. Answer with a numbered list, one description per line, nothing else."
    lines.append(request)
    return [{"role": "system", "content": system}, {"role": "user", "content": "\n".join(lines)}]


def _read_base_pool(path: str | Path | None) -> tuple[dict[str, Any], InstructionPool]:
    if path is None:
        text = resources.files("instructedit.tasks").joinpath("descriptions.json").read_text()
        return json.loads(text), InstructionPool.default()
    pool = InstructionPool.from_file(path)
    return json.loads(Path(path).read_text()), pool


def result_pool(base: dict[str, Any], task: str, ranked: Sequence[str], keep: int, mode: str) -> dict[str, Any]:
    """The base pool JSON with ``task``'s descriptions replaced by the best ``keep`` (topped up from the base
    descriptions when fewer were scored) or extended with the best new ones; other tasks untouched."""
    data = json.loads(json.dumps(base))
    current = list(data["descriptions"].get(task, []))
    needed = max(list(data.get("seen", [])) + list(data.get("unseen", [])), default=-1) + 1
    if mode == "replace":
        chosen = list(dict.fromkeys(ranked))[:keep]
        chosen += [d for d in current if d not in chosen][: max(0, max(keep, needed) - len(chosen))]
        if len(chosen) < needed:
            raise ValueError(f"only {len(chosen)} descriptions for {task!r}; the pool's seen/unseen indices need {needed}")
    else:
        chosen = current + [d for d in dict.fromkeys(ranked) if d not in current][:keep]
    data["descriptions"][task] = chosen
    return data


def optimize_instructions(proposer: Proposer, scorer: Scorer, settings: OptimizeSettings, output: str | Path,
                          base_pool: str | Path | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Run the propose / score / feed-back loop; writes descriptions.json, rounds.jsonl, optimize.json, optimize.png."""
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    base_json, pool = _read_base_pool(base_pool)
    task = settings.task
    base_descriptions = list(pool.descriptions.get(task, ()))
    log_path = output / "rounds.jsonl"
    log_path.write_text("")
    scored: list[dict[str, Any]] = []  # every scored description, kept sorted best first
    rounds: list[dict[str, Any]] = []
    best_key: tuple[float, float] | None = None
    stale, stop_reason = 0, "max_rounds"

    def score_all(texts: Sequence[str], origin: str) -> list[dict[str, Any]]:
        items = []
        for text in texts:
            metrics = {k: (None if v is None else float(v)) for k, v in dict(scorer(text)).items()}
            items.append({"text": text, "metrics": metrics, "score": list(score_key(metrics, settings)), "origin": origin})
            logger.info("%s candidate scored %s: %s", origin, _fmt(metrics), text[:80])
        return items

    def record(round_no: int, items: list[dict[str, Any]], rejected: list[dict[str, str]], raw: str | None) -> bool:
        nonlocal best_key
        improved = False
        for item in items:
            key = tuple(item["score"])
            if improves(key, best_key, settings.min_delta):  # type: ignore[arg-type]
                best_key, improved = key, True  # type: ignore[assignment]
        scored.extend(items)
        scored.sort(key=lambda x: tuple(x["score"]), reverse=True)
        entry = {"round": round_no, "candidates": items, "rejected": rejected, "raw": raw, "improved": improved,
                 "best": scored[0] if scored else None}
        rounds.append(entry)
        return improved

    if settings.baseline and base_descriptions:
        record(0, score_all(base_descriptions, "base pool"), [], None)
        append_jsonl(log_path, rounds[-1] | {"stale_rounds": 0})
    for round_no in range(1, settings.rounds + 1):
        messages = build_messages(task, pool.template, scored, base_descriptions, settings.candidates, settings)
        raw = proposer.complete(messages, settings.candidates)
        candidates, rejected = parse_candidates(raw, task, exclude=[s["text"] for s in scored], max_chars=settings.max_chars)
        candidates = candidates[: settings.candidates]
        if not candidates:
            logger.warning("round %d: the proposer's answer held no usable candidate (%d lines rejected)", round_no, len(rejected))
        improved = record(round_no, score_all(candidates, f"round {round_no}"), rejected, raw)
        stale = 0 if improved else stale + 1
        append_jsonl(log_path, rounds[-1] | {"messages": messages, "stale_rounds": stale})
        best = scored[0] if scored else None
        logger.info("round %d: %d candidates, best %s (%d round(s) without improvement)", round_no, len(candidates),
                    _fmt(best["metrics"]) if best else "–", stale)
        if stale >= settings.patience:
            stop_reason = "patience"
            break

    ranked = [s["text"] for s in scored]
    if not ranked:
        raise ValueError(f"no description of {task!r} was scored: the proposer produced no usable candidate and the baseline was off")
    pool_json = result_pool(base_json, task, ranked, settings.keep, settings.mode)
    pool_path = write_json(output / "descriptions.json", pool_json)
    InstructionPool.from_file(pool_path)  # what we wrote must load as a pool
    figure = plots.optimization_plot(output / "optimize.png", rounds, settings.metric)
    base_best = max((s for s in scored if s["origin"] == "base pool"), key=lambda s: tuple(s["score"]), default=None)
    summary = {
        "task": task, "settings": asdict(settings), "proposer": getattr(proposer, "name", type(proposer).__name__),
        "rounds_run": len([r for r in rounds if r["round"] > 0]), "stop_reason": stop_reason, "best": scored[0],
        "best_base_description": base_best, "improved_over_base": base_best is not None and scored[0]["origin"] != "base pool",
        "descriptions": pool_json["descriptions"][task], "pool_file": pool_path.name, "log_file": log_path.name,
        "figure": figure.name, "base_pool": pool.source, **(dict(extra) if extra else {}),
    }
    write_json(output / "optimize.json", summary)
    return summary


# --- the trial editor as scorer ------------------------------------------------------------------------


class EditorScorer:
    """Scores a description by evaluating the trial editor on fixed records with it as the only instruction."""

    def __init__(self, model: Any, tokenizer: Any, editor: Any, records: Sequence[EditRecord], task: str,
                 template: str, batch_size: int = 16, max_length: int | None = None) -> None:
        if not records:
            raise ValueError(f"no {task} records to score descriptions on")
        self.model, self.tokenizer, self.editor = model, tokenizer, editor
        self.records, self.task, self.template = list(records), task, template
        self.batch_size, self.max_length = batch_size, max_length
        self.calls = 0

    def __call__(self, description: str) -> dict[str, float]:
        from instructedit.evaluation.runner import evaluate

        pool = InstructionPool({self.task: (description,)}, seen=(0,), unseen=(), template=self.template, source="candidate description")
        report = evaluate(self.model, self.tokenizer, self.editor, self.records, pool, 0, batch_size=self.batch_size,
                          progress=False, max_length=self.max_length, protocol="teacher_forced")  # the score reads teacher-forced metrics
        self.calls += 1
        post = report.aggregates.get(self.task, {}).get("post", {})
        return {k: post[k].mean for k in SCORE_METRICS if k in post}
