"""EditRecord, the one normalized editing example every loader produces, and the batch types."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

TASKS = ("counterfact", "wikirecent", "convsent", "zsre")
SENTIMENTS = ("positive", "negative")


@dataclass(frozen=True)
class QAItem:
    """A prompt with its answer, e.g. one locality or portability probe.

    ``answer`` is the first non-empty alias; ``aliases`` keeps every alias the source gave.
    ``kind`` is the source's sub-key (``Relation_Specificity``, ``Subject_Aliasing``, ...).
    """

    prompt: str
    answer: str
    kind: str = "default"
    aliases: tuple[str, ...] = ()


@dataclass(frozen=True)
class ConvSentExtras:
    """ConvSent edit: make the model talk about ``topic`` with sentiment ``label``.

    ``target_responses`` have the target sentiment (likelihood), ``opposite_responses`` the other
    one (unlikelihood).
    """

    topic: str
    label: str
    target_responses: tuple[str, ...]
    opposite_responses: tuple[str, ...]


@dataclass(frozen=True)
class EditRecord:
    """One normalized edit example, whatever file format it came from."""

    task: str
    prompt: str
    target_new: str
    subject: str = ""
    ground_truth: str | None = None
    rephrase: tuple[str, ...] = ()
    locality: tuple[QAItem, ...] = ()
    portability: tuple[QAItem, ...] = ()
    convsent: ConvSentExtras | None = None
    source: str = ""  # "file.json#index", for error messages and provenance

    def __post_init__(self) -> None:
        if not self.prompt.strip():
            raise ValueError(f"EditRecord {self.source or '?'}: field 'prompt' is empty")
        if not self.target_new.strip():
            raise ValueError(f"EditRecord {self.source or '?'}: field 'target_new' is empty")


@dataclass
class TokenBatch:
    """Right-padded token ids with a per-position label mask.

    ``labels`` holds the token id to predict at each position (already shifted: the logits at
    position t are scored against ``labels[:, t]``) and -100 where nothing is scored.
    """

    input_ids: torch.Tensor  # (batch, seq)
    attention_mask: torch.Tensor  # (batch, seq)
    labels: torch.Tensor  # (batch, seq)
    # A packed row (models.packing.pack; a batch of one row): the original row of every position (-1 on a shared start),
    # so that per-row quantities (a least-squares edit's NLL per edit) are still taken per original row.
    owner: torch.Tensor | None = None  # (seq,)

    def to(self, device: torch.device | str) -> "TokenBatch":
        return TokenBatch(*(t.to(device) for t in (self.input_ids, self.attention_mask, self.labels)),
                          owner=self.owner.to(device) if self.owner is not None else None)

    @property
    def label_mask(self) -> torch.Tensor:
        return self.labels != -100

    @property
    def label_rows(self) -> torch.Tensor:
        """Row index of every labelled position, in ``label_mask`` order: (n_positions,); a packed row's: the original rows."""
        if self.owner is not None:
            return self.owner[self.label_mask[0]]
        return self.label_mask.nonzero()[:, 0]

    @property
    def n_label_rows(self) -> int:
        """How many rows per-row quantities count (``label_rows`` < it): the rows; a packed row's original rows up to the
        last labelled one."""
        if self.owner is None:
            return self.n_rows
        rows = self.label_rows
        return int(rows.max()) + 1 if rows.numel() else 0

    @property
    def n_rows(self) -> int:
        return self.input_ids.shape[0]

    def rows(self, start: int, stop: int) -> "TokenBatch":
        """Rows ``start`` .. ``stop`` - 1 (views, still padded to this batch's length)."""
        return TokenBatch(self.input_ids[start:stop], self.attention_mask[start:stop], self.labels[start:stop])

    def chunks(self, size: int) -> list["TokenBatch"]:
        """This batch in consecutive pieces of at most ``size`` rows (itself when it fits in one)."""
        if self.n_rows <= size:
            return [self]
        return [self.rows(i, i + size) for i in range(0, self.n_rows, size)]


@dataclass
class MetaBatch:
    """Everything one meta-training step needs for one or more records.

    edit_inner: the input the edit gradient is taken on (wrapped prompt + target);
    edit_outer: the input the post-edit edit loss is scored on (rephrase, else edit_inner; for
      ConvSent the responses with the target sentiment);
    loc: the unwrapped locality input whose answer positions must not change;
    unlikely: ConvSent responses with the opposite sentiment, scored with unlikelihood.
    """

    edit_inner: TokenBatch
    edit_outer: TokenBatch
    loc: TokenBatch
    unlikely: TokenBatch | None = None
    tasks: list[str] = field(default_factory=list)

    def to(self, device: torch.device | str) -> "MetaBatch":
        unlikely = self.unlikely.to(device) if self.unlikely is not None else None
        return MetaBatch(self.edit_inner.to(device), self.edit_outer.to(device), self.loc.to(device), unlikely, self.tasks)
