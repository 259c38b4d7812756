"""The one tokenize/collate module: prompt + answer inputs with answer-only labels, and meta-batches.

Padding is on the right everywhere (decided here, once). Labels are stored shifted: the input is the
sequence without its last token and ``labels[t]`` is the token that follows position t, so the
logits at t are scored against ``labels[t]`` directly.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from transformers import PreTrainedTokenizerBase

from instructedit.config import ANSWER_STOPS, EDIT_FORMS, check_edit_forms
from instructedit.records import EditRecord, MetaBatch, QAItem, TokenBatch
from instructedit.tasks.instructions import InstructionPool

IGNORE = -100


class PromptTooLongError(ValueError):
    """An input does not fit into ``model.max_length`` tokens."""


def encode_answer(tokenizer: PreTrainedTokenizerBase, prompt: str, answer: str) -> tuple[list[int], int]:
    """Token ids of ``prompt + " " + answer`` (``prompt + answer`` after a prompt that ends in whitespace, e.g. a chat
    template's opened assistant turn, where the answer's first token is the one without a leading space) and the
    number of prompt tokens.

    The prompt is tokenized as the tokenizer does by default (BOS included where it adds one); the
    answer is taken from the joint tokenization when the prompt's tokens are a prefix of it, else
    tokenized on its own *without special tokens*, so a BOS never lands inside the labels.
    """
    answer = answer.strip()
    if not answer:
        raise ValueError(f"empty answer for prompt {prompt[:60]!r}")
    prompt_ids = tokenizer(prompt)["input_ids"]
    if not prompt_ids:  # no position would predict the first answer token: the labels could not be shifted
        raise ValueError(f"empty prompt for answer {answer[:60]!r}: the answer needs a prompt token before it")
    sep = "" if prompt[-1:].isspace() else " "
    joint = tokenizer(f"{prompt}{sep}{answer}")["input_ids"]
    if joint[: len(prompt_ids)] == prompt_ids and len(joint) > len(prompt_ids):
        answer_ids = joint[len(prompt_ids) :]
    else:
        answer_ids = tokenizer(f"{sep}{answer}", add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and answer_ids and answer_ids[-1] == eos and not answer.endswith(tokenizer.eos_token or "\0"):
        answer_ids = answer_ids[:-1]  # tokenizers that append EOS by default: keep it out of the labels
    return prompt_ids + answer_ids, len(prompt_ids)


def chat_query(tokenizer: PreTrainedTokenizerBase, question: str) -> str | None:
    """The chat form of a question (the user turn, the assistant turn opened), or None without a chat template; without
    the template's own BOS when the tokenizer adds one anyway (it would be doubled)."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    text = tokenizer.apply_chat_template([{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True)
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def turn_end_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """The token the tokenizer's chat template closes an assistant turn with (SmolLM2's ``<|im_end|>``): the first token of
    what the template writes after the assistant's answer; the EOS token where it writes only whitespace or nothing."""
    mark = "\x1fanswer\x1f"
    text = tokenizer.apply_chat_template([{"role": "user", "content": "?"}, {"role": "assistant", "content": mark}], tokenize=False)
    after = text[text.rindex(mark) + len(mark) :]
    ids = tokenizer(after, add_special_tokens=False)["input_ids"] if after.strip() else []
    if ids:
        return ids[:1]
    if tokenizer.eos_token_id is None:
        raise ValueError("answer_stop 'newline+turn' / 'newline+end': the chat template ends an assistant turn with nothing and the "
                         "tokenizer has no EOS token")
    return [tokenizer.eos_token_id]


class Collator:
    """Turns records into padded TokenBatches / MetaBatches for one tokenizer."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int = 128,
        pool: InstructionPool | None = None,
        convsent_pairs: int = 2,
        fallback_locality: Sequence[QAItem] = (),
        answer_stop: str = "none",
        edit_forms: Sequence[str] = ("wrapped",),
    ) -> None:
        if answer_stop not in ANSWER_STOPS:
            raise ValueError(f"answer_stop {answer_stop!r} is not one of {list(ANSWER_STOPS)}")
        self.edit_forms = check_edit_forms(edit_forms)
        if "chat" in self.edit_forms and not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"edit form 'chat' needs a tokenizer with a chat template; {type(tokenizer).__name__} "
                             f"({getattr(tokenizer, 'name_or_path', '')!r}) has none: use edit_forms ['wrapped']")
        self.tokenizer = tokenizer
        self.answer_stop = answer_stop
        self.max_length = max_length
        self.pool = pool
        self.convsent_pairs = convsent_pairs
        self.fallback_locality = tuple(fallback_locality)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token")
        self.pad_id = pad
        self.stop_ids = self._stop_ids(tokenizer, answer_stop)
        self._chat_stop: tuple[str, list[int]] | None = None  # newline+turn: (the chat form's prompt suffix, the turn's end), on first use

    @staticmethod
    def _stop_ids(tokenizer: PreTrainedTokenizerBase, answer_stop: str) -> list[int]:
        """The token(s) an edit input's answer ends with, so that the edited model stops after the answer."""
        if answer_stop == "none":
            return []
        if answer_stop == "eos":
            if tokenizer.eos_token_id is None:
                raise ValueError("answer_stop 'eos': the tokenizer has no EOS token")
            return [tokenizer.eos_token_id]
        ids = tokenizer("\n", add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise ValueError(f"answer_stop 'newline': the tokenizer encodes a newline as {len(ids)} tokens, expected one")
        if answer_stop == "newline+end":
            if tokenizer.eos_token_id is None:
                raise ValueError("answer_stop 'newline+end': the tokenizer has no EOS token to end the answer's text with")
            return ids + [tokenizer.eos_token_id]
        return ids

    def stop_for(self, prompt: str) -> list[int]:
        """The stop token(s) of an edit input's answer after ``prompt``: ``stop_ids``, except with ``answer_stop``
        newline+turn or newline+end, where a chat-form prompt (``chat_query``'s) gets the end of the assistant's turn
        (``turn_end_ids``), so that the edited model closes its turn after the answer instead of going on line after line
        (newline+end's ``stop_ids``, the other forms', are a newline and EOS: their text ends too)."""
        if self.answer_stop not in ("newline+turn", "newline+end") or not getattr(self.tokenizer, "chat_template", None):
            return self.stop_ids
        if self._chat_stop is None:
            mark = "\x1fquestion\x1f"
            opened = chat_query(self.tokenizer, mark) or ""
            self._chat_stop = (opened[opened.rindex(mark) + len(mark) :], turn_end_ids(self.tokenizer))
        suffix, turn_end = self._chat_stop
        return turn_end if suffix and prompt.endswith(suffix) else self.stop_ids

    # -- single inputs -------------------------------------------------------------------------
    def wrap(self, record: EditRecord, prompt: str, instruction: int | None) -> str:
        """The instruction-wrapped prompt, or the raw prompt when ``instruction`` is None."""
        if instruction is None:
            return prompt
        if self.pool is None:
            raise ValueError("an instruction index was given but the collator has no instruction pool")
        return self.pool.render(record, prompt, instruction)

    def edit_pairs(self, record: EditRecord, instruction: int | None, forms: Sequence[str] | None = None) -> list[tuple[str, str]]:
        """The edit inputs (edit_inner) of ``record``, one per edit form (``forms``, default ``edit_forms``): the wrapped
        prompt + target (ConvSent: the first k target responses, the wrapped form only: it has no single answer), the bare
        prompt + target (without an instruction it is the wrapped input, made once) and the chat form of the prompt + target."""
        if record.convsent is not None:
            return [(self.wrap(record, record.prompt, instruction), r) for r in record.convsent.target_responses[: self.convsent_pairs]]
        forms = self.edit_forms if forms is None else check_edit_forms(forms)
        prompts = [self.form_prompt(record, form, instruction) for form in forms]
        return [(prompt, record.target_new) for prompt in dict.fromkeys(prompts)]

    def form_prompt(self, record: EditRecord, form: str, instruction: int | None, question: str | None = None) -> str:
        """The edit prompt of ``record`` in edit form ``form`` (``EDIT_FORMS``): wrapped in the instruction, bare, or as a
        chat user turn. ``question``: another question asked in ``record``'s frame instead of its prompt (in-frame locality)."""
        prompt = record.prompt if question is None else question
        if form == "wrapped":
            return self.wrap(record, prompt, instruction)
        if form == "plain":
            return prompt
        if form == "chat":
            chat = chat_query(self.tokenizer, prompt)
            if chat is None:
                raise ValueError(f"edit form 'chat' needs a tokenizer with a chat template ({record.source})")
            return chat
        raise ValueError(f"unknown edit form {form!r}; valid forms: {list(EDIT_FORMS)}")

    def loss_forms(self, record: EditRecord, edit_loss_on: str, instruction: int | None) -> list[str]:
        """The edit prompt in the forms ``edit_loss_on`` adds to the post-edit loss after the rephrase: the bare question
        ('+plain', when an instruction wraps the others) and the chat form ('+chat': ``chat_query``, the question as the
        user turn, the target as the assistant's answer; only where the tokenizer has a chat template)."""
        forms = edit_loss_on.split("+")[1:]
        prompts = []
        if "plain" in forms and instruction is not None:
            prompts.append(record.prompt)
        chat = chat_query(self.tokenizer, record.prompt) if "chat" in forms else None
        if chat is not None:
            prompts.append(chat)
        return prompts

    def qa_batch(self, pairs: Sequence[tuple[str, str]], where: str = "", stop: bool | Sequence[bool] = False) -> TokenBatch:
        """Right-padded batch of ``prompt + " " + answer`` with labels on the answer tokens only.

        ``stop`` (one flag, or one per pair): the answer is followed by the collator's stop token
        (``answer_stop``), labelled too. Edit inputs carry it; teacher-forced probes do not.
        """
        if not pairs:
            raise ValueError(f"{where or 'qa_batch'}: no inputs to collate")
        stops = [stop] * len(pairs) if isinstance(stop, bool) else list(stop)
        rows = []
        for (prompt, answer), with_stop in zip(pairs, stops, strict=True):
            ids, n_prompt = encode_answer(self.tokenizer, prompt, answer)
            if with_stop:
                ids = ids + self.stop_for(prompt)
            if len(ids) > self.max_length:
                raise PromptTooLongError(
                    f"{where or 'input'}: {len(ids)} tokens (prompt {prompt[:50]!r}...) exceed model.max_length={self.max_length}"
                )
            labels = [IGNORE] * (n_prompt - 1) + ids[n_prompt:]  # shifted: position t predicts ids[t+1]
            rows.append((ids[:-1], labels))
        return self.right_padded(rows)

    def right_padded(self, rows: Sequence[tuple[Sequence[int], Sequence[int]]]) -> TokenBatch:
        """A ``TokenBatch`` of (input ids, labels) rows, each labels list as long as its ids or shorter (already shifted:
        position t is scored against labels[t]; ``IGNORE`` where nothing is), right-padded to the longest."""
        width = max(len(r[0]) for r in rows)
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        for i, (ids, lab) in enumerate(rows):
            input_ids[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
            attention[i, : len(ids)] = 1
            labels[i, : len(lab)] = torch.tensor(lab, dtype=torch.long)
        return TokenBatch(input_ids, attention, labels)

    # -- meta-training -------------------------------------------------------------------------
    def locality_item(self, record: EditRecord) -> QAItem:
        """The record's first locality probe, else a fixed one drawn from the fallback pool."""
        if record.locality:
            return record.locality[0]
        if not self.fallback_locality:
            raise ValueError(f"record {record.source} has no locality item and the collator has no fallback pool")
        return random.Random(record.source or record.prompt).choice(self.fallback_locality)

    def meta_batch(
        self,
        records: Sequence[EditRecord],
        instructions: Sequence[int | None],
        edit_loss_on: str = "rephrase",
        locality_frames: Sequence[str] = ("raw",),
    ) -> MetaBatch:
        """edit_inner / edit_outer / loc (and ConvSent's unlikely) inputs for ``records``.

        ``edit_loss_on`` (``config.EDIT_LOSS_ON``): edit_outer is the wrapped rephrase (the edit input without one),
        the wrapped edit input, or the rephrase and the edit prompt in more forms (``loss_forms``), so that the edit
        also holds when the model is asked as a chat assistant, or the question bare.
        ``locality_frames`` (``config.LOCALITY_FRAMES``): each record's locality question as it is ("raw") and/or in the
        record's own instruction frame ("wrapped": where a user of the edit asks other questions), one loc row each
        (a record without an instruction has one frame: its raw row)."""
        inner, outer, loc, unlikely = [], [], [], []
        for record, idx in zip(records, instructions, strict=True):
            wrapped = self.wrap(record, record.prompt, idx)
            inner += self.edit_pairs(record, idx)
            if record.convsent is not None:
                k = self.convsent_pairs
                cs = record.convsent
                held = cs.target_responses[k : 2 * k] or cs.target_responses[:k]
                outer += [(wrapped, r) for r in held]
                unlikely += [(wrapped, r) for r in cs.opposite_responses[:k]]
            elif edit_loss_on != "edit_input" and record.rephrase:
                outer.append((self.wrap(record, record.rephrase[0], idx), record.target_new))
            else:
                outer.append((wrapped, record.target_new))
            if record.convsent is None:
                outer += [(prompt, record.target_new) for prompt in self.loss_forms(record, edit_loss_on, idx)]
            item = self.locality_item(record)
            frames = dict.fromkeys(self.wrap(record, item.prompt, idx if frame == "wrapped" else None) for frame in locality_frames)
            loc += [(prompt, item.answer) for prompt in frames]
        where = ", ".join(r.source for r in records[:3])
        return MetaBatch(
            edit_inner=self.qa_batch(inner, where, stop=True),
            edit_outer=self.qa_batch(outer, where, stop=True),
            loc=self.qa_batch(loc, where),
            unlikely=self.qa_batch(unlikely, where) if unlikely else None,
            tasks=[r.task for r in records],
        )
