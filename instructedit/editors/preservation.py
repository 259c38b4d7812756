"""Preservation samples for least-squares editors: the keys of (prompt, continuation) texts a ``KeyMemory`` holds still
(``key_memory``), continued with their data answers or with what the unedited model says to them (``own_answers``,
``continuation_batch``). Used by ``calibrate --preserve``, the key memories of ``edit`` / ``evaluate`` / ``analyze`` and
``apply(neighbours=...)``."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn
from transformers import PreTrainedTokenizerBase

from instructedit.config import PRESERVE_ANSWERS
from instructedit.editors.aggregation import KeyMemory, check_remembers
from instructedit.editors.base import Editor
from instructedit.records import TokenBatch
from instructedit.tasks.collate import IGNORE, Collator, PromptTooLongError


def key_memory(editor: Editor, model: nn.Module, collator: Collator, texts: Sequence[tuple[str, str]], past_weight: float = 1.0,
               text_weight: float = 0.0, batch_size: int = 16, answers: str = "data", keys: str = "all",
               progress: str | None = None) -> KeyMemory:
    """A ``KeyMemory`` for lifelong editing with ``editor`` (least squares): earlier edits' keys weighted ``past_weight``
    and, when ``texts`` are given, their (prompt, continuation) keys' mean covariance counted as ``text_weight`` tokens.

    ``answers``: "data" continues each prompt with its answer; "model" with what the unedited ``model`` says to it
    (``own_answers``: greedy, as generation locality asks), so the keys held still are those its own answers pass;
    "both": each prompt twice, once with each.
    ``keys``: "all" holds every position's key still; "answer" only those of the positions that predict the answer
    (the prompt's last and the answer's but its last), where what the model says is decided. ``progress``: a progress bar
    with this label while the model's answers are decoded (answers "model" or "both": about 1.5 minutes for the recommended
    editor's 669 texts on two CPU cores)."""
    check_remembers(editor)
    if answers not in PRESERVE_ANSWERS:
        raise ValueError(f"answers must be one of {', '.join(PRESERVE_ANSWERS)}, got {answers!r}")
    memory = KeyMemory(past_weight, text_weight)
    if texts:
        device = next(model.parameters()).device
        batches = []
        # batched in order of length, so that little of each batch is padding (the covariance is a mean over every text's
        # tokens, whatever the order)
        if answers in ("data", "both"):
            by_length = sorted(texts, key=lambda t: len(t[0]) + len(t[1]))
            batches += [collator.qa_batch(by_length[i : i + batch_size]).to(device) for i in range(0, len(by_length), batch_size)]
        if answers in ("model", "both"):
            said = sorted(own_answers(model, collator.tokenizer, texts, progress), key=lambda row: len(row[0]) + len(row[1]))
            batches += [continuation_batch(collator, said[i : i + batch_size]).to(device) for i in range(0, len(said), batch_size)]
        editor.preserve_text(model, memory, batches, keys)
    return memory


def own_answers(model: nn.Module, tokenizer: PreTrainedTokenizerBase, texts: Sequence[tuple[str, str]],
                progress: str | None = None) -> list[tuple[list[int], list[int]]]:
    """(prompt token ids, the token ids ``model`` says to it) per text, decoded as generation locality decodes (greedy,
    the budget of the text's answer, stopping at EOS, left out, or a newline, kept); ``progress``: a bar's label."""
    from instructedit.evaluation.generation import answer_budget, greedy_generate

    prompts = [prompt for prompt, _ in texts]
    said = greedy_generate(model, tokenizer, prompts, [answer_budget(tokenizer, answer) for _, answer in texts], token_ids=True,
                           progress=progress)
    return [(tokenizer(prompt)["input_ids"], ids) for prompt, ids in zip(prompts, said, strict=True)]


def continuation_batch(collator: Collator, rows: Sequence[tuple[list[int], list[int]]]) -> TokenBatch:
    """Right-padded (prompt ids, continuation ids) rows (``own_answers``) as the model reads them while it decodes:
    every token but the continuation's last, labelled with the continuation's tokens; an empty continuation leaves the
    prompt alone, unlabelled."""
    for prompt, said in rows:
        if len(prompt) + len(said) > collator.max_length:
            raise PromptTooLongError(f"preservation text {collator.tokenizer.decode(prompt)[:50]!r}...: {len(prompt) + len(said)} "
                                     f"tokens exceed model.max_length={collator.max_length}")
    return collator.right_padded([((prompt + said)[:-1], [IGNORE] * (len(prompt) - 1) + said) if said else (prompt, [])
                                  for prompt, said in rows])
