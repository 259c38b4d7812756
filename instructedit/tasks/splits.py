"""The task table, deterministic disjoint train/val/test splits, training mixtures and data statistics."""

from __future__ import annotations

import logging
import os
import random
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructedit.records import EditRecord
from instructedit.tasks.loaders import LoadResult, load_records

logger = logging.getLogger(__name__)

DATA_ENV = "INSTRUCTEDIT_DATA"
SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)
HELD_OUT_TASKS = ("zsre",)  # InstructEdit never trains on ZsRE: it measures transfer to an unseen task
BALANCE_CAPPED_TASKS = ("convsent",)  # the paper cuts ConvSent down to the size of the other tasks
NON_RECORD_DIRS = ("instructions",)  # JSON under these folders is instruction pools, not edit records


@dataclass(frozen=True)
class TaskSource:
    """Where a task's records come from, as paths relative to the data dir.

    ``pool`` files are carved into train/val/test by a seeded permutation; when ``test`` files are
    given, the pool gives train and val only and the test split is those files, whole.
    """

    fmt: str
    pool: tuple[str, ...]
    test: tuple[str, ...] = ()

    @property
    def files(self) -> tuple[str, ...]:
        return self.pool + self.test


TASK_SOURCES: dict[str, TaskSource] = {
    # KnowEdit WikiData CounterFact: what InstructEdit trains on (its published test split is not here).
    "counterfact": TaskSource("knowedit", ("counterfact/train_cf.json",)),
    "wikirecent": TaskSource("knowedit", ("recent/recent_train.json",)),
    # SERAC's ConvSent train split is not here: val and test are pooled and re-carved.
    "convsent": TaskSource("convsent", ("convsent/blender_val.json", "convsent/blender_test.json")),
    # Held out: the 1k train subset gives train/val, the portability eval file is the whole test split.
    "zsre": TaskSource("zsre", ("zsre/zsre_mend_train-1k.json",), test=("zsre/zsre_mend_eval_portability_gpt4.json",)),
}


@dataclass
class TaskSplits:
    """One task's train/val/test records, with the seed, fractions and files that produced them."""

    task: str
    train: list[EditRecord]
    val: list[EditRecord]
    test: list[EditRecord]
    seed: int
    fractions: tuple[float, float, float]
    files: tuple[str, ...]
    skipped: dict[str, list[tuple[int, str]]]  # file -> (record index, reason)
    dropped_items: int = 0
    loaded: dict[str, int] = field(default_factory=dict)  # file -> records loaded from it
    ignored_keys: dict[str, dict[str, int]] = field(default_factory=dict)  # file -> unknown key -> records with it

    def split(self, name: str) -> list[EditRecord]:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid splits: {', '.join(SPLITS)}")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {name: len(self.split(name)) for name in SPLITS}


@dataclass
class Mixture:
    """Records of several tasks for one split, interleaved by a seeded shuffle, with what made them."""

    records: list[EditRecord]
    counts: dict[str, int]  # task -> records in the mixture
    available: dict[str, int]  # task -> records in the split before any cap
    caps: dict[str, int | None]  # task -> cap applied (None: uncapped)
    tasks: tuple[str, ...]
    split: str
    seed: int
    fractions: tuple[float, float, float]
    balance: bool
    max_per_task: int | None
    files: dict[str, tuple[str, ...]]
    data_dir: str

    def to_dict(self) -> dict[str, Any]:
        """Everything needed to rebuild this mixture, for saving beside results (no records)."""
        return {
            "tasks": list(self.tasks), "split": self.split, "seed": self.seed, "fractions": list(self.fractions),
            "balance": self.balance, "max_per_task": self.max_per_task, "counts": dict(self.counts),
            "available": dict(self.available), "caps": dict(self.caps),
            "held_out_tasks": [task for task in HELD_OUT_TASKS if task not in self.tasks],
            "files": {task: list(files) for task, files in self.files.items()}, "data_dir": self.data_dir,
        }


def default_data_dir() -> Path:
    """``$INSTRUCTEDIT_DATA`` if set, else ``shared/data`` beside the repository root."""
    env = os.environ.get(DATA_ENV)
    path = Path(env).expanduser() if env else Path(__file__).resolve().parents[2].parent / "shared" / "data"
    if not path.is_dir():
        origin = f"${DATA_ENV}" if env else "the default beside the repository"
        raise FileNotFoundError(f"data directory {path} (from {origin}) does not exist; set {DATA_ENV} or pass --data-dir")
    return path


def _data_dir(data_dir: Path | str | None) -> Path:
    if data_dir is None:
        return default_data_dir()
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"data directory {path} does not exist; set {DATA_ENV} or pass --data-dir")
    return path


def _source(task: str) -> TaskSource:
    if task not in TASK_SOURCES:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASK_SOURCES)}")
    return TASK_SOURCES[task]


def _check_fractions(fractions: Iterable[float]) -> tuple[float, float, float]:
    values = tuple(float(f) for f in fractions)
    if len(values) != 3 or any(f < 0 for f in values) or abs(sum(values) - 1.0) > 1e-6:
        raise ValueError(f"fractions must be three non-negative numbers (train, val, test) summing to 1, got {values}")
    return values[0], values[1], values[2]


def _carve(records: list[EditRecord], fractions: tuple[float, float, float], rng: random.Random) -> list[list[EditRecord]]:
    """Split by a seeded permutation: val and test get round(n * fraction), train the rest."""
    order = list(range(len(records)))
    rng.shuffle(order)
    n = len(order)
    n_val = min(n, round(n * fractions[1]))
    n_test = min(n - n_val, round(n * fractions[2]))
    n_train = n - n_val - n_test
    bounds = (0, n_train, n_train + n_val, n)
    return [[records[i] for i in order[lo:hi]] for lo, hi in zip(bounds, bounds[1:])]


def load_task_splits(
    task: str, data_dir: Path | str | None = None, seed: int = 0, fractions: Iterable[float] = DEFAULT_FRACTIONS
) -> TaskSplits:
    """Load one task's files and carve them into disjoint train/val/test splits (see ``TASK_SOURCES``).

    The permutation comes from ``random.Random(f"{seed}:{task}")`` (string seeds are hashed with
    SHA-512, not ``hash()``), so it is the same on every run and machine. Within a split, records
    keep the permuted order, so any prefix is a random subset.
    """
    source = _source(task)
    root = _data_dir(data_dir)
    fractions = _check_fractions(fractions)
    results: dict[str, LoadResult] = {}
    for rel in source.files:
        path = root / rel
        if not path.is_file():
            raise FileNotFoundError(f"task {task!r} needs {path}, which does not exist; set {DATA_ENV} or pass --data-dir")
        results[rel] = load_records(path, fmt=source.fmt, task=task)
    pool = [record for rel in source.pool for record in results[rel].records]
    rng = random.Random(f"{seed}:{task}")
    if source.test:
        share = fractions[0] + fractions[1]
        if share <= 0:
            raise ValueError(f"task {task!r} takes its test split from {source.test}: fractions {fractions} leave nothing for train/val")
        train, val, _ = _carve(pool, (fractions[0] / share, fractions[1] / share, 0.0), rng)
        test = [record for rel in source.test for record in results[rel].records]
    else:
        train, val, test = _carve(pool, fractions, rng)
    logger.info("task %s (seed %d): train %d, val %d, test %d", task, seed, len(train), len(val), len(test))
    return TaskSplits(
        task=task, train=train, val=val, test=test, seed=seed, fractions=fractions, files=source.files,
        skipped={rel: list(result.skipped) for rel, result in results.items()},
        dropped_items=sum(result.dropped_items for result in results.values()),
        loaded={rel: len(result.records) for rel, result in results.items()},
        ignored_keys={rel: dict(result.ignored_keys) for rel, result in results.items() if result.ignored_keys},
    )


def build_mixture(
    tasks: Iterable[str],
    split: str = "train",
    data_dir: Path | str | None = None,
    seed: int = 0,
    fractions: Iterable[float] = DEFAULT_FRACTIONS,
    balance: bool = True,
    max_per_task: int | None = None,
    exclude_held_out: bool = True,
) -> Mixture:
    """Mix one split of several tasks: cap, then shuffle the union with a seeded rng.

    ``balance`` caps each task in ``BALANCE_CAPPED_TASKS`` (ConvSent) at the size of the largest
    other task in the mixture; ``max_per_task`` caps every task. A capped task keeps a prefix of
    its seeded permutation. The task order given does not matter. With ``exclude_held_out`` a
    held-out task is refused in any split: its val records must not steer training either.
    """
    requested = list(tasks)
    if not requested:
        raise ValueError("build_mixture needs at least one task")
    for task in requested:
        _source(task)
    if len(set(requested)) != len(requested):
        raise ValueError(f"tasks listed more than once: {requested}")
    held = [task for task in requested if task in HELD_OUT_TASKS]
    if exclude_held_out and held:
        raise ValueError(
            f"task(s) {held} are held out from training (HELD_OUT_TASKS={HELD_OUT_TASKS}): InstructEdit tests "
            "transfer to them; drop them from the mixture, or pass exclude_held_out=False for an evaluation mixture "
            "(a single-task editor without instructions may train on one with data.allow_held_out=true)"
        )
    if max_per_task is not None and max_per_task < 0:
        raise ValueError(f"max_per_task must be >= 0 or None, got {max_per_task}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
    root = _data_dir(data_dir)
    fractions = _check_fractions(fractions)
    ordered = tuple(task for task in TASK_SOURCES if task in requested)
    loaded = {task: load_task_splits(task, root, seed, fractions) for task in ordered}
    for task, splits in loaded.items():  # a configured task is never dropped quietly
        for rel in splits.files:
            if not splits.loaded.get(rel):
                skipped = splits.skipped.get(rel, [])
                why = f"all {len(skipped)} records were skipped (e.g. #{skipped[0][0]}: {skipped[0][1]})" if skipped else "it is an empty list"
                raise ValueError(f"task {task!r}: data file {root / rel} holds no usable records ({why}); "
                                 f"fix the file, or drop {task!r} from the tasks (data.tasks)")
    pools = {task: splits.split(split) for task, splits in loaded.items()}

    caps: dict[str, int | None] = {task: max_per_task for task in ordered}
    if balance:
        others = [len(pools[t]) if max_per_task is None else min(len(pools[t]), max_per_task)
                  for t in ordered if t not in BALANCE_CAPPED_TASKS]
        for task in ordered:
            if task in BALANCE_CAPPED_TASKS and others:
                caps[task] = max(others) if max_per_task is None else min(max(others), max_per_task)
    chosen = {task: pools[task] if caps[task] is None else pools[task][: caps[task]] for task in ordered}
    records = [record for task in ordered for record in chosen[task]]
    random.Random(f"{seed}:mixture:{split}").shuffle(records)
    return Mixture(
        records=records, counts={task: len(chosen[task]) for task in ordered},
        available={task: len(pools[task]) for task in ordered}, caps=caps, tasks=ordered, split=split, seed=seed,
        fractions=fractions, balance=balance, max_per_task=max_per_task,
        files={task: TASK_SOURCES[task].files for task in ordered}, data_dir=str(root),
    )


# --- statistics --------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileStats:
    """How one data file loaded: records in it, loaded, skipped (reason -> count), unknown keys ignored (key -> count)."""

    file: str
    used_by: str | None  # the task that reads it, None for files no task uses
    format: str
    task: str
    in_file: int
    loaded: int
    skipped: int
    reasons: dict[str, int]
    error: str = ""  # why an unused file could not be loaded at all
    ignored_keys: dict[str, int] = field(default_factory=dict)


@dataclass
class DataStats:
    data_dir: Path
    seed: int
    fractions: tuple[float, float, float]
    tasks: dict[str, TaskSplits]
    files: list[FileStats]


def collect_stats(
    data_dir: Path | str | None = None, seed: int = 0, fractions: Iterable[float] = DEFAULT_FRACTIONS
) -> DataStats:
    """Load every task and every other record file under the data dir (through the auto-detector)."""
    root = _data_dir(data_dir)
    fractions = _check_fractions(fractions)
    tasks = {task: load_task_splits(task, root, seed, fractions) for task in TASK_SOURCES}
    files: list[FileStats] = []
    for task, splits in tasks.items():
        for rel in splits.files:
            skipped = splits.skipped[rel]
            files.append(FileStats(
                file=rel, used_by=task, format=TASK_SOURCES[task].fmt, task=task, in_file=splits.loaded[rel] + len(skipped),
                loaded=splits.loaded[rel], skipped=len(skipped), reasons=dict(Counter(reason for _, reason in skipped)),
                ignored_keys=splits.ignored_keys.get(rel, {}),
            ))
    used = {stats.file for stats in files}
    for path in sorted(root.rglob("*.json")):
        rel = path.relative_to(root)
        if rel.as_posix() in used or rel.parts[0] in NON_RECORD_DIRS:
            continue
        try:
            result = load_records(path)
        except ValueError as err:
            files.append(FileStats(rel.as_posix(), None, "?", "?", 0, 0, 0, {}, error=str(err)))
            continue
        files.append(FileStats(
            file=rel.as_posix(), used_by=None, format=result.format, task=result.task, in_file=result.n_in_file,
            loaded=len(result.records), skipped=len(result.skipped),
            reasons=dict(Counter(reason for _, reason in result.skipped)), ignored_keys=dict(result.ignored_keys),
        ))
    return DataStats(data_dir=root, seed=seed, fractions=fractions, tasks=tasks, files=files)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(cell) for cell in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]

    def line(row: list[str]) -> str:
        return "  ".join(c.rjust(w) if c.isdigit() else c.ljust(w) for c, w in zip(row, widths)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(row) for row in cells[1:]])


def format_stats(data_dir: Path | str | None = None, seed: int = 0) -> str:
    """A plain-text report: records per task and split, then records per file (loaded, skipped, why)."""
    stats = collect_stats(data_dir, seed)
    task_rows = [
        [task, *(len(s.split(name)) for name in SPLITS), sum(s.sizes().values()), s.dropped_items,
         "yes" if task in HELD_OUT_TASKS else ""]
        for task, s in stats.tasks.items()
    ]
    file_rows = [
        [f.file, f.used_by or "(unused)", f.format, f.task, f.in_file, f.loaded, f.skipped,
         f.error or "; ".join([f"{reason} x{n}" for reason, n in sorted(f.reasons.items())]
                              + [f"ignored key '{key}' x{n}" for key, n in f.ignored_keys.items()])]
        for f in stats.files
    ]
    fractions = "/".join(f"{f:g}" for f in stats.fractions)
    return "\n".join([
        f"data dir: {stats.data_dir}",
        f"split seed: {stats.seed}, fractions (train/val/test): {fractions}",
        "",
        "Records per task and split",
        _table(["task", *SPLITS, "total", "dropped probes", "held out"], task_rows),
        "",
        "Records per file (in file = loaded + skipped; '(unused)' files are read by no task)",
        _table(["file", "used by", "format", "task", "in file", "loaded", "skipped", "skip reasons, ignored keys"],
               file_rows),
    ])


def eval_records(task: str, split: str, limit: int | None, data_dir: str | None, seed: int) -> list[EditRecord]:
    """The first ``limit`` records (all when None) of ``task``'s ``split``."""
    records = load_task_splits(task, data_dir, seed=seed).split(split)
    return records[:limit] if limit is not None else records
