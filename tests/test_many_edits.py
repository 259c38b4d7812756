"""Many edits at once and in sequence: the batch-editing and lifelong studies on tiny GPT-2 / LLaMA models."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from instructedit.analysis.many_edits import batch_study, perplexity, schedule, sequential_study
from instructedit.config import load_config
from instructedit.editors.registry import build_editor
from instructedit.evaluation.runner import evaluate
from instructedit.models.loading import load_model
from instructedit.records import EditRecord, QAItem
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
POOL = InstructionPool.default()
pytestmark = pytest.mark.usefixtures("one_thread")

SUBJECTS = ["France", "Italy", "Spain", "Norway", "Peru", "Chile", "Japan", "Kenya", "Egypt", "Canada", "Brazil", "India"]
TARGETS = ["Rome", "Paris", "Lima", "Oslo", "Cairo", "Tokyo", "Delhi", "Quito", "Bern", "Riga", "Baku", "Doha"]


def many_records(n: int) -> list[EditRecord]:
    return [EditRecord(task="zsre", prompt=f"What is the capital of {s}?", target_new=t, rephrase=(f"Which city is the capital of {s}?",),
                       locality=(QAItem(f"nq question: who wrote the anthem of {s}?", "an unknown poet", "NQ"),), source=f"hand#{i}")
            for i, (s, t) in enumerate(zip(SUBJECTS[:n], TARGETS[:n]))]


def _setup(model_dir: Path):
    model, tokenizer = load_model(str(model_dir))
    torch.manual_seed(0)
    editor = build_editor(model, load_config(CONFIG, [f"model.name={model_dir}", "editor.init_edit_lr=5.0"])).eval()
    return model, tokenizer, editor, Collator(tokenizer, 256, POOL)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_batch_study_scores_each_size_and_restores_the_weights(tiny_model_dir: Path) -> None:
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    records = many_records(8)
    before = _state(model)
    result = batch_study(model, tokenizer, editor, collator, records, 0, [1, 3, 8], progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # every weight bit for bit
    assert [p["n_edits"] for p in result["points"]] == [1, 3, 8]
    for point in result["points"]:
        assert point["seconds_per_edit"] == pytest.approx(point["seconds"] / point["n_edits"])
        for key, protocol in [("reliability", "teacher_forced"), ("locality", "teacher_forced"), ("gen_reliability", "generation"),
                              ("gen_locality", "generation"), ("gen_generalization", "generation")]:
            summary = point[key]
            assert summary["protocol"] == protocol and summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
        assert point["reliability"]["n"] == point["n_edits"]
    # one edit in one call is the runner's single-edit evaluation of that case
    single = evaluate(model, tokenizer, editor, records[:1], POOL, 0, progress=False, protocol="both")
    post = single.cases[0].post
    assert result["points"][0]["reliability"]["mean"] == pytest.approx(post["reliability"], abs=1e-6)
    assert result["points"][0]["locality"]["mean"] == pytest.approx(post["locality"], abs=1e-6)
    assert result["points"][0]["gen_reliability"]["mean"] == single.cases[0].gen_post["gen_reliability"]
    with pytest.raises(ValueError, match="sizes"):
        batch_study(model, tokenizer, editor, collator, records, 0, [9], progress=False)


@pytest.mark.parametrize("batch", [1, 2])
def test_sequential_study_scores_at_powers_of_two_and_rolls_back_bitwise(tiny_model_dir: Path, batch: int) -> None:
    model, tokenizer, editor, collator = _setup(tiny_model_dir)
    records = many_records(12)
    before = _state(model)
    seen: list[int] = []
    result = sequential_study(model, tokenizer, editor, collator, records[:6], records[6:], 0, edits=6, batch=batch,
                              progress=False, on_point=lambda p: seen.append(p["n_edits"]))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items()) and result["rolled_back_bitwise"]
    assert [p["n_edits"] for p in result["points"]] == seen == schedule(6) == [1, 2, 4, 6]
    assert result["points"][0]["reliability"]["n"] == 1 and result["points"][-1]["reliability"]["n"] == 6
    assert result["base_perplexity"] == pytest.approx(perplexity(model, collator, [(q.prompt, q.answer) for r in records[6:] for q in r.locality]))
    assert all(p["perplexity_ratio"] == pytest.approx(p["perplexity"] / result["base_perplexity"]) for p in result["points"])
    assert result["points"][-1]["perplexity"] != result["base_perplexity"]  # six strong edits move the held-out text


def test_perplexity_is_exp_of_the_mean_answer_token_nll(tiny_gpt2_dir: Path) -> None:
    model, tokenizer, _, collator = _setup(tiny_gpt2_dir)
    prompt, answer = "The capital of France is", "Paris, a city"
    ids = tokenizer(prompt)["input_ids"]
    full = tokenizer(prompt + " " + answer)["input_ids"]
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([full])).logits[0].float(), -1)
    nll = -sum(float(logp[i - 1, full[i]]) for i in range(len(ids), len(full))) / (len(full) - len(ids))
    assert perplexity(model, collator, [(prompt, answer)]) == pytest.approx(math.exp(nll), rel=1e-4)
