"""Many edits at once and in sequence: the batch-editing and lifelong studies on tiny GPT-2 / LLaMA models."""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from instructedit.analysis.many_edits import batch_study, perplexity, sequential_study
from instructedit.config import load_config
from instructedit.editors.registry import build_editor
from instructedit.evaluation.runner import evaluate, sequential_schedule
from instructedit.models.loading import load_model
from instructedit.records import EditRecord, QAItem
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
POOL = InstructionPool.default()
pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECTS = ["France", "Italy", "Spain", "Norway", "Peru", "Chile", "Japan", "Kenya", "Egypt", "Canada", "Brazil", "India"]
TARGETS = ["Rome", "Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Delhi", "Quito", "Bern", "Riga", "Baku", "Doha"]


def many_records(n: int) -> list[EditRecord]:
    return [EditRecord(task="zsre", prompt=f"What is the capital of {s}?", target_new=t, rephrase=(f"Which city is the capital of {s}?",),
                       locality=(QAItem(f"nq question: who wrote the anthem of {s}?", "an unknown poet", "NQ"),), source=f"hand#{i}")
            for i, (s, t) in enumerate(zip(SUBJECTS[:n], TARGETS[:n]))]


def _setup(model_dir: Path):
    model, tokenizer = load_model(str(model_dir))
    torch.manual_seed(0)
    editor = build_editor(model, load_config(CONFIG, [f"model.name={model_dir}", "editor.init_edit_lr=5.0"])).eval()
    return model, tokenizer, editor, Collator(tokenizer, 256, POOL)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batch_study_scores_each_size_and_restores_the_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from instructedit.analysis import many_edits

    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    records = many_records(8)
    before = _state(model)
    calls: list[int] = []  # edits per call, in order
    made = many_edits.apply_in_rounds
    monkeypatch.setattr(many_edits, "apply_in_rounds", lambda e, m, batch, *a, **k: calls.append(len(batch.input_ids)) or made(e, m, batch, *a, **k))
    result = batch_study(model, tokenizer, editor, collator, records, 0, [1, 3, 8], progress=False)
    assert len(calls) == 4 and calls[0] == calls[1]  # an untimed warm-up edit of the first case, then the timed calls
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # every weight bit for bit
    assert [p["n_edits"] for p in result["points"]] == [1, 3, 8]
    for point in result["points"]:
        assert point["seconds_per_edit"] == pytest.approx(point["seconds"] / point["n_edits"])
        for key, protocol in [("reliability", "teacher_forced"), ("locality", "teacher_forced"), ("gen_reliability", "generation"),
                              ("gen_locality", "generation"), ("gen_generalization", "generation")]:
            summary = point[key]
            assert summary["protocol"] == protocol and summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
        assert point["reliability"]["n"] == point["n_edits"]
    # one edit in one call is the runner's single-edit evaluation of that case
    single = evaluate(model, tokenizer, editor, records[:1], POOL, 0, progress=False, protocol="both")
    post = single.cases[0].post
    assert result["points"][0]["reliability"]["mean"] == pytest.approx(post["reliability"], abs=1e-6)
    assert result["points"][0]["locality"]["mean"] == pytest.approx(post["locality"], abs=1e-6)
    assert result["points"][0]["gen_reliability"]["mean"] == single.cases[0].gen_post["gen_reliability"]
    with pytest.raises(ValueError, match="sizes"):
        batch_study(model, tokenizer, editor, collator, records, 0, [9], progress=False)


def test_unedited_records_locality_is_scored_on_the_edited_model(tiny_model_dir: Path) -> None:
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    records = many_records(5)
    # the first three records' own locality prompts as the "unedited" ones: the same prompts on the same edited model
    result = batch_study(model, tokenizer, editor, collator, records[:3], 0, [3], progress=False, unedited=records[:3])
    point = result["points"][0]
    assert point["unedited"]["n_cases"] == 3 and point["unedited"]["n_prompts"] == 3
    for key, protocol in (("locality", "teacher_forced"), ("gen_locality", "generation")):
        assert point["unedited"][key]["protocol"] == protocol and point["unedited"][key]["n"] == 3
        assert point["unedited"][key]["mean"] == pytest.approx(point[key]["mean"], abs=1e-9)
    # records never edited: scored, the edited records' own numbers unchanged by them
    other = batch_study(model, tokenizer, editor, collator, records[:3], 0, [3], progress=False, unedited=records[3:])
    assert other["points"][0]["unedited"]["n_cases"] == 2 and other["points"][0]["locality"] == point["locality"]
    assert "unedited" not in batch_study(model, tokenizer, editor, collator, records[:3], 0, [3], progress=False,
                                         generation=False)["points"][0]
    bare = [dataclasses.replace(r, locality=()) for r in records[3:]]
    with pytest.raises(ValueError, match="2 unedited records have no locality prompts"):
        batch_study(model, tokenizer, editor, collator, records[:3], 0, [3], progress=False, unedited=bare)


def test_rounds_edit_again_on_the_edited_model_and_roll_back_bitwise(tiny_model_dir: Path) -> None:
    """apply(rounds=2) is one edit, then the same edit computed on the model it left, written over it; the one handle
    undoes both bit for bit; batch_study makes its N-edit calls so, and its single edits in one round."""
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    with torch.no_grad():  # descending steps (an untrained network's update follows the gradient): no round is undone
        editor.edit_lrs.mul_(-0.002)
    records = many_records(3)
    batch = collator.qa_batch([pair for r in records for pair in collator.edit_pairs(r, 0)], "edit inputs", stop=True)
    before = _state(model)
    with editor.apply(model, batch, rounds=2) as handle:
        assert handle.rounds_made == 2
        twice = _state(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    first = editor.apply(model, batch)
    once = _state(model)
    second = editor.apply(model, batch)  # computed on the edited model
    by_hand = _state(model)
    second.rollback()
    first.rollback()
    assert all(torch.equal(twice[k], by_hand[k]) for k in before)
    assert any(not torch.equal(twice[k], once[k]) for k in before)  # the second round moved the weights again
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        editor.apply(model, batch, rounds=0)
    from instructedit.editors.learned import check_rounds

    check_rounds(object(), 1)  # any editor edits in one round
    with pytest.raises(ValueError, match="only a learned editor"):  # e.g. FT-L, whose apply takes no rounds
        batch_study(model, tokenizer, object(), collator, records, 0, [3], progress=False, rounds=2)
    one, two = (batch_study(model, tokenizer, editor, collator, records, 0, [3], generation=False, progress=False, singles=True, rounds=k)
                for k in (1, 2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for key in ("reliability", "generalization", "locality"):  # the single edits are one-round edits either way
        assert one["single"][key] == two["single"][key]
    assert one["points"][0]["n_edits"] == two["points"][0]["n_edits"] == 3


def test_single_edits_in_the_editors_calibrated_rounds(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    """An editor calibrated to make each edit in 2 rounds (queries.edit_rounds): rounds_result reads apply's rounds
    back and leaves the weights bit for bit; schedule_for, the API and evaluate make its few edits so; evaluate's
    functional path scores them as editing in place does; a damaged value fails naming the file."""
    from instructedit.api import Edit, load_editor, query_setup
    from instructedit.editors.base import ThinUpdates
    from instructedit.editors.learned import schedule_for
    from instructedit.editors.rounds import rounds_result

    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    with torch.no_grad():  # descending steps: no round is undone
        editor.edit_lrs.mul_(-0.002)
    records = many_records(3)
    batch = collator.qa_batch(collator.edit_pairs(records[0], 0), "edit input", stop=True)
    before = _state(model)
    result = rounds_result(editor, model, batch, 2)
    formed = dict(result.new_params)  # W + ΔW, formed from the weights as found
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # never written
    with editor.apply(model, batch, rounds=2):
        for name, new in formed.items():
            # each round made with the rounds before it added by hooks: the written rounds' weights up to float rounding
            torch.testing.assert_close(new, model.get_parameter(name).detach(), atol=1e-6, rtol=0)
            assert torch.allclose(result.updates[name], new - before[name], atol=1e-6)
            left, right = result.low_rank[name]
            assert left.shape[1] == right.shape[0] > 0
    from instructedit.editors import rounds as made_in_rounds

    # a round without thin factors (or a half-precision model): the rounds are written, read back, rolled back bitwise
    real_add = made_in_rounds.HookedRounds.add
    monkeypatch.setattr(made_in_rounds.HookedRounds, "add", lambda self, r: real_add(self, replace(r, low_rank=None)))
    written = rounds_result(editor, model, batch, 2)
    monkeypatch.setattr(made_in_rounds.HookedRounds, "add", real_add)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    with editor.apply(model, batch, rounds=2):
        for name, new in written.new_params.items():
            assert torch.equal(new, model.get_parameter(name))
            torch.testing.assert_close(new, formed[name], atol=1e-6, rtol=0)
    assert isinstance(result.updates, ThinUpdates)
    one_round = editor.edit(model, batch)
    assert any(not torch.allclose(result.updates[k], one_round.updates[k]) for k in result.updates)

    assert [schedule_for(editor, n, "auto", single_rounds=2) for n in (1, 16)] == [(2, None, 1.0), (2, None, 1.0)]
    assert schedule_for(editor, 17, "auto", single_rounds=2) == (1, None, 1.0)  # many edits: their own schedule (no sample here)
    assert schedule_for(editor, 1, 3, single_rounds=2) == (3, None, 1.0)  # rounds asked for are taken as they are
    assert schedule_for(object(), 1, "auto", single_rounds=2) == (1, None, 1.0)  # not a learned editor: one round
    with pytest.raises(ValueError, match="edit rounds must be a whole number >= 1"):
        schedule_for(editor, 1, "auto", single_rounds=0)

    folder = editor.save_pretrained(tmp_path / "editor", extra={"queries": {"edit_rounds": 2}})
    assert query_setup(folder)["edit_rounds"] == 2 and query_setup(editor.save_pretrained(tmp_path / "plain"))["edit_rounds"] == 1
    loaded = load_editor(folder)
    assert loaded.edit_rounds == 2
    edit = Edit(prompt=records[0].prompt, target=records[0].target_new, task="zsre")
    with loaded.apply(model, edit, tokenizer) as edited:  # the default, rounds="auto": the editor's 2 rounds
        assert edited.rounds_made == 2
        by_api = _state(model)
    with loaded.apply(model, edit, tokenizer, rounds=2):
        assert all(torch.equal(by_api[k], v) for k, v in model.state_dict().items())
    from instructedit.cli import main

    capsys.readouterr()
    assert main(["edit", "--editor", str(folder), "--prompt", edit.prompt, "--target", edit.target, "--task", "zsre", "--device", "cpu"]) == 0
    assert "made in 2 rounds, as calibrated" in capsys.readouterr().out  # the header says how the edit was made
    broken = json.loads((folder / "editor_config.json").read_text())
    broken["queries"]["edit_rounds"] = 0
    (folder / "editor_config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"editor_config.json: queries.edit_rounds: edit rounds must be a whole number >= 1, got 0"):
        query_setup(folder)

    import instructedit.evaluation.packing as packing

    made: list[int] = []
    monkeypatch.setattr(packing, "rounds_result", lambda *a: made.append(a[3]) or rounds_result(*a))
    kwargs = dict(progress=False, protocol="both", answer_stop="newline")
    fast = evaluate(model, tokenizer, editor, records, POOL, 0, edit_rounds=2, **kwargs)
    assert made[-3:] == [2, 2, 2]  # each case's edit made in the rounds (the first case may be scored twice: packing's check)
    slow = evaluate(model, tokenizer, editor, records, POOL, 0, edit_rounds=2, fast=False, **kwargs)
    once = evaluate(model, tokenizer, editor, records, POOL, 0, **kwargs)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    for a, b in zip(fast.cases, slow.cases):  # the functional scoring of the rounds' edit is the edit written in place
        assert a.post == pytest.approx(b.post, abs=1e-5) and a.gen_post == b.gen_post
    assert len(made) <= 5  # one-round evaluation makes no rounds
    assert fast.settings.edit_rounds == 2 and once.settings.edit_rounds == 1 and "2 rounds" in fast.restoration["mode"]
    # an edit made in rounds comes from the case's edit input alone; one row, it is carried first in the probe pass and
    # the rounds start from its state there (no pass of their own: round_state is not called). The scores and answers are
    # those of layouts without it (edit_rows=0), whose rounds pass the edit input themselves
    import instructedit.evaluation.runner as runner
    from instructedit.evaluation.packing import prepare_cases

    rows: list[int | None] = []
    passes: list[int] = []
    real_state = type(editor).round_state
    monkeypatch.setattr(type(editor), "round_state", lambda self, *a: passes.append(1) or real_state(self, *a))
    again = evaluate(model, tokenizer, editor, records, POOL, 0, edit_rounds=2, **kwargs)
    assert passes == []
    monkeypatch.setattr(runner, "prepare_cases", lambda *a, **k: rows.append(k["edit_rows"]) or prepare_cases(*a, **{**k, "edit_rows": 0}))
    own = evaluate(model, tokenizer, editor, records, POOL, 0, edit_rounds=2, **kwargs)
    assert rows == [1] and len(passes) >= len(records)  # the packing check's case may be edited twice
    monkeypatch.setattr(runner, "prepare_cases", lambda *a, **k: rows.append(k["edit_rows"]) or prepare_cases(*a, **k))
    evaluate(model, tokenizer, editor, records[:1], POOL, 0, edit_rounds=2, fast=False, **kwargs)
    assert rows == [1, 0]  # edited in place, not from a probe pass: no edit row in its passes
    monkeypatch.setattr(runner, "prepare_cases", prepare_cases)
    for a, b, c in zip(fast.cases, own.cases, again.cases):
        assert a.pre == pytest.approx(b.pre, abs=1e-5) and a.post == pytest.approx(b.post, abs=1e-5) and a.gen_post == b.gen_post
        assert (a.pre, a.post, a.gen_post) == (c.pre, c.post, c.gen_post)  # and the same run again: to the bit
    stopped = Collator(tokenizer, 128, POOL, answer_stop="newline")
    lean, _ = prepare_cases(stopped, records, 0, 16, torch.device("cpu"), edit_rows=0)
    full, _ = prepare_cases(stopped, records, 0, 16, torch.device("cpu"))
    for a, b in zip(lean, full):
        assert [p for p in b.probes if p.family != "edit"] == a.probes and a.n_edit_rows == 0 and b.n_edit_rows == b.edit.input_ids.shape[0]
        assert torch.equal(a.targets, b.targets[b.targets.shape[0] - a.targets.shape[0]:])  # the edit rows' targets came first
    one, _ = prepare_cases(stopped, records, 0, 16, torch.device("cpu"), edit_rows=1)  # one edit row: carried
    two, _ = prepare_cases(Collator(tokenizer, 128, POOL, answer_stop="newline", edit_forms=("wrapped", "plain")), records, 0, 16,
                           torch.device("cpu"), edit_rows=1)  # two (an edit in two forms): left out
    assert all(c.n_edit_rows == 1 for c in one) and all(c.n_edit_rows == 0 and c.edit.input_ids.shape[0] == 2 for c in two)
    from instructedit.evaluation.report import markdown_report

    assert "in 2 rounds" in markdown_report([fast]) and "in 1 rounds" not in markdown_report([once])
    import instructedit.analysis.many_edits as many_edits

    calls: list[int] = []  # the rounds of every call batch_study makes
    real = many_edits.apply_in_rounds
    monkeypatch.setattr(many_edits, "apply_in_rounds", lambda e, m, b, r, *a, **k: calls.append(r) or real(e, m, b, r, *a, **k))
    study = batch_study(model, tokenizer, editor, collator, records, 0, [3], generation=False, progress=False, singles=True,
                        rounds="auto", single_rounds=2)
    assert calls == [1, 2, 2, 2, 2]  # the untimed warm-up, the 3-edit call ("auto": as a few edits, 2 rounds), 3 singles
    assert study["single"]["rounds"] == 2 and study["points"][0]["rounds"] == 2
    kept = evaluate(model, tokenizer, editor, records, POOL, 0, sequential=True, edit_rounds=2, **kwargs)  # each kept edit in 2
    assert kept.settings.edit_rounds == 2 and kept.settings.sequential
    with pytest.raises(ValueError, match="only a learned editor"):
        evaluate(model, tokenizer, object(), records, POOL, 0, edit_rounds=2, **kwargs)


def test_a_round_that_raises_the_edits_loss_is_undone_and_the_rounds_stop(tiny_model_dir: Path, caplog: pytest.LogCaptureFixture,
                                                                          tmp_path: Path) -> None:
    """Rounds that overshoot (step sizes far too large) raise the edits' own loss: the round that did is undone and the
    rounds stop, with a warning; the weights are those of the rounds kept, the handle says how many, rollback is bitwise."""
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    batch = collator.qa_batch([pair for r in many_records(3) for pair in collator.edit_pairs(r, 0)], "edit inputs", stop=True)
    before = _state(model)

    def loss() -> float:
        with torch.no_grad():
            return float(editor.edit(model, batch).pre_edit_loss)

    # an untrained network's update follows the gradient (MEND's sign; training learns it): a small negative step size
    # descends, so each round lowers the loss and all are kept, the last one checked too
    with torch.no_grad():
        editor.edit_lrs.mul_(-0.002)
    with editor.apply(model, batch, rounds=3) as handle:
        assert handle.rounds_made == 3 and "raised" not in caplog.text
    with torch.no_grad():
        editor.edit_lrs.mul_(-5e6)
    losses, states, handles = [loss()], [], []  # round by round, by hand: the loss after each, the weights it leaves
    for _ in range(4):
        handles.append(editor.apply(model, batch))
        losses.append(loss())
        states.append(_state(model))
    for handle in reversed(handles):
        handle.rollback()
    rose = next(k for k in range(2, 5) if not losses[k] <= losses[k - 1])  # the first round after the first that raised it
    caplog.clear()
    with editor.apply(model, batch, rounds=4) as handle:
        assert handle.rounds_made == rose - 1 and f"edit round {rose} raised the edits' loss" in caplog.text
        assert all(torch.equal(states[rose - 2][k], v) for k, v in model.state_dict().items())  # the rounds kept, bit for bit
    caplog.clear()
    from instructedit.editors.learned import undone_rounds_counted

    with undone_rounds_counted() as undone, editor.apply(model, batch, rounds=4) as handle:  # a run of many edits: counted, not warned
        assert handle.rounds_made == rose - 1 and undone.edits == 1 and "raised the edits' loss" not in caplog.text
    caplog.clear()
    import threading

    made: list[int] = []

    def apply_elsewhere() -> None:  # another thread's edit while this one counts: it warns, this count does not take it
        with editor.apply(model, batch, rounds=4) as handle:
            made.append(handle.rounds_made)

    with undone_rounds_counted() as undone:
        thread = threading.Thread(target=apply_elsewhere)
        thread.start()
        thread.join()
    assert made == [rose - 1] and undone.edits == 0 and f"edit round {rose} raised the edits' loss" in caplog.text
    caplog.clear()
    with editor.apply(model, batch, rounds=rose) as handle:  # the round that raised it is the last: checked all the same
        assert handle.rounds_made == rose - 1 and f"edit round {rose} raised the edits' loss" in caplog.text
        assert all(torch.equal(states[rose - 2][k], v) for k, v in model.state_dict().items())
    from instructedit.editors.rounds import rounds_result

    for rounds in (4, rose):  # read back as the evaluation scores it: the kept rounds' weights, and their factors only
        result = rounds_result(editor, model, batch, rounds)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
        for name, new in result.new_params.items():
            assert torch.equal(new, states[rose - 2][name])
            shift = new.float() - before[name].float()
            assert torch.allclose(result.updates[name], shift, atol=1e-5 * float(shift.abs().max()))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    from instructedit.evaluation.cache import evaluate_resuming
    from instructedit.evaluation.report import EvalSettings

    caplog.clear()  # an evaluation of such edits says how many had a round undone in one warning, not one per edit
    records = many_records(3)
    evaluate_resuming(tmp_path / "rounds.json", model, tokenizer, editor, records, POOL, 0, EvalSettings(task="zsre", method="mend"),
                      edit_rounds=4, progress=False, protocol="teacher_forced", answer_stop="newline")
    summary = [r.getMessage() for r in caplog.records if "had a round undone" in r.getMessage()]
    assert len(summary) == 1 and summary[0].startswith(f"{tmp_path / 'rounds.json'}: ") and "raised the edits' loss from" not in caplog.text
    assert 1 <= int(summary[0].split(": ", 1)[1].split()[0]) <= len(records) + 1  # the packing check may edit the first case twice
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    from instructedit.commands.analyze_edits import _line  # what analyze batch prints of such a call, with a sample weight too

    point = {"n_edits": 3, "seconds_per_edit": 1.0, "rounds": 4, "rounds_made": rose - 1, "sample_weight": 16000.0}
    assert f"N=3 ({rose - 1} of 4 rounds: a round that raised the edits' loss was undone, sample weight 16000)" in _line("x", point)
    assert "N=3 (4 rounds, sample weight 16000)" in _line("x", {**point, "rounds_made": 4})


@pytest.mark.parametrize("overrides", [[], ["editor.aggregation=least_squares", "editor.chunk_edits=2"]], ids=["sum", "least_squares"])
def test_edits_loss_is_the_loss_the_next_edit_reports(tiny_model_dir: Path, overrides: list[str]) -> None:
    """``edits_loss`` (how ``apply`` checks its last round) gives the loss an edit of the same inputs would report
    (``pre_edit_loss``) on the model as it stands, from the rounds' chunk states (3 inputs, 2 a chunk) or without."""
    model, tokenizer = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    editor = build_editor(model, load_config(CONFIG, [f"model.name={tiny_model_dir}", "editor.init_edit_lr=5.0", *overrides])).eval()
    collator = Collator(tokenizer, 256, POOL)
    batch = collator.qa_batch([pair for r in many_records(3) for pair in collator.edit_pairs(r, 0)], "edit inputs", stop=True)
    split = editor.split(model)
    state = editor.round_state(split, batch)
    with torch.no_grad(), editor.apply(model, batch):  # edited in place: the loss is the edited model's
        reported = float(editor.edit(model, batch, state).pre_edit_loss)
        assert float(editor.edits_loss(split, batch, state)) == pytest.approx(reported, rel=1e-6)
        assert float(editor.edits_loss(split, batch)) == pytest.approx(reported, rel=1e-6)
        assert reported != pytest.approx(float(editor.edit(load_model(str(tiny_model_dir))[0], batch).pre_edit_loss))  # the edit moved it


@pytest.mark.parametrize("batch", [1, 2])
def test_sequential_study_scores_at_powers_of_two_and_rolls_back_bitwise(tiny_model_dir: Path, batch: int) -> None:
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    records = many_records(12)
    before = _state(model)
    seen: list[int] = []
    result = sequential_study(model, tokenizer, editor, collator, records[:6], records[6:], 0, edits=6, batch=batch,
                              progress=False, on_point=lambda p: seen.append(p["n_edits"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and result["rolled_back_bitwise"]
    assert [p["n_edits"] for p in result["points"]] == seen == sequential_schedule(6) == [1, 2, 4, 6]
    assert result["points"][0]["reliability"]["n"] == 1 and result["points"][-1]["reliability"]["n"] == 6
    assert result["base_perplexity"] == pytest.approx(perplexity(model, collator, [(q.prompt, q.answer) for r in records[6:] for q in r.locality]))
    assert all(p["perplexity_ratio"] == pytest.approx(p["perplexity"] / result["base_perplexity"]) for p in result["points"])
    assert result["points"][-1]["perplexity"] != result["base_perplexity"]  # six strong edits move the held-out text


def test_sequential_study_refuses_an_edit_that_would_wreck_the_model(tiny_model_dir: Path,
                                                                      wreck_edit: Callable[[object, int], list]) -> None:
    """The tenth of eleven edits made 10⁴× too large is undone, the study goes on and says so (``OutlierEdits``), and it
    rolls back bit for bit."""
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    records = many_records(12)
    wreck_edit(editor, 10)
    before = _state(model)
    result = sequential_study(model, tokenizer, editor, collator, records[:11], records[11:], 0, edits=11, generation=False,
                              progress=False)
    assert result["refused"] == [9] and result["rolled_back_bitwise"]
    assert [p["refused"] for p in result["points"]] == [0, 0, 0, 0, 1]  # after 1, 2, 4, 8 and 11 edits
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(math.isfinite(p["perplexity"]) for p in result["points"])


def test_perplexity_is_exp_of_the_mean_answer_token_nll(tiny_gpt2_dir: Path) -> None:
    model, tokenizer, _, collator = _setup(tiny_gpt2_dir)
    prompt, answer = "The capital of France is", "Paris, a city"
    ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + answer)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    nll = -sum(float(logp[i - 1, full[i]]) for i in range(len(ids), len(full))) / (len(full) - len(ids))
    assert perplexity(model, collator, [(prompt, answer)]) == pytest.approx(math.exp(nll), rel=1e-4)


# --- the commands: analyze batch / analyze sequential / edit --file ----------------------------------------


def _zsre_file(path: Path, n: int) -> Path:
    """``n`` ZsRE-format records (the format ``--data`` detects), each with one locality question."""
    rows = [{"subject": f"{SUBJECTS[i % 12]} {i}", "src": f"What is the capital of {SUBJECTS[i % 12]} {i}?", "alt": TARGETS[i % 12],
             "answers": ["unknown"], "rephrase": f"Which city is the capital of {SUBJECTS[i % 12]} {i}?",
             "loc": f"nq question: who wrote the anthem of {SUBJECTS[i % 12]} {i}?", "loc_ans": "an unknown poet"} for i in range(n)]
    path.write_text(json.dumps(rows))
    return path


def _saved_editor(model_dir: Path, out: Path, aggregation: str, step: float = 5.0) -> Path:
    """A tiny untrained MEND editor (identity network, step size ``step``) with the given aggregation, saved as a folder.
    Its update follows the gradient (MEND's sign, which training learns): a negative ``step`` descends, so that each
    round of a call lowers the edits' loss and none is undone."""
    model, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    config = load_config(CONFIG, [f"model.name={model_dir}", f"editor.init_edit_lr={abs(step)}", f"editor.aggregation={aggregation}"])
    editor = build_editor(model, config)
    with torch.no_grad():
        editor.edit_lrs.copysign_(torch.tensor(step))
    return editor.save_pretrained(out)


METRIC_KEYS = ("reliability", "generalization", "locality", "gen_reliability", "gen_generalization", "gen_locality")


def test_analyze_batch_compares_editors_in_one_json_and_png(tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 8)
    editors = [_saved_editor(tiny_gpt2_dir, tmp_path / name, aggregation) for name, aggregation in (("sum", "sum"), ("ls", "least_squares"))]
    out = tmp_path / "results" / "batch.json"
    args = ["analyze", "batch", "--editor", str(editors[0]), "--editor", str(editors[1]), "--task", "zsre", "--data", str(data),
            "--sizes", "8,1,4", "--device", "cpu", "--no-progress", "--output", str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    assert result["study"] == "batch" and result["command"].startswith("instructedit analyze batch --editor") and result["date"]
    assert result["complete"] and result["sizes"] == [1, 4, 8] and result["data_file"] == str(data) and result["protocol"] == "both"
    assert [e["label"] for e in result["editors"]] == ["sum", "ls"]
    assert [e["aggregation"] for e in result["editors"]] == ["sum", "least_squares"]
    for entry in result["editors"]:
        assert entry["model"] == str(tiny_gpt2_dir) and entry["instruction"] == 0 and entry["rolled_back_bitwise"]
        assert [p["n_edits"] for p in entry["points"]] == [1, 4, 8]
        for point in entry["points"]:
            assert point["seconds_per_edit"] > 0 and point["reliability"]["n"] == point["n_edits"]
            for key in METRIC_KEYS:
                assert point[key]["ci_low"] <= point[key]["mean"] <= point[key]["ci_high"]
                assert point[key]["protocol"] == ("generation" if key.startswith("gen_") else "teacher_forced")
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the two aggregations are different updates
    assert [p["locality"] for p in result["editors"][0]["points"]] != [p["locality"] for p in result["editors"][1]["points"]]

    assert main([*args[:-1], str(tmp_path / "other.json"), "--sizes", "1,9"]) == 2
    assert f"--sizes 9 needs 9 records but {data} has 8" in caplog.text
    with pytest.raises(SystemExit):
        main([*args, "--sizes", "1,x"])


def test_analyze_batch_makes_its_calls_in_the_edit_forms_given_and_asks_the_forms_given(tiny_chat_llama_dir: Path, tiny_llama_dir: Path,
                                                                                      tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                                      capsys: pytest.CaptureFixture[str],
                                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """--edit-forms: each call holds every edit in those forms (rows = forms × N); --ask-forms: generation also asks the
    bare and the chat question (gen_reliability_plain / _chat, n = N each); the JSON says what was made and asked."""
    from instructedit.analysis import many_edits
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 4)
    editor = _saved_editor(tiny_chat_llama_dir, tmp_path / "ls", "least_squares")
    rows: list[int] = []
    real = many_edits.apply_in_rounds
    monkeypatch.setattr(many_edits, "apply_in_rounds", lambda editor, model, batch, *r, **k: rows.append(batch.input_ids.shape[0]) or
                        real(editor, model, batch, *r, **k))
    base = ["analyze", "batch", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--sizes", "1,4", "--device", "cpu",
            "--no-progress"]
    assert main([*base, "--output", str(tmp_path / "default.json")]) == 0
    assert rows == [1, 1, 4]  # the untimed warm-up edit, then N = 1 and 4, in the wrapped form the editor was made with
    default = json.loads((tmp_path / "default.json").read_text())["editors"][0]
    assert default["edit_forms"] == ["wrapped"] and default["asked_forms"] == ["wrapped"] and "calibrated_edit_forms" not in default
    assert all("gen_reliability_plain" not in p and "gen_reliability_chat" not in p for p in default["points"])
    rows.clear()
    capsys.readouterr()
    out = tmp_path / "forms.json"
    assert main([*base, "--edit-forms", "plain,wrapped", "--ask-forms", "chat,plain", "--output", str(out)]) == 0
    assert rows == [2, 2, 8]
    entry = json.loads(out.read_text())["editors"][0]
    assert entry["edit_forms"] == entry["many_edit_forms"] == ["wrapped", "plain"]
    assert entry["calibrated_edit_forms"] == {"edit_forms": ["wrapped"], "many_edit_forms": ["wrapped"]}
    assert entry["asked_forms"] == ["wrapped", "plain", "chat"]
    for point in entry["points"]:
        for key in ("gen_reliability", "gen_reliability_plain", "gen_reliability_chat"):
            assert point[key]["n"] == point["n_edits"] and point[key]["protocol"] == "generation"
            assert point[key]["ci_low"] <= point[key]["mean"] <= point[key]["ci_high"]
    # the wrapped answers and the teacher-forced probes are the same questions as before; the calls differ
    assert [p["gen_reliability"]["n"] for p in entry["points"]] == [p["gen_reliability"]["n"] for p in default["points"]]
    assert entry["points"][1]["locality"] != default["points"][1]["locality"]
    printed = capsys.readouterr().out
    assert "(said, generation: plain " in printed or all(p["gen_reliability_plain"]["mean"] == 0 for p in entry["points"])
    with pytest.raises(SystemExit):
        main([*base, "--edit-forms", "wrapped,shouted"])
    unchatty = _saved_editor(tiny_llama_dir, tmp_path / "plain-ls", "least_squares")
    assert main([*base[:3], str(unchatty), *base[4:], "--ask-forms", "chat", "--output", str(tmp_path / "x.json")]) == 2
    assert "--ask-forms chat: " in caplog.text and "has no chat template" in caplog.text


def test_an_interrupted_batch_study_resumes_with_the_calls_it_made(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.analysis import many_edits
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 8)
    editors = [_saved_editor(tiny_gpt2_dir, tmp_path / name, aggregation) for name, aggregation in (("sum", "sum"), ("ls", "least_squares"))]
    out = tmp_path / "batch.json"
    args = ["analyze", "batch", "--editor", str(editors[0]), "--editor", str(editors[1]), "--task", "zsre", "--data", str(data),
            "--sizes", "1,4,8", "--singles", "--device", "cpu", "--no-progress", "--protocol", "teacher_forced", "--output", str(out)]
    assert main([*args[:-1], str(tmp_path / "whole.json")]) == 0
    whole = json.loads((tmp_path / "whole.json").read_text())
    calls: list[int] = []
    real = many_edits.apply_in_rounds

    def counting(editor, model, batch, *rest, **kwargs):
        calls.append(batch.input_ids.shape[0])
        if len(calls) == 1 + 3 + 8 + 1 + 3:  # the first editor (warm-up, 3 calls, 8 singles), the second's warm-up, 2 calls and the 8-edit one
            raise KeyboardInterrupt
        return real(editor, model, batch, *rest, **kwargs)

    monkeypatch.setattr(many_edits, "apply_in_rounds", counting)
    assert main(args) == 130
    unfinished = json.loads(out.read_text())
    assert not unfinished["complete"] and [len(e["points"]) for e in unfinished["editors"]] == [3, 2]
    calls.clear()
    monkeypatch.setattr(many_edits, "apply_in_rounds", lambda editor, model, batch, *r, **k: calls.append(batch.input_ids.shape[0]) or
                        real(editor, model, batch, *r, **k))
    assert main(args) == 0
    assert calls == [1, 8, *[1] * 8]  # only what was left: the second editor's warm-up, its 8-edit call and its single edits
    result = json.loads(out.read_text())
    assert result["complete"] and result["resumed"]["date"] == unfinished["date"]
    drop = ("seconds", "seconds_per_edit")  # the rest of every point is the uninterrupted study's
    assert [[{k: v for k, v in p.items() if k not in drop} for p in e["points"]] for e in result["editors"]] == \
        [[{k: v for k, v in p.items() if k not in drop} for p in e["points"]] for e in whole["editors"]]
    assert [e["single"]["reliability"] for e in result["editors"]] == [e["single"]["reliability"] for e in whole["editors"]]
    # an unfinished study made otherwise is not taken over
    unfinished["rounds"] = 2
    out.write_text(json.dumps(unfinished))
    assert main(args) == 2 and "unfinished batch study with different rounds" in caplog.text
    assert main([*args, "--restart"]) == 0 and "resumed" not in json.loads(out.read_text())


def test_analyze_batch_scores_the_locality_of_unedited_records(tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 6)
    editor = _saved_editor(tiny_gpt2_dir, tmp_path / "ls", "least_squares")
    out = tmp_path / "batch.json"
    args = ["analyze", "batch", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--sizes", "1,4", "--device", "cpu",
            "--no-progress", "--protocol", "teacher_forced", "--output", str(out)]
    assert main([*args, "--unedited-locality", "2"]) == 0
    result = json.loads(out.read_text())
    assert result["unedited_locality"] == "the locality prompts of records 4..5, never edited"
    for point in result["editors"][0]["points"]:
        unedited = point["unedited"]
        assert unedited["n_cases"] == 2 and unedited["locality"]["protocol"] == "teacher_forced" and "gen_locality" not in unedited
        assert unedited["locality"]["ci_low"] <= unedited["locality"]["mean"] <= unedited["locality"]["ci_high"]
    assert "locality on 2 prompts of 2 unedited records" in capsys.readouterr().out
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"  # drawn with the unedited records' triangles
    assert main([*args, "--unedited-locality", "3"]) == 2
    assert f"--sizes 4 with --unedited-locality 3 needs 7 records but {data} has 6" in caplog.text


def test_analyze_batch_start_edits_a_later_block_of_records(tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """--start K edits records K..K+N-1 (the same records as a file that begins at K), scores the unedited locality of the
    records after them, records K in the JSON, and names the shortfall when the split is too short."""
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 7)
    later = tmp_path / "later.json"
    later.write_text(json.dumps(json.loads(data.read_text())[3:6]))
    editor = _saved_editor(tiny_gpt2_dir, tmp_path / "ls", "least_squares")
    base = ["analyze", "batch", "--editor", str(editor), "--task", "zsre", "--device", "cpu", "--no-progress", "--protocol",
            "teacher_forced", "--sizes", "2"]
    assert main([*base, "--data", str(data), "--start", "3", "--unedited-locality", "1", "--output", str(tmp_path / "block.json")]) == 0
    assert main([*base, "--data", str(later), "--unedited-locality", "1", "--output", str(tmp_path / "file.json")]) == 0
    block, file = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("block", "file"))
    assert block["start"] == 3 and "start" not in file
    assert block["unedited_locality"] == "the locality prompts of records 5..5, never edited"
    ours, theirs = block["editors"][0]["points"][0], file["editors"][0]["points"][0]
    for key in ("reliability", "generalization", "locality"):
        assert ours[key]["mean"] == theirs[key]["mean"]
    assert ours["unedited"]["locality"]["mean"] == theirs["unedited"]["locality"]["mean"]
    assert main([*base, "--data", str(data), "--start", "6", "--output", str(tmp_path / "short.json")]) == 2
    assert f"--start 6 --sizes 2 needs 8 records but {data} has 7" in caplog.text
    assert main([*base, "--data", str(data), "--start", "-1", "--output", str(tmp_path / "short.json")]) == 2
    assert "--start must be >= 0, got -1" in caplog.text


def test_analyze_batch_single_edit_reference_answer_keys_and_preservation(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    """--singles edits each record alone; --ls-keys answer and a preservation sample change the least-squares shift."""
    from instructedit.cli import main

    data, preserve = _zsre_file(tmp_path / "zsre.json", 6), _zsre_file(tmp_path / "other.json", 20)
    rows = json.loads(preserve.read_text())
    for row in rows:  # other locality texts than the edited records'
        row["loc"] = row["loc"].replace("anthem", "flag")
    preserve.write_text(json.dumps(rows))
    editor = _saved_editor(tiny_gpt2_dir, tmp_path / "ls", "least_squares")
    base = ["analyze", "batch", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--sizes", "1,6", "--device", "cpu", "--no-progress"]
    results = {}
    for name, extra in (("all", []), ("answer", ["--ls-keys", "answer"]),
                        ("kept", ["--ls-keys", "answer", "--key-memory", "--preserve-data", str(preserve), "--preserve", "20", "--preserve-weight", "1e6"])):
        out = tmp_path / f"{name}.json"
        assert main([*base, "--singles", "--output", str(out), *extra]) == 0
        results[name] = json.loads(out.read_text())
    entry = results["all"]["editors"][0]
    assert entry["ls_keys"] == "all" and results["answer"]["editors"][0]["ls_keys"] == "answer" and results["all"]["singles"]
    single = entry["single"]
    assert single["n_cases"] == 6 and single["reliability"]["n"] == 6 and single["gen_reliability"]["n"] == 6 and single["seconds_per_edit"] > 0
    # one record: its single edit is the N = 1 call, scored the same way
    assert main([*base[:-4], "1", "--device", "cpu", "--no-progress", "--singles", "--output", str(tmp_path / "one.json")]) == 0
    one = json.loads((tmp_path / "one.json").read_text())["editors"][0]
    assert {k: one["single"][k]["mean"] for k in METRIC_KEYS} == {k: one["points"][0][k]["mean"] for k in METRIC_KEYS}
    # every N is compared with the single edits of its own N cases
    assert [p["single_same_cases"]["reliability"]["n"] for p in entry["points"]] == [1, 6]
    assert entry["points"][1]["single_same_cases"]["reliability"]["mean"] == single["reliability"]["mean"]
    last = entry["points"][1]
    for key in ("reliability", "gen_reliability"):
        if last["single_same_cases"][key]["mean"] > 0:
            assert last["kept_of_single"][key] == pytest.approx(last[key]["mean"] / last["single_same_cases"][key]["mean"])
    assert one["points"][0]["kept_of_single"]["reliability"] == (1.0 if one["single"]["reliability"]["mean"] > 0 else None)
    assert [p["locality"]["mean"] for p in entry["points"]] != [p["locality"]["mean"] for p in results["answer"]["editors"][0]["points"]]
    kept = results["kept"]
    assert kept["memory"]["text_weight"] == 1e6 and "records 0..19" in kept["memory"]["text"]
    # a preservation sample counted as a million tokens holds the shift near zero: locality at least as high as without it
    assert kept["editors"][0]["points"][1]["locality"]["mean"] >= results["answer"]["editors"][0]["points"][1]["locality"]["mean"]
    assert kept["editors"][0]["points"][1]["locality"]["mean"] > 0.99
    # the same sample saved with the editor (instructedit calibrate --preserve): the same study without --key-memory
    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.editors.mend import MENDEditor
    from instructedit.tasks.loaders import load_records

    model, tok = load_model(str(tiny_gpt2_dir))
    carrier = MENDEditor.from_pretrained(editor).eval()
    carrier.config = dataclasses.replace(carrier.config, ls_keys="answer")
    texts = locality_texts(load_records(preserve, task="zsre").records[:20])
    carrier.set_preservation(key_memory(carrier, model, Collator(tok, 64), texts, past_weight=0.0, text_weight=1e6), "20 records")
    carrier.save_pretrained(tmp_path / "carrier")
    assert main([*base[:3], str(tmp_path / "carrier"), *base[4:], "--singles", "--output", str(tmp_path / "carried.json")]) == 0
    carried = json.loads((tmp_path / "carried.json").read_text())["editors"][0]
    assert carried["preservation"] == {"weight": 1e6, "source": "20 records"}
    for point, reference in zip(carried["points"], kept["editors"][0]["points"], strict=True):
        assert {k: point[k]["mean"] for k in METRIC_KEYS} == pytest.approx({k: reference[k]["mean"] for k in METRIC_KEYS})
    # the editor's own sample at another weight for the study, and the calls made in two rounds
    light = [*base[:3], str(tmp_path / "carrier"), *base[4:], "--sample-weight", "1e-3", "--rounds", "2", "--singles"]
    assert main([*light, "--output", str(tmp_path / "light.json")]) == 0
    result = json.loads((tmp_path / "light.json").read_text())
    assert result["rounds"] == 2
    assert result["editors"][0]["preservation"] == {"weight": 1e6, "weight_in_calls": 1e-3, "source": "20 records"}
    assert result["editors"][0]["points"][1]["locality"]["mean"] != carried["points"][1]["locality"]["mean"]
    assert {k: result["editors"][0]["single"][k]["mean"] for k in METRIC_KEYS} == {k: carried["single"][k]["mean"] for k in METRIC_KEYS}
    assert main([*base, "--output", str(tmp_path / "x.json"), "--sample-weight", "5"]) == 2
    assert "has no preservation sample of its own" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--rounds", "0"]) == 2
    assert "--rounds must be >= 1" in caplog.text

    with pytest.raises(SystemExit):  # rolled-back calls leave no earlier keys to weigh
        main([*base, "--output", str(tmp_path / "x.json"), "--key-memory", "--past-weight", "2", "--preserve-data", str(preserve)])
    assert main([*base, "--output", str(tmp_path / "x.json"), "--key-memory"]) == 2
    assert "holds a preservation sample still: add --preserve-data FILE" in caplog.text
    summing = _saved_editor(tiny_gpt2_dir, tmp_path / "sum", "sum")
    assert main([*base, "--output", str(tmp_path / "x.json"), "--ls-keys", "answer", "--editor", str(summing)]) == 2
    assert "shapes least-squares solves only" in caplog.text


def test_analyze_sequential_writes_after_every_point_and_rolls_back(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    from instructedit import io
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 104)
    editor = _saved_editor(tiny_llama_dir, tmp_path / "sum", "sum")
    out = tmp_path / "sequential.json"
    written: list[int] = []
    real = io.write_json
    monkeypatch.setattr(io, "write_json", lambda path, data: (written.append(len(data["editors"][0]["points"])), real(path, data))[1])
    args = ["analyze", "sequential", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--edits", "4", "--batch", "2",
            "--held-out", "100", "--device", "cpu", "--no-progress", "--output", str(out)]
    assert main(args) == 0
    assert written == [1, 2, 3, 3]  # after each scored point, then once complete
    result = json.loads(out.read_text())
    assert result["study"] == "sequential" and result["complete"] and result["edits"] == 4 and result["batch"] == 2
    entry = result["editors"][0]
    assert entry["rolled_back_bitwise"] is True and entry["perplexity_texts"] == 100 and entry["base_perplexity"] > 0
    assert [p["n_edits"] for p in entry["points"]] == [1, 2, 4]
    for point in entry["points"]:
        assert point["reliability"]["n"] == point["n_edits"] and all(key in point for key in METRIC_KEYS)
        assert point["perplexity_ratio"] == pytest.approx(point["perplexity"] / entry["base_perplexity"])
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    assert main([*args, "--held-out", "50"]) == 2
    assert "needs at least 100 held-out texts" in caplog.text and "give 50" in caplog.text

    # an interrupted run (its last point and the end missing) resumes: kept points are not scored again, the rest is equal
    partial = {**result, "complete": False, "editors": [{k: v for k, v in entry.items() if k in ("label", "editor", "aggregation", "model",
                                                                                                    "instruction", "answer_stop")}]}
    partial["editors"][0]["points"] = [{**p, "marker": True} for p in entry["points"][:2]]
    out.write_text(json.dumps(partial))
    written.clear()
    assert main(args) == 0
    assert written == [3, 3]  # only the missing point was scored
    resumed = json.loads(out.read_text())
    assert resumed["complete"] and resumed["resumed"]["date"] == result["date"]
    points = resumed["editors"][0]["points"]
    assert [p.get("marker") for p in points] == [True, True, None]
    assert points[2] == entry["points"][2] and resumed["editors"][0]["rolled_back_bitwise"] is True
    # an unfinished file of another study is not overwritten silently
    out.write_text(json.dumps({**partial, "edits": 3}))
    assert main(args) == 2
    assert "unfinished sequential study with different edits" in caplog.text and "--restart" in caplog.text
    assert main([*args, "--restart"]) == 0 and "resumed" not in json.loads(out.read_text())


def test_analyze_sequential_with_a_key_memory(tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 104)
    editor = _saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares")
    base = ["analyze", "sequential", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--edits", "4", "--held-out", "100",
            "--device", "cpu", "--no-progress", "--protocol", "teacher_forced"]
    plain, kept = tmp_path / "plain.json", tmp_path / "memory.json"
    assert main([*base, "--output", str(plain)]) == 0
    assert main([*base, "--output", str(kept), "--key-memory", "--past-weight", "1e6", "--preserve-weight", "1e3",
                 "--preserve-data", str(data), "--preserve", "4"]) == 0
    plain_points = json.loads(plain.read_text())["editors"][0]["points"]
    result = json.loads(kept.read_text())
    assert result["memory"]["past_weight"] == 1e6 and "records 0..3 of" in result["memory"]["text"]
    entry = result["editors"][0]
    assert entry["memory"]["calls_remembered"] == 4 and entry["memory"]["text_tokens"] > 0 and entry["rolled_back_bitwise"]
    # holding earlier keys (and the text's) still changes what the edits do
    assert [p["n_edits"] for p in entry["points"]] == [1, 2, 4]
    assert entry["points"][-1]["reliability"] != plain_points[-1]["reliability"] or entry["points"][-1]["locality"] != plain_points[-1]["locality"]

    assert main([*base, "--output", str(tmp_path / "x.json"), "--preserve-weight", "5"]) == 2
    assert "add --key-memory" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--key-memory", "--preserve-weight", "5"]) == 2
    assert "needs --preserve-data FILE" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--key-memory", "--preserve-data", "editor"]) == 2
    assert "--preserve-data editor: edit and evaluate take it; analyze's sample is a data FILE's locality prompts" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--key-memory", "--preserve-weight", "5", "--preserve-data", str(data),
                 "--preserve-start", "4", "--preserve", "6"]) == 2
    assert "all 6 of its texts are among those the study measures" in caplog.text
    assert main([*base, "--output", str(tmp_path / "y.json"), "--key-memory", "--preserve-weight", "5", "--preserve-data", str(data),
                 "--preserve", "10"]) == 0
    assert "left out 6 of its 10 texts that the study also measures" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--key-memory", "--preserve-weight", "5", "--preserve-data", str(data),
                 "--preserve-start", "100", "--preserve", "10"]) == 2
    assert "--preserve-start 100 --preserve 10 needs 110 records" in caplog.text
    summing = _saved_editor(tiny_llama_dir, tmp_path / "sum", "sum")
    assert main([*base[:3], str(summing), *base[4:], "--output", str(tmp_path / "x.json"), "--key-memory"]) == 2
    assert "needs an editor with editor.aggregation least_squares" in caplog.text


def test_evaluate_sequential_with_a_key_memory(tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """``evaluate --sequential --key-memory``: the runner's edits hold the earlier ones (and a preservation sample) still, as
    ``edit --sequential --key-memory`` and ``analyze sequential`` do; the report says so; misuse is refused clearly."""
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 12)
    editor = _saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares")
    base = ["evaluate", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--limit", "4", "--sequential",
            "--device", "cpu", "--no-progress", "--protocol", "teacher_forced"]
    plain, kept = tmp_path / "plain.json", tmp_path / "memory.json"
    assert main([*base, "--output", str(plain)]) == 0
    assert "after all 4 sequential edits: reliability of every edited case" in capsys.readouterr().out
    assert main([*base, "--output", str(kept), "--key-memory", "--past-weight", "1e6", "--preserve-data", str(data),
                 "--preserve", "6", "--preserve-weight", "1e3"]) == 0
    assert "left out 4 of its 6 texts that this run also measures" in caplog.text  # records 0..3 are the ones evaluated
    report, without = json.loads(kept.read_text()), json.loads(plain.read_text())
    memory = report["settings"]["key_memory"]
    refused = sum(c["refused"] for c in report["cases"])
    assert memory["past_weight"] == 1e6 and memory["text_weight"] == 1e3 and memory["text_tokens"] > 0
    assert memory["calls_remembered"] == 4 - refused and without["settings"]["key_memory"] is None
    assert "[sequential, key memory]" in (tmp_path / "memory.md").read_text()
    assert report["restoration"]["verified"]
    # holding the earlier edits' keys still changes what the later edits do to the earlier ones
    assert report["sequential"] != without["sequential"] or report["aggregates"] != without["aggregates"]

    assert without["sequential"][0]["gen_reliability"] is None  # teacher-forced only: no generation on the curve
    assert main([*base[:-3], "--output", str(tmp_path / "x.json"), "--key-memory"]) == 0  # no sample: earlier edits only; both protocols
    both = json.loads((tmp_path / "x.json").read_text())
    assert both["settings"]["key_memory"]["text_tokens"] == 0
    # the curve asks the edited model too; after the first edit the model is the one its case was answered on
    first, case = both["sequential"][0], both["cases"][0]
    assert first["edits"] == 1 and first["gen_reliability_n"] == 1 and first["gen_locality_n"] == 1
    assert (first["gen_reliability"], first["gen_locality"]) == (case["gen_post"]["gen_reliability"], case["gen_post"]["gen_locality"])
    assert all(p["gen_reliability_n"] == p["reliability_n"] for p in both["sequential"])
    for p in both["sequential"]:  # every curve value with its 95 % interval around it, and each case's value behind it
        for metric in ("reliability", "locality", "gen_reliability", "gen_locality"):
            low, high = p["intervals"][metric]
            assert low <= p[metric] <= high
            values = [v[metric] for v in p["cases"].values() if metric in v]
            assert len(values) == p[f"{metric}_n"] and sum(values) / len(values) == pytest.approx(p[metric])
        assert sorted(p["cases"], key=int) == [str(c["index"]) for c in both["cases"][: p["edits"]]]
    assert first["cases"]["0"]["gen_reliability"] == case["gen_post"]["gen_reliability"]
    assert all(c["weight_change"] > 0 for c in both["cases"]) and "Each edit's largest change of one weight" in (tmp_path / "x.md").read_text()
    assert "said (all edited)" in (tmp_path / "x.md").read_text()
    assert main([*base, "--output", str(tmp_path / "guard.json"), "--outlier-factor", "4"]) == 0
    assert json.loads((tmp_path / "guard.json").read_text())["settings"]["outlier_factor"] == 4.0
    single = [a for a in base if a != "--sequential"]
    assert main([*single, "--output", str(tmp_path / "x.json"), "--outlier-factor", "4"]) == 2 and "add --sequential" in caplog.text
    assert main([*single, "--output", str(tmp_path / "x.json"), "--key-memory"]) == 2
    assert "add --sequential" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--preserve-weight", "5"]) == 2
    assert "add --key-memory --sequential" in caplog.text
    assert main([*base, "--output", str(tmp_path / "x.json"), "--key-memory", "--preserve-data", str(data), "--preserve", "4"]) == 2
    assert "all 4 of its texts are among those this run measures" in caplog.text
    summing = _saved_editor(tiny_llama_dir, tmp_path / "sum", "sum")
    assert main([*base[:2], str(summing), *base[3:], "--output", str(tmp_path / "x.json"), "--key-memory"]) == 2
    assert "least_squares" in caplog.text
    from instructedit.editors.aggregation import KeyMemory
    from instructedit.editors.mend import MENDEditor

    model, tok = load_model(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="pass sequential=True"):
        evaluate(model, tok, MENDEditor.from_pretrained(editor), [], None, None, memory=KeyMemory())


def _edits_file(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


EDIT_LINES = [json.dumps({"prompt": "The capital of France is", "target": "Rome"}),
              json.dumps({"prompt": "BBC One, by", "target": "Sega", "subject": "BBC One", "source": "hand"}),
              "",
              json.dumps({"prompt": "Toko Yasuda, the", "target": "piano", "task": "zsre", "rephrase": "Toko Yasuda plays the"})]


def test_edit_file_applies_many_edits_in_one_call_or_in_sequence(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from instructedit.api import EDITS_FILE
    from instructedit.cli import main
    from instructedit.commands.edit import _cell
    from instructedit.evaluation.generation import exact_match

    editor = _saved_editor(tiny_llama_dir, tmp_path / "editor", "sum", step=-5.0)  # descending: no round is undone
    edits = _edits_file(tmp_path / "edits.jsonl", EDIT_LINES)
    base = ["edit", "--editor", str(editor), "--file", str(edits), "--device", "cpu", "--max-new-tokens", "4"]
    assert main([*base, "--save", str(tmp_path / "together"), "--output", str(tmp_path / "answers.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "3 edits from" in out and "in one call (aggregation sum)" in out and "totals: 3 edits" in out
    # --output: every edit's answers in full, one JSON line each, tagged with their protocols
    rows = [json.loads(line) for line in (tmp_path / "answers.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [1, 2, 4] and f"wrote every answer in full to {tmp_path / 'answers.jsonl'}" in out
    assert [r["target"] for r in rows] == [json.loads(line)["target"] for line in EDIT_LINES if line.strip()][:3]
    for r in rows:
        assert r["said_target_after"] == exact_match(r["said_after"], r["target"]) and 0 <= r["accuracy_after"] <= 1
        assert r["protocols"] == {"said_target": "generation", "accuracy": "teacher_forced"} and "\n" not in r["said_after"]
    assert any(_cell(r["said_before"], 22) in out for r in rows)  # the table shows the same answers, cut to its column
    assert main(["edit", "--editor", str(editor), "--prompt", "a", "--target", "b", "--output", str(tmp_path / "x.jsonl")]) == 2
    assert "a single --prompt edit prints all of its own" in caplog.text
    assert all(f"{n:>5}  " in out for n in (1, 2, 4))  # one row per edit, named by its line
    assert f"{edits}" in caplog.text and "'source' (line 2)" in caplog.text  # the unknown key is reported, not dropped silently
    assert main([*base, "--sequential", "--save", str(tmp_path / "sequential")]) == 0
    assert "one after another (--sequential)" in capsys.readouterr().out
    original, _ = load_model(str(tiny_llama_dir))
    together = AutoModelForCausalLM.from_pretrained(tmp_path / "together").state_dict()
    sequential = AutoModelForCausalLM.from_pretrained(tmp_path / "sequential").state_dict()
    changed = [k for k, v in original.state_dict().items() if not torch.equal(v, together[k])]
    assert changed and any(not torch.equal(together[k], sequential[k]) for k in changed)
    saved = json.loads((tmp_path / "together" / EDITS_FILE).read_text())
    assert len(saved["edits"]) == 3 and saved["applied"] == {"call": "apply", "rounds": 1, "rounds_made": 1, "sample_weight": None,
                                                      "step_scale": 1.0, "edit_forms": ["wrapped"]}
    assert json.loads((tmp_path / "sequential" / EDITS_FILE).read_text())["applied"] == {"call": "apply_sequential", "key_memory": False, "refused": [],
                                                                                         "step_scale": 1.0, "rounds": 1, "outlier_factor": 50.0,
                                                                                         "edit_forms": ["wrapped"]}
    # every edit kept whatever it moves (three edits: fewer than the eight the median needs, so the same weights)
    capsys.readouterr()
    assert main([*base, "--sequential", "--outlier-factor", "none", "--save", str(tmp_path / "unguarded")]) == 0
    assert "one after another (--sequential, every edit kept (--outlier-factor none))" in capsys.readouterr().out
    assert json.loads((tmp_path / "unguarded" / EDITS_FILE).read_text())["applied"]["outlier_factor"] is None
    # auto, given as the default is: 50 without neighbours
    assert main([*base, "--sequential", "--outlier-factor", "auto", "--save", str(tmp_path / "auto")]) == 0
    assert json.loads((tmp_path / "auto" / EDITS_FILE).read_text())["applied"]["outlier_factor"] == 50.0
    unguarded = AutoModelForCausalLM.from_pretrained(tmp_path / "unguarded").state_dict()
    assert all(torch.equal(sequential[k], unguarded[k]) for k in changed)
    for bad, why in ((["--outlier-factor", "5"], "--outlier-factor: refuses edits that would wreck a model edited one edit after "
                                                 "another; add --sequential"),
                     (["--sequential", "--outlier-factor", "1"], "--outlier-factor '1': a number > 1 (times the median change), auto or none"),
                     (["--sequential", "--outlier-factor", "many"], "--outlier-factor 'many': a number > 1")):
        assert main([*base, *bad]) == 2 and why in caplog.text
    # in two rounds: the API's apply(rounds=2), what the saved model holds
    assert main([*base, "--rounds", "2", "--save", str(tmp_path / "rounds")]) == 0
    assert "in one call (aggregation sum, 2 rounds)" in capsys.readouterr().out
    from instructedit.api import load_editor
    from instructedit.commands.edit import read_edits

    spelt = _edits_file(tmp_path / "paraphrase.jsonl", [json.dumps({"prompt": "a", "target": "b", "paraphrase": "c"})])
    assert read_edits(str(spelt), "zsre")[0][1].rephrase == ("c",)  # the demo server's spelling, read as rephrase

    loaded = load_editor(editor)
    model, tok = load_model(str(tiny_llama_dir))
    with loaded.apply(model, [e for _, e in read_edits(str(edits), "counterfact")], tok, rounds=2) as by_rounds:
        by_api, made = {k: v.clone() for k, v in model.state_dict().items()}, by_rounds.rounds_made
    rounds = AutoModelForCausalLM.from_pretrained(tmp_path / "rounds").state_dict()
    assert all(torch.equal(by_api[k], rounds[k]) for k in changed) and any(not torch.equal(together[k], rounds[k]) for k in changed)
    applied = json.loads((tmp_path / "rounds" / EDITS_FILE).read_text())["applied"]
    assert applied == {"call": "apply", "rounds": 2, "rounds_made": made, "sample_weight": None, "step_scale": 1.0, "edit_forms": ["wrapped"]}
    assert main([*base, "--sequential", "--rounds", "2"]) == 0  # each edit of the sequence in two rounds
    assert "one after another (--sequential, each edit in 2 rounds)" in capsys.readouterr().out


def test_edit_file_sequential_with_a_key_memory(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                caplog: pytest.LogCaptureFixture) -> None:
    from transformers import AutoModelForCausalLM

    from instructedit.cli import main

    editor = _saved_editor(tiny_llama_dir, tmp_path / "editor", "least_squares")
    edits = _edits_file(tmp_path / "edits.jsonl", EDIT_LINES)
    data = _zsre_file(tmp_path / "zsre.json", 10)
    base = ["edit", "--editor", str(editor), "--file", str(edits), "--device", "cpu", "--max-new-tokens", "4", "--sequential"]
    assert main([*base, "--save", str(tmp_path / "plain")]) == 0
    capsys.readouterr()
    assert main([*base, "--key-memory", "--preserve-data", str(data), "--preserve", "5", "--save", str(tmp_path / "kept")]) == 0
    assert (f"one after another (--sequential, with a key memory (5 preserved texts of {data} continued with the data's answers "
            "at 1000 tokens))") in capsys.readouterr().out
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").state_dict()
    kept = AutoModelForCausalLM.from_pretrained(tmp_path / "kept").state_dict()
    assert any(not torch.equal(plain[k], kept[k]) for k in plain)
    assert main([*base[:-1], "--key-memory"]) == 2
    assert "add --sequential" in caplog.text
    assert main([*base, "--preserve-data", str(data)]) == 2
    assert "add --key-memory --sequential" in caplog.text
    single = ["edit", "--editor", str(editor), "--prompt", "The capital of France is", "--target", "Rome", "--device", "cpu"]
    assert main([*single, "--key-memory"]) == 2 and "a single --prompt edit has none" in caplog.text
    assert main([*single, "--preserve", "5"]) == 2 and "--preserve: shapes the key memory; add --file EDITS.jsonl --sequential --key-memory" in caplog.text


@pytest.mark.parametrize("bad, message", [
    ("{not json", "line 2: not valid JSON"),
    (json.dumps({"prompt": "The capital of France is"}), "line 2: missing target"),
    (json.dumps(["The capital of France is", "Rome"]), "line 2: a JSON list"),
    (json.dumps({"prompt": "a", "target": "b", "task": "nope"}), "line 2: Edit: unknown task 'nope'"),
    (json.dumps({"prompt": "a", "target": "b", "rephrase": [1]}), "line 2: rephrase must be text"),
    (json.dumps({"prompt": "a", "target": "b", "rephrase": "c", "paraphrase": "d"}), "line 2: rephrase and paraphrase are the same field"),
])
def test_edit_file_names_the_bad_line(tmp_path: Path, caplog: pytest.LogCaptureFixture, bad: str, message: str) -> None:
    from instructedit.cli import main

    edits = _edits_file(tmp_path / "edits.jsonl", [EDIT_LINES[0], bad])
    assert main(["edit", "--editor", str(tmp_path / "no-editor"), "--file", str(edits)]) == 2  # fails before loading anything
    assert f"{edits} {message}" in caplog.text


def test_sample_weight_weighs_the_editors_own_sample_in_one_call_and_restores_it(tiny_llama_dir: Path, tmp_path: Path,
                                                                                capsys: pytest.CaptureFixture[str],
                                                                                caplog: pytest.LogCaptureFixture) -> None:
    """InstructEditor.apply(sample_weight=W) and edit --file --sample-weight W: the call's solves count the editor's own
    preservation sample as W tokens (what setting its weight by hand gives), the calibrated weight comes back, and an
    editor without a sample is refused before anything is edited."""
    from transformers import AutoModelForCausalLM

    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.api import EDITS_FILE, load_editor
    from instructedit.cli import main
    from instructedit.commands.edit import read_edits
    from instructedit.editors.mend import MENDEditor

    plain = _saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares", step=-5.0)  # descending: no round is undone
    model, tok = load_model(str(tiny_llama_dir))
    carrier = MENDEditor.from_pretrained(plain).eval()
    carrier.set_preservation(key_memory(carrier, model, Collator(tok, 64), locality_texts(many_records(6)), past_weight=0.0, text_weight=5.0),
                             "6 records")
    folder = carrier.save_pretrained(tmp_path / "carrier")
    edits_file = _edits_file(tmp_path / "edits.jsonl", EDIT_LINES)
    edits = [e for _, e in read_edits(str(edits_file), "counterfact")]
    before = _state(model)

    def edited_state(editor, **options) -> dict[str, torch.Tensor]:
        with editor.apply(model, edits, tok, **options):
            state = _state(model)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # rolled back bit for bit
        return state

    loaded = load_editor(folder)
    calibrated = edited_state(loaded, rounds=1)
    heavy = edited_state(loaded, sample_weight=5e4, rounds=2)
    assert loaded.editor.preservation.text_weight == 5.0  # the calibrated weight is back
    assert all(torch.equal(calibrated[k], v) for k, v in edited_state(loaded, rounds=1).items())  # and calls without it are as before
    # the default, rounds="auto": three edits are made as one is (one round, the calibrated weight)
    assert all(torch.equal(calibrated[k], v) for k, v in edited_state(loaded).items())
    by_hand = load_editor(folder)
    by_hand.editor.preservation.text_weight = 5e4
    assert all(torch.equal(heavy[k], v) for k, v in edited_state(by_hand, rounds=2).items())
    changed = [k for k, v in before.items() if not torch.equal(v, calibrated[k])]
    assert changed and any(not torch.equal(calibrated[k], heavy[k]) for k in changed)
    # a heavier sample holds the shift nearer zero
    assert sum(float((heavy[k] - before[k]).norm()) for k in changed) < sum(float((calibrated[k] - before[k]).norm()) for k in changed)
    for bad, message in ((0.0, "positive"), (float("nan"), "positive")):
        with pytest.raises(ValueError, match=message):
            loaded.apply(model, edits, tok, sample_weight=bad)
    with pytest.raises(ValueError, match="no preservation sample of its own"):
        load_editor(plain).apply(model, edits, tok, sample_weight=10.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # the CLI: what the saved model holds equals the API's call
    base = ["edit", "--editor", str(folder), "--file", str(edits_file), "--device", "cpu", "--max-new-tokens", "4"]
    assert main([*base, "--rounds", "2", "--sample-weight", "5e4", "--save", str(tmp_path / "saved")]) == 0
    shown = capsys.readouterr()
    assert "2 rounds, preservation sample weighted 50000 (calibrated 5)" in shown.out
    assert "edit rounds" in shown.err and "2/2" in shown.err  # a bar over the rounds
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.equal(heavy[k], saved[k]) for k in changed)
    applied = json.loads((tmp_path / "saved" / EDITS_FILE).read_text())["applied"]
    assert applied["sample_weight"] == 5e4 and applied["rounds"] == 2
    with loaded.apply(model, edits, tok, rounds=1) as as_calibrated:
        assert as_calibrated.how == {"call": "apply", "rounds": 1, "rounds_made": 1, "sample_weight": "as calibrated",
                                     "step_scale": 1.0, "edit_forms": ["wrapped"]}
    assert main([*base, "--rounds", "auto"]) == 0  # three edits: made as one edit is
    assert "in one call (aggregation least_squares)\n" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main([*base, "--rounds", "three"])
    assert main([*base[:2], str(plain), *base[3:], "--sample-weight", "10"]) == 2
    assert "has no preservation sample of its own" in caplog.text
    for extra in (["--sample-weight", "0"], ["--sample-weight", "10", "--sequential"]):
        assert main([*base, *extra]) == 2
    assert "not --sequential" in caplog.text
    assert main(["edit", "--editor", str(folder), "--prompt", "The capital of France is", "--target", "Rome", "--sample-weight", "10",
                 "--device", "cpu"]) == 2
    assert "for the many edits of a --file made in one call" in caplog.text


def test_a_key_memory_in_one_call_holds_its_sample_in_every_round(tiny_llama_dir: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str],
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    """InstructEditor.apply(memory=KeyMemory(past_weight=0, text_weight=W)) and edit --file --key-memory --preserve-data F
    --rounds K: the call's solves hold the memory's sample still (what ``analyze batch --key-memory`` measures), a heavier
    sample moves the weights less, the saved model is the API's call, the weights come back bit for bit, and what one
    call cannot use is refused before anything is edited."""
    from transformers import AutoModelForCausalLM

    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.api import EDITS_FILE, load_editor
    from instructedit.cli import main
    from instructedit.commands.common import load_eval_records
    from instructedit.commands.edit import read_edits
    from instructedit.editors.aggregation import KeyMemory

    folder = _saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares", step=-5.0)
    data = _zsre_file(tmp_path / "zsre.json", 6)
    edits_file = _edits_file(tmp_path / "edits.jsonl", EDIT_LINES)
    edits = [e for _, e in read_edits(str(edits_file), "counterfact")]
    model, tok = load_model(str(tiny_llama_dir))
    loaded = load_editor(folder)
    editor = loaded.editor_for(model, tok)
    before = _state(model)

    def memory(weight: float) -> KeyMemory:
        return key_memory(editor, model, Collator(tok, 64), locality_texts(load_eval_records("zsre", str(data), None, "test", 0)[0][:5]),
                          past_weight=0.0, text_weight=weight)

    def edited_state(**options) -> tuple[dict[str, torch.Tensor], dict]:
        with loaded.apply(model, edits, tok, **options) as edited:
            state, how = _state(model), edited.how
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # rolled back bit for bit
        return state, how

    plain, _ = edited_state(rounds=2)
    light, how = edited_state(rounds=2, memory=memory(1e-3))
    heavy, _ = edited_state(rounds=2, memory=memory(1e4))
    assert how["key_memory"]["text_weight"] == 1e-3 and how["key_memory"]["text_tokens"] > 0 and how["sample_weight"] == 1e-3
    changed = [k for k, v in before.items() if not torch.equal(v, plain[k])]
    moved = {name: sum(float((state[k] - before[k]).norm()) for k in changed) for name, state in (("light", light), ("heavy", heavy))}
    assert changed and moved["heavy"] < moved["light"]  # the sample holds the shift nearer zero
    assert editor.memory is None  # the memory is the call's only
    for options, message in (({"rounds": "auto"}, "give rounds=K"), ({"rounds": 2, "sample_weight": 5.0}, "memory's replaces"),
                             ({"rounds": 2, "memory": KeyMemory(past_weight=0.0, text_weight=5.0)}, "no preservation sample")):
        with pytest.raises(ValueError, match=message):
            loaded.apply(model, edits, tok, **({"memory": memory(5.0)} | options))
    with pytest.raises(ValueError, match="past_weight 1 would hold"):
        own = memory(5.0)
        own.past_weight = 1.0
        loaded.apply(model, edits, tok, rounds=2, memory=own)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # the CLI: the saved model is the API's call with the same sample
    base = ["edit", "--editor", str(folder), "--file", str(edits_file), "--device", "cpu", "--max-new-tokens", "4", "--key-memory",
            "--preserve-data", str(data), "--preserve", "5"]
    assert main([*base, "--preserve-weight", "1e4", "--rounds", "2", "--save", str(tmp_path / "saved")]) == 0
    assert f"2 rounds, holding 5 preserved texts of {data} still, weighted 10000 (--key-memory)" in capsys.readouterr().out
    saved = AutoModelForCausalLM.from_pretrained(tmp_path / "saved").state_dict()
    assert all(torch.allclose(heavy[k], saved[k], atol=1e-6) for k in changed)
    applied = json.loads((tmp_path / "saved" / EDITS_FILE).read_text())["applied"]
    assert applied["key_memory"]["text_weight"] == 1e4 and applied["rounds"] == 2
    for extra, message in ((["--rounds", "auto"], "give --rounds K"), (["--rounds", "2", "--past-weight", "1"], "one call holds only"),
                           (["--rounds", "2", "--sample-weight", "5"], "give --preserve-weight")):
        assert main([*base, *extra]) == 2
        assert message in caplog.text


def test_auto_rounds_schedule_many_edits_by_their_number(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """rounds="auto" (the API's and edit --file's default): a least-squares editor with a sample of its own makes more than 16
    edits in ceil(sqrt(N)/2) rounds with the sample weighted sqrt(N) times, fewer as one edit; any other editor one round.
    The API's default call equals the explicit one, and batch_study records each size's schedule."""
    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.api import Edit, load_editor
    from instructedit.editors.learned import schedule_for
    from instructedit.editors.mend import MENDEditor

    model, tok = load_model(str(tiny_llama_dir))
    carrier = MENDEditor.from_pretrained(_saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares")).eval()
    assert schedule_for(carrier, 256, "auto") == (1, None, 1.0)  # no sample of its own yet
    carrier.set_preservation(key_memory(carrier, model, Collator(tok, 64), locality_texts(many_records(6)), past_weight=0.0, text_weight=5.0),
                             "6 records")
    assert [schedule_for(carrier, n, "auto") for n in (1, 16)] == [(1, None, 1.0), (1, None, 1.0)]
    assert schedule_for(carrier, 17, "auto") == (3, pytest.approx(5.0 * math.sqrt(17)), 1.0)
    assert schedule_for(carrier, 256, "auto") == (8, pytest.approx(80.0), 1.0)
    assert schedule_for(carrier, 256, "auto", 7.0) == (8, 7.0, 1.0)  # a weight asked for is kept
    assert schedule_for(carrier, 256, 2) == (2, None, 1.0)  # a number of rounds is taken as it is
    # an editor calibrated for single edits in rounds: many edits in one call at its one-round step sizes, few at its own
    assert schedule_for(carrier, 256, "auto", many_edit_scale=1.5) == (8, pytest.approx(80.0), 1.5)
    assert schedule_for(carrier, 16, "auto", single_rounds=2, many_edit_scale=1.5) == (2, None, 1.0)
    assert schedule_for(carrier, 256, 32, 7.0, many_edit_scale=1.5) == (32, 7.0, 1.5)  # rounds and weight asked for: many edits still
    assert schedule_for(carrier, 16, 1, many_edit_scale=1.5) == (1, None, 1.0)
    summing = MENDEditor.from_pretrained(_saved_editor(tiny_llama_dir, tmp_path / "sum", "sum"))
    assert schedule_for(summing, 256, "auto", many_edit_scale=1.5) == (1, None, 1.5)
    assert schedule_for(object(), 256, "auto", many_edit_scale=1.5) == (1, None, 1.0)  # no learned step sizes to scale
    for bad in ("three", True, 1.5):
        with pytest.raises(ValueError, match="whole number"):
            schedule_for(carrier, 4, bad)
    with pytest.raises(ValueError, match="at least one edit"):
        schedule_for(carrier, 0, "auto")
    for bad in (0, -1.0, float("inf"), "1.5", True):
        with pytest.raises(ValueError, match="many_edit_scale: the step-size multiplier of many edits must be a finite number > 0"):
            schedule_for(carrier, 256, "auto", many_edit_scale=bad)

    folder = carrier.save_pretrained(tmp_path / "carrier")
    edits = [Edit(prompt=f"The code name of project {i} is", target=f"Falcon {i}") for i in range(20)]
    before = _state(model)
    editor = load_editor(folder)
    with editor.apply(model, edits, tok):  # the default: auto
        auto = _state(model)
    with editor.apply(model, edits, tok, rounds=3, sample_weight=5.0 * math.sqrt(20)):
        explicit = _state(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(torch.equal(auto[k], explicit[k]) for k in auto)
    assert any(not torch.equal(auto[k], before[k]) for k in auto)

    # saved with a many-edit multiplier (calibrate --rounds 1,2): "auto" makes many edits at the step sizes × it, the
    # same call as the explicit one with the step sizes scaled by hand; few edits, and the step sizes after, untouched
    scaled = carrier.save_pretrained(tmp_path / "scaled", extra={"queries": {"edit_rounds": 2, "many_edit_scale": 1.5}})
    editor = load_editor(scaled)
    assert editor.many_edit_scale == 1.5
    inner = editor.editor_for(model, tok)
    lrs = inner.edit_lrs.detach().clone()
    with editor.apply(model, edits, tok) as edited:
        by_scale = _state(model)
        assert edited.how["step_scale"] == 1.5 and edited.how["rounds"] == 3
    assert torch.equal(inner.edit_lrs, lrs)
    by_hand = load_editor(folder)  # the same editor without the multiplier, its step sizes × 1.5 by hand
    with torch.no_grad():
        by_hand.editor_for(model, tok).edit_lrs.mul_(1.5)
    with by_hand.apply(model, edits, tok, rounds=3, sample_weight=5.0 * math.sqrt(20)) as edited:
        assert edited.how["step_scale"] == 1.0
        assert all(torch.equal(by_scale[k], v) for k, v in _state(model).items())
    with editor.apply(model, edits, tok, rounds=3, sample_weight=5.0 * math.sqrt(20)) as edited:  # rounds asked for: still × 1.5
        assert edited.how["step_scale"] == 1.5
        assert all(torch.equal(by_scale[k], v) for k, v in _state(model).items())
    assert any(not torch.equal(by_scale[k], auto[k]) for k in auto)
    with editor.apply(model, edits[:3], tok) as edited:  # three edits: as one edit is made, at the editor's own step sizes
        assert edited.how["step_scale"] == 1.0 and edited.how["rounds"] == 2
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    broken = json.loads((scaled / "editor_config.json").read_text())
    broken["queries"]["many_edit_scale"] = -2
    (scaled / "editor_config.json").write_text(json.dumps(broken))
    with pytest.raises(ValueError, match=r"editor_config.json: queries.many_edit_scale: the step-size multiplier .* got -2"):
        load_editor(scaled)

    records = [EditRecord(task="zsre", prompt=f"What is the code name of project {i}?", target_new=f"Falcon {i}",
                          locality=(QAItem("nq question: who wrote the anthem?", "an unknown poet", "NQ"),), source=f"made#{i}")
               for i in range(17)]
    result = batch_study(model, tok, editor.editor_for(model, tok), Collator(tok, 256, POOL), records, 0, [2, 17], generation=False,
                         progress=False, rounds="auto")
    assert [(p["rounds"], p["sample_weight"]) for p in result["points"]] == [(1, None), (3, pytest.approx(5.0 * math.sqrt(17)))]
    result = batch_study(model, tok, inner, Collator(tok, 256, POOL), records, 0, [2, 17], generation=False, progress=False,
                         rounds="auto", many_edit_scale=1.5)
    assert [p["step_scale"] for p in result["points"]] == [1.0, 1.5] and torch.equal(inner.edit_lrs, lrs)


def test_preservation_sample_of_the_models_own_answers(tiny_llama_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """key_memory(answers="model"): each locality prompt continued with what the unedited model says to it, read as the
    model reads it while decoding (its own greedy tokens come back as the argmax at every labelled position); the
    sample's keys differ from those of the data's answers; analyze batch --preserve-answers model records it."""
    from instructedit.analysis.many_edits import continuation_batch, key_memory, locality_texts, own_answers
    from instructedit.cli import main
    from instructedit.editors.hooks import capture_factors
    from instructedit.editors.mend import MENDEditor
    from instructedit.evaluation.generation import answer_budget, greedy_generate

    model, tok = load_model(str(tiny_llama_dir))
    collator = Collator(tok, 256)
    texts = locality_texts(many_records(6))
    said = own_answers(model, tok, texts)
    assert [prompt for prompt, _ in said] == [tok(p)["input_ids"] for p, _ in texts]
    texts_said = greedy_generate(model, tok, [p for p, _ in texts], [answer_budget(tok, a) for _, a in texts])
    assert [tok.decode(ids, skip_special_tokens=True) for _, ids in said] == texts_said
    batch = continuation_batch(collator, said)
    with torch.no_grad():
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    assert any(ids for _, ids in said)
    for r, (prompt, ids) in enumerate(said):
        n = int(batch.attention_mask[r].sum())
        assert batch.input_ids[r, :n].tolist() == ((prompt + ids)[:-1] if ids else prompt)  # the last token said is never read
        labelled = batch.label_mask[r]
        assert batch.labels[r, labelled].tolist() == ids
        assert logits[r, labelled].argmax(-1).tolist() == ids  # teacher-forcing its own answer: the model says it again
    editor = MENDEditor.from_pretrained(_saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares")).eval()
    data = key_memory(editor, model, collator, texts, past_weight=0.0, text_weight=5.0)
    own = key_memory(editor, model, collator, texts, past_weight=0.0, text_weight=5.0, answers="model")
    assert data.text.keys() == own.text.keys() and own.text_tokens == int(batch.attention_mask.sum())
    several = key_memory(editor, model, collator, texts, past_weight=0.0, text_weight=5.0, answers="model", batch_size=2)
    assert several.text_tokens == own.text_tokens  # every batch's positions, not only the first one's
    assert all(torch.allclose(several.text[k], own.text[k], atol=1e-5) for k in own.text)
    assert any(not torch.allclose(data.text[k], own.text[k]) for k in data.text)
    with pytest.raises(ValueError, match="answers must be one of data, model, both"):
        key_memory(editor, model, collator, texts, answers="gold")
    # keys="answer": only the positions that predict the answer, where what the model says is decided
    decided = key_memory(editor, model, collator, texts, past_weight=0.0, text_weight=5.0, answers="model", keys="answer")
    assert decided.text_tokens == int(batch.label_mask.sum()) < own.text_tokens
    with capture_factors(model, editor.weights) as capture:
        model(input_ids=batch.input_ids, attention_mask=batch.attention_mask)
    name = editor.weights[0].name
    inputs = capture.inputs[name][batch.label_mask].float()
    assert torch.allclose(decided.text[name], inputs.T @ inputs / len(inputs), atol=1e-5)
    with pytest.raises(ValueError, match="keys must be 'all' or 'answer'"):
        key_memory(editor, model, collator, texts, keys="prompt")

    zsre, other = _zsre_file(tmp_path / "zsre.json", 4), _zsre_file(tmp_path / "other.json", 4)
    other.write_text(other.read_text().replace("anthem", "flag"))  # other locality texts than the edited records'
    base = ["analyze", "batch", "--editor", str(tmp_path / "ls"), "--task", "zsre", "--data", str(zsre), "--sizes", "4", "--device", "cpu",
            "--no-progress", "--output", str(tmp_path / "own.json")]
    assert main([*base, "--preserve-answers", "model"]) != 0
    assert "--preserve-answers: shapes the key memory; add --key-memory" in caplog.text
    assert main([*base, "--key-memory", "--preserve-data", str(other), "--preserve", "4", "--preserve-answers", "model"]) == 0
    memory = json.loads((tmp_path / "own.json").read_text())["memory"]
    assert memory["answers"] == "model" and memory["keys"] == "all" and "greedy answers" in memory["text"]


def test_distinct_subjects_keeps_the_first_record_of_each_subject(tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """analyze batch --distinct-subjects edits the first N records whose subjects differ (no call asks two answers to one
    question), says so in the JSON, and names the shortfall when there are not N of them."""
    from instructedit.analysis.many_edits import distinct_subjects
    from instructedit.cli import main

    records = many_records(4)
    twin = dataclasses.replace(records[1], target_new="Quito", source="hand#twin")  # France's capital again, another answer
    unnamed = [dataclasses.replace(r, subject="") for r in records[2:]]  # no subject: the prompt tells them apart
    assert distinct_subjects([records[0], records[1], twin, *unnamed, unnamed[0]]) == [records[0], records[1], *unnamed]
    data = _zsre_file(tmp_path / "zsre.json", 6)
    rows = json.loads(data.read_text())
    rows[1]["subject"] = rows[0]["subject"].upper()  # the same subject, written otherwise
    data.write_text(json.dumps(rows))
    editor = _saved_editor(tiny_gpt2_dir, tmp_path / "ls", "least_squares")
    base = ["analyze", "batch", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--device", "cpu", "--no-progress",
            "--protocol", "teacher_forced", "--distinct-subjects"]
    assert main([*base, "--sizes", "5", "--output", str(tmp_path / "five.json")]) == 0
    out = json.loads((tmp_path / "five.json").read_text())
    assert out["distinct_subjects"] == "the first record of each subject: 5 of the first 6 records"
    assert out["editors"][0]["points"][0]["n_edits"] == 5
    assert main([*base, "--sizes", "6", "--output", str(tmp_path / "six.json")]) != 0
    assert "--distinct-subjects --sizes 6: the 6 records have 5 distinct subjects" in caplog.text


@pytest.mark.parametrize(("ratios", "scale"), [([1.0, 1.02, 1.2], "linear"), ([1.0, 3.0, 4e9], "log")])
def test_perplexity_panel_is_linear_within_a_decade_and_log_beyond(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                     ratios: list[float], scale: str) -> None:
    """A log axis over less than a decade labels its ticks 1.2×10⁰, ...: the panel stays linear unless the model collapses."""
    from instructedit.analysis import plots

    figures = []
    usual = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or usual(fig, path))
    points = [{"n_edits": n, "perplexity_ratio": r} for n, r in zip([1, 2, 4], ratios)]
    out = plots.edits_curves(tmp_path / "curve.png", [{"label": "x", "points": points}], [("perplexity_ratio", "ratio")], "t")
    assert out.exists() and figures[0].axes[0].get_yscale() == scale


def test_a_study_of_one_size_draws_error_bars_and_its_legend_under_the_panel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """One N: a band of no width would hide the interval, and "best" put the legend over the points mid-axis."""
    from matplotlib.container import ErrorbarContainer

    from instructedit.analysis import plots

    figures = []
    usual = plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig) or usual(fig, path))
    summary = {"mean": 0.8, "ci_low": 0.7, "ci_high": 0.9}
    one = [{"label": "x", "points": [{"n_edits": 1000, "locality": summary, "gen_locality": summary}]}]
    plots.edits_curves(tmp_path / "one.png", one, [("locality", "% locality")], "t")
    ax = figures[0].axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert len(bars) == 2  # teacher-forced and generation
    low, high = bars[0].lines[2][0].get_segments()[0][:, 1]
    assert (low, high) == pytest.approx((70.0, 90.0))
    anchor = ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted())
    assert anchor.y0 < 0  # under the panel
    many = [{"label": "x", "points": [{"n_edits": n, "locality": summary} for n in (1, 8)]}]
    plots.edits_curves(tmp_path / "many.png", many, [("locality", "% locality")], "t")
    ax = figures[1].axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)] and ax.collections  # the band
    assert ax.get_legend().get_bbox_to_anchor().transformed(ax.transAxes.inverted()).y0 == pytest.approx(0)


def test_sequential_edits_at_the_many_edit_step_sizes(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """An editor saved with queries.many_edit_scale (calibrate --rounds chose two rounds at smaller step sizes) keeps edits
    one after another at its one-round step sizes: apply_sequential (and its rollback_to, which re-applies them),
    evaluate(sequential=True, step_scale=...) and sequential_study each equal the same editor with its step sizes scaled
    by hand; the step sizes are restored afterwards and every run ends with the weights bit for bit."""
    from instructedit.api import Edit, load_editor

    model, tok = load_model(str(tiny_llama_dir))
    folder = _saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares", step=-0.002)
    scaled = load_editor(folder).editor_for(model, tok).save_pretrained(tmp_path / "scaled", extra={"queries": {"edit_rounds": 2,
                                                                                                              "many_edit_scale": 1.5}})
    editor, by_hand = load_editor(scaled), load_editor(folder)
    inner, hand = editor.editor_for(model, tok), by_hand.editor_for(model, tok)
    lrs = inner.edit_lrs.detach().clone()
    with torch.no_grad():
        hand.edit_lrs.mul_(1.5)
    edits = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in many_records(3)]
    before = _state(model)
    with by_hand.apply_sequential(model, edits, tok) as expected:
        want = _state(model)
        expected.rollback_to(1)
        want_one = _state(model)
    with editor.apply_sequential(model, edits, tok) as edited:
        assert edited.how["step_scale"] == 1.5 and torch.equal(inner.edit_lrs, lrs)
        assert all(torch.equal(want[k], v) for k, v in _state(model).items())
        assert any(not torch.equal(want[k], before[k]) for k in want)
        edited.rollback_to(1)  # re-applies the first edit at the step sizes it was made at (else its CRC check fails)
        assert all(torch.equal(want_one[k], v) for k, v in _state(model).items())
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())
    with by_hand.apply_sequential(model, edits, tok) as plain:
        assert plain.how["step_scale"] == 1.0

    records = many_records(8)
    kwargs = dict(progress=False, protocol="teacher_forced", answer_stop="none", sequential=True)
    report = evaluate(model, tok, inner, records[:3], POOL, 0, step_scale=1.5, **kwargs)
    reference = evaluate(model, tok, hand, records[:3], POOL, 0, **kwargs)
    assert [c.post for c in report.cases] == [c.post for c in reference.cases]
    assert report.settings.step_scale == 1.5 and reference.settings.step_scale == 1.0 and torch.equal(inner.edit_lrs, lrs)
    from instructedit.evaluation.report import markdown_report

    assert "at step sizes x 1.5" in markdown_report([report]) and "at step sizes x" not in markdown_report([reference])
    collator = Collator(tok, 256, POOL)
    study = sequential_study(model, tok, inner, collator, records[:4], records[4:], 0, edits=4, generation=False, progress=False,
                             step_scale=1.5)
    twin = sequential_study(model, tok, hand, collator, records[:4], records[4:], 0, edits=4, generation=False, progress=False)
    assert [p["reliability"] for p in study["points"]] == [p["reliability"] for p in twin["points"]]
    assert study["step_scale"] == 1.5 and torch.equal(inner.edit_lrs, lrs)
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_batch_study_makes_its_single_edits_without_the_calls_key_memory(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """analyze batch --key-memory: the N-edit calls solve with the memory's sample held still; the single edits they are
    compared with are made as the editor makes them: with its own sample (calibrate --preserve), the same with or without
    the memory; an editor without one makes them with the memory, the sample the study gives it."""
    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.editors.mend import MENDEditor

    model, tok = load_model(str(tiny_llama_dir))
    editor = MENDEditor.from_pretrained(_saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares", step=-50.0)).eval()
    collator = Collator(tok, 256, POOL)
    records = many_records(4)
    memory = key_memory(editor, model, collator, locality_texts(many_records(12)[4:]), past_weight=0.0, text_weight=1e6)
    kwargs = dict(generation=False, progress=False, singles=True)
    bare = batch_study(model, tok, editor, collator, records, 0, [4], memory=memory, **kwargs)  # no sample of its own
    editor.set_preservation(key_memory(editor, model, collator, locality_texts(many_records(6)), past_weight=0.0, text_weight=5.0),
                            "6 records")
    held = batch_study(model, tok, editor, collator, records, 0, [4], memory=memory, **kwargs)
    plain = batch_study(model, tok, editor, collator, records, 0, [4], **kwargs)
    keys = ("reliability", "generalization", "locality")
    assert all(held["single"][k] == plain["single"][k] for k in keys)  # the reference: single edits as the editor makes them
    assert any(held["points"][0][k] != plain["points"][0][k] for k in keys)  # the call holds the study's sample still
    assert any(bare["single"][k] != plain["single"][k] for k in keys)  # no sample of its own: made with the study's
    assert all(bare["points"][0][k] == held["points"][0][k] for k in keys)  # the memory replaces an own sample in the calls


def test_rollback_to_re_applies_edits_made_with_a_key_memory(tiny_llama_dir: Path, tmp_path: Path) -> None:
    """apply_sequential(memory=...) then rollback_to(k): the first k edits are made again holding the keys they were made
    holding (the memory as it was when the sequence began, plus the kept edits before each), so they come back bit for bit,
    equal to a sequence of those k edits alone; the caller's memory is left as the sequence left it."""
    from instructedit.analysis.many_edits import key_memory, locality_texts
    from instructedit.api import Edit, load_editor

    model, tok = load_model(str(tiny_llama_dir))
    loaded = load_editor(_saved_editor(tiny_llama_dir, tmp_path / "ls", "least_squares", step=-0.002))
    editor = loaded.editor_for(model, tok)
    edits = [Edit(prompt=r.prompt, target=r.target_new, task="zsre") for r in many_records(3)]

    def memory():
        return key_memory(editor, model, Collator(tok, 64), locality_texts(many_records(6)[3:]), past_weight=1.0, text_weight=10.0)

    before = _state(model)
    with loaded.apply_sequential(model, edits[:2], tok, memory=memory()):
        want_two = _state(model)
    held = memory()
    with loaded.apply_sequential(model, edits, tok, memory=held) as edited:
        remembered = (dict(held.past), held.calls)
        assert any(not torch.equal(want_two[k], v) for k, v in _state(model).items())
        edited.rollback_to(2)
        assert all(torch.equal(want_two[k], v) for k, v in _state(model).items())
        assert held.calls == remembered[1] == 3 and all(held.past[k] is v for k, v in remembered[0].items())
    assert all(torch.equal(before[k], v) for k, v in _state(model).items())


def test_evaluate_sequential_makes_its_edits_in_the_many_edit_forms(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    """An editor that makes a single edit in the three forms is evaluated on single edits in them, and kept one after another
    (``--sequential``) without the bare question (``queries.many_edit_forms``), as ``apply_sequential`` makes them."""
    from instructedit.cli import main

    data = _zsre_file(tmp_path / "zsre.json", 3)
    editor = _saved_editor(tiny_chat_llama_dir, tmp_path / "ls", "least_squares")
    config = json.loads((editor / "editor_config.json").read_text())
    config["queries"] = {"instructions": True, "template": None, "answer_stop": "none", "edit_forms": ["wrapped", "plain", "chat"]}
    (editor / "editor_config.json").write_text(json.dumps(config))
    base = ["evaluate", "--editor", str(editor), "--task", "zsre", "--data", str(data), "--device", "cpu", "--no-progress",
            "--protocol", "teacher_forced"]
    assert main([*base, "--output", str(tmp_path / "single.json")]) == 0
    assert main([*base, "--sequential", "--output", str(tmp_path / "sequential.json")]) == 0
    single, sequential = (json.loads((tmp_path / f"{name}.json").read_text())["settings"] for name in ("single", "sequential"))
    assert single["edit_forms"] == ["wrapped", "plain", "chat"] and sequential["edit_forms"] == ["wrapped", "chat"]
