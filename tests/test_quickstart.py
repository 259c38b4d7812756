"""The quickstart on a tiny model with a tiny budget: train, cache, reuse, retrain, demo table, and its command."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml

from instructedit.api import load_editor, score_target
from instructedit.evaluation.generation import NO_ANSWER, answer_budget, exact_match, first_line, greedy_generate, same_answer, shown
from instructedit.config import load_config
from instructedit.models.loading import load_model
from instructedit.quickstart import (
    DEMO_EDITS, LOCALITY_PROBES, MARKER, QuickstartResult, config_hash, default_run_dir, duration, format_report, frame_questions,
    quickstart_config, run_demo,
    run_quickstart,
)
from instructedit.commands.edit import add_edit_parser
from instructedit.commands.quickstart import add_quickstart_parser

ROOT = Path(__file__).resolve().parents[1]
# tiny-model settings (as configs/tiny.yaml), so a quickstart run takes seconds
TINY = ["model.max_length=250", "model.last_n_layers=2", "data.max_per_task=6", "editor.rank=16", "training.lr=1.0e-3",
        "training.val_every=2", "training.val_size=4", "training.checkpoint_every=2"]
BUDGET_KEYS = {"max_steps", "val_every", "val_size", "early_stop_patience", "checkpoint_every", "edit_scales", "validate_at_start"}


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def test_packaged_config_is_the_recommended_least_squares_config_with_a_short_budget() -> None:
    quick = quickstart_config().to_dict()
    full = load_config(ROOT / "configs" / "smollm2-135m" / "least-squares.yaml").to_dict()
    for section in ("model", "data", "editor", "evaluation"):
        assert quick[section] == full[section], section
    assert {k: v for k, v in quick["training"].items() if k not in BUDGET_KEYS | {"lr"}} == \
           {k: v for k, v in full["training"].items() if k not in BUDGET_KEYS | {"lr"}}
    assert quick["training"]["max_steps"] * 7 < 4 * 60  # ~7 s per optimizer step (8 edits) on 2 CPU cores
    assert set(quick["training"]["edit_scales"]) <= set(full["training"]["edit_scales"])
    assert quickstart_config(budget_steps=7).training.max_steps == 7
    assert quickstart_config(model_name="yes").model.name == "yes"  # not YAML-parsed into a bool


def test_cache_folder_is_keyed_by_the_effective_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path))
    a, b = quickstart_config(), quickstart_config(budget_steps=10)
    assert default_run_dir(a) == tmp_path / "editors" / f"quickstart-{config_hash(a)}"
    assert config_hash(a) == config_hash(quickstart_config()) and config_hash(a) != config_hash(b)
    # config fields added later (at their defaults: LATER_FIELDS) keep the key of the editors users have cached; a change of
    # the packaged quickstart config itself is meant to change it (then update this)
    assert config_hash(a) == "62ffa097fac3"


def test_quickstart_trains_caches_and_reuses(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    first = run_quickstart(model_name=str(tiny_gpt2_dir), overrides=TINY, budget_steps=2, show_progress=False)
    assert first.trained and first.run_dir.parent == tmp_path / "cache" / "editors"
    assert first.editor_dir == first.run_dir / "calibrated"  # least squares: calibrated with a preservation sample
    calibration = json.loads((first.editor_dir / "calibration.json").read_text())
    assert calibration["preservation"]["weight"] == 1000 and calibration["chosen"] in (2.0, 3.0)
    assert json.loads((first.run_dir / MARKER).read_text())["complete"] is True
    card = (first.editor_dir / "README.md").read_text()
    assert "## Training data" in card and "counterfact" in card
    assert (first.editor_dir / "training_config.yaml").is_file()
    assert len(first.outcomes) == len(DEMO_EDITS) and first.instruction == 0
    for o in first.outcomes:
        assert 0 <= o.acc_before <= 1 and 0 <= o.acc_after <= 1 and 0 <= o.locality <= 1 and 0 <= o.p_after <= 1
        assert isinstance(o.said_before, str) and isinstance(o.said_after, str) and "\n" not in o.said_after
        assert o.exact_after in (0.0, 1.0) and 0 <= o.gen_locality <= 1
    second = run_quickstart(model_name=str(tiny_gpt2_dir), overrides=TINY, budget_steps=2, show_progress=False)
    assert not second.trained and second.run_dir == first.run_dir
    assert [o.acc_after for o in second.outcomes] == [o.acc_after for o in first.outcomes]  # the same editor, the same edits
    report = format_report(second)
    assert "reused from the cache" in report and "The capital of France is -> Rome" in report
    assert "reliability (target token accuracy, wrapped prompt)" in report and "locality" in report and "time:" in report
    # the headline is what the model says, above the teacher-forced scores
    assert report.index("the model says before -> after") < report.index("Teacher-forced scores")
    assert shown(second.outcomes[0].said_after) in report and "generation locality" in report
    # a cached run calibrated otherwise (an older version's calibration) is calibrated again, not retrained
    import instructedit.quickstart as quickstart

    assert json.loads((first.run_dir / MARKER).read_text())["calibration"] == quickstart.calibration_key()
    monkeypatch.setitem(quickstart.CALIBRATION, "scales", (2.0,))
    weights = (first.run_dir / "best" / "editor.safetensors").read_bytes()
    third = run_quickstart(model_name=str(tiny_gpt2_dir), overrides=TINY, budget_steps=2, show_progress=False)
    assert not third.trained and (first.run_dir / "best" / "editor.safetensors").read_bytes() == weights
    assert third.calibrated_again and not second.calibrated_again and "reused from the cache, calibrated again in" in format_report(third)
    assert json.loads((third.editor_dir / "calibration.json").read_text())["chosen"] == 2.0
    assert json.loads((first.run_dir / MARKER).read_text())["calibration"]["scales"] == [2.0]


def test_output_folder_retrain_and_protection(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    kwargs = dict(model_name=str(tiny_gpt2_dir), overrides=TINY, output=out, show_progress=False, edits=DEMO_EDITS[:1], probes=LOCALITY_PROBES[:2])
    assert run_quickstart(budget_steps=1, **kwargs).trained
    with pytest.raises(ValueError, match="another config"):
        run_quickstart(budget_steps=2, **kwargs)
    again = run_quickstart(budget_steps=2, retrain=True, **kwargs)
    assert again.trained and json.loads((out / "summary.json").read_text())["steps"] == 2
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not a quickstart run folder"):
        run_quickstart(budget_steps=1, retrain=True, **{**kwargs, "output": foreign})
    assert (foreign / "notes.txt").read_text() == "mine"


def test_demo_edits_are_single_and_restored(tiny_llama_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path]) -> None:
    model, tok = load_model(str(tiny_llama_dir))
    editor = load_editor(save_tiny_editor(tiny_llama_dir, tmp_path / "editor"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    outcomes = run_demo(editor, model, tok)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [o.edit for o in outcomes] == list(DEMO_EDITS)
    assert any(o.locality < 1 or o.p_after != o.p_before for o in outcomes)  # the (strong, untrained) edits do something
    unedited = run_demo(load_editor(save_tiny_editor(tiny_llama_dir, tmp_path / "zero", edit_lr=1e-9)), model, tok)
    assert all(o.said_after == o.said_before and o.gen_locality == 1.0 for o in unedited)  # a no-op edit says the same


@pytest.mark.parametrize("method", ["mend", "grace"])
def test_demo_says_and_scores_what_each_edit_written_into_the_model_does(tiny_model_dir: Path, tmp_path: Path,
                                                                        save_tiny_editor: Callable[..., Path], method: str) -> None:
    """run_demo asks every edit's prompts in one batch with the edit's weight deltas added by hooks (MEND), or while the
    edit is applied (GRACE, held in hooks): the answers and scores of each edit written into the model, one by one."""
    model, tok = load_model(str(tiny_model_dir))
    editor = load_editor(save_tiny_editor(tiny_model_dir, tmp_path / "editor")) if method == "mend" else \
        load_editor(method="grace", options={"n_iter": 2})
    edits, probes = DEMO_EDITS[:3], LOCALITY_PROBES[:2]
    outcomes = run_demo(editor, model, tok, edits, probes)
    probe_said = [first_line(t) for t in greedy_generate(model, tok, [p for p, _ in probes], [answer_budget(tok, a) for _, a in probes])]
    for outcome, edit in zip(outcomes, edits, strict=True):
        wrapped, budget = editor.wrap(edit), answer_budget(tok, edit.target)
        assert outcome.said_before == first_line(greedy_generate(model, tok, [wrapped], budget)[0])
        before = score_target(model, tok, wrapped, edit.target)
        with editor.apply(model, [edit], tok) as edited:
            after, plain_after = edited.score(wrapped, edit.target), edited.score(edit.prompt, edit.target)
            said = [first_line(t) for t in greedy_generate(model, tok, [wrapped, edit.prompt, *(p for p, _ in probes)],
                                                             [budget, budget, *(answer_budget(tok, a) for _, a in probes)])]
        assert (outcome.said_after, outcome.plain_said_after) == (said[0], said[1])
        assert outcome.gen_locality == sum(a == b for a, b in zip(said[2:], probe_said)) / len(probes)
        assert (outcome.top_before, outcome.top_after) == (before.top, after.top)
        assert outcome.acc_after == pytest.approx(after.accuracy) and outcome.plain_acc_after == pytest.approx(plain_after.accuracy)
        assert outcome.p_after == pytest.approx(after.probability, rel=1e-4, abs=1e-12)
        # the next edit's question asked in this edit's frame, before and after this edit
        other = edits[(edits.index(edit) + 1) % len(edits)]
        framed, room = editor.wrap(edit, other.prompt), max(budget, answer_budget(tok, other.target))
        assert outcome.frame_question == other.prompt
        assert outcome.frame_said_before == first_line(greedy_generate(model, tok, [framed], room)[0])
        with editor.apply(model, [edit], tok):
            assert outcome.frame_said_after == first_line(greedy_generate(model, tok, [framed], room)[0])
        assert outcome.frame_kept == float(same_answer(outcome.frame_said_after, outcome.frame_said_before))
        assert outcome.frame_says_target == exact_match(outcome.frame_said_after, edit.target)
    assert method == "grace" or any(o.said_after != o.said_before for o in outcomes)  # the strong untrained edits change answers


def test_each_demo_edit_is_asked_another_edits_question_in_its_frame(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                       save_tiny_editor: Callable[..., Path]) -> None:
    """The next edit of its task where there is one, else the next with a single answer; a ConvSent edit (no single
    answer) asks none and is asked by none; the report shows the question and its answers, and their means."""
    editor = load_editor(save_tiny_editor(tiny_gpt2_dir, tmp_path / "editor"))
    frames = frame_questions(editor, DEMO_EDITS)  # four CounterFact edits, a WikiData Recent one, a ConvSent one
    assert [f[0] if f else None for f in frames] == [1, 2, 3, 0, 0, None]
    assert frames[4][1] == editor.wrap(DEMO_EDITS[4], DEMO_EDITS[0].prompt) != editor.wrap(DEMO_EDITS[0])  # in its own frame
    assert frame_questions(editor, DEMO_EDITS[4:]) == [None, None]
    model, tok = load_model(str(tiny_gpt2_dir))
    outcomes = run_demo(editor, model, tok, DEMO_EDITS[3:], LOCALITY_PROBES[:1])
    assert [bool(o.frame_question) for o in outcomes] == [True, True, False] and outcomes[2].frame_kept is None
    result = QuickstartResult(tmp_path, tmp_path, False, "", "tiny", 0, outcomes, 0.0, 0.0, 0.0)
    report = format_report(result)
    assert report.count("in this frame, ") == 2 and f"in this frame, {shown(DEMO_EDITS[4].prompt)}:" in report
    kept = (outcomes[0].frame_kept + outcomes[1].frame_kept) / 2
    assert f"answer unchanged {kept:.2f}" in report and result.mean("frame_kept") == kept


def test_demo_asks_the_chat_question_where_the_model_has_a_chat_template(tiny_chat_llama_dir: Path, tmp_path: Path,
                                                                         save_tiny_editor: Callable[..., Path]) -> None:
    from instructedit.tasks.collate import chat_query

    model, tok = load_model(str(tiny_chat_llama_dir))
    editor = load_editor(save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor"))
    edits, probes = DEMO_EDITS[:2], LOCALITY_PROBES[:2]
    outcomes = run_demo(editor, model, tok, edits, probes)
    for outcome, edit in zip(outcomes, edits, strict=True):
        chat, budget = chat_query(tok, edit.prompt), answer_budget(tok, edit.target)
        assert outcome.chat_said_before == first_line(greedy_generate(model, tok, [chat], budget)[0])
        with editor.apply(model, [edit], tok):
            said = first_line(greedy_generate(model, tok, [chat], budget)[0])
        assert outcome.chat_said_after == said and outcome.chat_exact_after == exact_match(said, edit.target)
    result = QuickstartResult(tmp_path, tmp_path, False, "", "tiny", 0, outcomes, 0.0, 0.0, 0.0)
    report = format_report(result)
    assert "chat question (user turn):" in report and "chat question: " in report
    # an answer the edit did not change is marked, one it changed is not; answers are shown in full, however long
    long = "The capital of France is Paris, the largest city of the country and its seat of government since 508"
    same = dataclasses.replace(outcomes[0], chat_said_before=long, chat_said_after=long, plain_said_before="Paris",
                               plain_said_after="Rome", plain_exact_after=1.0)
    lines = format_report(dataclasses.replace(result, outcomes=[same])).splitlines()
    assert lines[lines.index(f"1. [{same.edit.task}] {same.edit.prompt} -> {same.edit.target}") + 1].lstrip().startswith(
        "instruction-wrapped prompt:")
    assert next(line for line in lines if "chat question (user turn):" in line).endswith(f'"{long}"  ->  (as before)')
    assert next(line for line in lines if "plain prompt:" in line).endswith('"Paris"  ->  "Rome"   (the target)')
    # an empty answer (the model stops at once) is named, not printed as an empty pair of quotes
    empty = dataclasses.replace(outcomes[0], said_before="", plain_said_before="", plain_said_after="Rome")
    lines = format_report(dataclasses.replace(result, outcomes=[empty])).splitlines()
    assert next(line for line in lines if "instruction-wrapped prompt:" in line).split(":", 1)[1].lstrip().startswith(f"{NO_ANSWER}  ->  ")
    assert not any('""' in line for line in lines)


def test_quickstart_command_prints_the_table(tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_edit_parser(sub)
    add_quickstart_parser(sub)
    argv = ["quickstart", "--model", str(tiny_gpt2_dir), "--budget-steps", "1", "--output", str(tmp_path / "run"), "--no-progress"]
    args = p.parse_args(argv + [x for item in TINY for x in ("--set", item)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "InstructEdit quickstart" in out and "trained now" in out and "top-1 before -> after" in out
    assert "chat question" not in out  # the tiny tokenizer has no chat template: no chat column
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["max_steps"] == 1


def test_quickstart_shows_a_given_editor_without_training(tiny_llama_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path],
                                                          capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    from instructedit.cli import main

    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    folder = save_tiny_editor(tiny_llama_dir, tmp_path / "editor")
    result = run_quickstart(editor=folder, show_progress=False, edits=DEMO_EDITS[:2], probes=LOCALITY_PROBES[:2])
    assert not result.trained and result.editor_dir == folder and result.model_name == str(tiny_llama_dir)  # the editor's model
    assert not (tmp_path / "cache" / "editors").exists()  # nothing trained or cached
    model, tok = load_model(str(tiny_llama_dir))
    direct = run_demo(load_editor(folder), model, tok, DEMO_EDITS[:2], LOCALITY_PROBES[:2])
    assert [o.acc_after for o in result.outcomes] == [o.acc_after for o in direct]
    assert "given with --editor" in format_report(result)
    assert main(["quickstart", "--editor", str(folder), "--no-progress"]) == 0 and "given with --editor" in capsys.readouterr().out
    with caplog.at_level("ERROR"):
        assert main(["quickstart", "--editor", str(folder), "--budget-steps", "3"]) == 2
    assert "--budget-steps: shapes the editor the quickstart trains; --editor shows a trained one" in caplog.text


def test_durations_round_before_they_carry_into_minutes():
    assert duration(4.24) == "4.2s"
    assert duration(59.96) == "1m00.0s"
    assert duration(239.96) == "4m00.0s"  # was "3m60.0s"
    assert duration(185.0) == "3m05.0s"
