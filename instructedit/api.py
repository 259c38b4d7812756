"""The Python API: describe edits, load an editor, apply edits to a model (batched or sequential), restore or save it.

Over 400 lines: it is the one public surface users import, kept in one module so ``instructedit.api`` documents it whole.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import secrets
import shutil
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from instructedit.config import DEFAULT_MODEL
from instructedit.config import many_edit_forms as default_many_edit_forms
from instructedit.editors.aggregation import KeyMemory, check_remembers, remembering
from instructedit.editors.base import (
    AUTO_OUTLIER_FACTOR, EditHandle, Editor, Hold, OutlierEdits, SequentialWeightEdits, WeightEditHandle, keep_in_sequence,
    outlier_factor_for, scaled_step_sizes, sequence_edit,
)
from instructedit.editors.card import POOL_COPY, training_config
from instructedit.editors.learned import (
    AUTO_AS_SINGLE, AUTO_ROUNDS, apply_in_rounds, check_edit_rounds, check_many_edit_scale, check_rounds, many_edit_step_scale,
    schedule_for,
)
from instructedit.editors.neighbours import (
    LONG_SEQUENCE, NEIGHBOUR_ROUNDS, SAMPLE_ROUNDS, SEQUENCE_EVIDENCE, SEQUENCE_SAMPLE_ANSWERS, SEQUENCE_SAMPLE_WEIGHT, SUBJECTS_FILE,
    Neighbours, holding_neighbours, load_subjects, neighbour_memory, subject_pool, swapped_questions,
)
from instructedit.editors.preservation import key_memory
from instructedit.io import write_json
from instructedit.losses import argmax_ids
from instructedit.models.loading import MAX_LENGTH_CAP, max_input_length
from instructedit.records import SENTIMENTS, TASKS, ConvSentExtras, EditRecord, TokenBatch
from instructedit.runs import EDITOR_CONFIG
from instructedit.tasks.collate import ANSWER_STOPS, Collator, chat_query, check_edit_forms
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

EDITS_FILE = "instructedit_edits.json"  # written beside a saved edited model: which edits it carries
EditorFactory = Callable[[nn.Module, PreTrainedTokenizerBase], Editor]


REPHRASE_ALIAS = "paraphrase"  # the demo page's name for Edit.rephrase, accepted wherever an edit is read from JSON
AUTO_MEMORY = "auto"  # apply_sequential(memory=...): a new KeyMemory with neighbours, none without


def rephrase_key(fields: Mapping[str, Any]) -> str | None:
    """The key of an edit read from JSON (``edit --file``'s lines, the demo server's requests) that holds its rephrase:
    "rephrase", its alias "paraphrase" (``REPHRASE_ALIAS``), or None. Both given (not empty) raises ValueError."""
    given = [k for k in ("rephrase", REPHRASE_ALIAS) if fields.get(k)]
    if len(given) == 2:
        raise ValueError("rephrase and paraphrase are the same field (the paraphrase to ask); give one")
    return given[0] if given else None


@dataclass(frozen=True)
class Edit:
    """One fact to put into the model: ``prompt`` should be continued with ``target``.

    ``task`` picks the instruction (counterfact, wikirecent, convsent, zsre). ConvSent edits make
    the model talk about ``topic`` (default: ``subject``) with sentiment ``label``
    (positive/negative); ``target`` is then a response with that sentiment.
    """

    prompt: str
    target: str
    task: str = "counterfact"
    subject: str = ""
    rephrase: tuple[str, ...] = ()
    label: str | None = None
    topic: str | None = None

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"Edit: unknown task {self.task!r}; valid tasks: {list(TASKS)}")
        if not self.prompt.strip() or not self.target.strip():
            raise ValueError(f"Edit: prompt and target must not be empty (got {self.prompt!r} -> {self.target!r})")
        if isinstance(self.rephrase, str):
            raise ValueError("Edit: rephrase must be a tuple of strings, not one string")
        object.__setattr__(self, "rephrase", tuple(self.rephrase))
        if self.task == "convsent":
            if self.label not in SENTIMENTS:
                raise ValueError(f"Edit: a convsent edit needs label= one of {list(SENTIMENTS)}, got {self.label!r}")
            if not (self.topic or self.subject):
                raise ValueError("Edit: a convsent edit needs topic= (or subject=), the entity its opinion is about")
        elif self.label is not None or self.topic is not None:
            raise ValueError(f"Edit: label and topic belong to convsent edits, not to task {self.task!r}")

    def record(self) -> EditRecord:
        """This edit as the project's normalized ``EditRecord``."""
        convsent = None
        if self.task == "convsent":
            convsent = ConvSentExtras(topic=self.topic or self.subject, label=str(self.label), target_responses=(self.target,), opposite_responses=())
        return EditRecord(task=self.task, prompt=self.prompt, target_new=self.target, subject=self.subject,
                          rephrase=self.rephrase, convsent=convsent, source=f"Edit({self.prompt[:40]!r})")


@dataclass(frozen=True)
class TargetScore:
    """How well a model produces ``target`` after ``prompt``, teacher-forced."""

    accuracy: float  # share of target tokens that are the argmax (the paper's reliability for one case)
    probability: float  # joint probability of all target tokens
    n_tokens: int
    top: str = ""  # the most likely next token after the prompt (the argmax where the first target token is predicted)


# -- scoring and generation on any causal LM ----------------------------------------------------------


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def top_predictions(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, k: int = 5) -> list[tuple[str, float]]:
    """The ``k`` most likely next tokens after ``prompt`` with their probabilities."""
    ids = tokenizer(prompt, return_tensors="pt").to(_device(model))
    probs = model(**ids).logits[0, -1].float().softmax(-1)
    values, indices = probs.topk(k)
    return [(tokenizer.decode([int(i)]), float(v)) for v, i in zip(values, indices)]


@torch.no_grad()
def generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, text: str, max_new_tokens: int = 20) -> str:
    """Greedy continuation of ``text`` (the new text only)."""
    ids = tokenizer(text, return_tensors="pt").to(_device(model))
    out = model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id,
                         temperature=None, top_p=None, top_k=None)
    return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)


def answer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, max_new_tokens: int = 24) -> str:
    """What the model says to ``prompt``: the first line of its greedy answer (stops at EOS or a newline after text)."""
    from instructedit.evaluation.generation import first_line, greedy_generate

    return first_line(greedy_generate(model, tokenizer, [prompt], max_new_tokens)[0])


def score_target(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompt: str, target: str) -> TargetScore:
    """Teacher-forced accuracy and joint probability of ``target`` after ``prompt`` (labels as in training)."""
    return score_targets(model, tokenizer, [(prompt, target)])[0]


@torch.no_grad()
def score_targets(model: nn.Module, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[tuple[str, str]],
                  rows_context: Callable[[list[int]], AbstractContextManager] | None = None) -> list[TargetScore]:
    """``score_target`` of every (prompt, target) pair, in one batch (the vocabulary projection only where targets are
    predicted). ``rows_context(rows)``: a context the forward runs in, e.g. ``row_edits.per_row_updates`` (each row
    scored with its own edit)."""
    batch = Collator(tokenizer, max_input_length(model)).qa_batch(list(pairs)).to(_device(model))
    with rows_context(list(range(len(pairs)))) if rows_context is not None else contextlib.nullcontext():
        hidden = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).last_hidden_state
    logits = model.get_output_embeddings()(hidden[batch.label_mask]).float()
    gold = batch.labels[batch.label_mask]
    logp = logits.log_softmax(-1).gather(-1, gold[:, None]).squeeze(-1)
    argmax, rows = argmax_ids(logits), batch.label_mask.nonzero()[:, 0]
    scores = []
    for r in range(len(pairs)):
        at = rows == r
        scores.append(TargetScore(float((argmax[at] == gold[at]).float().mean()), float(logp[at].sum().exp()), int(at.sum()),
                                  tokenizer.decode([int(argmax[at][0])])))
    return scores


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    """The settings ``load_model`` gives its tokenizers: a pad token (EOS if none) and right padding."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has neither a pad nor an EOS token; set tokenizer.pad_token and pass tokenizer=")
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "right"
    return tokenizer


def tokenizer_for(model: nn.Module) -> PreTrainedTokenizerBase:
    """Load the tokenizer of ``model`` from its ``name_or_path`` (set by ``load_model`` / ``from_pretrained``): a local
    folder, else the local Hugging Face cache, else the hub under ``hub_access.hub_fetch``'s rules."""
    from instructedit.models.hub_access import HubUnreachable, hub_fetch
    from instructedit.models.loading import DEFAULT_ALIASES, default_model_dir

    name = str(getattr(model, "name_or_path", "") or getattr(getattr(model, "config", None), "_name_or_path", "") or "")
    if not name:
        raise ValueError("the model has no name_or_path to load its tokenizer from; pass tokenizer=")
    source = str(default_model_dir()) if name in DEFAULT_ALIASES else name
    local = Path(source).exists()
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not local)
    except OSError:
        try:
            tokenizer = hub_fetch(lambda local_only: AutoTokenizer.from_pretrained(source, local_files_only=local_only),
                                  f"download the tokenizer of {name!r} from the Hugging Face hub", "tokenizer=")
        except HubUnreachable:
            raise
        except OSError as err:
            raise ValueError(f"could not load the tokenizer of {name!r} ({err}); pass tokenizer=") from None
    return prepare_tokenizer(tokenizer)


def check_save_folder(directory: str | Path) -> Path:
    """``directory`` as a place ``save_edited_model`` may write: new, empty, or an earlier save (it holds ``EDITS_FILE``);
    ValueError for a file or a folder holding anything else."""
    directory = Path(directory)
    if directory.exists() and not directory.is_dir():
        raise ValueError(f"{directory} is an existing file; name a folder for the edited model")
    if directory.is_dir() and any(directory.iterdir()) and not (directory / EDITS_FILE).is_file():
        raise ValueError(f"{directory} already holds files that no earlier save of an edited model wrote (no {EDITS_FILE}); "
                         "name a new or empty folder")
    return directory


def save_edited_model(model: nn.Module, tokenizer: PreTrainedTokenizerBase, directory: str | Path,
                      about: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (with whatever edits it carries) and ``tokenizer`` as a plain Hugging Face folder, whole or not at all:
    into a new folder beside ``directory`` that then takes its place (an interrupted save leaves ``directory`` as it was).
    ``about``: written beside them as ``EDITS_FILE`` (which edits it carries; None: not recorded). ``directory`` may be new,
    empty, or an earlier save, which is replaced (``check_save_folder``): a folder holding anything else is refused, not
    mixed with the model's files."""
    directory = check_save_folder(directory)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.{secrets.token_hex(6)}.tmp")
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_json(tmp / EDITS_FILE, dict(about) if about is not None else {"applied": None, "edits": None})  # None: not recorded
        if directory.is_dir():  # an empty folder, or an earlier save: out of the way first, removed once the new one is in
            old = directory.with_name(f".{directory.name}.{secrets.token_hex(6)}.old")
            directory.rename(old)
            try:
                tmp.rename(directory)
            except OSError:
                old.rename(directory)  # the earlier save back in its place
                raise
            shutil.rmtree(old)
        else:
            tmp.rename(directory)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info("saved the edited model to %s", directory)
    return directory


# -- the edited model ---------------------------------------------------------------------------------


class EditedModel:
    """A model with edits applied in place. Leaving the ``with`` block (or ``rollback()``) restores it bit for bit."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, handles: Sequence[EditHandle], edits: Sequence[Edit],
                 how: Mapping[str, Any] | None = None) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.edits = tuple(edits)
        self._handles = list(handles)
        self._kept = False
        self._how = dict(how or {})
        # the call's key memory (``apply``'s preservation sample; ``apply_sequential``'s, passed or made for a sequence
        # with neighbours, which a later call given it goes on from)
        self.memory: KeyMemory | None = None

    @property
    def how(self) -> dict[str, Any]:
        """How the edits were applied (saved beside the model by ``save_pretrained``): the call (``apply`` or
        ``apply_sequential``), and for ``apply`` the rounds asked for and made and the preservation sample's weight."""
        how = dict(self._how)
        if how.get("call") == "apply":
            how["rounds_made"] = self.rounds_made
        return how

    @property
    def active(self) -> bool:
        """True while the edits are in the model and will be undone on exit."""
        return any(h.active for h in self._handles)

    @property
    def kept(self) -> bool:
        return self._kept

    @property
    def rounds_made(self) -> int:
        """The rounds of edits the model holds (``InstructEditor.apply(rounds=...)``: a round that raised the edits' loss
        is undone, and the rounds stop there); 1 for any other edit."""
        return max((getattr(h, "rounds_made", 1) for h in self._handles), default=1)

    def rollback(self) -> None:
        """Undo every edit, the last one first; a second call does nothing."""
        for handle in reversed(self._handles):
            handle.rollback()

    def rollback_to(self, k: int) -> None:
        """Undo the edits after the first ``k``, bit for bit, and keep the first ``k`` (``k=0``: undo all, as ``rollback()``).

        Edits from ``apply_sequential`` can be undone back to any ``k``; a batch from ``apply`` is one
        update, undone whole. For weight editors this re-applies the first ``k`` edits to the original
        weights (see ``apply_sequential``), so it costs ``k`` edit computations.
        """
        if not 0 <= k <= len(self.edits):
            raise ValueError(f"rollback_to({k}): {len(self.edits)} edits are applied")
        if k == len(self.edits) or not self.active:
            return
        if k == 0:
            self.rollback()
        elif len(self._handles) == 1 and isinstance(self._handles[0], SequentialWeightEdits):
            self._handles[0].rollback_to(k)
        elif len(self._handles) == len(self.edits):  # one handle per edit (hook editors such as GRACE)
            for handle in reversed(self._handles[k:]):
                handle.rollback()
            self._handles = self._handles[:k]
        else:
            raise ValueError(f"these {len(self.edits)} edits were applied as one batch update; only rollback() undoes it")
        self.edits = self.edits[:k]

    def weight_deltas(self) -> dict[str, torch.Tensor] | None:
        """What the edits added to each weight they wrote (edited − original, storage orientation), or None when some
        edit lives in hooks or added modules, or the edits are undone (``row_edits.per_row_updates`` takes the deltas)."""
        if not self.active or not all(isinstance(h, WeightEditHandle) for h in self._handles):
            return None
        with torch.no_grad():
            return {name: self.model.get_parameter(name).detach() - original
                    for h in self._handles for name, original in h.originals().items()}

    def keep(self) -> None:
        """Make the edits permanent: exiting the context no longer restores the model."""
        if not self.active and not self._kept:
            raise RuntimeError("the edits were already rolled back; apply them again to keep them")
        for handle in self._handles:
            handle.keep()
        self._kept = True

    def __enter__(self) -> "EditedModel":
        return self

    def __exit__(self, *exc: object) -> None:
        self.rollback()

    def generate(self, text: str, max_new_tokens: int = 20) -> str:
        """Greedy continuation of ``text`` by the model as it is now."""
        return generate(self.model, self.tokenizer, text, max_new_tokens)

    def answer(self, prompt: str, max_new_tokens: int = 24) -> str:
        """The first line of the model's greedy answer to ``prompt`` (the generation protocol's answer)."""
        return answer(self.model, self.tokenizer, prompt, max_new_tokens)

    def top_predictions(self, prompt: str, k: int = 5) -> list[tuple[str, float]]:
        return top_predictions(self.model, self.tokenizer, prompt, k)

    def score(self, prompt: str, target: str) -> TargetScore:
        return score_target(self.model, self.tokenizer, prompt, target)

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the edited model as a plain Hugging Face folder (``AutoModelForCausalLM.from_pretrained`` reloads it)."""
        if not (self.active or self._kept):
            raise RuntimeError("the edits were rolled back; save inside the `with` block or after keep()")
        hooked = sorted({type(h).__name__ for h in self._handles if not isinstance(h, (WeightEditHandle, SequentialWeightEdits))})
        if hooked:
            raise ValueError(f"edits held by {hooked} live in hooks or added modules, which save_pretrained does not keep; "
                             "only weight editors (mend, ft) can be saved as a plain Hugging Face folder")
        return save_edited_model(self.model, self.tokenizer, directory, {"applied": self.how, "edits": [asdict(e) for e in self.edits]})


# -- the editor -----------------------------------------------------------------------------------------


def sequence_memory(editor: Editor, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> KeyMemory:
    """``apply_sequential(memory="auto")``'s memory for a sequence with neighbours: a new ``KeyMemory`` whose sample is the
    texts of the editor's own preservation sample (``MENDEditor.preservation_texts``, which ``calibrate --preserve`` saves)
    continued with what ``model`` says to them as the call finds it (``SEQUENCE_SAMPLE_ANSWERS``), counted as
    ``SEQUENCE_SAMPLE_WEIGHT`` tokens; an editor without saved texts: an empty one, beside the editor's own sample."""
    texts = getattr(editor, "preservation_texts", None)
    if not texts:
        return KeyMemory()
    logger.info("the sequence's key memory: what the model says to the %d texts of the editor's own preservation sample "
                "(once per call; about 1.5 minutes for the recommended editor on two CPU cores; memory=KeyMemory() leaves "
                "the sample out)", len(texts))
    return key_memory(editor, model, Collator(tokenizer, max_input_length(model)), texts, 1.0, SEQUENCE_SAMPLE_WEIGHT,
                      answers=SEQUENCE_SAMPLE_ANSWERS)


def holds_sample(memory: KeyMemory | None) -> bool:
    """Whether ``memory`` holds a preservation sample of its own (then rounds="auto" with neighbours is ``SAMPLE_ROUNDS``)."""
    return memory is not None and memory.text_weight > 0 and bool(memory.text)


def sequence_rounds(neighbours: bool, memory: KeyMemory | None) -> int:
    """``apply_sequential(rounds="auto")``: one round per edit; with neighbours ``NEIGHBOUR_ROUNDS``, or ``SAMPLE_ROUNDS``
    where the memory holds a sample of its own (``evaluate --sequential`` decides its default so too)."""
    if not neighbours:
        return 1
    return SAMPLE_ROUNDS if holds_sample(memory) else NEIGHBOUR_ROUNDS


class InstructEditor:
    """An editor plus the task instruction its edit prompts are wrapped in (``instruction`` None: no wrapping).

    Pass a built ``editor`` (e.g. a ``MENDEditor``), or a ``factory(model, tokenizer) -> Editor`` for
    methods that are built per model (the registry baselines). ``answer_stop``: the token the edit's
    target is followed by ("newline", "eos", "newline+turn": a newline, the chat form's answer the end of the turn; "newline+end": the
    chat form's as newline+turn, the others' a newline and EOS; "none"),
    as the editor was trained or calibrated. ``edit_forms``: the forms each edit is made in, solved together ("wrapped":
    the instruction-wrapped prompt; "plain": the bare question; "chat": the question as a chat user turn).
    ``edit_rounds``: the rounds a call of a few edits is made in (``rounds="auto"``; ``calibrate --rounds`` chooses it).
    ``many_edit_scale``: the step-size multiplier of many edits, more than 16 in one call or kept one after another
    (``calibrate --rounds`` saves it: the one-round multiplier over the chosen one). ``many_edit_forms``: the forms many
    edits are made in (default ``config.many_edit_forms``: ``edit_forms`` without the bare question where another remains).
    ``subjects``: the entity pool ``apply(neighbours=...)`` swaps into an edit's question (saved with the editor by
    ``calibrate``: its training split's subjects).
    """

    def __init__(self, editor: Editor | None = None, pool: InstructionPool | None = None, instruction: int | None = None, *,
                 factory: EditorFactory | None = None, name: str = "", model_name: str = "", answer_stop: str = "none",
                 edit_forms: Sequence[str] = ("wrapped",), edit_rounds: int = 1, many_edit_scale: float = 1.0,
                 many_edit_forms: Sequence[str] | None = None, subjects: Sequence[str] | None = None) -> None:
        if (editor is None) == (factory is None):
            raise ValueError("InstructEditor needs exactly one of editor= and factory=")
        if instruction is not None and pool is None:
            raise ValueError("an instruction index needs an instruction pool")
        self._editor, self._factory = editor, factory
        self._built: tuple[int, Editor] | None = None
        self.pool, self.instruction = pool, instruction
        self.name, self.model_name = name, model_name
        self.answer_stop = answer_stop
        self.edit_forms = check_edit_forms(edit_forms)
        self.many_edit_forms = check_edit_forms(many_edit_forms) if many_edit_forms is not None else default_many_edit_forms(edit_forms)
        self.edit_rounds = check_edit_rounds(edit_rounds, "edit_rounds")
        self.many_edit_scale = check_many_edit_scale(many_edit_scale, "many_edit_scale")
        self.subjects = subject_pool(subjects) if subjects is not None else None

    def __repr__(self) -> str:
        wrap = f"instruction {self.instruction}" if self.instruction is not None else "no instruction"
        return f"InstructEditor({self.name or type(self._editor).__name__}, {wrap})"

    @property
    def editor(self) -> Editor | None:
        """The underlying editor (for a registry method: the one last built, None before the first apply)."""
        return self._editor if self._editor is not None else (self._built[1] if self._built else None)

    def editor_for(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase) -> Editor:
        """The underlying editor, on ``model``'s device (built for ``model`` when it comes from a factory)."""
        if self._editor is not None:
            if isinstance(self._editor, nn.Module):
                self._editor.to(_device(model))
            return self._editor
        if self._built is None or self._built[0] != id(model):
            self._built = (id(model), self._factory(model, tokenizer))  # type: ignore[misc]
        return self._built[1]

    def wrap(self, edit: Edit, prompt: str | None = None) -> str:
        """``prompt`` (default: the edit's own) in this editor's instruction for the edit's task."""
        text = edit.prompt if prompt is None else prompt
        if self.instruction is None or self.pool is None:
            return text
        return self.pool.render(edit.record(), text, self.instruction)

    def asked(self, edit: Edit, tokenizer: PreTrainedTokenizerBase) -> dict[str, str]:
        """The edit's question in each form a user may ask it (``generation_probes.QUERY_FORMS``): "wrapped" (in this
        editor's instruction, as edited), "plain" (the bare prompt) and, where the tokenizer has a chat template, "chat"
        (the question as the user turn, the assistant's turn opened)."""
        forms = {"wrapped": self.wrap(edit), "plain": edit.prompt}
        chat = chat_query(tokenizer, edit.prompt)
        return forms | ({"chat": chat} if chat is not None else {})

    def edit_batch(self, edits: Sequence[Edit], tokenizer: PreTrainedTokenizerBase, max_length: int = MAX_LENGTH_CAP,
                   forms: Sequence[str] | None = None) -> TokenBatch:
        """Per edit, its prompt in each edit form (``forms``, default ``edit_forms``: wrapped; the chat question) + target
        (+ the stop token), labels on the target tokens (what the editor learns from)."""
        collator, instruction = self._collator(tokenizer, max_length)
        pairs = [pair for e in edits for pair in collator.edit_pairs(e.record(), instruction, forms)]
        return collator.qa_batch(pairs, where=", ".join(e.record().source for e in edits[:3]), stop=True)

    def _collator(self, tokenizer: PreTrainedTokenizerBase, max_length: int) -> tuple[Collator, int | None]:
        """The collator this editor's edits are made with (its pool, answer stop and edit forms) and its instruction
        index (None: no wrapping)."""
        collator = Collator(tokenizer, max_length, self.pool, answer_stop=self.answer_stop, edit_forms=self.edit_forms)
        return collator, self.instruction if self.pool is not None else None

    def apply(self, model: nn.Module, edits: Edit | Sequence[Edit], tokenizer: PreTrainedTokenizerBase | None = None,
              keep: bool = False, rounds: int | str = "auto", sample_weight: float | None = None,
              progress: bool = False, memory: KeyMemory | None = None, forms: Sequence[str] | None = None,
              neighbours: Neighbours | None = None) -> EditedModel:
        """Batch editing: ONE update computed from all ``edits`` together, as the editor aggregates them.

        A MEND editor sums the edits' updates (``editor.aggregation: sum``) or solves one least-squares
        shift per weight for all of them (``least_squares``, DESIGN.md §9: any number of edits, in
        chunks of ``editor.chunk_edits``, so memory does not grow with their number).

        ``rounds`` (MEND editors): the update is computed again on the model the earlier rounds edited, ``rounds``
        times in all, so that edits one least-squares compromise shrank ask again. ``sample_weight`` (a least-squares
        editor with a preservation sample, ``instructedit calibrate --preserve``): the sample counts as this many tokens
        in this call's solves instead of its calibrated weight (restored afterwards); a heavier sample holds more of the
        model's other answers, more rounds buy the edits back. The default ``rounds="auto"``
        (``editors.learned.schedule_for``): for such an editor and more than 16 edits, ⌈√N / 2⌉ rounds with the sample
        weighted √N × (8 rounds at 16× for 256 edits), else ``edit_rounds`` as calibrated (README, "Many edits"). A call
        of more than 16 edits is made at the step sizes × ``many_edit_scale``, whatever its rounds, in ``many_edit_forms``.
        ``progress``: a bar over the rounds. The returned model's ``how`` records the call's rounds, sample weight, step-size
        multiplier and edit forms. ``forms``: the forms this call's edits are made in instead (give ``many_edit_forms``
        where edits are kept on top of earlier ones, one call after another, as ``instructedit serve`` keeps them: held-out
        ZsRE edits of the editor calibrated for the three forms, each in its calibrated rounds, kept 91.1 % of 192 other
        questions' answers after one edit, 64.6 % after two and 20.8 % after eight made in the three forms, and 96.4 / 94.8 /
        92.7 % made in wrapped + chat; ``results/analysis/plain-edit-row/many-edit-forms/``).

        ``memory`` (a least-squares MEND editor only): a ``KeyMemory(past_weight=0, text_weight=W)`` with a preservation
        sample (``editor.editor.preserve_text``) that this call's solves hold still instead of the editor's own sample,
        counted as W tokens; give ``rounds=K`` with it (``"auto"`` is fitted to the editor's own sample). For hundreds of
        edits a sample of questions holds more of the model's other answers: 256 held-out ZsRE edits in 32 rounds with the
        NQ questions of ZsRE's training file at W = 128,000 kept locality 90.0 / 90.1 % (teacher-forced / generation) and
        said 72.9 % of the edits, against 83.0 / 78.5 and 70.3 % with ``rounds="auto"`` (n = 1,024 and 256;
        ``results/analysis/edit-rounds/blocks/``). Earlier edits' keys (``past_weight``) are ``apply_sequential``'s.

        ``neighbours`` (a least-squares MEND editor; ``editors.neighbours``): each edit's question with its subject swapped
        for ``count`` other entities (``Neighbours.subjects``, default the pool saved with the editor), continued with what
        the unedited model says, held still beside the editor's own sample at ``weight`` tokens per edit; every edit needs
        a ``subject`` its prompt names. ``rounds="auto"`` is then twice the calibrated rounds. Other questions of the edit's
        relation asked in its frame keep their answers (held-out ZsRE, generation, n = 200: 82.5 against 18.5 % with the
        recommended editor, said 97.5 against 95.0 %; ``results/analysis/in-frame-locality/relation/``), at about three
        times the time per edit.

        The model is edited in place; the returned ``EditedModel`` restores it bit for bit on exit
        from its ``with`` block or on ``rollback()``, unless ``keep=True`` (or ``.keep()``).
        """
        edits, tokenizer = _as_edits(edits), tokenizer or tokenizer_for(model)
        editor = self.editor_for(model, tokenizer)
        forms = check_edit_forms(forms) if forms is not None else self.many_edit_forms if len(edits) > AUTO_AS_SINGLE else self.edit_forms
        if neighbours is not None:
            memory, rounds = self._neighbour_memory(editor, model, tokenizer, edits, forms, neighbours, memory, rounds, sample_weight)
            sample_weight = None  # the memory's own sample carries it
        if memory is not None:
            _check_call_memory(memory, rounds, sample_weight)
        batch = self.edit_batch(edits, tokenizer, max_input_length(model), forms).to(_device(model))
        rounds, sample_weight, step_scale = schedule_for(editor, len(edits), rounds, sample_weight, self.edit_rounds,
                                                         self.many_edit_scale)
        if len(edits) > 1:
            weight = (f"{memory.text_weight:g} (the memory's sample)" if memory is not None
                      else "as calibrated" if sample_weight is None else f"{sample_weight:g}")
            logger.info("%d edits in one call: %d round(s), preservation sample weight %s, step sizes x %g, made in %s", len(edits),
                        rounds, weight, step_scale, " + ".join(forms))
        with remembering(editor, memory):
            handle = apply_in_rounds(editor, model, batch, rounds, sample_weight, progress, step_scale)
        edited = EditedModel(model, tokenizer, [handle], edits,
                             {"call": "apply", "rounds": rounds,  # the sample's weight; None: the editor holds no sample
                              "sample_weight": memory.text_weight if memory is not None else sample_weight if sample_weight is not None
                              else "as calibrated" if getattr(editor, "preservation", None) is not None else None,
                              "step_scale": step_scale, "edit_forms": list(forms), **({"key_memory": {"text_weight": memory.text_weight, "text_tokens": memory.text_tokens}}
                                                          if memory is not None else {}),
                              **({"neighbours": _neighbours_how(neighbours)} if neighbours is not None else {})})
        edited.memory = memory
        if keep:
            edited.keep()
        return edited

    def _neighbour_memory(self, editor: Editor, model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit],
                          forms: Sequence[str], neighbours: Neighbours, memory: KeyMemory | None, rounds: int | str,
                          sample_weight: float | None) -> tuple[KeyMemory, int | str]:
        """``apply(neighbours=...)``'s memory (``editors.neighbours.neighbour_memory``) and rounds ("auto": twice the
        calibrated rounds, for a call of up to ``AUTO_AS_SINGLE`` edits)."""
        if memory is not None:
            raise ValueError("apply: give memory= or neighbours=, not both (neighbours build the call's memory)")
        subjects = self.neighbour_pool(neighbours, "apply")
        if rounds == AUTO_ROUNDS:
            if len(edits) > AUTO_AS_SINGLE:
                raise ValueError(f"apply(neighbours=...) of {len(edits)} edits: give rounds=K (rounds='auto' with neighbours was "
                                 f"measured for single edits; up to {AUTO_AS_SINGLE} in one call take twice the calibrated rounds)")
            rounds = NEIGHBOUR_ROUNDS * self.edit_rounds
        collator, instruction = self._collator(tokenizer, max_input_length(model))
        built = neighbour_memory(editor, model, collator, [e.record() for e in edits], forms, instruction, neighbours, subjects,
                                 sample_weight)
        return built, rounds

    def neighbour_pool(self, neighbours: Neighbours, call: str) -> tuple[str, ...]:
        """The entities ``neighbours`` swap in: their own, else the pool saved with this editor; a ValueError naming
        ``call`` where there is neither."""
        subjects = neighbours.subjects if neighbours.subjects is not None else self.subjects
        if subjects is None:
            raise ValueError(f"{call}(neighbours=...): {self.name or 'this editor'} has no subject pool saved with it ({SUBJECTS_FILE}); "
                             "give Neighbours(subjects=...) (--subjects FILE)")
        return subjects

    def _sequential_neighbours(self, editor: Editor, model: nn.Module, tokenizer: PreTrainedTokenizerBase, edits: Sequence[Edit],
                               neighbours: Neighbours) -> Callable[[Edit], Hold]:
        """``apply_sequential(neighbours=...)``: per edit, what its solve holds beside the sequence's memory
        (``editors.neighbours.holding_neighbours``), checked for every edit before the first is made."""
        check_remembers(editor)
        subjects = self.neighbour_pool(neighbours, "apply_sequential")
        for edit in edits:  # the draw's errors (no subject, a pool too small) before any edit is made
            swapped_questions(edit.prompt, edit.subject, subjects, neighbours.count, neighbours.seed)
        collator, instruction = self._collator(tokenizer, max_input_length(model))
        forms = self.many_edit_forms

        def hold_for(edit: Edit) -> Hold:
            return lambda memory: holding_neighbours(editor, model, collator, edit.record(), forms, instruction, neighbours,
                                                     subjects, memory)

        return hold_for

    def apply_sequential(self, model: nn.Module, edits: Edit | Sequence[Edit], tokenizer: PreTrainedTokenizerBase | None = None,
                         keep: bool = False, memory: KeyMemory | str | None = AUTO_MEMORY,
                         outlier_factor: float | str | None = AUTO_OUTLIER_FACTOR, neighbours: Neighbours | None = None,
                         rounds: int | str = AUTO_ROUNDS) -> EditedModel:
        """Sequential editing: one update per edit, each computed on the model as the earlier ones left it.

        Later edits can disturb earlier ones (unlike ``apply``, where all are solved at once). The
        returned ``EditedModel`` undoes all of them bit for bit (``rollback()``), or those after the
        first ``k`` (``rollback_to(k)``). Each edit is made in ``rounds`` rounds ("auto": one, two with ``neighbours``), at the
        step sizes × ``many_edit_scale`` (an
        editor calibrated for single edits in rounds: its one-round calibration's step sizes; ``how["step_scale"]``), in
        ``many_edit_forms`` (``how["edit_forms"]``).

        What the kept edits cost (weight editors: MEND, FT-L): one copy of each edited weight as it
        was before the sequence, whatever the number of edits (about 30 MiB for MEND on the default
        model), plus per edit its token ids and one CRC-32 per edited weight (kilobytes). Undoing all
        edits copies the originals back; ``rollback_to(k)`` copies them back and re-applies the first
        ``k`` edits (``k`` edit computations). Editors that add hooks or modules (GRACE, CaliNet)
        keep one undo handle per edit, which holds what that editor needs.

        ``memory`` (a least-squares MEND editor only; ``instructedit.KeyMemory``): every edit's solve holds
        the keys of the memory's earlier edits (and of its preservation text) still, then adds its own, so
        later edits disturb earlier ones and the rest of the model less (lifelong editing). Pass the same
        memory to later calls to go on from there. ``rollback_to(k)`` re-applies the first ``k`` edits
        holding what each held (a copy of the memory as the call found it, plus the kept edits before it); rollbacks leave
        the memory as the call left it. "auto" (the default): with ``neighbours`` (see below) a new memory whose sample is
        the texts of the editor's own preservation sample continued with what the model says to them, counted as 4,000
        tokens (``sequence_memory``; an editor calibrated before those texts were saved: an empty ``KeyMemory()``), none
        without; ``EditedModel.memory`` is the memory the call held (None without one).

        An edit that would move a weight by more than ``outlier_factor`` ("auto": ``NEIGHBOUR_OUTLIER_FACTOR``, 6, with
        ``neighbours``, else ``OUTLIER_FACTOR``, 50; None: no check; ``how["outlier_factor"]``) times the median change of
        the edits kept before it (relative to the weight's norm; once 8 are kept), or to
        values that are not finite, is not kept: a warning names it, the next edit goes on from the model as it was, and
        ``how["refused"]`` lists the indices of such edits (a run of the recommended editor with a key memory on held-out
        ZsRE met one at edit 404, which would have wrecked the model: held-out perplexity x10^15). The returned model's
        ``edits`` are the kept ones, and ``rollback_to(k)`` counts them.

        ``neighbours`` (a least-squares MEND editor; ``editors.neighbours``): each edit's solve also holds its
        subject-swapped questions still (as in ``apply``), continued with what the model says as the edits before it left
        it, beside the memory's keys (or the editor's own sample); ``rollback_to(k)`` holds them again. Every edit needs a
        ``subject`` its prompt names. ``rounds`` (a learned editor): each edit made in this many rounds (with a memory, its
        keys remembered once, ``KeyMemory.as_one_call``); "auto" is two with neighbours (``NEIGHBOUR_ROUNDS`` × one), four
        where the memory also holds a sample of its own (``SAMPLE_ROUNDS``; the default's does). 64
        held-out ZsRE edits kept so with the recommended editor: each said 85.9 against 73.4 % without neighbours in one
        round, 37.9 against 13.7 % of other same-relation questions asked in the frame kept, and after the 64th edit the model
        still says 67.2 against 40.6 % of them (generation, n = 64;
        ``results/analysis/in-frame-locality/sequential/neighbours/``). On CounterFact, whose relations repeat with
        conflicting targets, such sequences are unstable: in some reruns one edit moved a weight 8-13 times the median and
        the model broke by the 64th; a factor of 5 (the default with neighbours is 6) refused that edit (after 64: 45.3 and
        31.2 % said, 3.1 without neighbours), and one round each (``rounds=1``) never broke (21.9 and 37.5 %;
        ``results/analysis/in-frame-locality/sequential/neighbours/rerun/``). Over four draws of the swapped-in entities
        (``Neighbours(seed=...)``) two such sequences broke all the same (4.7 and 7.8 % said after 64) where a key memory
        beside the neighbours held in three of three (68.8, 76.6, 68.8 %; ZsRE 70.3-75.0 % in four;
        ``results/analysis/in-frame-locality/sequential/neighbours/draws/``): so ``memory="auto"`` gives a sequence with
        ``neighbours`` a new memory, and more than ``LONG_SEQUENCE`` (16) edits with neighbours and ``memory=None`` get a
        warning. A memory whose sample is the task's own questions continued with the unedited model's answers
        (``editors.preservation.key_memory(..., text_weight=4000, answers="model")``, ``rounds=4``) also keeps the
        model's other answers: 64 CounterFact edits, 78.1 % said and 63.3 % of unrelated answers kept after all 64 against
        68.8 / 31.2 without it (``results/analysis/in-frame-locality/sequential/neighbours/preservation/``); the editor's
        own texts so (the default, ``sequence_memory``) 76.6 / 58.6 (ZsRE 81.2 / 84.4 against 70.3 / 76.6).
        """
        edits, tokenizer = _as_edits(edits), tokenizer or tokenizer_for(model)
        editor = self.editor_for(model, tokenizer)
        hold_for = self._sequential_neighbours(editor, model, tokenizer, edits, neighbours) if neighbours is not None else None
        if isinstance(memory, str):
            if memory != AUTO_MEMORY:
                raise ValueError(f"memory must be a KeyMemory, None or {AUTO_MEMORY!r}, got {memory!r}")
            memory = sequence_memory(editor, model, tokenizer) if neighbours is not None else None
        if neighbours is not None and memory is None and len(edits) > LONG_SEQUENCE:
            logger.warning("%d edits kept one after another with neighbours and no key memory (memory=None): on CounterFact such "
                           "sequences broke in some draws without one and held with one (the default, memory='auto'): "
                           + SEQUENCE_EVIDENCE, len(edits))
        scale = many_edit_step_scale(editor, self.many_edit_scale)  # many edits: at the one-round step sizes
        handles: list[EditHandle] = []  # editors that add hooks or modules: one handle per edit
        rounds = check_edit_rounds(sequence_rounds(neighbours is not None, memory) if rounds == AUTO_ROUNDS else rounds, "rounds")
        check_rounds(editor, rounds)
        weights = SequentialWeightEdits(model, editor, scale, memory, rounds)
        refused: list[int] = []
        outlier_factor = outlier_factor_for(outlier_factor, neighbours is not None)
        outliers = OutlierEdits(outlier_factor) if outlier_factor is not None else None
        try:
            with remembering(editor, memory), scaled_step_sizes(editor, scale):
                for i, edit in enumerate(edits):
                    batch = self.edit_batch([edit], tokenizer, max_input_length(model), self.many_edit_forms).to(_device(model))
                    hold = hold_for(edit) if hold_for is not None else None
                    handle = sequence_edit(editor, model, batch, memory, hold, rounds)
                    if not keep_in_sequence(weights, handles, handle, batch, outliers, memory=memory, hold=hold,
                                            where=f"sequential edit {i} ({edit.prompt[:40]!r} -> {edit.target[:20]!r})"):
                        refused.append(i)
            if handles and len(weights):
                raise TypeError(f"{type(editor).__name__} returned both weight edits and hook edits; cannot keep them as one sequence")
        except BaseException:
            for handle in reversed(handles):
                handle.rollback()
            weights.rollback()
            raise
        not_kept = set(refused)
        kept = [edit for i, edit in enumerate(edits) if i not in not_kept]
        edited = EditedModel(model, tokenizer, handles or [weights], kept,
                             {"call": "apply_sequential", "key_memory": memory is not None,
                              **({"memory_sample": {"tokens": memory.text_tokens, "weight": memory.text_weight}} if holds_sample(memory) else {}),
                              "refused": refused, "step_scale": scale,
                              "rounds": rounds, "outlier_factor": outlier_factor,
                              "edit_forms": list(self.many_edit_forms),
                              **({"neighbours": _neighbours_how(neighbours)} if neighbours is not None else {})})
        edited.memory = memory
        if keep:
            edited.keep()
        return edited


def _check_call_memory(memory: KeyMemory, rounds: int | str, sample_weight: float | None) -> None:
    """What ``apply(memory=...)`` takes: a preservation sample held still in one call, with rounds chosen by the caller."""
    if not memory.text or not memory.text_weight:
        raise ValueError("apply(memory=...): the memory holds no preservation sample (KeyMemory(past_weight=0, text_weight=W), "
                         "then editor.editor.preserve_text(model, memory, batches)); one call has no earlier edits to hold")
    if memory.past_weight:
        raise ValueError(f"apply(memory=...): past_weight {memory.past_weight:g} would hold each round's own keys in the next; "
                         "one call holds only the sample (KeyMemory(past_weight=0, ...)); earlier edits' keys are apply_sequential's")
    if sample_weight is not None:
        raise ValueError("apply(memory=...): sample_weight weighs the editor's own sample, which the memory's replaces; the "
                         "memory's text_weight is the call's weight")
    if rounds == AUTO_ROUNDS:
        raise ValueError("apply(memory=...): give rounds=K; rounds='auto' is fitted to the editor's own sample (measured with a "
                         "memory: 256 edits, 32 rounds at text_weight 128000, results/analysis/edit-rounds/blocks/)")


def _neighbours_how(neighbours: Neighbours) -> dict[str, Any]:
    """What ``EditedModel.how`` records of a call's neighbours."""
    return {"count": neighbours.count, "weight": neighbours.weight, "seed": neighbours.seed}


def _as_edits(edits: Edit | Sequence[Edit]) -> tuple[Edit, ...]:
    edits = (edits,) if isinstance(edits, Edit) else tuple(edits)
    if not edits:
        raise ValueError("no edits given")
    bad = [type(e).__name__ for e in edits if not isinstance(e, Edit)]
    if bad:
        raise TypeError(f"edits must be instructedit.Edit objects, got {bad[:3]}")
    return edits


# -- loading --------------------------------------------------------------------------------------------


def _pool(pool: InstructionPool | str | Path | None) -> InstructionPool | None:
    return InstructionPool.from_file(pool) if isinstance(pool, (str, Path)) else pool


def instruction_setup(editor_dir: str | Path) -> tuple[bool | None, InstructionPool | None]:
    """Whether a saved editor was trained with instructions (None: not recorded) and the pool it used."""
    editor_dir = Path(editor_dir)
    config = training_config(editor_dir)
    if config is None:
        return None, None
    data = config.get("data") or {}
    if not data.get("instructions", True):
        return False, None
    if (editor_dir / POOL_COPY).is_file():
        return True, InstructionPool.from_file(editor_dir / POOL_COPY)
    if data.get("instruction_pool"):
        if not Path(data["instruction_pool"]).is_file():
            raise FileNotFoundError(f"{editor_dir} was trained with the instruction pool {data['instruction_pool']}, which is missing; pass pool=")
        return True, InstructionPool.from_file(data["instruction_pool"])
    return True, InstructionPool.default()


def untrained_queries() -> dict[str, Any]:
    """``query_setup``'s answer where there is no saved editor (a registry method): the pool's template, no answer stop,
    the wrapped form, one round, the step sizes as they are."""
    return {"template": None, "answer_stop": "none", "edit_forms": ["wrapped"], "edit_rounds": 1, "many_edit_scale": 1.0,
            "many_edit_forms": ["wrapped"]}


def query_setup(editor_dir: str | Path) -> dict[str, Any]:
    """How a saved editor's edits are queried and made: its template (None: the pool's), answer stop, edit forms, edit
    rounds (how many rounds a single edit is made in: 1 unless ``calibrate --rounds`` chose more) and the step-size
    multiplier of many edits, in one call or one after another (``many_edit_scale``: 1 unless ``calibrate --rounds`` chose
    more than one round), and the forms many edits are made in (``many_edit_forms``: as saved, else
    ``config.many_edit_forms`` of the edit forms).

    Read from ``editor_config.json`` (``queries``, written since the generation protocol) or else
    from the training config saved with the editor; older editors get the paper's template and no stop.
    """
    editor_dir = Path(editor_dir)
    try:
        saved = json.loads((editor_dir / EDITOR_CONFIG).read_text()).get("queries")
    except (OSError, ValueError):
        saved = None
    if isinstance(saved, dict):
        setup = {"template": saved.get("template"), "answer_stop": saved.get("answer_stop") or "none",
                 "edit_forms": saved.get("edit_forms") or ["wrapped"], "edit_rounds": saved.get("edit_rounds", 1),
                 "many_edit_scale": saved.get("many_edit_scale", 1.0), "many_edit_forms": saved.get("many_edit_forms")}
    else:
        config = training_config(editor_dir) or {}
        training = config.get("training") or {}
        setup = {"template": (config.get("data") or {}).get("template"), "answer_stop": training.get("answer_stop") or "none",
                 "edit_forms": training.get("edit_forms") or ["wrapped"], "edit_rounds": 1, "many_edit_scale": 1.0, "many_edit_forms": None}
    if setup["answer_stop"] not in ANSWER_STOPS:
        raise ValueError(f"{editor_dir}: answer_stop {setup['answer_stop']!r} is not one of {list(ANSWER_STOPS)}")
    setup["edit_forms"] = list(check_edit_forms(setup["edit_forms"], f"{editor_dir / EDITOR_CONFIG}: queries.edit_forms"))
    setup["many_edit_forms"] = list(check_edit_forms(setup["many_edit_forms"], f"{editor_dir / EDITOR_CONFIG}: queries.many_edit_forms")
                                    if setup["many_edit_forms"] is not None else default_many_edit_forms(setup["edit_forms"]))
    setup["edit_rounds"] = check_edit_rounds(setup["edit_rounds"], f"{editor_dir / EDITOR_CONFIG}: queries.edit_rounds")
    setup["many_edit_scale"] = check_many_edit_scale(setup["many_edit_scale"], f"{editor_dir / EDITOR_CONFIG}: queries.many_edit_scale")
    return setup


def _instruction_index(instruction: str | int | None, pool: InstructionPool) -> int | None:
    if instruction is None or (isinstance(instruction, str) and instruction.lower() == "none"):
        return None
    if isinstance(instruction, str) and instruction not in ("seen", "unseen") and not instruction.isdigit():
        raise ValueError(f"instruction {instruction!r} is not 'seen', 'unseen', a description index or None")
    return pool.evaluation_index(instruction)


def load_editor(source: str | Path | None = None, instruction: str | int | None = "seen", pool: InstructionPool | str | Path | None = None, *,
                method: str | None = None, options: dict[str, Any] | None = None, device: str | torch.device = "cpu",
                revision: str | None = None, token: str | None = None) -> InstructEditor:
    """A trained editor (a folder or a hub id ``org/name``), or a registry method (``method="ft"``, ``options={...}``).

    ``instruction``: "seen" (the first seen description, the default), "unseen", an index, or None.
    Edit prompts are wrapped only when the editor was trained with instructions (read from the
    training config saved with it; assumed when none is found). Registry baselines are trained
    without instructions: their prompts are wrapped only when ``pool`` is given explicitly.
    """
    from instructedit.editors.registry import EDITORS, LEARNED_EDITORS, load_trained_editor, make_editor
    from instructedit.hub import resolve_editor_dir

    if method is not None and method not in LEARNED_EDITORS:
        if source is not None:
            raise ValueError("pass either an editor folder / hub id or method=, not both")
        if method not in EDITORS:
            raise ValueError(f"unknown editing method {method!r}; valid methods: {sorted(EDITORS)}")
        opts = dict(options or {})
        explicit = _pool(pool)
        index = _instruction_index(instruction, explicit) if explicit is not None else None
        return InstructEditor(pool=explicit if index is not None else None, instruction=index, name=method,
                              factory=lambda model, tok: make_editor(method, model, tok, opts))
    source = source if source is not None else (options or {}).get("path")
    if source is None:
        raise ValueError("load_editor needs an editor folder or hub id (or method= for a registry method)")
    folder = resolve_editor_dir(source, revision=revision, token=token)
    editor = load_trained_editor(folder, device=device, method=method)
    trained_with, trained_pool = instruction_setup(folder)
    if trained_with is None:
        logger.warning("no training config found with %s: assuming it was trained with the default instructions "
                       "(pass instruction=None if it was not)", folder)
    if trained_with is False or instruction is None:
        if trained_with is False and instruction not in (None, "seen"):
            logger.warning("%s was trained without instructions: edit prompts are not wrapped", folder)
        chosen, index = None, None
    else:
        chosen = _pool(pool) or trained_pool or InstructionPool.default()
        index = _instruction_index(instruction, chosen)
    queries = query_setup(folder)
    if chosen is not None and queries["template"] and pool is None:
        chosen = dataclasses.replace(chosen, template=queries["template"])  # the template it was trained with
    return InstructEditor(editor, chosen if index is not None else None, index, name=str(source), model_name=editor.model_name,
                          answer_stop=queries["answer_stop"], edit_forms=queries["edit_forms"], edit_rounds=queries["edit_rounds"],
                          many_edit_scale=queries["many_edit_scale"], many_edit_forms=queries["many_edit_forms"],
                          subjects=load_subjects(folder))
