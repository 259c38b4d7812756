"""Training for generation: answer stop token, answer-margin hinge, answer-prefix template, selection on generation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from instructedit.config import load_config
from instructedit.losses import answer_margin
from instructedit.models.loading import load_model
from instructedit.records import EditRecord, QAItem
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool
from instructedit.training import Trainer, instruction_pool

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
PREFIX_TEMPLATE = "Task: {task}\nDescription: {description}\nInput: {prompt}\nOutput:"


def test_answer_margin_is_zero_once_every_target_leads_by_the_cap() -> None:
    logits = torch.tensor([[5.0, 2.0, 0.0], [0.0, 1.0, 4.0]])
    assert answer_margin(logits, torch.tensor([0, 2]), cap=2.0).item() == 0.0  # leads 3 and 3
    # target 1 in row 0 trails by 3: 2 - (-3) = 5; row 1 leads by 3: 0 -> mean 2.5
    assert answer_margin(logits, torch.tensor([1, 2]), cap=2.0).item() == pytest.approx(2.5)


def test_answer_margin_pushes_the_target_up() -> None:
    logits = torch.zeros(1, 4, requires_grad=True)
    answer_margin(logits, torch.tensor([2])).backward()
    assert logits.grad[0, 2] < 0 and logits.grad[0].sum().abs() < 1e-6  # raise the target, lower the best other


@pytest.mark.parametrize("stop", ["newline", "eos"])
def test_edit_inputs_end_with_the_stop_token_and_probes_do_not(tiny_llama_dir: Path, stop: str) -> None:
    _, tok = load_model(str(tiny_llama_dir))
    plain = Collator(tok).qa_batch([("The capital of France is", "Paris")])
    collator = Collator(tok, answer_stop=stop)
    stopped = collator.qa_batch([("The capital of France is", "Paris")], stop=True)
    expected = tok.eos_token_id if stop == "eos" else tok("\n", add_special_tokens=False)["input_ids"][0]
    labels = stopped.labels[stopped.label_mask].tolist()
    assert labels == plain.labels[plain.label_mask].tolist() + [expected]
    assert torch.equal(collator.qa_batch([("The capital of France is", "Paris")]).labels, plain.labels)  # probes: no stop


def test_meta_batch_edit_rows_carry_the_stop_locality_does_not(tiny_gpt2_dir: Path) -> None:
    _, tok = load_model(str(tiny_gpt2_dir))
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    record = EditRecord(task="counterfact", prompt="The capital of France is", target_new="Rome", rephrase=("France's capital is",),
                        locality=(QAItem("The capital of Spain is", "Madrid"),), source="t#0")
    meta = Collator(tok, pool=InstructionPool.default(), answer_stop="newline").meta_batch([record], [0])
    for batch in (meta.edit_inner, meta.edit_outer):
        assert batch.labels[batch.label_mask][-1].item() == newline
    assert meta.loc.labels[meta.loc.label_mask][-1].item() != newline


def test_unknown_answer_stop_and_template_without_slot_are_refused() -> None:
    with pytest.raises(ValueError, match="training.answer_stop"):
        load_config(TINY, ["training.answer_stop=tab"])
    with pytest.raises(ValueError, match="data.template"):
        load_config(TINY, ["data.template=Input: {prompt}"])
    with pytest.raises(ValueError, match="training.select_on"):
        load_config(TINY, ["training.select_on=accuracy"])


def test_template_reaches_the_pool() -> None:
    config = load_config(TINY, [f"data.template={json.dumps(PREFIX_TEMPLATE)}"])
    pool = instruction_pool(config)
    record = EditRecord(task="zsre", prompt="Who wrote Hamlet?", target_new="Marlowe", source="t#1")
    assert pool.render(record, record.prompt, 0).endswith("Input: Who wrote Hamlet?\nOutput:")


def test_generation_validation_selects_and_saves_the_query_setup(tiny_llama_dir: Path, tmp_path: Path) -> None:
    config = load_config(TINY, [f"model.name={tiny_llama_dir}", f"data.template={json.dumps(PREFIX_TEMPLATE)}", "training.answer_stop=newline",
                                "training.c_answer_margin=0.5", "training.select_on=generation", "training.locality_floor=0.0"])
    Trainer(config, tmp_path, show_progress=False).run()
    vals = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert len(vals) == 3 and all({"gen_reliability", "gen_locality", "gen_n"} <= set(v) for v in vals)
    assert all(0 <= v["gen_reliability"] <= 1 and 0 <= v["gen_locality"] <= 1 for v in vals)
    assert vals[0]["gen_locality"] == 1.0  # identity-initialized editor: no answer moves
    train = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert all("l_answer" in t for t in train)
    # best/ is the first checkpoint with the highest generation reliability (floor 0: every one qualifies)
    best = json.loads((tmp_path / "best" / "editor_config.json").read_text())
    top = max(v["gen_reliability"] for v in vals)
    assert best["training"]["best_step"] == next(v["step"] for v in vals if v["gen_reliability"] == top)
    assert best["queries"] == {"instructions": True, "instruction_pool": None, "template": PREFIX_TEMPLATE, "answer_stop": "newline"}


def test_load_editor_queries_as_the_editor_was_trained(tiny_llama_dir: Path, tmp_path: Path) -> None:
    from instructedit.api import Edit, load_editor

    config = load_config(TINY, [f"model.name={tiny_llama_dir}", f"data.template={json.dumps(PREFIX_TEMPLATE)}", "training.answer_stop=newline",
                                "training.max_steps=1", "training.val_every=1"])
    Trainer(config, tmp_path, show_progress=False).run()
    editor = load_editor(tmp_path / "best")
    edit = Edit("Who wrote Hamlet?", "Marlowe", task="zsre")
    assert editor.answer_stop == "newline" and editor.wrap(edit).endswith("Input: Who wrote Hamlet?\nOutput:")
    model, tok = load_model(str(tiny_llama_dir))
    batch = editor.edit_batch([edit], tok)
    assert batch.labels[batch.label_mask][-1].item() == tok("\n", add_special_tokens=False)["input_ids"][0]
    with editor.apply(model, [edit], tok) as edited:
        assert "\n" not in edited.answer(editor.wrap(edit), max_new_tokens=5)
