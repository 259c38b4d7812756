"""Least-squares aggregation of many edits (editors/aggregation.py, DESIGN.md §9) on tiny GPT-2 and LLaMA models.

Oracles: the chunked ridge solve equals ``torch.linalg.lstsq`` of the augmented system; its gradients
match finite differences; the peak memory of a 512-edit call does not grow with the number of edits;
``sum`` is bitwise the MEND update; rollback is bitwise; λ and the aggregation survive save/load.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

from instructedit.api import Edit, load_editor
from instructedit.config import EditorConfig, TrainingConfig, load_config
from instructedit.editors.aggregation import KeyMemory, NormalEquations, base_inverse, push_through_left, ridge_solve, value_differences
from instructedit.editors.hooks import Factors, capture_factors
from instructedit.editors.mend import CONFIG_NAME, MENDEditor
from instructedit.editors.registry import build_editor
from instructedit.io import file_sha256
from instructedit.losses import masked_nll, per_row_nll
from instructedit.models.architectures import arch_spec, resolve_editable_weights
from instructedit.models.loading import load_model
from instructedit import objective
from instructedit.objective import many_edits_loss, meta_loss
from instructedit.records import EditRecord, QAItem
from instructedit.runs import editor_sha256
from instructedit.tasks.collate import Collator
from instructedit.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread

PAIRS = [("The capital of France is", "Paris"), ("Toko Yasuda, the", "piano guitar"), ("BBC One, by", "Sega"),
         ("The mother tongue of Danielle Darrieux is", "French"), ("The gender of Ingrid is", "female")]

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def _editor(model: torch.nn.Module, model_dir: Path, **config: object) -> MENDEditor:
    """A tiny editor whose network is perturbed away from the identity (so ũ ≠ u and δ̃ ≠ δ)."""
    torch.manual_seed(0)
    weights = resolve_editable_weights(model, arch_spec(model), last_n_layers=2)
    editor = MENDEditor(weights, EditorConfig(rank=8, init_edit_lr=1e-2, **config), model_name=str(model_dir))  # type: ignore[arg-type]
    with torch.no_grad():
        for p in editor.transforms.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        if hasattr(editor, "lambdas"):
            editor.lambdas.copy_(torch.linspace(-1.0, 1.0, len(editor.weights)))
    return editor.eval()


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(before: dict[str, torch.Tensor], model: torch.nn.Module) -> bool:
    return all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def _many_pairs(n: int) -> list[tuple[str, str]]:
    return [(f"{PAIRS[i % len(PAIRS)][0]} number {i}", f"{PAIRS[(i * 3 + 1) % len(PAIRS)][1]} {i % 7}") for i in range(n)]


# -- the solve -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("ls_keys", ["all", "answer"])
def test_least_squares_update_equals_lstsq_of_the_augmented_system(tiny_model_dir: Path, ls_keys: str) -> None:
    """Per weight: the editor's update is argmin ‖K S − D‖² + e^λ‖S‖², solved directly as [K; e^{λ/2} I] S = [D; 0];
    K and D hold every token with a gradient (ls_keys all) or only the positions that predict answer tokens (answer)."""
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation="least_squares", chunk_edits=2, ls_keys=ls_keys)  # 5 edits: 3 chunks
    batch = Collator(tok, max_length=64).qa_batch(PAIRS)
    updates = editor.edit(model, batch).updates
    # K and D from one forward/backward of the whole model, δ from the sum of each edit's mean NLL
    with capture_factors(model, editor.weights) as capture:
        logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.label_mask]
        factors = capture.factors(per_row_nll(logits, batch.labels[batch.label_mask], batch.label_rows, batch.n_rows).sum())
    tokens = {name: f.u.shape[0] for name, f in factors.items()}
    if ls_keys == "answer":
        factors = {name: Factors(u=f.u[keep], delta=f.delta[keep]) for name, f in factors.items()
                   for keep in [batch.label_mask[f.rows, f.positions]]}
        assert all(f.u.shape[0] == int(batch.label_mask.sum()) for f in factors.values())
        assert any(f.u.shape[0] < tokens[name] for name, f in factors.items())  # the prompts' keys are left out
    with torch.no_grad():
        for i, w, keys, keys_t, deltas_t in editor.network_outputs(factors):
            values = value_differences(keys, keys_t, deltas_t, editor.edit_lrs[i]).double()  # D (n_tokens, d_out)
            keys = keys.double()  # K (n_tokens, d_in)
            ridge = editor.lambdas[i].double().exp().sqrt() * torch.eye(keys.shape[1], dtype=torch.float64)
            augmented_k = torch.cat([keys, ridge])
            augmented_d = torch.cat([values, values.new_zeros(keys.shape[1], values.shape[1])])
            expected = torch.linalg.lstsq(augmented_k, augmented_d).solution  # (d_in, d_out)
            expected = expected if w.transposed else expected.T  # the parameter's storage orientation
            assert updates[w.name].shape == model.get_parameter(w.name).shape
            scale = float(expected.abs().max())
            assert scale > 0, w.name
            torch.testing.assert_close(updates[w.name].double(), expected, rtol=1e-3, atol=1e-3 * scale, msg=w.name)


@pytest.mark.parametrize("aggregation", ["least_squares", "sum"])
def test_rounds_pass_the_unedited_prefix_once_and_change_nothing_else(tiny_model_dir: Path, aggregation: str,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    """apply(rounds=3) runs the blocks below the edited ones over the edit inputs once (per chunk of editor.chunk_edits),
    not once per round: the weights it leaves, and the rounds it keeps, equal those of every round running its own
    prefix, bit for bit; rollback is bitwise."""
    from instructedit.editors.learned import LearnedEditor
    from instructedit.models.split import ChunkStates, SplitModel

    model, tok = load_model(str(tiny_model_dir))
    torch.manual_seed(0)
    editor = build_editor(model, load_config(TINY, [f"model.name={tiny_model_dir}", "editor.init_edit_lr=5.0", f"editor.aggregation={aggregation}",
                                                    "editor.chunk_edits=2"])).eval()  # 5 edits: 3 chunks of at most 2 (least squares)
    batch = Collator(tok, max_length=64).qa_batch(PAIRS)
    before = _state(model)
    calls: list[int] = []
    prefix = SplitModel.prefix
    monkeypatch.setattr(SplitModel, "prefix", lambda self, b, *a, **k: calls.append(b.n_rows) or prefix(self, b, *a, **k))
    with editor.apply(model, batch, rounds=3) as handle:
        once, kept = _state(model), handle.rounds_made
    assert _same(before, model) and any(not torch.equal(before[k], once[k]) for k in before)  # the rounds moved weights
    assert calls == ([2, 2, 1] if aggregation == "least_squares" else [5])  # once, not once per round
    calls.clear()
    monkeypatch.setattr(LearnedEditor, "round_state", lambda self, split, b: None)  # every round runs its own prefix
    monkeypatch.setattr(MENDEditor, "round_state", LearnedEditor.round_state)
    with editor.apply(model, batch, rounds=3) as handle:
        assert handle.rounds_made == kept and _same(once, model)
    # each of the 3 rounds' edits (an undone one too), and, where every round was written (round 2 kept), the last one's check
    assert len(calls) == (3 if aggregation == "least_squares" else 1) * (3 + (kept >= 2))
    assert _same(before, model)
    monkeypatch.undo()
    state = editor.round_state(editor.split(model), batch)
    assert isinstance(state, ChunkStates) == (aggregation == "least_squares")
    if aggregation == "least_squares":
        other = build_editor(model, load_config(TINY, [f"model.name={tiny_model_dir}", "editor.aggregation=least_squares",
                                                       "editor.chunk_edits=3"])).eval()
        with pytest.raises(ValueError, match="3 chunks of 2 rows; this batch is 2 chunks of 3"):
            other.edit(model, batch, state)


def test_anchored_rounds_hold_the_preserved_keys_to_the_original_weights(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Anchored rounds (apply(rounds=..., anchored=True)) with a preservation sample: a later round's shift S is argmin
    ‖K S − D‖² + e^λ‖S‖² + (A + S)ᵀP(A + S), A the shift the earlier rounds made and P the sample's prior (lstsq of the
    augmented system, K and D from the model the earlier rounds edited); apply hands each later round the shift written
    so far and clears it after; without a sample anchoring changes nothing, bit for bit."""
    from instructedit.analysis.many_edits import key_memory

    model, tok = load_model(str(tiny_model_dir))
    collator = Collator(tok, max_length=64)
    editor = _editor(model, tiny_model_dir, aggregation="least_squares")
    batch = collator.qa_batch(PAIRS[:2])
    before = _state(model)
    with editor.apply(model, batch, rounds=3) as plain_rounds:
        plain = _state(model)
    with editor.apply(model, batch, rounds=3, anchored=True) as handle:  # no preserved keys: nothing to anchor
        assert handle.rounds_made == plain_rounds.rounds_made and _same(plain, model)
    memory = key_memory(editor, model, collator, _many_pairs(40), past_weight=0.0, text_weight=20.0)
    with editor.remembering(memory):
        with editor.apply(model, batch):  # the first round; then the second's solve, by hand and by the editor
            first = _state(model)
            with capture_factors(model, editor.weights) as capture:
                logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.label_mask]
                factors = capture.factors(per_row_nll(logits, batch.labels[batch.label_mask], batch.label_rows, batch.n_rows).sum())
            drifting = editor.edit(model, batch).updates
            editor.anchor = {name: first[name] - before[name] for name in drifting}
            anchored = editor.edit(model, batch).updates
            editor.anchor = None
        calls: list[tuple[dict | None, dict]] = []
        edit = editor.edit
        monkeypatch.setattr(editor, "edit", lambda *a: calls.append((editor.anchor, (r := edit(*a)).new_params)) or r)
        with editor.apply(model, batch, rounds=3, anchored=True):
            pass
    assert editor.anchor is None and _same(before, model)
    assert calls[0][0] is None and len(calls) >= 2
    for (anchor, _), (_, written) in zip(calls[1:], calls):  # each later round: the shift the round before wrote
        assert anchor.keys() == written.keys()
        for name, shift in anchor.items():
            torch.testing.assert_close(shift, written[name].float() - before[name].float(), rtol=0, atol=0)
    changed = []
    with torch.no_grad():
        for i, w, keys, keys_t, deltas_t in editor.network_outputs(factors):
            def oriented(t: torch.Tensor) -> torch.Tensor:  # storage orientation -> (d_in, d_out)
                return t.double() if w.transposed else t.double().T
            values = value_differences(keys, keys_t, deltas_t, editor.edit_lrs[i]).double()
            made = oriented(first[w.name] - before[w.name])  # A
            spectrum, basis = torch.linalg.eigh(memory.prior(w.name).double())
            root = spectrum.clamp(min=0).sqrt()[:, None] * basis.T  # RᵀR = P
            ridge = editor.lambdas[i].double().exp().sqrt() * torch.eye(keys.shape[1], dtype=torch.float64)
            expected = torch.linalg.lstsq(torch.cat([keys.double(), ridge, root]),
                                          torch.cat([values, values.new_zeros(keys.shape[1], values.shape[1]), -root @ made])).solution
            scale = float(expected.abs().max())
            assert scale > 0, w.name
            torch.testing.assert_close(oriented(anchored[w.name]), expected, rtol=1e-3, atol=1e-3 * scale, msg=w.name)
            changed.append(not torch.allclose(anchored[w.name], drifting[w.name]))
    assert any(changed)  # the anchor changed the solve


def test_the_anchor_holds_the_sample_not_the_earlier_edits() -> None:
    """An anchored solve holds only the preservation sample's keys to the weights before the shift (KeyMemory.prior with
    past=False): the earlier edits' keys are held to the current weights, which hold those edits."""
    memory = KeyMemory(past_weight=2.0, text_weight=3.0)
    memory.remember({"w": torch.eye(4)})
    memory.text = {"w": torch.full((4, 4), 0.5)}
    torch.testing.assert_close(memory.prior("w"), 2.0 * torch.eye(4) + 1.5)
    torch.testing.assert_close(memory.prior("w", past=False), torch.full((4, 4), 1.5))
    assert KeyMemory(past_weight=1.0).prior("w", past=False) is None


def test_chunked_normal_equations_equal_the_closed_form() -> None:
    torch.manual_seed(0)
    keys, values = torch.randn(23, 6, dtype=torch.float64), torch.randn(23, 4, dtype=torch.float64)
    system = NormalEquations()
    for k, d in zip(keys.split(5), values.split(5)):
        system.add(k, d)
    log_lambda = torch.tensor(0.7, dtype=torch.float64)
    closed = torch.linalg.inv(keys.T @ keys + log_lambda.exp() * torch.eye(6, dtype=torch.float64)) @ keys.T @ values
    assert system.n_tokens == 23
    torch.testing.assert_close(system.solve(log_lambda), closed)


def test_few_tokens_solve_as_two_thin_factors_and_many_as_one_matrix() -> None:
    torch.manual_seed(0)
    d_in, prior = 40, torch.randn(40, 40, dtype=torch.float64)
    prior = prior @ prior.T  # a preserved-key covariance: symmetric positive semi-definite
    log_lambda = torch.tensor(-0.3, dtype=torch.float64)
    keys, values = torch.randn(6, d_in, dtype=torch.float64), torch.randn(6, 40, dtype=torch.float64)
    system = NormalEquations()
    for k, d in zip(keys.split(4), values.split(4)):  # 6 tokens: 6 · (40 + 40) <= 40 · 40 / 2, kept
        system.add(k, d)
    left, right = system.solve_factors(log_lambda, prior)
    assert left.shape == (d_in, 6) and right.shape == (6, 40)
    torch.testing.assert_close(left @ right, system.solve(log_lambda, prior))
    system.add(torch.randn(5, d_in, dtype=torch.float64), torch.randn(5, 40, dtype=torch.float64))  # 11: too many to keep
    assert system.solve_factors(log_lambda, prior) is None and system.kept is None
    with pytest.raises(ValueError, match="no tokens"):
        NormalEquations().solve_factors(log_lambda)


def test_the_push_through_solve_equals_the_d_in_sized_one() -> None:
    """(KᵀK + P + e^λ I)⁻¹Kᵀ from an n_tokens-sized solve (with B = P + e^λ I inverted once, or B = e^λ I) equals the
    d_in-sized system's solution; a B that is not positive definite has no inverse."""
    torch.manual_seed(0)
    d_in, n = 30, 5
    keys = torch.randn(n, d_in, dtype=torch.float64)
    prior = torch.randn(50, d_in, dtype=torch.float64)
    prior = 7.0 * prior.T @ prior / 50
    for log_lambda in (torch.tensor(-2.0), torch.tensor(0.0), torch.tensor(1.5)):
        lam = log_lambda.double()
        torch.testing.assert_close(push_through_left(keys, log_lambda), ridge_solve(keys.T @ keys, keys.T, lam))
        inverse = base_inverse(log_lambda, prior)
        assert inverse.dtype == torch.float64
        assert inverse.is_contiguous()  # row-major: B⁻¹Kᵀ from a column-major inverse was 10-20x slower on a CPU
        torch.testing.assert_close(inverse, torch.linalg.inv(prior + lam.exp() * torch.eye(d_in, dtype=torch.float64)))
        torch.testing.assert_close(push_through_left(keys, log_lambda, inverse), ridge_solve(keys.T @ keys, keys.T, lam, prior))
        as_float = push_through_left(keys.float(), log_lambda.float(), base_inverse(log_lambda.float(), prior.float()))
        assert as_float.dtype == torch.float32  # returned in the keys' dtype
        torch.testing.assert_close(as_float.double(), ridge_solve(keys.T @ keys, keys.T, lam, prior), rtol=1e-4, atol=1e-6)
    assert base_inverse(torch.tensor(0.0), -5.0 * torch.eye(4, dtype=torch.float64)) is None


def test_a_preservation_sample_is_inverted_once_per_lambda(tiny_model_dir: Path) -> None:
    """An editor with a preservation sample solves single edits through its fixed part's cached inverse (the same updates
    as the d_in-sized solve of ``remembering`` the sample), and inverts it again when λ or the sample changes."""
    from instructedit.analysis.many_edits import key_memory

    model, tok = load_model(str(tiny_model_dir))
    collator = Collator(tok, max_length=64)
    editor = _editor(model, tiny_model_dir, aggregation="least_squares")
    batch = collator.qa_batch(PAIRS[:1])
    memory = key_memory(editor, model, collator, [(p, a) for p, a in PAIRS[2:]], past_weight=0.0, text_weight=50.0)
    editor.set_preservation(memory, "three pairs")
    torch.set_grad_enabled(False)  # as edits are made for use (the runner, the API): meta-training's solve differentiates
    try:
        _inverted_once(editor, model, batch, memory)
    finally:
        torch.set_grad_enabled(True)
    editor.set_preservation(None)
    assert not editor._base_inverses


def _inverted_once(editor: MENDEditor, model, batch, memory: KeyMemory) -> None:
    solved = editor.edit(model, batch)
    made = {name: cached[1] for name, cached in editor._base_inverses.items()}
    assert set(made) == {w.name for w in editor.weights} and all(f is not None for f in made.values())
    with editor.remembering(memory):  # a memory: the d_in-sized solve, no cached inverse
        held = editor.edit(model, batch)
    for name, update in solved.updates.items():
        torch.testing.assert_close(update, held.updates[name], rtol=1e-4, atol=1e-6)
    editor.edit(model, batch)
    assert all(editor._base_inverses[name][1] is made[name] for name in made)  # kept between edits
    editor.lambdas += 0.5
    shifted = editor.edit(model, batch)
    assert all(editor._base_inverses[name][1] is not made[name] for name in made)  # λ changed: made again
    with editor.remembering(memory):
        again = editor.edit(model, batch)
    for name, update in shifted.updates.items():
        torch.testing.assert_close(update, again.updates[name], rtol=1e-4, atol=1e-6)


def test_gradients_through_the_solve_match_finite_differences() -> None:
    """d S / d (keys, ũ, δ̃, α, λ) through value differences, chunked accumulation and the solve, in double precision."""
    torch.manual_seed(0)
    n, d_in, d_out = 9, 4, 3

    def shift(keys: torch.Tensor, keys_t: torch.Tensor, deltas_t: torch.Tensor, lr: torch.Tensor, log_lambda: torch.Tensor) -> torch.Tensor:
        system = NormalEquations()
        for k, kt, dt in zip(keys.split(4), keys_t.split(4), deltas_t.split(4)):
            system.add(k, value_differences(k, kt, dt, lr))
        return system.solve(log_lambda)

    inputs = (torch.randn(n, d_in), torch.randn(n, d_in), torch.randn(n, d_out), torch.tensor(0.3), torch.tensor(-0.2))
    inputs = tuple(t.double().requires_grad_(True) for t in inputs)
    assert torch.autograd.gradcheck(shift, inputs, eps=1e-6, atol=1e-6)
    gram, cross = torch.randn(5, 5, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    gram = (gram @ gram.T).requires_grad_(True)
    assert torch.autograd.gradcheck(ridge_solve, (gram, cross.requires_grad_(True), torch.tensor(0.1, dtype=torch.float64, requires_grad=True)))


# -- lifelong: the key memory ---------------------------------------------------------------------------


def test_solve_with_a_key_memory_equals_lstsq_with_the_preserved_keys_stacked() -> None:
    """(KᵀK + w_p K_pᵀK_p + w_t C_t + e^λ I)⁻¹ KᵀD = lstsq of [K; √w_p K_p; √(w_t/n) K_t; e^{λ/2} I] S = [D; 0; 0; 0]."""
    torch.manual_seed(0)
    d_in, d_out = 6, 4
    keys, values = torch.randn(5, d_in, dtype=torch.float64), torch.randn(5, d_out, dtype=torch.float64)
    past, text = torch.randn(7, d_in, dtype=torch.float64), torch.randn(30, d_in, dtype=torch.float64)
    memory = KeyMemory(past_weight=2.0, text_weight=50.0)
    memory.remember({"w": past[:3].T @ past[:3]})
    memory.remember({"w": past[3:].T @ past[3:]})
    memory.text = {"w": text.T @ text / 30}
    system = NormalEquations()
    system.add(keys, values)
    log_lambda = torch.tensor(-0.5, dtype=torch.float64)
    stacked_k = torch.cat([keys, 2.0 ** 0.5 * past, (50.0 / 30) ** 0.5 * text, log_lambda.exp().sqrt() * torch.eye(d_in, dtype=torch.float64)])
    stacked_d = torch.cat([values, values.new_zeros(7 + 30 + d_in, d_out)])
    torch.testing.assert_close(system.solve(log_lambda, memory.prior("w")), torch.linalg.lstsq(stacked_k, stacked_d).solution)
    assert memory.calls == 2 and memory.prior("other") is None and KeyMemory().prior("w") is None
    with pytest.raises(ValueError, match="weights must be >= 0"):
        KeyMemory(past_weight=-1.0)


def test_a_remembering_editor_keeps_the_outputs_at_its_earlier_edits_keys(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir))
    collator = Collator(tok, max_length=64)
    editor = _editor(model, tiny_model_dir, aggregation="least_squares")
    first, second = collator.qa_batch(PAIRS[:2]), collator.qa_batch(PAIRS[2:4])
    plain = editor.edit(model, second).updates
    with editor.remembering(KeyMemory(past_weight=0.0)) as memory:  # weight 0: the plain solve; calls counted, no keys kept
        editor.edit(model, first)
        for name, update in editor.edit(model, second).updates.items():
            torch.testing.assert_close(update, plain[name])
    assert memory.calls == 2 and memory.past == {} and editor.memory is None
    with editor.remembering(KeyMemory(past_weight=1e6)) as memory:  # the first edit's keys held (almost) still
        editor.edit(model, first)
        kept = editor.edit(model, second).updates
    with capture_factors(model, editor.weights) as capture:
        logits = model(input_ids=first.input_ids, attention_mask=first.attention_mask).logits[first.label_mask]
        factors = capture.factors(per_row_nll(logits, first.labels[first.label_mask], first.label_rows, first.n_rows).sum())
    for w in editor.weights:
        keys = factors[w.name].u.double()  # the first edit's answer-token keys
        def moved(update: torch.Tensor) -> float:
            shift = update.detach().double() if w.transposed else update.detach().double().T  # (d_in, d_out)
            return float((keys @ shift).norm())
        assert moved(kept[w.name]) < 0.01 * moved(plain[w.name]), w.name
    with pytest.raises(ValueError, match="needs an editor with editor.aggregation least_squares"):
        with _editor(model, tiny_model_dir).remembering(KeyMemory()):
            pass


def test_preserve_text_is_the_mean_key_covariance_of_the_sample(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation="least_squares")
    batches = [Collator(tok, max_length=64).qa_batch(PAIRS[:3]), Collator(tok, max_length=64).qa_batch(PAIRS[3:])]
    memory = KeyMemory(text_weight=10.0)
    editor.preserve_text(model, memory, batches)
    inputs: dict[str, list[torch.Tensor]] = {}
    hooks = [model.get_submodule(w.module_name).register_forward_hook(
        lambda m, a, o, name=w.name: inputs.setdefault(name, []).append(a[0].detach())) for w in editor.weights]
    with torch.no_grad():
        for b in batches:
            model(input_ids=b.input_ids, attention_mask=b.attention_mask)
    for h in hooks:
        h.remove()
    n = sum(int(b.attention_mask.sum()) for b in batches)
    assert memory.text_tokens == n
    for w in editor.weights:
        keys = torch.cat([x.reshape(-1, x.shape[-1])[b.attention_mask.reshape(-1).bool()] for x, b in zip(inputs[w.name], batches)])
        torch.testing.assert_close(memory.text[w.name], keys.T @ keys / n)
        torch.testing.assert_close(memory.prior(w.name), 10.0 * keys.T @ keys / n)


def test_an_editor_saved_with_a_preservation_sample_solves_as_remembering_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    """set_preservation: every solve holds the sample still, as ``remembering`` a memory with the same sample does; it is
    saved beside the editor (with its texts) and loaded with it; a memory with its own sample replaces it; a damaged or
    missing file is named."""
    from instructedit.analysis.many_edits import key_memory

    model, tok = load_model(str(tiny_model_dir))
    collator = Collator(tok, max_length=64)
    editor = _editor(model, tiny_model_dir, aggregation="least_squares")
    batch, sample = collator.qa_batch(PAIRS[:2]), [(p, a) for p, a in PAIRS[2:]]
    plain = editor.edit(model, batch).updates
    memory = key_memory(editor, model, collator, sample, past_weight=0.0, text_weight=50.0)
    with editor.remembering(memory):
        held = editor.edit(model, batch).updates
    editor.set_preservation(memory, "three pairs", sample)
    for name, update in editor.edit(model, batch).updates.items():
        torch.testing.assert_close(update, held[name])
        assert (update - plain[name]).norm() > 1e-3 * plain[name].norm()  # the sample changed the solve
    editor.save_pretrained(tmp_path / "e")
    loaded = MENDEditor.from_pretrained(tmp_path / "e").eval()
    about = json.loads((tmp_path / "e" / CONFIG_NAME).read_text())["preservation"]
    assert about == {"weight": 50.0, "tokens": memory.text_tokens, "source": "three pairs", "texts": len(sample)}
    assert loaded.preservation_texts == sample  # what a key memory can hold again (edit --preserve-data editor)
    with_sample = editor_sha256(tmp_path / "e")  # what cached evaluations are keyed on: the sample is part of the editor
    assert with_sample != file_sha256(tmp_path / "e" / "editor.safetensors")
    for name, update in loaded.edit(model, batch).updates.items():
        torch.testing.assert_close(update, held[name])
    other = key_memory(editor, model, collator, sample[:1], past_weight=0.0, text_weight=50.0)
    with editor.remembering(KeyMemory(past_weight=0.0)):  # no sample of its own: the editor's still holds
        torch.testing.assert_close(editor.edit(model, batch).updates[editor.weights[0].name], held[editor.weights[0].name])
    fresh = _editor(model, tiny_model_dir, aggregation="least_squares")  # the same network without a sample of its own
    with editor.remembering(other), fresh.remembering(other):  # a memory's own sample replaces the editor's
        replaced, alone = editor.edit(model, batch).updates, fresh.edit(model, batch).updates
    for name, update in replaced.items():
        torch.testing.assert_close(update, alone[name])
    editor.set_preservation(None)
    assert editor.preservation_texts == []
    editor.save_pretrained(tmp_path / "e", extra={"preservation": about})  # a stale entry is not kept
    assert "preservation" not in json.loads((tmp_path / "e" / CONFIG_NAME).read_text())
    assert not (tmp_path / "e" / "preservation.safetensors").exists()
    assert not (tmp_path / "e" / "preservation_texts.json").exists()
    assert editor_sha256(tmp_path / "e") == file_sha256(tmp_path / "e" / "editor.safetensors") != with_sample
    for name, update in MENDEditor.from_pretrained(tmp_path / "e").eval().edit(model, batch).updates.items():
        torch.testing.assert_close(update, plain[name])
    loaded.save_pretrained(tmp_path / "f")
    texts = (tmp_path / "f" / "preservation_texts.json").read_text()
    (tmp_path / "f" / "preservation_texts.json").write_text('{"texts": [["a prompt", 3]]}')
    with pytest.raises(ValueError, match=r"preservation_texts.json: text 0 is not a \(non-empty prompt, answer\) pair"):
        MENDEditor.from_pretrained(tmp_path / "f")
    (tmp_path / "f" / "preservation_texts.json").unlink()
    with pytest.raises(ValueError, match="names 3 preservation texts but .*preservation_texts.json is missing"):
        MENDEditor.from_pretrained(tmp_path / "f")
    (tmp_path / "f" / "preservation_texts.json").write_text(texts)
    (tmp_path / "f" / "preservation.safetensors").write_bytes(b"not safetensors")
    with pytest.raises(ValueError, match="names a preservation sample but .*preservation.safetensors cannot be read"):
        MENDEditor.from_pretrained(tmp_path / "f")
    with pytest.raises(ValueError, match="only a preservation sample"):
        editor.set_preservation(KeyMemory(past_weight=0.0, text_weight=0.0))
    with pytest.raises(ValueError, match="needs an editor with editor.aggregation least_squares"):
        _editor(model, tiny_model_dir).set_preservation(memory)


# -- memory ----------------------------------------------------------------------------------------------


def _peak_bytes(fn: object) -> int:
    """Peak of the CPU bytes allocated and not yet freed while ``fn()`` runs (PyTorch profiler's memory events)."""
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()  # type: ignore[operator]
    live = peak = 0
    for event in sorted(prof.events(), key=lambda e: e.time_range.start):
        live += event.self_cpu_memory_usage
        peak = max(peak, live)
    return peak


def test_memory_of_a_512_edit_call_does_not_grow_with_the_number_of_edits(tiny_gpt2_dir: Path) -> None:
    model, tok = load_model(str(tiny_gpt2_dir))
    collator = Collator(tok, max_length=64)
    batches = {n: collator.qa_batch(_many_pairs(n)) for n in (128, 512)}
    peaks = {}
    for aggregation in ("least_squares", "sum"):
        editor = _editor(model, tiny_gpt2_dir, aggregation=aggregation, chunk_edits=64)
        for n, batch in batches.items():
            peaks[aggregation, n] = _peak_bytes(lambda: editor.apply(model, batch).rollback())
    # the summing editor runs all edits at once: its peak grows with N, which shows the measure sees it
    assert peaks["sum", 512] > 3 * peaks["sum", 128], peaks
    # least squares runs 64 edits at a time into d_in × d_in and d_in × d_out sums: 4× the edits, the same peak
    assert peaks["least_squares", 512] < 1.1 * peaks["least_squares", 128], peaks


# -- sum unchanged, rollback, persistence ----------------------------------------------------------------


def test_sum_is_bitwise_the_mend_update(tiny_model_dir: Path) -> None:
    """The default editor's update is α Σ_t δ̃_t ũ_tᵀ of the batch's mean NLL, bit for bit (the pre-aggregation code)."""
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir)
    assert editor.config.aggregation == "sum" and not hasattr(editor, "lambdas")
    assert not any("lambdas" in k for k in editor.state_dict())
    batch = Collator(tok, max_length=64).qa_batch(PAIRS)
    split = editor.split(model)
    state = split.prefix(batch)
    with torch.enable_grad(), capture_factors(model, editor.weights) as capture:
        loss = masked_nll(split.logits_at(split.suffix(state), batch.label_mask), batch.labels[batch.label_mask])
        factors = capture.factors(loss)
    expected = {}  # the grouped computation exactly as the editor did it before aggregation existed
    index = {w.name: i for i, w in enumerate(editor.weights)}
    for key, ws in editor.groups.items():
        us = [factors[w.name].u.float() for w in ws]
        deltas = [factors[w.name].delta.float() for w in ws]
        counts = [u.shape[0] for u in us]
        mode = torch.repeat_interleave(torch.arange(len(ws)), torch.tensor(counts))
        u_t, delta_t = editor.transforms[key](torch.cat(us), torch.cat(deltas), mode)
        for w, u_w, d_w in zip(ws, u_t.split(counts), delta_t.split(counts)):
            grad = (editor.edit_lrs[index[w.name]] * d_w).T @ u_w  # α on the δ̃ factor, then the product
            expected[w.name] = grad.T if w.transposed else grad
    result = editor.edit(model, batch)
    assert result.updates.keys() == expected.keys()
    for name, update in expected.items():
        assert torch.equal(result.updates[name], update), name
    assert torch.equal(result.pre_edit_loss, loss.detach())


def test_many_edit_call_through_the_api_rolls_back_bitwise(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(str(tiny_model_dir))
    _editor(model, tiny_model_dir, aggregation="least_squares", chunk_edits=16).save_pretrained(tmp_path / "ls")
    _editor(model, tiny_model_dir).save_pretrained(tmp_path / "sum")
    edits = [Edit(prompt, target) for prompt, target in _many_pairs(96)]
    before = _state(model)
    with load_editor(tmp_path / "ls", instruction=None).apply(model, edits, tok) as edited:
        least_squares = _state(model)
        assert not _same(before, model) and edited.active
    assert _same(before, model)
    with load_editor(tmp_path / "sum", instruction=None).apply(model, edits, tok):
        summed = _state(model)
    assert _same(before, model)
    assert any(not torch.equal(least_squares[k], summed[k]) for k in before), "the two aggregations gave the same weights"


def test_sequential_edits_with_a_key_memory_through_the_api(tiny_model_dir: Path, tmp_path: Path) -> None:
    from instructedit import KeyMemory

    model, tok = load_model(str(tiny_model_dir))
    _editor(model, tiny_model_dir, aggregation="least_squares").save_pretrained(tmp_path / "ls")
    _editor(model, tiny_model_dir).save_pretrained(tmp_path / "sum")
    editor = load_editor(tmp_path / "ls", instruction=None)
    edits = [Edit(prompt, target) for prompt, target in PAIRS[:3]]
    before = _state(model)
    with editor.apply_sequential(model, edits, tok):
        plain = _state(model)
    memory = KeyMemory()
    with editor.apply_sequential(model, edits, tok, memory=memory):
        remembered = _state(model)
    assert _same(before, model) and memory.calls == 3 and editor.editor.memory is None
    assert any(not torch.equal(plain[k], remembered[k]) for k in before), "the memory changed nothing"
    with pytest.raises(ValueError, match="needs an editor with editor.aggregation least_squares"):
        load_editor(tmp_path / "sum", instruction=None).apply_sequential(model, edits, tok, memory=KeyMemory())
    with pytest.raises(ValueError, match="needs a least-squares MEND editor; this one is FTEditor"):  # not a MEND editor at all
        load_editor(method="ft", options={"num_steps": 1}).apply_sequential(model, edits, tok, memory=KeyMemory())
    assert _same(before, model)


def test_save_load_round_trip_keeps_lambda_and_aggregation(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation="least_squares", chunk_edits=3)
    assert any(p is editor.lambdas for p in editor.network_parameters)  # meta-training's optimizer learns λ
    editor.save_pretrained(tmp_path / "ed")
    saved = json.loads((tmp_path / "ed" / CONFIG_NAME).read_text())
    assert saved["editor"]["aggregation"] == "least_squares" and saved["editor"]["chunk_edits"] == 3
    loaded = MENDEditor.from_pretrained(tmp_path / "ed").eval()
    assert loaded.config.aggregation == "least_squares"
    original, restored = editor.state_dict(), loaded.state_dict()
    assert original.keys() == restored.keys() and "lambdas" in restored
    assert all(torch.equal(original[k], restored[k]) for k in original)
    batch = Collator(tok, max_length=64).qa_batch(PAIRS)
    a, b = editor.edit(model, batch), loaded.edit(model, batch)
    assert all(torch.equal(a.updates[k], b.updates[k]) for k in a.updates)


def test_editor_folder_without_aggregation_loads_as_sum(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, _ = load_model(str(tiny_model_dir))
    _editor(model, tiny_model_dir).save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / CONFIG_NAME
    data = json.loads(path.read_text())
    for key in ("aggregation", "chunk_edits", "ls_keys"):  # written before aggregation existed
        del data["editor"][key]
    path.write_text(json.dumps(data))
    loaded = MENDEditor.from_pretrained(tmp_path / "old")
    assert loaded.config.aggregation == "sum" and loaded.config.ls_keys == "all" and not hasattr(loaded, "lambdas")


def test_config_validates_aggregation_and_n_edits() -> None:
    with pytest.raises(ValueError, match="editor.aggregation"):
        EditorConfig(aggregation="mean")
    with pytest.raises(ValueError, match="editor.chunk_edits"):
        EditorConfig(chunk_edits=0)
    with pytest.raises(ValueError, match="editor.ls_keys.*'prompt' is not one of"):
        EditorConfig(ls_keys="prompt")
    with pytest.raises(ValueError, match="training.n_edits"):
        TrainingConfig(n_edits=0)
    with pytest.raises(ValueError, match="training.n_edits.*batch_size"):
        TrainingConfig(n_edits=8, batch_size=2)
    assert TrainingConfig().n_edits == 1 and TrainingConfig(n_edits=8).edits_per_call == 8
    assert TrainingConfig(batch_size=3).edits_per_call == 3


# -- the meta-loss of N edits ----------------------------------------------------------------------------


def _meta_batch(tok: object, n: int):
    records = [EditRecord(task="counterfact", prompt=p, target_new=t, rephrase=(f"{p} indeed",),
                          locality=(QAItem(PAIRS[(i + 2) % len(PAIRS)][0], PAIRS[(i + 2) % len(PAIRS)][1]),), source=f"test#{i}")
               for i, (p, t) in enumerate(_many_pairs(n))]
    return Collator(tok, max_length=64).meta_batch(records, [None] * n)  # type: ignore[arg-type]


def _assert_same_steps(editor: MENDEditor, a: Callable[[], tuple], b: Callable[[], tuple]) -> None:
    """Two meta-losses ``a()`` and ``b()`` (each returning (loss, metrics)) give the same loss, metrics and gradients of
    the editor's network and step sizes."""
    results = []
    for objective in (a, b):
        editor.zero_grad()
        loss, metrics = objective()
        loss.backward()
        results.append((loss.detach(), metrics, [p.grad.clone() for p in editor.network_parameters + [editor.edit_lrs]]))
    (loss_a, metrics_a, grads_a), (loss_b, metrics_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-7)
    assert metrics_a.keys() == metrics_b.keys()
    for key in metrics_a:
        assert metrics_b[key] == pytest.approx(metrics_a[key], rel=1e-4, abs=1e-6), key
    for grad_a, grad_b in zip(grads_a, grads_b):
        torch.testing.assert_close(grad_b, grad_a, rtol=1e-4, atol=1e-6)


def test_many_edits_loss_equals_meta_loss_for_a_summing_editor(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir)
    split, batch = editor.split(model), _meta_batch(tok, 6)
    _assert_same_steps(editor, lambda: meta_loss(editor, split, batch, 0.1, 1.0, c_margin=0.5, c_answer=0.2),
                       lambda: many_edits_loss(editor, split, batch, 0.1, 1.0, c_margin=0.5, c_answer=0.2, chunk=4))


@pytest.mark.parametrize("aggregation", ["sum", "least_squares"])
def test_many_edits_loss_packed_equals_padded(tiny_model_dir: Path, aggregation: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Edit inputs and scored inputs packed into rows without padding: the padded rows' loss, metrics and gradients."""
    monkeypatch.setattr(objective, "PACKED_ROW_TOKENS", 40)  # several packed rows per input kind, and some rows alone
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation=aggregation, chunk_edits=8)
    split, batch = editor.split(model), _meta_batch(tok, 6)
    lengths = batch.loc.attention_mask.sum(1).tolist() + batch.edit_outer.attention_mask.sum(1).tolist()
    assert max(lengths) < 40 < sum(lengths)  # the cap packs several rows together, not all of them

    def step(packed: bool) -> Callable[[], tuple]:
        return lambda: many_edits_loss(editor, split, batch, 0.1, 1.0, c_margin=0.5, c_answer=0.2, chunk=4, packed=packed)

    _assert_same_steps(editor, step(False), step(True))
    assert objective.packing_matches(editor, split, batch, many=True)


@pytest.mark.parametrize("aggregation", ["sum", "least_squares"])
def test_a_packed_many_edit_step_passes_kept_instructions_once(tiny_model_dir: Path, aggregation: str) -> None:
    """A packed many-edit step's edit inputs and rephrases all begin with an instruction: once rows began with it twice,
    the lower blocks keep it (``StartCache``) and pass only each row's rest; the loss, metrics and gradients are the
    padded step's."""
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation=aggregation, chunk_edits=8).eval()
    instruction = "Task: counterfact. Description: replace a stored fact about an entity with another one. Input: "
    records = [EditRecord(task="counterfact", prompt=instruction + p, target_new=t, rephrase=(f"{instruction}{p} indeed",),
                          locality=(QAItem(PAIRS[(i + 2) % len(PAIRS)][0], PAIRS[(i + 2) % len(PAIRS)][1]),), source=f"test#{i}")
               for i, (p, t) in enumerate(_many_pairs(6))]
    batch = Collator(tok, max_length=96).meta_batch(records, [None] * 6)  # type: ignore[arg-type]
    split = editor.split(model)

    def step(packed: bool) -> Callable[[], tuple]:
        return lambda: many_edits_loss(editor, split, batch, 0.1, 1.0, c_margin=0.5, c_answer=0.2, chunk=4, packed=packed)

    step(True)()
    assert split.starts.starts and split.starts.checked and split.starts.usable
    kept = len(tok(instruction)["input_ids"]) - 2  # about the instruction's tokens (its last may merge with the prompt)
    assert any(kept <= len(ids) <= kept + 3 for ids in split.starts.starts)  # the instruction, not the prompts after it
    reused = split.starts.reused_tokens
    _assert_same_steps(editor, step(False), step(True))
    assert split.starts.reused_tokens >= reused + 12 * kept  # every edit input and rephrase passed after it


def test_many_edits_loss_backward_reruns_only_the_edited_blocks(tiny_model_dir: Path) -> None:
    """Backward recomputes each chunk's post-edit suffix (the checkpoint), never the frozen blocks below it."""
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation="least_squares", chunk_edits=3).train()
    split, batch = editor.split(model), _meta_batch(tok, 6)
    calls = {"frozen": 0, "edited": 0}
    hooks = [split.layers[0].register_forward_hook(lambda *_: calls.__setitem__("frozen", calls["frozen"] + 1)),
             split.layers[split.first_layer].register_forward_hook(lambda *_: calls.__setitem__("edited", calls["edited"] + 1))]
    try:
        loss, _ = many_edits_loss(editor, split, batch, 0.1, 1.0, chunk=2)
        forward = dict(calls)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    edit_chunks, chunks = len(batch.edit_inner.chunks(3)), sum(len(part.chunks(2)) for part in (batch.edit_outer, batch.loc))
    assert forward["frozen"] == edit_chunks + chunks  # the edit's passes, then one unedited pass per scored chunk
    assert calls["frozen"] == forward["frozen"]  # backward ran no frozen block
    assert calls["edited"] > forward["edited"]  # ... but recomputed the edited ones (the checkpoint kept their memory low)
    # inputs of one piece each keep their activations: backward recomputes nothing
    calls.update(frozen=0, edited=0)
    hooks = [split.layers[0].register_forward_hook(lambda *_: calls.__setitem__("frozen", calls["frozen"] + 1)),
             split.layers[split.first_layer].register_forward_hook(lambda *_: calls.__setitem__("edited", calls["edited"] + 1))]
    try:
        loss, _ = many_edits_loss(editor, split, batch, 0.1, 1.0, chunk=16)
        forward = dict(calls)
        loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    assert forward["frozen"] == edit_chunks + 2 and calls == forward

def test_many_edits_loss_trains_network_alpha_and_lambda(tiny_model_dir: Path) -> None:
    model, tok = load_model(str(tiny_model_dir))
    editor = _editor(model, tiny_model_dir, aggregation="least_squares", chunk_edits=3).train()
    loss, metrics = many_edits_loss(editor, editor.split(model), _meta_batch(tok, 8), 0.1, 1.0, chunk=3)
    loss.backward()
    assert torch.isfinite(loss) and 0 <= metrics["locality"] <= 1
    for name, p in [("lambdas", editor.lambdas), ("edit_lrs", editor.edit_lrs), *editor.transforms.named_parameters()]:
        if name.endswith(("scale", "shift")):  # only the modes (layers) that exist in the group get gradients
            continue
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name
    assert all(float(t.norm_u.count) > 0 for t in editor.transforms.values())  # training mode merges statistics


def test_data_parallel_training_needs_one_chunk_per_micro_batch(tiny_gpt2_dir: Path) -> None:
    """Each chunk is one statistics exchange round: processes with other row counts must not wait forever."""
    model, tok = load_model(str(tiny_gpt2_dir))
    editor = _editor(model, tiny_gpt2_dir, aggregation="least_squares", chunk_edits=2).train()
    for transform in editor.transforms.values():
        transform.exchange = lambda local: ([local], 0)
    with pytest.raises(ValueError, match="editor.chunk_edits >= the 5 edit inputs"):
        editor.edit(model, Collator(tok, max_length=64).qa_batch(PAIRS))


def test_training_with_n_edits_per_call_learns_lambda_and_saves_a_least_squares_editor(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = load_config(TINY, [f"model.name={tiny_gpt2_dir}", "editor.aggregation=least_squares", "editor.chunk_edits=2",
                                "training.n_edits=3", "training.max_steps=3", "training.val_every=3"])
    trainer = Trainer(config, tmp_path / "run", show_progress=False)
    lam = trainer.editor.lambdas.detach().clone()
    trainer.run()
    assert trainer.packing[True] is True  # the many-edit steps ran packed: the check on the first batch passed
    assert trainer.records_per_step == 3 * config.training.grad_accumulation  # n_edits records per micro-batch
    assert trainer.state.records_seen == 3 * trainer.records_per_step
    assert not torch.equal(lam, trainer.editor.lambdas.detach())  # λ is trained
    saved = MENDEditor.from_pretrained(tmp_path / "run" / "last")
    assert saved.config.aggregation == "least_squares"
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows if r["split"] == "train")


def test_key_memory_forgets_the_last_call_bit_for_bit() -> None:
    """An edit call that was not kept (``OutlierEdits``) leaves the memory as it was before it."""
    memory = KeyMemory(past_weight=1.0)
    first, second = {"w": torch.randn(4, 4)}, {"w": torch.randn(4, 4)}
    memory.remember(first)
    kept = memory.past["w"].clone()
    memory.remember(second)
    assert not torch.equal(memory.past["w"], kept) and memory.calls == 2
    memory.forget_last()
    assert torch.equal(memory.past["w"], kept) and memory.calls == 1
    with pytest.raises(RuntimeError, match="no edit call to forget"):
        memory.forget_last()
    memory.remember(second)
    assert memory.calls == 2


def test_an_edit_made_in_rounds_is_one_call_of_the_key_memory() -> None:
    """``KeyMemory.as_one_call``: the solves inside (an edit's rounds) see the past as the block found it and only the last
    one's keys are remembered, once, at the end (then forgettable); a block that raises remembers nothing; blocks do not nest."""
    memory = KeyMemory(past_weight=1.0)
    first, rounds = {"w": torch.randn(4, 4)}, [{"w": torch.randn(4, 4)} for _ in range(3)]
    memory.remember(first)
    with memory.as_one_call():
        for grams in rounds:
            memory.remember(grams)
            assert torch.equal(memory.past["w"], first["w"]) and memory.calls == 1  # each round holds only the earlier call
        with pytest.raises(RuntimeError, match="already inside one"), memory.as_one_call():
            pass
    assert torch.equal(memory.past["w"], first["w"] + rounds[-1]["w"]) and memory.calls == 2
    memory.forget_last()
    assert torch.equal(memory.past["w"], first["w"]) and memory.calls == 1
    with pytest.raises(ValueError, match="refused"), memory.as_one_call():
        memory.remember(rounds[0])
        raise ValueError("refused")
    assert torch.equal(memory.past["w"], first["w"]) and memory.calls == 1


def test_training_scores_locality_in_the_edits_own_frame_too(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """``training.locality_frames: [raw, wrapped]``: each record's locality question is scored as it is and in the
    record's instruction frame, and the locality KL is the token mean over both."""
    overrides = [f"model.name={tiny_gpt2_dir}", "editor.aggregation=least_squares", "training.n_edits=3", "training.max_steps=2",
                 "training.val_every=2", "training.locality_frames=[raw, wrapped]"]
    trainer = Trainer(load_config(TINY, overrides), tmp_path / "run", show_progress=False)
    records = [r for r in trainer.data.train if r.task != "convsent"][:3]
    instructions = trainer.data.instructions(records, trainer.config.data.instruction_seed)
    assert all(i is not None for i in instructions)
    batch = trainer._batch(records)
    assert batch.loc.n_rows == 6  # two rows per record: raw, then wrapped
    with torch.no_grad():
        trainer.editor.edit_lrs.fill_(10.0)  # an edit that moves the locality answers
        scored = {}
        for frames in (("raw",), ("wrapped",), ("raw", "wrapped")):
            one = trainer.data.collator.meta_batch(records, instructions, "rephrase", frames)
            _, metrics = many_edits_loss(trainer.editor, trainer.split, one, 0.1, 1.0, packed=True)
            scored[frames] = (metrics["l_loc"], int(one.loc.label_mask.sum()))
    (raw, n_raw), (wrapped, n_wrapped), (both, n_both) = scored.values()
    assert n_both == n_raw + n_wrapped and raw > 0 and wrapped > 0 and abs(wrapped - raw) > 1e-6
    assert both == pytest.approx((raw * n_raw + wrapped * n_wrapped) / n_both, rel=1e-4)
    trainer.run()  # and the training loop trains with it
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["split"] == "train"] and all(math.isfinite(r["loss"]) for r in rows if r["split"] == "train")
    assert MENDEditor.from_pretrained(tmp_path / "run" / "last").config.aggregation == "least_squares"
