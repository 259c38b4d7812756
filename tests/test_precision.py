"""Meta-training steps in bfloat16 products (``training.step_precision``): what runs in bfloat16, and what stays float32."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from instructedit.config import load_config
from instructedit.editors.registry import build_editor
from instructedit.models import precision
from instructedit.models.loading import load_model
from instructedit.models.precision import bf16_step, bf16_step_wanted
from instructedit.training import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


def test_the_setting_resolves_by_cpu_device_and_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: True)
    assert bf16_step_wanted("auto", cpu, torch.float32) and bf16_step_wanted("bfloat16", cpu, torch.float32)
    assert not bf16_step_wanted("float32", cpu, torch.float32)
    assert not bf16_step_wanted("auto", cuda, torch.float32) and bf16_step_wanted("bfloat16", cuda, torch.float32)
    assert not bf16_step_wanted("bfloat16", cpu, torch.bfloat16) and not bf16_step_wanted("auto", cpu, torch.float16)  # already half
    monkeypatch.setattr(precision, "cpu_has_bf16_units", lambda: False)
    assert not bf16_step_wanted("auto", cpu, torch.float32) and bf16_step_wanted("bfloat16", cpu, torch.float32)
    with pytest.raises(ValueError, match="training.step_precision must be one of auto, bfloat16, float32; got 'bf16'"):
        bf16_step_wanted("bf16", cpu, torch.float32)
    with pytest.raises(ValueError, match="config field 'training.step_precision': 'bf16' is not 'auto', 'bfloat16' or 'float32'"):
        load_config(TINY, ["training.step_precision=bf16"])


def test_cpuinfo_flags_say_which_cpus_have_bfloat16_units() -> None:
    assert precision.has_bf16_units("processor: 0\nflags\t\t: fpu sse2 avx512f amx_bf16 amx_tile\n")
    assert precision.has_bf16_units("flags : fpu avx512f avx512_bf16\n")
    assert not precision.has_bf16_units("flags : fpu avx2 avx512f\n") and not precision.has_bf16_units("")


def test_a_bf16_step_rounds_the_scored_rows_and_the_network_and_nothing_outside_it(tiny_model_dir: Path) -> None:
    model, _ = load_model(str(tiny_model_dir))
    editor = build_editor(model, load_config(TINY, [f"model.name={tiny_model_dir}"])).eval()
    split = editor.split(model)
    torch.manual_seed(0)
    rows = torch.randn(5, model.config.hidden_size, requires_grad=True)
    grad_out = torch.randn(5, model.get_output_embeddings().weight.shape[0])
    exact = split.project(rows)
    (exact_grad,) = torch.autograd.grad(exact, rows, grad_out)
    with bf16_step():
        half = split.project(rows)
        (half_grad,) = torch.autograd.grad(half, rows, grad_out)
    assert half.dtype == half_grad.dtype == torch.float32 and not torch.equal(half, exact)
    torch.testing.assert_close(half, exact, rtol=0, atol=0.02 * float(exact.detach().abs().max()))  # bfloat16's 8 bits, summed
    torch.testing.assert_close(half_grad, exact_grad, rtol=0, atol=0.02 * float(exact_grad.abs().max()))
    assert torch.equal(split.project(rows), exact)  # after the block: float32 again
    with bf16_step(False):
        assert torch.equal(split.project(rows), exact)

    key, transform = next(iter(editor.transforms.items()))
    for layer in transform.layers:  # away from the identity it starts as
        torch.nn.init.normal_(layer.A, std=0.1)
    n = 7
    u, delta, mode = torch.randn(n, transform.d_in), torch.randn(n, transform.d_out), torch.zeros(n, dtype=torch.long)
    exact_u, exact_delta = transform(u, delta, mode)
    with bf16_step():
        half_u, half_delta = transform(u, delta, mode)
    assert half_u.dtype == half_delta.dtype == torch.float32 and not torch.equal(half_u, exact_u)
    torch.testing.assert_close(half_u, exact_u, rtol=0, atol=0.02 * float(exact_u.detach().abs().max()))
    torch.testing.assert_close(half_delta, exact_delta, rtol=0, atol=0.02 * float(exact_delta.detach().abs().max()))
    assert all(p.dtype == torch.float32 for p in editor.parameters())  # the network's parameters stay float32
    assert torch.equal(transform(u, delta, mode)[0], exact_u)


def test_training_with_bf16_steps_follows_the_float32_run(tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    def losses(setting: str) -> dict[int, float]:
        config = load_config(TINY, [f"model.name={tiny_gpt2_dir}", "training.max_steps=4", f"training.step_precision={setting}"])
        with caplog.at_level(logging.INFO, logger="instructedit.training"):
            trainer = Trainer(config, tmp_path / setting, show_progress=False)
            trainer.run()
        assert trainer.bf16_step == (setting == "bfloat16")
        lines = [json.loads(x) for x in (tmp_path / setting / "metrics.jsonl").read_text().splitlines()]
        return {e["step"]: e["loss"] for e in lines if e["split"] == "train"}

    half = losses("bfloat16")
    assert "steps run the MEND network and the scored rows' vocabulary projections in bfloat16" in caplog.text
    caplog.clear()
    exact = losses("float32")
    assert "bfloat16" not in caplog.text
    assert sorted(half) == sorted(exact) == [1, 2, 3, 4]
    for step in half:  # rounding, not another objective: the same losses to bfloat16's precision
        assert half[step] == pytest.approx(exact[step], rel=0.05), step
    assert half[1] != exact[1]
