"""Memory estimate: exact parameter counts, presets offline, the docs table, and a check against measured RSS."""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from instructedit.cli import main
from instructedit.commands.memory import add_memory_parser
from instructedit.config import load_config
from instructedit.editors.registry import build_editor
from instructedit.memory import GIB, KNOWN_ARCHITECTURES, estimate_memory, markdown_table
from instructedit.models.loading import load_model

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "tiny.yaml"
PRESETS = sorted((REPO / "configs" / "presets").glob("*.yaml"))
# parameter counts as published on the models' cards / in their papers
PUBLISHED = {
    "openai-community/gpt2-xl": 1.558e9,
    "EleutherAI/gpt-j-6b": 6.05e9,
    "meta-llama/Llama-2-7b-hf": 6.74e9,
    "meta-llama/Meta-Llama-3-8B": 8.03e9,
    "Qwen/Qwen2.5-7B": 7.61e9,
    "mistralai/Mistral-7B-v0.1": 7.24e9,
}


def test_counts_match_the_real_model_and_editor(tiny_model_dir: Path) -> None:
    config = load_config(TINY, [f"model.name={tiny_model_dir}"])
    model, _ = load_model(tiny_model_dir)
    editor = build_editor(model, config)
    estimate = estimate_memory(config, model, "cpu")
    assert estimate.base_params == sum(p.numel() for p in model.parameters())
    assert estimate.trainable_params == sum(p.numel() for p in editor.parameters())
    assert estimate.edited_weights == len(editor.weights)
    assert estimate.mend == 4 * estimate.trainable_params + sum(b.numel() * b.element_size() for b in editor.buffers())
    assert estimate.adam == 2 * estimate.gradients + 8 * len(editor.weights)
    # without a loaded model the architecture comes from the folder's config.json, on the meta device
    assert estimate_memory(config, device="cpu") == estimate


def test_half_precision_halves_the_base_but_not_the_editor(tiny_llama_dir: Path) -> None:
    full = estimate_memory(load_config(TINY, [f"model.name={tiny_llama_dir}"]))
    half = estimate_memory(load_config(TINY, [f"model.name={tiny_llama_dir}", "model.dtype=bfloat16"]))
    assert half.base * 2 == full.base
    assert (half.mend, half.gradients, half.adam) == (full.mend, full.gradients, full.adam)


def test_activation_checkpointing_lowers_the_activation_term() -> None:
    plain = estimate_memory(load_config(PRESETS[0]))
    checkpointed = estimate_memory(load_config(PRESETS[0], ["training.activation_checkpointing=true"]))
    assert checkpointed.activations < plain.activations and checkpointed.peak < plain.peak


def test_a_summing_editors_records_share_a_pass_only_while_their_rows_are_short() -> None:
    """objective.one_pass: records run together while their rows hold at most ONE_PASS_TOKENS tokens, else one after
    another, so at full length two ConvSent records hold what one does; short rows, or a least-squares editor's
    records (not run so), hold twice what one does."""
    from instructedit.objective import ONE_PASS_TOKENS

    recipe = REPO / "configs" / "smollm2-135m" / "instructedit.yaml"  # summing, ConvSent among its tasks

    def activations(*overrides: str) -> int:
        return estimate_memory(load_config(recipe, ["training.grad_accumulation=1", *overrides])).activations

    long = "model.max_length=160"  # a ConvSent record's 5 rows: 800 tokens at full length
    short = f"model.max_length={ONE_PASS_TOKENS // 10}"  # two records' 10 rows: ONE_PASS_TOKENS tokens
    one, two = activations(long, "training.batch_size=1"), activations(long, "training.batch_size=2")
    assert one < two < 1.05 * one  # one record at a time (the second's hand-over states aside)
    assert activations(short, "training.batch_size=2") == pytest.approx(2 * activations(short, "training.batch_size=1"), rel=1e-6)
    least = ("editor.aggregation=least_squares", long)
    assert activations(*least, "training.batch_size=2") == pytest.approx(2 * activations(*least, "training.batch_size=1"), rel=1e-6)


def test_a_many_edit_step_is_estimated_from_its_n_edits_records() -> None:
    """objective.many_edits_loss: the edit pass over a chunk of edit inputs, one packed piece of the scored inputs and
    every scored row's hand-over states, the network on every edit's keys. More edits per step hold more; answer keys
    hold less network; balanced ConvSent is at most half of a step's records, unbalanced it may be all of them."""
    recipe = REPO / "configs" / "smollm2-135m" / "least-squares.yaml"  # least squares, answer keys, 8 edits, ConvSent

    def estimate(*overrides: str):
        return estimate_memory(load_config(recipe, list(overrides)), device="cpu")

    one, eight, thirty_two = (estimate(f"training.n_edits={n}") for n in (1, 8, 32))
    assert one.peak < eight.peak < thirty_two.peak
    assert one.activations < eight.activations < thirty_two.activations and eight.edit_tensors < thirty_two.edit_tensors
    # the edit pass covers one chunk of edit inputs at a time; the network's activations cover every edit's keys
    chunked = estimate("training.n_edits=32", "editor.chunk_edits=8")
    assert chunked.activations < thirty_two.activations and chunked.edit_tensors == thirty_two.edit_tensors
    assert estimate("training.n_edits=8", "editor.ls_keys=all").edit_tensors > eight.edit_tensors
    for unbalanced in (estimate("training.n_edits=8", "data.balance=false"), estimate("training.n_edits=8", "data.oversample={convsent: 2}")):
        assert unbalanced.activations > eight.activations and unbalanced.edit_tensors > eight.edit_tensors
    # without ConvSent (one edit input, two scored rows per record) a step holds less
    assert estimate("training.n_edits=8", "data.tasks=[counterfact,wikirecent]").peak < eight.peak


@pytest.mark.parametrize("path", PRESETS, ids=[p.stem for p in PRESETS])
def test_presets_are_estimated_offline_and_their_comment_is_current(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = load_config(path)
    assert config.model.name in KNOWN_ARCHITECTURES
    estimate = estimate_memory(config)
    assert estimate.base_params == pytest.approx(PUBLISHED[config.model.name], rel=0.01)
    assert estimate.edited_weights in (6, 9)  # last 3 blocks: 2 (GPT-2, GPT-J) or 3 (gated) MLP matrices
    stated = re.search(r"peak ≈ ([0-9.]+) GiB per GPU", path.read_text())
    assert stated, f"{path}: the header comment should state the memory estimate"
    assert float(stated.group(1)) == round(estimate.peak / GIB, 1), f"{path}: update the comment to {estimate.peak / GIB:.1f} GiB"


def test_docs_table_is_current() -> None:
    docs = (REPO / "docs" / "distributed.md").read_text()
    assert markdown_table(PRESETS) in docs, "regenerate with: .venv/bin/python benchmarks/bench_memory.py --table"


def test_memory_command(capsys: pytest.CaptureFixture) -> None:
    assert main(["memory", "--config", str(REPO / "configs" / "presets" / "llama-2-7b.yaml"), "--set", "training.batch_size=2"]) == 0
    assert "peak (per process)" in capsys.readouterr().out
    parser = argparse.ArgumentParser()
    add_memory_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["memory", "--config", str(PRESETS[0]), "--json"])
    assert args.func(args) == 0
    assert json.loads(capsys.readouterr().out)["peak"] > 0


@pytest.mark.slow
@pytest.mark.parametrize("config", [None, "configs/smollm2-135m/least-squares.yaml"], ids=["default", "many-edit-recipe"])
def test_estimate_within_30_percent_of_measured_peak_rss_on_the_default_model(config: str | None) -> None:
    """The default config, and the recommended recipe (8 edits solved together per step; at 1 / 8 / 16 / 32 edits,
    estimated 1.47 / 1.87 / 2.54 / 3.87 GiB against 1.43 / 1.92 / 2.17 / 3.08 measured: benchmarks/results/memory-many-edit/)."""
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "bench_memory.py"), "--measure", "--steps", "3", *(["--config", config] if config else [])],
        capture_output=True, text=True, timeout=900, cwd=REPO,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    ratio = result["estimate_gib"] / result["peak_rss_gib"]
    assert 0.7 <= ratio <= 1.3, result
