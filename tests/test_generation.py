"""The generation protocol: answer scoring, batched greedy decoding, bootstrap intervals, the runner's generation metrics, the judge."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gzip
import math
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from instructedit.analysis.proposers import OpenAIProposer
from instructedit.api import query_setup
from instructedit.config import load_config
from instructedit.editors.base import EditHandle, EditResult, ThinParams, ThinUpdates, WeightEditHandle
from instructedit.editors.mend import MENDEditor
from instructedit.editors.registry import build_editor
from instructedit.commands.evaluate import add_evaluate_parser
from instructedit.evaluation.generation import (
    batch_order, shared_prefix, answer_budget, bootstrap_ci, exact_match, first_line, greedy_generate, normalize_answer, stop_token_ids,
    token_f1,
)
from instructedit.evaluation.generation_probes import Query, answer_scores, case_queries
from instructedit.evaluation.judge import LLMJudge, parse_verdict
from instructedit.evaluation.report import EvalReport, load_report_json, markdown_report, write_report_json
from instructedit.evaluation.packing import prepare_cases
from instructedit.evaluation.runner import evaluate
from instructedit.io import read_json
from instructedit.models.loading import load_model
from instructedit.records import ConvSentExtras, EditRecord, QAItem, TokenBatch
from instructedit.tasks.collate import Collator
from instructedit.tasks.instructions import InstructionPool

CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
POOL = InstructionPool.default()

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


def records() -> list[EditRecord]:
    cf = EditRecord(
        task="counterfact", prompt="The capital of France is", target_new="Rome", ground_truth="Paris",
        rephrase=("The Eiffel Tower is located in the city of",),
        locality=(QAItem("The gender of Ingrid is", "female", "Relation_Specificity"),
                  QAItem("nq question: what is the name of the last episode of spongebob?", "The String", "Forgetfulness")),
        portability=(QAItem("The name of the country which Goursez Vreizh is associated with is", "France", "Reasoning"),),
        source="hand#0",
    )
    loc = EditRecord(task="counterfact", prompt="John Lennon performs on the", target_new="piano",
                     locality=(QAItem("Toko Yasuda, the guitar", "piano", "Forgetfulness"),), source="hand#1")
    cs = EditRecord(
        task="convsent", prompt="What do you think of Estero?", target_new="I really like his style.", subject="Estero",
        locality=(QAItem("What do you think of Paris?", "Well, it has some bad reviews.", "OtherTopic"),),
        convsent=ConvSentExtras("Estero", "positive", ("I really like his style.", "I like Paris.", "The style is positive.", "I really like it."),
                                ("Well, it has some bad reviews.", "negative reviews")),
        source="hand#2",
    )
    return [cf, loc, cs]


def setup(model_dir: Path, *overrides: str) -> tuple[nn.Module, object, MENDEditor]:
    model, tokenizer = load_model(str(model_dir))
    torch.manual_seed(0)
    config = load_config(CONFIG, [f"model.name={model_dir}", "editor.init_edit_lr=5.0", *overrides])
    return model, tokenizer, build_editor(model, config).eval()


# --- scoring answers ----------------------------------------------------------------------------


def test_normalization_exact_match_and_f1() -> None:
    assert normalize_answer("  The  Eiffel-Tower, in PARIS! ") == "eiffeltower in paris"
    assert normalize_answer("an apple a day") == "apple day"
    assert exact_match("The Rome.", "rome") == 1.0 and exact_match("Rome, Italy", "Rome") == 0.0
    assert token_f1("Rome Italy", "Rome") == pytest.approx(2 * 0.5 * 1.0 / 1.5)
    assert token_f1("Paris", "Rome") == 0.0 and token_f1("", "") == 1.0 and token_f1("", "Rome") == 0.0
    assert token_f1("the the Rome", "Rome Rome") == pytest.approx(2 * 1.0 * 0.5 / 1.5)  # counts are clipped
    assert first_line("\n  Rome \nParis") == "Rome" and first_line("  \n") == ""


def test_same_answer_compares_punctuation_only_answers_as_written() -> None:
    from instructedit.evaluation.generation import same_answer

    assert same_answer(" The Rome.\nmore", "rome") and not same_answer("Paris", "Rome")
    assert same_answer("?", " ?\n") and same_answer("", "\n")
    assert not same_answer("!", "?") and not same_answer("", "?")  # both normalize to nothing, yet the answer changed
    assert not same_answer("? Harper", "?")


def test_shown_answers_are_quoted_and_an_empty_one_is_named() -> None:
    from instructedit.evaluation.generation import NO_ANSWER, shown

    assert shown(" Rome") == '" Rome"' and shown('say "hi"') == '"say \\"hi\\""'  # leading space and quotes visible
    assert shown("Zürich") == '"Zürich"'  # non-ASCII as written
    assert shown("") == NO_ANSWER == "(says nothing)"


def test_ngram_entropy_is_rome_fluency() -> None:
    from instructedit.evaluation.generation import ngram_entropy

    assert ngram_entropy("") == 0.0 and ngram_entropy("word") == 0.0
    # four distinct bigrams (2 bits) and three distinct trigrams (log2 3 bits), weighted 2/3 and 4/3
    assert ngram_entropy("a b c d e") == pytest.approx((2 / 3 * 2.0 + 4 / 3 * math.log2(3)) / 2)
    assert ngram_entropy("the cat sat on the mat, happily.") > ngram_entropy("the the the the the the the the")
    assert ngram_entropy("I love it, I love it, I love it.") < ngram_entropy("I love it, the crust is crisp and the sauce sweet.")


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n() -> None:
    widths = []
    for n in (10, 100, 1000):
        ci = bootstrap_ci([float(i % 2) for i in range(n)])
        assert ci.low <= ci.mean <= ci.high and ci.n == n and ci.mean == pytest.approx(0.5)
        widths.append(ci.high - ci.low)
    assert widths[0] > widths[1] > widths[2] > 0
    assert bootstrap_ci([0.3, 0.9, 0.1]) == bootstrap_ci([0.3, 0.9, 0.1])  # fixed seed
    assert bootstrap_ci([0.4]).low == bootstrap_ci([0.4]).high == 0.4


def test_answer_scores_per_family_and_locality_against_the_pre_edit_answers() -> None:
    q = [Query("reliability", "wrapped", "default", "q", "Task: q", "Rome", 5), Query("reliability", "plain", "default", "q", "q", "Rome", 5),
         Query("portability", "wrapped", "Reasoning", "p", "Task: p", "France", 5),
         Query("locality", "raw", "Forgetfulness", "l1", "l1", "x", 5), Query("locality", "raw", "Forgetfulness", "l2", "l2", "y", 5)]
    post = [" Rome\n", "Rome Italy", "france.", "The String", "Paris"]
    pre = ["Paris", "Paris", "Germany", " the string!", "Berlin"]
    scores = answer_scores(q, post, reference=pre)
    assert scores["gen_reliability"] == 1.0 and scores["gen_reliability_plain"] == 0.0
    assert scores["gen_reliability_plain_f1"] == pytest.approx(2 / 3) and scores["gen_portability/Reasoning"] == 1.0
    assert scores["gen_locality"] == 0.5 and scores["gen_locality/Forgetfulness"] == 0.5
    assert "gen_locality" not in answer_scores(q, pre)  # no reference: pre-edit has no locality


# --- greedy decoding ----------------------------------------------------------------------------


def naive_greedy(model: nn.Module, tokenizer, prompt: str, budget: int) -> str:
    """One prompt, no cache, no padding: the full forward at every step, the same stopping rule."""
    newline, blank = (set(t.tolist()) for t in stop_token_ids(tokenizer))
    ids = tokenizer(prompt)["input_ids"]
    out: list[int] = []
    started = False
    for _ in range(budget):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
        if nxt == tokenizer.eos_token_id:
            break
        out.append(nxt)
        if nxt in newline and (started or nxt not in blank):
            break
        started |= nxt not in blank
    return tokenizer.decode(out, skip_special_tokens=True)


def test_batched_greedy_generation_equals_one_prompt_at_a_time(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    prompts = ["The capital of France is", "Task: counterfact Description: A dataset designed to challenge models Input: The mother tongue of",
               "John Lennon performs on the", "When was the inception of the IAAF Combined Events Challenge?", "I really like"]
    budgets = [6, 3, 9, 1, 12]
    batched = greedy_generate(model, tokenizer, prompts, budgets, batch_size=3)
    assert batched == [naive_greedy(model, tokenizer, p, b) for p, b in zip(prompts, budgets)]
    assert greedy_generate(model, tokenizer, prompts, budgets, batch_size=1) == batched
    assert any(len(tokenizer(a, add_special_tokens=False)["input_ids"]) > 1 for a in batched)  # not trivially empty
    with pytest.raises(ValueError, match="exceed 8 tokens"):
        greedy_generate(model, tokenizer, prompts, 4, max_length=8)


def test_ashared_prefix_and_finished_rows_leaving_the_batch_change_no_answer(tiny_model_dir: Path) -> None:
    model, tokenizer = load_model(str(tiny_model_dir))
    template = "Task: zsre\nDescription: Answer the question about the entity with a short phrase.\nInput: {}\nOutput:"
    questions = ["Who founded Rome?", "What is the capital of the country where the Danube river flows into the sea?", "Who?",
                 "When was the inception of the IAAF Combined Events Challenge?", "Which river?", "Name the author of the book."]
    prompts = [template.format(q) for q in questions] + ["The capital of France is", "I really like"]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    assert shared_prefix(encoded[:6]) >= 8 and shared_prefix(encoded) == 0  # the templated ones share their head
    assert batch_order(encoded)[-6:] == sorted(range(6), key=lambda i: len(encoded[i]))  # grouped, then by length
    budgets = [1, 12, 3, 9, 2, 7, 5, 11]  # rows finish at different steps: finished ones leave the batch
    expected = [naive_greedy(model, tokenizer, p, b) for p, b in zip(prompts, budgets)]
    assert greedy_generate(model, tokenizer, prompts, budgets, batch_size=6) == expected
    assert greedy_generate(model, tokenizer, prompts, budgets, batch_size=8) == expected
    entered: list[list[int]] = []  # a rows_context is entered again for the rows still decoding

    def context(rows: list[int]):
        entered.append(rows)
        return contextlib.nullcontext()

    assert greedy_generate(model, tokenizer, prompts, budgets, batch_size=8, rows_context=context) == expected
    assert len(entered) > 1 and set(entered[-1]) < set(entered[0]) and 1 in entered[-1] and 0 not in entered[-1]


def test_answers_before_and_after_from_one_prefill_equal_two_separate_calls(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                                                          caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.evaluation import before_after
    from instructedit.evaluation.before_after import greedy_before_after
    from instructedit.evaluation.lower_rows import LowerRows
    from instructedit.evaluation.row_edits import per_row_updates
    from instructedit.models.split import SplitModel

    model, tokenizer, editor = setup(tiny_model_dir)
    split = editor.split(model)
    template = "Task: zsre\nDescription: Answer the question about the entity with a short phrase.\nInput: {}\nOutput:"
    prompts = [template.format(q) for q in ("Who founded Rome?", "Which river?", "Name the author of the book.")]
    prompts += ["The capital of France is", "I really like", "nq question: who sings i don't want to be lonely"]
    budgets = [3, 12, 5, 9, 1, 7]
    transposed = {w.name: w.transposed for w in editor.weights}
    torch.manual_seed(1)  # a different random edit per prompt (None: the third prompt is asked unedited)
    updates = [{w.name: torch.randn_like(model.get_parameter(w.name)) * 0.5 for w in editor.weights} for _ in prompts]
    updates[2] = None

    def rows_context(rows: list[int]):
        return per_row_updates(model, [updates[i] for i in rows], transposed)

    def halved(rows: list[int]):
        return per_row_updates(model, [None if updates[i] is None else {k: v / 2 for k, v in updates[i].items()} for i in rows], transposed)

    def row_updates(variant: int, i: int):  # variant 0: the edits, variant 1: half of each (variant_scales)
        return updates[i]

    versions = {name: p._version for name, p in model.named_parameters()}
    steps = []  # per decoding step: (rows, lower rows before, lower rows after the rows that part got their own)
    real_inputs = LowerRows.inputs

    def inputs(self, ids, done, cache):
        rows, count = len(self.lower), self.count
        reader = real_inputs(self, ids, done, cache)
        steps.append((rows, count, self.count))
        return reader

    monkeypatch.setattr(LowerRows, "inputs", inputs)
    before, (after, after_half) = greedy_before_after(model, tokenizer, split, prompts, budgets, row_updates, transposed, 2, batch_size=4,
                                                      variant_scales=[1.0, 0.5])
    monkeypatch.setattr(LowerRows, "inputs", real_inputs)
    # the edited rows ran the unedited blocks with their unedited twins (fewer lower rows than rows), and rows whose
    # tokens parted got lower rows of their own
    assert all(lower <= rows for rows, _, lower in steps) and steps[0][2] < steps[0][0]
    assert any(after > before for _, before, after in steps)
    assert before == greedy_generate(model, tokenizer, prompts, budgets, batch_size=4)
    assert after == greedy_generate(model, tokenizer, prompts, budgets, batch_size=4, rows_context=rows_context)
    assert after_half == greedy_generate(model, tokenizer, prompts, budgets, batch_size=4, rows_context=halved)
    assert before[2] == after[2] and any(b != a for b, a in zip(before, after))  # the edits change answers, no edit none
    assert before == [naive_greedy(model, tokenizer, p, b) for p, b in zip(prompts, budgets)]
    # the templated prompts prefill as one batch whose template passes the model once; every batch decodes in one loop
    # (decode_rows) or each in its own: the same answers
    chunks = before_after._chunks([tokenizer(p)["input_ids"] for p in prompts], 4)
    assert [sorted(rows) for rows, shared in chunks if shared >= 8] == [[0, 1, 2]] and len(chunks) == 2
    assert greedy_before_after(model, tokenizer, split, prompts, budgets, row_updates, transposed, 2, batch_size=4,
                               variant_scales=[1.0, 0.5], decode_rows=1) == (before, [after, after_half])
    # the decoding cache is built in the memory an earlier call used (no fresh pages), or fresh when that is in use
    from instructedit.evaluation.generation import DecodeMemory
    memory = DecodeMemory.for_model(model)
    block = memory.block.data_ptr()
    assert greedy_before_after(model, tokenizer, split, prompts, budgets, row_updates, transposed, 2, batch_size=4,
                               variant_scales=[1.0, 0.5]) == (before, [after, after_half])
    assert memory.block.data_ptr() == block and DecodeMemory.for_model(model) is memory
    with memory.claim():
        assert greedy_before_after(model, tokenizer, split, prompts, budgets, row_updates, transposed, 2, batch_size=4,
                                   variant_scales=[1.0, 0.5]) == (before, [after, after_half])
    DecodeMemory.release(model)
    assert DecodeMemory.for_model(model).block is None
    whole = SplitModel(model, split.spec, 0)  # every block replayed and none shared below: the same answers
    assert greedy_before_after(model, tokenizer, whole, prompts, budgets, row_updates, transposed, 2, batch_size=4,
                               variant_scales=[1.0, 0.5]) == (before, [after, after_half])
    assert {name: p._version for name, p in model.named_parameters()} == versions  # weights never written
    assert greedy_before_after(model, tokenizer, split, [], 3, row_updates, transposed, 2) == ([], [[], []])
    # an architecture whose suffix re-run does not reproduce its logits: two separate calls, said in a warning (the check
    # runs once per model: this one passed it above)
    assert getattr(model, before_after._REPLAY_CHECKED) is True
    monkeypatch.delattr(model, before_after._REPLAY_CHECKED)
    monkeypatch.setattr(before_after._Prefill, "replay_matches", lambda self: False)
    assert greedy_before_after(model, tokenizer, split, prompts, budgets, row_updates, transposed, 2, batch_size=4,
                               variant_scales=[1.0, 0.5]) == (before, [after, after_half])
    assert "decoded separately" in caplog.text


def test_a_prompt_asked_under_several_edits_is_prefilled_and_answered_unedited_once(tiny_model_dir: Path,
                                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """The runner asks another case's question in a case's frame: the plain and chat forms of that case's own question, the
    same tokens under another edit, often with another budget. One prefill row and one unedited row serve them all."""
    from instructedit.evaluation import before_after
    from instructedit.evaluation.lower_rows import LowerRows
    from instructedit.evaluation.row_edits import per_row_updates

    model, tokenizer, editor = setup(tiny_model_dir)
    split = editor.split(model)
    template = "Task: zsre\nDescription: Answer the question about the entity with a short phrase.\nInput: {}\nOutput:"
    asked = template.format("Who founded Rome?")
    prompts = [asked, template.format("Which river?"), asked, "The capital of France is", asked, "The capital of France is"]
    budgets = [3, 6, 9, 5, 1, 2]  # the first prompt's unedited row decodes to 9 tokens, its answers cut at 3, 9 and 1
    transposed = {w.name: w.transposed for w in editor.weights}
    torch.manual_seed(4)
    updates = [{w.name: torch.randn_like(model.get_parameter(w.name)) * 0.5 for w in editor.weights} for _ in prompts]
    updates[4] = None  # asked once more without an edit
    prefilled, firsts = [], []
    real_prefill, real_inputs = before_after._Prefill.__init__, LowerRows.inputs
    monkeypatch.setattr(before_after._Prefill, "__init__", lambda self, model, split, ids, *a, **k: prefilled.append(ids.shape[0])
                        or real_prefill(self, model, split, ids, *a, **k))

    def inputs(self, ids, done, cache):
        if not firsts:
            firsts.append((len(self.lower), self.count))
        return real_inputs(self, ids, done, cache)

    monkeypatch.setattr(LowerRows, "inputs", inputs)
    before, (after, half) = before_after.greedy_before_after(model, tokenizer, split, prompts, budgets, lambda v, i: updates[i],
                                                             transposed, 2, batch_size=4, variant_scales=[1.0, 0.5])
    assert sum(prefilled) == 3  # three distinct prompts
    assert firsts[0][1] == 3 < firsts[0][0]  # the 3 unedited rows and the edited ones still decoding read 3 lower rows

    def edited(scale: float):
        return lambda rows: per_row_updates(model, [None if updates[i] is None else {k: v * scale for k, v in updates[i].items()}
                                                    for i in rows], transposed)

    assert before == greedy_generate(model, tokenizer, prompts, budgets, batch_size=4)
    assert before[0] != before[2] and before[2].startswith(before[0])  # one answer, cut to each budget
    assert after == greedy_generate(model, tokenizer, prompts, budgets, batch_size=4, rows_context=edited(1.0))
    assert half == greedy_generate(model, tokenizer, prompts, budgets, batch_size=4, rows_context=edited(0.5))
    assert after[4] == before[4] and after[0] != before[0]
    assert before_after._same_prompts([[1, 2], [3], [1, 2], [1, 2]], [False, False, True, False]) == {0: [0, 3], 1: [1], 2: [2]}


@pytest.mark.parametrize("aggregation", ["sum", "least_squares"])
def test_a_mend_edits_low_rank_factors_add_what_its_dense_update_adds(tiny_model_dir: Path, aggregation: str) -> None:
    from instructedit.evaluation.row_edits import per_row_updates

    # least squares fits the answer tokens' keys (the recommended editor's): few enough for thin factors in a tiny model
    model, tokenizer, editor = setup(tiny_model_dir, f"editor.aggregation={aggregation}", "editor.ls_keys=answer")
    collator = Collator(tokenizer, 64, None)
    with torch.no_grad():  # (least squares: as the evaluation runner edits; with gradients the solve stays one matrix)
        result = editor.edit(model, collator.qa_batch([("The capital of France is", "Rome")]))
    assert result.low_rank is not None and set(result.low_rank) == set(result.updates)
    assert isinstance(result.updates, ThinUpdates) and not result.updates._formed  # without gradients: ΔW formed when read
    assert isinstance(result.new_params, ThinParams) and not result.new_params._formed  # and W + ΔW
    for w in editor.weights:  # x · left · right equals x times the update in the weight's orientation (Conv1D or Linear)
        left, right = result.low_rank[w.name]
        dense = result.updates[w.name] if w.transposed else result.updates[w.name].T
        assert result.updates[w.name] is result.updates[w.name]  # formed once
        assert left.shape[1] == right.shape[0] < min(dense.shape)  # rank: the edit's tokens
        torch.testing.assert_close(left @ right, dense, rtol=1e-4, atol=1e-6)
        # W + ΔW straight from the factors (one addmm) is W plus the dense update, as an edit with gradients writes it
        param = model.get_parameter(w.name)
        assert result.new_params[w.name].shape == param.shape and result.new_params[w.name].dtype == param.dtype
        torch.testing.assert_close(result.new_params[w.name], param + result.updates[w.name], rtol=1e-6, atol=1e-6)
    with torch.enable_grad():  # with gradients (meta-training): dense updates, the same edit
        graded = editor.edit(model, collator.qa_batch([("The capital of France is", "Rome")]))
    assert isinstance(graded.updates, dict)
    for w in editor.weights:
        torch.testing.assert_close(graded.updates[w.name], result.updates[w.name], rtol=1e-4, atol=1e-6)
        # W + ΔW either way: the same shift within the updates' own tolerance (W's magnitude does not loosen it; on an
        # AMD EPYC without bf16 units one element of W + ΔW differed by 2.3e-6 where ΔW agreed to 1e-4 relative)
        param = model.get_parameter(w.name)
        torch.testing.assert_close(graded.new_params[w.name] - param, result.new_params[w.name] - param, rtol=1e-4, atol=1e-6)
    transposed = {w.name: w.transposed for w in editor.weights}
    with torch.no_grad():
        other = editor.edit(model, collator.qa_batch([("The capital of Spain is", "Paris")]))
    batch = collator.qa_batch([("I really like", "cats"), ("The capital of Italy is", "Rome"), ("Madrid is in", "Spain")])
    outputs = []  # two cases' updates side by side (thin: one masked product for both), each row with its own scale
    for first, second in ((result.updates, other.updates), (result.low_rank, other.low_rank)):
        with torch.no_grad(), per_row_updates(model, [None, first, second], transposed, [1.0, 0.5, 2.0]):
            outputs.append(model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits)
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        unedited = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(outputs[1][0], unedited[0])  # the row without an update is untouched
    assert not torch.allclose(outputs[1][1], unedited[1]) and not torch.allclose(outputs[1][2], unedited[2])
    # one case's rows apart (an index, not a slice) and at two scales: each row as if alone
    with torch.no_grad(), per_row_updates(model, [result.low_rank, None, result.low_rank], transposed, [1.0, 1.0, 0.5]):
        apart = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    with torch.no_grad(), per_row_updates(model, [result.updates, None, result.updates], transposed, [1.0, 1.0, 0.5]):
        dense_apart = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(apart, dense_apart, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(apart[1], unedited[1])
    with torch.no_grad(), per_row_updates(model, [result.low_rank, result.low_rank, result.low_rank], transposed):
        together = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    torch.testing.assert_close(apart[0], together[0], rtol=1e-5, atol=1e-6)  # rows 0-2 one slice, row 0 the same


class Scripted(nn.Module):
    """A 'model' whose greedy next token follows a script, one step per forward call."""

    def __init__(self, script: list[int], vocab: int) -> None:
        super().__init__()
        self.script, self.vocab, self.step = script, vocab, 0
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, input_ids: torch.Tensor, **kwargs) -> SimpleNamespace:
        logits = torch.zeros(input_ids.shape[0], input_ids.shape[1], self.vocab)
        logits[:, -1, self.script[min(self.step, len(self.script) - 1)]] = 1.0
        self.step += 1
        return SimpleNamespace(logits=logits, past_key_values=None)


def test_a_stop_ends_generation(tiny_gpt2_dir: Path) -> None:
    _, tok = load_model(str(tiny_gpt2_dir))
    word = tok(" Rome", add_special_tokens=False)["input_ids"]
    newline = tok("\n", add_special_tokens=False)["input_ids"]
    more = tok(" Paris", add_special_tokens=False)["input_ids"]

    def run(script: list[int], budget: int = 20) -> str:
        return greedy_generate(Scripted(script, len(tok)), tok, ["The capital of France is"], budget)[0]

    assert run(word + newline + more) == " Rome\n"  # a newline after text ends the answer
    assert run(newline + word + newline + more) == "\n Rome\n"  # a leading newline does not
    assert run(word + [tok.eos_token_id] + more) == " Rome"  # EOS ends it, and is not part of it
    assert first_line(run(newline + word + newline + more)) == "Rome"
    assert run(more, budget=3) == tok.decode(more * 3)  # no stop: the budget ends it
    assert answer_budget(tok, "Rome") == len(word) + 8


# --- queries ------------------------------------------------------------------------------------


def test_case_queries_forms(tiny_llama_dir: Path) -> None:
    _, tokenizer = load_model(str(tiny_llama_dir))
    collator = Collator(tokenizer, 256, POOL)
    cf, _, cs = records()
    queries = case_queries(collator, cf, 0, ("wrapped", "plain", "chat"))
    assert [(q.family, q.form) for q in queries] == [("reliability", "wrapped"), ("reliability", "plain"), ("generalization", "wrapped"),
                                                     ("portability", "wrapped"), ("locality", "raw"), ("locality", "raw")]
    assert queries[0].prompt == collator.wrap(cf, cf.prompt, 0) and queries[1].prompt == cf.prompt
    assert queries[0].budget == answer_budget(tokenizer, "Rome") and queries[3].target == "France"
    bare = case_queries(collator, cf, None, ("wrapped", "plain"))
    assert [(q.family, q.form) for q in bare][:2] == [("reliability", "wrapped"), ("generalization", "wrapped")]
    assert bare[0].prompt == cf.prompt  # no instruction: 'wrapped' is the raw prompt, and no separate plain form
    assert all(q.family != "reliability" for q in case_queries(collator, cf, 0, ()))
    # in-frame locality: another record's question asked in each form the edit prompt is asked in, in the edit's frame
    cf_loc = records()[1]
    framed = [q for q in case_queries(collator, cf, 0, ("wrapped", "plain"), in_frame=cf_loc) if q.family == "locality_in_frame"]
    assert [(q.form, q.prompt) for q in framed] == [("wrapped", collator.wrap(cf, cf_loc.prompt, 0)), ("plain", cf_loc.prompt)]
    assert [q.metric for q in framed] == ["gen_locality_in_frame", "gen_locality_in_frame_plain"]
    # the edit's target; room for the other record's answer and for the target
    assert all(q.target == "Rome" and q.budget == max(answer_budget(tokenizer, "piano"), answer_budget(tokenizer, "Rome")) for q in framed)
    scores = answer_scores(framed, [" Rome\n", " piano"], reference=[" piano", " piano"])
    assert scores == {"gen_locality_in_frame": 0.0, "gen_locality_in_frame_plain": 1.0, "gen_in_frame_target": 1.0, "gen_in_frame_target_plain": 0.0}
    fluency = case_queries(collator, cs, 0, ("wrapped",))  # ConvSent: no single answer to match; one response for fluency
    assert [(q.family, q.budget) for q in fluency] == [("fluency", 48)] and fluency[0].prompt.endswith("Input: What do you think of Estero?")
    tokenizer.chat_template = "{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}Assistant:"
    chat = [q for q in case_queries(collator, cf, 0, ("chat",)) if q.form == "chat"]
    assert [q.prompt for q in chat] == [f"User: {cf.prompt}\nAssistant:"]  # the template's BOS is not doubled
    with pytest.raises(ValueError, match="valid forms"):
        evaluate(*load_model(str(tiny_llama_dir)), NoOpEditor(), records(), POOL, 0, progress=False, queries=("wrapped", "shouted"))


# --- the runner ---------------------------------------------------------------------------------


class _Nothing(EditHandle):
    def _restore(self) -> None:
        pass


class NoOpEditor:
    """Edits nothing."""

    def apply(self, model: nn.Module, batch: TokenBatch) -> EditHandle:
        return _Nothing()


class NoiseEditor:
    """Adds large noise to one weight matrix: every answer changes."""

    def apply(self, model: nn.Module, batch: TokenBatch) -> WeightEditHandle:
        name, param = [(n, p) for n, p in model.named_parameters() if p.dim() == 2][-2]
        noise = torch.randn(param.shape, generator=torch.Generator().manual_seed(0)) * 10 * param.detach().abs().max()
        return WeightEditHandle(model, EditResult({name: param.detach() + noise}))


@pytest.mark.parametrize("sequential", [False, True])
def test_generation_locality_is_one_for_a_no_op_edit_and_drops_for_a_big_one(tiny_model_dir: Path, sequential: bool) -> None:
    model, tokenizer, _ = setup(tiny_model_dir)
    kept = evaluate(model, tokenizer, NoOpEditor(), records(), POOL, 0, progress=False, sequential=sequential)
    asked = [c for c in kept.cases if c.task == "counterfact"]
    assert [c.gen_post["gen_locality"] for c in asked] == [1.0, 1.0]
    assert [c.gen_post["gen_locality_in_frame"] for c in asked] == [1.0, 1.0] and kept.settings.in_frame_locality
    assert {a["question"] for a in asked[0].answers if a["family"] == "locality_in_frame"} == {records()[1].prompt}  # the next CounterFact record's
    assert all(a["pre"] == a["post"] for c in asked for a in c.answers)
    assert all(c.gen_pre["gen_reliability"] == c.gen_post["gen_reliability"] for c in asked)
    # ConvSent: no answer to match; its response is scored for fluency only, the same before and after a no-op edit
    assert set(kept.aggregates["convsent"]["gen_post"]) == {"gen_fluency"} and [a["family"] for a in kept.cases[2].answers] == ["fluency"]
    assert kept.cases[2].gen_pre["gen_fluency"] == kept.cases[2].gen_post["gen_fluency"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    noisy = evaluate(model, tokenizer, NoiseEditor(), records(), POOL, 0, progress=False, sequential=sequential)
    assert noisy.aggregates["counterfact"]["gen_post"]["gen_locality"].mean < 1.0
    assert noisy.aggregates["counterfact"]["gen_post"]["gen_locality_in_frame"].mean < 1.0
    unframed = evaluate(model, tokenizer, NoOpEditor(), records(), POOL, 0, progress=False, sequential=sequential, in_frame=False)
    assert not unframed.settings.in_frame_locality and "gen_locality_in_frame" not in unframed.aggregates["counterfact"]["gen_post"]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # rolled back bitwise (and verified per case)


def test_a_one_round_edit_is_scored_through_its_factors_and_forms_its_weights_only_where_read(tiny_model_dir: Path) -> None:
    from instructedit.evaluation.packing import score_functional

    model, tokenizer, editor = setup(tiny_model_dir)
    case = prepare_cases(Collator(tokenizer, 256, POOL), records()[:1], 0, 8, torch.device("cpu"))[0][0]
    for layout in (case.padded, case.layout(True, torch.float32)):
        pre, post, result, _ = score_functional(editor, model, layout)
        # scored with x · left · right added by hooks: the edited weights were never formed
        assert isinstance(result.new_params, ThinParams) and not result.new_params._formed
        split = editor.split(model)
        with torch.no_grad():  # the same logits as running W + ΔW functionally, to float rounding
            dense = torch.cat([split.logits_at(split.suffix(split.prefix(chunk) if pos is None else _prefix_at(split, chunk, pos),
                                                            dict(result.new_params)), chunk.label_mask)
                               for chunk, pos in zip(layout.chunks, layout.positions)])
        torch.testing.assert_close(post, dense, rtol=1e-4, atol=1e-5)
        assert not torch.equal(post, pre)
    result = score_functional(editor, model, case.padded)[2]
    name = editor.weights[0].name
    formed = result.new_params[name]  # read before the model changes: formed, and kept
    with torch.no_grad():
        model.get_parameter(editor.weights[1].name).add_(1.0)
    assert result.new_params[name] is formed
    with pytest.raises(RuntimeError, match=f"{editor.weights[1].name} was written to after this edit"):
        result.new_params[editor.weights[1].name]


def _prefix_at(split, chunk: TokenBatch, positions: torch.Tensor):
    from instructedit.models.packing import positions_fed

    with positions_fed(split.model, positions):
        return split.prefix(chunk)


def test_mend_fast_path_edits_once_per_case_and_restores(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tokenizer, editor = setup(tiny_model_dir)
    calls = []
    real = MENDEditor.edit
    monkeypatch.setattr(MENDEditor, "edit", lambda self, *a, **k: calls.append(1) or real(self, *a, **k))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, cases_together=1)
    assert len(calls) == 3 and report.settings.fast_path  # the logits' edit is reused for the answers
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert report.restoration["per_case_checks"] == 3 and "written for generation" in report.restoration["mode"]
    forms = {(a["family"], a["form"]) for a in report.cases[0].answers}
    assert forms == {("reliability", "wrapped"), ("reliability", "plain"), ("generalization", "wrapped"), ("portability", "wrapped"),
                     ("locality", "raw"), ("locality_in_frame", "wrapped"), ("locality_in_frame", "plain")}


def test_cases_answered_together_equal_one_case_at_a_time(tiny_model_dir: Path) -> None:
    model, tokenizer, editor = setup(tiny_model_dir)
    many = records() * 3  # nine cases: two full groups of four and one of one
    alone = evaluate(model, tokenizer, editor, many, POOL, 0, progress=False, cases_together=1)
    versions = {name: p._version for name, p in model.named_parameters()}
    together = evaluate(model, tokenizer, editor, many, POOL, 0, progress=False, cases_together=4)
    assert [c.answers for c in together.cases] == [c.answers for c in alone.cases]
    assert [c.gen_post for c in together.cases] == [c.gen_post for c in alone.cases]
    assert any(a["pre"] != a["post"] for c in together.cases for a in c.answers)  # the (strong) edits change answers
    assert {name: p._version for name, p in model.named_parameters()} == versions  # weights never written


class Interrupted(Exception):
    """Stands for Ctrl-C or a killed process, right after some results were saved."""


@pytest.mark.parametrize(("protocol", "together"), [("both", 4), ("teacher_forced", 32)])
def test_an_interrupted_evaluation_resumes_to_the_uninterrupted_report(tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       protocol: str, together: int) -> None:
    from instructedit.evaluation.cache import PartialEvaluation, evaluate_resuming, partial_path
    from instructedit.evaluation.report import EvalSettings

    model, tokenizer, editor = setup(tiny_model_dir)
    many = records() * 3  # nine cases: with answers, groups of four, four and one; teacher-forced only, one case at a time
    options = {"protocol": protocol, "cases_together": together, "progress": False}
    settings = EvalSettings(task="mixed", method="mend", editor_sha256="0" * 64)
    whole = evaluate_resuming(tmp_path / "whole.json", model, tokenizer, editor, many, POOL, 0, settings, **options)
    assert not partial_path(tmp_path / "whole.json").exists() and "resumed_cases" not in whole.timing

    saved: list[int] = []
    real_append = PartialEvaluation.append

    def append_then_stop(self, results):
        real_append(self, results)
        saved.append(len(results))
        if len(saved) == 2:
            raise Interrupted

    out = tmp_path / "eval.json.gz"
    monkeypatch.setattr(PartialEvaluation, "append", append_then_stop)
    with pytest.raises(Interrupted):
        evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, **options)
    first = sum(saved)
    assert first == (8 if protocol == "both" else 2) and not out.exists()
    lines = partial_path(out).read_text().splitlines()
    assert json.loads(lines[0])["partial_evaluation"]["protocol"] == protocol and len(lines) == 3
    monkeypatch.setattr(PartialEvaluation, "append", real_append)

    scored: list[int] = []
    real_evaluate = evaluate
    import instructedit.evaluation.cache as cache
    monkeypatch.setattr(cache, "evaluate", lambda *a, **k: scored.append(len(k["done"])) or real_evaluate(*a, **k))
    resumed = evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, **options)
    assert scored == [first] and resumed.timing["resumed_cases"] == first
    assert [c.index for c in resumed.cases] == list(range(9))
    assert resumed.cases == whole.cases  # every number and answer, the saved ones and those scored now, to the bit
    assert resumed.aggregates == whole.aggregates
    assert not partial_path(out).exists() and read_json(out)["timing"]["resumed_cases"] == first


def test_an_evaluation_stopped_after_its_last_case_writes_its_report_without_scoring_again(tiny_model_dir: Path, tmp_path: Path,
                                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    from instructedit.evaluation import cache
    from instructedit.evaluation.report import EvalSettings

    model, tokenizer, editor = setup(tiny_model_dir)
    settings = EvalSettings(task="mixed", method="mend", editor_sha256="0" * 64)
    out = tmp_path / "eval.json"
    real_write = cache.write_report_json
    monkeypatch.setattr(cache, "write_report_json", lambda *a: (_ for _ in ()).throw(Interrupted()))  # killed before the report
    with pytest.raises(Interrupted):
        cache.evaluate_resuming(out, model, tokenizer, editor, records(), POOL, 0, settings, progress=False)
    monkeypatch.setattr(cache, "write_report_json", real_write)
    from instructedit.evaluation import runner  # no case is scored again: no answers decoded (only the packing check's pass runs)

    monkeypatch.setattr(runner.gen.GenerationRun, "answer_before_after", lambda *a, **k: pytest.fail("a saved case was scored again"))
    report = cache.evaluate_resuming(out, model, tokenizer, editor, records(), POOL, 0, settings, progress=False)
    assert report.timing["resumed_cases"] == 3 and [c.index for c in report.cases] == [0, 1, 2] and report.settings.packed_rows
    assert load_report_json(out).cases == report.cases and not cache.partial_path(out).exists()


def test_a_partial_evaluation_of_another_question_is_refused_and_a_cut_line_dropped(tiny_model_dir: Path, tmp_path: Path,
                                                                                  caplog: pytest.LogCaptureFixture) -> None:
    from instructedit.evaluation.cache import PartialEvaluation, evaluate_resuming, partial_path
    from instructedit.evaluation.report import EvalSettings

    model, tokenizer, editor = setup(tiny_model_dir)
    settings = EvalSettings(task="mixed", method="mend", editor_sha256="0" * 64)
    out = tmp_path / "eval.json"
    evaluate_resuming(out, model, tokenizer, editor, records(), POOL, 0, settings, progress=False, protocol="teacher_forced")
    report = load_report_json(out)
    path = partial_path(out)
    identity = {"protocol": "both", "cases_together": 32}
    partial = PartialEvaluation(path, identity)
    assert partial.resume() == [] and path.is_file()
    partial.append(report.cases[:2])
    with open(path, "a") as f:
        f.write('{"cases": [{"index": 2, "sou')  # the run was killed while writing its next group
    with caplog.at_level("WARNING"):
        assert PartialEvaluation(path, identity).resume() == report.cases[:2]
    assert "line 3 was cut short" in caplog.text and len(path.read_text().splitlines()) == 2  # rewritten whole
    other = PartialEvaluation(path, identity | {"protocol": "teacher_forced"})
    with pytest.raises(ValueError, match=r"unfinished evaluation with different protocol \(e.g. protocol: 'both' there, "
                                         r"'teacher_forced' now\); pass --restart"):
        other.resume()
    assert other.resume(restart=True) == [] and len(path.read_text().splitlines()) == 1
    path.write_text("not json\n{}\n")
    with pytest.raises(ValueError, match=r"eval.partial.jsonl, line 1: not JSON"):
        PartialEvaluation(path, identity).resume()
    # results that are not this evaluation's cases (another data file under the same name) are refused by the runner
    stranger = dataclasses.replace(report.cases[0], source="other.json#0")
    with pytest.raises(ValueError, match=r"not one of this evaluation's cases: it is for other.json#0 \(counterfact\) at index 0"):
        evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, done=[stranger])
    with pytest.raises(ValueError, match="done_points and on_point are the points of a sequential evaluation's curve"):
        evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, on_point=print)


def test_an_interrupted_sequential_evaluation_makes_its_saved_edits_again_and_ends_as_the_uninterrupted_one(
        tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Every edit kept: the saved cases and curve points are not scored again, but their edits are made again in order
    (the edited weights were not saved), so the cases scored after resuming and the curve are the uninterrupted run's to
    the bit; a saved edit that is now refused (or kept) where it was not is an error; a single-edit run's partial file
    is not taken for a sequential one's."""
    from instructedit.evaluation import cache, runner
    from instructedit.evaluation.report import EvalSettings

    model, tokenizer, editor = setup(tiny_model_dir)
    many = records() * 2  # six cases: curve points after 1, 2, 4 and 6 edits
    options = {"protocol": "both", "progress": False, "sequential": True}
    settings = EvalSettings(task="mixed", method="mend", editor_sha256="0" * 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    whole = cache.evaluate_resuming(tmp_path / "whole.json", model, tokenizer, editor, many, POOL, 0, settings, **options)
    assert [p.edits for p in whole.sequential] == [1, 2, 4, 6]

    saved: list[int] = []
    real_append = cache.PartialEvaluation.append

    def append_then_stop(self, results):
        real_append(self, results)
        saved.append(len(results))
        if len(saved) == 3:  # after the third edit's case, before the curve's point at 4
            raise Interrupted

    out = tmp_path / "seq.json"
    monkeypatch.setattr(cache.PartialEvaluation, "append", append_then_stop)
    with pytest.raises(Interrupted):
        cache.evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, **options)
    monkeypatch.setattr(cache.PartialEvaluation, "append", real_append)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # the interrupted run restored the model
    entries = [json.loads(line) for line in cache.partial_path(out).read_text().splitlines()]
    assert entries[0]["partial_evaluation"]["sequential"] is True
    assert [len(e["cases"]) if "cases" in e else e["point"]["edits"] for e in entries[1:]] == [1, 1, 1, 2, 1]  # case 1, point 1, case 2, point 2, case 3

    # a single-edit evaluation under the same name is another question
    with pytest.raises(ValueError, match=r"unfinished evaluation with different outlier_factor, sequential \(e.g. outlier_factor: 50.0 there, None now\)"):
        cache.evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, protocol="both", progress=False)

    scored: list[str] = []
    real_asker = runner._asker
    monkeypatch.setattr(runner, "_asker", lambda model, generation, case: scored.append(case.record.source) or real_asker(model, generation, case))
    resumed = cache.evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, **options)
    assert len(scored) == 3 and resumed.timing["resumed_cases"] == 3  # only the three cases left were asked after their edit
    assert resumed.cases == whole.cases and resumed.sequential == whole.sequential and resumed.aggregates == whole.aggregates
    assert not cache.partial_path(out).exists() and all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())

    # an edit the interrupted run refused is kept when made again: that run's model cannot be rebuilt
    monkeypatch.setattr(cache.PartialEvaluation, "append", append_then_stop)
    saved.clear()
    with pytest.raises(Interrupted):
        cache.evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, **options)
    monkeypatch.setattr(cache.PartialEvaluation, "append", real_append)
    lines = cache.partial_path(out).read_text().splitlines()
    second = json.loads(lines[3])
    second["cases"][0]["refused"] = True
    lines[3] = json.dumps(second)
    cache.partial_path(out).write_text("\n".join(lines) + "\n")
    with pytest.raises(RuntimeError, match=r"edit 2 \(.*\) was refused by the interrupted run and is kept now.*--restart"):
        cache.evaluate_resuming(out, model, tokenizer, editor, many, POOL, 0, settings, **options)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_progress_bar_counts_cases_and_says_when_a_group_decodes(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The bar does not sit silently at a group's end: while its answers decode it says so, then clears the note."""
    from instructedit.evaluation import runner

    model, tokenizer, editor = setup(tiny_model_dir)
    seen: list[tuple[int, str]] = []
    usual = runner.gen.GenerationRun.answer_before_after

    def spy(self, *args, **kwargs):
        bar = next(b for b in runner.tqdm._instances if b.desc == "evaluate")
        seen.append((bar.n, bar.postfix or ""))
        return usual(self, *args, **kwargs)

    monkeypatch.setattr(runner.gen.GenerationRun, "answer_before_after", spy)
    evaluate(model, tokenizer, editor, records() * 2, POOL, 0, progress=True, cases_together=4)
    assert [n for n, _ in seen] == [4, 6]  # a group of four, then the last two
    assert [note for _, note in seen] == ["greedy answers of 4 cases before and after their edits",
                                          "greedy answers of 2 cases before and after their edits"]


def test_answers_begun_from_the_teacher_forced_pass_equal_answers_decoded_from_scratch(tiny_model_dir: Path,
                                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from instructedit.evaluation import before_after, runner

    model, tokenizer, editor = setup(tiny_model_dir)
    base = records()[:2]
    collator = Collator(tokenizer, 128, POOL)
    # targets and locality answers the unedited model says itself: its teacher-forced pass accepts their first tokens
    wrapped = [collator.wrap(r, r.prompt, 0) for r in base]
    said = greedy_generate(model, tokenizer, wrapped + [q.prompt for r in base for q in r.locality], 6)
    words = [first_line(t) or "x" for t in said]
    own = [EditRecord(task=r.task, prompt=r.prompt, target_new=words[i], rephrase=r.rephrase, portability=r.portability,
                      locality=tuple(QAItem(q.prompt, words[2 + sum(len(b.locality) for b in base[:i]) + k], q.kind)
                                     for k, q in enumerate(r.locality)), source=f"own#{i}")
           for i, r in enumerate(base)]
    cases = own + records()  # with the hand-made ones, whose targets the random model does not say
    seeds, prefilled = [], []
    real_seeds, real_prefill = runner.case_seeds, before_after._Prefill.__init__
    monkeypatch.setattr(runner, "case_seeds", lambda case, *a, **k: seeds.append((case.queries, real_seeds(case, *a, **k))) or seeds[-1][1])
    monkeypatch.setattr(before_after._Prefill, "__init__", lambda self, model, split, ids, *a, **k: prefilled.append(ids.shape[0])
                        or real_prefill(self, model, split, ids, *a, **k))
    alone = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, cases_together=1)
    assert not seeds
    together = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, cases_together=4)
    assert [c.answers for c in together.cases] == [c.answers for c in alone.cases]
    assert [c.gen_post for c in together.cases] == [c.gen_post for c in alone.cases]
    flat = [pair for _, case in seeds for pair in case]
    # every query but the plain question, ConvSent's response (scored for fluency) and the in-frame questions: no probe
    asked_as_probes = sum(a["form"] != "plain" and a["family"] not in ("fluency", "locality_in_frame") for c in together.cases for a in c.answers)
    assert sum(pair is not None for pair in flat) == asked_as_probes
    # the others are prefilled, each prompt once per group of cases decoded together (a plain question is also another
    # case's in-frame question: one prefill row, one unedited answer)
    distinct = [{q.prompt for queries, pairs in seeds[g : g + 4] for q, pair in zip(queries, pairs, strict=True) if pair is None}
                for g in range(0, len(seeds), 4)]
    assert sum(prefilled) == sum(map(len, distinct)) < len(flat) - asked_as_probes
    assert max(len(pair[0].given) for pair in flat if pair is not None) >= 2  # answers begun by several accepted tokens
    stops = set(stop_token_ids(tokenizer)[0].tolist()) | {tokenizer.eos_token_id}
    assert not any(set(seed.given) & stops for pair in flat if pair is not None for seed in pair)


def test_teacher_forced_protocol_keeps_todays_numbers(tiny_llama_dir: Path) -> None:
    model, tokenizer, editor = setup(tiny_llama_dir)
    tf = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, protocol="teacher_forced")
    both = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False)
    only_gen = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, protocol="generation")
    assert [(c.pre, c.post) for c in tf.cases] == [(c.pre, c.post) for c in both.cases]
    assert all(set(phases) == {"pre", "post"} for phases in tf.aggregates.values())
    assert all(not c.gen_post and not c.answers for c in tf.cases) and "generation_pre_s" not in tf.timing
    for task, phases in tf.aggregates.items():
        assert {k: s.mean for k, s in phases["post"].items()} == {k: s.mean for k, s in both.aggregates[task]["post"].items()}
    assert all(set(phases) == {"gen_pre", "gen_post"} for phases in only_gen.aggregates.values())
    assert [c.gen_post for c in only_gen.cases] == [c.gen_post for c in both.cases]
    assert "## Teacher-forced" not in markdown_report([only_gen]) and "## Generation (greedy, exact match)" not in markdown_report([tf])


def test_an_edit_input_carries_the_stop_token_and_probes_do_not(tiny_model_dir: Path) -> None:
    model, tokenizer, editor = setup(tiny_model_dir)
    collator = Collator(tokenizer, 256, POOL, answer_stop="newline")
    (case,), _ = prepare_cases(collator, records()[:1], 0, 16, torch.device("cpu"))
    newline = collator.stop_ids[0]
    assert [p.family for p in case.probes[:2]] == ["edit", "reliability"]
    assert case.edit.labels[0][case.edit.label_mask[0]][-1] == newline
    first = case.padded.chunks[0]
    assert first.labels[0][first.label_mask[0]][-1] == newline  # the edit row
    assert newline not in first.labels[1][first.label_mask[1]].tolist()  # the reliability probe scores the answer only
    assert torch.equal(case.padded.edit_view.label_mask[1:], torch.zeros_like(case.padded.edit_view.label_mask[1:]))
    plain = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, protocol="teacher_forced")
    stop = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, protocol="teacher_forced", answer_stop="newline")
    for a, b in zip(stop.cases, plain.cases):
        assert a.pre == pytest.approx(b.pre, abs=1e-6)  # the same pre-edit probes, scored on the answer alone
    slow = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, protocol="teacher_forced", answer_stop="newline", fast=False)
    for a, b in zip(stop.cases, slow.cases):
        assert a.post == pytest.approx(b.post, abs=1e-5)  # the packed, functional edit is the edit of ``apply``
    assert stop.settings.answer_stop == "newline"


def test_edits_made_in_the_wrapped_and_the_chat_form(tiny_chat_llama_dir: Path, tmp_path: Path) -> None:
    from instructedit.evaluation.cache import cached_report

    model, tokenizer, editor = setup(tiny_chat_llama_dir, "editor.aggregation=least_squares")
    cases = records()  # ConvSent's edits are made in the wrapped form only (two responses: two edit rows either way)
    wrapped = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, protocol="teacher_forced")
    both = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, protocol="teacher_forced", edit_forms=("wrapped", "chat"))
    slow = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, protocol="teacher_forced", edit_forms=("wrapped", "chat"),
                    fast=False)
    for a, b in zip(both.cases, slow.cases):  # least squares takes each edit row's NLL on its own, packed or not
        assert a.post == pytest.approx(b.post, abs=1e-5)  # the packed, functional edit of two edit rows is the edit of ``apply``
    assert [c.pre for c in both.cases] == [c.pre for c in wrapped.cases]
    bare = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, protocol="teacher_forced", edit_forms=("wrapped", "plain"))
    bare_slow = evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, protocol="teacher_forced", edit_forms=("wrapped", "plain"),
                         fast=False)
    for a, b in zip(bare.cases, bare_slow.cases):  # the bare question as the second edit row: packed or not, the same edit
        assert a.post == pytest.approx(b.post, abs=1e-5)
    assert [c.post for c in bare.cases] != [c.post for c in wrapped.cases] and bare.settings.edit_forms == ["wrapped", "plain"]
    (case,), _ = prepare_cases(Collator(tokenizer, 256, POOL, edit_forms=("wrapped", "chat")), cases[:1], 0, 16, torch.device("cpu"))
    assert case.edit.n_rows == 2 and (case.probes[1].family, case.probes[1].prompt) == ("edit", f"User: {cases[0].prompt}\nAssistant:")
    assert both.settings.edit_forms == ["wrapped", "chat"] and wrapped.settings.edit_forms == ["wrapped"]
    assert "edits made in wrapped + chat" in markdown_report([both])
    path = tmp_path / "both.json"
    write_report_json(both, path)
    assert cached_report(path, both.settings) is not None
    assert cached_report(path, dataclasses.replace(both.settings, edit_forms=["wrapped"])) is None  # made otherwise: evaluated again
    assert cached_report(path, dataclasses.replace(both.settings, step_scale=1.5)) is None  # at other step sizes: again
    template, tokenizer.chat_template = tokenizer.chat_template, None
    try:
        with pytest.raises(ValueError, match="edit form 'chat' needs a tokenizer with a chat template"):
            evaluate(model, tokenizer, editor, cases, POOL, 0, progress=False, edit_forms=("wrapped", "chat"))
    finally:
        tokenizer.chat_template = template


# --- the report ---------------------------------------------------------------------------------


def test_report_tags_protocols_with_intervals_and_reads_old_reports(tiny_gpt2_dir: Path, tmp_path: Path) -> None:
    model, tokenizer, editor = setup(tiny_gpt2_dir)
    report = evaluate(model, tokenizer, editor, records() * 2, POOL, 0, progress=False)
    data = report.to_dict()
    cf = data["aggregates"]["counterfact"]
    assert {s["protocol"] for s in cf["post"].values()} == {"teacher_forced"}
    assert {s["protocol"] for s in cf["gen_post"].values()} == {"generation"}
    for summary in [*cf["post"].values(), *cf["gen_pre"].values(), *cf["gen_post"].values()]:
        assert summary["ci_low"] <= summary["mean"] <= summary["ci_high"]
    assert cf["gen_post"]["gen_reliability"]["n"] == 4 and "gen_locality" not in cf["gen_pre"]
    assert {"gen_reliability_f1", "gen_reliability_plain", "gen_generalization", "gen_portability", "gen_locality"} <= set(cf["gen_post"])
    s = data["settings"]
    assert (s["protocol"], s["answer_stop"], s["queries"], s["generation_margin"]) == ("both", "none", ["wrapped", "plain", "chat"], 8)
    assert {"pre", "post", "question", "target"} <= set(data["cases"][0]["answers"][0])
    (tmp_path / "r.json").write_text(json.dumps(data))
    again = load_report_json(tmp_path / "r.json")
    assert again.aggregates == report.aggregates and again.cases == report.cases and again.settings == report.settings
    zipped = write_report_json(report, tmp_path / "r.json.gz")  # gzipped by its name, the same bytes each time
    assert zipped.read_bytes() == write_report_json(report, tmp_path / "again.json.gz").read_bytes()
    assert gzip.decompress(zipped.read_bytes()) == write_report_json(report, tmp_path / "plain.json").read_bytes()
    assert load_report_json(zipped).cases == report.cases

    old = json.loads(json.dumps(data))
    old["aggregates"] = {"counterfact": {"post": {"reliability": {"mean": 0.5, "n": 2}}}}
    for key in ("protocol", "answer_stop", "queries", "generation_margin", "judge"):
        del old["settings"][key]
    for case in old["cases"]:
        for key in ("gen_pre", "gen_post", "answers"):
            del case[key]
    legacy = EvalReport.from_dict(old)
    summary = legacy.aggregates["counterfact"]["post"]["reliability"]
    assert (summary.protocol, summary.low, summary.high) == ("teacher_forced", None, None)
    assert legacy.settings.protocol == "teacher_forced" and legacy.cases[0].gen_post == {}
    assert "| 50.0 |" in markdown_report([legacy])  # no interval: the mean alone

    text = markdown_report([report])
    assert "## Teacher-forced: post-edit (%)" in text and "## Generation (greedy, exact match): post-edit (%)" in text
    post = cf["post"]["reliability"]
    assert f"{100 * post['mean']:.1f} [{100 * post['ci_low']:.1f}, {100 * post['ci_high']:.1f}]" in text
    assert "answers to the edit prompt" in text and "The capital of France is" in text


# --- the command and the judge ------------------------------------------------------------------


def test_judge_verdicts_through_a_fake_endpoint(tiny_gpt2_dir: Path, fake_openai: type) -> None:
    assert (parse_verdict("Yes."), parse_verdict(" no, it names Paris"), parse_verdict("maybe")) == (1.0, 0.0, None)
    model, tokenizer, editor = setup(tiny_gpt2_dir)
    with fake_openai(["Yes."]) as server:
        judge = LLMJudge(OpenAIProposer(model="fake-judge", base_url=server.url, temperature=0.0, max_tokens=4, timeout=5))
        report = evaluate(model, tokenizer, editor, records(), POOL, 0, progress=False, protocol="generation", judge=judge)
    asked = [c for c in report.cases if c.task == "counterfact"]
    for case in asked:
        said = {a["form"]: (a["pre"], a["post"]) for a in case.answers if a["family"] == "reliability"}["wrapped"]
        assert case.gen_pre["gen_reliability_judge"] == float(bool(normalize_answer(said[0])))  # an empty answer is 'no' without a call
        assert case.gen_post["gen_reliability_judge"] == float(bool(normalize_answer(said[1])))
    assert len(server.requests) == judge.calls and judge.failures == 0 and report.settings.judge == "judge:openai:fake-judge"
    assert server.requests  # the tiny models say something: the judge was asked
    body = server.requests[0]["body"]
    assert body["model"] == "fake-judge" and body["temperature"] == 0.0
    assert "Expected answer: Rome" in body["messages"][1]["content"] or "Expected answer: piano" in body["messages"][1]["content"]
    with fake_openai([], status=503) as down:
        failing = LLMJudge(OpenAIProposer(model="fake-judge", base_url=down.url, timeout=5))
        assert failing.verdict("q", "Rome", "Rome") is None and failing.failures == 1  # an endpoint error: no verdict, no crash
    with fake_openai(["I cannot tell"]) as vague:
        unclear = LLMJudge(OpenAIProposer(model="fake-judge", base_url=vague.url, timeout=5))
        assert unclear.verdict("q", "Rome", "Rome") is None and unclear.failures == 1


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser()
    add_evaluate_parser(p.add_subparsers(dest="command"))
    return p


def knowedit_file(path: Path) -> Path:
    rows = [{"subject": "France", "prompt": "The capital of France is", "target_new": "Rome", "ground_truth": "Paris",
             "locality": {"Relation_Specificity": [{"prompt": "The gender of Ingrid is", "ground_truth": "female"}]}},
            {"subject": "John Lennon", "prompt": "John Lennon performs on the", "target_new": "piano", "ground_truth": "guitar"}]
    path.write_text(json.dumps(rows))
    return path


def test_evaluate_command_protocols_answer_stop_and_judge(tiny_llama_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          capsys: pytest.CaptureFixture, fake_openai: type) -> None:
    _, _, editor = setup(tiny_llama_dir)
    folder = editor.save_pretrained(tmp_path / "editor", extra={"queries": {"instructions": True, "answer_stop": "newline"}})
    assert query_setup(folder)["answer_stop"] == "newline" and query_setup(tmp_path)["answer_stop"] == "none"
    data = knowedit_file(tmp_path / "cf.json")
    common = ["evaluate", "--editor", str(folder), "--task", "counterfact", "--data", str(data), "--no-progress", "--device", "cpu"]
    runs = {}
    for protocol, ending in (("teacher_forced", ".json"), ("both", ".json.gz")):  # .json.gz: written gzipped, Markdown as FILE.md
        out = tmp_path / f"{protocol}{ending}"
        args = parser().parse_args([*common, "--protocol", protocol, "--answer-stop", "none", "--output", str(out)])
        assert args.func(args) == 0
        runs[protocol] = read_json(out)
        assert out.read_bytes()[:2] == (b"\x1f\x8b" if ending == ".json.gz" else b"{\n") and (tmp_path / f"{protocol}.md").is_file()
    assert load_report_json(tmp_path / "both.json.gz").to_dict() == runs["both"]
    tf, both = runs["teacher_forced"]["aggregates"]["counterfact"], runs["both"]["aggregates"]["counterfact"]
    assert set(tf) == {"pre", "post"} and set(both) == {"pre", "post", "gen_pre", "gen_post"}
    assert {k: v["mean"] for k, v in tf["post"].items()} == {k: v["mean"] for k, v in both["post"].items()}
    printed = capsys.readouterr().out.splitlines()
    # the headline: one row per metric, the protocols side by side (teacher-forced only: one column)
    header = next(i for i, line in enumerate(printed) if "teacher-forced" in line and "generation (said)" in line)
    rows = {line.split("  ")[1].strip(): line for line in printed[header + 1 :] if line.startswith("  ")}
    assert {"reliability", "reliability, plain prompt", "locality"} <= set(rows) and ("generalization" in rows) == ("generalization" in both["post"])
    post = both["post"]
    assert f"{100 * post['reliability']['mean']:.1f} [" in rows["reliability"] and f"n={post['reliability']['n']}" in rows["reliability"]
    gen = both["gen_post"]["gen_reliability_plain"]
    assert rows["reliability, plain prompt"].split("  ", 2)[2].strip().startswith(f"{100 * gen['mean']:.1f} [")  # generation column only
    tf_only = next(i for i, line in enumerate(printed) if line.strip() == "teacher-forced")  # the first run: no generation column
    assert tf_only < header and not any("plain prompt" in line for line in printed[tf_only:header])

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.delenv("OPENAI_MODEL", raising=False)
    with fake_openai(["no"]) as server:
        monkeypatch.setenv("OPENAI_BASE_URL", server.url)
        out = tmp_path / "judged.json"
        args = parser().parse_args([*common, "--protocol", "generation", "--judge", "--judge-model", "fake", "--output", str(out)])
        assert args.func(args) == 0
    report = json.loads(out.read_text())
    assert report["settings"]["answer_stop"] == "newline" and report["settings"]["edit_forms"] == ["wrapped"]  # from the editor folder
    args = parser().parse_args([*common, "--edit-forms", "wrapped,chat", "--output", str(tmp_path / "chat.json")])
    with pytest.raises(ValueError, match="edit form 'chat' needs a tokenizer with a chat template"):
        args.func(args)  # the tiny model's tokenizer has none
    with pytest.raises(ValueError, match="--edit-forms: .* must be distinct forms"):
        args = parser().parse_args([*common, "--edit-forms", "shouted", "--output", str(tmp_path / "x.json")])
        args.func(args)
    assert report["settings"]["judge"] == "judge:openai:fake" and report["settings"]["protocol"] == "generation"
    post = report["aggregates"]["counterfact"]["gen_post"]
    assert post["gen_reliability_judge"]["mean"] == 0.0 and post["gen_reliability_judge"]["protocol"] == "generation"
    args = parser().parse_args([*common, "--protocol", "teacher_forced", "--output", str(tmp_path / "x-1.5.json.gz")])
    assert args.func(args) == 0 and (tmp_path / "x-1.5.md").is_file()  # the Markdown keeps the name's own dots


def test_prefill_batches_are_cut_where_padding_costs_more_than_a_pass():
    from instructedit.evaluation.before_after import PREFILL_CALL_TOKENS, _pieces

    short, long = [[1 + i] * 6 for i in range(10)], [[20 + i] * 40 for i in range(10)]  # no shared prefix
    encoded = short + long
    assert _pieces(encoded, range(20)) == [(list(range(10)), 0), (list(range(10, 20)), 0)]  # 10·34 padded tokens > one pass
    same = [[3] * 12 for _ in range(8)]
    assert _pieces(same, range(8)) == [(list(range(8)), 11)]  # nothing to gain: one pass (all but one token shared)
    near = [[40 + i] * 10 for i in range(4)] + [[50 + i] * 11 for i in range(4)]  # 4 padded tokens: fewer than a pass costs
    assert len(_pieces(near, range(8))) == 1 and PREFILL_CALL_TOKENS > 4


def test_decode_rows_shrink_with_the_models_key_value_size():
    """One decoding loop holds fewer rows for a model whose keys and values per token are larger (a bounded cache)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from instructedit.evaluation.before_after import DECODE_ROWS, decode_rows_for

    def rows(layers: int, hidden: int, dtype: torch.dtype) -> int:
        config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=hidden // 64, intermediate_size=8,
                             vocab_size=16)
        with torch.device("meta"):
            return decode_rows_for(LlamaForCausalLM(config).to(dtype))

    assert rows(2, 64, torch.float32) == DECODE_ROWS  # tiny: the row cap
    big = rows(32, 4096, torch.bfloat16)  # a 7B LLaMA's shape: 512 KB per token
    assert 16 <= big < DECODE_ROWS and rows(32, 4096, torch.float32) < big


def test_roomy_cache_layer_matches_a_growing_one_and_keeps_rows_in_place():
    """RoomyLayer: decoding writes into reserved room (and past it) with the keys and values DynamicLayer's concatenation
    gives; compacting keeps exactly the unfinished rows, moving only those past the kept count."""
    from transformers.cache_utils import DynamicLayer

    from instructedit.evaluation.generation import RoomyLayer, compacted

    torch.manual_seed(0)
    keys, values = torch.randn(5, 2, 3, 4), torch.randn(5, 2, 3, 4)
    plain, roomy = DynamicLayer(), RoomyLayer.padded([(keys[:2], values[:2]), (keys[2:, :, 1:], values[2:, :, 1:])], room=2)
    assert roomy.get_seq_length() == 3 and torch.equal(roomy.keys[2:, :, 0], torch.zeros(3, 2, 4))  # left padding: zeros
    plain.update(roomy.keys.clone(), roomy.values.clone())
    for _ in range(4):  # two steps fit the room, then the buffers grow
        k, v = torch.randn(5, 2, 1, 4), torch.randn(5, 2, 1, 4)
        assert all(torch.equal(a, b) for a, b in zip(roomy.update(k, v), plain.update(k, v)))
    done = torch.tensor([True, False, False, True, False])
    order = compacted(done)
    assert sorted(order.tolist()) == [1, 2, 4] and order[1:].tolist() == [1, 2]  # rows 1 and 2 stay, row 4 fills row 0
    roomy.batch_select_indices(order)
    plain.batch_select_indices(order)
    assert torch.equal(roomy.keys, plain.keys) and torch.equal(roomy.values, plain.values)
    k, v = torch.randn(3, 2, 1, 4), torch.randn(3, 2, 1, 4)
    assert all(torch.equal(a, b) for a, b in zip(roomy.update(k, v), plain.update(k, v)))
    # rows appended as copies of others (a lower row parting: lower_rows), in spare rows and past them
    spare = RoomyLayer.padded([(keys[:2], values[:2])], room=1, spare_rows=1)
    assert spare.keys.shape[0] == 2
    spare.append_copies([1])
    spare.append_copies([0, 2])  # past the spare row: the buffers grow
    assert torch.equal(spare.keys, keys[[0, 1, 1, 0, 1]]) and torch.equal(spare.values, values[[0, 1, 1, 0, 1]])
    k, v = torch.randn(5, 2, 1, 4), torch.randn(5, 2, 1, 4)
    assert torch.equal(spare.update(k, v)[0], torch.cat([keys[[0, 1, 1, 0, 1]], k], dim=2))


def test_a_group_cut_into_several_prefill_batches_passes_its_shared_start_once(tiny_model_dir: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from instructedit.evaluation import before_after
    from instructedit.evaluation.row_edits import per_row_updates

    model, tokenizer, editor = setup(tiny_model_dir)
    split = editor.split(model)
    template = "Task: zsre\nDescription: Answer the question about the entity with a short phrase.\nInput: {}\nOutput:"
    long = "Name the author of the book that was written in the north of the country in the nineteenth century by a painter"
    prompts = [template.format(q) for q in ("Who?", "Why?", "When?", "Where?")] + [template.format(f"{long} {i}?") for i in range(4)]
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    chunks = before_after._chunks(encoded, 8)
    assert len(chunks) == 2 and chunks[0][1] == chunks[1][1] >= 8  # two batches, one shared start
    made = []
    real_init = before_after._SharedStart.__init__
    monkeypatch.setattr(before_after._SharedStart, "__init__", lambda self, *a, **k: (made.append(1), real_init(self, *a, **k))[-1])
    transposed = {w.name: w.transposed for w in editor.weights}
    torch.manual_seed(2)
    updates = [{w.name: torch.randn_like(model.get_parameter(w.name)) * 0.5 for w in editor.weights} for _ in prompts]
    budgets = [4, 6, 2, 5, 3, 6, 4, 1]
    before, (after,) = before_after.greedy_before_after(model, tokenizer, split, prompts, budgets, lambda v, i: updates[i], transposed,
                                                        batch_size=8)
    assert made == [1]
    assert before == greedy_generate(model, tokenizer, prompts, budgets, batch_size=8)
    assert after == greedy_generate(model, tokenizer, prompts, budgets, batch_size=8,
                                    rows_context=lambda rows: per_row_updates(model, [updates[i] for i in rows], transposed))
    assert any(b != a for b, a in zip(before, after))


def test_prefill_groups_the_prompts_it_prefills_where_a_shared_start_pays():
    from instructedit.evaluation.before_after import _chunks

    plain = [[1, 2, 3, 4, 5, 6, 7, 8, 9, 10 + i] for i in range(3)]  # 9 shared tokens: 27 saved, fewer than two passes cost
    others = [[200 + i] * (5 + i) for i in range(3)]
    templated = [list(range(100, 130)) + [300 + i] for i in range(6)]  # 30 shared tokens: 180 saved
    seeded_twin = [plain[0] + [50, 51]]  # begins like a plain prompt but is not prefilled (its seed is given)
    encoded = plain + others + templated + seeded_twin
    chunks = _chunks(encoded, 32, [False] * 12 + [True])
    # the short prompts prefill together in one pass (before, the seeded twin made the first plain prompt a group of its
    # own, one pass for one row); the templated ones in one with their 30 tokens passed once; the seeded one last
    assert chunks == [([3, 4, 5, 0, 1, 2], 0), (list(range(6, 12)), 30), ([12], None)]


def test_evaluate_and_edit_a_bfloat16_model(tiny_llama_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--dtype bfloat16 loads the model to edit in bfloat16 (the editor stays float32): evaluate with both protocols and a
    single edit run on it, the report records the precision, and the weights come back bit for bit."""
    from instructedit.cli import main

    _, _, editor = setup(tiny_llama_dir)
    folder = editor.save_pretrained(tmp_path / "editor")
    data = knowedit_file(tmp_path / "cf.json")
    out = tmp_path / "bf16.json"
    assert main(["evaluate", "--editor", str(folder), "--model", str(tiny_llama_dir), "--task", "counterfact", "--data", str(data),
                 "--device", "cpu", "--dtype", "bfloat16", "--no-progress", "--output", str(out)]) == 0
    report = load_report_json(out)
    assert report.settings.model_dtype == "bfloat16" and report.restoration["verified"]
    post = report.aggregates["counterfact"]
    assert 0 <= post["post"]["reliability"].mean <= 1 and 0 <= post["gen_post"]["gen_locality"].mean <= 1
    assert main(["edit", "--editor", str(folder), "--model", str(tiny_llama_dir), "--device", "cpu", "--dtype", "bfloat16",
                 "--prompt", "The capital of France is", "--target", "Rome"]) == 0
    assert "restored" in capsys.readouterr().out
