"""Task instruction pools (data, with a seen/unseen split) and rendering of the instruction template."""

from __future__ import annotations

import dataclasses
import json
import random
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from instructedit.config import Config
from instructedit.records import EditRecord

TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}"
LABEL, TOPIC = "[LABEL]", "[TOPIC]"


@dataclass(frozen=True)
class InstructionPool:
    """Descriptions per task; ``seen`` indices are used in training, ``unseen`` ones only in tests."""

    descriptions: dict[str, tuple[str, ...]]
    seen: tuple[int, ...]
    unseen: tuple[int, ...]
    template: str = TEMPLATE
    source: str = "instructedit default descriptions"

    @classmethod
    def default(cls) -> "InstructionPool":
        """The project's own descriptions (10 per task, indices 0-8 seen, 9 unseen)."""
        text = resources.files("instructedit.tasks").joinpath("descriptions.json").read_text()
        return cls._from_json(json.loads(text), "instructedit default descriptions")

    @classmethod
    def from_file(cls, path: str | Path) -> "InstructionPool":
        """A pool file in the format of ``shared/data/instructions/instructedit_descriptions.json``."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"instruction pool file {path} does not exist") from None
        except json.JSONDecodeError as e:
            raise ValueError(f"instruction pool file {path} is not valid JSON: {e}") from None
        return cls._from_json(data, str(path))

    @classmethod
    def _from_json(cls, data: dict, source: str) -> "InstructionPool":
        for key in ("descriptions", "seen", "unseen"):
            if key not in data:
                raise ValueError(f"instruction pool {source}: missing field '{key}'")
        descriptions = {task: tuple(d) for task, d in data["descriptions"].items()}
        seen, unseen = tuple(data["seen"]), tuple(data["unseen"])
        if set(seen) & set(unseen):
            raise ValueError(f"instruction pool {source}: indices {sorted(set(seen) & set(unseen))} are both seen and unseen")
        for task, descs in descriptions.items():
            bad = [i for i in seen + unseen if not 0 <= i < len(descs)]
            if bad:
                raise ValueError(f"instruction pool {source}: task {task!r} has {len(descs)} descriptions, indices {bad} are out of range")
            if not all(isinstance(d, str) and d.strip() for d in descs):
                raise ValueError(f"instruction pool {source}: task {task!r} has an empty description")
        template = data.get("template", TEMPLATE)
        for slot in ("{task}", "{description}", "{prompt}"):
            if slot not in template:
                raise ValueError(f"instruction pool {source}: template lacks the slot {slot}")
        return cls(descriptions, seen, unseen, template, source)

    def _check_task(self, task: str) -> tuple[str, ...]:
        if task not in self.descriptions:
            raise ValueError(f"instruction pool {self.source} has no descriptions for task {task!r}; it has {sorted(self.descriptions)}")
        return self.descriptions[task]

    def description(self, record: EditRecord, index: int) -> str:
        """Description ``index`` of the record's task, with ConvSent's [LABEL]/[TOPIC] filled in."""
        text = self._check_task(record.task)[index]
        if LABEL in text or TOPIC in text:
            if record.convsent is None:
                raise ValueError(f"record {record.source}: description {index} of {record.task!r} needs [LABEL]/[TOPIC] but the record has no ConvSent fields")
            text = text.replace(LABEL, record.convsent.label).replace(TOPIC, record.convsent.topic)
        return text

    def render(self, record: EditRecord, prompt: str, index: int) -> str:
        """Wrap ``prompt`` (the edit, rephrase or portability prompt of ``record``) in the template."""
        return self.template.format(task=record.task, description=self.description(record, index), prompt=prompt)

    def training_index(self, record: EditRecord, seed: int) -> int:
        """One seen description per record, fixed by (seed, record source): same every epoch and run."""
        return random.Random(f"{seed}:{record.task}:{record.source}:{record.prompt}").choice(self.seen)

    def evaluation_index(self, which: str | int) -> int:
        """'seen' -> the first seen description, 'unseen' -> the first unseen one, or an explicit index."""
        if which == "seen":
            return self.seen[0]
        if which == "unseen":
            return self.unseen[0]
        index = int(which)
        n = min(len(d) for d in self.descriptions.values())
        if not 0 <= index < n:
            raise ValueError(f"instruction index {index} is out of range 0..{n - 1}")
        return index


def instruction_pool(config: Config) -> InstructionPool | None:
    """The training pool of ``config`` (None without instructions), with ``data.template`` if it sets one."""
    if not config.data.instructions:
        return None
    pool = InstructionPool.from_file(config.data.instruction_pool) if config.data.instruction_pool else InstructionPool.default()
    return dataclasses.replace(pool, template=config.data.template) if config.data.template else pool


def trained_query_setup(config: Config) -> dict[str, Any]:
    """What evaluating an editor needs to query it as it was trained; saved as "queries" in its editor_config.json."""
    pool = instruction_pool(config)
    return {"instructions": config.data.instructions, "instruction_pool": config.data.instruction_pool,
            "template": pool.template if pool else None, "answer_stop": config.training.answer_stop,
            "edit_forms": list(config.training.edit_forms)}
