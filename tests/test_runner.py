"""The evaluation runner, report writers and the ``evaluate`` command on tiny GPT-2 / LLaMA models."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import pytest
import torch
from torch import nn

from instructedit.config import load_config
from instructedit.editors.base import EditHandle
from instructedit.editors.mend import MENDEditor
from instructedit.editors.registry import build_editor
from instructedit.evaluation import packing
from instructedit.commands.evaluate import add_evaluate_parser, parse_options
from instructedit.evaluation.report import load_report_json, markdown_report
from instructedit.evaluation.packing import scored_logits
from instructedit.evaluation.probes import case_probes
from instructedit.evaluation.runner import RestorationError, evaluate, sequential_schedule
from instructedit.models.packing import pack
from instructedit.models.loading import load_model
from instructedit.records import ConvSentExtras, EditRecord, QAItem, TokenBatch
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def records() -> list[EditRecord]:
    cf = EditRecord(
        task="counterfact", prompt="The capital of France is", target_new="Rome", ground_truth="Paris",
        rephrase=("The Eiffel Tower is located in the city of",),
        locality=(QAItem("The gender of Ingrid is", "female", "Relation_Specificity"),
                  QAItem("The place of birth of the writer is", "Sweden", "Relation_Specificity"),
                  QAItem("nq question: what is the name of the last episode of spongebob?", "The String", "Forgetfulness")),
        portability=(QAItem("The name of the country which Goursez Vreizh is associated with is", "France", "Reasoning"),),
        source="hand#0",
    )
    bare = EditRecord(task="counterfact", prompt="John Lennon performs on the", target_new="piano", source="hand#1")
    cs = EditRecord(
        task="convsent", prompt="What do you think of Estero?", target_new="I really like his style.", subject="Estero",
        locality=(QAItem("What do you think of Paris?", "Well, it has some bad reviews.", "OtherTopic"),),
        convsent=ConvSentExtras("Estero", "positive", ("I really like his style.", "I like Paris.", "The style is positive.", "I really like it."),
                                ("Well, it has some bad reviews.", "negative reviews")),
        source="hand#2",
    )
    return [cf, bare, cs]


def setup(model_dir: Path, edit_lr: float = 5.0) -> tuple[nn.Module, object, MENDEditor]:
    model, tokenizer = load_model(str(model_dir))
    torch.manual_seed(0)
    config = load_config(CONFIG, [f"model.name={model_dir}", f"editor.init_edit_lr={edit_lr}"])
    return model, tokenizer, build_editor(model, config).eval()


def state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def assert_same_state(before: dict[str, torch.Tensor], model: nn.Module) -> None:
    after = model.state_dict()
    assert list(before) == list(after)
    assert all(torch.equal(before[k], after[k]) for k in before)


class Spy:
    """Wraps an editor; records whether the model's weights really changed while the edit was applied."""

    def __init__(self, inner: MENDEditor, model: nn.Module) -> None:
        self.inner, self.model = inner, model
        self.changed: list[bool] = []

    def apply(self, model: nn.Module, batch: TokenBatch) -> EditHandle:
        before = state(model)
        handle = self.inner.apply(model, batch)
        after = model.state_dict()
        self.changed.append(any(not torch.equal(before[k], after[k]) for k in before))
        return handle


class _NoRollback(EditHandle):
    def _restore(self) -> None:  # the bug the guard must catch
        pass


class BrokenEditor:
    """Adds 1 to a weight and 'rolls back' by doing nothing."""

    def apply(self, model: nn.Module, batch: TokenBatch) -> EditHandle:
        with torch.no_grad():
            next(model.parameters()).add_(1.0)
        return _NoRollback()


class _HookHandle(EditHandle):
    def __init__(self, hook: torch.utils.hooks.RemovableHandle) -> None:
        super().__init__()
        self.hook = hook

    def _restore(self) -> None:
        self.hook.remove()


class HookEditor:
    """An editor that adds a forward hook (no weight writes), like module-adding baselines."""

    def apply(self, model: nn.Module, batch: TokenBatch) -> EditHandle:
        head = model.get_output_embeddings()
        return _HookHandle(head.register_forward_hook(lambda module, args, out: out + 1.0))


# --- probes -----------------------------------------------------------------------------------


def test_edit_input_is_meta_batch_edit_inner(tiny_llama_dir: Path) -> None:
    _, tokenizer = load_model(str(tiny_llama_dir))
    collator = Collator(tokenizer, 256, InstructionPool.default(), convsent_pairs=2)
    for record in records():
        meta = collator.meta_batch([record], [0], "rephrase").edit_inner if record.locality else None
        ours = collator.qa_batch(collator.edit_pairs(record, 0))
        if meta is not None:
            assert torch.equal(meta.input_ids, ours.input_ids) and torch.equal(meta.labels, ours.labels)


def test_probes_wrap_everything_but_locality(tiny_llama_dir: Path) -> None:
    _, tokenizer = load_model(str(tiny_llama_dir))
    collator = Collator(tokenizer, 256, InstructionPool.default(), convsent_pairs=2)
    cf, _, cs = records()
    probes = case_probes(collator, cf, 0)
    assert [p.family for p in probes] == ["reliability", "generalization", "portability", "locality", "locality", "locality"]
    for p in probes:
        assert p.prompt.startswith("Task: counterfact") == (p.family != "locality")
    conv = case_probes(collator, cs, 0)
    assert [p.family for p in conv] == ["reliability", "generalization", "generalization", "opposite", "opposite", "locality"]
    assert "[LABEL]" not in conv[0].prompt and "[TOPIC]" not in conv[0].prompt
    assert [p.answer for p in conv if p.family == "generalization"] == ["The style is positive.", "I really like it."]  # not the edited ones
    assert all(p.prompt == cf.prompt or p.family != "reliability" for p in case_probes(collator, cf, None))


def test_sequential_schedule() -> None:
    assert sequential_schedule(1) == [1]
    assert sequential_schedule(5) == [1, 2, 4, 5]
    assert sequential_schedule(8) == [1, 2, 4, 8]


# --- single edits: restoration and numbers ------------------------------------------------------


@pytest.mark.parametrize("fast", [True, False])
def test_evaluation_restores_the_model_exactly(tiny_model_dir: Path, fast: bool) -> None:
    model, tokenizer, editor = setup(tiny_model_dir)
    spy = editor if fast else Spy(editor, model)
    before = state(model)
    report = evaluate(model, tokenizer, spy, records(), InstructionPool.default(), 0, progress=False, fast=fast)
    assert_same_state(before, model)
    assert report.restoration["verified"] and report.restoration["per_case_checks"] == 3
    assert report.settings.fast_path is fast
    if not fast:
        assert spy.changed == [True, True, True]  # the edits really wrote the weights, and were undone
    # the edit did something (locality < 1 somewhere), so restoring was not trivial
    assert any(c.post.get("locality", 1.0) < 1.0 or c.post["reliability"] != c.pre["reliability"] for c in report.cases)


@pytest.mark.parametrize("pack_rows", [True, False])
def test_functional_mend_path_matches_apply_and_rollback(tiny_model_dir: Path, pack_rows: bool) -> None:
    model, tokenizer, editor = setup(tiny_model_dir)
    fast = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 0, progress=False, pack_rows=pack_rows)
    slow = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 0, progress=False, fast=False)
    assert fast.settings.packed_rows is pack_rows  # the first-case check accepted packing on both architectures
    for a, b in zip(fast.cases, slow.cases):
        assert a.pre == pytest.approx(b.pre, abs=1e-5)
        assert a.post == pytest.approx(b.post, abs=1e-5)


def test_packed_row_gives_the_padded_logits(tiny_model_dir: Path) -> None:
    model, tokenizer, _ = setup(tiny_model_dir)
    collator = Collator(tokenizer, 256, InstructionPool.default())
    probes = case_probes(collator, records()[0], 0)
    batch = collator.qa_batch([(p.prompt, p.answer) for p in probes])
    packed, positions, owner = pack(batch, [True] * len(probes), torch.float32)
    shared = int((owner == -1).sum())
    n_wrapped = sum(p.family != "locality" for p in probes)
    assert shared > 4  # the instruction is held once ...
    assert packed.input_ids.shape[1] == int(batch.attention_mask.sum()) - (n_wrapped - 1) * shared  # ... not per row
    assert torch.equal(packed.labels[packed.label_mask], batch.labels[batch.label_mask])
    assert torch.equal(owner[packed.label_mask[0]], batch.label_mask.nonzero()[:, 0])
    with torch.no_grad():
        expected = scored_logits(model, batch)
        got = scored_logits(model, packed, positions)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def test_packing_falls_back_to_padded_rows_when_the_model_disagrees(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, editor = setup(tiny_llama_dir)
    plain = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 0, progress=False, pack_rows=False)

    real_pack = packing.pack

    def ignored_mask(*args, **kwargs):  # as if the architecture ignored the packed row's mask and positions
        packed, positions, owner = real_pack(*args, **kwargs)
        see_all = TokenBatch(packed.input_ids, torch.zeros_like(packed.attention_mask), packed.labels)
        return see_all, torch.zeros_like(positions), owner

    monkeypatch.setattr(packing, "pack", ignored_mask)
    report = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 0, progress=False)
    assert report.settings.fast_path and not report.settings.packed_rows
    assert [c.post for c in report.cases] == [c.post for c in plain.cases]


def test_guard_catches_an_edit_that_is_not_rolled_back(tiny_gpt2_dir: Path) -> None:
    model, tokenizer, _ = setup(tiny_gpt2_dir)
    with pytest.raises(RestorationError, match="differ from the originals"):
        evaluate(model, tokenizer, BrokenEditor(), records()[:1], None, None, progress=False)


def test_report_has_per_task_and_subkey_metrics_with_n(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, editor = setup(tiny_llama_dir)
    report = evaluate(model, tokenizer, editor, records(), InstructionPool.default(), 9, progress=False)
    cf, cs = report.aggregates["counterfact"], report.aggregates["convsent"]
    assert set(cf["post"]) == {"reliability", "generalization", "locality", "locality/Relation_Specificity",
                               "locality/Forgetfulness", "portability", "portability/Reasoning"}
    assert cf["post"]["reliability"].n == 2
    assert cf["post"]["generalization"].n == 1 and cf["post"]["locality"].n == 1 and cf["post"]["portability"].n == 1
    assert "locality" not in cf["pre"]  # locality is a post-vs-pre comparison
    assert set(cs["post"]) == {"reliability", "generalization", "locality", "locality/OtherTopic", "sentiment_margin"}
    assert "sentiment_margin" in cs["pre"]
    assert all(0.0 <= s.mean <= 1.0 for k, s in cf["post"].items())
    s = report.settings
    assert (s.instruction, s.task, s.method, s.sequential) == (9, "counterfact,convsent", "mend", False)
    assert s.instruction_source == "instructedit default descriptions" and s.torch_version == torch.__version__
    assert report.timing["cases_per_s"] > 0
    assert s.fast_kernels is (os.environ.get("INSTRUCTEDIT_FAST_KERNELS", "") != "0")  # whether reruns match to the bit
    from instructedit.evaluation.runner import _complete_settings
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("INSTRUCTEDIT_FAST_KERNELS", "0")
        assert _complete_settings(None, model, editor, records(), None, None).fast_kernels is False

    data = report.to_dict()
    assert set(data) == {"settings", "aggregates", "timing", "restoration", "sequential", "skipped", "cases"}
    (tmp_path / "r.json").write_text(json.dumps(data))
    again = load_report_json(tmp_path / "r.json")
    assert again.aggregates == report.aggregates and again.settings == report.settings
    text = markdown_report([report])
    assert "counterfact Rel." in text and "convsent Loc." in text and "avg Port." in text
    assert "locality/Forgetfulness" in text


def test_too_long_records_are_skipped_and_reported(tiny_gpt2_dir: Path) -> None:
    model, tokenizer, editor = setup(tiny_gpt2_dir)
    long = EditRecord(task="counterfact", prompt="The capital of France is " * 40, target_new="Rome", source="long#0")
    report = evaluate(model, tokenizer, editor, [long, records()[1]], None, None, progress=False, max_length=64)
    assert [s["source"] for s in report.skipped] == ["long#0"] and len(report.cases) == 1


# --- sequential ---------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["mend", "hook"])
def test_sequential_mode_reports_decay_and_restores(tiny_model_dir: Path, which: str) -> None:
    model, tokenizer, editor = setup(tiny_model_dir)
    editor = editor if which == "mend" else HookEditor()
    before = state(model)
    cases = records() + records()[:2]
    report = evaluate(model, tokenizer, editor, cases, InstructionPool.default(), 0, progress=False, sequential=True, batch_size=3)
    assert_same_state(before, model)
    assert not model.get_output_embeddings()._forward_hooks
    assert [p.edits for p in report.sequential] == [1, 2, 4, 5]
    assert [p.reliability_n for p in report.sequential] == [1, 2, 4, 5]
    assert [p.locality_n for p in report.sequential] == [1, 1, 3, 3]  # hand#1 has no locality probe
    assert report.settings.sequential and len(report.cases) == 5
    # pre-edit values come from the unedited model: the same case has the same pre values both times
    assert report.cases[0].pre == report.cases[3].pre
    if which == "hook":  # +1 on every logit of every kept hook leaves the argmax: locality stays 1
        assert all(p.locality == 1.0 for p in report.sequential)


def test_sequential_mode_refuses_an_edit_that_would_wreck_the_model(tiny_model_dir: Path, wreck_edit) -> None:
    """As ``apply_sequential`` does: the tenth edit, made 10⁴× too large, is undone; its case is scored on the model of
    the nine before it and marked; the eleventh is made on that model, as in the sequence without the tenth."""
    model, tokenizer, editor = setup(tiny_model_dir)
    before = state(model)
    cases = (records()[:2] * 6)[:11]
    calls = wreck_edit(editor, 10)
    report = evaluate(model, tokenizer, editor, cases, InstructionPool.default(), 0, progress=False, sequential=True, batch_size=3)
    assert len(calls) == 11
    assert_same_state(before, model)
    assert [c.refused for c in report.cases] == [False] * 9 + [True, False]
    assert [p.refused for p in report.sequential] == [0, 0, 0, 0, 1] and report.settings.outlier_factor == 50
    assert "| not kept |" in markdown_report([report])
    calls.extend([None] * 100)  # no more wrecking
    without = evaluate(model, tokenizer, editor, cases[:9] + cases[10:], InstructionPool.default(), 0, progress=False, sequential=True,
                       batch_size=3)
    assert report.cases[10].post == without.cases[9].post and report.cases[10].gen_post == without.cases[9].gen_post
    assert report.cases[10].answers == without.cases[9].answers
    # switched off, the wrecking edit is kept
    calls.clear()
    kept = evaluate(model, tokenizer, editor, cases, InstructionPool.default(), 0, progress=False, sequential=True, batch_size=3,
                    outlier_factor=None)
    assert not any(c.refused for c in kept.cases) and kept.settings.outlier_factor is None
    assert kept.cases[:9] == report.cases[:9]
    assert kept.cases[10].answers != report.cases[10].answers  # the wreck, kept, changed what the model says after it
    assert_same_state(before, model)
    with pytest.raises(ValueError, match="outlier_factor must be a number > 1, None or 'auto', got 'tight'"):
        evaluate(model, tokenizer, editor, cases, InstructionPool.default(), 0, progress=False, sequential=True, outlier_factor="tight")


# --- the command --------------------------------------------------------------------------------


def knowedit_file(path: Path) -> Path:
    rows = [
        {"subject": "France", "prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris",
         "portability": {"Reasoning": [{"prompt": "The Eiffel Tower is located in the city of", "ground_truth": ["Rome"]}]},
         "locality": {"Relation_Specificity": [{"prompt": "The gender of Ingrid is", "ground_truth": "female"}]}},
        {"subject": "John Lennon", "prompt": "John Lennon performs on the", "target_new": "piano", "ground_truth": "guitar",
         "locality": {"Forgetfulness": [{"prompt": "Toko Yasuda, the guitar", "ground_truth": "piano"}]}},
    ]
    path.write_text(json.dumps(rows))
    return path


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers(dest="command"))
    return p


def test_evaluate_command_writes_json_and_markdown(tiny_llama_dir: Path, tmp_path: Path) -> None:
    _, _, editor = setup(tiny_llama_dir)
    editor.save_pretrained(tmp_path / "editor")
    data = knowedit_file(tmp_path / "cf.json")
    out = tmp_path / "out" / "eval.json"
    args = parser().parse_args(["evaluate", "--editor", str(tmp_path / "editor"), "--task", "counterfact", "--data", str(data),
                                "--instruction", "unseen", "--output", str(out), "--no-progress", "--device", "cpu"])
    assert args.func(args) == 0
    report = json.loads(out.read_text())
    s = report["settings"]
    assert s["model_name"] == str(tiny_llama_dir)  # taken from the editor's editor_config.json
    assert s["method"] == "mend" and s["instruction"] == 9 and s["data_file"] == str(data)
    assert len(s["editor_sha256"]) == 64
    assert report["aggregates"]["counterfact"]["post"]["reliability"]["n"] == 2
    assert report["aggregates"]["counterfact"]["post"]["portability/Reasoning"]["n"] == 1
    md = out.with_suffix(".md").read_text()
    assert "| method |" in md and "counterfact Rel." in md


def test_evaluate_command_resumes_an_interrupted_run(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from instructedit.evaluation.cache import PartialEvaluation

    _, _, editor = setup(tiny_llama_dir)
    editor.save_pretrained(tmp_path / "editor")
    data = knowedit_file(tmp_path / "cf.json")
    argv = ["evaluate", "--editor", str(tmp_path / "editor"), "--task", "counterfact", "--data", str(data), "--no-progress",
            "--device", "cpu", "--protocol", "teacher_forced"]
    whole = parser().parse_args([*argv, "--output", str(tmp_path / "whole.json")])
    assert whole.func(whole) == 0
    out = tmp_path / "eval.json"
    real_append = PartialEvaluation.append

    def append_then_stop(self, results):  # killed right after the first case was saved
        real_append(self, results)
        raise KeyboardInterrupt

    monkeypatch.setattr(PartialEvaluation, "append", append_then_stop)
    def run(*more: str) -> int:  # parsed anew each time: a run fills in the key memory's defaults
        args = parser().parse_args([*argv, "--output", str(out), *more])
        return args.func(args)

    with pytest.raises(KeyboardInterrupt):
        run()
    assert not out.exists() and (tmp_path / "eval.partial.jsonl").is_file()
    monkeypatch.setattr(PartialEvaluation, "append", real_append)
    capsys.readouterr()
    assert run() == 0
    assert "2 cases, " in (said := capsys.readouterr().out) and "over the 1 scored now, 1 resumed from an interrupted run" in said
    resumed, first = json.loads(out.read_text()), json.loads((tmp_path / "whole.json").read_text())
    assert resumed["timing"]["resumed_cases"] == 1 and resumed["cases"] == first["cases"] and resumed["aggregates"] == first["aggregates"]
    assert not (tmp_path / "eval.partial.jsonl").exists()
    # a partial file left by another question is not taken over, nor silently overwritten
    (tmp_path / "eval.partial.jsonl").write_text(json.dumps({"partial_evaluation": {"protocol": "both"}}) + "\n")
    with pytest.raises(ValueError, match="holds an unfinished evaluation with different .*pass --restart"):
        run()
    assert run("--restart") == 0 and "resumed_cases" not in json.loads(out.read_text())["timing"]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--method", "no-such-method", "--task", "counterfact"], "unknown editing method 'no-such-method'; valid methods"),
        (["--method", "mend", "--task", "nosuchtask"], "unknown task 'nosuchtask'; valid tasks"),
        (["--method", "mend", "--task", "zsre", "--instruction", "first"], "is not 'seen', 'unseen'"),
    ],
)
def test_evaluate_command_rejects_bad_names(argv: list[str], message: str, tmp_path: Path) -> None:
    args = parser().parse_args(["evaluate", *argv, "--output", str(tmp_path / "x.json")])
    with pytest.raises(ValueError, match=message):
        args.func(args)


def test_method_options_parse_numbers_as_the_config_overrides_do() -> None:
    assert parse_options(["lr=1e-5", "layer=-2", "module=down_proj", "empty="]) == {"lr": 1e-5, "layer": -2, "module": "down_proj", "empty": ""}
    with pytest.raises(ValueError, match="must look like KEY=VALUE"):
        parse_options(["lr"])
