"""Instruction construction: candidate parsing, the stopping rule, outputs, an OpenAI-compatible fake server, a local tiny model."""

from __future__ import annotations

import argparse
import json
from importlib import resources
from pathlib import Path

import pytest
import torch

from instructedit.commands.analyze import add_analyze_parser
from instructedit.commands.instructions import add_instructions_parser
from instructedit.analysis.optimize import EditorScorer, OptimizeSettings, improves, optimize_instructions, result_pool
from instructedit.analysis.proposers import LocalProposer, OpenAIProposer, ProposerError, make_proposer, parse_candidates
from instructedit.config import load_config, save_config
from instructedit.editors.registry import build_editor
from instructedit.models.loading import load_model
from instructedit.tasks.instructions import InstructionPool
from instructedit.tasks.splits import load_task_splits

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
BASE = InstructionPool.default()


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: tiny models run fastest on one thread


# --- parsing ----------------------------------------------------------------------------------------------


def test_parse_candidates_takes_numbered_lines_and_cleans_them() -> None:
    text = """Here are five improved descriptions:

1. "Replace the fact the model recalls about the subject with the new counterfactual object."
2) **Description:** Teach the model one altered fact and keep every other fact unchanged.
- 'Swap a stored association for a counterfactual answer.'
3. Replace the fact the model recalls about the subject with the new counterfactual object.
4. Too short.
5. """ + "word " * 80 + """
6. Edit the [TOPIC] opinion to [LABEL].
7. Overwrite a memorized triple of an obscure entity with the counterfactual value given.

I hope these help!"""
    accepted, rejected = parse_candidates(text, "counterfact", exclude=["Overwrite a memorized triple of an obscure entity with the counterfactual value given"])
    assert accepted == [
        "Replace the fact the model recalls about the subject with the new counterfactual object.",
        "Teach the model one altered fact and keep every other fact unchanged.",
        "Swap a stored association for a counterfactual answer.",
    ]
    reasons = [r["reason"] for r in rejected]
    assert reasons == ["duplicate", "fewer than 3 words", "longer than 300 characters", "[LABEL]/[TOPIC] are only filled in for ['convsent']", "duplicate"]


def test_convsent_candidates_need_both_placeholders() -> None:
    text = "Make the chatbot talk about [topic] with a [Label] sentiment.\nMake the chatbot sound positive about things.\nGive [TOPIC] a new tone."
    accepted, rejected = parse_candidates(text, "convsent")
    assert accepted == ["Make the chatbot talk about [TOPIC] with a [LABEL] sentiment."]
    assert all("must contain [LABEL] and [TOPIC]" in r["reason"] for r in rejected) and len(rejected) == 2


def test_unnumbered_answers_use_every_line() -> None:
    accepted, _ = parse_candidates("Add a recent fact to the model.\n\nInsert newly created knowledge from WikiData.", "wikirecent")
    assert accepted == ["Add a recent fact to the model.", "Insert newly created knowledge from WikiData."]


def test_named_candidates_lose_their_names() -> None:
    text = '- "relabeling" - Rewrite the relation of the subject to the new object.\n- **Precise edit**: Replace one stored fact with the new one.'
    accepted, _ = parse_candidates(text, "counterfact")
    assert accepted == ["Rewrite the relation of the subject to the new object.", "Replace one stored fact with the new one."]


def test_improvement_is_lexicographic() -> None:
    assert improves((0.5, 0.1), None)
    assert improves((0.6, 0.0), (0.5, 0.9)) and not improves((0.5, 0.9), (0.5, 0.9))
    assert improves((0.5, 0.95), (0.5, 0.9)) and not improves((0.4, 1.0), (0.5, 0.0))
    assert not improves((0.52, 0.0), (0.5, 0.0), min_delta=0.05)


def test_result_pool_replaces_or_extends_one_task_only() -> None:
    base = json.loads(resources.files("instructedit.tasks").joinpath("descriptions.json").read_text())
    ranked = [f"New description number {i} for counterfact." for i in range(3)]
    replaced = result_pool(base, "counterfact", ranked, keep=10, mode="replace")
    assert replaced["descriptions"]["counterfact"][:3] == ranked and len(replaced["descriptions"]["counterfact"]) == 10
    assert replaced["descriptions"]["counterfact"][3:] == base["descriptions"]["counterfact"][:7]
    assert replaced["descriptions"]["zsre"] == base["descriptions"]["zsre"] and replaced["seen"] == base["seen"]
    extended = result_pool(base, "counterfact", ranked + base["descriptions"]["counterfact"][:1], keep=10, mode="extend")
    assert extended["descriptions"]["counterfact"] == base["descriptions"]["counterfact"] + ranked


# --- the loop with an injected scorer ---------------------------------------------------------------------


class ScriptedProposer:
    """Answers round r with the r-th scripted text and remembers every conversation."""

    name = "scripted"

    def __init__(self, answers: list[str]) -> None:
        self.answers, self.calls = answers, []

    def complete(self, messages, n):
        self.calls.append(messages)
        return self.answers[len(self.calls) - 1]


def scripted_round(r: int, k: int = 2) -> str:
    return "\n".join(f"{i + 1}. Candidate {i} of round {r} for the counterfact task." for i in range(k))


def table_scorer(round_scores: dict[int, float], base: float = 0.1):
    """Round r's candidates score ``round_scores[r]``; everything else (the base pool) scores ``base``."""
    def score(text: str) -> dict[str, float]:
        for r, value in round_scores.items():
            if f"of round {r} " in text:
                return {"reliability": value + (0.01 if "Candidate 1" in text else 0.0), "locality": 0.9}
        return {"reliability": base, "locality": 1.0}

    return score


def test_loop_stops_after_exactly_patience_rounds_without_improvement(tmp_path: Path) -> None:
    proposer = ScriptedProposer([scripted_round(r) for r in range(1, 10)])
    scores = {1: 0.3, 2: 0.5, 3: 0.4, 4: 0.2, 5: 0.9}  # improves twice, then plateaus
    settings = OptimizeSettings(task="counterfact", rounds=9, patience=2, candidates=2)
    result = optimize_instructions(proposer, table_scorer(scores), settings, tmp_path)
    assert result["rounds_run"] == 4 and result["stop_reason"] == "patience" and len(proposer.calls) == 4
    assert result["best"]["text"] == "Candidate 1 of round 2 for the counterfact task." and result["improved_over_base"]
    log = [json.loads(line) for line in (tmp_path / "rounds.jsonl").read_text().splitlines()]
    assert [e["round"] for e in log] == [0, 1, 2, 3, 4] and len(log[0]["candidates"]) == 10
    assert [e["improved"] for e in log] == [True, True, True, False, False] and [e["stale_rounds"] for e in log[1:]] == [0, 0, 1, 2]
    assert log[4]["best"]["metrics"]["reliability"] == pytest.approx(0.51)
    pool = InstructionPool.from_file(tmp_path / "descriptions.json")
    assert pool.descriptions["counterfact"][0] == result["best"]["text"] and len(pool.descriptions["counterfact"]) == 10
    assert pool.descriptions["convsent"] == BASE.descriptions["convsent"]
    assert (tmp_path / "optimize.png").read_bytes()[:4] == b"\x89PNG" and (tmp_path / "optimize.json").is_file()
    # The proposer sees the scores of the earlier rounds.
    second_prompt = proposer.calls[1][-1]["content"]
    assert "reliability 30.0" in second_prompt and "Candidate 0 of round 1 for the counterfact task." in second_prompt


def test_rounds_without_usable_candidates_count_towards_patience(tmp_path: Path) -> None:
    proposer = ScriptedProposer(["I cannot help with that:", "", "1. ok"])
    settings = OptimizeSettings(task="counterfact", rounds=5, patience=3, candidates=2)
    result = optimize_instructions(proposer, table_scorer({}), settings, tmp_path)
    assert result["rounds_run"] == 3 and result["stop_reason"] == "patience" and not result["improved_over_base"]
    with pytest.raises(ValueError, match="no description"):
        optimize_instructions(ScriptedProposer(["", ""]), table_scorer({}), OptimizeSettings(task="zsre", rounds=2, baseline=False), tmp_path / "b")


# --- OpenAI-compatible proposer against a fake server -------------------------------------------------------


def test_openai_proposer_loop_sends_previous_scores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                    fake_openai: type) -> None:
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    with fake_openai([scripted_round(r) for r in range(1, 10)]) as server:
        proposer = make_proposer("openai", model="fake-model", base_url=server.url, timeout=5)
        settings = OptimizeSettings(task="counterfact", rounds=9, patience=2, candidates=2, baseline=False)
        result = optimize_instructions(proposer, table_scorer({1: 0.3, 2: 0.5, 3: 0.5, 4: 0.1}), settings, tmp_path)
    assert result["rounds_run"] == 4 and result["proposer"] == "openai:fake-model"
    first, second = server.requests[0], server.requests[1]
    assert first["path"] == "/v1/chat/completions" and first["auth"] == "Bearer sk-test"
    assert first["body"]["model"] == "fake-model" and [m["role"] for m in first["body"]["messages"]] == ["system", "user"]
    assert "not scored yet" in first["body"]["messages"][1]["content"]  # no baseline: the base descriptions as examples
    prompt = second["body"]["messages"][1]["content"]
    assert "reliability 31.0, locality 90.0" in prompt and "Candidate 1 of round 1 for the counterfact task." in prompt
    assert "ranked by reliability, ties broken by locality" in prompt


def test_openai_proposer_errors_are_clear(monkeypatch: pytest.MonkeyPatch, fake_openai: type) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    with pytest.raises(ValueError, match="OPENAI_API_KEY"):
        OpenAIProposer()
    with fake_openai([], status=503) as server:
        with pytest.raises(ProposerError, match="HTTP 503.*overloaded"):
            OpenAIProposer(base_url=server.url).complete([{"role": "user", "content": "hi"}], 1)
        assert len(server.requests) == 1  # no retries
    with fake_openai([]) as server:
        dead = server.url
    with pytest.raises(ProposerError, match="cannot reach"):
        OpenAIProposer(base_url=dead, timeout=2).complete([{"role": "user", "content": "hi"}], 1)
    with pytest.raises(ValueError, match="valid proposers"):
        make_proposer("claude")


# --- with a real tiny editor --------------------------------------------------------------------------------


def save_run(model_dir: Path, run: Path) -> Path:
    config = load_config(TINY, [f"model.name={model_dir}", "editor.init_edit_lr=5.0"])
    model, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    run.mkdir(parents=True)
    save_config(config, run / "config.yaml")
    return build_editor(model, config).save_pretrained(run / "best")


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="instructedit")
    sub = parser.add_subparsers(dest="command")
    add_analyze_parser(sub)
    add_instructions_parser(sub)
    return parser.parse_args(argv)


def test_local_proposer_on_a_tiny_model_without_chat_template(tiny_llama_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model(str(tiny_llama_dir))
    proposer = LocalProposer(model, tokenizer, model_name="tiny", max_new_tokens=16, seed=1)
    assert not proposer.has_chat_template
    messages = [{"role": "system", "content": "You write instructions."}, {"role": "user", "content": "Task: counterfact. Write 2."}]
    text, prefix = proposer.prompt_text(messages)
    assert text.endswith("Write 2.\n\n1.") and prefix == "1."
    state = torch.random.get_rng_state()
    first = proposer.complete(messages, 2)
    assert torch.equal(state, torch.random.get_rng_state())  # the caller's RNG is untouched
    again = LocalProposer(model, tokenizer, model_name="tiny", max_new_tokens=16, seed=1).complete(messages, 2)
    assert first == again and first.startswith("1.") and first.count("1.") >= 2

    from instructedit.editors.mend import MENDEditor

    editor = MENDEditor.from_pretrained(save_run(tiny_llama_dir, tmp_path / "run"))
    records = load_task_splits("counterfact").val[:2]
    scorer = EditorScorer(model, tokenizer, editor, records, "counterfact", BASE.template)
    metrics = scorer(BASE.descriptions["counterfact"][0])
    assert set(metrics) >= {"reliability", "locality"} and all(0 <= v <= 1 for v in metrics.values())
    settings = OptimizeSettings(task="counterfact", rounds=3, patience=1, candidates=2)
    result = optimize_instructions(proposer, scorer, settings, tmp_path / "out")
    assert 1 <= result["rounds_run"] <= 3 and scorer.calls >= 11
    assert len(InstructionPool.from_file(tmp_path / "out" / "descriptions.json").descriptions["counterfact"]) == 10
    log = [json.loads(line) for line in (tmp_path / "out" / "rounds.jsonl").read_text().splitlines()]
    assert log[0]["round"] == 0 and log[1]["raw"].startswith("1.")


def test_optimize_command_end_to_end_with_a_fake_endpoint(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                          fake_openai: type) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    best = save_run(tiny_gpt2_dir, tmp_path / "run")
    answer = "1. Make the model say the new object for the subject.\n2. Insert a new fact about the subject into the model."
    with fake_openai([answer, answer]) as server:
        args = parse(["instructions", "optimize", "--task", "counterfact", "--editor", str(best), "--proposer", "openai",
                      "--base-url", server.url, "--proposer-model", "fake", "--rounds", "3", "--patience", "1", "--candidates", "2",
                      "--limit", "2", "--device", "cpu", "--output", str(tmp_path / "out")])
        assert args.func(args) == 0
    summary = json.loads((tmp_path / "out" / "optimize.json").read_text())
    assert summary["editor"] == str(best) and summary["split"] == "val" and summary["limit"] == 2
    assert summary["rounds_run"] in (1, 2, 3) and (tmp_path / "out" / "descriptions.json").is_file()
    assert server.requests[0]["auth"] is None  # no key needed for a local endpoint
    with fake_openai([], status=500) as server:
        args = parse(["instructions", "optimize", "--task", "counterfact", "--editor", str(best), "--proposer", "openai",
                      "--base-url", server.url, "--limit", "1", "--rounds", "1", "--no-baseline", "--device", "cpu",
                      "--output", str(tmp_path / "fail")])
        assert args.func(args) == 2
