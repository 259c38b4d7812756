"""Analysis studies: separation scores, the update sketch, gradient maps, scaling, seen/unseen descriptions, balance."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from instructedit.experiments import reuse, scaling
from instructedit.commands.analyze import add_analyze_parser
from instructedit.commands.instructions import add_instructions_parser
from instructedit.analysis.gradients import (
    GradientSettings, MatrixSketch, editor_spec, embed_2d, pca_reduce, recorded_instructions, resolve_weight, separation_scores,
)
from instructedit.analysis.instructions_study import seen_unseen_summary, write_description_outputs
from instructedit.experiments.balance import BalanceConfig, load_balance_config, run_balance
from instructedit.config import load_config, save_config
from instructedit.editors.registry import build_editor
from instructedit.evaluation import cache
from instructedit.evaluation.report import EvalSettings
from instructedit.models.loading import load_model
from instructedit.records import EditRecord
from instructedit.tasks.prepare import oversample

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="instructedit")
    sub = parser.add_subparsers(dest="command")
    add_analyze_parser(sub)
    add_instructions_parser(sub)
    return parser.parse_args(argv)


def save_run(model_dir: Path, run: Path, instructions: bool, edit_lr: float = 1.0) -> Path:
    """A tiny untrained editor saved as RUN/best with the run's config.yaml beside it, as the Trainer leaves it."""
    config = load_config(TINY, [f"model.name={model_dir}", f"data.instructions={str(instructions).lower()}", f"editor.init_edit_lr={edit_lr}"])
    model, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    run.mkdir(parents=True)
    save_config(config, run / "config.yaml")
    return build_editor(model, config).save_pretrained(run / "best")


def clusters(spread: float, n: int = 30, dim: int = 20, seed: int = 0) -> tuple[np.ndarray, list[str]]:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(3, dim)) * 5
    points = np.concatenate([c + spread * rng.normal(size=(n, dim)) for c in centers])
    return points, [t for t in ("a", "b", "c") for _ in range(n)]


# --- maths on synthetic data ------------------------------------------------------------------------------


def test_separated_clusters_score_higher_than_overlapping_ones() -> None:
    scores = {}
    for spread in (0.3, 3.0, 30.0):
        points, labels = clusters(spread)
        reduced, variance = pca_reduce(points, 10)
        scores[spread] = separation_scores(reduced, labels)
        assert reduced.shape == (90, 10) and variance == sorted(variance, reverse=True)
    sil = [scores[s]["silhouette"] for s in (0.3, 3.0, 30.0)]
    ratio = [scores[s]["between_within_ratio"] for s in (0.3, 3.0, 30.0)]
    assert sil[0] > sil[1] > sil[2] and sil[0] > 0.8 and abs(sil[2]) < 0.1
    assert ratio[0] > ratio[1] > ratio[2] and ratio[0] > 5 and ratio[2] == pytest.approx(1.0, abs=0.1)
    assert set(scores[0.3]["per_task"]) == {"a", "b", "c"} and scores[0.3]["per_task"]["a"]["n"] == 30


def test_embeddings_are_2d_and_deterministic() -> None:
    points, _ = clusters(1.0, n=10)
    reduced, _ = pca_reduce(points, 5)
    for method in ("pca", "tsne"):
        a, b = embed_2d(reduced, method, seed=3), embed_2d(reduced, method, seed=3)
        assert a.shape == (30, 2) and np.allclose(a, b)
    with pytest.raises(ValueError, match="valid embeddings"):
        embed_2d(reduced, "umap")


def test_matrix_sketch_is_seeded_and_keeps_norms_on_average() -> None:
    gen = torch.Generator().manual_seed(0)
    matrices = [torch.randn(96, 160, generator=gen) for _ in range(20)]
    sketch = MatrixSketch((96, 160), dim=256, seed=1)
    assert sketch.dim == sketch.k_out * sketch.k_in <= 256 and sketch(matrices[0]).shape == (sketch.dim,)
    assert np.allclose(sketch(matrices[0]), MatrixSketch((96, 160), 256, seed=1)(matrices[0]))
    assert not np.allclose(sketch(matrices[0]), MatrixSketch((96, 160), 256, seed=2)(matrices[0]))
    ratios = [np.linalg.norm(sketch(m)) ** 2 / float(m.norm()) ** 2 for m in matrices]
    assert np.mean(ratios) == pytest.approx(1.0, rel=0.15)
    small = MatrixSketch((8, 10), dim=2048)
    assert small.identity and np.allclose(small(matrices[0][:8, :10]), matrices[0][:8, :10].reshape(-1).numpy())
    with pytest.raises(ValueError, match="shape"):
        sketch(torch.zeros(3, 3))


# --- editor folders -------------------------------------------------------------------------------------


def test_instruction_setting_comes_from_the_run_config_and_can_be_overridden(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    best = save_run(tiny_gpt2_dir, tmp_path / "multitask", instructions=False)
    assert recorded_instructions(best) == (False, "../config.yaml")
    spec = editor_spec(best)
    assert spec.label == "multitask" and spec.instructions is False and spec.model_name == str(tiny_gpt2_dir)
    assert editor_spec(best, "mine", "on").instructions is True
    (tmp_path / "multitask" / "config.yaml").unlink()
    with pytest.raises(ValueError, match="--instructions on or off"):
        editor_spec(best)
    with pytest.raises(FileNotFoundError, match="editor_config.json"):
        editor_spec(tmp_path)


def test_weight_is_the_last_inner_weight_unless_named(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from instructedit.editors.mend import MENDEditor

    editor = MENDEditor.from_pretrained(save_run(tiny_llama_dir, tmp_path / "run", True))
    assert resolve_weight(editor, None) == "model.layers.3.mlp.down_proj.weight"
    assert resolve_weight(editor, "2.mlp.up_proj.weight") == "model.layers.2.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="valid weights"):
        resolve_weight(editor, "down_proj.weight")


# --- gradients end to end -----------------------------------------------------------------------------


def test_gradient_analysis_writes_scores_and_figures(tiny_llama_dir: Path, tmp_path: Path) -> None:
    with_instr = save_run(tiny_llama_dir, tmp_path / "instructedit", instructions=True)
    without = save_run(tiny_llama_dir, tmp_path / "multitask", instructions=False)
    out = tmp_path / "out"
    args = parse(["analyze", "gradients", "--editor", str(with_instr), "--editor", str(without), "--tasks", "counterfact,wikirecent,zsre",
                  "--n", "5", "--embedding", "tsne", "--projection-dim", "512", "--device", "cpu", "--output", str(out), "--no-progress"])
    assert args.func(args) == 0
    result = json.loads((out / "gradients.json").read_text())
    assert [e["label"] for e in result["editors"]] == ["instructedit", "multitask"]
    first, second = result["editors"]
    assert first["instructions"] is True and first["instruction"] == 0 and second["instructions"] is False
    assert first["weight"] == "model.layers.3.mlp.down_proj.weight" and first["n_per_task"] == {"counterfact": 5, "wikirecent": 5, "zsre": 5}
    assert len(first["embedding"]["points"]) == 15 and first["embedding"]["method"] == "tsne"
    for entry in result["editors"]:
        assert -1 <= entry["scores"]["silhouette"] <= 1 and entry["scores"]["between_within_ratio"] > 0
    for name in ("gradients-instructedit.png", "gradients-multitask.png", "gradients-comparison.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Instructions change the edit input, hence the update: the two editors (same weights) must differ.
    assert first["embedding"]["points"] != second["embedding"]["points"] or first["scores"] != second["scores"]


def test_gradient_command_checks_per_editor_flags(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    best = save_run(tiny_gpt2_dir, tmp_path / "run", True)
    args = parse(["analyze", "gradients", "--editor", str(best), "--label", "a", "--label", "b", "--output", str(tmp_path / "o")])
    with pytest.raises(ValueError, match="once per --editor"):
        args.func(args)
    with pytest.raises(ValueError, match="unknown task"):
        GradientSettings(tasks=("nope",))


# --- scaling ------------------------------------------------------------------------------------------


def _study_yaml(tmp_path: Path, model_dir: Path, name: str, values: dict) -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"base_config": str(TINY), "overrides": [f"model.name={model_dir}", "training.val_every=1",
                                                                            "training.checkpoint_every=1", "data.max_per_task=3"], **values}))
    return path


def test_scaling_trains_evaluates_plots_and_skips_finished_work(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = _study_yaml(tmp_path, tiny_gpt2_dir, "scaling.yaml", {
        "max_steps": 1, "eval_limit": 2, "batch_size": 8,
        "task_sets": [["wikirecent"], ["wikirecent", "counterfact"]]})
    out = tmp_path / "scaling"
    args = parse(["analyze", "scaling", "--config", str(config), "--output", str(out), "--device", "cpu", "--no-progress"])
    assert args.func(args) == 0
    result = json.loads((out / "scaling.json").read_text())
    assert [p["n_tasks"] for p in result["points"]] == [1, 2] and result["eval_task"] == "zsre"
    assert result["instruction"] == 0 and "zsre" not in result["points"][1]["train_counts"]
    for p in result["points"]:
        assert p["cases"] == 2 and 0 <= p["post"]["reliability"] <= 1 and p["steps"] == 1
        assert (Path(p["run_dir"]) / "best" / "editor.safetensors").is_file()
    assert (out / "scaling.png").read_bytes()[:4] == b"\x89PNG"
    cached = json.loads((out / "1-tasks" / "eval-zsre.json").read_text())
    assert cached["settings"]["split"] == "test" and cached["settings"]["instruction"] == 0

    # A rerun finds finished runs and matching evaluations: nothing trains or evaluates again.
    def forbidden(*args, **kwargs):
        raise AssertionError("finished work was redone")

    monkeypatch.setattr(cache, "evaluate", forbidden)
    monkeypatch.setattr(reuse.Trainer, "run", forbidden)
    assert args.func(args) == 0
    assert json.loads((out / "scaling.json").read_text())["points"] == result["points"]


def test_scaling_config_is_validated(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"base_config": str(TINY), "max_steps": 5, "task_sets": [["wikirecent"], ["counterfact"]]}))
    with pytest.raises(ValueError, match="different sizes"):
        scaling.load_scaling_config(bad)
    bad.write_text(yaml.safe_dump({"base_config": str(TINY), "max_steps": 5, "typo": 1}))
    with pytest.raises(ValueError, match="unknown key"):
        scaling.load_scaling_config(bad)
    default = scaling.load_scaling_config(ROOT / "configs" / "analysis" / "scaling-smollm2.yaml")
    assert [len(t) for t in default[0].task_sets] == [1, 2, 3] and default[1].is_file()


def test_a_run_folder_with_another_configuration_is_refused(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    save_config(load_config(TINY, [f"model.name={tiny_gpt2_dir}", "data.tasks=[counterfact]"]), run / "config.yaml")
    config = load_config(TINY, [f"model.name={tiny_gpt2_dir}", "data.tasks=[wikirecent]"])
    with pytest.raises(ValueError, match="different configuration"):
        reuse.train_or_reuse(config, run, None, None)


# --- seen vs unseen -------------------------------------------------------------------------------------


def test_description_study_evaluates_every_description(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    best = save_run(tiny_gpt2_dir, tmp_path / "run", True, edit_lr=5.0)
    out = tmp_path / "study"
    args = parse(["analyze", "instructions", "--editor", str(best), "--task", "counterfact", "--limit", "2", "--device", "cpu",
                  "--output", str(out), "--no-progress"])
    assert args.func(args) == 0
    result = json.loads((out / "descriptions-counterfact.json").read_text())
    rows = result["descriptions"]
    assert [r["index"] for r in rows] == list(range(10))
    assert [r["status"] for r in rows] == ["seen"] * 9 + ["unseen"]
    assert all(r["cases"] == 2 and 0 <= r["metrics"]["reliability"] <= 1 for r in rows)
    assert result["summary"]["reliability"]["unseen"][0]["index"] == 9
    assert (out / "descriptions-counterfact.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list(out.glob("description-*.json"))) == 10


def test_seen_unseen_summary_and_plot_on_fake_numbers(tmp_path: Path) -> None:
    rows = [{"index": i, "seen": i < 9, "status": "seen" if i < 9 else "unseen", "text": f"d{i}",
             "metrics": {"reliability": 0.5 + 0.01 * i, "generalization": 0.4, "locality": None}, "cases": 3} for i in range(10)]
    rows[9]["metrics"]["reliability"] = 0.9
    summary = seen_unseen_summary(rows)
    rel = summary["reliability"]
    assert rel["seen"]["mean"] == pytest.approx(0.54) and rel["seen"]["min"] == pytest.approx(0.5)
    assert rel["unseen"][0]["minus_seen_mean"] == pytest.approx(0.36) and rel["unseen"][0]["within_seen_range"] is False
    assert summary["generalization"]["unseen"][0]["within_seen_range"] is True and "locality" not in summary
    result = write_description_outputs(rows, "counterfact", tmp_path, "fake", EvalSettings(task="counterfact"))
    assert (tmp_path / result["figure"]).is_file()


# --- balance --------------------------------------------------------------------------------------------


def _record(task: str, i: int) -> EditRecord:
    return EditRecord(task=task, prompt=f"prompt {i}", target_new="x", source=f"{task}#{i}")


def test_oversample_repeats_only_the_named_task() -> None:
    records = [_record("counterfact", i) for i in range(4)] + [_record("convsent", i) for i in range(3)]
    out = oversample(records, {"convsent": 2.5})
    assert sum(r.task == "counterfact" for r in out) == 4
    convsent = [r.source for r in out if r.task == "convsent"]
    assert len(convsent) == 8 and convsent[:3] == convsent[3:6] == ["convsent#0", "convsent#1", "convsent#2"]
    with pytest.raises(ValueError, match="positive"):
        oversample(records, {"convsent": 0})


def test_balance_study_with_an_oversampled_variant(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = _study_yaml(tmp_path, tiny_gpt2_dir, "balance.yaml", {
        "max_steps": 1, "eval_limit": 1, "gradient_n": 3, "embedding": "pca", "projection_dim": 256,
        "variants": [{"name": "balanced", "balance": True}]})
    cfg, base = load_balance_config(config)
    cfg = cfg.with_factor(3)
    assert [v.name for v in cfg.variants] == ["balanced", "convsent-x3"] and cfg.with_factor(3) is cfg
    result = run_balance(cfg, base, tmp_path / "out", device="cpu", progress=False)
    balanced, oversampled = result["variants"]
    assert balanced["train_counts"] == {"counterfact": 3, "wikirecent": 3, "convsent": 3}
    assert oversampled["train_counts"] == {"counterfact": 3, "wikirecent": 3, "convsent": 9}
    data = json.loads((tmp_path / "out" / "convsent-x3" / "data.json").read_text())
    assert data["train"]["oversampling"] == {"convsent": 3} and data["train"]["counts_before_oversampling"]["convsent"] == 3
    for v in result["variants"]:
        assert set(v["reliability"]) == {"counterfact", "wikirecent", "convsent"} and v["gradients"]["n_per_task"]["convsent"] == 3
    for name in ("balance.png", "balance-gradients.png", "balance.json"):
        assert (tmp_path / "out" / name).is_file()
    with pytest.raises(ValueError, match="unique names"):
        BalanceConfig(base_config="x", max_steps=1, variants=[{"name": "a"}, {"name": "a"}])
    assert yaml.safe_load((tmp_path / "out" / "convsent-x3" / "config.yaml").read_text())["data"]["oversample"] == {"convsent": 3}
