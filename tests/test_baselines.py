"""The FT-L, GRACE and CaliNet baselines: they learn the edit, roll back bit-exactly, and keep when asked."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from instructedit.editors.base import EditHandle
from instructedit.editors.calinet import CaliNetConfig, CaliNetEditor
from instructedit.editors.ft import FTConfig, FTEditor, edit_loss
from instructedit.editors.grace import GRACEConfig, GRACEEditor
from instructedit.editors.registry import make_editor
from instructedit.models.architectures import arch_spec
from instructedit.models.loading import load_model
from instructedit.records import TokenBatch
from instructedit.tasks.collate import Collator

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "baselines"
METHODS = {"ft": FTConfig, "grace": GRACEConfig, "calinet": CaliNetConfig}
EDIT = ("The capital of France is", "Paris")
FAR = ("I really like his style. Well, it has some bad reviews.", "positive")
SHARPEN = 10.0
# GRACE's radius is in the units of the layer input; these sit well below the key distances of the tiny models.
GRACE_EPS = {"gpt2": 0.2, "llama": 0.01}


def fast_options(method: str, model: nn.Module) -> dict[str, Any]:
    """Few steps, step sizes that converge on the tiny models (the defaults are for billion-parameter ones)."""
    return {
        "ft": {"lr": 2e-2, "num_steps": 15, "norm_constraint": 0.1},
        "grace": {"n_iter": 15, "eps_init": GRACE_EPS[model.config.model_type]},
        "calinet": {"lr": 2e-2, "num_steps": 15},
    }[method]


def load(model_dir: Path, dtype: str = "float32") -> tuple[nn.Module, Collator]:
    model, tok = load_model(str(model_dir), dtype=dtype)
    # A tiny random model's final norm bounds how far any hidden-state edit can move its near-uniform
    # logits (NLL ≈ log vocab); a larger gain lets an edit move the NLL a lot, as in a trained model.
    with torch.no_grad():
        model.get_submodule(arch_spec(model).final_norm).weight.mul_(SHARPEN)
    return model, Collator(tok, max_length=64)


@torch.no_grad()
def logits(model: nn.Module, batch: TokenBatch) -> torch.Tensor:
    return model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits


def score(model: nn.Module, batch: TokenBatch) -> tuple[float, float]:
    """Teacher-forced NLL and argmax accuracy on the target tokens."""
    out, mask = logits(model, batch), batch.label_mask
    return edit_loss(out, batch).item(), (out[mask].argmax(-1) == batch.labels[mask]).float().mean().item()


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_bitwise(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_edit_learns_then_rolls_back_exactly(method: str, tiny_model_dir: Path) -> None:
    torch.manual_seed(0)
    model, collator = load(tiny_model_dir)
    batch = collator.qa_batch([EDIT])
    params, pre_logits = snapshot(model), logits(model, batch)
    pre_nll, pre_acc = score(model, batch)
    editor = make_editor(method, model, collator.tokenizer, fast_options(method, model))
    with editor.apply(model, batch) as handle:
        assert isinstance(handle, EditHandle)
        nll, acc = score(model, batch)
        assert nll < pre_nll / 2, (pre_nll, nll)
        assert (pre_acc, acc) == (0.0, 1.0)
        assert all(not p.requires_grad and p.grad is None for p in model.parameters())
    assert not handle.active
    assert_bitwise(model, params)
    assert torch.equal(logits(model, batch), pre_logits)
    assert all(not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_keep_makes_the_edit_permanent(method: str, tiny_gpt2_dir: Path) -> None:
    model, collator = load(tiny_gpt2_dir)
    batch = collator.qa_batch([EDIT])
    pre_logits = logits(model, batch)
    editor = make_editor(method, model, collator.tokenizer, fast_options(method, model))
    with editor.apply(model, batch) as handle:
        handle.keep()
    edited = logits(model, batch)
    assert not torch.equal(edited, pre_logits)
    handle.rollback()  # a kept edit cannot be undone any more
    assert torch.equal(logits(model, batch), edited)


def test_ft_changes_only_its_weight_within_the_norm_constraint(tiny_model_dir: Path) -> None:
    model, collator = load(tiny_model_dir)
    batch = collator.qa_batch([EDIT])
    editor = FTEditor(FTConfig(**fast_options("ft", model)))
    weight = editor.weight(model)
    name = weight.name
    assert weight.layer == 0 and name.split(".")[-2] in ("c_proj", "down_proj")  # layer -4 of 4, the down-projection
    before = snapshot(model)
    handle = editor.apply(model, batch)
    after = model.state_dict()
    changed = [k for k, v in before.items() if not torch.equal(after[k], v)]
    assert changed == [name]
    assert (after[name] - before[name]).abs().max() <= editor.config.norm_constraint + 1e-6
    handle.rollback()
    assert_bitwise(model, before)


def test_grace_leaves_far_prompts_alone(tiny_model_dir: Path) -> None:
    model, collator = load(tiny_model_dir)
    batch, far = collator.qa_batch([EDIT]), collator.qa_batch([FAR])
    pre_edit, pre_far = logits(model, batch), logits(model, far)
    editor = GRACEEditor(GRACEConfig(**fast_options("grace", model)))
    with editor.apply(model, batch):
        assert torch.equal(logits(model, far), pre_far)
        edited = logits(model, batch)
        prompt_len = int(batch.label_mask.long().argmax())  # outputs before the key's token are untouched
        assert torch.equal(edited[:, :prompt_len], pre_edit[:, :prompt_len])
        assert not torch.equal(edited, pre_edit)


def test_grace_codebook_persists_and_splits_on_conflicting_targets(tiny_gpt2_dir: Path) -> None:
    model, collator = load(tiny_gpt2_dir)
    paris, guitar = collator.qa_batch([EDIT]), collator.qa_batch([(EDIT[0], "guitar")])
    editor = GRACEEditor(GRACEConfig(**fast_options("grace", model)))
    editor.apply(model, paris).keep()
    codebook = editor.codebook(model)
    with editor.apply(model, paris):  # same key, same target: the ball is reused, no new entry
        assert len(codebook.entries) == 1
    with editor.apply(model, guitar):  # same key, new target: radii split, the newest entry wins the tie
        assert len(codebook.entries) == 2 and [e.epsilon for e in codebook.entries] == [0.0, 0.0]
        assert score(model, guitar)[1] == 1.0 and score(model, paris)[1] == 0.0
    assert len(codebook.entries) == 1 and codebook.entries[0].epsilon == GRACE_EPS["gpt2"]
    assert score(model, paris)[1] == 1.0


def test_editors_work_in_bfloat16(tiny_llama_dir: Path) -> None:
    model, collator = load(tiny_llama_dir, dtype="bfloat16")
    batch = collator.qa_batch([EDIT])
    params, pre_logits, pre_nll = snapshot(model), logits(model, batch), score(model, batch)[0]
    for method in sorted(METHODS):
        with make_editor(method, model, collator.tokenizer, fast_options(method, model)).apply(model, batch):
            assert score(model, batch)[0] < pre_nll, method
        assert_bitwise(model, params)
        assert torch.equal(logits(model, batch), pre_logits)


@pytest.mark.parametrize("method", sorted(METHODS))
def test_yaml_config_holds_the_defaults(method: str, tiny_gpt2_dir: Path) -> None:
    data = yaml.safe_load((CONFIGS / f"{method}.yaml").read_text())
    assert data["method"] == method
    defaults = dataclasses.asdict(METHODS[method]())
    assert data["options"] == defaults
    model, collator = load(tiny_gpt2_dir)
    editor = make_editor(data["method"], model, collator.tokenizer, data["options"])
    assert dataclasses.asdict(editor.config) == defaults


@pytest.mark.parametrize("method", sorted(METHODS))
def test_bad_options_fail_with_the_valid_ones(method: str, tiny_gpt2_dir: Path) -> None:
    model, collator = load(tiny_gpt2_dir)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['learning_rate'\] for method .* valid options: \[.*'lr'"):
        make_editor(method, model, collator.tokenizer, {"learning_rate": 1e-3})
    with pytest.raises(ValueError, match=f"{method} option 'lr': -1.0 must be > 0"):
        make_editor(method, model, collator.tokenizer, {"lr": -1.0})
    with pytest.raises(ValueError, match="layer 7 does not exist: the model has 4 blocks"):
        make_editor(method, model, collator.tokenizer, {"layer": 7})
    with pytest.raises(ValueError, match=f"{method} option 'layer': expected int, got 'x'"):
        make_editor(method, model, collator.tokenizer, {"layer": "x"})
    # YAML 1.1 (and so --method-option lr=5e-3) reads 5e-3 as a string: numbers in strings are accepted
    assert make_editor(method, model, collator.tokenizer, {"lr": "5e-3"}).config.lr == 5e-3
