"""The bfloat16 vocabulary projection of greedy decoding: the argmax of float32 logits, on ties, near-ties and NaNs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from instructedit.evaluation.generation import DecodeMemory, greedy_generate, projected_into
from instructedit.evaluation.greedy_head import TOP, HalfHead, bf16_head_wanted, greedy_logits, has_bf16_units
from instructedit.losses import argmax_ids
from instructedit.models.loading import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def _head(vocab: int = 3000, d: int = 96, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(vocab, d, generator=gen) * torch.rand(vocab, 1, generator=gen)  # rows of unequal norms


def test_greedy_logits_give_the_float32_argmax_of_random_rows_in_several_chunks() -> None:
    weight = _head()
    x = torch.randn(150, weight.shape[1], generator=torch.Generator().manual_seed(1)) * 4  # 150 rows: three chunks
    got = greedy_logits(x, HalfHead.of(weight))
    exact = x @ weight.t()
    assert torch.equal(argmax_ids(got), argmax_ids(exact))
    # the candidates' entries are float32 logits: at the argmax, the exact value
    assert torch.allclose(got.gather(1, argmax_ids(got)[:, None]), exact.max(1, keepdim=True).values, rtol=1e-5, atol=1e-5)


def test_near_ties_below_bfloat16_resolution_and_exact_ties_are_decided_as_in_float32() -> None:
    weight = _head(vocab=500, d=64)
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(2))
    winner = argmax_ids(x @ weight.t())
    # per row, a rival token whose logit is 1e-3 above or below the winner's: bfloat16 logits cannot tell them apart
    rows = []
    for r in range(40):
        w = weight.clone()
        w[7] = w[winner[r]] + (1e-3 if r % 2 else -1e-3) * x[r] / x[r].norm() ** 2
        w[11] = w[winner[r]]  # an exact tie: the first index wins, as argmax_ids says
        rows.append((x[r : r + 1], w))
    for xr, w in rows:
        assert torch.equal(argmax_ids(greedy_logits(xr, HalfHead.of(w))), argmax_ids(xr @ w.t()))
    assert {int(argmax_ids(xr @ w.t())) for xr, w in rows} <= {7, 11} | {int(t) for t in winner}


def test_rows_with_too_many_candidates_or_not_finite_are_projected_whole() -> None:
    weight = _head(vocab=400, d=32)
    weight[100 : 100 + 2 * TOP] = weight[5] * 3  # more equal best tokens than TOP: the row is projected whole
    x = torch.stack([weight[5] / weight[5].norm(), torch.full((32,), float("nan")), torch.randn(32)])
    got = greedy_logits(x, HalfHead.of(weight))
    exact = x @ weight.t()
    assert int(argmax_ids(exact)[0]) == 100 and torch.equal(argmax_ids(got), argmax_ids(exact))
    assert torch.allclose(got[0], exact[0], rtol=1e-5, atol=1e-5) and got[1].isnan().all()  # whole rows: every entry a logit


def test_the_switch_reads_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTEDIT_BF16_HEAD", "1")
    assert bf16_head_wanted()
    monkeypatch.setenv("INSTRUCTEDIT_BF16_HEAD", "0")
    assert not bf16_head_wanted()
    monkeypatch.setenv("INSTRUCTEDIT_BF16_HEAD", "yes")
    with pytest.raises(ValueError, match="INSTRUCTEDIT_BF16_HEAD must be 0 or 1"):
        bf16_head_wanted()


def test_bfloat16_units_are_read_from_the_cpu_flags() -> None:
    intel = "processor\t: 0\nflags\t\t: fpu avx2 avx512f amx_bf16 amx_tile\n"
    amd = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
    older = "processor\t: 0\nflags\t\t: fpu avx2 avx512f avx512_vnni\nbugs\t\t: avx512_bf16_is_not_a_flag_here\n"
    assert has_bf16_units(intel) and has_bf16_units(amd)
    assert not has_bf16_units(older) and not has_bf16_units("")


def test_greedy_answers_are_the_same_with_the_bfloat16_head_and_the_copy_follows_the_weight(
        tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = ["The capital of France is", "John Lennon performs on the", "I really like", "When was the inception of"]
    budgets = [6, 9, 12, 4]
    answers = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("INSTRUCTEDIT_BF16_HEAD", flag)
        answers[flag] = greedy_generate(model, tokenizer, prompts, budgets, batch_size=2)
    assert answers["0"] == answers["1"] and any(answers["0"])
    head = model.get_output_embeddings()
    memory = DecodeMemory.for_model(model)
    x = torch.randn(4, head.in_features, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), projected_into(model, None, 4, greedy=True):
        before = argmax_ids(head(x))
    assert torch.equal(before, argmax_ids(x @ head.weight.detach().t()))
    copy = memory.half_head(head.weight)
    assert memory.half_head(head.weight) is copy  # kept while the weight is unchanged
    with torch.no_grad():
        head.weight.mul_(-1)  # an in-place write: the bfloat16 copy is made again
        with projected_into(model, None, 4, greedy=True):
            after = argmax_ids(head(x))
    assert memory.half_head(head.weight) is not copy
    assert torch.equal(after, argmax_ids(x @ head.weight.detach().t())) and not torch.equal(after, before)
