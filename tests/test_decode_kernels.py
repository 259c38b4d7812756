"""A decoding step's attention as two products, and linear layers through oneDNN: the numbers of the usual kernels."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import instructedit.evaluation.fast_linears as fl
from instructedit.evaluation.decode_attention import ALL_ATTENTION_FUNCTIONS, decode_attention, matmul_attention
from instructedit.evaluation.generation import greedy_generate
from instructedit.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("heads,kv", [(6, 2), (4, 4)])
@pytest.mark.parametrize("bool_mask", [True, False])
def test_matmul_attention_equals_the_fused_kernel_on_a_strided_left_padded_cache(heads: int, kv: int, bool_mask: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    b, length, d = 5, 11, 16
    buffer = torch.randn(b + 3, kv, length + 7, d, generator=gen)  # a cache with room: keys are a strided view
    key, value = buffer[:b, :, :length], torch.randn(b + 3, kv, length + 7, d, generator=gen)[:b, :, :length]
    query = torch.randn(b, 1, heads, d, generator=gen).transpose(1, 2)  # (batch, heads, 1, d) as a transposed view
    attends = torch.ones(b, 1, 1, length, dtype=torch.bool)
    for row in range(b):
        attends[row, ..., : row] = False  # left padding of `row` positions
    mask = attends if bool_mask else torch.zeros(b, 1, 1, length).masked_fill(~attends, float("-inf"))
    out = matmul_attention(query, key, value, mask, None)
    rep = heads // kv
    fused = torch.nn.functional.scaled_dot_product_attention(
        query, key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1), attn_mask=mask, scale=1 / math.sqrt(d))
    assert out.shape == (b, 1, heads, d)
    torch.testing.assert_close(out, fused.transpose(1, 2), atol=1e-5, rtol=1e-5)


def test_decode_attention_routes_one_query_calls_and_restores_the_registry(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    name = model.config._attn_implementation
    before = ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else None
    prompts = ["The capital of France is", "I really like", "When was the inception of"]
    usual = greedy_generate(model, tokenizer, prompts, [7, 9, 5], batch_size=3)
    seen = []
    with decode_attention(model):
        routed = ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else None
        if name == "sdpa":
            assert routed is not before and routed.routes is before
            with decode_attention(model):  # nested: routed once
                assert ALL_ATTENTION_FUNCTIONS[name] is routed
            q, k = torch.randn(2, 4, 1, 8), torch.randn(2, 2, 5, 8)
            seen.append(routed(model, q, k, k, None)[0].shape)
    assert (ALL_ATTENTION_FUNCTIONS[name] if name in ALL_ATTENTION_FUNCTIONS else None) is before
    if name == "sdpa":
        assert seen == [(2, 1, 4, 8)]
    assert greedy_generate(model, tokenizer, prompts, [7, 9, 5], batch_size=3) == usual  # greedy_loop routes itself


def test_onednn_linears_give_blas_numbers_and_only_without_gradients(tiny_model_dir: Path) -> None:
    if not fl.onednn_available():
        pytest.skip("this PyTorch has no oneDNN linear")  # not counted: the other tests of this file still run
    model, tokenizer = load_model(str(tiny_model_dir))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    ids = tokenizer(["The capital of France is", "I really like it"], return_tensors="pt", padding=True)
    with torch.no_grad():
        usual = model(**ids).logits
    asked = []

    def always(rows: int, weights: list) -> bool:
        asked.append(rows)
        return True

    with fl.fast_linears(model, decide=always):
        assert all("forward" in m.__dict__ for m in linears)
        with fl.fast_linears(model, decide=always):  # nested: nothing routed twice
            pass
        assert all("forward" in m.__dict__ for m in linears)
        with torch.no_grad():
            routed = model(**ids).logits
        count = len(asked)
        with torch.enable_grad():
            model(**ids)  # with gradients: BLAS
        assert len(asked) == count
    assert not any("forward" in m.__dict__ for m in linears)
    if linears:
        assert count > 0
    torch.testing.assert_close(routed, usual, atol=1e-4, rtol=1e-4)


def test_onednn_is_timed_once_per_shape_and_row_range(monkeypatch: pytest.MonkeyPatch) -> None:
    if not fl.onednn_available():
        pytest.skip("this PyTorch has no oneDNN linear")
    monkeypatch.setattr(fl, "_FASTER", {})
    timed = []
    monkeypatch.setattr(fl, "_best_of", lambda product, repeats=3: timed.append(product) or (1.0 if len(timed) % 2 else 0.5))
    weights = [torch.randn(64, 32) for _ in range(3)]
    assert fl.onednn_faster(3, weights) and fl.onednn_faster(8, weights)  # one timing for up to FEW_ROWS rows
    assert len(timed) == 2
    assert fl.onednn_faster(500, weights) and len(timed) == 4  # more rows: timed again, once
    monkeypatch.setattr(fl, "_best_of", lambda product, repeats=3: 1.0)  # a tie keeps BLAS
    monkeypatch.setattr(fl, "_FASTER", {})
    assert not fl.onednn_faster(3, weights)
    assert fl.timed_rows(1) == fl.FEW_ROWS and fl.timed_rows(fl.FEW_ROWS + 1) == fl.MANY_ROWS


def test_the_switch_turns_both_routings_off_and_reads_only_0_or_1(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _ = load_model(str(tiny_llama_dir))
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    name = model.config._attn_implementation
    monkeypatch.setenv(fl.FAST_KERNELS_ENV, "0")
    with fl.fast_linears(model, decide=lambda rows, weights: True), decode_attention(model):
        assert not any("forward" in m.__dict__ for m in linears)
        assert getattr(ALL_ATTENTION_FUNCTIONS[name], "routes", None) is None
    monkeypatch.setenv(fl.FAST_KERNELS_ENV, "yes")
    with pytest.raises(ValueError, match="INSTRUCTEDIT_FAST_KERNELS must be 0 or 1"):
        fl.fast_kernels_wanted()
    monkeypatch.setenv(fl.FAST_KERNELS_ENV, "1")
    assert fl.fast_kernels_wanted()


def test_a_linear_subclass_with_its_own_forward_is_not_routed() -> None:
    if not fl.onednn_available():
        pytest.skip("this PyTorch has no oneDNN linear")
    class Scaled(torch.nn.Linear):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    model = torch.nn.Sequential(torch.nn.Linear(8, 8), Scaled(8, 8))
    x = torch.randn(3, 8)
    with torch.no_grad():
        usual = model(x)
        with fl.fast_linears(model, decide=lambda rows, weights: True):
            assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
            routed = model(x)
    torch.testing.assert_close(routed, usual, atol=1e-5, rtol=1e-5)
