"""Generation scores of an editor on a few records, for training validation: does the edited model say the answer?

Per record (ConvSent has no single answer and is left out): the edit is written into the model,
the wrapped edit prompt and the raw locality prompt are answered greedily (``generation``), and the
weights are restored bit for bit. Reliability is exact match with the target; locality is whether
the locality answer is the one the unedited model gave.

``choose_scale`` calibrates the editor's step sizes α for generation: the meta-objective is
teacher-forced, and the α it learns can be too small for the edit to win the first answer token
when the model decodes by itself. Among a few multipliers of α, it picks the one with the highest
generation reliability whose generation locality stays at or above a floor, on validation records.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from instructedit.editors.base import apply_in_place
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.generation import answer_budget, exact_match, first_line, greedy_generate, normalize_answer
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator, PromptTooLongError


@contextmanager
def scaled_step_sizes(editor: MENDEditor, scale: float) -> Iterator[MENDEditor]:
    """The editor with its step sizes α multiplied by ``scale`` inside the block, restored bit for bit after it."""
    if scale == 1.0:
        yield editor
        return
    original = editor.edit_lrs.detach().clone()
    with torch.no_grad():
        editor.edit_lrs.mul_(scale)
    try:
        yield editor
    finally:
        with torch.no_grad():
            editor.edit_lrs.copy_(original)


def generation_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: MENDEditor, collator: Collator,
                      records: Sequence[EditRecord], instructions: Sequence[int | None],
                      scales: Sequence[float] = (1.0,)) -> dict[float, dict[str, float]]:
    """Per α multiplier: mean generation reliability (exact match, wrapped prompt) and generation locality over ``records``, with n."""
    cases = []
    for record, index in zip(records, instructions, strict=True):
        if record.convsent is not None or not record.locality:
            continue
        prompt = collator.wrap(record, record.prompt, index)
        try:
            batch = collator.qa_batch([(prompt, record.target_new)], record.source, stop=True)
        except PromptTooLongError:
            continue
        cases.append((record, prompt, batch))
    if not cases:
        return {scale: {"gen_n": 0} for scale in scales}
    device = next(model.parameters()).device
    loc = [(r.locality[0].prompt, answer_budget(tokenizer, r.locality[0].answer)) for r, _, _ in cases]
    pre_loc = greedy_generate(model, tokenizer, [p for p, _ in loc], [b for _, b in loc])
    was_training = editor.training
    editor.eval()
    out = {}
    try:
        for scale in scales:
            rel, same = [], []
            with scaled_step_sizes(editor, scale):
                for (record, prompt, batch), (loc_prompt, loc_budget), before in zip(cases, loc, pre_loc):
                    result = editor.edit(model, batch.to(device))
                    with apply_in_place(model, result), torch.no_grad():
                        said, after = greedy_generate(model, tokenizer, [prompt, loc_prompt],
                                                      [answer_budget(tokenizer, record.target_new), loc_budget])
                    rel.append(exact_match(first_line(said), record.target_new))
                    same.append(float(normalize_answer(first_line(after)) == normalize_answer(first_line(before))))
            out[scale] = {"gen_reliability": sum(rel) / len(rel), "gen_locality": sum(same) / len(same), "gen_n": len(rel)}
    finally:
        editor.train(was_training)
    return out


def selection_score(scores: dict[str, float], locality_floor: float) -> float:
    """Higher is better: any result at or above the locality floor (1 + reliability) beats any below it (its locality)."""
    if scores["gen_locality"] >= locality_floor:
        return 1.0 + scores["gen_reliability"]
    return scores["gen_locality"]


def choose_scale(per_scale: dict[float, dict[str, float]], locality_floor: float) -> float:
    """The α multiplier with the best ``selection_score`` (the smallest one on ties)."""
    return max(sorted(per_scale), key=lambda s: (selection_score(per_scale[s], locality_floor), -s))
