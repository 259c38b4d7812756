"""Training for generation: answer stop token, answer-margin hinge, answer-prefix template, selection on generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instructedit.config import load_config
from instructedit.losses import answer_margin
from instructedit.models.loading import load_model
from instructedit.records import EditRecord, QAItem
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.instructions import instruction_pool
from instructedit.training import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PREFIX_TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}\nOutput:"


def test_answer_margin_is_zero_once_every_target_leads_by_the_cap() -> None:
    logits = torch.tensor([[5.0, 2.0, 0.0], [0.0, 1.0, 4.0]])
    assert answer_margin(logits, torch.tensor([0, 2]), cap=2.0).item() == 0.0  # leads 3 and 3
    # target 1 in row 0 trails by 3: 2 - (-3) = 5; row 1 leads by 3: 0 -> mean 2.5
    assert answer_margin(logits, torch.tensor([1, 2]), cap=2.0).item() == pytest.approx(2.5)


def test_answer_margin_pushes_the_target_up() -> None:
    logits = torch.zeros(1, 4, requires_grad=True)
    answer_margin(logits, torch.tensor([2])).backward()
    assert logits.grad[0, 2] < 0 and logits.grad[0].sum().abs() < 1e-6  # raise the target, lower the best other


@pytest.mark.parametrize("stop", ["newline", "eos"])
def test_edit_inputs_end_with_the_stop_token_and_probes_do_not(tiny_llama_dir: Path, stop: str) -> None:
    _, tok = load_model(str(tiny_llama_dir))
    plain = Collator(tok).qa_batch([("The capital of France is", "Paris")])
    collator = Collator(tok, answer_stop=stop)
    stopped = collator.qa_batch([("The capital of France is", "Paris")], stop=True)
    expected = tok.eos_token_id if stop == "eos" else tok("\n", add_special_tokens=False)["input_ids"][0]
    labels = stopped.labels[stopped.label_mask].tolist()
    assert labels == plain.labels[plain.label_mask].tolist() + [expected]
    assert torch.equal(collator.qa_batch([("The capital of France is", "Paris")]).labels, plain.labels)  # probes: no stop


def test_newline_turn_ends_the_chat_forms_answer_with_the_end_of_the_turn(tiny_llama_dir: Path) -> None:
    from instructedit.tasks.collate import turn_end_ids

    _, tok = load_model(str(tiny_llama_dir))
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    record = EditRecord(task="zsre", prompt="Who wrote Hamlet?", target_new="Marlowe", source="t#0")
    forms = ["wrapped", "plain", "chat"]
    # a template that closes a turn with a token of its own (as SmolLM2's <|im_end|>): "</s>" here
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    assert turn_end_ids(tok) == [tok.eos_token_id] == tok("</s>", add_special_tokens=False)["input_ids"][:1]
    turn = Collator(tok, pool=InstructionPool.default(), answer_stop="newline+turn", edit_forms=forms)
    line = Collator(tok, pool=InstructionPool.default(), answer_stop="newline", edit_forms=forms)
    for collator, chat_stop in ((turn, tok.eos_token_id), (line, newline)):
        pairs = collator.edit_pairs(record, 0)
        assert [p[0].endswith("assistant:") for p in pairs] == [False, False, True]
        batch = collator.qa_batch(pairs, stop=True)
        last = [row[mask][-1].item() for row, mask in zip(batch.labels, batch.label_mask, strict=True)]
        assert last == [newline, newline, chat_stop]  # the wrapped and bare answers end with the newline either way
    # a template that writes only whitespace after the answer: the turn ends with EOS
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}A:{% endif %}"
    assert turn_end_ids(tok) == [tok.eos_token_id]
    # without a chat template there is no chat form, and newline+turn is the newline
    tok.chat_template = None
    bare = Collator(tok, answer_stop="newline+turn").qa_batch([("Who wrote Hamlet?", "Marlowe")], stop=True)
    assert bare.labels[bare.label_mask][-1].item() == newline
    assert load_config(TINY, ["training.answer_stop=newline+turn"]).training.answer_stop == "newline+turn"


def test_newline_end_ends_the_wrapped_and_bare_answers_text_and_the_chat_turn(tiny_llama_dir: Path) -> None:
    _, tok = load_model(str(tiny_llama_dir))
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    record = EditRecord(task="zsre", prompt="Who wrote Hamlet?", target_new="Marlowe", source="t#0")
    # a template that closes a turn with a token of its own other than EOS: the chat answer ends with it, alone
    tok.chat_template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}<unk>{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}"
    turn_end = tok("<unk>", add_special_tokens=False)["input_ids"][0]
    assert turn_end != tok.eos_token_id
    collator = Collator(tok, pool=InstructionPool.default(), answer_stop="newline+end", edit_forms=["wrapped", "plain", "chat"])
    batch = collator.qa_batch(collator.edit_pairs(record, 0), stop=True)
    plain = collator.qa_batch([("Who wrote Hamlet?", "Marlowe")])  # a probe: the answer alone
    answer = plain.labels[plain.label_mask].tolist()
    labelled = [row[mask].tolist() for row, mask in zip(batch.labels, batch.label_mask, strict=True)]
    assert labelled == [answer + [newline, tok.eos_token_id]] * 2 + [answer + [turn_end]]
    # without a chat template: a newline and EOS after every answer
    tok.chat_template = None
    bare = Collator(tok, answer_stop="newline+end").qa_batch([("Who wrote Hamlet?", "Marlowe")], stop=True)
    assert bare.labels[bare.label_mask].tolist() == answer + [newline, tok.eos_token_id]
    assert load_config(TINY, ["training.answer_stop=newline+end"]).training.answer_stop == "newline+end"
    tok.eos_token = None  # a tokenizer without EOS cannot end the text: said when the collator is made
    with pytest.raises(ValueError, match="newline\\+end': the tokenizer has no EOS token"):
        Collator(tok, answer_stop="newline+end")


def test_meta_batch_edit_rows_carry_the_stop_locality_does_not(tiny_gpt2_dir: Path) -> None:
    _, tok = load_model(str(tiny_gpt2_dir))
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    record = EditRecord(task="counterfact", prompt="The capital of France is", target_new="Rome", rephrase=("France's capital is",),
                        locality=(QAItem("The capital of Spain is", "Madrid"),), source="t#0")
    meta = Collator(tok, pool=InstructionPool.default(), answer_stop="newline").meta_batch([record], [0])
    for batch in (meta.edit_inner, meta.edit_outer):
        assert batch.labels[batch.label_mask][-1].item() == newline
    assert meta.loc.labels[meta.loc.label_mask][-1].item() != newline


def test_unknown_answer_stop_and_template_without_slot_are_refused() -> None:
    with pytest.raises(ValueError, match="training.answer_stop"):
        load_config(TINY, ["training.answer_stop=tab"])
    with pytest.raises(ValueError, match="data.template"):
        load_config(TINY, ["data.template=Input: {prompt}"])
    with pytest.raises(ValueError, match="training.select_on"):
        load_config(TINY, ["training.select_on=accuracy"])


def test_template_reaches_the_pool() -> None:
    config = load_config(TINY, [f"data.template={json.dumps(PREFIX_TEMPLATE)}"])
    pool = instruction_pool(config)
    record = EditRecord(task="zsre", prompt="Who wrote Hamlet?", target_new="Marlowe", source="t#1")
    assert pool.render(record, record.prompt, 0).endswith("Input: Who wrote Hamlet?\nOutput:")


def test_generation_validation_selects_and_saves_the_query_setup(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = load_config(TINY, [f"model.name={tiny_llama_dir}", f"data.template={json.dumps(PREFIX_TEMPLATE)}", "training.answer_stop=newline",
                                "training.c_answer_margin=0.5", "training.select_on=generation", "training.locality_floor=0.0"])
    Trainer(config, tmp_path, show_progress=False).run()
    vals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert len(vals) == 3 and "gen_reliability" not in vals[0]  # step 0: the identity-initialized editor is not asked
    vals = vals[1:]
    assert all({"gen_reliability", "gen_locality", "gen_n"} <= set(v) for v in vals)
    assert all(0 <= v["gen_reliability"] <= 1 and 0 <= v["gen_locality"] <= 1 for v in vals)
    train = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert all("l_answer" in t for t in train)
    # best/ is the first checkpoint with the highest generation reliability (floor 0: every one qualifies)
    best = json.loads((tmp_path / "best" / "editor_config.json").read_text())
    top = max(v["gen_reliability"] for v in vals)
    assert best["training"]["best_step"] == next(v["step"] for v in vals if v["gen_reliability"] == top)
    assert best["queries"] == {"instructions": True, "instruction_pool": None, "template": PREFIX_TEMPLATE, "answer_stop": "newline",
                               "edit_forms": ["wrapped"]}


def test_load_editor_queries_as_the_editor_was_trained(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from instructedit.api import Edit, load_editor

    config = load_config(TINY, [f"model.name={tiny_llama_dir}", f"data.template={json.dumps(PREFIX_TEMPLATE)}", "training.answer_stop=newline",
                                "training.max_steps=1", "training.val_every=1"])
    Trainer(config, tmp_path, show_progress=False).run()
    editor = load_editor(tmp_path / "best")
    edit = Edit("Who wrote Hamlet?", "Marlowe", task="zsre")
    assert editor.answer_stop == "newline" and editor.wrap(edit).endswith("Input: Who wrote Hamlet?\nOutput:")
    model, tok = load_model(str(tiny_llama_dir))
    batch = editor.edit_batch([edit], tok)
    assert batch.labels[batch.label_mask][-1].item() == tok("\n", add_special_tokens=False)["input_ids"][0]
    with editor.apply(model, [edit], tok) as edited:
        assert "\n" not in edited.answer(editor.wrap(edit), max_new_tokens=5)


def test_choose_scale_prefers_reliability_above_the_locality_floor() -> None:
    from instructedit.evaluation.generation_check import choose_scale

    per_scale = {1.0: {"gen_reliability": 0.1, "gen_locality": 1.0}, 2.0: {"gen_reliability": 0.5, "gen_locality": 0.95},
                 3.0: {"gen_reliability": 0.8, "gen_locality": 0.7}}
    assert choose_scale(per_scale, 0.9) == 2.0
    assert choose_scale(per_scale, 0.6) == 3.0
    assert choose_scale(per_scale, 1.0) == 1.0
    assert choose_scale({1.0: {"gen_reliability": 0.0, "gen_locality": 0.5}, 2.0: {"gen_reliability": 0.3, "gen_locality": 0.4}}, 0.9) == 1.0
    tie = {1.0: {"gen_reliability": 0.5, "gen_locality": 1.0}, 2.0: {"gen_reliability": 0.5, "gen_locality": 1.0}}
    assert choose_scale(tie, 0.9) == 1.0  # the smaller step on ties
    # an in-frame floor, where in-frame locality was measured: 2.0 keeps raw prompts but changes other in-frame answers
    framed = {s: v | {"gen_locality_in_frame": f} for (s, v), f in zip(per_scale.items(), (0.95, 0.6, 0.3))}
    assert choose_scale(framed, 0.6) == 3.0 and choose_scale(framed, 0.6, in_frame_floor=0.5) == 2.0
    assert choose_scale(framed, 0.6, in_frame_floor=0.9) == 1.0
    assert choose_scale(framed, 0.6, in_frame_floor=0.99) == 1.0  # none meets it: the least short of its floors
    assert choose_scale(per_scale, 0.9, in_frame_floor=0.99) == 2.0  # not measured: not required


def test_in_frame_questions_are_the_next_of_the_same_task() -> None:
    from instructedit.evaluation.generation_probes import in_frame_neighbours
    from instructedit.records import EditRecord

    records = [EditRecord(task=t, prompt=f"q{i}", target_new="a", source=f"s{i}") for i, t in enumerate("aabab" + "c")]
    assert in_frame_neighbours(records) == [1, 3, 4, 0, 2, 0]  # c has no other: the next record of any task


def test_calibration_names_the_cells_one_validation_case_from_the_floor() -> None:
    """The recommended recipe retrained: four rounds at x1.5 said 0.835 and kept 169 of 188 (0.899), one case under the
    0.9 floor, so three rounds (0.782 said) won; calibrate names such cells, most said first."""
    from instructedit.calibration import near_floor

    n = 188
    cells = {(3, 1000.0, 1.5): {"gen_reliability": 0.782, "gen_locality": 173 / n, "gen_n": n},
             (4, 1000.0, 1.5): {"gen_reliability": 0.835, "gen_locality": 169 / n, "gen_n": n},  # one case short
             (4, 1000.0, 2.0): {"gen_reliability": 0.899, "gen_locality": 163 / n, "gen_n": n},  # seven short
             (2, 1000.0, 2.0): {"gen_reliability": 0.761, "gen_locality": 169 / n, "gen_n": n},  # one short, says less
             (1, 1000.0, 3.0): {"gen_reliability": 0.900, "gen_locality": 0.9 - 0.5 / n, "gen_n": n},  # half a case short
             (1, 1000.0, 4.0): {"gen_reliability": 0.950, "gen_locality": 0.5, "gen_n": 0}}  # scored nothing
    assert near_floor(cells, (3, 1000.0, 1.5), 0.9) == [(1, 1000.0, 3.0), (4, 1000.0, 1.5)]
    assert near_floor(cells, (3, 1000.0, 1.5), 0.89) == []  # at or above the floor they are admitted, not near it


def test_calibration_warns_when_no_cell_meets_the_floors() -> None:
    """No cell meets a floor: the choice is the cell least short of them, and calibrate says so (``floors_warning``)."""
    from instructedit.calibration import floors_warning
    from instructedit.evaluation.generation_check import floors_missed

    cell = {"gen_reliability": 0.7, "gen_locality": 0.872, "gen_locality_in_frame": 0.287}
    assert floors_missed(cell, 0.85, 0.25) == {}
    assert floors_missed(cell, 0.89) == {"gen_locality": (0.872, 0.89)}
    assert floors_missed(cell, 0.89, 0.65) == {"gen_locality": (0.872, 0.89), "gen_locality_in_frame": (0.287, 0.65)}
    assert floors_missed({"gen_reliability": 0.7, "gen_locality": 0.9}, 0.89, 0.65) == {}  # in frame not measured: not required
    shown = floors_warning(floors_missed(cell, 0.89, 0.65))
    assert shown.startswith("warning: no cell met every floor") and "generation locality 0.872 < 0.89" in shown
    assert "in-frame locality 0.287 < 0.65" in shown and "--scales" in shown


def test_scaled_step_sizes_restore_bitwise(tiny_llama_dir: Path) -> None:
    from instructedit.editors.base import scaled_step_sizes
    from instructedit.editors.registry import build_editor

    model, _ = load_model(str(tiny_llama_dir))
    editor = build_editor(model, load_config(TINY, [f"model.name={tiny_llama_dir}"]))
    before = editor.edit_lrs.detach().clone()
    with scaled_step_sizes(editor, 3.0):
        assert torch.allclose(editor.edit_lrs, before * 3)
    assert torch.equal(editor.edit_lrs, before)


def test_best_checkpoint_carries_the_calibrated_step_sizes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from instructedit.editors.mend import MENDEditor

    config = load_config(TINY, [f"model.name={tiny_llama_dir}", "training.answer_stop=newline", "training.select_on=generation",
                                "training.locality_floor=0.0", "training.edit_scales=[1.0, 4.0]", "training.max_steps=3"])
    Trainer(config, tmp_path, show_progress=False).run()
    vals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"val"' in x and '"step": 0,' not in x]
    assert all(v["edit_scale"] in (1.0, 4.0) and "gen_reliability@4" in v and "gen_locality@1" in v for v in vals)
    best = json.loads((tmp_path / "best" / "editor_config.json").read_text())["training"]
    chosen = next(v for v in vals if v["step"] == best["best_step"])["edit_scale"]
    assert best["edit_scale"] == chosen
    if best["best_step"] == 3:  # the same editor as last/, with α × the chosen multiplier
        last, saved = MENDEditor.from_pretrained(tmp_path / "last"), MENDEditor.from_pretrained(tmp_path / "best")
        assert torch.allclose(saved.edit_lrs, last.edit_lrs * chosen)


def test_calibrate_command_writes_a_scaled_editor(tiny_llama_dir: Path, shared_data_dir: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.cli import main
    from instructedit.editors.mend import MENDEditor

    config = load_config(TINY, [f"model.name={tiny_llama_dir}", "training.max_steps=2", "training.val_every=2"])
    Trainer(config, tmp_path / "run", show_progress=False).run()
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--scales", "1,2", "--locality-floor", "0", "--output", str(out),
                 "--device", "cpu"]) == 0
    report = json.loads((out / "calibration.json").read_text())
    shown = capsys.readouterr()
    assert set(report["scales"]) == {"1", "2"} and report["chosen"] in (1.0, 2.0) and "<- chosen" in shown.out
    for scores in report["scales"].values():  # every rate with its 95 % interval, saved and printed
        for name in ("gen_reliability", "gen_locality"):
            low, high = scores["ci"][name]
            assert 0 <= low <= scores[name] <= high <= 1
    assert shown.out.count("95 % bootstrap intervals") == 2
    assert "generation at each multiplier" in shown.err  # the progress bar, which --no-progress turns off (below)
    source, calibrated = MENDEditor.from_pretrained(tmp_path / "run" / "best"), MENDEditor.from_pretrained(out)
    assert torch.allclose(calibrated.edit_lrs, source.edit_lrs * report["chosen"])
    assert json.loads((out / "editor_config.json").read_text())["calibration"]["chosen"] == report["chosen"]
    assert report["rounds"] == 1 and set(report["rounds_tried"]) == {"1"}
    assert report["floors_met"] is True and "warning: no cell met every floor" not in shown.out  # floor 0: always met
    assert json.loads((out / "editor_config.json").read_text())["queries"]["edit_rounds"] == 1
    # each edit also made in two rounds: every multiplier tried both ways, the rounds chosen saved for apply/edit/evaluate
    from instructedit.api import query_setup
    from instructedit.evaluation.generation_check import choose_scale

    rounds = tmp_path / "rounds"
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--scales", "1,2", "--rounds", "1,2", "--locality-floor", "0",
                 "--output", str(rounds), "--device", "cpu", "--no-progress"]) == 0
    shown = capsys.readouterr().out
    report = json.loads((rounds / "calibration.json").read_text())
    assert set(report["rounds_tried"]) == {"1", "2"} and all(set(v["none"]) == {"1", "2"} for v in report["rounds_tried"].values())
    assert report["scales"] == report["rounds_tried"][str(report["rounds"])]["none"]
    assert query_setup(rounds)["edit_rounds"] == report["rounds"] and shown.count("2 rounds, α") == 2 and "<- chosen" in shown
    best = max(v["gen_reliability"] for per in report["rounds_tried"].values() for v in per["none"].values())
    assert report["scales"][f"{report['chosen']:g}"]["gen_reliability"] == best  # floor 0: the most said, fewer rounds on a tie
    assert query_setup(rounds)["many_edit_scale"] == report["many_edit_scale"] == (1.0 if report["rounds"] == 1 else pytest.approx(
        choose_scale({float(k): v for k, v in report["rounds_tried"]["1"]["none"].items()}, 0.0) / report["chosen"]))
    # the many-edit multiplier: the one-round choice over the chosen one where more rounds won (here: x3 against x2)
    from instructedit.calibration import one_round_scale

    def cell(said: float, kept: float) -> dict[str, float]:
        return {"gen_reliability": said, "gen_locality": kept}

    grid = {1: {1000.0: {2.0: cell(0.5, 0.95), 3.0: cell(0.65, 0.91), 4.0: cell(0.8, 0.7)}},
            2: {1000.0: {2.0: cell(0.77, 0.9), 3.0: cell(0.83, 0.87)}}}
    assert one_round_scale(grid, 2, 1000.0, 2.0, 0.9) == 1.5  # one round's best above the floor is x3
    assert one_round_scale(grid, 1, 1000.0, 3.0, 0.9) == 1.0 and one_round_scale({2: grid[2]}, 2, 1000.0, 2.0, 0.9) == 1.0
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--rounds", "0", "--output", str(tmp_path / "z")]) == 2
    assert "--rounds '0' needs numbers >= 1" in caplog.text
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--output", str(out)]) == 2  # an existing folder is refused
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--scales", "1,-2", "--output", str(tmp_path / "x")]) == 2
    # another file's records instead of the run's validation split: ZsRE's training questions (a task the run never saw)
    zsre = shared_data_dir / "zsre" / "zsre_mend_train-1k.json"
    questions = tmp_path / "on-questions"
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--scales", "1", "--locality-floor", "0", "--val-data", str(zsre),
                 "--val-size", "3", "--output", str(questions), "--device", "cpu", "--no-progress"]) == 0
    assert "generation at each multiplier" not in capsys.readouterr().err
    report = json.loads((questions / "calibration.json").read_text())
    assert report["records"] == f"the first 3 records with a locality prompt of {zsre}" and report["scales"]["1"]["gen_n"] == 3
    assert main(["calibrate", "--run", str(tmp_path / "run"), "--val-data", str(tmp_path / "missing.json"), "--output",
                 str(tmp_path / "y")]) == 2
    assert "--val-data" in caplog.text and "missing.json: no such file" in caplog.text


def test_an_interrupted_calibration_resumes_from_the_cells_it_finished(tiny_llama_dir: Path, tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.cli import main
    from instructedit.evaluation import generation_check

    config = load_config(TINY, [f"model.name={tiny_llama_dir}", "training.max_steps=2", "training.val_every=2"])
    Trainer(config, tmp_path / "run", show_progress=False).run()
    base = ["calibrate", "--run", str(tmp_path / "run"), "--scales", "1,2", "--rounds", "1,2", "--locality-floor", "0",
            "--device", "cpu", "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "whole")]) == 0
    real, scored = generation_check.generation_scores, []

    def score_then_stop(*args, **kwargs):
        if len(scored) == 1:
            raise KeyboardInterrupt  # Ctrl-C while the second cell (two rounds) is scored
        scored.append(kwargs["rounds"])
        return real(*args, **kwargs)

    monkeypatch.setattr(generation_check, "generation_scores", score_then_stop)
    out = tmp_path / "calibrated"
    assert main([*base, "--output", str(out)]) == 130
    partial = tmp_path / "calibrated.partial.json"
    assert not out.exists() and [c["rounds"] for c in json.loads(partial.read_text())["cells"]] == [1]
    scored.clear()
    monkeypatch.setattr(generation_check, "generation_scores", lambda *a, **k: scored.append(k["rounds"]) or real(*a, **k))
    capsys.readouterr()
    assert main([*base, "--output", str(out)]) == 0
    assert scored == [2] and "1 cell of its grid kept in" in capsys.readouterr().out  # only the cell left was scored
    assert json.loads((out / "calibration.json").read_text()) == json.loads((tmp_path / "whole" / "calibration.json").read_text())
    assert not partial.exists()
    # the cells of another calibration (other multipliers) are not taken over; --restart scores every cell again
    other = tmp_path / "other.partial.json"
    other.write_text(json.dumps({"partial_calibration": {"scales": [3.0]}, "cells": []}))
    assert main([*base, "--output", str(tmp_path / "other")]) == 2
    assert "holds the cells of an interrupted calibration with different" in caplog.text and "pass --restart" in caplog.text
    scored.clear()
    assert main([*base, "--output", str(tmp_path / "other"), "--restart"]) == 0 and scored == [1, 2] and not other.exists()


def test_calibrate_with_a_preservation_sample_saves_it_with_the_editor(tiny_llama_dir: Path, shared_data_dir: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.calibration import in_frame_texts
    from instructedit.cli import main
    from instructedit.editors.mend import MENDEditor
    from instructedit.editors.neighbours import load_subjects, subject_pool
    from instructedit.tasks.loaders import load_records

    run = tmp_path / "run"
    config = load_config(TINY, [f"model.name={tiny_llama_dir}", "editor.aggregation=least_squares", "training.max_steps=2",
                                "training.val_every=2"])
    trainer = Trainer(config, run, show_progress=False)
    trainer.run()
    source = MENDEditor.from_pretrained(run / "best").eval()
    base = ["calibrate", "--run", str(run), "--scales", "1,2", "--locality-floor", "0", "--device", "cpu", "--val-size", "5"]
    data = shared_data_dir / "counterfact" / "train_cf.json"
    samples = {"train": (["--preserve-weight", "50,80"], locality_texts([r for r in trainer.data.train if r.locality][:3]), "training split of"),
               "file": (["--preserve-weight", "50", "--preserve-data", str(data)], locality_texts(load_records(data).records[:3]), str(data))}
    for name, (option, texts, says) in samples.items():
        out = tmp_path / name
        assert main([*base, "--preserve", "3", *option, "--output", str(out)]) == 0
        assert "preservation sample: the locality prompts + answers of the first 3 records with one of" in capsys.readouterr().out
        report = json.loads((out / "calibration.json").read_text())
        tried = report["preservation"]["weights_tried"]
        assert set(tried) == ({"50", "80"} if name == "train" else {"50"}) and all(set(v) == {"1", "2"} for v in tried.values())
        weight = report["preservation"]["weight"]
        assert f"{weight:g}" in tried and report["scales"] == tried[f"{weight:g}"] and says in report["preservation"]["source"]
        assert report["records"] == "the first 5 records of the run's validation split"
        calibrated = MENDEditor.from_pretrained(out).eval()
        assert torch.allclose(calibrated.edit_lrs, source.edit_lrs * report["chosen"])
        # the entities apply(neighbours=...) swaps in: the training split's subjects, shipped with the editor
        assert load_subjects(out) == subject_pool(r.subject for r in trainer.data.train) and len(load_subjects(out)) > 3
        # the sample rebuilt: the saved covariance is its covariance
        rebuilt = key_memory(source, trainer.model, trainer.data.collator, texts, past_weight=0.0, text_weight=weight)
        assert calibrated.preservation is not None and calibrated.preservation.text_tokens == rebuilt.text_tokens
        assert calibrated.preservation.text_weight == weight
        assert calibrated.preservation_texts == texts  # saved with it: a key memory can hold them again (--preserve-data editor)
        for weight, covariance in rebuilt.text.items():
            torch.testing.assert_close(calibrated.preservation.text[weight], covariance)
    # a sample from the file the calibration measures leaves out the validation records' own locality prompts
    val_texts = locality_texts([r for r in load_records(data).records if r.locality and r.convsent is None][:2])
    sample = locality_texts([r for r in load_records(data).records if r.locality][:3])
    kept = [t for t in sample if t not in set(val_texts)]
    assert 0 < len(kept) < len(sample)
    with caplog.at_level("WARNING"):
        assert main([*base[:-2], "--val-size", "2", "--val-data", str(data), "--preserve", "3", "--preserve-weight", "50",
                     "--preserve-data", str(data), "--output", str(tmp_path / "same-file")]) == 0
    assert f"left out {len(sample) - len(kept)} of its {len(sample)} texts that the calibration also measures" in caplog.text
    said = json.loads((tmp_path / "same-file" / "calibration.json").read_text())["preservation"]["source"]
    assert f"({len(kept)} texts, without the {len(sample) - len(kept)} the calibration measures, " in said
    rebuilt = key_memory(source, trainer.model, trainer.data.collator, kept, past_weight=0.0, text_weight=50.0)
    assert MENDEditor.from_pretrained(tmp_path / "same-file").preservation.text_tokens == rebuilt.text_tokens
    assert MENDEditor.from_pretrained(tmp_path / "same-file").preservation_texts == kept
    # an in-frame sample: the questions of training records asked in the edit forms, held at their own weight beside the sample
    framed_out = tmp_path / "in-frame"
    assert main([*base, "--preserve", "3", "--preserve-weight", "50", "--in-frame-preserve", "4", "--in-frame-weight", "20",
                 "--in-frame-floor", "0.5", "--output", str(framed_out)]) == 0
    report = json.loads((framed_out / "calibration.json").read_text())
    assert report["in_frame_floor"] == 0.5 and report["preservation"]["in_frame"] == {"records": 4, "weight": 20.0, "data": ["train"]}
    assert "+ the questions of the first 4 single-answer records of the training split of" in report["preservation"]["source"]
    assert all("gen_locality_in_frame" in v and "gen_in_frame_target" in v for v in report["scales"].values())
    asked = {r.prompt for r in trainer.data.val[:5]}
    questions = in_frame_texts(trainer.data.train, trainer.data.instructions(trainer.data.train, config.data.instruction_seed),
                               trainer.data.collator, 4, asked, "x")
    assert len(questions) == 4 and not {q for q, _ in questions} & asked and all(q.startswith("Task: ") for q, _ in questions)
    own = key_memory(source, trainer.model, trainer.data.collator, samples["train"][1], past_weight=0.0, text_weight=50.0)
    framed = key_memory(source, trainer.model, trainer.data.collator, questions, 0.0, 1.0, answers="model")
    calibrated = MENDEditor.from_pretrained(framed_out).eval()
    assert calibrated.preservation.text_weight == 50.0 and calibrated.preservation.text_tokens == own.text_tokens + framed.text_tokens
    for weight, covariance in own.text.items():  # 50·C + 20·C_frame, kept as 50·(C + 20/50·C_frame)
        torch.testing.assert_close(calibrated.preservation.text[weight], covariance + 20 / 50 * framed.text[weight])
    # two sources: N records' questions from each, a file's in the first seen description of their task
    assert main([*base, "--preserve", "3", "--preserve-weight", "50", "--in-frame-preserve", "2", "--in-frame-data", f"train,{data}",
                 "--output", str(tmp_path / "two-sources")]) == 0
    from_file = load_records(data).records
    both = (in_frame_texts(trainer.data.train, trainer.data.instructions(trainer.data.train, config.data.instruction_seed),
                           trainer.data.collator, 2, asked, "x")
            + in_frame_texts(from_file, [trainer.data.pool.evaluation_index("seen")] * len(from_file), trainer.data.collator, 2, asked, "x"))
    two = MENDEditor.from_pretrained(tmp_path / "two-sources")
    assert two.preservation.text_tokens == own.text_tokens + key_memory(source, trainer.model, trainer.data.collator, both, 0.0, 1.0,
                                                                        answers="model").text_tokens
    assert f"of the training split of {run} and of {data}" in two.preservation_source
    # the options are checked before anything is loaded
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--in-frame-preserve", "3"]) == 2
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--preserve", "3", "--in-frame-data", str(data)]) == 2
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--in-frame-floor", "2"]) == 2
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--preserve", "3", "--in-frame-preserve", "3",
                 "--in-frame-data", f"train,{tmp_path / 'none.json'}"]) == 2
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--preserve-weight", "3"]) == 2
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--preserve", "3", "--preserve-weight", "5,x"]) == 2
    assert main(["calibrate", "--run", str(run), "--output", str(tmp_path / "x"), "--preserve-data", str(tmp_path / "none.json")]) == 2
    sum_run = tmp_path / "sum"
    Trainer(load_config(TINY, [f"model.name={tiny_llama_dir}", "training.max_steps=1", "training.val_every=1"]), sum_run, show_progress=False).run()
    with caplog.at_level("ERROR"):
        assert main(["calibrate", "--run", str(sum_run), "--output", str(tmp_path / "y"), "--device", "cpu", "--preserve", "3"]) == 2
    assert "needs an editor with editor.aggregation least_squares" in caplog.text and not (tmp_path / "y").exists()


@pytest.mark.parametrize("instructions", [False, True])
def test_evaluate_follows_how_the_editor_was_trained(tiny_gpt2_dir: Path, tmp_path: Path, instructions: bool) -> None:
    from instructedit.cli import main
    from instructedit.evaluation.report import load_report_json

    config = load_config(TINY, [f"model.name={tiny_gpt2_dir}", f"data.instructions={str(instructions).lower()}", "training.max_steps=1",
                                "training.val_every=1"])
    Trainer(config, tmp_path / "run", show_progress=False).run()
    out = tmp_path / "report.json"
    args = ["evaluate", "--editor", str(tmp_path / "run" / "best"), "--task", "counterfact", "--limit", "2", "--output", str(out),
            "--device", "cpu", "--no-progress", "--protocol", "teacher_forced"]
    assert main(args) == 0
    settings = load_report_json(out).settings
    if instructions:
        assert settings.instruction == 0 and settings.instruction_reason == "the editor was trained with instructions"
    else:
        assert settings.instruction is None and settings.instruction_reason == "the editor was trained without instructions"
        assert "(the editor was trained without instructions)" in out.with_suffix(".md").read_text()
    assert main([*args, "--instruction", "unseen"]) == 0  # an explicit setting wins
    assert load_report_json(out).settings.instruction == 9 and load_report_json(out).settings.instruction_reason == "given with --instruction"


def test_a_resume_may_change_the_selection_but_not_the_recipe(tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    base = [f"model.name={tiny_llama_dir}", "training.select_on=generation", "training.locality_floor=0.9"]
    Trainer(load_config(TINY, [*base, "training.max_steps=3"]), tmp_path, show_progress=False).run()
    with caplog.at_level("WARNING"):
        trainer = Trainer(load_config(TINY, [*base, "training.max_steps=6", "training.locality_floor=0.5", "training.edit_scales=[1.0, 2.0]"]),
                          tmp_path, show_progress=False)
        trainer.run()
    assert "another selection" in caplog.text and "locality_floor 0.9 -> 0.5" in caplog.text
    saved = load_config(tmp_path / "config.yaml")
    assert saved.training.locality_floor == 0.5 and saved.training.edit_scales == [1.0, 2.0]  # the run folder says what chose best/
    with pytest.raises(ValueError, match="different configuration"):
        Trainer(load_config(TINY, [*base, "training.max_steps=9", "training.locality_floor=0.5", "training.edit_scales=[1.0, 2.0]",
                                   "training.c_answer_margin=0.3"]), tmp_path, show_progress=False).run()


def test_generation_scores_with_row_edits_equal_edits_written_one_at_a_time(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from instructedit.editors.base import apply_in_place
    from instructedit.evaluation.generation import answer_budget, bootstrap_ci, exact_match, first_line, greedy_generate, normalize_answer
    from instructedit.editors.base import scaled_step_sizes
    from instructedit.evaluation.generation_check import generation_scores
    from instructedit.evaluation.generation_probes import in_frame_neighbours

    config = load_config(TINY, [f"model.name={tiny_llama_dir}", f"data.template={json.dumps(PREFIX_TEMPLATE)}", "training.answer_stop=newline"])
    trainer = Trainer(config, tmp_path, show_progress=False)
    model, tok, editor, collator = trainer.model, trainer.tokenizer, trainer.editor, trainer.data.collator
    with torch.no_grad():
        editor.edit_lrs.fill_(1.0)  # strong enough that some edits change the locality answer
    records = [r for r in trainer.data.val if r.convsent is None][:10]
    instructions = [0] * len(records)
    scales = (0.01, 0.3, 1.0, 10.0)

    neighbours = in_frame_neighbours(records)

    def one_at_a_time(scale: float) -> dict[str, float]:
        rel, same, framed, took = [], [], [], []
        for r, k in zip(records, neighbours):
            prompt = collator.wrap(r, r.prompt, 0)
            other = collator.wrap(r, records[k].prompt, 0)  # another record's question in this edit's frame
            loc = r.locality[0]
            before = greedy_generate(model, tok, [loc.prompt, other], [answer_budget(tok, loc.answer), max(answer_budget(tok, records[k].target_new), answer_budget(tok, r.target_new))])
            with scaled_step_sizes(editor, scale):
                result = editor.edit(model, collator.qa_batch([(prompt, r.target_new)], r.source, stop=True))
            with apply_in_place(model, result), torch.no_grad():
                said = greedy_generate(model, tok, [prompt], answer_budget(tok, r.target_new))[0]
                after = greedy_generate(model, tok, [loc.prompt, other], [answer_budget(tok, loc.answer), max(answer_budget(tok, records[k].target_new), answer_budget(tok, r.target_new))])
            rel.append(exact_match(first_line(said), r.target_new))
            same.append(float(normalize_answer(first_line(after[0])) == normalize_answer(first_line(before[0]))))
            framed.append(float(normalize_answer(first_line(after[1])) == normalize_answer(first_line(before[1]))))
            took.append(exact_match(first_line(after[1]), r.target_new))
        per_case[scale] = {"gen_reliability": rel, "gen_locality": same}
        in_frame[scale] = {"gen_locality_in_frame": sum(framed) / len(framed), "gen_in_frame_target": sum(took) / len(took)}
        return {"gen_reliability": sum(rel) / len(rel), "gen_locality": sum(same) / len(same), "gen_n": len(rel)}

    editor.eval()
    per_case: dict[float, dict[str, list[float]]] = {}
    in_frame: dict[float, dict[str, float]] = {}
    expected = {scale: one_at_a_time(scale) for scale in scales}
    assert generation_scores(model, tok, editor, collator, records, instructions, scales) == expected
    # in-frame locality: the neighbour's question asked in the edit's frame, as asked one edit at a time above
    assert generation_scores(model, tok, editor, collator, records, instructions, scales, in_frame=True) == {
        scale: expected[scale] | in_frame[scale] for scale in scales}
    assert len({v["gen_locality_in_frame"] for v in in_frame.values()}) > 1
    # with intervals: the same rates, and each rate's bootstrap interval over the same per-record values
    with_ci = generation_scores(model, tok, editor, collator, records, instructions, scales, intervals=True)
    for scale in scales:
        ci = with_ci[scale].pop("ci")
        assert with_ci[scale] == expected[scale]
        for name, values in per_case[scale].items():
            interval = bootstrap_ci(values)
            assert ci[name] == [interval.low, interval.high] and interval.low <= expected[scale][name] <= interval.high
    assert len({v["gen_locality"] for v in expected.values()}) > 1  # the scales differ: the comparison is not trivial


def test_edits_made_in_both_forms_are_trained_saved_loaded_and_calibrated(tiny_chat_llama_dir: Path, tiny_llama_dir: Path, tmp_path: Path,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.api import Edit, load_editor, query_setup
    from instructedit.cli import main

    run = tmp_path / "run"
    config = load_config(TINY, [f"model.name={tiny_chat_llama_dir}", "editor.aggregation=least_squares", "training.edit_forms=[chat, wrapped]",
                                "training.answer_stop=newline", "training.select_on=generation", "training.locality_floor=0.0",
                                "training.max_steps=2", "training.val_every=2"])
    Trainer(config, run, show_progress=False).run()
    val = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"val"' in x][-1]
    assert val["gen_reliability"] == pytest.approx((val["gen_reliability_wrapped"] + val["gen_reliability_chat"]) / 2)
    assert query_setup(run / "best")["edit_forms"] == ["wrapped", "chat"]
    editor = load_editor(run / "best")
    assert editor.edit_forms == ("wrapped", "chat")
    model, tok = load_model(str(tiny_chat_llama_dir))
    edits = [Edit("Who wrote Hamlet?", "Marlowe", task="zsre"), Edit("The capital of France is", "Rome", task="counterfact")]
    batch = editor.edit_batch(edits, tok)
    assert batch.n_rows == 4  # per edit: the wrapped prompt, then the chat question, each with the target and the stop
    chat_row = tok.decode(batch.input_ids[1][batch.attention_mask[1].bool()], skip_special_tokens=True)
    assert chat_row.startswith("User: Who wrote Hamlet?\nAssistant: Marlowe") and "Task:" in tok.decode(batch.input_ids[0])
    with editor.apply(model, edits, tok) as edited:
        assert edited.answer("User: Who wrote Hamlet?\nAssistant:", max_new_tokens=3) is not None
    # calibrating a run for other forms saves them with the calibrated editor
    out = tmp_path / "calibrated"
    assert main(["calibrate", "--run", str(run), "--scales", "1,2", "--locality-floor", "0", "--edit-forms", "chat", "--output", str(out),
                 "--device", "cpu", "--val-size", "4", "--answer-stop", "newline+turn"]) == 0
    assert query_setup(out)["edit_forms"] == ["chat"] and query_setup(out)["answer_stop"] == "newline+turn"
    assert load_editor(out).answer_stop == "newline+turn"  # the chat answers of its edits end the turn (the run's: newline)
    report = json.loads((out / "calibration.json").read_text())
    assert report["answer_stop"] == "newline+turn" and report["edit_forms"] == ["chat"] and set(report["scales"]["1"]) == {"gen_reliability", "gen_locality", "gen_locality_in_frame", "gen_in_frame_target", "gen_n", "ci"}
    bare = tmp_path / "calibrated-plain"  # the bare question as a second edit input: each form's reliability reported
    assert main(["calibrate", "--run", str(run), "--scales", "1", "--locality-floor", "0", "--edit-forms", "plain,wrapped", "--output",
                 str(bare), "--device", "cpu", "--val-size", "4"]) == 0
    assert query_setup(bare)["edit_forms"] == ["wrapped", "plain"]
    saved = json.loads((bare / "editor_config.json").read_text())["queries"]  # many edits leave the bare question out, said in the file
    assert saved["many_edit_forms"] == query_setup(bare)["many_edit_forms"] == ["wrapped"]
    assert json.loads((out / "editor_config.json").read_text())["queries"]["many_edit_forms"] == ["chat"]
    scores = json.loads((bare / "calibration.json").read_text())["scales"]["1"]
    assert scores["gen_reliability"] == pytest.approx((scores["gen_reliability_wrapped"] + scores["gen_reliability_plain"]) / 2)
    assert set(scores["ci"]) == {"gen_reliability", "gen_reliability_wrapped", "gen_reliability_plain", "gen_locality",
                                 "gen_locality_in_frame", "gen_locality_in_frame_wrapped", "gen_locality_in_frame_plain", "gen_in_frame_target"}
    assert main(["calibrate", "--run", str(run), "--edit-forms", "wrapped,bare", "--output", str(tmp_path / "x"), "--device", "cpu"]) == 2
    assert "--edit-forms: ['wrapped', 'bare'] must be distinct forms" in caplog.text
    # a tokenizer without a chat template cannot make chat edits: said before any training step
    plain = load_config(TINY, [f"model.name={tiny_llama_dir}", "training.edit_forms=[wrapped, chat]", "training.max_steps=1"])
    with pytest.raises(ValueError, match="edit form 'chat' needs a tokenizer with a chat template"):
        Trainer(plain, tmp_path / "no-chat", show_progress=False).run()
