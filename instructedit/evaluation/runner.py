"""The evaluation runner: per case one batched pre/post-edit scoring of all its probes, the edit, a verified exact rollback.

Speed (BENCHMARKS.md): a case's probes (rewrite, rephrases, portability, locality) form one padded
batch (``probes``); the vocabulary projection runs only at the labelled answer positions. For a functional
editor (``FunctionalEditor``: MEND) the rows are packed into one row that holds their common instruction once
(``packing``), one pass of the
unedited prefix over it serves the pre-edit logits and the edit itself, and only the edited blocks
re-run with the new weights, functionally, for the post-edit logits (the model is never written). Any other editor goes through ``editor.apply`` / ``handle.rollback()``.
Either way a ``WeightGuard`` proves after every case that the parameters are bitwise the originals.

The generation protocol (``generation_probes``) runs beside it. MEND's fast path decodes several
cases' queries in one batch, before and after their edits from one prefill (``before_after``: the
blocks below the edited ones run once), each post-edit row with its own case's update added by
hooks; a query asked exactly as a teacher-forced probe needs no prefill at all: its answer begins
from that pass's keys and values, with the leading answer tokens the pass found to be the argmax
(``packing.case_seeds``). Otherwise every case's pre-edit answers are generated up front in large batches (the
unedited model does not change), and each case's post-edit answers in one batched call while its
edit is written into the model.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from instructedit.editors.aggregation import KeyMemory, check_remembers, remembering
from instructedit.editors.base import (
    AUTO_OUTLIER_FACTOR, OUTLIER_FACTOR, EditHandle, EditResult, Editor, FunctionalEditor, Hold, OutlierEdits, WeightEditHandle,
    apply_in_place, largest_change, outlier_factor_for, refuse_outlier, scaled_step_sizes, sequence_edit,
)
from instructedit.editors.learned import LearnedEditor, apply_in_rounds, check_edit_rounds, check_many_edit_scale, check_rounds
from instructedit.editors.neighbours import Neighbours, holding_neighbours, names_subject, swapped_questions
from instructedit.evaluation import generation_probes as gen
from instructedit.evaluation.fast_linears import fast_linears
from instructedit.evaluation.generation import ANSWER_MARGIN, bootstrap_ci
from instructedit.evaluation.guard import RestorationError, WeightGuard  # noqa: F401 (RestorationError: re-exported)
from instructedit.evaluation.metrics import (
    MARGIN, PROTOCOL_CHOICES, MetricSummary, aggregate, answer_accuracy, family_means, mean_logprob, sentiment_margin,
    unchanged_tokens,
)
from instructedit.evaluation.packing import (
    Case, case_seeds, check_packing, layout_logits, prepare_cases, probe_scores, score_functional,
)
from instructedit.evaluation.probes import OPPOSITE, SCORED
from instructedit.evaluation.report import PHASES, CaseResult, EvalReport, EvalSettings, SequentialPoint
from instructedit.losses import argmax_ids
from instructedit.models.architectures import transposed_of
from instructedit.models.loading import max_input_length
from instructedit.models.split import fast_kernels_wanted
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)



def sequential_schedule(n: int) -> list[int]:
    """Edit counts after which sequential editing re-scores: 1, 2, 4, 8, ... and n."""
    points, k = [], 1
    while k < n:
        points.append(k)
        k *= 2
    return points + [n] if n > 0 else []


def _accuracy_metrics(case: Case, logits: torch.Tensor) -> dict[str, float]:
    """Reliability / generalization / portability (+ ConvSent's sentiment margin) of one case."""
    n = len(case.probes)
    acc = answer_accuracy(logits, case.targets, case.rows, n).tolist()
    scored = [i for i, p in enumerate(case.probes) if p.family in SCORED]
    metrics = family_means([acc[i] for i in scored], [case.probes[i].family for i in scored], [case.probes[i].kind for i in scored])
    if case.record.convsent is not None:
        target = "generalization" if any(p.family == "generalization" for p in case.probes) else "reliability"
        chosen = [i for i, p in enumerate(case.probes) if p.family in (target, OPPOSITE)]
        logp = mean_logprob(logits, case.targets, case.rows, n).tolist()
        margin = sentiment_margin([logp[i] for i in chosen], [case.probes[i].family == target for i in chosen])
        if margin is not None:
            metrics[MARGIN] = margin
    return metrics


def _post_metrics(case: Case, logits: torch.Tensor, pre_argmax: torch.Tensor) -> dict[str, float]:
    metrics = _accuracy_metrics(case, logits)
    same = unchanged_tokens(pre_argmax, argmax_ids(logits), case.rows, len(case.probes)).tolist()
    local = [i for i, p in enumerate(case.probes) if p.family == "locality"]
    metrics.update(family_means([same[i] for i in local], ["locality"] * len(local), [case.probes[i].kind for i in local]))
    return metrics


Asker = Callable[[], list[str]]  # a case's post-edit answers, asked while its edit is in the model


def _score_in_place(model: nn.Module, editor: Editor, case: Case, ask: Asker | None = None,
                    rounds: int = 1) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Any editor: pre-edit forward, ``apply`` (in ``rounds`` rounds: a learned editor), post-edit forward (and answers),
    ``rollback`` (padded rows: editors may read them)."""
    pre = layout_logits(model, case.padded)
    handle = apply_in_rounds(editor, model, case.edit, rounds)
    try:
        post = layout_logits(model, case.padded)
        answers = ask() if ask is not None else []
    finally:
        handle.rollback()
    return pre, post, answers


def _answer_edited(model: nn.Module, result: EditResult, ask: Asker | None) -> list[str]:
    """MEND's post-edit answers: the edit already computed for the logits, written in place, rolled back bit for bit."""
    if ask is None:
        return []
    with apply_in_place(model, result):
        return ask()


def _rescore(model: nn.Module, collator: Collator, cases: Sequence[Case], batch_size: int, edits: int,
             generation: gen.GenerationRun | None = None) -> SequentialPoint:
    """Reliability of every case edited so far and their locality against the unedited model; with ``generation``,
    also whether the model now says each case's target to its wrapped edit prompt and keeps each locality answer."""
    items = [(c, i) for c in cases for i, p in enumerate(c.probes) if p.family in ("reliability", "locality")]
    acc, same, _ = probe_scores(model, collator, [(c.probes[i].prompt, c.probes[i].answer) for c, i in items],
                                [c.pre_argmax[c.rows == i] for c, i in items], batch_size)
    per_case: dict[int, dict[str, list[float]]] = {}
    for (c, i), a, u in zip(items, acc, same, strict=True):
        family = c.probes[i].family
        per_case.setdefault(c.index, {}).setdefault(family, []).append(a if family == "reliability" else u)
    by_case = {str(index): {family: sum(v) / len(v) for family, v in families.items()} for index, families in per_case.items()}
    rel = [v["reliability"] for v in by_case.values() if "reliability" in v]
    loc = [v["locality"] for v in by_case.values() if "locality" in v]
    point = SequentialPoint(edits, sum(rel) / len(rel), len(rel), sum(loc) / len(loc) if loc else None, len(loc),
                            intervals=_intervals(reliability=rel, locality=loc), cases=by_case)
    if generation is None:
        return point
    asked = [(c, [i for i, q in enumerate(c.queries) if (q.family, q.form) == ("reliability", "wrapped") or q.family == "locality"])
             for c in cases if c.queries]
    said = iter(generation.answer_edited(model, [c.queries[i] for c, picked in asked for i in picked]))
    for c, picked in asked:
        scores = gen.answer_scores([c.queries[i] for i in picked], [next(said) for _ in picked], [c.pre_answers[i] for i in picked])
        by_case.setdefault(str(c.index), {}).update({k: scores[k] for k in ("gen_reliability", "gen_locality") if k in scores})
    rel_said = [v["gen_reliability"] for v in by_case.values() if "gen_reliability" in v]
    kept = [v["gen_locality"] for v in by_case.values() if "gen_locality" in v]
    return replace(point, gen_reliability=sum(rel_said) / len(rel_said) if rel_said else None, gen_reliability_n=len(rel_said),
                   gen_locality=sum(kept) / len(kept) if kept else None, gen_locality_n=len(kept),
                   intervals=point.intervals | _intervals(gen_reliability=rel_said, gen_locality=kept))


def _intervals(**values: list[float]) -> dict[str, list[float]]:
    """[low, high] of each non-empty list's 95 % bootstrap interval (``generation.bootstrap_ci``, fixed seed)."""
    return {name: [(ci := bootstrap_ci(v)).low, ci.high] for name, v in values.items() if v}


def _asker(model: nn.Module, generation: gen.GenerationRun | None, case: Case) -> Asker | None:
    if generation is None or not case.queries:
        return None
    return lambda: generation.answer_edited(model, case.queries)


def _case_result(case: Case, pre: dict[str, float], post: dict[str, float], answers: list[str],
                 generation: gen.GenerationRun | None, teacher_forced: bool) -> CaseResult:
    """One case's result under the protocols asked for: teacher-forced metrics, generation metrics and answers."""
    gen_pre, gen_post, log = ({}, {}, [])
    if generation is not None and case.queries:
        gen_pre, gen_post, log = generation.case_result(case.queries, case.pre_answers, answers)
    if not teacher_forced:
        pre, post = {}, {}
    return CaseResult(case.index, case.record.source, case.record.task, pre, post, gen_pre, gen_post, log)


def _decodes_together(fast_path: bool, generation: gen.GenerationRun | None, cases_together: int) -> bool:
    """Whether several cases' answers decode in one batch, pre- and post-edit from one prefill (MEND fast path)."""
    return fast_path and generation is not None and cases_together > 1


def _run_single(model: nn.Module, editor: Editor, cases: list[Case], guard: WeightGuard, generation: gen.GenerationRun | None,
                teacher_forced: bool, fast_path: bool, pack_rows: bool, progress: bool,
                cases_together: int = 1, rounds: int = 1, on_results: Callable[[list[CaseResult]], None] | None = None,
                done: Collection[int] = (), hold_for: Callable[[Case], Hold | None] | None = None) -> tuple[list[CaseResult], bool]:
    """Edit, score and roll back each case in turn, each edit made in ``rounds`` rounds (inside ``hold_for(case)(None)``,
    if given: a least-squares editor holding the case's neighbours); returns the results and whether rows were packed.
    ``on_results`` is handed each case's result as it is final (the cases decoded together: as a group);
    ``done``: indices of cases an earlier run scored, not run again (the packing check still looks at every case, and the
    cases left are grouped as they would have been if ``done`` is whole groups from the start: the same numbers).

    MEND (fast path): the answers of ``cases_together`` cases are decoded in one batch, before and after
    the edit from one prefill (``before_after``), each post-edit row with its own case's weight update
    added by hooks (``row_edits``); the weights are never written.
    """
    dtype = next(model.parameters()).dtype
    together = _decodes_together(fast_path, generation, cases_together)
    probe_case = min(cases, key=lambda c: sum(chunk.input_ids.numel() for chunk in c.padded.chunks))  # cheapest to check

    def held(case: Case) -> contextlib.AbstractContextManager:
        hold = hold_for(case) if hold_for is not None else None
        return hold(None) if hold is not None else contextlib.nullcontext()

    packed, first_scores = False, None
    if fast_path and pack_rows:
        with held(probe_case):
            packed, first_scores = check_packing(editor, model, probe_case, dtype, together, rounds)
    if first_scores is not None and not together:  # its edited weights are written for its answers at its case's turn,
        first_scores[2].new_params = dict(first_scores[2].new_params)  # after earlier cases wrote and restored the model's
    results: list[CaseResult] = []
    pending: list[tuple[Case, torch.Tensor, torch.Tensor, dict[str, torch.Tensor], list]] = []  # case, pre, post, ΔW, seeds
    stops = generation.stop_ids if together else set()  # tokens a seed's given answer tokens stop before

    bar = tqdm(total=len(cases), initial=len(done), desc="evaluate", unit="case", disable=not progress)

    def finished(new: list[CaseResult]) -> None:
        results.extend(new)
        if on_results is not None:
            on_results(new)

    def flush() -> None:
        bar.set_postfix_str(f"greedy answers of {len(pending)} cases before and after their edits", refresh=True)
        before, answers = generation.answer_before_after(model, editor.split(model), [c.queries for c, *_ in pending],
                                                         [p[3] for p in pending], transposed_of(editor.weights),
                                                         [p[4] for p in pending])
        group = []
        for (case, pre, post, *_), unedited, said in zip(pending, before, answers, strict=True):
            case.pre_answers = unedited
            guard.verify(where=f"case {case.index} ({case.record.source})")
            group.append(_case_result(case, _accuracy_metrics(case, pre), _post_metrics(case, post, argmax_ids(pre)), said,
                                      generation, teacher_forced))
        pending.clear()
        finished(group)
        bar.set_postfix_str("", refresh=True)

    for case in cases:
        if case.index in done:
            continue
        ask = _asker(model, generation, case)
        if fast_path:
            layout = case.layout(packed, dtype)
            if first_scores is not None and case is probe_case:
                scores = first_scores
            else:
                with held(case):
                    scores = score_functional(editor, model, layout, together, rounds, case.edit)
            if together:  # the queries asked as probes begin from the teacher-forced pass (``case_seeds``)
                seeds = case_seeds(case, layout, scores[3], scores[0], scores[1], editor.split(model).first_layer, stops)
                pending.append((case, scores[0], scores[1], scores[2].low_rank or scores[2].updates, seeds))
                bar.update()
                if len(pending) >= cases_together:
                    flush()
                continue
            pre, post, answers = scores[0], scores[1], _answer_edited(model, scores[2], ask)
        else:
            with held(case):
                pre, post, answers = _score_in_place(model, editor, case, ask, rounds)
        guard.verify(where=f"case {case.index} ({case.record.source})")
        finished([_case_result(case, _accuracy_metrics(case, pre), _post_metrics(case, post, argmax_ids(pre)), answers,
                               generation, teacher_forced)])
        bar.update()
    if pending:
        flush()
    bar.close()
    return results, packed


def _run_sequential(model: nn.Module, editor: Editor, collator: Collator, cases: list[Case], guard: WeightGuard, batch_size: int,
                    generation: gen.GenerationRun | None, teacher_forced: bool, progress: bool,
                    outlier_factor: float | None = OUTLIER_FACTOR, memory: KeyMemory | None = None,
                    earlier: dict[int, CaseResult] | None = None, earlier_points: Sequence[SequentialPoint] = (),
                    on_results: Callable[[list[CaseResult]], None] | None = None,
                    on_point: Callable[[SequentialPoint], None] | None = None,
                    hold_for: Callable[[Case], Hold | None] | None = None, rounds: int = 1) -> tuple[list[CaseResult], list[SequentialPoint]]:
    """Keep every edit; pre-edit values come from the unedited model; the model is restored at the end.

    ``memory`` (a least-squares editor): every edit's solve holds its keys still, then adds its own (``remembering``);
    a refused edit's keys leave it again. ``hold_for`` (``_neighbour_holds``): what else a case's solve holds, given
    ``memory``. ``rounds``: each edit made in this many (``editors.base.sequence_edit``).

    A case's post-edit answers are asked right after its own edit, with every earlier edit still in the model. A weight
    edit that would wreck the model (``editors.base.OutlierEdits`` with ``outlier_factor``; None: every edit is kept) is
    undone, as ``apply_sequential`` does: its case is scored on the model without it and marked ``refused``.

    Resuming: the cases of ``earlier`` (by index: an interrupted run's results) and the curve's ``earlier_points`` are not
    scored again, but their edits are made again (the model's edited weights were not saved; an edit is a function of
    the model it finds, so the same edits in the same order give the same weights, up to last-bit differences between
    processes, which a long sequence can grow: results/analysis/in-frame-locality/sequential/neighbours/rerun/), each
    checked to be kept or refused as it was; the results returned are the cases scored now (``evaluate`` puts the earlier
    ones in their place).
    ``on_results`` / ``on_point``: handed each case's result and each curve point as soon as they are final.
    """
    earlier = earlier or {}
    saved_points = {p.edits: p for p in earlier_points}
    outliers = OutlierEdits(outlier_factor) if outlier_factor is not None else None
    for case in tqdm(cases, desc="pre-edit", unit="case", disable=not progress):
        logits = layout_logits(model, case.padded)
        case.pre, case.pre_argmax = _accuracy_metrics(case, logits), argmax_ids(logits)
    schedule = set(sequential_schedule(len(cases)))
    held: list[EditHandle] = []  # editors that add modules/hooks: undone last-in first-out at the end
    results, curve = [], []
    refusals: list[bool] = []  # per edit made so far, a resumed one too: whether it was refused
    try:
        with remembering(editor, memory):  # every solve holds the kept edits' keys still, then adds its own
            for k, case in enumerate(tqdm(cases, desc="sequential edits", unit="edit", disable=not progress), start=1):
                hold = hold_for(case) if hold_for is not None else None
                handle = sequence_edit(editor, model, case.edit, memory, hold, rounds)
                change = largest_change(handle) if isinstance(handle, WeightEditHandle) else None
                # a refused edit is undone: the model is as the edits before it left it
                kept = not refuse_outlier(handle, outliers, where=f"edit {k} of {len(cases)} ({case.record.source})", memory=memory,
                                          change=change)
                if kept and isinstance(handle, WeightEditHandle):
                    handle.keep()  # the guard's copies restore the weights; per-edit copies would cost memory
                elif kept:
                    held.append(handle)
                refusals.append(not kept)
                saved = earlier.get(case.index)
                if saved is not None:  # made again on resuming, to edit the model as the interrupted run had; not scored
                    if saved.refused == kept:
                        raise RuntimeError(f"resuming a sequential evaluation: edit {k} ({case.record.source}) was "
                                           f"{'refused' if saved.refused else 'kept'} by the interrupted run and is "
                                           f"{'kept' if kept else 'refused'} now, so the edits made again do not give its model; "
                                           "start over (--restart)")
                else:
                    post = _post_metrics(case, layout_logits(model, case.padded), case.pre_argmax)
                    ask = _asker(model, generation, case)
                    results.append(replace(_case_result(case, case.pre, post, ask() if ask is not None else [], generation,
                                                        teacher_forced), refused=not kept,
                                           weight_change=change[1] if change is not None else None))
                    if on_results is not None:
                        on_results(results[-1:])
                if k in schedule:
                    point = saved_points.get(k)
                    if point is None:
                        point = replace(_rescore(model, collator, cases[:k], batch_size, k, generation), refused=sum(refusals))
                        if on_point is not None:
                            on_point(point)
                    curve.append(point)
    finally:
        for handle in reversed(held):
            handle.rollback()
        guard.restore()
    return results, curve


def _complete_settings(settings: EvalSettings | None, model: nn.Module, editor: Editor, records: Sequence[EditRecord],
                       pool: InstructionPool | None, instruction: int | None, **values: object) -> EvalSettings:
    base = settings or EvalSettings()
    tasks = list(dict.fromkeys(r.task for r in records))
    text = None
    if pool is not None and instruction is not None and len(tasks) == 1 and tasks[0] in pool.descriptions:
        text = pool.descriptions[tasks[0]][instruction]
    return replace(
        base, task=base.task or ",".join(tasks), method=base.method or (editor.method if isinstance(editor, FunctionalEditor) else type(editor).__name__),
        model_name=base.model_name or str(getattr(model, "name_or_path", "")), instruction=instruction, instruction_text=text,
        instruction_source=pool.source if pool is not None and instruction is not None else None,
        torch_version=torch.__version__, fast_kernels=fast_kernels_wanted(),
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **values,
    )


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    editor: Editor,
    records: Sequence[EditRecord],
    pool: InstructionPool | None,
    instruction: int | None,
    batch_size: int = 16,
    sequential: bool = False,
    progress: bool = True,
    *,
    convsent_pairs: int = 2,
    max_length: int | None = None,
    fast: bool = True,
    pack_rows: bool = True,
    settings: EvalSettings | None = None,
    protocol: str = "both",
    answer_stop: str = "none",
    edit_forms: Sequence[str] = ("wrapped",),
    queries: Sequence[str] = gen.QUERY_FORMS,
    in_frame: bool = True,
    generation_batch_size: int = 32,
    judge: gen.Judge | None = None,
    cases_together: int = 32,
    outlier_factor: float | str | None = AUTO_OUTLIER_FACTOR,
    memory: KeyMemory | None = None,
    neighbours: Neighbours | None = None,
    same_relation: int = 0,
    same_relation_subjects: Sequence[str] | None = None,
    edit_rounds: int = 1,
    step_scale: float = 1.0,
    done: Sequence[CaseResult] = (),
    on_results: Callable[[list[CaseResult]], None] | None = None,
    done_points: Sequence[SequentialPoint] = (),
    on_point: Callable[[SequentialPoint], None] | None = None,
) -> EvalReport:
    """Edit each record in turn and score it before and after (DESIGN.md §5); the model ends as it began.

    ``instruction``: description index of ``pool`` wrapping edit/rephrase/portability prompts, or
    None for none. ``batch_size``: most probe rows per forward pass. ``sequential``: keep every edit
    and report the decay of earlier edits. ``fast``: score MEND editors functionally (same numbers,
    no weight writes); ``pack_rows``: and run each case's rows as one packed row (checked against
    padded rows on the first case). ``settings``: run metadata (task, split, ...) to complete and store.
    ``protocol``: teacher_forced, generation or both. ``answer_stop``: what the edit input's answer
    ends with (as the editor was trained; the collator's ``answer_stop``). ``edit_forms``: the forms each edit is made
    in, solved together (the editor's ``queries.edit_forms``: the wrapped prompt; the chat question). ``edit_rounds``: the
    rounds each edit is made in (the editor's ``queries.edit_rounds``; a learned editor; ``sequential``: each kept edit). ``step_scale``:
    every edit is made at the editor's step sizes × this (a learned editor; ``sequential``: the editor's
    ``queries.many_edit_scale``, as ``apply_sequential`` makes them; restored afterwards). ``queries``: forms of the
    edit prompt the generation protocol asks (``generation_probes.QUERY_FORMS``), answered in
    batches of ``generation_batch_size``. ``in_frame``: the generation protocol also asks each case the question of the
    next record of its task in those forms and the case's frame (in-frame locality, ``generation_probes``). ``judge``: adds ``gen_reliability_judge``. ``cases_together``:
    MEND's answers of this many cases decode in one batch, pre- and post-edit sharing the prefill below the
    edited blocks (each post-edit row with its own edit added by hooks; equal to one case at a time up to
    float rounding; 1: each case's edit written into the model, pre-edit answers decoded for all cases first).
    ``outlier_factor`` (``sequential``): an edit that would move a weight by more than this many times the median change
    of the edits kept before it is not kept (``editors.base.OutlierEdits``; None: every edit is kept; "auto", as
    ``apply_sequential``: 6 with ``neighbours``, else 50; ``settings.outlier_factor``: the factor used); its case is scored
    on the model without it and marked ``refused``. ``memory`` (``sequential``, a least-squares MEND editor;
    ``instructedit.KeyMemory``): lifelong editing, every edit's solve holds the keys of the edits kept before it (and the
    memory's preservation text) still; the memory goes on holding the kept edits' keys after the call.
    ``neighbours`` (a least-squares MEND editor; its ``subjects`` given): each edit holds its subject-swapped neighbours
    still beside the editor's own sample or, ``sequential``, the key memory (``editors.neighbours``; never one of the case's
    same-relation probes; give ``edit_rounds``: ``apply``'s default with neighbours is twice the calibrated rounds); a case
    whose prompt does not name its subject is edited without. ``same_relation``: the generation protocol also asks each
    case this many questions of its relation about other entities (its prompt with its subject swapped for one of
    ``same_relation_subjects``, default the evaluated records' subjects) in its forms and frame (``gen_locality_same_relation``,
    ``gen_same_relation_target``).

    Resuming: ``on_results`` is handed every case's result as soon as it is final (cases decoded together: their group
    at once), e.g. to append them to a file (``evaluation.cache.PartialEvaluation``); ``done``: the results an interrupted
    run of the same evaluation handed it. Those cases are not run again and their results join the report in the
    records' order; ``timing["resumed_cases"]`` counts them, ``cases_per_s`` the cases run in this call. Results saved
    whole groups at a time, as ``on_results`` hands them, are the ones an uninterrupted run gives, to the bit.
    ``sequential``: ``on_point`` is handed each point of the curve too, ``done_points`` are the interrupted run's, and the
    saved cases' edits are made again, in order, unscored (``_run_sequential``): the edited weights were not saved.
    """
    if (done_points or on_point is not None) and not sequential:
        raise ValueError("done_points and on_point are the points of a sequential evaluation's curve: pass sequential=True")
    if memory is not None and not sequential:
        raise ValueError("a key memory holds earlier edits still while edits are kept one after another: pass sequential=True")
    if memory is not None:
        check_remembers(editor)
    if neighbours is not None:
        if neighbours.subjects is None:
            raise ValueError("evaluate(neighbours=...): give Neighbours(subjects=...), the entities swapped in")
        check_remembers(editor)
    if same_relation < 0:
        raise ValueError(f"same_relation must be >= 0 questions per case, got {same_relation}")
    check_edit_rounds(edit_rounds, "edit_rounds")
    check_rounds(editor, edit_rounds)
    step_scale = check_many_edit_scale(step_scale, "step_scale")
    outlier_factor = outlier_factor_for(outlier_factor, neighbours is not None)
    if batch_size < 1 or generation_batch_size < 1:
        raise ValueError(f"batch_size and generation_batch_size must be >= 1, got {batch_size} and {generation_batch_size}")
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"protocol {protocol!r} is not one of {list(PROTOCOL_CHOICES)}")
    if instruction is not None and pool is None:
        raise ValueError("an instruction index was given but no instruction pool")
    if not records:
        raise ValueError("no records to evaluate")
    forms = gen.check_forms(queries)
    start = time.perf_counter()
    device = next(model.parameters()).device
    if isinstance(editor, LearnedEditor):
        # beside the weights it edits, as ``InstructEditor.apply`` puts it: an editor loaded on the CPU for a model on a GPU
        # would hand the decoding hooks (``row_edits``) CPU factors to add to GPU rows
        edited = dict(model.named_parameters()).get(editor.weights[0].name)
        editor.to(edited.device if edited is not None else device)
    max_length = max_length or max_input_length(model)
    collator = Collator(tokenizer, max_length, pool, convsent_pairs=convsent_pairs, answer_stop=answer_stop, edit_forms=edit_forms)
    functional = editor if isinstance(editor, FunctionalEditor) else None  # scored on cached prefix states, weights never written
    fast_path = fast and not sequential and functional is not None
    # an edit made in rounds is made from the case's edit input alone (``rounds_result``), which the fast path's probe pass
    # passes too where it is one row (its state read from there); more rows, or another path, would pass it for nothing
    cases, skipped = prepare_cases(collator, records, instruction, batch_size, device,
                                   edit_rows=None if edit_rounds == 1 else int(fast_path))
    if not cases:
        raise ValueError(f"none of the {len(records)} records fits max_length={max_length} tokens")
    earlier = _done_by_index(done, cases)
    watch = [w.name for w in functional.weights] if functional is not None else []
    if sequential and not watch:  # unknown editor: restoring needs a copy of every parameter
        watch = [name for name, _ in model.named_parameters()]
    guard = WeightGuard(model, watch)
    generation = gen.GenerationRun(tokenizer, generation_batch_size, max_length, judge, progress) if protocol != "teacher_forced" else None
    asks_in_frame = generation is not None and in_frame and len(cases) > 1  # another case's question to ask in each one's frame
    probes = _same_relation_probes([c.record for c in cases], same_relation if generation is not None else 0,
                                   same_relation_subjects if same_relation_subjects is not None else [r.subject for r in records])
    if generation is not None:
        others = gen.in_frame_neighbours([c.record for c in cases]) if asks_in_frame else None
        for i, case in enumerate(cases):
            case.queries = gen.case_queries(collator, case.record, instruction, forms,
                                            in_frame=cases[others[i]].record if others is not None else None, same_relation=probes[i])
    hold_for, held_cases = _neighbour_holds(editor, model, collator, instruction, cases, probes, neighbours)
    setup_s = time.perf_counter() - start

    curve: list[SequentialPoint] = []
    run_start = time.perf_counter()
    # passes without gradients through oneDNN where it is faster than BLAS here
    with fast_linears(model), scaled_step_sizes(editor, step_scale):
        if generation is not None and not _decodes_together(fast_path, generation, cases_together):
            # the curve's points ask every case edited so far, a resumed one too, and compare with its unedited answers
            left = cases if sequential else [c for c in cases if c.index not in earlier]
            for case, said in zip(left, generation.answer_unedited(model, [c.queries for c in left])):
                case.pre_answers = said  # decoded together, cases get theirs with their post-edit answers (one prefill)
        teacher_forced = protocol != "generation"
        packed = False
        if sequential:
            results, curve = _run_sequential(model, editor, collator, cases, guard, batch_size, generation, teacher_forced, progress,
                                             outlier_factor, memory, earlier, done_points, on_results, on_point, hold_for, edit_rounds)
        else:
            results, packed = _run_single(model, editor, cases, guard, generation, teacher_forced, fast_path, pack_rows, progress,
                                          cases_together, edit_rounds, on_results, earlier.keys(), hold_for)
    run_s = time.perf_counter() - run_start
    ran = len(results)
    if earlier:  # every case's result in the records' order, the earlier run's and this one's
        now = {r.index: r for r in results}
        results = [earlier[c.index] if c.index in earlier else now[c.index] for c in cases]
    per_case_checks = guard.verified
    verify_start = time.perf_counter()
    checked = guard.verify(full=True, where="end of evaluation")
    verify_s = time.perf_counter() - verify_start

    total_s = time.perf_counter() - start
    timing = {"setup_s": setup_s, "run_s": run_s, "verify_s": verify_s, "total_s": total_s,
              "cases_per_s": ran / run_s if run_s > 0 else float("inf"), "cases_per_s_total": ran / total_s}
    if earlier:
        timing["resumed_cases"] = len(earlier)
    if generation is not None:
        timing |= {f"generation_{stage}_s": seconds for stage, seconds in generation.seconds.items()}
    return EvalReport(
        settings=_complete_settings(settings, model, editor, records, pool, instruction, sequential=sequential,
                                    outlier_factor=outlier_factor if sequential else None,
                                    key_memory=memory.state() if memory is not None else None, batch_size=batch_size,
                                    convsent_pairs=convsent_pairs, max_length=max_length, fast_path=fast_path, packed_rows=packed,
                                    device=str(device), model_dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
                                    protocol=protocol, answer_stop=answer_stop, edit_rounds=edit_rounds, step_scale=step_scale,
                                    edit_forms=list(collator.edit_forms), queries=forms,
                                    in_frame_locality=asks_in_frame, same_relation=same_relation if generation is not None else 0,
                                    neighbours=neighbours.about() if neighbours is not None else None, neighbours_held_cases=held_cases,
                                    generation_margin=ANSWER_MARGIN if generation is not None else None,
                                    judge=judge.name if judge is not None and generation is not None else None),
        cases=results,
        aggregates=_aggregates(results, ("pre", "post") * teacher_forced + ("gen_pre", "gen_post") * (generation is not None)),
        timing=timing,
        skipped=skipped,
        restoration={"verified": True, "per_case_checks": per_case_checks, "copied_parameters": len(guard.originals),
                     "fingerprinted_parameters": len(guard.digests), "final_full_check_parameters": checked,
                     "mode": _restoration_mode(sequential, fast_path, generation is not None, cases_together > 1, edit_rounds)},
        sequential=curve,
    )


def _names_subject(record: EditRecord) -> bool:
    """Whether a record's prompt names its subject (no ConvSent): what neighbours and same-relation probes swap."""
    return record.convsent is None and names_subject(record.prompt, record.subject)


def _neighbour_holds(editor: Editor, model: nn.Module, collator: Collator, instruction: int | None, cases: Sequence[Case],
                     probes: Sequence[Sequence[str]], neighbours: Neighbours | None) -> tuple[Callable[[Case], Hold | None] | None, int]:
    """``evaluate(neighbours=...)``: what each case's edit holds (``editors.neighbours.holding_neighbours``: its
    neighbours, drawn from the pool without the entities of its same-relation ``probes``, beside the editor's own sample
    or a sequence's key memory; None for a case whose prompt does not name its subject) and how many cases hold them.
    Built as each case is edited, from the model as it is then (a sequence: as the earlier edits left it)."""
    if neighbours is None:
        return None, 0
    probed = {c.index: set(p) for c, p in zip(cases, probes)}
    held_cases = sum(_names_subject(c.record) for c in cases)
    if held_cases < len(cases):
        logger.warning("%d of %d cases do not name their subject in their prompt: edited without neighbours",
                       len(cases) - held_cases, len(cases))

    def hold_for(case: Case) -> Hold | None:
        record = case.record
        if not _names_subject(record):
            return None
        pool = [s for s in neighbours.subjects or () if record.prompt.replace(record.subject, s) not in probed[case.index]]
        return lambda memory: holding_neighbours(editor, model, collator, record, collator.edit_forms, instruction, neighbours,
                                                 pool, memory)

    return hold_for, held_cases


def _same_relation_probes(records: Sequence[EditRecord], k: int, subjects: Sequence[str]) -> list[list[str]]:
    """Per record, ``k`` questions of its relation about other entities of ``subjects`` (its prompt with its subject
    swapped, ``editors.neighbours.swapped_questions`` at seed 1; none for a record whose prompt does not name its subject)."""
    return [swapped_questions(r.prompt, r.subject, subjects, k, seed=1) if k and _names_subject(r) else [] for r in records]


def _done_by_index(done: Sequence[CaseResult], cases: Sequence[Case]) -> dict[int, CaseResult]:
    """``evaluate``'s ``done`` by case index, checked to be results of these cases (same index, source and task)."""
    ours = {c.index: c for c in cases}
    earlier: dict[int, CaseResult] = {}
    for r in done:
        case = ours.get(r.index)
        if case is None or (case.record.source, case.record.task) != (r.source, r.task):
            what = f"case {case.index} is {case.record.source} ({case.record.task})" if case is not None else \
                f"no case has index {r.index} ({len(cases)} cases)"
            raise ValueError(f"a saved result is not one of this evaluation's cases: it is for {r.source} ({r.task}) at index "
                             f"{r.index}, and {what}")
        if r.index in earlier:
            raise ValueError(f"case {r.index} ({r.source}) has two saved results")
        earlier[r.index] = r
    return earlier


def _aggregates(results: Sequence[CaseResult], phases: Sequence[str]) -> dict[str, dict[str, dict[str, MetricSummary]]]:
    """task -> phase -> metric -> summary, with its protocol and 95 % bootstrap interval over the task's cases."""
    by_phase = {phase: aggregate(((c.task, getattr(c, phase)) for c in results), PHASES[phase], intervals=True) for phase in phases}
    return {task: {phase: by_phase[phase].get(task, {}) for phase in phases} for task in dict.fromkeys(c.task for c in results)}


def _restoration_mode(sequential: bool, fast_path: bool, generation: bool, together: bool = False, rounds: int = 1) -> str:
    if sequential:
        return "sequential: kept, restored at the end"
    if fast_path and rounds > 1:  # the rounds are made beside the model or written and rolled back (``rounds_result``)
        return (f"each edit made in {rounds} rounds, each with the rounds before it added by hooks (written into the weights "
                f"and rolled back at once where a round has no thin factors or the weights are half precision); functional "
                f"scoring{', post-edit answers decoded with per-row weight updates' if together else ''}")
    if fast_path and together:
        return "functional (weights never written; post-edit answers decoded with per-row weight updates)"
    if fast_path:
        return "functional scoring; edited weights written for generation, rolled back per case" if generation else \
            "functional (weights never written)"
    return "in place, rolled back per case"
