"""KE (editors/ke.py): the paper's update against autograd, functional edits, bitwise rollback, save/load, training, evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instructedit.api import load_editor
from instructedit.config import LEARNED_METHODS, EditorConfig, load_config
from instructedit.editors.base import apply_in_place
from instructedit.editors.ke import KEEditor
from instructedit.editors.mend import MENDEditor
from instructedit.editors.registry import LEARNED_EDITORS, build_editor, load_trained_editor, make_editor
from instructedit.evaluation.runner import evaluate
from instructedit.losses import masked_nll
from instructedit.models.loading import load_model
from instructedit.records import ConvSentExtras, EditRecord, QAItem
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool
from instructedit.training import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
KE = ["editor.method=ke", "editor.lstm_dim=8", "editor.condition_dim=16", "editor.conditioner_dim=8"]
PAIRS = [("The capital of France is", "Paris"), ("Toko Yasuda, the", "piano guitar")]

pytestmark = pytest.mark.usefixtures("one_thread")


def records() -> list[EditRecord]:
    """A CounterFact case with every probe family, and a ConvSent one (two edit responses)."""
    cf = EditRecord(task="counterfact", prompt="The mother tongue of Danielle Darrieux is", target_new="English", ground_truth="French",
                    rephrase=("The place of birth of the writer is",), locality=(QAItem("The gender of Ingrid is", "female", "Relation_Specificity"),),
                    portability=(QAItem("The capital of France is", "Paris", "Reasoning"),), source="ke#0")
    cs = EditRecord(task="convsent", prompt="What do you think of Estero?", target_new="I really like it.", subject="Estero",
                    locality=(QAItem("What do you think of Paris?", "negative reviews", "OtherTopic"),),
                    convsent=ConvSentExtras("Estero", "positive", ("I really like it.", "The style is positive.", "I like Paris."),
                                            ("Well, it has some bad reviews.",)), source="ke#1")
    return [cf, cs]


def _config(model_dir: Path, *overrides: str):
    return load_config(TINY, [f"model.name={model_dir}", *KE, *overrides])


def _setup(model_dir: Path, *overrides: str):
    model, tok = load_model(str(model_dir))
    torch.manual_seed(0)
    editor = build_editor(model, _config(model_dir, *overrides))
    assert isinstance(editor, KEEditor)
    return model, tok, editor, Collator(tok, max_length=64).qa_batch(PAIRS)


def test_config_and_registry_know_ke() -> None:
    assert tuple(LEARNED_EDITORS) == LEARNED_METHODS
    assert EditorConfig(method="ke").method == "ke"
    with pytest.raises(ValueError, match="config field 'editor.aggregation': 'least_squares' is implemented for MEND only"):
        EditorConfig(method="ke", aggregation="least_squares")


def test_update_is_the_papers_gated_gradient(tiny_model_dir: Path) -> None:
    """ΔW = s·Σ_r σ(η_r)(softmax(α_r)γ_rᵀ ⊙ ∇W_r + softmax(β_r)δ_rᵀ), ∇W_r from autograd on row r's share of the edit loss."""
    model, _, editor, batch = _setup(tiny_model_dir, "editor.init_edit_lr=0.5")
    editor.eval()
    result = editor.edit(model, batch)
    c = editor.encode(model, batch)
    assert c.shape == (2, 16)
    params = [model.get_parameter(w.name).requires_grad_(True) for w in editor.weights]
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    mask = batch.label_mask
    n_targets = int(mask.sum())
    token_nll = torch.nn.functional.cross_entropy(logits[mask], batch.labels[mask], reduction="none")
    row_grads = [torch.autograd.grad(token_nll[batch.label_rows == r].sum() / n_targets, params, retain_graph=True) for r in range(2)]
    with torch.no_grad():
        for i, (w, conditioner) in enumerate(zip(editor.weights, editor.conditioners)):
            a, gamma, b, delta, gate = conditioner(c)
            expected = torch.zeros(w.shape)
            for r in range(2):
                grad = row_grads[r][i].T if w.transposed else row_grads[r][i]  # (d_out, d_in)
                expected += gate[r] * (torch.outer(a[r], gamma[r]) * grad + torch.outer(b[r], delta[r]))
            expected = 0.5 * (expected.T if w.transposed else expected)
            assert torch.allclose(result.updates[w.name], expected, atol=1e-7, rtol=1e-4), w.name
    assert result.pre_edit_loss == pytest.approx(masked_nll(logits[mask], batch.labels[mask]).item(), rel=1e-5)


def test_the_condition_reads_the_new_target(tiny_gpt2_dir: Path) -> None:
    model, tok, editor, _ = _setup(tiny_gpt2_dir)
    collator = Collator(tok, max_length=64)
    one, other = (editor.encode(model, collator.qa_batch([("The capital of France is", t)])) for t in ("Paris", "Rome"))
    assert not torch.allclose(one, other)
    # a row without a target is not an edit: it gets no condition and adds nothing
    batch = collator.qa_batch(PAIRS)
    batch.labels[1] = -100
    assert editor.encode(model, batch).shape[0] == 1
    alone = editor.edit(model, collator.qa_batch(PAIRS[:1])).updates
    for name, update in editor.edit(model, batch).updates.items():
        assert torch.allclose(update, alone[name], atol=1e-7), name


def test_edit_is_functional_changes_only_edited_weights_and_rollback_is_bitwise(tiny_model_dir: Path) -> None:
    model, _, editor, batch = _setup(tiny_model_dir, "editor.init_edit_lr=1.0")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = editor.edit(model, batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "edit() must not mutate the model"
    handle = apply_in_place(model, result)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {w.name for w in editor.weights}
    handle.rollback()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with editor.apply(model, batch):
        assert all(not torch.equal(before[w.name], model.get_parameter(w.name)) for w in editor.weights)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_save_load_round_trip_gives_identical_updates(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _, editor, batch = _setup(tiny_model_dir)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    editor.save_pretrained(tmp_path / "ke")
    assert sorted(p.name for p in (tmp_path / "ke").iterdir()) == ["editor.safetensors", "editor_config.json"]
    saved = json.loads((tmp_path / "ke" / "editor_config.json").read_text())
    assert saved["method"] == "ke" and saved["dimensions"] == {"embedding_dim": 32} and saved["editor"]["lstm_dim"] == 8
    editor.eval()
    expected = editor.edit(model, batch).updates
    for loaded in (KEEditor.from_pretrained(tmp_path / "ke"), load_trained_editor(tmp_path / "ke"),
                   make_editor("ke", model, None, {"path": tmp_path / "ke"}), load_editor(tmp_path / "ke", instruction=None).editor):
        assert isinstance(loaded, KEEditor)
        loaded.eval()
        assert loaded.state_dict().keys() == editor.state_dict().keys()
        assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in editor.state_dict().items())
        for name, update in loaded.edit(model, batch).updates.items():
            assert torch.equal(update, expected[name]), name
    with pytest.raises(ValueError, match="holds a 'ke' editor, not 'mend'"):
        make_editor("mend", model, None, {"path": tmp_path / "ke"})
    with pytest.raises(ValueError, match="method 'ke' is not 'mend'"):
        MENDEditor.from_pretrained(tmp_path / "ke")


def test_editor_rejects_a_model_with_other_embeddings(tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> None:
    _, _, editor, _ = _setup(tiny_gpt2_dir)
    llama, tok = load_model(str(tiny_llama_dir))
    with pytest.raises(ValueError, match="does not have"):
        editor.edit(llama, Collator(tok).qa_batch(PAIRS))


def _validations(run: Path) -> list[dict[str, float]]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [e for e in lines if e["split"] == "val"]


def test_meta_training_lowers_the_held_out_edit_loss_and_resumes(tiny_model_dir: Path, tmp_path: Path) -> None:
    overrides = ["editor.init_edit_lr=30", "training.lr=1e-2", "training.val_every=4", "training.checkpoint_every=4"]
    start = Trainer(_config(tiny_model_dir, *overrides, "training.max_steps=4"), tmp_path, show_progress=False)
    before = {k: v.clone() for k, v in start.editor.state_dict().items()}
    start.run()
    resumed = Trainer(_config(tiny_model_dir, *overrides, "training.max_steps=12"), tmp_path, show_progress=False)  # from last/
    assert resumed.run()["steps"] == 12
    val = _validations(tmp_path)  # validation records are held out of training
    assert [v["step"] for v in val] == [0, 4, 8, 12]
    l_edit = [v["l_edit"] for v in val]
    assert l_edit[-1] < l_edit[0] and l_edit[-1] < val[-1]["pre_edit_loss"], l_edit  # better than no edit, and than untrained KE
    for name in ("best", "last"):
        assert isinstance(load_trained_editor(tmp_path / name), KEEditor)
    trained = load_trained_editor(tmp_path / "last").state_dict()
    assert all(not torch.equal(before[k], trained[k]) for k in before)


@pytest.mark.parametrize("protocol", ["teacher_forced", "generation"])
def test_evaluation_runs_with_a_ke_editor_and_restores_the_model(tiny_llama_dir: Path, protocol: str) -> None:
    model, tokenizer, editor, _ = _setup(tiny_llama_dir, "editor.init_edit_lr=1.0")
    editor.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 0, progress=False, protocol=protocol)
    assert len(report.cases) == 2 and report.settings.method == "ke"
    assert not report.settings.packed_rows  # KE reads each edit row's own tokens: the runner falls back to padded rows
    phase = "post" if protocol == "teacher_forced" else "gen_post"
    assert all(phase in phases for phases in report.aggregates.values())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    if protocol == "teacher_forced":  # the functional path (cached prefix, edit rows among the probes) is apply()'s edit
        slow = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 0, progress=False, protocol=protocol, fast=False)
        for a, b in zip(report.cases, slow.cases):
            assert a.post == pytest.approx(b.post, abs=1e-5)


def test_evaluate_command_takes_the_method_from_the_editor_folder(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    from instructedit.cli import main
    from instructedit.evaluation.report import load_report_json

    Trainer(_config(tiny_gpt2_dir, "training.max_steps=1", "training.val_every=1"), tmp_path / "run", show_progress=False).run()
    out = tmp_path / "report.json"
    assert main(["evaluate", "--editor", str(tmp_path / "run" / "best"), "--task", "counterfact", "--limit", "2", "--output", str(out),
                 "--device", "cpu", "--no-progress", "--protocol", "teacher_forced"]) == 0
    assert load_report_json(out).settings.method == "ke"
