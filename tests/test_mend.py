"""Oracle and identity tests for the gradient factors, the split model and the MEND editor."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instructedit.config import EditorConfig
from instructedit.editors.base import apply_in_place
from instructedit.editors.hooks import capture_factors, gradient_from_factors
from instructedit.editors.mend import MENDEditor
from instructedit.losses import masked_nll
from instructedit.models.architectures import arch_spec, resolve_editable_weights
from instructedit.models.loading import load_model
from instructedit.models.split import SplitModel
from instructedit.tasks.collate import Collator

PAIRS = [("The capital of France is", "Paris"), ("Toko Yasuda, the", "piano guitar")]


def _setup(model_dir: Path, last_n: int = 2):
    model, tok = load_model(str(model_dir))
    spec = arch_spec(model)
    weights = resolve_editable_weights(model, spec, last_n_layers=last_n)
    batch = Collator(tok, max_length=64).qa_batch(PAIRS)
    return model, tok, spec, weights, batch


def test_factors_select_keeps_all_without_a_copy() -> None:
    from instructedit.editors.hooks import Factors

    f = Factors(torch.randn(4, 3), torch.randn(4, 5), torch.zeros(4, dtype=torch.long), torch.arange(4))
    assert f.select(torch.ones(4, dtype=torch.bool)) is f
    some = f.select(torch.tensor([True, False, True, False]))
    assert torch.equal(some.u, f.u[[0, 2]]) and torch.equal(some.delta, f.delta[[0, 2]]) and some.positions.tolist() == [0, 2]


def test_factors_reproduce_autograd_gradient(tiny_model_dir: Path) -> None:
    model, _, _, weights, batch = _setup(tiny_model_dir)
    for w in weights:
        model.get_parameter(w.name).requires_grad_(True)
    with capture_factors(model, weights) as capture:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        loss = masked_nll(logits[batch.label_mask], batch.labels[batch.label_mask])
        factors = capture.factors(loss, retain_graph=True)
    true_grads = torch.autograd.grad(loss, [model.get_parameter(w.name) for w in weights])
    for w, grad in zip(weights, true_grads):
        assert torch.allclose(gradient_from_factors(factors[w.name], w), grad, atol=1e-6, rtol=1e-4), w.name
        # dropped tokens carry no gradient: every kept row has a non-zero δ
        assert factors[w.name].delta.ne(0).any(-1).all()
    # the hooks are gone after the context
    for w in weights:
        assert not model.get_submodule(w.module_name)._forward_hooks


def test_split_model_matches_full_forward(tiny_model_dir: Path) -> None:
    model, _, spec, weights, batch = _setup(tiny_model_dir)
    split = SplitModel(model, spec, min(w.layer for w in weights))
    state = split.prefix(batch)
    mask = batch.label_mask
    with torch.no_grad():
        full = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[mask]
        assert torch.allclose(split.logits_at(split.suffix(state), mask), full, atol=1e-5)
        assert torch.allclose(split.logits_at(state.final_hidden, mask), full, atol=1e-5)
        # edited weights passed functionally change the suffix output but not the model
        name = weights[-1].name
        before = model.get_parameter(name).clone()
        edited = split.suffix(state, {name: before + 0.5})
        assert not torch.allclose(split.logits_at(edited, mask), full)
        assert torch.equal(model.get_parameter(name), before)


def test_an_edits_prefix_stops_at_the_first_edited_block_with_the_same_result(tiny_model_dir: Path) -> None:
    from instructedit.models.split import _SHARED_ARGS

    model, _, spec, weights, batch = _setup(tiny_model_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8)).eval()
    split = SplitModel(model, spec, min(w.layer for w in weights))
    ran: list[int] = []
    handles = [layer.register_forward_pre_hook(lambda m, a, i=i: ran.append(i)) for i, layer in enumerate(split.layers)]
    try:
        full = split.prefix(batch)  # the model's first full pass checks that the edited blocks share their arguments
        assert getattr(model, _SHARED_ARGS) == {split.first_layer: True} and full.final_hidden is not None
        ran.clear()
        early = split.prefix(batch, final=False)
        assert ran == list(range(split.first_layer + 1)) and early.final_hidden is None  # stopped at the first edited block
        assert torch.equal(early.hidden, full.hidden)
        with torch.no_grad():
            assert torch.equal(split.suffix(early), split.suffix(full))
            a, b = editor.edit(split, batch, full), editor.edit(split, batch)
        assert all(torch.equal(a.updates[name], b.updates[name]) for name in a.updates)
        setattr(model, _SHARED_ARGS, {split.first_layer: False})  # blocks called differently (alternating attention kinds)
        ran.clear()
        assert split.prefix(batch, final=False).final_hidden is not None and ran == list(range(len(split.layers)))
    finally:
        for handle in handles:
            handle.remove()


def test_identity_initialized_network_returns_its_input(tiny_model_dir: Path) -> None:
    model, _, _, weights, _ = _setup(tiny_model_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8)).eval()
    for key, transform in editor.transforms.items():
        n = 5
        x = torch.randn(n, transform.d_in + transform.d_out)
        mode = torch.zeros(n, dtype=torch.long)
        h = x
        for layer in transform.layers:
            h = layer(h, mode)
        assert torch.equal(h, x), key


def test_network_in_place_equals_autograd_path_bit_for_bit(tiny_model_dir: Path) -> None:
    """An edit runs the network without gradients in place (``GradientTransform.forward_in_place``): the same bits as
    ``forward`` on the concatenated rows, for a trained-looking network (random A, scales, shifts, statistics), modes of
    unequal and zero row counts, and both with and without statistics (fewer than two rows seen)."""
    model, _, _, weights, batch = _setup(tiny_model_dir)
    torch.manual_seed(0)
    editor = MENDEditor(weights, EditorConfig(rank=8)).eval()
    for key, transform in editor.transforms.items():
        for seen in (0, 50):
            if seen:
                transform.norm_u.update(torch.randn(seen, transform.d_in) * 3 + 1)
                transform.norm_delta.update(torch.randn(seen, transform.d_out) * 1e-3)
            with torch.no_grad():
                for layer in transform.layers:
                    for p in (layer.A, layer.bias, layer.shift):
                        p.normal_(0, 0.3)
                    layer.scale.normal_(1, 0.2)
            n_modes = transform.layers[0].scale.shape[0]
            counts = [(7, 0, 3)[i % 3] for i in range(n_modes)]
            us = [torch.randn(c, transform.d_in) for c in counts]
            deltas = [torch.randn(c, transform.d_out) * 1e-3 for c in counts]
            mode = torch.repeat_interleave(torch.arange(n_modes), torch.tensor(counts))
            with torch.no_grad():
                expected = transform(torch.cat(us), torch.cat(deltas), mode)
                got = transform.forward_in_place(us, deltas)
            for e, g in zip(expected, got):
                assert g.shape == e.shape and torch.equal(g, e), (key, seen)
                assert not torch.equal(e, torch.cat(us if e.shape[1] == transform.d_in else deltas)), key  # not the identity
    # and through an edit: network_outputs takes the in-place path without gradients in eval mode
    factors = editor.edit_factors(editor.split(model), batch)[0]
    with torch.no_grad():
        fast = {w.name: (u_t, d_t) for _, w, _, u_t, d_t in editor.network_outputs(factors)}
    for key, ws in editor.groups.items():
        transform = editor.transforms[key]
        counts = [factors[w.name].u.shape[0] for w in ws]
        mode = torch.repeat_interleave(torch.arange(len(ws)), torch.tensor(counts))
        with torch.no_grad():
            u_t, d_t = transform(torch.cat([factors[w.name].u for w in ws]), torch.cat([factors[w.name].delta for w in ws]), mode)
        for w, u_w, d_w in zip(ws, u_t.split(counts), d_t.split(counts)):
            assert torch.equal(fast[w.name][0], u_w) and torch.equal(fast[w.name][1], d_w), w.name


def test_fresh_editor_update_is_alpha_times_gradient(tiny_model_dir: Path) -> None:
    """With identity network and untouched statistics (mean 0, no std), the update is α ∇W."""
    model, _, _, weights, batch = _setup(tiny_model_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8, init_edit_lr=1e-3)).eval()
    result = editor.edit(model, batch)
    for w in weights:
        model.get_parameter(w.name).requires_grad_(True)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    loss = masked_nll(logits[batch.label_mask], batch.labels[batch.label_mask])
    grads = torch.autograd.grad(loss, [model.get_parameter(w.name) for w in weights])
    for w, grad in zip(weights, grads):
        assert torch.allclose(result.updates[w.name], 1e-3 * grad, atol=1e-8, rtol=1e-4), w.name
        assert torch.allclose(result.new_params[w.name], model.get_parameter(w.name) + 1e-3 * grad, atol=1e-7)


def test_edit_changes_only_editable_weights_and_rollback_is_bitwise(tiny_model_dir: Path) -> None:
    model, _, _, weights, batch = _setup(tiny_model_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8, init_edit_lr=1.0))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = editor.edit(model, batch)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "edit() must not mutate the model"
    handle = apply_in_place(model, result)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {w.name for w in weights}
    handle.rollback()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with editor.apply(model, batch):
        assert any(not torch.equal(before[w.name], model.get_parameter(w.name)) for w in weights)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_training_mode_updates_running_statistics(tiny_model_dir: Path) -> None:
    model, _, _, weights, batch = _setup(tiny_model_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8)).train()
    editor.edit(model, batch)
    counts = [float(t.norm_u.count) for t in editor.transforms.values()]
    assert all(c > 0 for c in counts)
    editor.eval()
    editor.edit(model, batch)
    assert [float(t.norm_u.count) for t in editor.transforms.values()] == counts  # frozen at eval


def test_save_load_round_trip_restores_every_tensor(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _, _, weights, batch = _setup(tiny_model_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8), model_name=str(tiny_model_dir)).train()
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    editor.edit(model, batch)  # fills the normalization statistics
    editor.save_pretrained(tmp_path / "ed")
    assert sorted(p.name for p in (tmp_path / "ed").iterdir()) == ["editor.safetensors", "editor_config.json"]
    loaded = MENDEditor.from_pretrained(tmp_path / "ed")
    original, restored = editor.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys()
    assert any("norm_u.m2" in k for k in restored)
    for key in original:
        assert torch.equal(original[key], restored[key]), key
    editor.eval()
    loaded.eval()
    a, b = editor.edit(model, batch), loaded.edit(model, batch)
    for name in a.updates:
        assert torch.equal(a.updates[name], b.updates[name])


def test_editor_rejects_a_model_without_its_weights(tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> None:
    _, _, _, weights, _ = _setup(tiny_gpt2_dir)
    editor = MENDEditor(weights, EditorConfig(rank=8), model_name="tiny-gpt2")
    llama, tok = load_model(str(tiny_llama_dir))
    batch = Collator(tok).qa_batch(PAIRS)
    with pytest.raises(ValueError, match="does not have"):
        editor.edit(llama, batch)
