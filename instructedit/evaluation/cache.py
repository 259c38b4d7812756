"""Evaluations cached as report JSON: the one rule for when a cached report still answers the question asked; and
evaluations that resume where an interruption stopped them.

The quickstart, the Table 3 experiment and the studies evaluate many (editor, task) pairs and are
rerun after an interruption; a report whose identifying settings (``IDENTITY``) equal the wanted
ones is read back instead of evaluating again. While an evaluation runs, its finished cases are appended to
``FILE.partial.jsonl`` beside the report it will write (``PartialEvaluation``); a rerun of the same evaluation (the
same identity, and its run options) scores only the cases left, and the finished report replaces the partial file.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from instructedit.editors.base import AUTO_OUTLIER_FACTOR, Editor, outlier_factor_for
from instructedit.editors.learned import undone_rounds_counted
from instructedit.editors.neighbours import pool_digest
from instructedit.evaluation.report import CaseResult, EvalReport, EvalSettings, SequentialPoint, load_report_json, write_report_json
from instructedit.evaluation.runner import evaluate
from instructedit.io import append_jsonl, atomic_write, json_stem
from instructedit.records import EditRecord
from instructedit.runs import EDITOR_WEIGHTS, editor_sha256
from instructedit.tasks.collate import check_edit_forms
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

# What makes two evaluations the same question: which editor (weights, options), model, records, instruction, protocol,
# and how the edits are made (their answer stop, forms, rounds and step sizes).
IDENTITY = ("task", "method_options", "editor_sha256", "model_name", "limit", "split", "split_seed", "instruction",
            "instruction_source", "protocol", "answer_stop", "edit_forms", "edit_rounds", "step_scale", "neighbours")


def cached_report(path: str | Path, wanted: EvalSettings) -> EvalReport | None:
    """The report cached at ``path`` if its ``IDENTITY`` settings equal ``wanted``'s; None if absent or stale."""
    path = Path(path)
    if not path.is_file():
        return None
    report = load_report_json(path)
    stale = [k for k in IDENTITY if getattr(report.settings, k) != getattr(wanted, k)]
    if stale:
        logger.info("re-evaluating %s: %s changed since it was cached", path, ", ".join(stale))
        return None
    logger.info("%s: cached evaluation matches; not rerunning", path)
    return report


def wanted_settings(settings: EvalSettings, model: nn.Module, pool: InstructionPool | None, instruction: int | None,
                    options: Mapping[str, Any]) -> EvalSettings:
    """``settings`` (the task, the editor: ``editor_sha256`` or ``method_options``) completed with what ``evaluate`` fills in
    itself from its arguments (model name, instruction, protocol, answer stop, edit forms, rounds and step sizes; ``options``:
    its keyword arguments), as its report will hold them."""
    return dataclasses.replace(
        settings, model_name=settings.model_name or str(getattr(model, "name_or_path", "")), instruction=instruction,
        instruction_source=pool.source if pool is not None and instruction is not None else None,
        protocol=options.get("protocol", "both"), answer_stop=options.get("answer_stop", "none"),
        edit_forms=list(check_edit_forms(options.get("edit_forms", ("wrapped",)))), edit_rounds=options.get("edit_rounds", 1),
        step_scale=options.get("step_scale", 1.0),
        neighbours=options["neighbours"].about() if options.get("neighbours") is not None else None)


def evaluate_cached(path: str | Path, model: nn.Module, tokenizer: Any, load_editor: Callable[[], Editor], records: Sequence[EditRecord],
                    pool: InstructionPool | None, instruction: int | None, settings: EvalSettings, **options: Any) -> EvalReport:
    """``evaluate`` (``options``: its keyword arguments) the editor ``load_editor()`` gives, unless ``path`` caches the same
    evaluation (``wanted_settings``); an interrupted one resumes (``evaluate_resuming``)."""
    report = cached_report(path, wanted_settings(settings, model, pool, instruction, options))
    if report is None:
        report = evaluate_resuming(path, model, tokenizer, load_editor(), records, pool, instruction, settings, **options)
    return report


PARTIAL = ".partial.jsonl"
# evaluate's options that change a case's numbers (padding, grouping, precision of float rounding) or what is asked, beside
# IDENTITY: a partial file resumes only a run made with the same ones
RUN_OPTIONS = ("batch_size", "convsent_pairs", "max_length", "fast", "pack_rows", "queries", "in_frame", "generation_batch_size",
               "cases_together", "same_relation")


def partial_path(report: str | Path) -> Path:
    """Where the finished cases of the evaluation that will write ``report`` (FILE.json or FILE.json.gz) are kept meanwhile."""
    return Path(f"{json_stem(report)}{PARTIAL}")


def run_identity(wanted: EvalSettings, model: nn.Module, options: Mapping[str, Any]) -> dict[str, Any]:
    """What two runs of an evaluation must share for one to go on with the other's cases: ``IDENTITY``, the method, the data
    file, the model's precision and device, the judge and ``RUN_OPTIONS`` (as JSON holds them)."""
    judge = options.get("judge")
    parameter = next(model.parameters())
    identity = {k: getattr(wanted, k) for k in (*IDENTITY, "method", "data_file")} | {k: options[k] for k in RUN_OPTIONS if k in options}
    if options.get("sequential"):  # every edit kept: how edits are refused, and the key memory the first one finds
        memory = options.get("memory")
        factor = outlier_factor_for(options.get("outlier_factor", AUTO_OUTLIER_FACTOR), options.get("neighbours") is not None)
        identity |= {"sequential": True, "outlier_factor": factor,
                     "key_memory": memory.state() if memory is not None else None}
    if options.get("same_relation_subjects") is not None:  # the entities a case's same-relation questions are about
        identity["same_relation_subjects"] = pool_digest(options["same_relation_subjects"])
    identity |= {"model_dtype": str(parameter.dtype).removeprefix("torch."), "device": parameter.device.type,
                 "judge": getattr(judge, "name", None) if judge is not None else None}
    return json.loads(json.dumps(identity, default=str))


class PartialEvaluation:
    """The finished cases of an evaluation under way, kept in ``path`` (``partial_path``) so that an interrupted run resumes.

    Line 1: ``{"partial_evaluation": identity}``; then per group of cases as ``evaluate`` hands them over (``on_results``)
    ``{"cases": [CaseResult, ...]}``, and a sequential evaluation's curve points (``on_point``) as ``{"point":
    SequentialPoint}``, each appended in one write and flushed to the disk. A line cut short by a crash is dropped when
    read (its cases run again); a file of a different evaluation (another identity) is an error, not silently overwritten.
    """

    def __init__(self, path: str | Path, identity: Mapping[str, Any]) -> None:
        self.path = Path(path)
        self.identity = dict(identity)
        self.points: list[SequentialPoint] = []  # a sequential evaluation's curve points, as ``resume`` read them

    def resume(self, restart: bool = False) -> list[CaseResult]:
        """The cases an interrupted run of this evaluation saved (none if there is no file or ``restart``); from here on
        the file is this run's."""
        if restart or not self.path.is_file():
            self._start()
            return []
        lines = self.path.read_text().split("\n")
        entries, cut = [], None
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError as e:
                if any(rest.strip() for rest in lines[number:]):
                    raise ValueError(f"{self.path}, line {number}: not JSON ({e}); move the file away or pass --restart") from None
                cut = number  # the last line, cut short by the crash that stopped the run
        if not entries or "partial_evaluation" not in entries[0]:
            raise ValueError(f"{self.path} is not a partial evaluation (its first line has no \"partial_evaluation\"); move it away "
                             "or pass --restart")
        theirs = entries[0]["partial_evaluation"]
        differ = [k for k in sorted(set(theirs) | set(self.identity)) if theirs.get(k) != self.identity.get(k)]
        if differ:
            k = differ[0]
            raise ValueError(f"{self.path} holds an unfinished evaluation with different {', '.join(differ)} (e.g. {k}: "
                             f"{theirs.get(k)!r} there, {self.identity.get(k)!r} now); pass --restart to start over, or write "
                             "the report elsewhere")
        try:
            done = [CaseResult(**case) for entry in entries[1:] if "point" not in entry for case in entry["cases"]]
            self.points = [SequentialPoint(**entry["point"]) for entry in entries[1:] if "point" in entry]
        except (KeyError, TypeError) as e:
            raise ValueError(f"{self.path}: a saved group of cases or curve point does not read back ({type(e).__name__}: {e}); "
                             "move the file away or pass --restart") from None
        if cut is not None:
            logger.warning("%s: line %d was cut short (the run stopped while writing it); its cases run again", self.path, cut)
            keep = [json.dumps(entry, default=str) + "\n" for entry in entries]
            atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(keep)))  # later groups append on a clean line
        return done

    def _start(self) -> None:
        self.points = []
        header = json.dumps({"partial_evaluation": self.identity}) + "\n"
        atomic_write(self.path, lambda tmp: Path(tmp).write_text(header))

    def append(self, results: Sequence[CaseResult]) -> None:
        """Save finished cases (``evaluate``'s ``on_results``)."""
        append_jsonl(self.path, {"cases": [dataclasses.asdict(r) for r in results]})

    def append_point(self, point: SequentialPoint) -> None:
        """Save a sequential evaluation's curve point (``evaluate``'s ``on_point``)."""
        append_jsonl(self.path, {"point": dataclasses.asdict(point)})

    def remove(self) -> None:
        """The report is written: the partial file is no longer needed."""
        self.path.unlink(missing_ok=True)


def evaluate_resuming(path: str | Path, model: nn.Module, tokenizer: Any, editor: Editor, records: Sequence[EditRecord],
                      pool: InstructionPool | None, instruction: int | None, settings: EvalSettings, *, restart: bool = False,
                      load_skipped: Sequence[dict[str, Any]] = (), **options: Any) -> EvalReport:
    """``evaluate`` (``options``: its keyword arguments) and write its report to ``path``, keeping every finished case in
    ``partial_path(path)`` meanwhile: after an interruption, the same call scores only the cases left (``restart``: all of
    them again). ``load_skipped``: records the data loader skipped, listed first among the report's skips. A sequential
    evaluation (every edit kept) keeps its curve's points too, and on resuming makes the saved cases' edits again, unscored."""
    partial = PartialEvaluation(partial_path(path), run_identity(wanted_settings(settings, model, pool, instruction, options), model, options))
    done = partial.resume(restart)
    if done:
        again = ("; their edits are made again, unscored, to edit the model as that run had" if options.get("sequential") else "")
        logger.info("%s: resuming an interrupted evaluation, %d of %d records already scored (%s)%s", path, len(done), len(records),
                    partial.path, again)
    curve = dict(done_points=partial.points, on_point=partial.append_point) if options.get("sequential") else {}
    with undone_rounds_counted() as undone:  # one line for the run, not a warning per edit
        report = evaluate(model, tokenizer, editor, records, pool, instruction, settings=settings, done=done, on_results=partial.append,
                          **curve, **options)
    if undone.edits:
        logger.warning("%s: %s", path, undone)
    report.skipped = [*load_skipped, *report.skipped]
    write_report_json(report, path)
    partial.remove()
    return report


def evaluate_editor_dir(path: str | Path, editor_dir: str | Path, model: nn.Module, tokenizer: Any, records: Sequence[EditRecord],
                        pool: InstructionPool | None, instruction: int | None, settings: EvalSettings, batch_size: int = 16,
                        progress: bool = True) -> EvalReport:
    """``evaluate_cached`` for the MEND editor saved in ``editor_dir`` (a study's run checkpoint)."""
    from instructedit.editors.mend import MENDEditor

    editor_dir = Path(editor_dir)
    weights = editor_dir / EDITOR_WEIGHTS
    if not weights.is_file():
        raise FileNotFoundError(f"{editor_dir} holds no trained editor ({EDITOR_WEIGHTS} is missing)")
    settings = dataclasses.replace(settings, method="mend", editor_path=str(editor_dir), editor_sha256=editor_sha256(editor_dir))
    return evaluate_cached(path, model, tokenizer, lambda: MENDEditor.from_pretrained(editor_dir, device=next(model.parameters()).device).eval(),
                           records, pool, instruction, settings, batch_size=batch_size, progress=progress)
