"""One loader per source file format (KnowEdit, MEND zsRE, EasyEdit CounterFact, SERAC ConvSent), each producing EditRecords.

Over 400 lines: four small format readers and their shared validation, one concept (files -> EditRecord).
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from instructedit.records import SENTIMENTS, TASKS, ConvSentExtras, EditRecord, QAItem

logger = logging.getLogger(__name__)

Row = dict[str, Any]
# (all rows of the file, index of this row, task, source id) -> (record, items dropped from it)
Converter = Callable[[list[Row], int, str, str], tuple[EditRecord, int]]

CONVSENT_PROMPT = "What do you think of {topic}?"
CONVSENT_KEYS = {"positive": "pos", "negative": "neg"}  # label -> field of the SERAC file
# zsRE's portability probe is a one-hop question through the new answer (EasyEdit's "New
# Question"), the same kind of probe KnowEdit files under "Reasoning"; one name lets portability
# be reported per kind across tasks.
ZSRE_PORTABILITY_KIND = "Reasoning"
ZSRE_LOCALITY_KIND = "NQ"  # MEND's locality prompts are Natural Questions
COUNTERFACT_LOCALITY_KIND = "Neighborhood"  # ROME's name for its locality prompts

# The keys that identify each format; a file matches a format when its records carry all of them.
SIGNATURES: dict[str, frozenset[str]] = {
    "knowedit": frozenset({"subject", "prompt", "target_new"}),
    "zsre": frozenset({"src", "alt", "answers", "rephrase", "loc", "loc_ans"}),
    "easyedit-counterfact": frozenset(
        {"case_id", "prompt", "target_new", "rephrase_prompt", "locality_prompt", "locality_ground_truth"}
    ),
    "convsent": frozenset({"ent", "pos", "neg"}),
}


@dataclass(frozen=True)
class RecordKeys:
    """The top-level record keys of one format: those its converter reads, and those it knows and leaves out (key -> why)."""

    read: frozenset[str]
    unused: Mapping[str, str] = field(default_factory=dict)

    @property
    def known(self) -> frozenset[str]:
        return self.read | frozenset(self.unused)


_CASE_ID = "ROME's case number; a record is identified by its file and index instead (EditRecord.source)"
_COND = "MEND/SERAC's conditioning string 'pred >> alt || prompt', a rendering of fields already read"
# Any other key is reported once per file (LoadResult.ignored_keys and a warning), never dropped silently.
RECORD_KEYS: dict[str, RecordKeys] = {
    "knowedit": RecordKeys(
        read=frozenset({"subject", "prompt", "target_new", "ground_truth", "rephrase", "rephrase_prompt",
                        "locality", "portability"}),
        unused={"cond": _COND},  # KnowEdit's ZsRE test file carries it
    ),
    "zsre": RecordKeys(
        read=frozenset({"subject", "src", "alt", "answers", "rephrase", "loc", "loc_ans", "portability"}),
        unused={
            "pred": "the answer MEND's base model gave before the edit: a model output, not a fact of the data",
            "cond": _COND,
            "case_id": _CASE_ID,
        },
    ),
    "easyedit-counterfact": RecordKeys(
        read=frozenset({"subject", "prompt", "target_new", "ground_truth", "rephrase_prompt", "locality_prompt",
                        "locality_ground_truth"}),
        unused={"case_id": _CASE_ID},
    ),
    "convsent": RecordKeys(read=frozenset({"ent", "pos", "neg"})),
}


@dataclass
class LoadResult:
    """The records one file gave, the records it skipped (index, reason), the probes it dropped and the keys it ignored."""

    records: list[EditRecord]
    skipped: list[tuple[int, str]]
    format: str
    path: Path
    task: str = ""
    dropped_items: int = 0  # locality/portability probes whose prompt or answer was empty
    ignored_keys: dict[str, int] = field(default_factory=dict)  # unknown top-level key -> records carrying it

    @property
    def n_in_file(self) -> int:
        return len(self.records) + len(self.skipped)


class _Skip(Exception):
    """Raised while converting one record: the record is skipped with this reason."""


def normalize_aliases(value: Any) -> tuple[str, ...]:
    """Turn a string, a list of strings or a list of alias lists into a flat tuple of aliases.

    Strings are stripped; empty strings, empty lists and ``None`` vanish; duplicates are dropped
    keeping the first occurrence, so ``[[], ["a", "b"], ["a"]]`` gives ``("a", "b")``. Anything
    else (numbers, objects) raises ``TypeError``: a string is never indexed as if it were a list.
    """
    out: list[str] = []
    seen: set[str] = set()

    def walk(node: Any) -> None:
        if node is None:
            return
        if isinstance(node, str):
            text = node.strip()
            if text and text not in seen:
                seen.add(text)
                out.append(text)
        elif isinstance(node, (list, tuple)):
            for child in node:
                walk(child)
        else:
            raise TypeError(f"expected a string or a list of strings, got {type(node).__name__}")

    walk(value)
    return tuple(out)


def read_json_records(path: Path) -> list[Row]:
    """Parse a file holding a top-level JSON list of objects; anything else raises ValueError."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    except UnicodeDecodeError as err:
        raise ValueError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a top-level JSON list of records, got a JSON {type(data).__name__}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: record {index} is a JSON {type(row).__name__}, expected an object")
    return data


def detect_format(path: Path) -> str:
    """Name the format of a data file from the JSON keys its records carry."""
    return _detect(read_json_records(path), Path(path))


def _detect(rows: list[Row], path: Path) -> str:
    if not rows:
        raise ValueError(f"{path}: no records, cannot detect the format; pass fmt= one of {sorted(LOADERS)}")
    keys: set[str] = set().union(*(row.keys() for row in rows))
    matches = [name for name, signature in SIGNATURES.items() if signature <= keys]
    # A CounterFact file also carries KnowEdit's keys: the match with the largest signature wins.
    most = max((len(SIGNATURES[m]) for m in matches), default=0)
    best = [m for m in matches if len(SIGNATURES[m]) == most]
    if len(best) != 1:
        found = "no known format" if not best else f"several formats ({', '.join(best)})"
        raise ValueError(
            f"{path}: cannot detect the format, record keys {sorted(keys)} match {found}; "
            f"pass fmt= one of {sorted(LOADERS)}"
        )
    return best[0]


def load_records(path: Path, fmt: str | None = None, task: str | None = None) -> LoadResult:
    """Load a data file as EditRecords; ``fmt=None`` detects the format, ``task=None`` uses its default."""
    if fmt is None:
        fmt = detect_format(path)
    if fmt not in LOADERS:
        raise ValueError(f"unknown data format {fmt!r}; valid formats: {', '.join(sorted(LOADERS))}")
    return LOADERS[fmt](Path(path), task)


# --- field helpers: each raises _Skip with a reason that names the field --------------------------


def _label(key: str, role: str | None) -> str:
    return f"'{key}'" if role is None or role == key else f"'{key}' ({role})"


def _required_text(row: Row, key: str, role: str | None = None) -> str:
    if key not in row:
        raise _Skip(f"missing field {_label(key, role)}")
    value = row[key]
    if not isinstance(value, str):
        raise _Skip(f"field {_label(key, role)} is a {type(value).__name__}, expected a string")
    if not value.strip():
        raise _Skip(f"empty field {_label(key, role)}")
    return value.strip()


def _optional_text(row: Row, key: str) -> str:
    value = row.get(key)
    return value.strip() if isinstance(value, str) else ""


def _aliases(value: Any, where: str) -> tuple[str, ...]:
    try:
        return normalize_aliases(value)
    except TypeError as err:
        raise _Skip(f"field {where}: {err}") from None


def _qa(prompt: Any, aliases: tuple[str, ...], kind: str) -> QAItem | None:
    """A probe, or None when its prompt or answer is empty (the caller counts it as dropped)."""
    if not isinstance(prompt, str) or not prompt.strip() or not aliases:
        return None
    return QAItem(prompt=prompt.strip(), answer=aliases[0], kind=kind, aliases=aliases)


def _keep(items: list[QAItem | None]) -> tuple[tuple[QAItem, ...], int]:
    kept = tuple(item for item in items if item is not None)
    return kept, len(items) - len(kept)


# --- KnowEdit ------------------------------------------------------------------------------------


def _knowedit_probes(row: Row, key: str) -> list[QAItem | None]:
    groups = row.get(key) or {}
    if not isinstance(groups, dict):
        raise _Skip(f"field '{key}' is a {type(groups).__name__}, expected an object of kind -> list of probes")
    items: list[QAItem | None] = []
    for kind, entries in groups.items():
        if not isinstance(entries, list):
            raise _Skip(f"field '{key}.{kind}' is a {type(entries).__name__}, expected a list of probes")
        for j, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise _Skip(f"field '{key}.{kind}[{j}]' is a {type(entry).__name__}, expected an object")
            answers = _aliases(entry.get("ground_truth"), f"'{key}.{kind}[{j}].ground_truth'")
            items.append(_qa(entry.get("prompt"), answers, str(kind)))
    return items


def _knowedit_record(rows: list[Row], index: int, task: str, source: str) -> tuple[EditRecord, int]:
    row = rows[index]
    prompt = _required_text(row, "prompt")
    target = _required_text(row, "target_new")
    truth = _aliases(row.get("ground_truth"), "'ground_truth'")
    # KnowEdit's WikiData files name the paraphrase 'rephrase', its ZsRE file 'rephrase_prompt'; keep both.
    rephrase = _aliases(row.get("rephrase"), "'rephrase'") + _aliases(row.get("rephrase_prompt"), "'rephrase_prompt'")
    locality, dropped_loc = _keep(_knowedit_probes(row, "locality"))
    portability, dropped_port = _keep(_knowedit_probes(row, "portability"))
    record = EditRecord(
        task=task, prompt=prompt, target_new=target, subject=_optional_text(row, "subject"),
        ground_truth=truth[0] if truth else None, rephrase=tuple(dict.fromkeys(rephrase)),
        locality=locality, portability=portability, source=source,
    )
    return record, dropped_loc + dropped_port


def _knowedit_default_task(rows: list[Row]) -> str:
    # KnowEdit's WikiData CounterFact records carry the old answer (ground_truth); WikiData Recent's
    # records are new facts with no old answer.
    return "counterfact" if any("ground_truth" in row for row in rows) else "wikirecent"


# --- MEND / ROME zsRE ----------------------------------------------------------------------------


def _zsre_record(rows: list[Row], index: int, task: str, source: str) -> tuple[EditRecord, int]:
    row = rows[index]
    prompt = _required_text(row, "src", "prompt")
    target = _required_text(row, "alt", "target_new")
    truth = _aliases(row.get("answers"), "'answers'")
    locality: list[QAItem | None] = []
    if "loc" in row or "loc_ans" in row:
        locality.append(_qa(row.get("loc"), _aliases(row.get("loc_ans"), "'loc_ans'"), ZSRE_LOCALITY_KIND))
    raw_portability = row.get("portability") or []
    if isinstance(raw_portability, dict):
        raw_portability = [raw_portability]
    if not isinstance(raw_portability, list) or not all(isinstance(p, dict) for p in raw_portability):
        raise _Skip("field 'portability' must be an object (or list of objects) with 'New Question', 'New Answer'")
    portability = [
        _qa(p.get("New Question"), _aliases(p.get("New Answer"), "'portability.New Answer'"), ZSRE_PORTABILITY_KIND)
        for p in raw_portability
    ]
    kept_loc, dropped_loc = _keep(locality)
    kept_port, dropped_port = _keep(portability)
    record = EditRecord(
        task=task, prompt=prompt, target_new=target, subject=_optional_text(row, "subject"),
        ground_truth=truth[0] if truth else None, rephrase=_aliases(row.get("rephrase"), "'rephrase'"),
        locality=kept_loc, portability=kept_port, source=source,
    )
    return record, dropped_loc + dropped_port


# --- EasyEdit / ROME CounterFact -----------------------------------------------------------------


def _counterfact_record(rows: list[Row], index: int, task: str, source: str) -> tuple[EditRecord, int]:
    row = rows[index]
    prompt = _required_text(row, "prompt")
    target = _required_text(row, "target_new")
    truth = _aliases(row.get("ground_truth"), "'ground_truth'")
    locality = [
        _qa(row.get("locality_prompt"), _aliases(row.get("locality_ground_truth"), "'locality_ground_truth'"),
            COUNTERFACT_LOCALITY_KIND)
    ]
    kept_loc, dropped = _keep(locality)
    record = EditRecord(
        task=task, prompt=prompt, target_new=target, subject=_optional_text(row, "subject"),
        ground_truth=truth[0] if truth else None,
        rephrase=_aliases(row.get("rephrase_prompt"), "'rephrase_prompt'"), locality=kept_loc, source=source,
    )
    return record, dropped


# --- SERAC ConvSent ------------------------------------------------------------------------------


def _responses(row: Row, key: str) -> tuple[str, ...]:
    if key not in row:
        raise _Skip(f"missing field '{key}'")
    return _aliases(row[key], f"'{key}'")


def _convsent_locality(rows: list[Row], index: int, topic: str) -> QAItem | None:
    """A probe on the next record's topic (cyclically), skipping a repeat of this topic."""
    for step in range(1, len(rows)):
        other = rows[(index + step) % len(rows)]
        other_topic = other.get("ent")
        if not isinstance(other_topic, str) or not other_topic.strip() or other_topic.strip() == topic:
            continue
        try:
            replies = normalize_aliases(other.get("pos")) or normalize_aliases(other.get("neg"))
        except TypeError:
            continue
        if replies:
            prompt = CONVSENT_PROMPT.format(topic=other_topic.strip())
            return QAItem(prompt=prompt, answer=replies[0], kind="OtherTopic", aliases=(replies[0],))
    return None


def _convsent_record(rows: list[Row], index: int, task: str, source: str) -> tuple[EditRecord, int]:
    row = rows[index]
    topic = _required_text(row, "ent", "topic")
    # SERAC draws a sentiment per example at random; alternating by index gives the same 50/50
    # balance without an rng, and the same label for a record on every run and machine.
    label, opposite = SENTIMENTS[index % 2], SENTIMENTS[1 - index % 2]
    target = _responses(row, CONVSENT_KEYS[label])
    other = _responses(row, CONVSENT_KEYS[opposite])
    for key, replies, sentiment in ((CONVSENT_KEYS[label], target, label), (CONVSENT_KEYS[opposite], other, opposite)):
        if not replies:
            raise _Skip(f"empty field '{key}' (no {sentiment} response)")
    locality = _convsent_locality(rows, index, topic)
    record = EditRecord(
        task=task, prompt=CONVSENT_PROMPT.format(topic=topic), target_new=target[0], subject=topic,
        locality=(locality,) if locality is not None else (), source=source,
        convsent=ConvSentExtras(topic=topic, label=label, target_responses=target, opposite_responses=other),
    )
    return record, 0


# --- the loaders -------------------------------------------------------------------------------


def _check_task(task: str) -> str:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(TASKS)}")
    return task


def _ignored_keys(path: Path, fmt: str, rows: list[Row]) -> dict[str, int]:
    """Count the records carrying each top-level key the format's loader does not know; warn once if any."""
    known = RECORD_KEYS[fmt].known
    counts = Counter(key for row in rows for key in row if key not in known)
    ignored = dict(sorted(counts.items()))
    if ignored:
        listed = ", ".join(f"'{key}' ({n} of {len(rows)} records)" for key, n in ignored.items())
        logger.warning(
            "%s: ignored record keys the %s loader does not read: %s; it knows %s (see RECORD_KEYS)",
            path, fmt, listed, ", ".join(sorted(known)),
        )
    return ignored


def _load(path: Path, fmt: str, task: str | None, default_task: Callable[[list[Row]], str], convert: Converter) -> LoadResult:
    path = Path(path)
    rows = read_json_records(path)
    task = _check_task(task) if task is not None else default_task(rows)
    ignored = _ignored_keys(path, fmt, rows)
    records: list[EditRecord] = []
    skipped: list[tuple[int, str]] = []
    dropped = 0
    for index in range(len(rows)):
        try:
            record, n_dropped = convert(rows, index, task, f"{path.name}#{index}")
        except _Skip as skip:
            skipped.append((index, str(skip)))
            continue
        records.append(record)
        dropped += n_dropped
    if skipped:
        examples = "; ".join(f"#{i}: {reason}" for i, reason in skipped[:3])
        logger.warning("%s: skipped %d of %d records (%s)", path, len(skipped), len(rows), examples)
    if dropped:
        logger.info("%s: dropped %d locality/portability probes with an empty prompt or answer", path, dropped)
    return LoadResult(
        records=records, skipped=skipped, format=fmt, path=path, task=task, dropped_items=dropped, ignored_keys=ignored
    )


def load_knowedit(path: Path, task: str | None = None) -> LoadResult:
    """KnowEdit ``{subject, prompt, target_new, ground_truth?, rephrase?, rephrase_prompt?, portability?, locality?}``.

    Default task: ``counterfact`` when the file's records carry ``ground_truth`` (WikiData
    CounterFact), else ``wikirecent`` (WikiData Recent edits add facts and have no old answer).
    """
    return _load(path, "knowedit", task, _knowedit_default_task, _knowedit_record)


def load_zsre(path: Path, task: str | None = None) -> LoadResult:
    """MEND/ROME zsRE ``{src, alt, answers, rephrase, loc, loc_ans, portability?}``; default task ``zsre``."""
    return _load(path, "zsre", task, lambda rows: "zsre", _zsre_record)


def load_easyedit_counterfact(path: Path, task: str | None = None) -> LoadResult:
    """EasyEdit/ROME CounterFact ``{case_id, prompt, target_new, rephrase_prompt, locality_*}``; task ``counterfact``."""
    return _load(path, "easyedit-counterfact", task, lambda rows: "counterfact", _counterfact_record)


def load_convsent(path: Path, task: str | None = None) -> LoadResult:
    """SERAC ConvSent ``{ent, pos, neg}``: one edit per topic, label alternating by index; task ``convsent``."""
    return _load(path, "convsent", task, lambda rows: "convsent", _convsent_record)


LOADERS: dict[str, Callable[[Path, str | None], LoadResult]] = {
    "knowedit": load_knowedit,
    "zsre": load_zsre,
    "easyedit-counterfact": load_easyedit_counterfact,
    "convsent": load_convsent,
}
