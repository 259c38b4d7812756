"""Same-relation neighbours held still at edit time (``InstructEditor.apply(neighbours=Neighbours())``).

An edit made in its instruction frame also changes what the model says to other questions of the edit's relation asked
in that frame: with the in-frame editor, 77-84 % of the held-out ZsRE questions that share the edit's relation wording
change, against 23 % of other relations' (``results/analysis/in-frame-locality/relation/``). Holding a few of those
questions still in the edit's own solve keeps them: the edit's question with its subject swapped for ``count`` other
subjects (drawn from a pool of entities, by default the one saved with the editor), in each form the edit is made in,
continued with what the unedited model says to them, their key covariance added to the least-squares solve's
preservation sample as ``weight`` tokens per edit. The edit's answer keys and the neighbours' share the relation's
words, so the solve has to move less there: the edits take more rounds (``rounds="auto"``: twice the editor's
calibrated rounds).

Measured with the recommended editor on held-out ZsRE edits (``evaluate --neighbours --same-relation 4``, generation,
n = 200, paired): 8 neighbours at 1,000 tokens in 8 rounds kept 82.5 % of other same-relation questions' answers in the
frame against 18.5 % (+64.0 [+59.4, +68.0]), 74.0 against 44.0 % of the next record's question asked there, and said
97.5 % of the edits against 95.0; with the in-frame editor, in 4 rounds, they cost 13 points said (a study script, n = 100).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import random
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from instructedit.editors.aggregation import KeyMemory, check_remembers, remembering, with_sample
from instructedit.editors.preservation import key_memory
from instructedit.io import write_json
from instructedit.runs import SUBJECTS_FILE

NEIGHBOUR_ROUNDS = 2  # rounds="auto" with neighbours: this many times the editor's calibrated rounds
# sequences with neighbours longer than this, without a key memory, broke on CounterFact in some draws of the entities;
# SEQUENCE_EVIDENCE says how (%-escaped: read by argparse's help and the logger's message alike)
LONG_SEQUENCE = 16
SEQUENCE_EVIDENCE = "64 edits, after all 64: 5-8 %% said in two draws of four, 69-77 %% with a memory in three of three; " \
    "results/analysis/in-frame-locality/sequential/neighbours/draws/"
# a sequence with neighbours whose key memory is made for it (apply_sequential(memory="auto"), edit/evaluate --sequential
# --neighbours) holds the texts of the editor's own preservation sample (calibrate --preserve saves them) continued with
# what the unedited model says, counted as this many tokens (results/analysis/in-frame-locality/sequential/neighbours/preservation/)
SEQUENCE_SAMPLE_WEIGHT = 4000.0
SEQUENCE_SAMPLE_ANSWERS = "model"
SAMPLE_ROUNDS = 4  # rounds="auto" for a sequence with neighbours whose memory holds a preservation sample of its own


@dataclass(frozen=True)
class Neighbours:
    """How many subject-swapped neighbours each edit holds still (``count``), their weight in tokens per edit
    (``weight``), the entities swapped in (``subjects``; None: the pool saved with the editor) and the draw's ``seed``
    (the draw depends on the seed and the edit's prompt only: the same edit holds the same neighbours in any call)."""

    count: int = 8
    weight: float = 1000.0
    subjects: tuple[str, ...] | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"Neighbours: count must be a whole number >= 1, got {self.count!r}")
        if not self.weight > 0:
            raise ValueError(f"Neighbours: weight must be > 0 tokens, got {self.weight!r}")
        if self.subjects is not None:
            if isinstance(self.subjects, str):
                raise ValueError("Neighbours: subjects must be a sequence of entity names, not one string")
            object.__setattr__(self, "subjects", subject_pool(self.subjects))

    def about(self) -> dict[str, Any]:
        """What a report records of them (and what makes two evaluations with neighbours the same): count, weight, seed and
        the pool's size and digest."""
        digest = pool_digest(self.subjects) if self.subjects is not None else None
        return {"count": self.count, "weight": self.weight, "seed": self.seed, "subjects": len(self.subjects or ()),
                "subjects_sha256": digest}


def pool_digest(subjects: Sequence[str]) -> str:
    """A short fingerprint of an entity pool (its names in order): what tells two runs' pools apart."""
    return hashlib.sha256("\n".join(subjects).encode()).hexdigest()[:16]


def names_subject(prompt: str, subject: str) -> bool:
    """Whether ``prompt`` names ``subject`` (a non-empty one): what neighbours and same-relation questions swap."""
    return bool(subject) and subject in prompt


def subject_pool(subjects: Iterable[str]) -> tuple[str, ...]:
    """Distinct non-empty entity names, in their first order, stripped."""
    seen: dict[str, None] = {}
    for subject in subjects:
        if not isinstance(subject, str):
            raise ValueError(f"a subject pool holds entity names (strings), got {subject!r}")
        if subject.strip():
            seen.setdefault(subject.strip(), None)
    return tuple(seen)


def save_subjects(directory: str | Path, subjects: Iterable[str]) -> Path:
    """Write the pool ``load_subjects`` reads next to an editor (atomically)."""
    path = Path(directory) / SUBJECTS_FILE
    write_json(path, {"subjects": list(subject_pool(subjects))})
    return path


def load_subjects(directory: str | Path) -> tuple[str, ...] | None:
    """The entity pool saved with an editor; None where it has none."""
    path = Path(directory) / SUBJECTS_FILE
    if not path.is_file():
        return None
    try:
        subjects = json.loads(path.read_text())["subjects"]
        return subject_pool(subjects)
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: expected {{\"subjects\": [entity names]}} ({exc})") from exc


def read_subjects(path: str | Path) -> tuple[str, ...]:
    """An entity pool from a file: a text file (one entity a line) or an edit data file, whose records' subjects it takes
    (any format ``load_records`` reads)."""
    from instructedit.tasks.loaders import load_records

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"subject pool {path}: no such file")
    if path.suffix in (".txt", ""):
        pool = subject_pool(path.read_text().splitlines())
    else:
        pool = subject_pool(r.subject for r in load_records(path).records)
    if not pool:
        raise ValueError(f"subject pool {path}: no entity names in it")
    return pool


def swapped_questions(prompt: str, subject: str, subjects: Sequence[str], count: int, seed: int = 0) -> list[str]:
    """``prompt`` with ``subject`` replaced by ``count`` entities of ``subjects`` (neither the subject nor one the prompt
    names), drawn by ``seed`` and the prompt."""
    if not names_subject(prompt, subject):
        raise ValueError(f"neighbours need the edit's subject, named in its prompt: {prompt[:60]!r} "
                         + ("has no subject (Edit(subject=...), edit --subject)" if not subject else f"does not name {subject!r}"))
    pool = [s for s in subject_pool(subjects) if s != subject and s not in prompt and subject not in s]
    if len(pool) < count:
        raise ValueError(f"neighbours: {count} wanted for {prompt[:60]!r}, but the subject pool has only {len(pool)} other entities")
    return [prompt.replace(subject, other) for other in random.Random(f"{seed}\n{prompt}").sample(pool, count)]


def neighbour_sample(editor: Any, model: Any, collator: Any, records: Sequence[Any], forms: Sequence[str], instruction: int | None,
                     neighbours: Neighbours, subjects: Sequence[str]) -> KeyMemory:
    """The neighbours' keys alone: each record's ``swapped_questions``, in each of ``forms``, continued with what ``model``
    says to them as it is now, as a memory whose sample is their mean key covariance counted as ``neighbours.weight``
    tokens per record."""
    check_remembers(editor)
    texts = [(collator.form_prompt(record, form, instruction, question), record.target_new)
             for record in records
             for question in swapped_questions(record.prompt, record.subject, subjects, neighbours.count, neighbours.seed)
             for form in forms]
    return key_memory(editor, model, collator, texts, past_weight=0.0, text_weight=neighbours.weight * len(records), answers="model")


def _hold_beside(memory: KeyMemory, base: KeyMemory | None, near: KeyMemory, base_weight: float | None = None) -> None:
    """Set ``memory``'s sample to ``base``'s (at ``base_weight`` tokens, default its own weight; none where ``base`` holds
    no sample) and ``near``'s counted together (``with_sample``)."""
    if base is not None and base.text_weight and base.text:
        weight = base.text_weight if base_weight is None else float(base_weight)
        text, tokens = with_sample(base.text, weight, near.text, near.text_weight), base.text_tokens + near.text_tokens
        memory.text, memory.text_weight, memory.text_tokens = text, weight, tokens
    else:
        memory.text, memory.text_weight, memory.text_tokens = near.text, near.text_weight, near.text_tokens


def neighbour_memory(editor: Any, model: Any, collator: Any, records: Sequence[Any], forms: Sequence[str], instruction: int | None,
                     neighbours: Neighbours, subjects: Sequence[str], sample_weight: float | None = None) -> KeyMemory:
    """The preservation memory one ``apply`` call holds still with neighbours: the editor's own sample (at
    ``sample_weight`` tokens, default its calibrated weight), plus each edit's neighbours (``neighbour_sample``, continued
    with what the unedited ``model`` says) counted as ``neighbours.weight`` tokens per edit."""
    near = neighbour_sample(editor, model, collator, records, forms, instruction, neighbours, subjects)
    memory = KeyMemory(past_weight=0.0)
    _hold_beside(memory, getattr(editor, "preservation", None), near, sample_weight)
    return memory


@contextlib.contextmanager
def holding_neighbours(editor: Any, model: Any, collator: Any, record: Any, forms: Sequence[str], instruction: int | None,
                       neighbours: Neighbours, subjects: Sequence[str], memory: KeyMemory | None = None) -> Iterator[None]:
    """Inside the block, the editor's solves hold ``record``'s neighbours still, continued with what ``model`` says as it
    is now (one edit of a sequence: as the edits before it left it). ``memory`` (a sequence's key memory, active in the
    editor): beside its earlier edits' keys and its sample (the editor's own sample where the memory has none), its
    sample put back on exit; without one, beside the editor's own sample (``neighbour_memory``)."""
    if memory is None:
        with remembering(editor, neighbour_memory(editor, model, collator, [record], forms, instruction, neighbours, subjects)):
            yield
        return
    near = neighbour_sample(editor, model, collator, [record], forms, instruction, neighbours, subjects)
    saved = memory.text, memory.text_weight, memory.text_tokens
    _hold_beside(memory, memory if memory.text_weight and memory.text else getattr(editor, "preservation", None), near)
    try:
        yield
    finally:
        memory.text, memory.text_weight, memory.text_tokens = saved
