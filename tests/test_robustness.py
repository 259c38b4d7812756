"""Nothing lost, nothing silently wrong: run folders, logs, divergence, empty data, damaged editors, the edit command."""

from __future__ import annotations

import json
import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from instructedit import training
from instructedit.cli import main
from instructedit.editors.mend import CONFIG_NAME, WEIGHTS_NAME, MENDEditor
from instructedit.tasks.splits import build_mixture
from instructedit.training import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def train_cli(model_dir: Path, output: Path, *overrides: str) -> int:
    sets = [x for o in (f"model.name={model_dir}", *overrides) for x in ("--set", o)]
    return main(["train", "--config", str(TINY), *sets, "--output", str(output), "--no-progress"])


def small_data_dir(root: Path, n: int = 20) -> Path:
    """A data folder holding the first ``n`` CounterFact records (enough for data.tasks=[counterfact])."""
    rows = json.loads((SHARED_DATA / "counterfact" / "train_cf.json").read_text())[:n]
    (root / "counterfact").mkdir(parents=True)
    (root / "counterfact" / "train_cf.json").write_text(json.dumps(rows))
    return root


# -- 1, 2: the run folder -----------------------------------------------------------------------------


def test_train_refuses_to_overwrite_folders_that_are_not_its_checkpoints(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                         caplog: pytest.LogCaptureFixture) -> None:
    for name in ("best", "last"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "notes.txt").write_text("mine")
    assert train_cli(tiny_gpt2_dir, tmp_path, "training.max_steps=1") == 2
    assert f"{tmp_path / 'best'} exists but is not a checkpoint of this run" in caplog.text
    assert all((tmp_path / name / "notes.txt").read_text() == "mine" for name in ("best", "last"))
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "config.yaml").exists()


def test_a_run_killed_before_its_first_checkpoint_starts_a_fresh_log(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    def killed(self: Trainer) -> None:
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(Trainer, "save_checkpoint", killed)
        assert train_cli(tiny_gpt2_dir, tmp_path) == 130
    assert (tmp_path / "best" / CONFIG_NAME).is_file() and not (tmp_path / "last").exists()
    assert train_cli(tiny_gpt2_dir, tmp_path) == 0  # its own best/ is no reason to refuse
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    twice = [key for key, n in Counter((r["step"], r["split"]) for r in rows).items() if n > 1]
    assert not twice and {r["step"] for r in rows if r["split"] == "train"} == {1, 2, 3, 4, 5, 6}
    stale = [json.loads(line) for line in (tmp_path / "metrics.jsonl.1").read_text().splitlines()]
    assert max(r["step"] for r in stale) == 3  # the killed run's log, kept aside


# -- 3: non-finite training -----------------------------------------------------------------------------


def test_a_diverged_editor_is_never_saved(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    real = Trainer.train_step

    def diverging(self: Trainer) -> dict[str, float] | None:
        metrics = real(self)
        with torch.no_grad():
            self.editor.edit_lrs.fill_(float("nan"))
        return metrics

    monkeypatch.setattr(Trainer, "train_step", diverging)
    assert train_cli(tiny_gpt2_dir, tmp_path) == 2
    assert "hold NaN/Inf at step 6; not saving" in caplog.text and str(tmp_path / "last") in caplog.text
    assert not (tmp_path / "last").exists()
    MENDEditor.from_pretrained(tmp_path / "best")  # the step-0 editor, finite


def test_too_many_nonfinite_losses_end_the_command_with_a_clear_error(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    real = training.meta_loss
    monkeypatch.setattr(training, "meta_loss", lambda *a, **k: (lambda lm: (lm[0] * float("inf"), lm[1]))(real(*a, **k)))
    assert train_cli(tiny_gpt2_dir, tmp_path, "training.max_bad_steps=3") == 2
    assert "non-finite losses by step" in caplog.text and "training.max_bad_steps=3" in caplog.text


def test_an_infinite_learning_rate_is_refused_before_training(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert train_cli(tmp_path / "no-model", tmp_path / "run", "training.lr=.inf") == 2
    assert "config field 'training.lr'" in caplog.text and not (tmp_path / "run").exists()


# -- 4: data ------------------------------------------------------------------------------------------------


def test_a_task_with_an_empty_data_file_is_an_error(tmp_path: Path) -> None:
    data = small_data_dir(tmp_path)
    (data / "counterfact" / "train_cf.json").write_text("[]")
    with pytest.raises(ValueError, match=r"task 'counterfact': data file .*train_cf.json holds no usable records \(it is an empty list\)"):
        build_mixture(["counterfact"], data_dir=data)


def test_resume_refuses_changed_data_files(tiny_gpt2_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = small_data_dir(tmp_path / "data")
    run = tmp_path / "run"
    sets = (f"data.data_dir={data}", "data.tasks=[counterfact]")
    assert train_cli(tiny_gpt2_dir, run, *sets, "training.max_steps=3") == 0
    assert json.loads((run / "data.json").read_text())["file_sha256"].keys() == {"counterfact/train_cf.json"}
    small = json.loads((data / "counterfact" / "train_cf.json").read_text())
    (data / "counterfact" / "train_cf.json").write_text(json.dumps(small[::-1]))
    before = (run / "metrics.jsonl").read_text()
    assert train_cli(tiny_gpt2_dir, run, *sets, "training.max_steps=6") == 2
    assert "other contents of the data file(s) ['counterfact/train_cf.json']" in caplog.text
    assert (run / "metrics.jsonl").read_text() == before


# -- 8: damaged editor folders ----------------------------------------------------------------------------


def _rewrite_config(folder: Path, change: Callable[[dict], None]) -> None:
    config = json.loads((folder / CONFIG_NAME).read_text())
    change(config)
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _rewrite_weights(folder: Path, change: Callable[[dict], None]) -> None:
    tensors = load_file(str(folder / WEIGHTS_NAME))
    change(tensors)
    save_file(tensors, str(folder / WEIGHTS_NAME))


DAMAGE: dict[str, tuple[str, Callable[[Path], None]]] = {
    "empty weights": (WEIGHTS_NAME, lambda d: (d / WEIGHTS_NAME).write_bytes(b"")),
    "truncated weights": (WEIGHTS_NAME, lambda d: (d / WEIGHTS_NAME).write_bytes((d / WEIGHTS_NAME).read_bytes()[:-100])),
    "garbage weights": (WEIGHTS_NAME, lambda d: (d / WEIGHTS_NAME).write_bytes(b"not a safetensors file " * 8)),
    "no weights file": (WEIGHTS_NAME, lambda d: (d / WEIGHTS_NAME).unlink()),
    "config cut in half": (CONFIG_NAME, lambda d: (d / CONFIG_NAME).write_text((d / CONFIG_NAME).read_text()[:200])),
    "config without weights": (CONFIG_NAME, lambda d: _rewrite_config(d, lambda c: c.pop("weights"))),
    "config with a bad weight entry": (CONFIG_NAME, lambda d: _rewrite_config(d, lambda c: c["weights"][0].pop("shape"))),
    "weights of another rank": (WEIGHTS_NAME, lambda d: _rewrite_config(d, lambda c: c["editor"].update(rank=4))),
    "a missing tensor": (WEIGHTS_NAME, lambda d: _rewrite_weights(d, lambda t: t.pop("edit_lrs"))),
    "a NaN tensor": (WEIGHTS_NAME, lambda d: _rewrite_weights(d, lambda t: t["edit_lrs"].fill_(float("nan")))),
}


@pytest.fixture(scope="module")
def gpt2_editor(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, save_tiny_editor: Callable[..., Path]) -> Path:
    return save_tiny_editor(tiny_gpt2_dir, tmp_path_factory.mktemp("editor"))


def damaged(editor: Path, tmp_path: Path, kind: str) -> tuple[Path, str]:
    folder = tmp_path / "editor"
    folder.mkdir()
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        (folder / name).write_bytes((editor / name).read_bytes())
    file, damage = DAMAGE[kind]
    damage(folder)
    return folder, file


@pytest.mark.parametrize("kind", list(DAMAGE))
def test_a_damaged_editor_folder_is_one_clear_error(gpt2_editor: Path, tmp_path: Path, kind: str) -> None:
    folder, file = damaged(gpt2_editor, tmp_path, kind)
    with pytest.raises(ValueError, match="incomplete or corrupt editor") as err:
        MENDEditor.from_pretrained(folder)
    assert str(folder / file) in str(err.value)


@pytest.mark.parametrize("kind", ["config cut in half", "a missing tensor"])
def test_edit_and_evaluate_report_a_damaged_editor(tiny_gpt2_dir: Path, gpt2_editor: Path, tmp_path: Path, kind: str,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    folder, file = damaged(gpt2_editor, tmp_path, kind)
    common = ["--editor", str(folder), "--model", str(tiny_gpt2_dir), "--device", "cpu"]
    assert main(["edit", *common, "--prompt", "The capital of France is", "--target", "Rome"]) == 2
    assert main(["evaluate", *common, "--task", "counterfact", "--limit", "1", "--output", str(tmp_path / "r.json"), "--no-progress"]) == 2
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 2 and all(file in e for e in errors), errors
    assert "incomplete or corrupt editor" in errors[0]


# -- 9: the edit command ---------------------------------------------------------------------------------------


def edit_cli(editor: Path, model: Path, *extra: str, prompt: str = "The capital of France is") -> int:
    return main(["edit", "--editor", str(editor), "--model", str(model), "--prompt", prompt, "--target", "Rome", *extra])


def test_edit_checks_the_prompt_length_before_running_the_model(tiny_gpt2_dir: Path, gpt2_editor: Path, monkeypatch: pytest.MonkeyPatch,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    import instructedit.api

    def never(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model ran")

    for name in ("answer", "top_predictions", "generate", "score_target"):
        monkeypatch.setattr(instructedit.api, name, never)
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cpu", prompt="Paris " * 300) == 2  # the tiny GPT-2 takes 256 positions
    assert "256" in caplog.text and "tokens" in caplog.text


def test_edit_refuses_to_save_onto_a_file(tiny_gpt2_dir: Path, gpt2_editor: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    target = tmp_path / "model.bin"
    target.write_text("mine")
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cpu", "--save", str(target)) == 2
    assert f"--save {target} is an existing file" in caplog.text and target.read_text() == "mine"


def test_edit_top_k_above_the_vocabulary(tiny_gpt2_dir: Path, gpt2_editor: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cpu", "--top-k", "100000") == 2
    assert "--top-k 100000 is more than the model's vocabulary" in caplog.text


def test_edit_on_cuda_without_a_gpu(tiny_gpt2_dir: Path, gpt2_editor: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cuda") == 2
    assert "--device cuda: this machine has no usable CUDA GPU" in caplog.text
