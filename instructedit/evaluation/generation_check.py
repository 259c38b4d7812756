"""Generation scores of an editor on a few records, for training validation: does the edited model say the answer?

Per record (ConvSent has no single answer and is left out): the model with the record's edit
answers the edit prompt in each of its edit forms (the wrapped prompt; the chat question) and the raw locality prompt greedily (``generation``); the edit is
added by hooks, row by row, and the weights are never written. Reliability is exact match with the target; locality is whether
the locality answer is the one the unedited model gave.

``choose_scale`` calibrates the editor's step sizes α for generation: the meta-objective is
teacher-forced, and the α it learns can be too small for the edit to win the first answer token
when the model decodes by itself. Among a few multipliers of α, it picks the one with the highest
generation reliability whose generation locality stays at or above a floor, on validation records.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from instructedit.editors.base import EditResult, scaled_step_sizes
from instructedit.editors.rounds import rounds_result
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.before_after import greedy_before_after
from instructedit.evaluation.generation import answer_budget, bootstrap_ci, exact_match, first_line, in_frame_budget, same_answer
from instructedit.evaluation.generation_probes import in_frame_neighbours
from instructedit.models.architectures import transposed_of
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator, PromptTooLongError


CASES_TOGETHER = 8  # records whose edits are held at once; their queries decode in one batch, each row with its own edit


def generation_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: MENDEditor, collator: Collator,
                      records: Sequence[EditRecord], instructions: Sequence[int | None],
                      scales: Sequence[float] = (1.0,), progress: bool = False, intervals: bool = False,
                      rounds: int = 1, in_frame: bool = False) -> dict[float, dict]:
    """Per α multiplier: mean generation reliability and generation locality over ``records``, with n; with
    ``intervals``, also ``ci``: each rate's 95 % bootstrap interval over the records, ``{name: [low, high]}``.

    Reliability is exact match on the edit's prompt in each of the collator's edit forms (the wrapped prompt; with
    ``edit_forms`` [wrapped, plain, chat] also the bare and the chat question, then ``gen_reliability`` is the mean of the forms' and each is
    reported as ``gen_reliability_<form>``).

    Each record's edit is computed once: the update is linear in α, so a multiplier scales it. The
    queries of ``CASES_TOGETHER`` records decode together, unedited and at every multiplier, from one
    prefill (``before_after``), every row with its own record's scaled update added by hooks
    (``row_edits``); the model's weights are never written.

    ``rounds`` > 1: each edit is made in that many rounds (``editors.rounds.rounds_result``, as ``apply`` makes them, each
    round with the rounds before it added by hooks), once per multiplier: later rounds start from the earlier ones'
    edits, so the update is no longer linear in α.

    ``in_frame``: also in-frame locality, ``gen_locality_in_frame``: whether another record's question (the next record of
    the same task, ``in_frame_neighbours``), asked in each of the edit's forms and frame (wrapped in the edit's
    instruction), gets the answer it got from the unedited model (the mean of the forms', each reported as
    ``gen_locality_in_frame_<form>``), and ``gen_in_frame_target``: the share of those answers that now say the edit's
    target. The paper's locality asks raw locality prompts only; an edit made in the instruction's frame can change the
    answers to other questions asked in that frame far more (results/analysis/plain-edit-row/many-edit-forms/).
    """
    cases = []
    forms = collator.edit_forms
    for record, index in zip(records, instructions, strict=True):
        if record.convsent is not None or not record.locality:
            continue
        pairs = collator.edit_pairs(record, index)  # one per edit form (the bare and the wrapped prompt once without an instruction)
        try:
            batch = collator.qa_batch(pairs, record.source, stop=True)
        except PromptTooLongError:
            continue
        cases.append((record, [collator.form_prompt(record, form, index) for form in forms], batch, index))  # one question per form
    if not cases:
        return {scale: {"gen_n": 0} for scale in scales}
    neighbours = in_frame_neighbours([case[0] for case in cases]) if in_frame and len(cases) > 1 else None
    if neighbours is not None:  # each case also asks its neighbour's question in each of its own forms
        cases = [(record, [*asked, *(collator.form_prompt(record, form, index, cases[k][0].prompt) for form in forms)], batch, index)
                 for (record, asked, batch, index), k in zip(cases, neighbours, strict=True)]
    device = next(model.parameters()).device
    split = editor.split(model)
    transposed = transposed_of(editor.weights)
    # the edit's prompt in each form, the locality prompt, then (in_frame) the neighbour's question in each form
    per_case = len(forms) + 1 + (len(forms) if neighbours is not None else 0)
    said_in: dict[float, dict[str, list[float]]] = {scale: {form: [] for form in forms} for scale in scales}
    same: dict[float, list[float]] = {scale: [] for scale in scales}
    kept_in: dict[float, dict[str, list[float]]] = {scale: {form: [] for form in forms} for scale in scales}
    took: dict[float, list[float]] = {scale: [] for scale in scales}  # neighbours' answers now saying the edit's target
    was_training = editor.training
    editor.eval()
    try:
        for start in tqdm(range(0, len(cases), CASES_TOGETHER), desc="generation at each multiplier", unit="group", disable=not progress):
            group = range(start, min(start + CASES_TOGETHER, len(cases)))
            # edits made as evaluate and apply make them, without gradients: a least-squares editor's thin float64 solve
            # (with gradients on, its dense float32 d_in-sized one, and a graph kept until _detached)
            with torch.no_grad():
                if rounds == 1:  # the update is linear in α: one per record, which each multiplier scales
                    updates = [[_detached(editor.edit(model, cases[i][2].to(device))) for i in group]] * len(scales)
                    variant_scales = scales
                else:  # in rounds: made anew at each multiplier
                    updates, variant_scales = [], None
                    for scale in scales:
                        with scaled_step_sizes(editor, scale):
                            updates.append([_detached(rounds_result(editor, model, cases[i][2].to(device), rounds)) for i in group])
            records = [cases[i][0] for i in group]
            prompts = [q for i in group for q in (*cases[i][1][: len(forms)], cases[i][0].locality[0].prompt, *cases[i][1][len(forms) :])]
            budgets = []
            for i, record in zip(group, records, strict=True):
                budgets += [answer_budget(tokenizer, record.target_new)] * len(forms) + [answer_budget(tokenizer, record.locality[0].answer)]
                if neighbours is not None:  # the neighbour's question in this edit's frame
                    budgets += [in_frame_budget(tokenizer, cases[neighbours[i]][0].target_new, record.target_new)] * len(forms)
            before, after = greedy_before_after(model, tokenizer, split, prompts, budgets, lambda variant, row: updates[variant][row // per_case],
                                                transposed, len(scales), variant_scales=variant_scales)
            for scale, said in zip(scales, after, strict=True):
                for j, record in enumerate(records):
                    for f, form in enumerate(forms):
                        said_in[scale][form].append(exact_match(first_line(said[per_case * j + f]), record.target_new))
                    same[scale].append(float(same_answer(said[per_case * j + len(forms)], before[per_case * j + len(forms)])))
                    if neighbours is not None:
                        rows = range(per_case * j + len(forms) + 1, per_case * (j + 1))
                        for form, row in zip(forms, rows, strict=True):
                            kept_in[scale][form].append(float(same_answer(said[row], before[row])))
                        took[scale].append(sum(exact_match(first_line(said[row]), record.target_new) for row in rows) / len(forms))
    finally:
        editor.train(was_training)
    scores: dict[float, dict[str, float]] = {}
    for scale in scales:
        by_form = {form: sum(v) / len(cases) for form, v in said_in[scale].items()}
        scores[scale] = {"gen_reliability": sum(by_form.values()) / len(forms), "gen_locality": sum(same[scale]) / len(cases),
                         "gen_n": len(cases)} | _each_form("gen_reliability", by_form)
        if neighbours is not None:
            kept_by_form = {form: sum(v) / len(cases) for form, v in kept_in[scale].items()}
            scores[scale] |= {"gen_locality_in_frame": sum(kept_by_form.values()) / len(forms),
                              "gen_in_frame_target": sum(took[scale]) / len(cases)} | _each_form("gen_locality_in_frame", kept_by_form)
        if intervals:
            per_case = {"gen_reliability": _form_means(said_in[scale]), "gen_locality": same[scale]} | _each_form("gen_reliability", said_in[scale])
            if neighbours is not None:
                per_case |= {"gen_locality_in_frame": _form_means(kept_in[scale]),
                             "gen_in_frame_target": took[scale]} | _each_form("gen_locality_in_frame", kept_in[scale])
            scores[scale]["ci"] = {name: [(ci := bootstrap_ci(v)).low, ci.high] for name, v in per_case.items()}
    return scores


def _each_form(name: str, per_form: dict[str, Any]) -> dict[str, Any]:
    """``name_<form>`` for each form's value where there are several forms (``name`` is then their mean), else nothing."""
    return {f"{name}_{form}": v for form, v in per_form.items()} if len(per_form) > 1 else {}


def _form_means(per_form: dict[str, list[float]]) -> list[float]:
    """Per case, the mean of its values over the forms (``per_form``: per form, one value per case)."""
    return [sum(v) / len(per_form) for v in zip(*per_form.values(), strict=True)]


def _detached(result: EditResult) -> dict:
    """The edit's updates for ``row_edits`` (its low-rank factors where it has them), detached."""
    if result.low_rank is not None:
        return {k: (a.detach(), b.detach()) for k, (a, b) in result.low_rank.items()}
    return {k: v.detach() for k, v in result.updates.items()}


def floors_missed(scores: dict[str, float], locality_floor: float, in_frame_floor: float = 0.0) -> dict[str, tuple[float, float]]:
    """The locality rates of ``scores`` under their floors, ``{name: (rate, floor)}``: ``gen_locality`` under
    ``locality_floor`` and, where it was measured, ``gen_locality_in_frame`` under ``in_frame_floor`` (empty: both met)."""
    rates = (("gen_locality", scores["gen_locality"], locality_floor), ("gen_locality_in_frame", scores.get("gen_locality_in_frame"), in_frame_floor))
    return {name: (rate, floor) for name, rate, floor in rates if rate is not None and rate < floor}


def selection_score(scores: dict[str, float], locality_floor: float, in_frame_floor: float = 0.0) -> float:
    """Higher is better: any result at or above the locality floor (and, where it was measured, the in-frame locality floor:
    ``gen_locality_in_frame``) scores 1 + reliability and beats any below them, which scores the lowest of the rates that
    miss their floor."""
    missed = floors_missed(scores, locality_floor, in_frame_floor)
    return min(rate for rate, _ in missed.values()) if missed else 1.0 + scores["gen_reliability"]


def choose_scale(per_scale: dict[float, dict[str, float]], locality_floor: float, in_frame_floor: float = 0.0) -> float:
    """The α multiplier with the best ``selection_score`` (the smallest one on ties)."""
    return max(sorted(per_scale), key=lambda s: (selection_score(per_scale[s], locality_floor, in_frame_floor), -s))


def validation_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: MENDEditor, collator: Collator,
                      records: Sequence[EditRecord], instructions: Sequence[int | None], scales: Sequence[float],
                      locality_floor: float) -> dict[str, float]:
    """Generation reliability / locality on validation records at the α multiplier of ``scales`` that validates best
    (as ``edit_scale``), and, when several are tried, every multiplier's scores as ``gen_reliability@1.5`` etc."""
    per_scale = generation_scores(model, tokenizer, editor, collator, records, instructions, scales)
    scale = choose_scale(per_scale, locality_floor)
    if not per_scale[scale].get("gen_n"):
        return {}
    extra = {f"{k}@{s:g}": v for s, scores in per_scale.items() for k, v in scores.items() if k != "gen_n"} if len(per_scale) > 1 else {}
    return per_scale[scale] | {"edit_scale": scale} | extra
