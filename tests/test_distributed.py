"""Data parallelism, mixed precision and activation checkpointing of meta-training.

The 2-process run is real: ``accelerate launch`` starts two CPU processes (gloo) that train the tiny
config, and their losses, validations and final editor must equal one process running the same
global batch. (``accelerate launch --cpu --num_processes 2`` would start a single process unless an
MPI hostfile is configured, so the test launches through ``--multi_gpu`` with no GPU visible.)
"""

from __future__ import annotations

import copy
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from instructedit.config import load_config
from instructedit.distributed import Distributed
from instructedit.editors.mend import GradientTransform, MENDEditor, RunningNorm
from instructedit.models.split import CheckpointedSplitModel
from instructedit.objective import meta_loss
from instructedit.training import Trainer

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
COMPARED = ("loss", "l_edit", "l_loc", "pre_edit_loss", "edit_acc", "edit_acc_pre", "locality")


def _config(model_dir: Path, *overrides: str):
    return load_config(TINY, [f"model.name={model_dir}", *overrides])


def _entries(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(processes: int, output: Path, overrides: list[str], home: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "CUDA_VISIBLE_DEVICES": "",  # CPU processes even where a GPU exists
        "ACCELERATE_USE_CPU": "true",
        "OMP_NUM_THREADS": "1",
        "HF_HOME": str(home),  # no user accelerate config can change the launch
    }
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
        "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(_free_port()),
        "-m", "instructedit.cli", "train", "--config", str(TINY), "--output", str(output), "--no-progress",
    ]
    for item in overrides:
        command += ["--set", item]
    return subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True, timeout=600)


def test_two_processes_match_one_process_at_equal_global_batch(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    # max_length 120 makes some batches too long: the statistics exchange of a skipped round is covered too
    common = [f"model.name={tiny_gpt2_dir}", "model.max_length=120", "training.max_steps=4"]
    one = Trainer(load_config(TINY, [*common, "training.grad_accumulation=4"]), tmp_path / "one", show_progress=False)
    summary_one = one.run()
    done = _launch(2, tmp_path / "two", [*common, "training.grad_accumulation=2"], tmp_path / "hf")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]

    a, b = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]  # one writer, same schedule
    assert sum(e["split"] == "train" for e in b) == 4
    for x, y in zip(a, b):
        for key in COMPARED:
            # float32 rounding only: the gradients are summed in another order (all-reduce vs accumulation) and Adam's
            # normalized steps amplify it (2e-5 seen on l_loc); a lost micro-batch or unmerged statistics shows at >= 1e-2
            assert math.isclose(x[key], y[key], rel_tol=1e-4, abs_tol=1e-7), (x["step"], x["split"], key, x[key], y[key])
        if x["split"] == "train":
            assert math.isclose(x["grad_norm"], y["grad_norm"], rel_tol=1e-4), (x["step"], x["grad_norm"], y["grad_norm"])
        else:
            assert x["n"] == y["n"]
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary_two["processes"] == 2 and summary_two["records_per_step"] == summary_one["records_per_step"] == 4
    assert summary_two["skipped_too_long"] == summary_one["skipped_too_long"] > 0
    # the network, α and the normalization statistics all ended up the same
    ea, eb = MENDEditor.from_pretrained(tmp_path / "one" / "last"), MENDEditor.from_pretrained(tmp_path / "two" / "last")
    for key, value in ea.state_dict().items():
        assert torch.allclose(value, eb.state_dict()[key], rtol=1e-5, atol=1e-6), key


def test_two_processes_train_with_several_records_per_micro_batch(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """batch_size 2 (one edit per record, the MEND network called per record): every process exchanges statistics per
    record, a process whose micro-batch is too long as well, so the run completes with the one-process schedule."""
    common = [f"model.name={tiny_gpt2_dir}", "model.max_length=120", "training.max_steps=4", "training.batch_size=2"]
    one = Trainer(load_config(TINY, [*common, "training.grad_accumulation=2"]), tmp_path / "one", show_progress=False)
    summary_one = one.run()
    done = _launch(2, tmp_path / "two", [*common, "training.grad_accumulation=1"], tmp_path / "hf")
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    a, b = _entries(tmp_path / "one"), _entries(tmp_path / "two")
    assert [(e["step"], e["split"]) for e in a] == [(e["step"], e["split"]) for e in b]
    summary_two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary_two["records_per_step"] == summary_one["records_per_step"] == 4
    assert summary_two["skipped_too_long"] == summary_one["skipped_too_long"] > 0
    # the same records, each with its own edit: the first step's loss agrees closely (the statistics then merge in
    # rank order per record, a different order than one process's, so later steps may drift in the last digits)
    assert math.isclose(a[1]["loss"], b[1]["loss"], rel_tol=1e-2), (a[1], b[1])


def test_rank_ordered_statistics_equal_one_process_merging_in_sequence() -> None:
    """The exchange contract: rank r normalizes with contributions 0..r, and every rank ends with all of them."""
    torch.manual_seed(0)
    reference = GradientTransform(d_out=5, d_in=3, rank=4, n_hidden=1, n_modes=1, eps=1e-7).train()
    ranks = [copy.deepcopy(reference) for _ in range(3)]
    micro = [(torch.randn(n, 3), torch.randn(n, 5)) for n in (4, 0, 6)]  # a process without tokens included
    expected = [reference(u, d, torch.zeros(len(u), dtype=torch.long)) for u, d in micro]
    everyone = [(RunningNorm.moments(u), RunningNorm.moments(d)) for u, d in micro]
    for r, (transform, (u, d)) in enumerate(zip(ranks, micro)):
        transform.exchange = lambda local, r=r: (everyone, r)
        out = transform(u, d, torch.zeros(len(u), dtype=torch.long))
        assert all(torch.equal(x, y) for x, y in zip(out, expected[r])), r
        for name, buffer in reference.state_dict().items():
            assert torch.equal(transform.state_dict()[name], buffer), (r, name)


def test_single_process_needs_no_launcher() -> None:
    dist = Distributed.from_environment() if "WORLD_SIZE" not in os.environ else Distributed()
    assert (dist.rank, dist.world_size, dist.is_main, dist.enabled) == (0, 1, True, False)
    assert dist.gather({"x": 1}) == [{"x": 1}]
    p = torch.nn.Parameter(torch.ones(2))
    p.grad = torch.full((2,), 3.0)
    dist.average_gradients([p])
    assert torch.equal(p.grad, torch.full((2,), 3.0))


def test_close_leaves_the_process_group(tmp_path: Path) -> None:
    import torch.distributed as torch_dist

    Distributed().close()  # one process: nothing to leave
    torch_dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        Distributed(rank=0, world_size=1).close()  # not a data-parallel run: the caller's group stays
        assert torch_dist.is_initialized()
        Distributed(rank=0, world_size=2).close()  # the end of a run under a launcher
        assert not torch_dist.is_initialized()
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_base_trains_with_a_float32_editor(tiny_llama_dir: Path, tmp_path: Path, dtype: str) -> None:
    config = _config(tiny_llama_dir, f"model.dtype={dtype}", "training.max_steps=2", "training.val_size=1", "training.val_every=2")
    trainer = Trainer(config, tmp_path, show_progress=False)
    assert next(trainer.model.parameters()).dtype == getattr(torch, dtype)
    trainer.run()
    losses = [e["loss"] for e in _entries(tmp_path) if e["split"] == "train"]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    for name, tensor in trainer.editor.state_dict().items():
        assert tensor.dtype == (torch.float64 if name.endswith("count") else torch.float32), name
        assert torch.isfinite(tensor).all(), name
    if dtype == "float16":
        assert trainer.scaler.get_scale() > 1.0  # the meta-loss is scaled so fp16 gradients do not underflow
    batch = trainer._batch([trainer.data.train[0]])
    result = trainer.editor.edit(trainer.split, batch.edit_inner)
    for w in trainer.editor.weights:
        assert result.updates[w.name].dtype == torch.float32
        assert result.new_params[w.name].dtype == getattr(torch, dtype)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_llama_dir: Path, tmp_path: Path) -> None:
    trainer = Trainer(_config(tiny_llama_dir), tmp_path, show_progress=False)
    checkpointed = CheckpointedSplitModel(trainer.model, trainer.split.spec, trainer.split.first_layer)
    batch = trainer._batch([r for r in trainer.data.train if r.task == "convsent"][:1])
    start = copy.deepcopy(trainer.editor.state_dict())  # statistics move with every training-mode edit
    results = []
    for split in (trainer.split, checkpointed):
        trainer.editor.load_state_dict(start)
        trainer.editor.zero_grad(set_to_none=True)
        loss, _ = meta_loss(trainer.editor, split, batch, 0.1, 1.0)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in trainer.editor.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-6)
    for name, grad in grads_a.items():
        assert torch.allclose(grad, grads_b[name], rtol=1e-5, atol=1e-8), name


def test_device_map_is_passed_through_and_placement_checked(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = _config(tiny_llama_dir, "model.device_map=cpu", "training.max_steps=1", "training.val_size=1")
    trainer = Trainer(config, tmp_path, show_progress=False)
    assert trainer.device.type == "cpu" and trainer.editor.edit_lrs.device.type == "cpu"
    assert math.isfinite(trainer.train_step()["loss"])


def test_bad_device_map_names_the_field() -> None:
    with pytest.raises(ValueError, match=r"config field 'model.device_map': 'gpu' is not one of"):
        load_config(None, ["model.device_map=gpu"])
    assert load_config(None, ["model.device_map=auto"]).model.device_map == "auto"
    assert load_config(None, ["model.device_map={model.embed_tokens: 0, lm_head: 1}"]).model.device_map == {"model.embed_tokens": 0, "lm_head": 1}
