"""The Table 3 experiment on a tiny model: both protocols, per-task limits, editors asked as they were trained, caching."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from instructedit.evaluation.report import load_report_json
from instructedit.experiments.table3 import ExperimentConfig, run_experiment

ROOT = Path(__file__).resolve().parents[1]
PREFIX_TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}\nOutput:"

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path: Path, model_dir: Path, protocol: str = "both") -> Path:
    tiny = [f"model.name={model_dir}", "model.max_length=250", "model.last_n_layers=2", "data.max_per_task=6", "editor.rank=16",
            "training.lr=1.0e-3", "training.val_every=2", "training.val_size=4", "training.checkpoint_every=2", "training.early_stop_patience=0"]
    config = {
        "output": str(tmp_path / "table3"), "runs_dir": str(tmp_path / "runs"), "model": str(model_dir), "budget_steps": 2,
        "tasks": ["counterfact", "zsre"], "limit": 2, "limits": {"zsre": 3}, "protocol": protocol,
        "editors": [
            {"name": "paper", "config": str(ROOT / "configs/smollm2-135m/instructedit-kl.yaml"), "overrides": tiny},
            {"name": "gen", "config": str(ROOT / "configs/smollm2-135m/instructedit.yaml"),
             "overrides": tiny + ["training.select_on=loss"]},
        ],
        "rows": [{"label": "InstructEdit (paper recipe)", "editor": "paper", "instruction": "seen"},
                 {"label": "InstructEdit (generation recipe)", "editor": "gen", "instruction": "seen"}],
    }
    path = tmp_path / "table3.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_table3_reports_both_protocols_and_asks_editors_as_trained(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    config = ExperimentConfig.from_yaml(_config(tmp_path, tiny_gpt2_dir))
    payload = run_experiment(config, show_progress=False)
    table = (tmp_path / "table3.md").read_text()
    assert "## Teacher-forced protocol" in table and "## Generation protocol" in table and "### zsre (n = 3)" in table
    assert payload["rows"]["InstructEdit (paper recipe)"]["zsre"]["n"] == 3 and payload["rows"]["InstructEdit (paper recipe)"]["counterfact"]["n"] == 2
    gen_rel = payload["intervals"]["InstructEdit (generation recipe)"]["zsre"]["gen_post"]["gen_reliability"]
    assert gen_rel["protocol"] == "generation" and gen_rel["ci_low"] <= gen_rel["mean"] <= gen_rel["ci_high"] and gen_rel["n"] == 3
    evals = tmp_path / "runs" / "evals"
    gen_report = load_report_json(evals / "instructedit--generation-recipe-zsre.json")
    paper_report = load_report_json(evals / "instructedit--paper-recipe-zsre.json")
    assert gen_report.settings.answer_stop == "newline" and paper_report.settings.answer_stop == "none"
    asked = gen_report.cases[0].answers[0]
    assert asked["family"] == "reliability" and asked["form"] == "wrapped"
    assert json.loads((tmp_path / "table3.json").read_text())["budgets"]["gen"]["steps"] == 2
    # cached: a second run evaluates nothing; another protocol re-evaluates
    stamp = {p.name: p.stat().st_mtime_ns for p in evals.iterdir()}
    run_experiment(config, show_progress=False)
    assert {p.name: p.stat().st_mtime_ns for p in evals.iterdir()} == stamp
    tf = run_experiment(ExperimentConfig.from_yaml(_config(tmp_path, tiny_gpt2_dir, "teacher_forced")), show_progress=False)
    assert "gen_post" not in tf["intervals"]["InstructEdit (paper recipe)"]["zsre"]
    assert "## Generation protocol" not in (tmp_path / "table3.md").read_text()


def test_experiment_protocol_is_validated(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    path = _config(tmp_path, tiny_gpt2_dir, "greedy")
    with pytest.raises(ValueError, match="protocol 'greedy'"):
        ExperimentConfig.from_yaml(path)


def test_table3_trains_and_evaluates_a_ke_row(tiny_llama_dir: Path, tmp_path: Path) -> None:
    path = _config(tmp_path, tiny_llama_dir)
    config = yaml.safe_load(path.read_text())
    tiny_ke = [o for o in config["editors"][0]["overrides"] if not o.startswith("editor.rank")] + [
        "editor.lstm_dim=8", "editor.condition_dim=16", "editor.conditioner_dim=8"]
    config["editors"] = [{"name": "ke", "config": str(ROOT / "configs/smollm2-135m/ke.yaml"), "overrides": tiny_ke}]
    config["rows"] = [{"label": "KE", "editor": "ke", "instruction": "none"}]
    path.write_text(yaml.safe_dump(config))
    payload = run_experiment(ExperimentConfig.from_yaml(path), show_progress=False)
    assert payload["rows"]["KE"]["zsre"]["n"] == 3 and payload["budgets"]["ke"]["steps"] == 2
    report = load_report_json(tmp_path / "runs" / "evals" / "ke-zsre.json")
    assert report.settings.instruction is None and "gen_post" in payload["intervals"]["KE"]["zsre"]
    assert json.loads((tmp_path / "runs" / "ke" / "best" / "editor_config.json").read_text())["method"] == "ke"


def test_a_row_evaluates_the_checkpoint_its_editor_names(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    """``checkpoint: calibrated`` evaluates RUN/calibrated (what ``instructedit calibrate --output RUN/calibrated`` writes), not best/."""
    path = _config(tmp_path, tiny_gpt2_dir, "teacher_forced")
    config = yaml.safe_load(path.read_text())
    config["editors"] = [{**config["editors"][1], "checkpoint": "calibrated"}]
    config["rows"], config["tasks"] = [{"label": "calibrated", "editor": "gen", "instruction": "seen"}], ["zsre"]
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(FileNotFoundError, match=r"editor 'gen': .*calibrated holds no saved editor"):
        run_experiment(ExperimentConfig.from_yaml(path), show_progress=False)
    run = tmp_path / "runs" / "gen"
    shutil.copytree(run / "best", run / "calibrated")
    run_experiment(ExperimentConfig.from_yaml(path), show_progress=False)
    report = load_report_json(tmp_path / "runs" / "evals" / "calibrated-zsre.json")
    assert report.settings.editor_path == str(run / "calibrated")
