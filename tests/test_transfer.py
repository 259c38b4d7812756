"""Table 1's transfer experiment on tiny models and hand-made data: the matrix, its drops, its files, and reuse on a rerun."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import yaml

from instructedit.cli import main
from instructedit.evaluation import cache
from instructedit.evaluation.metrics import summarize
from instructedit.evaluation.report import CaseResult, EvalReport, EvalSettings
from instructedit.experiments import reuse
from instructedit.experiments.transfer import METRICS, PHASES, TransferConfig, run_transfer, transfer_matrix

ROOT = Path(__file__).resolve().parents[1]
TASKS = ["counterfact", "wikirecent", "zsre"]

pytestmark = pytest.mark.usefixtures("one_thread")


def _handmade_data(root: Path, n: int = 20) -> Path:
    """A data folder in the real files' formats: CounterFact with rephrases, Recent without rephrases or
    portability (so those cells are n/a), ZsRE's train file and a 3-case test file with portability."""
    cities = ["Paris", "Rome", "Berlin", "London"]
    counterfact = [{"subject": f"Danielle {i}", "prompt": f"The mother tongue of Danielle {i} is", "target_new": cities[i % 4],
                    "ground_truth": "French", "rephrase": f"Danielle {i} speaks the language",
                    "portability": {"Reasoning": [{"prompt": f"The capital of the country of Danielle {i} is", "ground_truth": "Paris"}]},
                    "locality": {"Relation_Specificity": [{"prompt": f"The place of birth of Danielle {i} is", "ground_truth": "Sweden"}]}}
                   for i in range(n)]
    recent = [{"subject": f"Ingrid {i}", "prompt": f"The gender of Ingrid {i} is", "target_new": "female", "portability": {},
               "locality": {"Relation_Specificity": [{"prompt": f"The place of birth of Ingrid {i} is", "ground_truth": [["Sweden"]]}]}}
              for i in range(n)]

    def zsre(i: int, portability: bool) -> dict:
        row = {"subject": f"Toko {i}", "src": f"What does Toko {i} play?", "pred": "guitar", "rephrase": f"Which instrument does Toko {i} play?",
               "alt": "piano", "answers": ["guitar"], "loc": "nq question: what is the name of the last episode of spongebob",
               "loc_ans": "The String", "cond": "guitar >> piano"}
        return row | ({"portability": {"New Question": f"Who else plays the instrument of Toko {i}?", "New Answer": "John Lennon"}} if portability else {})

    files = {"counterfact/train_cf.json": counterfact, "recent/recent_train.json": recent,
             "zsre/zsre_mend_train-1k.json": [zsre(i, False) for i in range(n)],
             "zsre/zsre_mend_eval_portability_gpt4.json": [zsre(100 + i, True) for i in range(3)]}
    for rel, rows in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(json.dumps(rows))
    return root


def _config(tmp_path: Path, model_dir: Path, tasks: list[str] = TASKS, protocol: str = "both") -> Path:
    tiny = [f"model.name={model_dir}", "model.max_length=250", "model.last_n_layers=2", "editor.rank=16", "training.lr=1.0e-3",
            "training.val_every=2", "training.val_size=4", "training.checkpoint_every=2", "training.early_stop_patience=0"]
    editors = [{"name": f"single-{task}", "config": str(ROOT / "configs/smollm2-135m/single-task.yaml"),
                "overrides": [f"data.tasks=[{task}]", *(["data.allow_held_out=true"] if task == "zsre" else []), *tiny]} for task in tasks]
    config = {"output": str(tmp_path / "results" / "table1"), "runs_dir": str(tmp_path / "runs"), "model": str(model_dir), "budget_steps": 2,
              "tasks": tasks, "limit": 2, "limits": {"zsre": 3}, "protocol": protocol, "editors": editors}
    path = tmp_path / "table1.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_transfer_matrix_files_and_reuse(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTEDIT_DATA", str(_handmade_data(tmp_path / "data")))
    path = _config(tmp_path, tiny_gpt2_dir)
    assert main(["experiment", "transfer", "--config", str(path), "--no-progress"]) == 0
    out = tmp_path / "results" / "table1"
    payload = json.loads(out.with_suffix(".json").read_text())
    assert payload["trained_on"] == TASKS and payload["evaluated_on"] == TASKS
    assert payload["command"] == f"instructedit experiment transfer --config {path}"
    assert {e["steps"] for e in payload["editors"].values()} == {2} and all(e["best_step"] for e in payload["editors"].values())
    assert payload["editors"]["zsre"]["train_counts"] == {"zsre": 18}  # the held-out task, trained on by its single-task editor
    assert payload["cases"] == {"counterfact": 2, "wikirecent": 2, "zsre": 3}

    matrix = payload["matrix"]
    assert set(matrix) == set(PHASES)  # both protocols
    for protocol, by_metric in matrix.items():
        assert set(by_metric) == set(METRICS)
        for metric, rows in by_metric.items():
            assert list(rows) == TASKS and all(list(row) == TASKS for row in rows.values())  # 3 x 3
            for trained, row in rows.items():
                for task, cell in row.items():
                    assert cell["protocol"] == protocol and cell["in_task"] == (trained == task)
                    if cell["mean"] is None:  # no probes of this kind: stated, not zero
                        assert cell["note"].startswith("n/a") and cell["n"] == 0 and cell["drop"] is None
                        continue
                    assert cell["n"] == payload["cases"][task]
                    assert cell["ci_low"] <= cell["mean"] <= cell["ci_high"]
                    diagonal = rows[task][task]
                    if trained == task:
                        assert cell["drop"] is None
                    else:
                        drop = cell["drop"]
                        assert drop["mean"] == pytest.approx(cell["mean"] - diagonal["mean"], abs=1e-12)
                        assert drop["n"] == cell["n"] and drop["ci_low"] <= drop["ci_high"]
    for protocol in PHASES:  # Recent's records have no rephrase and no portability probe
        for metric in ("generalization", "portability"):
            assert all(matrix[protocol][metric][t]["wikirecent"]["mean"] is None for t in TASKS)
    assert matrix["teacher_forced"]["reliability"]["zsre"]["zsre"]["n"] == 3

    table = out.with_suffix(".md").read_text()
    assert "## Teacher-forced protocol" in table and "## Generation protocol" in table and "n/a" in table
    assert "**84.62**" in table and "Δ -25.50" in table and "Δ -86.40" in table  # the paper's numbers beside ours
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A rerun trains nothing and evaluates nothing: the finished runs and the cached reports answer.
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the rerun retrained or re-evaluated")

    monkeypatch.setattr(reuse, "Trainer", refuse)
    monkeypatch.setattr(cache, "evaluate", refuse)
    again = run_transfer(TransferConfig.from_yaml(path), show_progress=False)
    assert again["matrix"] == matrix and again["editors"] == payload["editors"]


def test_transfer_on_llama_teacher_forced(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INSTRUCTEDIT_DATA", str(_handmade_data(tmp_path / "data")))
    config = TransferConfig.from_yaml(_config(tmp_path, tiny_llama_dir, ["counterfact", "zsre"], "teacher_forced"))
    payload = run_transfer(config, show_progress=False)
    assert list(payload["matrix"]) == ["teacher_forced"] and payload["command"] is None
    rel = payload["matrix"]["teacher_forced"]["reliability"]
    assert rel["counterfact"]["zsre"]["drop"]["mean"] == pytest.approx(rel["counterfact"]["zsre"]["mean"] - rel["zsre"]["zsre"]["mean"])
    assert not math.isnan(rel["zsre"]["counterfact"]["mean"])
    assert "## Generation protocol" not in Path(f"{config.output}.md").read_text()


def test_transfer_needs_single_task_editors(tmp_path: Path, tiny_gpt2_dir: Path) -> None:
    path = _config(tmp_path, tiny_gpt2_dir, ["counterfact"])
    raw = yaml.safe_load(path.read_text())
    raw["editors"][0]["overrides"][0] = "data.tasks=[counterfact, wikirecent]"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match=r"editor 'single-counterfact' trains on \['counterfact', 'wikirecent'\].*single-task"):
        TransferConfig.from_yaml(path).trained_on()
    raw["editors"] = []
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ValueError, match="editors is empty"):
        TransferConfig.from_yaml(path)


def _report(task: str, rel: list[float], gen_rel: list[float]) -> EvalReport:
    """A hand-made report: per-case teacher-forced and generation reliability of ``task``'s cases."""
    cases = [CaseResult(index=i, source=f"{task}#{i}", task=task, pre={}, post={"reliability": r}, gen_post={"gen_reliability": g})
             for i, (r, g) in enumerate(zip(rel, gen_rel))]
    aggregates = {task: {"post": {"reliability": summarize(rel, intervals=True)},
                         "gen_post": {"gen_reliability": summarize(gen_rel, "generation", intervals=True)}}}
    return EvalReport(settings=EvalSettings(task=task), cases=cases, aggregates=aggregates, timing={})


def test_drops_are_off_diagonal_minus_the_in_task_value_of_the_column() -> None:
    reports = {"counterfact": {"counterfact": _report("counterfact", [1.0, 1.0, 0.5, 1.0], [1, 0, 1, 1]),
                               "zsre": _report("zsre", [0.2, 0.0, 0.4], [0, 0, 0])},
               "zsre": {"counterfact": _report("counterfact", [0.5, 0.0, 0.5, 0.0], [0, 0, 1, 0]),
                        "zsre": _report("zsre", [1.0, 0.8, 0.9], [1, 1, 0])}}
    matrix = transfer_matrix(reports, ["teacher_forced", "generation"])
    rel, gen = matrix["teacher_forced"]["reliability"], matrix["generation"]["reliability"]
    assert rel["zsre"]["counterfact"]["drop"]["mean"] == pytest.approx(0.25 - 0.875)
    assert rel["counterfact"]["zsre"]["drop"]["mean"] == pytest.approx(0.2 - 0.9)
    assert gen["zsre"]["counterfact"]["drop"]["mean"] == pytest.approx(0.25 - 0.75)
    drop = rel["counterfact"]["zsre"]["drop"]
    assert drop["n"] == 3 and drop["ci_low"] <= drop["mean"] <= drop["ci_high"] < 0  # paired over the 3 shared cases
    assert rel["counterfact"]["counterfact"]["drop"] is None and rel["counterfact"]["counterfact"]["in_task"]
    portability = matrix["teacher_forced"]["portability"]["zsre"]["counterfact"]
    assert portability["mean"] is None and portability["note"].startswith("n/a") and portability["drop"] is None
