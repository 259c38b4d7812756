"""Generation scores of an editor on a few records, for training validation: does the edited model say the answer?

Per record (ConvSent has no single answer and is left out): the edit is written into the model,
the wrapped edit prompt and the raw locality prompt are answered greedily (``generation``), and the
weights are restored bit for bit. Reliability is exact match with the target; locality is whether
the locality answer is the one the unedited model gave.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from instructedit.editors.base import apply_in_place
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.generation import answer_budget, exact_match, first_line, greedy_generate, normalize_answer
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator, PromptTooLongError


def generation_scores(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: MENDEditor, collator: Collator,
                      records: Sequence[EditRecord], instructions: Sequence[int | None]) -> dict[str, float]:
    """Mean generation reliability (exact match, wrapped prompt) and generation locality over ``records``, with n."""
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
        return {"gen_n": 0}
    device = next(model.parameters()).device
    loc = [(r.locality[0].prompt, answer_budget(tokenizer, r.locality[0].answer)) for r, _, _ in cases]
    pre_loc = greedy_generate(model, tokenizer, [p for p, _ in loc], [b for _, b in loc])
    was_training = editor.training
    editor.eval()
    rel, same = [], []
    try:
        for (record, prompt, batch), (loc_prompt, loc_budget), before in zip(cases, loc, pre_loc):
            result = editor.edit(model, batch.to(device))
            with apply_in_place(model, result), torch.no_grad():
                said, after = greedy_generate(model, tokenizer, [prompt, loc_prompt], [answer_budget(tokenizer, record.target_new), loc_budget])
            rel.append(exact_match(first_line(said), record.target_new))
            same.append(float(normalize_answer(first_line(after)) == normalize_answer(first_line(before))))
    finally:
        editor.train(was_training)
    return {"gen_reliability": sum(rel) / len(rel), "gen_locality": sum(same) / len(same), "gen_n": len(rel)}
