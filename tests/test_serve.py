"""The demo web app (`instructedit serve`): apply, predict, roll back bit for bit, input validation, and the command."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from torch import nn

from instructedit.api import load_editor
from instructedit.cli import build_parser, main
from instructedit.models.loading import load_model
from instructedit.records import TASKS
from instructedit.serve import ServeLimits, create_app, is_loopback

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPT = "The capital of France is"
EDIT = {"prompt": PROMPT, "target": "guitar", "task": "counterfact"}
PAGE_IDS = ("prompt", "target", "task", "apply", "before-top", "after-top", "edits", "rollback-all", "predict-prompt", "predict",
            "predict-top", "error")


def weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same_weights(before: dict[str, torch.Tensor], model: nn.Module) -> bool:
    now = model.state_dict()
    return before.keys() == now.keys() and all(torch.equal(before[k], now[k]) for k in before)


@pytest.fixture(scope="module")
def gpt2_editor(tiny_gpt2_dir: Path, tmp_path_factory: pytest.TempPathFactory, save_tiny_editor: Callable[..., Path]) -> Path:
    # A descending step: the edit makes the target the top prediction (checked in test_apply_...).
    return save_tiny_editor(tiny_gpt2_dir, tmp_path_factory.mktemp("editor"), edit_lr=-1.0)


def serve(model_dir: Path, editor_dir: Path, **limits: int) -> tuple[TestClient, nn.Module]:
    model, tok = load_model(str(model_dir))
    app = create_app(load_editor(editor_dir), model, tok, model_name="tiny", editor_name="tiny-editor",
                     limits=ServeLimits(**{"max_new_tokens": 4, **limits}))
    return TestClient(app), model


@pytest.fixture
def client(tiny_gpt2_dir: Path, gpt2_editor: Path) -> Iterator[tuple[TestClient, nn.Module]]:
    test_client, model = serve(tiny_gpt2_dir, gpt2_editor)
    with test_client:
        yield test_client, model


def ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    return response.json()


def test_page_and_info_are_served(client: tuple[TestClient, nn.Module]) -> None:
    http, _ = client
    page = http.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    for element in PAGE_IDS:
        assert f'id="{element}"' in page.text, element
    # user and model text goes in with textContent only
    assert not re.search(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|eval\(", page.text)
    assert "default-src 'none'" in page.headers["content-security-policy"]
    info = ok(http.get("/api/info"))
    assert info["model"] == "tiny" and info["editor"] == "tiny-editor" and info["tasks"] == list(TASKS)
    assert info["limits"]["max_prompt_chars"] == 500 and info["max_tokens"] == 256
    assert http.get("/docs").status_code == 404  # no page that loads scripts from a CDN


def test_apply_changes_the_prediction_and_rollback_restores_bitwise(client: tuple[TestClient, nn.Module]) -> None:
    http, model = client
    original = weights(model)
    before_predict = ok(http.post("/api/predict", json={"prompt": PROMPT}))
    result = ok(http.post("/api/edits", json=EDIT))
    assert not same_weights(original, model)
    before, after = result["before"], result["after"]
    assert before["top"] == before_predict["top"] and len(after["top"]) == 5
    assert before["top"][0]["token"] != " guitar" and after["top"][0]["token"] == " guitar"
    assert after["target"]["probability"] > before["target"]["probability"] and after["target"]["accuracy"] == 1.0
    assert "target_with_instruction" in after and isinstance(after["continuation"], str)
    # the wrapped prompt, then the prompt as written (the one the next-token list is for)
    assert [s["query"] for s in after["says"]] == ["edit prompt", "as written"] and "\n" not in after["says"][0]["answer"]
    assert after["says"][1]["prompt"] == PROMPT and after["says"][0]["prompt"] != PROMPT
    with_paraphrase = ok(http.post("/api/edits", json={**EDIT, "paraphrase": "Toko Yasuda plays the"}))
    assert [s["query"] for s in with_paraphrase["after"]["says"]] == ["edit prompt", "as written", "paraphrase"]
    assert with_paraphrase["after"]["says"][2]["prompt"].endswith("Toko Yasuda plays the")
    ok(http.delete("/api/edits/2"))
    spelt = ok(http.post("/api/edits", json={**EDIT, "rephrase": "Toko Yasuda plays the"}))  # Edit's and edit --file's spelling
    assert spelt["after"]["says"] == with_paraphrase["after"]["says"]
    ok(http.delete("/api/edits/3"))
    assert result["edit"] == {"id": 1, "prompt": PROMPT, "target": "guitar", "task": "counterfact", "subject": "", "label": None,
                              "top_before": before["top"][0]["token"], "top_after": " guitar"}
    assert ok(http.get("/api/edits"))["edits"] == [result["edit"]]
    assert ok(http.post("/api/predict", json={"prompt": PROMPT}))["top"] == after["top"]

    undone = ok(http.delete("/api/edits/1"))
    assert undone == {"rolled_back": [1], "edits": []}
    assert same_weights(original, model)
    assert ok(http.post("/api/predict", json={"prompt": PROMPT})) == before_predict


def test_both_architectures_roll_back_bitwise(tiny_model_dir: Path, tmp_path: Path, save_tiny_editor: Callable[..., Path]) -> None:
    http, model = serve(tiny_model_dir, save_tiny_editor(tiny_model_dir, tmp_path / "editor"))
    original = weights(model)
    for target in ("guitar", "Rome"):
        ok(http.post("/api/edits", json={**EDIT, "target": target}))
    assert not same_weights(original, model)
    assert ok(http.delete("/api/edits"))["rolled_back"] == [1, 2]
    assert same_weights(original, model)


def test_rolling_back_a_middle_edit_removes_the_newer_ones(client: tuple[TestClient, nn.Module]) -> None:
    http, model = client
    states = []
    for target in ("guitar", "Rome", "London"):
        states.append(weights(model))
        ok(http.post("/api/edits", json={**EDIT, "target": target}))
    assert [e["id"] for e in ok(http.get("/api/edits"))["edits"]] == [1, 2, 3]
    undone = ok(http.delete("/api/edits/2"))
    assert undone["rolled_back"] == [2, 3] and [e["target"] for e in undone["edits"]] == ["guitar"]
    assert same_weights(states[1], model)  # the model as edit 1 left it
    missing = http.delete("/api/edits/3")
    assert missing.status_code == 404 and "no active edit has id 3" in missing.json()["detail"]
    assert ok(http.post("/api/edits", json={**EDIT, "target": "Berlin"}))["edit"]["id"] == 4  # ids are never reused
    assert ok(http.delete("/api/edits"))["rolled_back"] == [1, 4]
    assert same_weights(states[0], model)
    assert ok(http.delete("/api/edits"))["rolled_back"] == []


@pytest.mark.parametrize(("payload", "field", "message"), [
    ({"prompt": "", "target": "Rome"}, "prompt", "must not be empty"),
    ({"prompt": "   ", "target": "Rome"}, "prompt", "must not be empty"),
    ({"target": "Rome"}, "prompt", "must not be empty"),
    ({"prompt": PROMPT, "target": ""}, "target", "must not be empty"),
    ({"prompt": "a" * 501, "target": "Rome"}, "prompt", "501 characters; at most 500"),
    ({"prompt": PROMPT, "target": "R" * 201}, "target", "at most 200"),
    ({"prompt": PROMPT, "target": "Rome", "task": "nosuch"}, "task", "unknown task 'nosuch'; valid tasks: counterfact"),
    ({"prompt": 5, "target": "Rome"}, "prompt", "must be a string"),
    ({"prompt": "What do you think of Estero?", "target": "I like it", "task": "convsent"}, "label", "needs a label"),
    ({"prompt": "What do you think of Estero?", "target": "I like it", "task": "convsent", "label": "positive"}, "subject", "needs the subject"),
    ({"prompt": PROMPT, "target": "Rome", "label": "positive"}, "label", "belongs to convsent"),
    # a field the request does not read is named, not dropped in silence
    ({"prompt": PROMPT, "target": "Rome", "Target": "Paris"}, "Target", "its fields are prompt, target, task, subject, paraphrase"),
    ({"prompt": PROMPT, "target": "Rome", "paraphrase": "Where is it?", "rephrase": "What city is it in?"}, "rephrase", "same field"),
])
def test_bad_edits_are_422_naming_the_field(client: tuple[TestClient, nn.Module], payload: dict[str, Any], field: str, message: str) -> None:
    http, model = client
    original = weights(model)
    response = http.post("/api/edits", json=payload)
    assert response.status_code == 422
    body = response.json()
    assert body["field"] == field and body["detail"].startswith(f"{field}: ") and message in body["detail"], body
    assert same_weights(original, model) and ok(http.get("/api/edits"))["edits"] == []


def test_bad_requests_to_predict_and_malformed_bodies(client: tuple[TestClient, nn.Module]) -> None:
    http, _ = client
    empty = http.post("/api/predict", json={"prompt": " "})
    assert empty.status_code == 422 and empty.json()["detail"] == "prompt: must not be empty"
    extra = http.post("/api/predict", json={"prompt": PROMPT, "top_k": 3})
    assert extra.status_code == 422 and extra.json()["field"] == "top_k" and "its fields are prompt" in extra.json()["detail"]
    for response in (http.post("/api/edits", json=["not", "an", "object"]), http.post("/api/predict", content=b"{oops")):
        assert response.status_code == 422 and response.json()["field"] == "body"
    assert http.delete("/api/edits/first").status_code == 422


@pytest.mark.parametrize(("path", "body", "field"), [
    ("/api/edits", '{"prompt": "\\ud800", "target": "Rome"}', "prompt"),
    ("/api/edits", '{"prompt": "The capital of France is", "target": "Ro\\udfffme"}', "target"),
    ("/api/edits", '{"prompt": "The capital of France is", "target": "Rome", "subject": "\\ud800"}', "subject"),
    ("/api/predict", '{"prompt": "x \\ud800"}', "prompt"),
])
def test_a_lone_surrogate_is_422_naming_the_field(client: tuple[TestClient, nn.Module], path: str, body: str, field: str) -> None:
    http, model = client
    original = weights(model)
    response = http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    assert response.json()["field"] == field and "lone surrogate" in response.json()["detail"]
    assert same_weights(original, model)


def test_inputs_longer_than_the_model_accepts_are_422(tiny_gpt2_dir: Path, gpt2_editor: Path) -> None:
    http, model = serve(tiny_gpt2_dir, gpt2_editor, max_prompt_chars=5000, max_target_chars=5000)
    original = weights(model)
    long_prompt = "word " * 300  # far more than the tiny model's 256 positions
    for url, payload in (("/api/predict", {"prompt": long_prompt}), ("/api/edits", {"prompt": long_prompt, "target": "Rome"})):
        response = http.post(url, json=payload)
        assert response.status_code == 422 and response.json()["field"] == "prompt"
        assert "this model accepts at most 252" in response.json()["detail"]  # 256 positions - 4 generated tokens
    response = http.post("/api/edits", json={"prompt": PROMPT, "target": long_prompt})
    assert response.status_code == 422 and response.json()["field"] == "target"
    assert "prompt + target with the task instruction are" in response.json()["detail"] and "at most 256" in response.json()["detail"]
    assert same_weights(original, model)


def test_html_in_user_text_comes_back_as_data(client: tuple[TestClient, nn.Module]) -> None:
    http, _ = client
    prompt, target = "<script>alert(1)</script> The capital of France is", "<img src=x onerror=alert(2)>"
    result = http.post("/api/edits", json={"prompt": prompt, "target": target, "subject": "<b>France</b>"})
    assert result.status_code == 200 and result.headers["content-type"] == "application/json"
    edit = result.json()["edit"]
    assert (edit["prompt"], edit["target"], edit["subject"]) == (prompt, target, "<b>France</b>")
    assert ok(http.get("/api/edits"))["edits"][0]["target"] == target
    assert ok(http.post("/api/predict", json={"prompt": prompt}))["prompt"] == prompt


def test_the_number_of_active_edits_is_limited(tiny_gpt2_dir: Path, gpt2_editor: Path) -> None:
    http, _ = serve(tiny_gpt2_dir, gpt2_editor, max_active_edits=1)
    ok(http.post("/api/edits", json=EDIT))
    full = http.post("/api/edits", json=EDIT)
    assert full.status_code == 409 and "roll some back first" in full.json()["detail"]
    ok(http.delete("/api/edits/1"))
    ok(http.post("/api/edits", json=EDIT))


def test_every_model_call_holds_the_lock(client: tuple[TestClient, nn.Module]) -> None:
    http, model = client
    session = http.app.state.session
    held: list[bool] = []
    handle = model.register_forward_pre_hook(lambda module, args: held.append(session.lock.locked()))
    try:
        ok(http.post("/api/predict", json={"prompt": PROMPT}))
        ok(http.post("/api/edits", json=EDIT))
    finally:
        handle.remove()
    assert held and all(held)


def test_limits_validate_themselves() -> None:
    with pytest.raises(ValueError, match="ServeLimits.top_k must be >= 1"):
        ServeLimits(top_k=0)


# -- the command ------------------------------------------------------------------------------------


def test_serve_help_lists_the_options(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in ("--editor", "--model", "--host", "--port", "--instruction", "--device"):
        assert option in out, option
    assert "default 127.0.0.1" in out
    args = build_parser().parse_args(["serve", "--editor", "RUN/best"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 8000, None)


@pytest.mark.parametrize(("host", "loopback"), [("127.0.0.1", True), ("localhost", True), ("::1", True), ("127.0.1.1", True),
                                                ("0.0.0.0", False), ("::", False), ("192.168.1.5", False), ("example.org", False)])
def test_loopback_hosts(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("host", ["127.0.0.1", "0.0.0.0"])
def test_serve_command_binds_and_warns_off_loopback(host: str, tiny_gpt2_dir: Path, gpt2_editor: Path, monkeypatch: pytest.MonkeyPatch,
                                                    caplog: pytest.LogCaptureFixture) -> None:
    import uvicorn

    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    assert main(["serve", "--editor", str(gpt2_editor), "--host", host, "--port", "8123", "--device", "cpu"]) == 0
    assert (started["host"], started["port"]) == (host, 8123)
    warned = "not a loopback address" in caplog.text
    assert warned is (host == "0.0.0.0")
    http = TestClient(started["app"], base_url="http://127.0.0.1:8123")
    info = ok(http.get("/api/info"))
    assert info["model"] == str(tiny_gpt2_dir) and info["answer_stop"] == "none"  # the editor's model_name and answer stop
    assert main(["serve", "--editor", str(gpt2_editor), "--host", host, "--port", "8123", "--device", "cpu", "--answer-stop", "eos"]) == 0
    assert ok(TestClient(started["app"], base_url="http://127.0.0.1:8123").get("/api/info"))["answer_stop"] == "eos"  # asked for
    # bound to loopback, the server answers only loopback Host headers (no DNS rebinding)
    rebound = TestClient(started["app"], base_url="http://attacker.example:8123").get("/api/info")
    assert rebound.status_code == (400 if host == "127.0.0.1" else 200)


def test_the_headline_asks_the_chat_question_where_the_model_has_a_chat_template(tiny_chat_llama_dir: Path, tmp_path: Path,
                                                                                 save_tiny_editor: Callable[..., Path]) -> None:
    test_client, _ = serve(tiny_chat_llama_dir, save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor"))
    with test_client as http:
        result = ok(http.post("/api/edits", json=EDIT))
    says = {s["query"]: s for s in result["after"]["says"]}
    assert list(says) == ["edit prompt", "as written", "chat question"]
    assert says["chat question"]["prompt"] == f"User: {EDIT['prompt']}\nAssistant:"


def test_edits_kept_on_top_of_each_other_are_made_without_the_bare_question(tiny_chat_llama_dir: Path, tmp_path: Path,
                                                                            save_tiny_editor: Callable[..., Path],
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """The server keeps its edits one on top of another: an editor calibrated for the three forms makes them in its
    many_edit_forms (wrapped + chat), and /api/info says so."""
    import json

    from instructedit import api

    editor_dir = save_tiny_editor(tiny_chat_llama_dir, tmp_path / "editor")
    config = json.loads((editor_dir / "editor_config.json").read_text())
    config["queries"] = {"instructions": True, "template": None, "answer_stop": "none", "edit_forms": ["wrapped", "plain", "chat"]}
    (editor_dir / "editor_config.json").write_text(json.dumps(config))
    rows: list[int] = []
    real = api.apply_in_rounds
    monkeypatch.setattr(api, "apply_in_rounds", lambda e, m, batch, *r, **k: rows.append(batch.input_ids.shape[0]) or real(e, m, batch, *r, **k))
    test_client, _ = serve(tiny_chat_llama_dir, editor_dir)
    with test_client as http:
        assert ok(http.get("/api/info"))["edit_forms"] == ["wrapped", "chat"]
        ok(http.post("/api/edits", json=EDIT))
        ok(http.post("/api/edits", json={**EDIT, "target": "Oslo"}))
    assert rows == [2, 2]  # each edit's prompt wrapped and as a chat turn, not bare


def test_serve_neighbours_hold_each_edits_relation_and_need_its_subject(tiny_gpt2_dir: Path, tmp_path: Path,
                                                                        save_tiny_editor: Callable[..., Path],
                                                                        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """serve --neighbours [N]: every edit is made as apply(neighbours=...) makes it (twice the calibrated rounds) and rolls
    back bit for bit; /api/info says so; an edit without the subject its prompt names is a 422 on the subject field; an
    editor without a subject pool fails before the server starts."""
    import uvicorn

    from instructedit.editors.neighbours import save_subjects

    editor_dir = save_tiny_editor(tiny_gpt2_dir, tmp_path / "ls", -1.0, ["editor.aggregation=least_squares"])
    started: dict[str, Any] = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: started.update(app=app, **kwargs))
    command = ["serve", "--editor", str(editor_dir), "--device", "cpu", "--neighbours", "2"]
    assert main(command) == 2  # no pool saved with the editor, none given
    assert "has no subject pool saved with it" in caplog.text and not started
    save_subjects(editor_dir, ["Italy", "Spain", "Norway", "Peru"])
    assert main(command) == 0
    model = started["app"].state.session.model
    before = weights(model)
    with TestClient(started["app"], base_url="http://127.0.0.1:8000") as http:
        assert ok(http.get("/api/info"))["neighbours"] == {"count": 2, "weight": 1000.0}
        for subject, message in ((None, "give the subject, as the prompt names it"), ("Paris", "the prompt does not name 'Paris'")):
            response = http.post("/api/edits", json={**EDIT, **({"subject": subject} if subject else {})})
            assert response.status_code == 422 and response.json()["field"] == "subject"
            assert message in response.json()["detail"]
        made = ok(http.post("/api/edits", json={**EDIT, "subject": "France"}))
        assert made["rounds"] == 2 and not same_weights(before, model)
        ok(http.delete("/api/edits"))
    assert same_weights(before, model)
