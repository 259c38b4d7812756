"""Meta-training data of a config: the train / val mixtures, the collator, the instruction pool and what data.json records."""

from __future__ import annotations

import dataclasses
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from instructedit.config import Config
from instructedit.io import file_sha256
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool, instruction_pool
from instructedit.tasks.splits import build_mixture


@dataclass
class TrainData:
    train: list[EditRecord]
    val: list[EditRecord]
    collator: Collator
    pool: InstructionPool | None
    info: dict[str, Any]  # written to the run folder's data.json

    def instructions(self, records: Sequence[EditRecord], seed: int) -> list[int | None]:
        """The seen description each record trains with (``data.instruction_seed``); None without instructions."""
        return [self.pool.training_index(r, seed) if self.pool else None for r in records]


def record_at(records: Sequence[EditRecord], seed: int, index: int) -> EditRecord:
    """The index-th record of an endless stream over ``records``, reshuffled every epoch (seeded: resume-exact)."""
    epoch, offset = divmod(index, len(records))
    order = list(range(len(records)))
    random.Random(f"{seed}:epoch{epoch}").shuffle(order)
    return records[order[offset]]


def oversample(records: Sequence[EditRecord], factors: Mapping[str, float]) -> list[EditRecord]:
    """Each task's records repeated ``factor`` times (a fractional part takes a prefix); order is irrelevant
    to the Trainer, which reshuffles every epoch."""
    out: list[EditRecord] = []
    for task in dict.fromkeys(r.task for r in records):
        group = [r for r in records if r.task == task]
        factor = float(factors.get(task, 1.0))
        if factor <= 0 or not math.isfinite(factor):
            raise ValueError(f"oversampling factor of {task!r} must be a positive number, got {factor}")
        total = round(len(group) * factor)
        out += [group[i % len(group)] for i in range(total)]
    return out


def _oversampled(data: TrainData, factors: Mapping[str, float]) -> TrainData:
    """``data`` with the training records of ``data.oversample``'s tasks repeated; validation is untouched."""
    train = oversample(data.train, factors)
    counts = {task: sum(r.task == task for r in train) for task in dict.fromkeys(r.task for r in train)}
    info = dict(data.info)
    info["train"] = dict(info["train"]) | {"counts_before_oversampling": info["train"].get("counts"), "counts": counts,
                                           "oversampling": dict(factors)}
    return dataclasses.replace(data, train=train, info=info)


def prepare_data(config: Config, tokenizer: PreTrainedTokenizerBase) -> TrainData:
    """The training and validation records of ``config.data``, and the collator that turns them into meta-batches."""
    d = config.data
    common = dict(data_dir=d.data_dir, seed=d.split_seed, fractions=d.split_fractions, balance=d.balance, max_per_task=d.max_per_task,
                  exclude_held_out=not d.allow_held_out)
    train = build_mixture(d.tasks, "train", **common)
    val = build_mixture(d.tasks, "val", **common)
    pool = instruction_pool(config)
    fallback = [item for r in train.records for item in r.locality]
    collator = Collator(tokenizer, config.model.max_length, pool, fallback_locality=fallback, answer_stop=config.training.answer_stop,
                        edit_forms=config.training.edit_forms)
    val_records = val.records[: config.training.val_size]
    hashes = {rel: file_sha256(Path(train.data_dir) / rel) for files in train.files.values() for rel in files}
    info = {"train": train.to_dict(), "val": val.to_dict() | {"used": len(val_records)}, "instructions": pool.source if pool else None,
            "file_sha256": hashes}
    data = TrainData(train.records, val_records, collator, pool, info)
    return _oversampled(data, d.oversample) if d.oversample else data
