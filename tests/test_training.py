"""Meta-training loop: exact resume, early stopping, NaN skipping, the three modes, checkpoints."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from instructedit import train_state, training
from instructedit.cli import main
from instructedit.config import load_config
from instructedit.editors.mend import MENDEditor
from instructedit.training import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _config(model_dir: Path, *overrides: str):
    return load_config(TINY, [f"model.name={model_dir}", *overrides])


def _train_losses(run: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return {e["step"]: e["loss"] for e in lines if e["split"] == "train"}


def test_resume_gives_identical_subsequent_losses(tiny_model_dir: Path, tmp_path: Path) -> None:
    straight = Trainer(_config(tiny_model_dir, "training.max_steps=6"), tmp_path / "a", show_progress=False)
    straight.run()
    Trainer(_config(tiny_model_dir, "training.max_steps=3"), tmp_path / "b", show_progress=False).run()
    resumed = Trainer(_config(tiny_model_dir, "training.max_steps=6"), tmp_path / "b", show_progress=False)
    resumed.run()
    a, b = _train_losses(tmp_path / "a"), _train_losses(tmp_path / "b")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]  # no duplicated or lost log lines
    for step in (4, 5, 6):
        assert math.isclose(a[step], b[step], rel_tol=1e-6, abs_tol=1e-9), (step, a[step], b[step])
    ea, eb = MENDEditor.from_pretrained(tmp_path / "a" / "last"), MENDEditor.from_pretrained(tmp_path / "b" / "last")
    for key, value in ea.state_dict().items():
        assert torch.allclose(value, eb.state_dict()[key], atol=1e-6), key


def test_checkpoints_are_complete_and_atomic(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    summary = Trainer(_config(tiny_gpt2_dir), tmp_path, show_progress=False).run()
    for name in ("best", "last"):
        assert (tmp_path / name / "editor.safetensors").is_file()
        assert (tmp_path / name / "editor_config.json").is_file()
    assert (tmp_path / "last" / "optimizer.safetensors").is_file()
    assert not list(tmp_path.glob(".*tmp")) and not list(tmp_path.glob(".*old"))
    assert summary["steps"] == 6 and Path(summary["best_checkpoint"]).is_dir()
    assert (tmp_path / "config.yaml").is_file() and (tmp_path / "summary.json").is_file()
    data = json.loads((tmp_path / "data.json").read_text())
    assert data["train"]["seed"] == 0 and set(data["train"]["counts"]) == {"counterfact", "wikirecent", "convsent"}
    MENDEditor.from_pretrained(tmp_path / "best")  # loadable
    card = (tmp_path / "best" / "README.md").read_text()  # shareable as it is: a model card beside the weights
    assert str(tiny_gpt2_dir) in card and "counterfact" in card


def test_resume_refuses_a_run_trained_with_another_recipe(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    Trainer(_config(tiny_gpt2_dir, "training.max_steps=2"), tmp_path, show_progress=False).run()
    with pytest.raises(ValueError, match=r"different configuration \(training.lr: 0.001 there, 0.5 now"):
        Trainer(_config(tiny_gpt2_dir, "training.max_steps=4", "training.lr=0.5"), tmp_path, show_progress=False).run()
    # a longer budget and another patience are what resuming is for
    summary = Trainer(_config(tiny_gpt2_dir, "training.max_steps=4", "training.early_stop_patience=9"), tmp_path, show_progress=False).run()
    assert summary["steps"] == 4


def test_early_stopping_really_stops_and_keeps_the_best(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    losses = iter([1.0, 0.9, 0.95, 0.97, 0.5, 0.4])

    def fake_eval(self: Trainer, records: list) -> dict[str, float]:
        return {"loss": next(losses), "edit_acc": 0.0, "edit_acc_pre": 0.0, "locality": 1.0, "n": len(records)}

    monkeypatch.setattr(Trainer, "evaluate_records", fake_eval)
    config = _config(tiny_gpt2_dir, "training.max_steps=20", "training.val_every=1", "training.early_stop_patience=2")
    summary = Trainer(config, tmp_path, show_progress=False).run()
    # validations at steps 0 (1.0), 1 (0.9), 2 (0.95), 3 (0.97): two without improvement -> stop at 3
    assert summary["stopped_early"] and summary["steps"] == 3
    assert summary["best_step"] == 1 and summary["best_val_loss"] == pytest.approx(0.9)
    best = json.loads((tmp_path / "best" / "editor_config.json").read_text())
    assert best["training"]["step"] == 1


def test_nonfinite_losses_are_skipped_and_counted(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = training.meta_loss
    calls = {"n": 0}

    def sometimes_nan(*args, **kwargs):
        loss, metrics = real(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] % 3 == 0:
            return loss * float("nan"), metrics
        return loss, metrics

    monkeypatch.setattr(training, "meta_loss", sometimes_nan)
    trainer = Trainer(_config(tiny_gpt2_dir), tmp_path, show_progress=False)
    summary = trainer.run()
    assert summary["skipped_nonfinite"] >= 2
    assert all(torch.isfinite(p).all() for p in trainer.editor.parameters())


def test_too_many_nonfinite_losses_stop_with_a_clear_error(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real = training.meta_loss
    monkeypatch.setattr(training, "meta_loss", lambda *a, **k: (lambda lm: (lm[0] * float("inf"), lm[1]))(real(*a, **k)))
    config = _config(tiny_gpt2_dir, "training.max_bad_steps=3")
    with pytest.raises(FloatingPointError, match="non-finite losses"):
        Trainer(config, tmp_path, show_progress=False).run()


@pytest.mark.parametrize(
    ("overrides", "tasks", "wrapped"),
    [
        (["data.tasks=[counterfact]", "data.instructions=false"], {"counterfact"}, False),  # single-task MEND
        (["data.instructions=false"], {"counterfact", "wikirecent", "convsent"}, False),  # multi-task MEND
        ([], {"counterfact", "wikirecent", "convsent"}, True),  # InstructEdit
    ],
)
def test_three_modes_share_one_code_path(tiny_llama_dir: Path, tmp_path: Path, overrides: list[str], tasks: set[str], wrapped: bool) -> None:
    trainer = Trainer(_config(tiny_llama_dir, "training.max_steps=2", *overrides), tmp_path, show_progress=False)
    assert {r.task for r in trainer.data.train} == tasks
    batch = trainer._batch([trainer.data.train[0]])
    text = trainer.tokenizer.decode(batch.edit_inner.input_ids[0])
    assert ("Task: " in text) == wrapped
    assert "Task: " not in trainer.tokenizer.decode(batch.loc.input_ids[0])
    summary = trainer.run()
    assert summary["steps"] == 2


def test_cli_train_runs_and_reports(tiny_gpt2_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code = main(["train", "--config", str(TINY), "--set", f"model.name={tiny_gpt2_dir}", "--set", "training.max_steps=3", "--output", str(tmp_path), "--no-progress"])
    assert code == 0
    out = capsys.readouterr().out
    assert "best checkpoint" in out and "locality" in out


def test_margin_term_is_optional_and_trains_the_editor(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from instructedit.objective import meta_loss

    trainer = Trainer(_config(tiny_gpt2_dir), tmp_path, show_progress=False)
    batch = trainer._batch([trainer.data.train[0]])
    _, metrics = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0)
    assert "l_margin" not in metrics  # c_margin = 0: DESIGN.md §4's objective exactly
    with torch.no_grad():  # a larger step size makes the edit move the locality answers
        trainer.editor.edit_lrs.fill_(10.0)
    with_margin, metrics = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, c_margin=2.0)
    without, _ = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0)
    assert metrics["l_margin"] > 0
    assert with_margin.item() == pytest.approx(without.item() + 2.0 * metrics["l_margin"], rel=1e-5)
    with_margin.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.editor.network_parameters)
    assert load_config(TINY, ["training.c_margin=0.5"]).training.c_margin == 0.5
    with pytest.raises(ValueError, match="c_margin"):
        load_config(TINY, ["training.c_margin=-1"])


@pytest.mark.parametrize("task", ["counterfact", "convsent"])
def test_packed_step_inputs_give_the_padded_loss_and_gradients(tiny_model_dir: Path, tmp_path: Path, task: str) -> None:
    """One packed row (the shared instruction once, one prefix pass, one post-edit suffix) = the padded inputs' step."""
    import copy

    from instructedit.objective import meta_loss

    trainer = Trainer(_config(tiny_model_dir, "training.edit_loss_on=rephrase"), tmp_path, show_progress=False)
    batch = trainer._batch([next(r for r in trainer.data.train if r.task == task)])
    # CounterFact (no rephrases in its training data): edit input + locality input; ConvSent: 2 edit rows, 2 response
    # rows, 2 opposite-sentiment rows and the locality input
    assert torch.equal(batch.edit_outer.input_ids, batch.edit_inner.input_ids) == (task == "counterfact")
    assert (batch.unlikely is not None) == (task == "convsent") and (batch.edit_inner.n_rows > 1) == (task == "convsent")
    with torch.no_grad():
        trainer.editor.edit_lrs.fill_(10.0)  # an edit that moves every term
    state = copy.deepcopy(trainer.editor.state_dict())
    results = []
    for packed in (False, True):
        trainer.editor.load_state_dict(state)  # the same running statistics for both
        trainer.editor.zero_grad(set_to_none=True)
        loss, metrics = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, c_margin=1.0, c_answer=0.1, c_context=1.0, packed=packed)
        loss.backward()
        results.append((loss.item(), metrics, [p.grad.clone() for p in trainer.editor.network_parameters + [trainer.editor.edit_lrs]]))
    (padded, m_padded, g_padded), (packed, m_packed, g_packed) = results
    assert packed == pytest.approx(padded, rel=1e-4) and m_padded["l_loc"] > 0 and m_padded["l_loc_context"] > 0
    for key in m_padded:
        assert m_packed[key] == pytest.approx(m_padded[key], rel=1e-3, abs=1e-6), key
    for a, b in zip(g_padded, g_packed, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * max(1.0, float(a.abs().max())))  # float32 rounding
    # the packed step of a summing editor keeps its update as factors (the post-edit suffix adds x · ũᵀ · α·δ̃): no dense
    # ΔW or W + ΔW is formed; the padded step (and checkpointed edited blocks) write W + ΔW
    from instructedit.editors.base import ThinUpdates
    from instructedit.objective import _packed_inputs, _padded_inputs

    edit, _ = _packed_inputs(trainer.editor, trainer.split, batch, False)
    assert isinstance(edit.updates, ThinUpdates) and not edit.updates._formed and edit.new_params == {}
    assert all(left.requires_grad and right.requires_grad for left, right in edit.low_rank.values())
    edit, _ = _padded_inputs(trainer.editor, trainer.split, batch, False)
    assert set(edit.new_params) == {w.name for w in trainer.editor.weights}
    trainer.run()  # and training uses it: the check on the first batch passed
    assert trainer.packing == {False: True}  # one-edit steps; no many-edit check was made
    # bfloat16 weights: the edit is trained as it is used, W + ΔW rounded to the weights' dtype
    half = Trainer(_config(tiny_model_dir, "training.edit_loss_on=rephrase", "model.dtype=bfloat16"), tmp_path / "bf16", show_progress=False)
    edit, _ = _packed_inputs(half.editor, half.split, half._batch([next(r for r in half.data.train if r.task == task)]), False)
    assert set(edit.new_params) == {w.name for w in half.editor.weights}
    assert all(p.dtype == torch.bfloat16 for p in edit.new_params.values())


def test_context_locality_term_scores_the_locality_prompt_positions(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from instructedit.losses import locality_kl
    from instructedit.objective import meta_loss

    trainer = Trainer(_config(tiny_gpt2_dir), tmp_path, show_progress=False)
    batch = trainer._batch([trainer.data.train[0]])
    _, metrics = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0)
    assert "l_loc_context" not in metrics  # c_context = 0: DESIGN.md §4's objective exactly
    with torch.no_grad():  # a larger step size makes the edit move the locality prompt's predictions
        trainer.editor.edit_lrs.fill_(10.0)
    with_context, metrics = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, c_context=3.0)
    without, plain = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0)
    assert with_context.item() == pytest.approx(without.item() + 3.0 * metrics["l_loc_context"], rel=1e-5)
    # answer terms unchanged (up to float rounding: the projection runs over more positions with the prompt term)
    assert metrics["locality"] == plain["locality"] and metrics["l_loc"] == pytest.approx(plain["l_loc"], rel=1e-4)

    # the term is the KL at exactly the prompt positions of the locality input (answer and padding left out)
    loc = batch.loc
    context = loc.attention_mask.bool() & ~loc.label_mask
    assert 0 < int(context.sum()) < int(loc.attention_mask.sum())
    state = trainer.split.prefix(loc)
    with torch.no_grad():
        edit = trainer.editor.edit(trainer.split, batch.edit_inner)
        expected = locality_kl(trainer.split.logits_at(state.final_hidden, context),
                               trainer.split.logits_at(trainer.split.suffix(state, edit.new_params), context))
    assert metrics["l_loc_context"] == pytest.approx(expected.item(), rel=1e-4) and expected > 0
    with_context.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in trainer.editor.network_parameters)
    assert load_config(TINY, ["training.c_loc_context=0.5"]).training.c_loc_context == 0.5
    with pytest.raises(ValueError, match="c_loc_context"):
        load_config(TINY, ["training.c_loc_context=-1"])
    with pytest.raises(ValueError, match="c_loc_context"):
        load_config(TINY, ["training.c_loc_context=1", "training.n_edits=4"])
    run = tmp_path / "run"  # the training loop passes it (weighted like the other locality terms) and logs it
    Trainer(_config(tiny_gpt2_dir, "training.c_loc_context=1.0", "training.max_steps=2", "training.log_every=1"), run, show_progress=False).run()
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert all(e["l_loc_context"] >= 0 for e in logged if e["split"] == "train") and any(e["split"] == "train" for e in logged)


def test_locality_target_moves_the_locality_weight_and_survives_resume(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_gpt2_dir, "training.locality_target=0.9", "training.locality_target_rate=0.5")
    trainer = Trainer(config, tmp_path / "unit", show_progress=False)
    trainer.state.follow_locality_target(0.5, trainer.config.training)  # under the target: the weight rises
    assert trainer.state.loc_weight == pytest.approx(math.exp(0.5 * 0.4)) and trainer.state.loc_running == 0.5
    trainer.state.follow_locality_target(1.0, trainer.config.training)  # running mean 0.525, still under
    assert trainer.state.loc_weight > math.exp(0.5 * 0.4)
    trainer.state.loc_running, trainer.state.loc_weight = 1.0, 1.0
    trainer.state.follow_locality_target(1.0, trainer.config.training)  # over the target: it falls
    assert trainer.state.loc_weight == pytest.approx(math.exp(-0.05))
    for _ in range(2000):
        trainer.state.follow_locality_target(0.0, trainer.config.training)
    assert trainer.state.loc_weight == train_state.LOC_WEIGHT_RANGE[1]  # bounded
    with pytest.raises(ValueError, match="locality_target"):
        _config(tiny_gpt2_dir, "training.locality_target=1.5")
    assert _config(tiny_gpt2_dir).training.locality_target is None

    straight = Trainer(_config(tiny_gpt2_dir, "training.locality_target=1.0", "training.max_steps=6"), tmp_path / "a", show_progress=False)
    straight.run()
    Trainer(_config(tiny_gpt2_dir, "training.locality_target=1.0", "training.max_steps=3"), tmp_path / "b", show_progress=False).run()
    resumed = Trainer(_config(tiny_gpt2_dir, "training.locality_target=1.0", "training.max_steps=6"), tmp_path / "b", show_progress=False)
    resumed.run()
    assert resumed.state.loc_weight == pytest.approx(straight.state.loc_weight)
    assert resumed.state.loc_running == pytest.approx(straight.state.loc_running)
    logged = [json.loads(x) for x in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    assert all("loc_weight" in e for e in logged if e["split"] == "train")


def test_linear_schedule_lowers_both_learning_rates_to_the_final_ratio(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(tiny_gpt2_dir, "training.lr_schedule=linear", "training.lr_final_ratio=0.25", "training.max_steps=5",
                              "training.lr=1e-3", "training.lr_lr=1e-2"), tmp_path, show_progress=False)
    factors = []
    for step in range(5):
        trainer.state.step = step
        factors.append(trainer.lr_factor())
    assert factors == pytest.approx([1.0, 0.8125, 0.625, 0.4375, 0.25])
    trainer.state.step = 4
    trainer._set_learning_rates()
    assert trainer.opt.param_groups[0]["lr"] == pytest.approx(0.25e-3) and trainer.lr_opt.param_groups[0]["lr"] == pytest.approx(0.25e-2)
    assert Trainer(_config(tiny_gpt2_dir), tmp_path / "c", show_progress=False).lr_factor() == 1.0  # constant by default
    with pytest.raises(ValueError, match="lr_schedule"):
        _config(tiny_gpt2_dir, "training.lr_schedule=cosine")


@pytest.mark.parametrize("packed", [False, True])
def test_locality_scale_scores_the_locality_terms_at_a_multiple_of_the_update(tiny_gpt2_dir: Path, tmp_path: Path, packed: bool) -> None:
    """loc_scale = s: the locality terms are those of the same edit with s × its step sizes; the edit terms are unchanged."""
    from instructedit.objective import meta_loss

    trainer = Trainer(_config(tiny_gpt2_dir, "training.locality_scale=3.0"), tmp_path, show_progress=False)
    batch = trainer._batch([trainer.data.train[0]])
    trainer.editor.eval()  # no running-statistics updates between the calls
    with torch.no_grad():
        trainer.editor.edit_lrs.fill_(5.0)
    terms = {"c_margin": 1.0, "c_context": 1.0, "packed": packed}
    _, scaled = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, loc_scale=3.0, **terms)
    _, plain = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, **terms)
    with torch.no_grad():
        trainer.editor.edit_lrs.mul_(3.0)
    _, tripled = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, **terms)
    for key in ("l_loc", "l_margin", "l_loc_context", "locality"):
        assert scaled[key] == pytest.approx(tripled[key], rel=1e-4, abs=1e-7), key
    assert tripled["l_loc"] > plain["l_loc"] > 0
    for key in ("l_edit", "edit_acc"):
        assert scaled[key] == pytest.approx(plain[key], rel=1e-5), key
    assert trainer.run()["steps"] == trainer.config.training.max_steps  # the trainer passes it through
    with pytest.raises(ValueError, match="locality_scale"):
        load_config(TINY, ["training.locality_scale=0"])


def test_validation_at_the_start_can_be_left_out(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """validate_at_start: false (the quickstart): no step-0 validation; best/ comes from the first one at val_every."""
    Trainer(_config(tiny_gpt2_dir, "training.max_steps=4", "training.val_every=2", "training.validate_at_start=false"), tmp_path,
            show_progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in lines if e["split"] == "val"] == [2, 4]
    assert (tmp_path / "best" / "editor.safetensors").is_file()
    assert json.loads((tmp_path / "summary.json").read_text())["best_step"] in (2, 4)


def test_without_validation_the_final_editor_is_best(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """val_every: 0 (the quickstart, whose calibration measures the editor): no validation at all; best/ holds the final
    editor, the same as last/; a config asking for a validation-time choice without validation is refused."""
    Trainer(_config(tiny_gpt2_dir, "training.max_steps=3", "training.val_every=0", "training.validate_at_start=false",
                    "training.checkpoint_every=2"), tmp_path, show_progress=False).run()
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert not [e for e in lines if e["split"] == "val"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["best_step"] == 3 and summary["best_val_loss"] is None and summary["last_validation"] is None
    best, last = MENDEditor.from_pretrained(tmp_path / "best"), MENDEditor.from_pretrained(tmp_path / "last")
    for (name, a), (_, b) in zip(best.state_dict().items(), last.state_dict().items(), strict=True):
        assert torch.equal(a, b), name
    assert "not validated: best/ is the final editor" in (tmp_path / "best" / "README.md").read_text()
    with pytest.raises(ValueError, match="validate_at_start"):
        _config(tiny_gpt2_dir, "training.val_every=0")
    with pytest.raises(ValueError, match="edit_scales"):
        _config(tiny_gpt2_dir, "training.val_every=0", "training.validate_at_start=false", "training.edit_scales=[1.0,2.0]")
    with pytest.raises(ValueError, match="val_every"):
        _config(tiny_gpt2_dir, "training.val_every=-1")


def test_per_record_edits_in_one_pass_equal_the_mean_of_single_record_steps(tiny_model_dir: Path, tmp_path: Path) -> None:
    """batched_meta_loss (training.batch_size > 1): every record edited with its own update, all in one pass, gives the
    mean of the records' packed meta_loss: loss, metrics and gradients (editor statistics frozen: eval mode)."""
    import copy

    from instructedit.objective import batched_meta_loss, meta_loss

    trainer = Trainer(_config(tiny_model_dir, "training.edit_loss_on=rephrase"), tmp_path, show_progress=False)
    records = [next(r for r in trainer.data.train if r.task == task) for task in ("counterfact", "convsent", "wikirecent")]
    batches = [trainer._batch([r]) for r in records]
    with torch.no_grad():
        trainer.editor.edit_lrs.fill_(10.0)  # an edit that moves every term
    trainer.editor.eval()
    state = copy.deepcopy(trainer.editor.state_dict())
    params = trainer.editor.network_parameters + [trainer.editor.edit_lrs]
    terms = {"c_margin": 1.0, "c_answer": 0.1, "c_context": 1.0, "loc_scale": 2.0}

    def grads() -> list[torch.Tensor]:
        out = [p.grad.clone() for p in params]
        trainer.editor.zero_grad(set_to_none=True)
        return out

    singles = []
    for batch in batches:
        loss, metrics = meta_loss(trainer.editor, trainer.split, batch, 0.1, 1.0, packed=True, **terms)
        (loss / len(batches)).backward()
        singles.append((loss.item(), metrics))
    expected = grads()
    trainer.editor.load_state_dict(state)
    starts = trainer.split.starts
    reused = starts.reused_tokens
    loss, metrics = batched_meta_loss(trainer.editor, trainer.split, batches, 0.1, 1.0, **terms)
    loss.backward()
    got = grads()
    assert loss.item() == pytest.approx(sum(l for l, _ in singles) / 3, rel=1e-4)
    for key in singles[0][1]:
        assert metrics[key] == pytest.approx(sum(m[key] for _, m in singles) / 3, rel=1e-3, abs=1e-6), key
    for a, b in zip(expected, got, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-5 * max(1.0, float(a.abs().max())))
    # the records' starts, kept once their rows came twice (the single steps, then the pass above), are reused now
    again, _ = batched_meta_loss(trainer.editor, trainer.split, batches, 0.1, 1.0, **terms)
    assert starts.usable and starts.reused_tokens > reused and again.item() == pytest.approx(loss.item(), rel=1e-4)


def test_batch_size_trains_one_edit_per_record_in_one_pass(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """training.batch_size 2 × grad_accumulation 1 consumes the records batch_size 1 × grad_accumulation 2 does, each with
    its own edit: the same losses, the editor's running statistics included (to float rounding); so does it where the
    records' rows are too long for one pass (``objective.one_pass``) and run one after another."""
    from instructedit import objective as objective_module
    from instructedit.objective import batched_meta_loss

    one = Trainer(_config(tiny_gpt2_dir, "training.max_steps=3", "training.log_every=1", "training.batch_size=1", "training.grad_accumulation=2"), tmp_path / "a",
                  show_progress=False)
    two = Trainer(_config(tiny_gpt2_dir, "training.max_steps=3", "training.log_every=1", "training.batch_size=2", "training.grad_accumulation=1"), tmp_path / "b",
                  show_progress=False)
    records, batches = two._micro_batch(0)
    assert isinstance(batches, list) and len(batches) == 2 and two.records_per_step == one.records_per_step == 2
    assert two._objective(batches) is batched_meta_loss
    one.run(), two.run()
    assert _train_losses(tmp_path / "b").keys() == _train_losses(tmp_path / "a").keys() == {1, 2, 3}
    for step, loss in _train_losses(tmp_path / "a").items():
        assert _train_losses(tmp_path / "b")[step] == pytest.approx(loss, rel=1e-3), step
    monkeypatch.setattr(objective_module, "ONE_PASS_TOKENS", 1)
    monkeypatch.setattr(objective_module, "_record_updates", lambda *a, **k: pytest.fail("ran the records in one pass"))
    Trainer(_config(tiny_gpt2_dir, "training.max_steps=3", "training.log_every=1", "training.batch_size=2", "training.grad_accumulation=1"),
            tmp_path / "d", show_progress=False).run()
    for step, loss in _train_losses(tmp_path / "a").items():
        assert _train_losses(tmp_path / "d")[step] == pytest.approx(loss, rel=1e-3), step
    monkeypatch.undo()
    # a least-squares editor: the same records, one meta_loss call each (batched_meta_loss needs a summing editor)
    solving = Trainer(_config(tiny_gpt2_dir, "training.max_steps=1", "training.batch_size=2", "editor.aggregation=least_squares"),
                      tmp_path / "c", show_progress=False)
    objective = solving._objective(solving._micro_batch(0)[1])
    assert objective.func.__name__ == "per_record_meta_loss" and solving.run()["steps"] == 1


def test_atomic_writes_get_the_mode_a_plain_open_gives(tmp_path: Path) -> None:
    import os

    from instructedit.io import write_json

    old = os.umask(0o027)
    try:
        written = write_json(tmp_path / "results" / "r.json", {"a": 1})
        plain = tmp_path / "plain.json"
        plain.write_text("{}")
    finally:
        os.umask(old)
    assert json.loads(written.read_text()) == {"a": 1}
    assert written.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777 == 0o640  # not mkstemp's 0600
    assert [p.name for p in written.parent.iterdir()] == ["r.json"]  # no temporary file left
