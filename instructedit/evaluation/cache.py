"""Evaluations cached as report JSON: the one rule for when a cached report still answers the question asked.

The quickstart, the Table 3 experiment and the studies evaluate many (editor, task) pairs and are
rerun after an interruption; a report whose identifying settings (``IDENTITY``) equal the wanted
ones is read back instead of evaluating again.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from instructedit.editors.base import Editor
from instructedit.evaluation.report import EvalReport, EvalSettings, load_report_json, write_report_json
from instructedit.evaluation.runner import evaluate
from instructedit.records import EditRecord
from instructedit.runs import EDITOR_WEIGHTS, editor_sha256
from instructedit.tasks.collate import check_edit_forms
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

# What makes two evaluations the same question: which editor (weights, options), model, records, instruction, protocol,
# and how the edits are made (their answer stop, forms, rounds and step sizes).
IDENTITY = ("task", "method_options", "editor_sha256", "model_name", "limit", "split", "split_seed", "instruction",
            "instruction_source", "protocol", "answer_stop", "edit_forms", "edit_rounds", "step_scale")


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


def evaluate_cached(path: str | Path, model: nn.Module, tokenizer: Any, load_editor: Callable[[], Editor], records: Sequence[EditRecord],
                    pool: InstructionPool | None, instruction: int | None, settings: EvalSettings, **options: Any) -> EvalReport:
    """``evaluate`` (``options``: its keyword arguments) the editor ``load_editor()`` gives, unless ``path`` caches the same evaluation.

    ``settings`` name the task and the editor (``editor_sha256`` or ``method_options``); what ``evaluate``
    fills in itself (model name, instruction, protocol, answer stop, edit forms, rounds and step sizes) is completed here the same way before comparing.
    """
    wanted = dataclasses.replace(
        settings, model_name=settings.model_name or str(getattr(model, "name_or_path", "")), instruction=instruction,
        instruction_source=pool.source if pool is not None and instruction is not None else None,
        protocol=options.get("protocol", "both"), answer_stop=options.get("answer_stop", "none"),
        edit_forms=list(check_edit_forms(options.get("edit_forms", ("wrapped",)))), edit_rounds=options.get("edit_rounds", 1),
        step_scale=options.get("step_scale", 1.0))
    report = cached_report(path, wanted)
    if report is None:
        report = evaluate(model, tokenizer, load_editor(), records, pool, instruction, settings=settings, **options)
        write_report_json(report, path)
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
