"""Nothing lost, nothing silently wrong: run folders, logs, divergence, empty data, damaged editors, the edit command."""

from __future__ import annotations

import json
import logging
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx2
import pytest
import torch
from huggingface_hub.utils import get_session
from safetensors.torch import load_file, save_file
from torch import nn

from instructedit import training
from instructedit.api import Edit, InstructEditor, load_editor
from instructedit.cli import main
from instructedit.editors.mend import CONFIG_NAME, WEIGHTS_NAME, MENDEditor
from instructedit.models.hub_access import hub_timeouts
from instructedit.models.loading import load_model
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


# -- 6: records the loader skipped reach the evaluation report --------------------------------------------


def test_the_evaluation_report_lists_the_records_the_loader_skipped(tiny_gpt2_dir: Path, gpt2_editor: Path, tmp_path: Path) -> None:
    rows = json.loads((SHARED_DATA / "counterfact" / "train_cf.json").read_text())[:3]
    del rows[1]["target_new"]
    data = tmp_path / "cases.json"
    data.write_text(json.dumps(rows))
    output = tmp_path / "report.json"
    assert main(["evaluate", "--editor", str(gpt2_editor), "--model", str(tiny_gpt2_dir), "--device", "cpu", "--task", "counterfact",
                 "--data", str(data), "--protocol", "teacher_forced", "--output", str(output), "--no-progress"]) == 0
    report = json.loads(output.read_text())
    assert len(report["cases"]) == 2
    assert report["skipped"] == [{"source": "cases.json#1", "reason": "missing field 'target_new'", "stage": "load",
                                  "file": str(data), "index": 1}]
    markdown = output.with_suffix(".md").read_text()
    assert "2 cases (1 skipped: 1 by the data loader)" in markdown
    assert "| cases.json#1 | data loader | missing field 'target_new' |" in markdown


# -- 7: a hub that accepts the connection and never answers --------------------------------------------------


@pytest.fixture
def silent_hub(point_hub_at: Callable[[str], None], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The hub endpoint pointed at a server on 127.0.0.1 that accepts every connection and never answers; 0.5 s hub timeout."""
    server = socket.create_server(("127.0.0.1", 0))
    server.settimeout(0.1)
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except (TimeoutError, OSError):
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{server.getsockname()[1]}"
    point_hub_at(url)
    monkeypatch.setenv("INSTRUCTEDIT_HUB_TIMEOUT", "0.5")
    yield url
    stop.set()
    thread.join()
    for conn in [*accepted, server]:
        conn.close()


def error_within(seconds: float, call: Callable[[], object]) -> BaseException | None:
    """Run ``call`` in a thread; the error it raised, after asserting it returned within ``seconds`` (a hang fails, not blocks, the test)."""
    outcome: list[BaseException | None] = []

    def run() -> None:
        try:
            call()
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 (handed to the test)
            outcome.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert outcome, f"still waiting for the hub after {seconds} s"
    return outcome[0]


@pytest.mark.parametrize("what", ["model", "editor", "memory estimate", "tokenizer"])
def test_a_hub_that_never_answers_is_a_clear_error_not_a_hang(silent_hub: str, what: str) -> None:
    from types import SimpleNamespace

    from instructedit.api import tokenizer_for
    from instructedit.config import load_config
    from instructedit.memory import meta_skeleton

    call = {"model": lambda: load_model("someone/model"), "editor": lambda: load_editor("someone/editor"),
            "memory estimate": lambda: meta_skeleton(load_config(None, ["model.name=someone/model"])),
            "tokenizer": lambda: tokenizer_for(SimpleNamespace(name_or_path="someone/model"))}[what]
    err = error_within(8, call)
    assert isinstance(err, ConnectionError), err
    assert f"{silent_hub} did not answer within 0.5 s" in str(err)
    assert "to work offline set HF_HUB_OFFLINE=1" in str(err) and "INSTRUCTEDIT_HUB_TIMEOUT" in str(err)


def test_hub_requests_without_a_timeout_get_one(silent_hub: str) -> None:
    with hub_timeouts(0.5):  # huggingface_hub's API calls pass timeout=None: without the cap they wait forever
        err = error_within(5, lambda: get_session().get(f"{silent_hub}/api/models/someone/model", timeout=None))
    assert isinstance(err, httpx2.ReadTimeout), err
    assert not any(hook.__qualname__.startswith("hub_timeouts") for hook in get_session().event_hooks["request"])


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


def test_edit_refuses_to_save_into_a_folder_of_other_files(tiny_gpt2_dir: Path, gpt2_editor: Path, tmp_path: Path,
                                                           caplog: pytest.LogCaptureFixture) -> None:
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "thesis.tex").write_text("mine")
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cpu", "--save", str(folder)) == 2
    assert "already holds files that no earlier save of an edited model wrote" in caplog.text
    assert [f.name for f in folder.iterdir()] == ["thesis.tex"]


def test_an_edited_model_is_saved_whole_or_not_at_all(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Written into a folder beside the target that then takes its place: a save that fails half way leaves an earlier
    save as it was (and no temporary folder); a later save replaces it whole (no file of the earlier one left over)."""
    from transformers import AutoModelForCausalLM

    from instructedit.api import EDITS_FILE, save_edited_model
    from instructedit.models.loading import load_model

    model, tokenizer = load_model(str(tiny_gpt2_dir))
    out = tmp_path / "edited"
    save_edited_model(model, tokenizer, out, {"edits": ["first"]})
    (out / "stale.bin").write_text("from the earlier save")
    first = {f.name: f.read_bytes() for f in out.iterdir()}

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(tokenizer, "save_pretrained", broken)  # the model's weights are written, then it fails
    with pytest.raises(OSError, match="disk full"):
        save_edited_model(model, tokenizer, out, {"edits": ["second"]})
    assert {f.name: f.read_bytes() for f in out.iterdir()} == first and sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
    monkeypatch.undo()
    save_edited_model(model, tokenizer, out, {"edits": ["second"]})
    assert not (out / "stale.bin").exists() and json.loads((out / EDITS_FILE).read_text()) == {"edits": ["second"]}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["edited"]
    assert AutoModelForCausalLM.from_pretrained(out).config.n_layer == model.config.n_layer


def test_edit_top_k_above_the_vocabulary(tiny_gpt2_dir: Path, gpt2_editor: Path, caplog: pytest.LogCaptureFixture) -> None:
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cpu", "--top-k", "100000") == 2
    assert "--top-k 100000 is more than the model's vocabulary" in caplog.text


def test_edit_on_cuda_without_a_gpu(tiny_gpt2_dir: Path, gpt2_editor: Path, monkeypatch: pytest.MonkeyPatch,
                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert edit_cli(gpt2_editor, tiny_gpt2_dir, "--device", "cuda") == 2
    assert "--device cuda: this machine has no usable CUDA GPU" in caplog.text


# -- 11: the memory of kept sequential edits ---------------------------------------------------------------

CITIES = ["Rome", "London", "Paris", "Berlin", "Madrid", "Vienna", "Oslo", "Lisbon", "Prague", "Dublin"]


def sequential_edits(n: int) -> list[Edit]:
    return [Edit(f"The capital of country number {i} is", CITIES[i % len(CITIES)]) for i in range(n)]


def held_tensor_bytes(root: object, skip: tuple[object, ...]) -> int:
    """Bytes of the distinct tensor storages reachable from ``root``'s attributes and containers, not entering ``skip``."""
    seen: set[int] = set()
    storages: dict[int, int] = {}
    stack = [root]
    while stack:
        obj = stack.pop()
        if id(obj) in seen or any(obj is s for s in skip) or isinstance(obj, nn.Module):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
        elif isinstance(obj, dict):
            stack += list(obj.values())
        elif isinstance(obj, (list, tuple, set)):
            stack += list(obj)
        elif hasattr(obj, "__dict__") and not isinstance(obj, type):
            stack += list(vars(obj).values())
    return sum(storages.values())


@pytest.fixture
def sequential_setup(tiny_gpt2_dir: Path, gpt2_editor: Path) -> tuple[nn.Module, object, InstructEditor, dict[str, torch.Tensor]]:
    model, tok = load_model(str(tiny_gpt2_dir))
    return model, tok, load_editor(gpt2_editor), {k: v.clone() for k, v in model.state_dict().items()}


def test_sequential_edits_roll_back_bitwise_all_at_once_and_from_the_middle(sequential_setup: tuple) -> None:
    model, tok, editor, original = sequential_setup
    edits = sequential_edits(20)
    with editor.apply_sequential(model, edits[:10], tok):
        middle = {k: v.clone() for k, v in model.state_dict().items()}
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    edited = editor.apply_sequential(model, edits, tok)
    assert any(not torch.equal(v, middle[k]) for k, v in model.state_dict().items())
    edited.rollback_to(10)
    assert edited.active and edited.edits == tuple(edits[:10])
    assert all(torch.equal(v, middle[k]) for k, v in model.state_dict().items())
    edited.rollback()
    assert all(torch.equal(v, original[k]) for k, v in model.state_dict().items())
    with editor.apply_sequential(model, edits, tok) as again:
        pass
    assert not again.active and all(torch.equal(v, original[k]) for k, v in model.state_dict().items())


def test_kept_sequential_edits_hold_one_copy_of_the_weights_not_one_per_edit(sequential_setup: tuple) -> None:
    model, tok, editor, _ = sequential_setup
    weights = sum(model.get_parameter(w.name).nbytes for w in editor.editor.weights)
    held = {}
    for n in (2, 20):
        with editor.apply_sequential(model, sequential_edits(n), tok) as edited:
            held[n] = held_tensor_bytes(edited, skip=(model, tok, editor))
    assert weights <= held[2] < 2 * weights  # the originals, once
    per_edit = (held[20] - held[2]) / 18  # an edit's token ids and checksums, not a copy of the edited weights
    assert per_edit < weights / 8, (held, weights)
