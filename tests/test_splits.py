"""Task splits and mixtures: deterministic, disjoint, complete, balanced, and held-out tasks refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from instructedit.tasks.splits import (
    HELD_OUT_TASKS,
    SPLITS,
    TASK_SOURCES,
    TaskSplits,
    build_mixture,
    collect_stats,
    default_data_dir,
    format_stats,
    load_task_splits,
)

# seed 0, fractions 0.8/0.1/0.1; zsre: 998 usable train-1k records carved 8:1, test = the eval file
EXPECTED_SIZES = {
    "counterfact": {"train": 1142, "val": 143, "test": 143},
    "wikirecent": {"train": 456, "val": 57, "test": 57},
    "convsent": {"train": 1279, "val": 160, "test": 160},
    "zsre": {"train": 887, "val": 111, "test": 1037},
}
# the first validation records of counterfact at seed 0, pinned so a change of permutation shows
PINNED_CF_VAL = ["train_cf.json#822", "train_cf.json#1113", "train_cf.json#805"]


@pytest.fixture(scope="module")
def splits(shared_data_dir: Path) -> dict[str, TaskSplits]:
    return {task: load_task_splits(task, shared_data_dir, seed=0) for task in TASK_SOURCES}


def sources(records: list) -> list[str]:
    return [record.source for record in records]


def test_sizes_add_up(splits: dict[str, TaskSplits]) -> None:
    for task, s in splits.items():
        assert s.sizes() == EXPECTED_SIZES[task]
        assert sum(s.sizes().values()) == sum(s.loaded.values())
        assert s.files == TASK_SOURCES[task].files and s.seed == 0 and s.fractions == (0.8, 0.1, 0.1)
        assert all(record.task == task for name in SPLITS for record in s.split(name))
    assert splits["zsre"].skipped["zsre/zsre_mend_train-1k.json"] == [
        (534, "empty field 'alt' (target_new)"), (723, "empty field 'alt' (target_new)")]
    assert (splits["counterfact"].dropped_items, splits["wikirecent"].dropped_items) == (2, 7)


def test_splits_are_disjoint_and_cover_the_files(splits: dict[str, TaskSplits]) -> None:
    for task, s in splits.items():
        ids = [set(sources(s.split(name))) for name in SPLITS]
        assert sum(len(i) for i in ids) == sum(s.sizes().values())  # no duplicate inside a split
        assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2]), task
    zsre = splits["zsre"]
    assert {sid.split("#")[0] for sid in sources(zsre.test)} == {"zsre_mend_eval_portability_gpt4.json"}
    assert {sid.split("#")[0] for sid in sources(zsre.train + zsre.val)} == {"zsre_mend_train-1k.json"}
    convsent = {sid.split("#")[0] for sid in sources(splits["convsent"].test)}
    assert convsent == {"blender_val.json", "blender_test.json"}  # pooled, then carved


def test_splits_are_deterministic(shared_data_dir: Path, splits: dict[str, TaskSplits]) -> None:
    again = load_task_splits("counterfact", shared_data_dir, seed=0)
    for name in SPLITS:
        assert again.split(name) == splits["counterfact"].split(name)
    # pinned: random.Random(f"{seed}:{task}") is the same permutation on every run and machine
    assert sources(splits["counterfact"].val[:3]) == PINNED_CF_VAL


def test_different_seeds_differ(shared_data_dir: Path, splits: dict[str, TaskSplits]) -> None:
    other = load_task_splits("counterfact", shared_data_dir, seed=1)
    assert other.sizes() == splits["counterfact"].sizes()
    assert set(sources(other.test)) != set(sources(splits["counterfact"].test))


def test_bad_fractions_and_names(shared_data_dir: Path) -> None:
    with pytest.raises(ValueError, match=r"fractions must be three non-negative numbers .* summing to 1"):
        load_task_splits("counterfact", shared_data_dir, fractions=(0.8, 0.3, 0.1))
    with pytest.raises(ValueError, match="unknown task 'mquake'; valid tasks: counterfact, wikirecent, convsent, zsre"):
        load_task_splits("mquake", shared_data_dir)
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        load_task_splits("wikirecent", shared_data_dir).split("dev")


def test_missing_task_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"task 'wikirecent' needs .*recent_train\.json.*INSTRUCTEDIT_DATA"):
        load_task_splits("wikirecent", tmp_path)


def test_default_data_dir(shared_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("INSTRUCTEDIT_DATA", raising=False)
    assert default_data_dir().resolve() == shared_data_dir.resolve()
    monkeypatch.setenv("INSTRUCTEDIT_DATA", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.setenv("INSTRUCTEDIT_DATA", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="set INSTRUCTEDIT_DATA or pass --data-dir"):
        default_data_dir()


def test_mixture_balances_convsent(shared_data_dir: Path, splits: dict[str, TaskSplits]) -> None:
    mixture = build_mixture(["convsent", "counterfact", "wikirecent"], data_dir=shared_data_dir, seed=0)
    assert mixture.tasks == ("counterfact", "wikirecent", "convsent")
    assert mixture.counts == {"counterfact": 1142, "wikirecent": 456, "convsent": 1142}
    assert mixture.available["convsent"] == 1279 and mixture.caps["convsent"] == 1142
    assert len(mixture.records) == sum(mixture.counts.values())
    assert len(set(sources(mixture.records))) == len(mixture.records)
    train_ids = {task: set(sources(splits[task].train)) for task in mixture.tasks}
    assert all(record.source in train_ids[record.task] for record in mixture.records)
    assert [r.task for r in mixture.records[:300]].count("counterfact") not in (0, 300)  # interleaved
    # same arguments in another order: the same mixture
    again = build_mixture(["wikirecent", "counterfact", "convsent"], data_dir=shared_data_dir, seed=0)
    assert sources(again.records) == sources(mixture.records)
    recorded = json.loads(json.dumps(mixture.to_dict()))
    assert recorded["seed"] == 0 and recorded["counts"] == mixture.counts and recorded["held_out_tasks"] == ["zsre"]


def test_mixture_caps(shared_data_dir: Path) -> None:
    unbalanced = build_mixture(["counterfact", "convsent"], data_dir=shared_data_dir, balance=False)
    assert unbalanced.counts == {"counterfact": 1142, "convsent": 1279}
    capped = build_mixture(["counterfact", "wikirecent", "convsent"], data_dir=shared_data_dir, max_per_task=500)
    assert capped.counts == {"counterfact": 500, "wikirecent": 456, "convsent": 500}
    alone = build_mixture(["convsent"], split="val", data_dir=shared_data_dir)
    assert alone.counts == {"convsent": 160} and alone.caps == {"convsent": None}
    other_seed = build_mixture(["counterfact", "wikirecent"], split="val", data_dir=shared_data_dir, seed=1)
    assert other_seed.counts == {"counterfact": 143, "wikirecent": 57} and other_seed.seed == 1


def test_held_out_task_is_refused(shared_data_dir: Path) -> None:
    assert HELD_OUT_TASKS == ("zsre",)
    with pytest.raises(ValueError, match=r"task\(s\) \['zsre'\] are held out from training.*exclude_held_out=False.*data\.allow_held_out=true"):
        build_mixture(["counterfact", "zsre"], data_dir=shared_data_dir)
    evaluation = build_mixture(["zsre"], split="test", data_dir=shared_data_dir, exclude_held_out=False)
    assert evaluation.counts == {"zsre": 1037}
    with pytest.raises(ValueError, match="tasks listed more than once"):
        build_mixture(["counterfact", "counterfact"], data_dir=shared_data_dir)


def test_stats_add_up(shared_data_dir: Path) -> None:
    stats = collect_stats(shared_data_dir, seed=0)
    by_file = {f.file: f for f in stats.files}
    for task, s in stats.tasks.items():
        assert sum(s.sizes().values()) == sum(by_file[rel].loaded for rel in TASK_SOURCES[task].files)
    for f in stats.files:
        assert f.loaded + f.skipped == f.in_file and not f.error
        assert sum(f.reasons.values()) == f.skipped
    assert {rel: f.in_file for rel, f in by_file.items()} == {
        "counterfact/train_cf.json": 1428, "recent/recent_train.json": 570, "convsent/blender_val.json": 799,
        "convsent/blender_test.json": 800, "zsre/zsre_mend_train-1k.json": 1000,
        "zsre/zsre_mend_eval_portability_gpt4.json": 1037, "counterfact/counterfact-train.json": 10000,
        "counterfact/counterfact-val.json": 1919,
    }
    assert by_file["counterfact/counterfact-train.json"].used_by is None
    assert by_file["zsre/zsre_mend_train-1k.json"].reasons == {"empty field 'alt' (target_new)": 2}


def test_format_stats_text(shared_data_dir: Path) -> None:
    text = format_stats(shared_data_dir, seed=0)
    rows = {line.split()[0]: line.split() for line in text.splitlines() if line.strip()}
    assert rows["counterfact"][1:5] == ["1142", "143", "143", "1428"]
    assert rows["zsre"][1:5] == ["887", "111", "1037", "2035"] and rows["zsre"][-1] == "yes"
    assert rows["counterfact/counterfact-val.json"][1:7] == ["(unused)", "easyedit-counterfact", "counterfact", "1919", "1919", "0"]
    zsre_line = next(line for line in text.splitlines() if line.startswith("zsre/zsre_mend_train-1k.json"))
    assert zsre_line.endswith("998        2  empty field 'alt' (target_new) x2")
    assert "instructions/" not in text and "split seed: 0" in text
