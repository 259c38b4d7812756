"""Format loaders: real files, alias normalization, and bad input that must fail loudly or be skipped."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from instructedit.tasks import loaders
from instructedit.tasks.loaders import LOADERS, RECORD_KEYS, detect_format, load_records, normalize_aliases

# file -> (format, default task, records in file, records loaded, probes dropped)
REAL_FILES = {
    "counterfact/train_cf.json": ("knowedit", "counterfact", 1428, 1428, 2),
    "recent/recent_train.json": ("knowedit", "wikirecent", 570, 570, 7),
    "convsent/blender_val.json": ("convsent", "convsent", 799, 799, 0),
    "convsent/blender_test.json": ("convsent", "convsent", 800, 800, 0),
    "zsre/zsre_mend_eval_portability_gpt4.json": ("zsre", "zsre", 1037, 1037, 0),
    "zsre/zsre_mend_train-1k.json": ("zsre", "zsre", 1000, 998, 0),
    "counterfact/counterfact-train.json": ("easyedit-counterfact", "counterfact", 10000, 10000, 0),
    "counterfact/counterfact-val.json": ("easyedit-counterfact", "counterfact", 1919, 1919, 0),
}
# The only records the real data skips: two zsRE train edits whose new answer 'alt' is "".
REAL_SKIPS = {"zsre/zsre_mend_train-1k.json": [(534, "empty field 'alt' (target_new)"), (723, "empty field 'alt' (target_new)")]}


def write_json(path: Path, data: Any) -> Path:
    path.write_text(json.dumps(data), encoding="utf-8")
    return path


@pytest.mark.parametrize("rel", sorted(REAL_FILES))
def test_real_file_loads_with_its_loader(shared_data_dir: Path, rel: str) -> None:
    fmt, task, in_file, loaded, dropped = REAL_FILES[rel]
    path = shared_data_dir / rel
    result = LOADERS[fmt](path, None)
    assert (result.format, result.task, result.path) == (fmt, task, path)
    assert (result.n_in_file, len(result.records), result.dropped_items) == (in_file, loaded, dropped)
    assert result.skipped == REAL_SKIPS.get(rel, [])
    sources = [record.source for record in result.records]
    skipped = {index for index, _ in result.skipped}
    assert sources == [f"{path.name}#{i}" for i in range(in_file) if i not in skipped]
    assert all(record.task == task and record.prompt and record.target_new for record in result.records)


def test_real_files_have_no_unknown_keys(shared_data_dir: Path, caplog: pytest.LogCaptureFixture) -> None:
    for rel, (fmt, *_) in sorted(REAL_FILES.items()):
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="instructedit.tasks.loaders"):
            result = LOADERS[fmt](shared_data_dir / rel, None)
        assert result.ignored_keys == {}, rel
        assert "ignored record keys" not in caplog.text, rel


def test_every_data_file_is_auto_detected(shared_data_dir: Path) -> None:
    files = sorted(p.relative_to(shared_data_dir).as_posix() for p in shared_data_dir.rglob("*.json"))
    record_files = [rel for rel in files if not rel.startswith("instructions/")]
    assert sorted(record_files) == sorted(REAL_FILES)
    for rel in record_files:
        result = load_records(shared_data_dir / rel)
        assert detect_format(shared_data_dir / rel) == result.format == REAL_FILES[rel][0]
        assert result.skipped == REAL_SKIPS.get(rel, [])


def test_knowedit_counterfact_record(shared_data_dir: Path) -> None:
    record = load_records(shared_data_dir / "counterfact/train_cf.json").records[0]
    assert (record.subject, record.target_new, record.ground_truth) == ("Goursez Vreizh", "Franche-Comté", "France")
    assert record.rephrase == ()
    assert [(q.kind, q.answer) for q in record.portability] == [("Reasoning", "Besançon"), ("Subject_Aliasing", "Franche-Comté")]
    assert [(q.kind, q.answer) for q in record.locality] == [("Relation_Specificity", "Jean Le Fustec")]
    # record 630 has ground_truth "": the edit is kept, the old answer is unknown
    assert load_records(shared_data_dir / "counterfact/train_cf.json").records[630].ground_truth is None


def test_knowedit_recent_alias_lists(shared_data_dir: Path) -> None:
    result = load_records(shared_data_dir / "recent/recent_train.json")
    first = result.records[0]
    assert first.ground_truth is None and first.portability == ()
    assert first.locality[1].answer == "Soviet Union" and "USSR" in first.locality[1].aliases
    # [[], ["Honorary Doctor at Karolinska Institutet"]]: the empty alias list is skipped
    award = [q for q in result.records[3].locality if q.prompt == "The name of the award Alfhild Tamm won is"]
    doctor = "Honorary Doctor at Karolinska Institutet"
    assert [(q.answer, q.aliases) for q in award] == [(doctor, (doctor,))]
    # [[]] and [[], []] answers are dropped probes, not skipped records
    assert all(q.answer for record in result.records for q in record.locality + record.portability)


def test_zsre_and_counterfact_records(shared_data_dir: Path) -> None:
    zsre = load_records(shared_data_dir / "zsre/zsre_mend_eval_portability_gpt4.json").records[0]
    assert (zsre.prompt, zsre.target_new, zsre.ground_truth) == (
        "When was the inception of IAAF Combined Events Challenge?", "2006", "1998")
    assert zsre.rephrase == ("When was the IAAF Combined Events Challenge launched?",)
    assert [(q.kind, q.answer) for q in zsre.locality] == [("NQ", "The String")]
    assert [(q.kind, q.answer) for q in zsre.portability] == [("Reasoning", "Athletics")]
    cf = load_records(shared_data_dir / "counterfact/counterfact-train.json").records[0]
    assert (cf.prompt, cf.target_new, cf.ground_truth, cf.rephrase) == (
        "Toko Yasuda, the", "piano", "guitar", ("Toko Yasuda is incredible at",))
    assert [(q.prompt, q.answer, q.kind) for q in cf.locality] == [("John Lennon performs on the", "guitar", "Neighborhood")]


def test_convsent_records(shared_data_dir: Path) -> None:
    records = load_records(shared_data_dir / "convsent/blender_test.json").records
    first, second = records[0], records[1]
    assert first.prompt == "What do you think of Estero?" and first.subject == "Estero"
    assert first.convsent is not None and second.convsent is not None
    assert (first.convsent.label, second.convsent.label) == ("positive", "negative")
    assert first.target_new == first.convsent.target_responses[0] == "I really like his style."
    assert first.convsent.opposite_responses[0] == "Well, it has some bad reviews on Glass Door."
    assert [(q.prompt, q.kind) for q in first.locality] == [("What do you think of Tallahassee?", "OtherTopic")]
    assert records[-1].locality[0].prompt == "What do you think of Estero?"  # wraps around
    labels = [r.convsent.label for r in records if r.convsent]
    assert labels.count("positive") == labels.count("negative") == 400


def test_explicit_task_overrides_default(shared_data_dir: Path) -> None:
    result = load_records(shared_data_dir / "recent/recent_train.json", fmt="knowedit", task="counterfact")
    assert result.task == "counterfact" and {r.task for r in result.records} == {"counterfact"}
    with pytest.raises(ValueError, match="unknown task 'nope'; valid tasks: counterfact"):
        load_records(shared_data_dir / "recent/recent_train.json", task="nope")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("  Paris ", ("Paris",)),
        ("", ()),
        (None, ()),
        (["Paris", " Lutetia", ""], ("Paris", "Lutetia")),
        ([["Paris", "City of Light"], ["Lutetia"]], ("Paris", "City of Light", "Lutetia")),
        ([[], ["Honorary Doctor"]], ("Honorary Doctor",)),
        ([[], []], ()),
        ([["a", "b"], ["a"], "b"], ("a", "b")),
    ],
)
def test_normalize_aliases(value: Any, expected: tuple[str, ...]) -> None:
    assert normalize_aliases(value) == expected


def test_normalize_aliases_rejects_non_strings() -> None:
    with pytest.raises(TypeError, match="got int"):
        normalize_aliases([["Paris"], 3])


def test_knowedit_ground_truth_shapes(tmp_path: Path) -> None:
    def probe(truth: Any) -> dict[str, Any]:
        return {"prompt": "Q?", "ground_truth": truth}

    rows = [
        {"subject": "s", "prompt": "p0", "target_new": "t0", "ground_truth": "old",
         "locality": {"Relation_Specificity": [probe("str answer")]}},
        {"subject": "s", "prompt": "p1", "target_new": "t1", "ground_truth": ["old1", "old2"], "rephrase": "r1",
         "portability": {"Reasoning": [probe(["a", "b"])]}},
        {"subject": "s", "prompt": "p2", "target_new": "t2", "ground_truth": [["", "old3"]], "rephrase": ["r2", " r3 "],
         "locality": {"Forgetfulness": [probe([["x", "y"], ["z"]]), probe([[], ["w"]]), probe([[]]), probe("")]}},
    ]
    result = load_records(write_json(tmp_path / "mini.json", rows))
    assert (result.format, result.task, result.skipped, result.dropped_items) == ("knowedit", "counterfact", [], 2)
    r0, r1, r2 = result.records
    assert [r.ground_truth for r in result.records] == ["old", "old1", "old3"]
    assert (r0.rephrase, r1.rephrase, r2.rephrase) == ((), ("r1",), ("r2", "r3"))
    assert [(q.answer, q.aliases, q.kind) for q in r0.locality] == [("str answer", ("str answer",), "Relation_Specificity")]
    assert [(q.answer, q.aliases, q.kind) for q in r1.portability] == [("a", ("a", "b"), "Reasoning")]
    assert [(q.answer, q.aliases) for q in r2.locality] == [("x", ("x", "y", "z")), ("w", ("w",))]
    assert [r.source for r in result.records] == ["mini.json#0", "mini.json#1", "mini.json#2"]


def test_knowedit_without_ground_truth_defaults_to_wikirecent(tmp_path: Path) -> None:
    path = write_json(tmp_path / "recent.json", [{"subject": "s", "prompt": "p", "target_new": "t"}])
    assert load_records(path).task == "wikirecent"


def test_bad_records_are_skipped_with_reasons(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [
        {"subject": "s", "prompt": "ok", "target_new": "fine"},
        {"subject": "s", "prompt": "p", "target_new": "   "},
        {"subject": "s", "target_new": "t"},
        {"subject": "s", "prompt": 7, "target_new": "t"},
        {"subject": "s", "prompt": "p", "target_new": "t", "locality": ["not", "an", "object"]},
        {"subject": "s", "prompt": "p", "target_new": "t", "ground_truth": {"a": 1}},
    ]
    with caplog.at_level(logging.WARNING, logger="instructedit.tasks.loaders"):
        result = load_records(write_json(tmp_path / "bad.json", rows), fmt="knowedit")
    assert [r.source for r in result.records] == ["bad.json#0"]
    reasons = dict(result.skipped)
    assert reasons[1] == "empty field 'target_new'"
    assert reasons[2] == "missing field 'prompt'"
    assert reasons[3] == "field 'prompt' is a int, expected a string"
    assert reasons[4].startswith("field 'locality' is a list")
    assert reasons[5] == "field 'ground_truth': expected a string or a list of strings, got dict"
    assert "bad.json: skipped 5 of 6 records" in caplog.text and "#1: empty field 'target_new'" in caplog.text


def test_zsre_and_convsent_skips(tmp_path: Path) -> None:
    zsre = [{"src": "", "alt": "a", "answers": ["b"], "rephrase": "r", "loc": "l", "loc_ans": "la"},
            {"src": "q", "alt": "a", "answers": [], "rephrase": "", "loc": "l", "loc_ans": ""}]
    result = load_records(write_json(tmp_path / "z.json", zsre))
    assert result.format == "zsre" and result.skipped == [(0, "empty field 'src' (prompt)")]
    kept = result.records[0]
    assert (kept.ground_truth, kept.rephrase, kept.locality, result.dropped_items) == (None, (), (), 1)

    convsent = [{"ent": "A", "pos": [" yes "], "neg": ["no"]}, {"ent": "B", "pos": ["yes"], "neg": ["", " "]},
                {"ent": "", "pos": ["y"], "neg": ["n"]}, {"ent": "D", "pos": [], "neg": ["n"]}]
    result = load_records(write_json(tmp_path / "c.json", convsent))
    assert result.skipped == [(1, "empty field 'neg' (no negative response)"), (2, "empty field 'ent' (topic)"),
                              (3, "empty field 'pos' (no positive response)")]
    (record,) = result.records
    assert record.convsent is not None and record.convsent.target_responses == ("yes",)
    assert [(q.prompt, q.answer) for q in record.locality] == [("What do you think of B?", "yes")]


def test_invalid_json_names_file_line_and_column(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"prompt": "p",,}\n]', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 2, column 18"):
        load_records(path)


def test_top_level_not_a_list(tmp_path: Path) -> None:
    path = write_json(tmp_path / "dict.json", {"prompt": "p"})
    with pytest.raises(ValueError, match=r"dict\.json: expected a top-level JSON list of records, got a JSON dict"):
        load_records(path, fmt="knowedit")


def test_record_not_an_object(tmp_path: Path) -> None:
    path = write_json(tmp_path / "rows.json", [{"prompt": "p", "target_new": "t", "subject": "s"}, ["p", "t"]])
    with pytest.raises(ValueError, match=r"rows\.json: record 1 is a JSON list, expected an object"):
        load_records(path)


def test_unknown_format_lists_valid_ones(tmp_path: Path) -> None:
    path = write_json(tmp_path / "x.json", [])
    with pytest.raises(ValueError, match="unknown data format 'rome'; valid formats: convsent, easyedit-counterfact, knowedit, zsre"):
        load_records(path, fmt="rome")


def test_undetectable_format(tmp_path: Path) -> None:
    path = write_json(tmp_path / "odd.json", [{"question": "q", "answer": "a"}])
    with pytest.raises(ValueError, match=r"odd\.json: cannot detect the format, record keys \['answer', 'question'\] match no known"):
        detect_format(path)
    with pytest.raises(ValueError, match=r"empty\.json: no records, cannot detect the format"):
        load_records(write_json(tmp_path / "empty.json", []))


def test_knowedit_rephrase_prompt_is_the_paraphrase(tmp_path: Path) -> None:
    rows = [
        # KnowEdit's ZsRE test file: 'rephrase_prompt', a list of old answers, and 'cond'
        {"subject": "s", "prompt": "p0", "target_new": "t0", "ground_truth": ["old"], "rephrase_prompt": " r0 ",
         "cond": "old >> t0 || p0"},
        {"subject": "s", "prompt": "p1", "target_new": "t1", "rephrase_prompt": ["r1", "r2"]},
        {"subject": "s", "prompt": "p2", "target_new": "t2", "rephrase": ["a", "b"], "rephrase_prompt": ["b", "c"]},
        {"subject": "s", "prompt": "p3", "target_new": "t3", "rephrase_prompt": 3},
    ]
    result = load_records(write_json(tmp_path / "zsre_knowedit.json", rows))
    assert result.format == "knowedit" and result.ignored_keys == {}
    assert [r.rephrase for r in result.records] == [("r0",), ("r1", "r2"), ("a", "b", "c")]
    assert result.skipped == [(3, "field 'rephrase_prompt': expected a string or a list of strings, got int")]


def test_unknown_keys_warn_once_per_file(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    rows = [{"subject": "s", "prompt": f"p{i}", "target_new": "t", "extra_probe": "x"} for i in range(50)]
    rows[0]["note"] = "n"
    with caplog.at_level(logging.WARNING, logger="instructedit.tasks.loaders"):
        result = load_records(write_json(tmp_path / "odd_keys.json", rows))
    assert len(result.records) == 50 and result.ignored_keys == {"extra_probe": 50, "note": 1}
    (warning,) = caplog.records
    message = warning.getMessage()
    assert warning.levelno == logging.WARNING and "odd_keys.json" in message
    assert "'extra_probe' (50 of 50 records), 'note' (1 of 50 records)" in message


class _Tracked(dict):  # type: ignore[type-arg]
    """A record that notes every key the converter looks up, so RECORD_KEYS can be checked against the code."""

    def __init__(self, row: dict[str, Any], touched: set[str]) -> None:
        super().__init__(row)
        self.touched = touched

    def __getitem__(self, key: str) -> Any:
        self.touched.add(key)
        return super().__getitem__(key)

    def get(self, key: str, default: Any = None) -> Any:
        self.touched.add(key)
        return super().get(key, default)

    def __contains__(self, key: object) -> bool:
        self.touched.add(str(key))
        return super().__contains__(key)


FULL_ROWS: dict[str, dict[str, Any]] = {
    "knowedit": {"subject": "s", "prompt": "p", "target_new": "t", "ground_truth": "g", "rephrase": "r",
                 "rephrase_prompt": "rp", "locality": {"Forgetfulness": [{"prompt": "lp", "ground_truth": "la"}]},
                 "portability": {"Reasoning": [{"prompt": "pp", "ground_truth": "pa"}]}, "cond": "g >> t || p"},
    "zsre": {"subject": "s", "src": "p", "alt": "t", "answers": ["g"], "rephrase": "r", "loc": "l", "loc_ans": "la",
             "portability": {"New Question": "q", "New Answer": "a"}, "pred": "g", "cond": "g >> t || p", "case_id": 1},
    "easyedit-counterfact": {"case_id": 1, "subject": "s", "prompt": "p", "target_new": "t", "ground_truth": "g",
                             "rephrase_prompt": "r", "locality_prompt": "l", "locality_ground_truth": "la"},
    "convsent": {"ent": "e", "pos": ["y"], "neg": ["n"]},
}


@pytest.mark.parametrize("fmt", sorted(RECORD_KEYS))
def test_record_keys_match_what_the_converter_reads(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    full = FULL_ROWS[fmt]
    assert set(full) == RECORD_KEYS[fmt].known
    assert not RECORD_KEYS[fmt].read & set(RECORD_KEYS[fmt].unused)
    touched: set[str] = set()
    other = dict(full, **{"ent": "f"}) if fmt == "convsent" else full  # a second topic, for ConvSent's locality
    rows = [_Tracked(full, touched), _Tracked(other, touched)]
    monkeypatch.setattr(loaders, "read_json_records", lambda path: rows)
    result = LOADERS[fmt](tmp_path / "unused.json", None)
    assert len(result.records) == 2 and result.ignored_keys == {}
    assert touched == RECORD_KEYS[fmt].read


def test_known_keys_do_not_warn(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="instructedit.tasks.loaders"):
        for fmt, row in FULL_ROWS.items():
            result = load_records(write_json(tmp_path / f"{fmt}.json", [row]), fmt=fmt)
            assert len(result.records) == 1 and result.ignored_keys == {}
    assert caplog.records == []
