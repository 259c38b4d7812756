"""Instruction pools: the rendered template, ConvSent placeholders, the seen/unseen split, bad pool files."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from instructedit.records import TASKS, ConvSentExtras, EditRecord
from instructedit.tasks.instructions import InstructionPool

PROMPT = "The capital of France is"
# description 0 of counterfact, pinned so that a change of wording or template shows
DEFAULT_CF_0 = "Replace a stored fact about an entity with a counterfactual one, and leave facts about other entities untouched."
PUBLISHED_CF_0 = "A dataset designed to challenge and assess models on their ability to capture often overlooked tail entities."


def published_path(shared_data_dir: Path) -> Path:
    return shared_data_dir / "instructions" / "instructedit_descriptions.json"


def counterfact_record(source: str = "train_cf.json#0", prompt: str = PROMPT) -> EditRecord:
    return EditRecord(task="counterfact", prompt=prompt, target_new="Paris", source=source)


def convsent_record(label: str = "negative", topic: str = "Estero") -> EditRecord:
    extras = ConvSentExtras(
        topic=topic, label=label, target_responses=("It is awful.",), opposite_responses=("I really like it.",)
    )
    return EditRecord(task="convsent", prompt=f"What do you think of {topic}?", target_new="It is awful.",
                      convsent=extras, source="blender_val.json#3")


@pytest.fixture(params=["default", "published"])
def pool(request: pytest.FixtureRequest, shared_data_dir: Path) -> InstructionPool:
    if request.param == "default":
        return InstructionPool.default()
    return InstructionPool.from_file(published_path(shared_data_dir))


# --- rendering ---------------------------------------------------------------------------------


def test_render_golden_default() -> None:
    rendered = InstructionPool.default().render(counterfact_record(), PROMPT, 0)
    assert rendered == f"Task: counterfact\nDescription: {DEFAULT_CF_0}\nInput: The capital of France is"


def test_render_golden_published(shared_data_dir: Path) -> None:
    rendered = InstructionPool.from_file(published_path(shared_data_dir)).render(counterfact_record(), PROMPT, 0)
    assert rendered == f"Task: counterfact\nDescription: {PUBLISHED_CF_0}\nInput: The capital of France is"


def test_render_uses_the_given_prompt_and_index(pool: InstructionPool) -> None:
    record = counterfact_record()
    rendered = pool.render(record, "A rephrase of it", 9)
    assert rendered == f"Task: counterfact\nDescription: {pool.descriptions['counterfact'][9]}\nInput: A rephrase of it"


@pytest.mark.parametrize("label", ["positive", "negative"])
def test_convsent_placeholders_are_filled(pool: InstructionPool, label: str) -> None:
    record = convsent_record(label=label, topic="Estero")
    for index in range(len(pool.descriptions["convsent"])):
        assert "[LABEL]" in pool.descriptions["convsent"][index] and "[TOPIC]" in pool.descriptions["convsent"][index]
        text = pool.description(record, index)
        assert "[" not in text and "]" not in text
        assert label in text and "Estero" in text
        rendered = pool.render(record, record.prompt, index)
        assert "[" not in rendered
        assert rendered.startswith(f"Task: convsent\nDescription: {text}\nInput: ")


def test_convsent_description_without_convsent_fields_fails(pool: InstructionPool) -> None:
    record = EditRecord(task="convsent", prompt="What do you think of Estero?", target_new="Bad.", source="odd.json#7")
    with pytest.raises(ValueError, match=r"odd\.json#7.*no ConvSent fields"):
        pool.render(record, record.prompt, 0)


def test_unknown_task_lists_the_pool_tasks(tmp_path: Path) -> None:
    data = {"descriptions": {"counterfact": ["Edit it."]}, "seen": [0], "unseen": []}
    (tmp_path / "one.json").write_text(json.dumps(data))
    small = InstructionPool.from_file(tmp_path / "one.json")
    with pytest.raises(ValueError, match=r"no descriptions for task 'zsre'.*counterfact"):
        small.render(EditRecord(task="zsre", prompt="Q?", target_new="A"), "Q?", 0)


# --- the seen/unseen split ---------------------------------------------------------------------


def test_seen_unseen_split(pool: InstructionPool) -> None:
    assert pool.seen == tuple(range(9))
    assert pool.unseen == (9,)
    assert pool.evaluation_index("seen") == 0
    assert pool.evaluation_index("unseen") == 9
    assert pool.evaluation_index("3") == 3
    assert pool.evaluation_index(7) == 7


@pytest.mark.parametrize("index", [10, "10", -1])
def test_evaluation_index_out_of_range(pool: InstructionPool, index: int | str) -> None:
    with pytest.raises(ValueError, match="out of range 0..9"):
        pool.evaluation_index(index)


def test_training_index_deterministic_seen_and_varied(pool: InstructionPool) -> None:
    records = [counterfact_record(source=f"train_cf.json#{i}", prompt=f"Prompt number {i} is") for i in range(50)]
    first = [pool.training_index(r, seed=0) for r in records]
    assert first == [pool.training_index(r, seed=0) for r in records]  # same every epoch
    assert first == [InstructionPool.default().training_index(r, seed=0) for r in records]  # and every run
    assert set(first) <= set(pool.seen)
    assert len(set(first)) >= 3
    other_seed = [pool.training_index(r, seed=1) for r in records]
    assert set(other_seed) <= set(pool.seen)
    assert other_seed != first


def test_training_index_only_draws_seen_indices(tmp_path: Path) -> None:
    data = {"descriptions": {"counterfact": [f"Description {i}." for i in range(10)]}, "seen": [1, 4, 6], "unseen": [0, 9]}
    (tmp_path / "pool.json").write_text(json.dumps(data))
    pool = InstructionPool.from_file(tmp_path / "pool.json")
    drawn = {pool.training_index(counterfact_record(source=f"f.json#{i}"), seed) for i in range(60) for seed in (0, 1)}
    assert drawn == {1, 4, 6}
    assert pool.evaluation_index("seen") == 1 and pool.evaluation_index("unseen") == 0


# --- the pools themselves ----------------------------------------------------------------------


def test_default_pool_has_ten_descriptions_per_task_in_its_own_words(shared_data_dir: Path) -> None:
    default = InstructionPool.default()
    published = InstructionPool.from_file(published_path(shared_data_dir))
    assert set(default.descriptions) == set(TASKS)
    for task in TASKS:
        assert len(default.descriptions[task]) == 10
        assert len(set(default.descriptions[task])) == 10
        assert not set(default.descriptions[task]) & set(published.descriptions[task]), task


# --- bad pool files ----------------------------------------------------------------------------

GOOD = {"descriptions": {"counterfact": [f"Description {i}." for i in range(10)]}, "seen": list(range(9)), "unseen": [9]}


@pytest.mark.parametrize(
    ("name", "content", "why"),
    [
        ("invalid.json", '{"descriptions": [', "not valid JSON"),
        ("no_descriptions.json", json.dumps({k: v for k, v in GOOD.items() if k != "descriptions"}), "missing field 'descriptions'"),
        ("overlap.json", json.dumps({**GOOD, "seen": [0, 1, 2], "unseen": [2, 9]}), r"\[2\] are both seen and unseen"),
        ("range.json", json.dumps({**GOOD, "unseen": [10]}), r"10 descriptions, indices \[10\] are out of range"),
        ("template.json", json.dumps({**GOOD, "template": "Task: {task}\nDescription: {description}"}), r"lacks the slot \{prompt\}"),
    ],
)
def test_bad_pool_file_names_the_file(tmp_path: Path, name: str, content: str, why: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(ValueError, match=rf"{re.escape(str(path))}.*{why}"):
        InstructionPool.from_file(path)


def test_missing_pool_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.json"
    with pytest.raises(FileNotFoundError, match=re.escape(str(path))):
        InstructionPool.from_file(path)


def test_good_pool_file_loads(tmp_path: Path) -> None:
    path = tmp_path / "good.json"
    path.write_text(json.dumps(GOOD))
    pool = InstructionPool.from_file(path)
    assert pool.source == str(path)
    assert pool.render(counterfact_record(), PROMPT, 9) == f"Task: counterfact\nDescription: Description 9.\nInput: {PROMPT}"
