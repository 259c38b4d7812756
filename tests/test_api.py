"""The Python API (Edit, load_editor, apply / apply_sequential, EditedModel) and the ``edit`` command, on tiny models."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer

import instructedit
from instructedit.api import EDITS_FILE, Edit, InstructEditor, load_editor, tokenizer_for
from instructedit.config import load_config
from instructedit.models.loading import load_model
from instructedit.tasks.collate import PromptTooLongError
from instructedit.tasks.instructions import InstructionPool
from instructedit.commands.edit import add_edit_parser
from instructedit.commands.quickstart import add_quickstart_parser

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
FRANCE = Edit("The capital of France is", "Rome")
EIFFEL = Edit("The Eiffel Tower is located in the city of", "London")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_state(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    now = model.state_dict()
    return before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)


@pytest.fixture
def setup(tiny_model_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path]) -> tuple[nn.Module, object, InstructEditor]:
    model, tok = load_model(str(tiny_model_dir))
    return model, tok, load_editor(save_tiny_editor(tiny_model_dir, tmp_path / "editor"))


def test_context_manager_restores_bitwise(setup: tuple) -> None:
    model, tok, editor = setup
    before = state(model)
    with editor.apply(model, [FRANCE], tok) as edited:
        assert edited.active and not same_state(before, model)
        assert edited.model is model
        assert len(edited.top_predictions(FRANCE.prompt, k=5)) == 5
        assert isinstance(edited.generate(FRANCE.prompt, max_new_tokens=3), str)
    assert not edited.active
    assert same_state(before, model)
    edited.rollback()  # a second rollback does nothing
    assert same_state(before, model)


def test_keep_keeps_the_edit(setup: tuple) -> None:
    model, tok, editor = setup
    before = state(model)
    with editor.apply(model, FRANCE, tok, keep=True) as edited:
        after = state(model)
    assert edited.kept and same_state(after, model) and not same_state(before, model)
    edited.rollback()  # nothing to roll back any more
    assert same_state(after, model)
    with editor.apply(model, EIFFEL, tok) as again:
        again.keep()  # .keep() inside the block works too
    assert not same_state(after, model)


def test_batch_and_sequential_are_different_updates(setup: tuple) -> None:
    model, tok, editor = setup
    before = state(model)
    with editor.apply(model, [FRANCE, EIFFEL], tok):
        batched = state(model)
    with editor.apply_sequential(model, [FRANCE, EIFFEL], tok):
        sequential = state(model)
    assert same_state(before, model)
    changed = [k for k in before if not torch.equal(before[k], batched[k])]
    assert changed and all(not torch.equal(before[k], sequential[k]) for k in changed)
    # one update from both edits vs. two updates, the second computed on the already edited model
    assert any(not torch.equal(batched[k], sequential[k]) for k in changed)
    with editor.apply(model, [FRANCE], tok):
        one_batched = state(model)
    with editor.apply_sequential(model, [FRANCE], tok):
        assert same_state(one_batched, model)  # with a single edit the two modes coincide
    assert same_state(before, model)


def test_sequential_rolls_back_what_it_applied_when_an_edit_fails(setup: tuple) -> None:
    model, tok, editor = setup
    before = state(model)
    too_long = Edit("word " * 400, "Rome")
    with pytest.raises(PromptTooLongError):
        editor.apply_sequential(model, [FRANCE, too_long], tok)
    assert same_state(before, model)


def test_saved_edited_model_reloads_with_plain_transformers(setup: tuple, tmp_path: Path) -> None:
    model, tok, editor = setup
    ids = tok("The capital of France is Paris. The Eiffel Tower", return_tensors="pt")
    with torch.no_grad():
        original = model(**ids).logits
    with editor.apply(model, [FRANCE, EIFFEL], tok) as edited:
        with torch.no_grad():
            edited_logits = model(**ids).logits
        edited.save_pretrained(tmp_path / "edited")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "edited").eval()
    with torch.no_grad():
        logits = reloaded(**AutoTokenizer.from_pretrained(tmp_path / "edited")("The capital of France is Paris. The Eiffel Tower", return_tensors="pt")).logits
    assert torch.equal(logits, edited_logits)
    assert not torch.allclose(logits, original)
    saved = json.loads((tmp_path / "edited" / EDITS_FILE).read_text())
    assert [e["target"] for e in saved["edits"]] == ["Rome", "London"] and saved["applied"]["call"] == "apply"
    with pytest.raises(RuntimeError, match="rolled back"):
        edited.save_pretrained(tmp_path / "too-late")


def test_tokenizer_comes_from_the_models_name_or_path(tiny_llama_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path]) -> None:
    model, tok = load_model(str(tiny_llama_dir))
    loaded = tokenizer_for(model)
    assert model.name_or_path == str(tiny_llama_dir)
    assert (loaded.pad_token, loaded.padding_side) == (tok.pad_token, tok.padding_side)
    assert loaded("The capital").input_ids == tok("The capital").input_ids
    editor = load_editor(save_tiny_editor(tiny_llama_dir, tmp_path / "editor"))
    before = state(model)
    with editor.apply(model, [FRANCE]) as edited:  # no tokenizer given
        assert edited.tokenizer.pad_token == tok.pad_token
        assert not same_state(before, model)
    assert same_state(before, model)


def test_gpt2_tokenizer_without_pad_gets_eos(tiny_gpt2_dir: Path) -> None:
    model, tok = load_model(str(tiny_gpt2_dir))
    loaded = tokenizer_for(model)
    assert loaded.pad_token == loaded.eos_token == tok.pad_token and loaded.padding_side == "right"


def test_edit_fields_are_checked_and_become_records() -> None:
    with pytest.raises(ValueError, match="unknown task 'nosuch'"):
        Edit("a", "b", task="nosuch")
    with pytest.raises(ValueError, match="needs label="):
        Edit("What do you think of Estero?", "I like it", task="convsent", topic="Estero")
    with pytest.raises(ValueError, match="needs topic="):
        Edit("What do you think of Estero?", "I like it", task="convsent", label="positive")
    with pytest.raises(ValueError, match="belong to convsent"):
        Edit("a", "b", label="positive")
    with pytest.raises(ValueError, match="must not be empty"):
        Edit(" ", "b")
    cs = Edit("What do you think of Estero?", "I like it", task="convsent", label="positive", subject="Estero")
    record = cs.record()
    assert record.convsent is not None and record.convsent.topic == "Estero" and record.convsent.target_responses == ("I like it",)
    assert Edit("a", "b", rephrase=["c"]).record().rephrase == ("c",)
    editor = InstructEditor(editor=object(), pool=InstructionPool.default(), instruction=0)  # type: ignore[arg-type]
    wrapped = editor.wrap(cs)
    assert "positive" in wrapped and "Estero" in wrapped and "[LABEL]" not in wrapped and wrapped.endswith("Input: What do you think of Estero?")


def _fake_run(save_tiny_editor: Callable[..., Path], run: Path, model_dir: Path, **data: object) -> Path:
    """A run folder as the Trainer leaves it, with the editor in RUN/best."""
    save_tiny_editor(model_dir, run / "best")
    config = load_config(TINY, [f"model.name={model_dir}"]).to_dict()
    config["data"].update(data)
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    (run / "data.json").write_text("{}")
    return run / "best"


def test_instruction_setting_follows_the_training_config(tiny_gpt2_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path]) -> None:
    plain = load_editor(_fake_run(save_tiny_editor, tmp_path / "off", tiny_gpt2_dir, instructions=False))
    assert plain.instruction is None and plain.wrap(FRANCE) == FRANCE.prompt
    best = _fake_run(save_tiny_editor, tmp_path / "on", tiny_gpt2_dir)
    assert load_editor(best).instruction == 0
    assert load_editor(best, instruction="unseen").instruction == 9
    assert load_editor(best, instruction=3).wrap(FRANCE).startswith("Task: counterfact\nDescription: ")
    assert load_editor(best, instruction=None).wrap(FRANCE) == FRANCE.prompt
    with pytest.raises(ValueError, match="is not 'seen', 'unseen'"):
        load_editor(best, instruction="first")
    # the forms a user asks an edit in: wrapped as edited, the bare prompt, and the chat turn where there is a template
    from instructedit.tasks.collate import chat_query

    tok = AutoTokenizer.from_pretrained(tiny_gpt2_dir)
    assert not getattr(tok, "chat_template", None)
    assert load_editor(best).asked(FRANCE, tok) == {"wrapped": load_editor(best).wrap(FRANCE), "plain": FRANCE.prompt}
    tok.chat_template = "{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    asked = plain.asked(FRANCE, tok)
    assert asked == {"wrapped": FRANCE.prompt, "plain": FRANCE.prompt, "chat": chat_query(tok, FRANCE.prompt)}
    assert asked["chat"] == f"User: {FRANCE.prompt}\nAssistant:"


def test_registry_methods_load_by_name(tiny_gpt2_dir: Path) -> None:
    model, tok = load_model(str(tiny_gpt2_dir))
    before = state(model)
    ft = load_editor(method="ft", options={"num_steps": 2, "norm_constraint": None, "lr": 1e-2})
    assert ft.instruction is None and ft.wrap(FRANCE) == FRANCE.prompt  # baselines: no instruction unless a pool is given
    with ft.apply(model, [FRANCE], tok):
        assert not same_state(before, model)
    assert same_state(before, model)
    grace = load_editor(method="grace", options={"n_iter": 2})
    with grace.apply(model, [FRANCE], tok) as edited:
        with pytest.raises(ValueError, match="hooks or added modules"):
            edited.save_pretrained("never-written")
    assert same_state(before, model)
    with pytest.raises(ValueError, match="unknown editing method 'nosuch'"):
        load_editor(method="nosuch")
    assert load_editor(method="ft", pool=InstructionPool.default()).instruction == 0


def test_load_editor_rejects_what_is_not_an_editor(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a hub repo id"):
        load_editor(str(tmp_path / "missing" / "deeper"))
    # 'runs/typo' where runs/ is a local folder: a mistyped path, said at once (not a 10-second wait for the hub)
    runs = tmp_path / "runs"
    (runs / "mine" / "best").mkdir(parents=True)
    (runs / "mine" / "best" / "editor_config.json").write_text("{}")
    (runs / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"no folder 'mnie' in .*runs' \(its editors and runs: mine\); read as a local path"):
        load_editor(str(runs / "mnie"))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError, match="no folder 'mnie' in 'runs'"):
        load_editor("runs/mnie")
    with pytest.raises(FileNotFoundError, match="editor_config.json is missing"):
        load_editor(tmp_path)


def test_public_exports() -> None:
    assert instructedit.Edit is Edit and instructedit.load_editor is load_editor and instructedit.load_model is load_model
    with pytest.raises(AttributeError):
        instructedit.no_such_name  # noqa: B018


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command")
    add_edit_parser(sub)
    add_quickstart_parser(sub)
    return p


def test_edit_command_prints_before_and_after_and_saves(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       save_tiny_editor: Callable[..., Path]) -> None:
    editor_dir = save_tiny_editor(tiny_llama_dir, tmp_path / "editor")
    args = parser().parse_args(["edit", "--editor", str(editor_dir), "--prompt", "The capital of France is", "--target", "Rome",
                                "--save", str(tmp_path / "edited"), "--max-new-tokens", "4", "--device", "cpu"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert f"model: {tiny_llama_dir}" in out  # the editor's model_name
    assert "top-5 next tokens" in out and "before" in out and "after" in out
    assert "next tokens after the instruction-wrapped prompt" in out  # where the edit is made, not the plain prompt
    assert "greedy continuation" in out and "instruction-wrapped prompt (reliability)" in out and "plain prompt" in out
    assert out.index("what the model says") < out.index("target accuracy")
    assert len([line for line in out.splitlines() if line.startswith(" " * 24)]) == 5  # five prediction rows
    assert (tmp_path / "edited" / "config.json").is_file() and (tmp_path / "edited" / EDITS_FILE).is_file()
    AutoModelForCausalLM.from_pretrained(tmp_path / "edited")


def test_edit_command_asks_the_chat_question_and_makes_the_edit_in_the_editors_forms(tiny_chat_llama_dir: Path, tmp_path: Path,
                                                                                    capsys: pytest.CaptureFixture[str],
                                                                                    save_tiny_editor: Callable[..., Path]) -> None:
    import json

    editor_dir = save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor")
    config = json.loads((editor_dir / "editor_config.json").read_text())
    config["queries"] = {"instructions": True, "template": None, "answer_stop": "none", "edit_forms": ["wrapped", "chat"]}
    (editor_dir / "editor_config.json").write_text(json.dumps(config))
    args = parser().parse_args(["edit", "--editor", str(editor_dir), "--prompt", "The capital of France is", "--target", "Rome",
                                "--max-new-tokens", "4", "--device", "cpu"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "(made in the forms wrapped + chat, solved together; no stop after the answer)" in out
    from instructedit.commands.edit import STOP_WORDS
    from instructedit.config import ANSWER_STOPS

    assert set(STOP_WORDS) == set(ANSWER_STOPS)  # every stop an editor can carry is said in words
    assert out.index("plain prompt:") < out.index("chat question (user turn):") < out.index("top-5 next tokens")
    args = parser().parse_args(["edit", "--editor", str(editor_dir), "--prompt", "The capital of France is", "--target", "Rome",
                                "--max-new-tokens", "4", "--device", "cpu", "--answer-stop", "newline+turn"])
    assert args.func(args) == 0  # the answer stop asked for replaces the saved one
    assert f"(made in the forms wrapped + chat, solved together; {STOP_WORDS['newline+turn']})" in capsys.readouterr().out
    config["queries"]["edit_forms"] = ["wrapped", "shouted"]  # a bad saved setup is named, file and field
    (editor_dir / "editor_config.json").write_text(json.dumps(config))
    from instructedit.api import load_editor
    with pytest.raises(ValueError, match=r"editor_config.json: queries.edit_forms: \['wrapped', 'shouted'\] must be distinct forms"):
        load_editor(editor_dir)

def test_edit_file_asks_every_edit_in_the_editors_forms(tiny_chat_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        save_tiny_editor: Callable[..., Path]) -> None:
    """edit --file with an editor made for the bare question and the chat turn: each edit's row per form, the per-form
    counts in the totals, and every form's answers in --output (the wrapped one also under the old keys)."""
    import json

    from instructedit.api import answer
    from instructedit.evaluation.generation import exact_match
    from instructedit.tasks.collate import chat_query

    editor_dir = save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor")
    config = json.loads((editor_dir / "editor_config.json").read_text())
    config["queries"] = {"instructions": True, "template": None, "answer_stop": "none", "edit_forms": ["plain", "chat"]}
    (editor_dir / "editor_config.json").write_text(json.dumps(config))  # made bare and in chat: asked wrapped too, first
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "The capital of France is", "target": "Rome"}) + "\n"
                     + json.dumps({"prompt": "BBC One, by", "target": "Sega"}) + "\n")
    answers = tmp_path / "answers.jsonl"
    args = parser().parse_args(["edit", "--editor", str(editor_dir), "--file", str(edits), "--max-new-tokens", "4", "--device", "cpu",
                                "--output", str(answers)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "each asked in the forms wrapped + plain + chat (the editor makes its edits in plain + chat)" in out
    assert "  form     answer before" in out
    table = out[out.index("answer before") :out.index("totals:")].splitlines()[1:]
    assert [line[67:76].strip() for line in table if line.strip()] == ["wrapped", "plain", "chat"] * 2  # a row per edit and form
    assert "answer is the target wrapped " in out and "; plain " in out and "; chat " in out
    rows = [json.loads(line) for line in answers.read_text().splitlines()]
    model, tok = load_model(str(tiny_chat_llama_dir))
    for row in rows:
        assert list(row["forms"]) == ["wrapped", "plain", "chat"]
        assert row["forms"]["chat"]["prompt"] == chat_query(tok, row["prompt"]) and row["forms"]["plain"]["prompt"] == row["prompt"]
        assert row["said_after"] == row["forms"]["wrapped"]["said_after"]  # the old keys are the wrapped form's
        for form in row["forms"].values():  # the unedited model's answers, as asked alone; scored as the runner scores them
            assert form["said_before"] == answer(model, tok, form["prompt"], 4)
            assert form["said_target_after"] == exact_match(form["said_after"], row["target"])


def test_edit_command_asks_other_questions_in_every_form(tiny_chat_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                        save_tiny_editor: Callable[..., Path]) -> None:
    """--ask: each other question asked as it is, in the edit's frame and as a chat turn, before and after the edit, with
    the count of answers the edit left alone; with --file too; an empty or too long question is refused, named."""
    from instructedit.api import answer
    from instructedit.evaluation.generation import same_answer, shown
    from instructedit.tasks.collate import chat_query

    editor_dir = save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor", edit_lr=1.0)  # a mild edit: some answers change
    questions = ["The gender of Ingrid is", "BBC One, by"]
    base = ["edit", "--editor", str(editor_dir), "--max-new-tokens", "4", "--device", "cpu", "--ask", questions[0], "--ask", questions[1]]
    args = parser().parse_args([*base, "--prompt", "The capital of France is", "--target", "Rome"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    block = out[out.index("other questions (--ask)") : out.index("next tokens after")].splitlines()
    editor = load_editor(editor_dir)
    model, tok = load_model(str(tiny_chat_llama_dir))
    edit = Edit(prompt="The capital of France is", target="Rome")
    asked = [{"as it is": q, "in the edit's frame": editor.wrap(edit, q), "chat question": chat_query(tok, q)} for q in questions]
    before = [{f: answer(model, tok, text, 4) for f, text in forms.items()} for forms in asked]
    with editor.apply(model, [edit], tok) as edited:
        after = [{f: answer(edited.model, tok, text, 4) for f, text in forms.items()} for forms in asked]
    rows = [line.strip() for line in block[1:] if line.startswith("    ")]
    assert [row.split(":")[0] for row in rows] == ["as it is", "in the edit's frame", "chat question"] * 2
    for row, (said, said_after) in zip(rows, [(b[f], a[f]) for b, a in zip(before, after) for f in ("as it is", "in the edit's frame", "chat question")]):
        assert f"{shown(said)}  ->  " in row  # the unedited model's answer, asked alone
        assert row.split("  ->  ", 1)[1].startswith("(as before)" if said_after == said else shown(said_after))
        assert ("(says the edit's target)" in row) == (said_after.strip() == "Rome")
    kept = sum(same_answer(a[f], b[f]) for b, a in zip(before, after) for f in a)
    assert f"answers the edit left alone: {kept} of 6 (generation locality)" in out
    edits = tmp_path / "edits.jsonl"
    edits.write_text(json.dumps({"prompt": "The capital of France is", "target": "Rome"}) + "\n"
                     + json.dumps({"prompt": "The mother tongue of Danielle Darrieux is", "target": "English", "task": "zsre"}) + "\n")
    args = parser().parse_args([*base, "--file", str(edits)])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert out.index("totals:") < out.index("other questions (--ask)") and "answers the edits left alone: " in out
    assert "    in the counterfact frame:" in out and "    in the zsre frame:" in out  # one frame per task of the file
    for bad, message in (("  ", "--ask: an empty question"), ("word " * 3000, "--ask 'word word")):
        args = parser().parse_args([*base[:-4], "--ask", bad, "--prompt", "The capital of France is", "--target", "Rome"])
        with pytest.raises(ValueError, match=message):
            args.func(args)


def test_edit_command_convsent_needs_a_label(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    args = parser().parse_args(["edit", "--editor", str(tmp_path), "--prompt", "What do you think of Estero?", "--target", "I like it",
                                "--task", "convsent", "--topic", "Estero"])
    with pytest.raises(ValueError, match="needs label="):
        args.func(args)


def test_sequential_edit_that_would_wreck_the_model_is_not_kept(setup: tuple, wreck_edit: Callable[[object, int], list],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """An edit whose update moves a weight far more than the edits before it (here the ninth, made 10⁴× too large) is
    undone with a warning and the sequence goes on from the model as it was: the same weights as without that edit."""
    model, tok, editor = setup
    calls = wreck_edit(editor.editor_for(model, tok), 9)
    edits = [Edit(f"Fact number {i} is about the city of", city) for i, city in enumerate(
        ["Rome", "Paris", "London", "Berlin", "Madrid", "Vienna", "Prague", "Lisbon", "Athens", "Dublin"])]
    before = state(model)
    with caplog.at_level("WARNING"), editor.apply_sequential(model, edits, tok) as edited:
        assert edited.how["refused"] == [8] and edited.edits == tuple(edits[:8] + edits[9:])
        without = state(model)
    assert "sequential edit 8" in caplog.text and "not kept" in caplog.text
    assert same_state(before, model)
    calls.extend([None] * 9)  # past the ninth call: nothing made too large from here on
    with editor.apply_sequential(model, edits[:8] + edits[9:], tok) as edited:
        assert same_state(without, model) and edited.how["refused"] == []
    calls.clear()  # the ninth edit made too large again, and kept without the check
    with editor.apply_sequential(model, edits[:9], tok, outlier_factor=None) as edited:  # no check: kept, however large
        assert edited.how["refused"] == [] and len(edited.edits) == 9
    assert same_state(before, model)


def test_outlier_edits_are_judged_against_the_median_of_those_kept(tiny_gpt2_dir: Path) -> None:
    from instructedit.editors.base import (OUTLIER_HISTORY, EditResult, OutlierEdits, SequentialWeightEdits, WeightEditHandle,
                                           keep_in_sequence, largest_change)

    model, _ = load_model(str(tiny_gpt2_dir))
    name = "transformer.h.0.mlp.c_fc.weight"
    weight = model.get_parameter(name).detach().clone()
    outliers = OutlierEdits(factor=50)
    assert outliers.admits(1e6) and not outliers.admits(float("nan"))  # no history yet: only non-finite changes refused
    outliers.changes = [0.5] * OUTLIER_HISTORY
    assert outliers.limit() == pytest.approx(25.0)
    for factor, kept in ((21.0, True), (31.0, False), (float("nan"), False)):
        sequence = SequentialWeightEdits(model, editor=None)
        handle = WeightEditHandle(model, EditResult({name: weight * factor}))
        name_moved, change = largest_change(handle)
        assert name_moved == name and (change == pytest.approx(factor - 1, rel=1e-5) or factor != factor)
        assert keep_in_sequence(sequence, [], handle, object(), outliers) is kept
        assert len(sequence) == int(kept)
        if kept:
            sequence.rollback()
        assert torch.equal(model.get_parameter(name).detach(), weight)  # refused or rolled back: bit for bit
    assert len(outliers.changes) == OUTLIER_HISTORY + 1  # the kept edit joined the history
    with pytest.raises(ValueError, match="> 1"):
        OutlierEdits(factor=1.0)


def test_many_edits_leave_the_bare_question_out(tiny_chat_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                save_tiny_editor: Callable[..., Path], capsys: pytest.CaptureFixture[str]) -> None:
    """An editor that makes a single edit in the three forms makes a call of more than 16 edits, and edits kept one after
    another, without the bare question (``many_edit_forms``), as its editor_config.json says or, where it says nothing,
    by ``config.many_edit_forms``; a few edits in one call keep the three."""
    from instructedit import api
    from instructedit.config import many_edit_forms

    assert many_edit_forms(["chat", "plain", "wrapped"]) == ("wrapped", "chat")
    assert many_edit_forms(["plain"]) == ("plain",) and many_edit_forms(["wrapped"]) == ("wrapped",)
    editor_dir = save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor")
    config = json.loads((editor_dir / "editor_config.json").read_text())
    config["queries"] = {"instructions": True, "template": None, "answer_stop": "none", "edit_forms": ["wrapped", "plain", "chat"]}
    (editor_dir / "editor_config.json").write_text(json.dumps(config))
    editor = load_editor(editor_dir)
    assert editor.edit_forms == ("wrapped", "plain", "chat") and editor.many_edit_forms == ("wrapped", "chat")
    rows: list[int] = []
    real = api.apply_in_rounds
    monkeypatch.setattr(api, "apply_in_rounds", lambda e, m, batch, *r, **k: rows.append(batch.input_ids.shape[0]) or real(e, m, batch, *r, **k))
    model, tok = load_model(str(tiny_chat_llama_dir))
    edits = [Edit(prompt=f"The capital of land {i} is", target=f"city {i}") for i in range(17)]
    with editor.apply(model, edits[:16], tok) as few:
        assert few.how["edit_forms"] == ["wrapped", "plain", "chat"]
    with editor.apply(model, edits, tok) as many:
        assert many.how["edit_forms"] == ["wrapped", "chat"]
    with editor.apply(model, edits[:1], tok, forms=editor.many_edit_forms) as stacked:  # as the demo server keeps its edits
        assert stacked.how["edit_forms"] == ["wrapped", "chat"]
    assert rows == [3 * 16, 2 * 17, 2]
    with pytest.raises(ValueError, match="must be distinct forms"):
        editor.apply(model, edits[:1], tok, forms=["bare"])
    batches: list[int] = []
    usual = editor.editor.apply
    monkeypatch.setattr(editor.editor, "apply", lambda m, batch, *r, **k: batches.append(batch.input_ids.shape[0]) or usual(m, batch, *r, **k))
    with editor.apply_sequential(model, edits[:3], tok) as one_by_one:
        assert one_by_one.how["edit_forms"] == ["wrapped", "chat"]
    assert batches == [2, 2, 2]
    lines = tmp_path / "edits.jsonl"  # edit --file says how its call was made
    lines.write_text("".join(json.dumps({"prompt": e.prompt, "target": e.target}) + "\n" for e in edits))
    args = parser().parse_args(["edit", "--editor", str(editor_dir), "--file", str(lines), "--max-new-tokens", "2", "--device", "cpu"])
    assert args.func(args) == 0
    assert ("each asked in the forms wrapped + plain + chat (made in wrapped + chat: the editor makes its edits in wrapped + plain + "
            "chat, many edits without the bare question)") in capsys.readouterr().out
    config["queries"]["many_edit_forms"] = ["wrapped"]  # as saved, when saved
    (editor_dir / "editor_config.json").write_text(json.dumps(config))
    assert load_editor(editor_dir).many_edit_forms == ("wrapped",)
    config["queries"]["many_edit_forms"] = ["bare"]
    (editor_dir / "editor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"editor_config.json: queries.many_edit_forms: \['bare'\] must be distinct forms"):
        load_editor(editor_dir)
    assert InstructEditor(editor.editor, edit_forms=("wrapped", "plain"), many_edit_forms=("plain",)).many_edit_forms == ("plain",)
