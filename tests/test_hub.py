"""Model cards, and push / load round trips against a fake hub on 127.0.0.1 (the real huggingface_hub client, nothing mocked)."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import constants as hub_constants

from instructedit.api import Edit, load_editor
from instructedit.config import load_config
from instructedit.editors.card import TRAINING_CONFIG, render_model_card, write_model_card
from instructedit.editors.mend import MENDEditor
from instructedit.editors.registry import build_editor
from instructedit.hub import push_editor
from instructedit.models.loading import load_model
from instructedit.training import Trainer

TINY = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"
TOKEN = "hf_test_token"
REPO = r"(?P<repo>[\w.-]+/[\w.-]+)"


class FakeHub:
    """Hub state: repos as {path: bytes} with one commit sha each, and every request as (method, path).

    The handler serves what create_repo / upload_folder / snapshot_download call: POST /api/repos/create,
    /api/validate-yaml, /api/models/{repo}/preupload/{rev} (every file "regular", so no LFS/xet) and
    /api/models/{repo}/commit/{rev} (NDJSON, base64 contents); GET /api/models/{repo}[/revision/{rev}],
    /api/models/{repo}/tree/{rev}; HEAD/GET /{repo}/resolve/{rev}/{file}. Writes need the test token.
    """

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.shas: dict[str, str] = {}
        self.requests: list[tuple[str, str]] = []
        self.lock = threading.Lock()

    def commit(self, repo: str, files: dict[str, bytes]) -> str:
        with self.lock:
            self.repos[repo].update(files)
            digest = hashlib.sha1(json.dumps(sorted((p, hashlib.sha1(b).hexdigest()) for p, b in self.repos[repo].items())).encode())
            self.shas[repo] = digest.hexdigest()
            return self.shas[repo]


def _oid(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id


def make_handler(hub: FakeHub, base: list[str]) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args: object) -> None:
            pass

        def _send(self, status: int, body: bytes | dict | list = b"", headers: dict[str, str] | None = None) -> None:
            data = json.dumps(body).encode() if isinstance(body, (dict, list)) else body
            self.send_response(status)
            for key, value in {"Content-Type": "application/json", **(headers or {})}.items():
                self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        def _body(self) -> bytes:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                chunks = []
                while (size := int(self.rfile.readline().strip(), 16)) > 0:
                    chunks.append(self.rfile.read(size))
                    self.rfile.readline()
                self.rfile.readline()
                return b"".join(chunks)
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _repo(self, repo: str) -> dict[str, bytes] | None:
            if repo not in hub.repos:
                self._send(404, {"error": "Repository not found"}, {"X-Error-Code": "RepoNotFound"})
                return None
            return hub.repos[repo]

        def _authorized(self) -> bool:
            if self.headers.get("Authorization") != f"Bearer {TOKEN}":
                self._send(401, {"error": "Invalid credentials"})
                return False
            return True

        def do_POST(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            hub.requests.append(("POST", path))
            body = self._body()
            if path == "/api/validate-yaml":
                content = json.loads(body)["content"]
                front = re.match(r"---\n(.*?)\n---\n", content, re.S)
                try:
                    yaml.safe_load(front.group(1) if front else "")
                except yaml.YAMLError as err:
                    return self._send(400, {"errors": [{"message": str(err)}]})
                return self._send(200, {"errors": [], "warnings": []} if front else {"errors": [], "warnings": [{"message": "empty metadata"}]})
            if not self._authorized():
                return None
            if path == "/api/repos/create":
                payload = json.loads(body)
                repo = f"{payload['organization']}/{payload['name']}"
                if repo in hub.repos:
                    return self._send(409, {"error": "You already created this model repo", "url": f"{base[0]}/{repo}"})
                hub.repos[repo] = {}
                hub.commit(repo, {})
                return self._send(200, {"url": f"{base[0]}/{repo}"})
            if m := re.fullmatch(rf"/api/models/{REPO}/preupload/[^/]+", path):
                if self._repo(m["repo"]) is None:
                    return None
                files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None} for f in json.loads(body)["files"]]
                return self._send(200, {"files": files, "commitOid": hub.shas[m["repo"]]})
            if m := re.fullmatch(rf"/api/models/{REPO}/commit/[^/]+", path):
                if self._repo(m["repo"]) is None:
                    return None
                lines = [json.loads(line) for line in body.splitlines() if line.strip()]
                files = {v["path"]: base64.b64decode(v["content"]) for e in lines if e["key"] == "file" for v in [e["value"]]}
                sha = hub.commit(m["repo"], files)
                return self._send(200, {"commitUrl": f"{base[0]}/{m['repo']}/commit/{sha}", "commitOid": sha, "pullRequestUrl": None})
            return self._send(404, {"error": f"no fake endpoint for POST {path}"})

        def do_GET(self) -> None:  # noqa: N802
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path))
            if m := re.fullmatch(rf"/api/models/{REPO}(/revision/[^/]+)?", path):
                if (files := self._repo(m["repo"])) is None:
                    return None
                return self._send(200, {"id": m["repo"], "modelId": m["repo"], "sha": hub.shas[m["repo"]], "private": False,
                                        "siblings": [{"rfilename": p} for p in sorted(files)]})
            if m := re.fullmatch(rf"/api/models/{REPO}/tree/[^/]+(/.*)?", path):
                if (files := self._repo(m["repo"])) is None:
                    return None
                return self._send(200, [{"type": "file", "path": p, "size": len(b), "oid": _oid(b)} for p, b in sorted(files.items())])
            if m := re.fullmatch(rf"/{REPO}/resolve/[^/]+/(?P<file>.+)", path):
                if (files := self._repo(m["repo"])) is None:
                    return None
                if m["file"] not in files:
                    return self._send(404, {"error": "Entry not found"}, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": hub.shas[m["repo"]]})
                data = files[m["file"]]
                return self._send(200, data, {"Content-Type": "application/octet-stream", "X-Repo-Commit": hub.shas[m["repo"]],
                                              "ETag": f'"{_oid(data)}"'})
            return self._send(404, {"error": f"no fake endpoint for GET {path}"})

        do_HEAD = do_GET  # noqa: N815

    return Handler


@pytest.fixture
def fake_hub(point_hub_at: Callable[[str], None]) -> Iterator[tuple[str, FakeHub]]:
    hub, base = FakeHub(), [""]
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(hub, base))
    base[0] = url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    point_hub_at(url)
    yield url, hub
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def trained_best(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real (two-step) training run of the tiny config; returns its best/ editor folder."""
    run = tmp_path_factory.mktemp("run")
    config = load_config(TINY, [f"model.name={tiny_llama_dir}", "training.max_steps=2", "training.val_every=1"])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        Trainer(config, run, show_progress=False).run()
    finally:
        torch.set_num_threads(threads)
    return run / "best"


def test_model_card_describes_model_data_config_and_metrics(tiny_llama_dir: Path, trained_best: Path) -> None:
    best = trained_best
    card = write_model_card(best).read_text()  # the run folder is found beside best/
    meta = yaml.safe_load(card.split("---\n")[1])
    assert meta["library_name"] == "instructedit" and "knowledge-editing" in meta["tags"]
    assert "base_model" not in meta  # a local folder is no hub model
    assert f"base model: `{tiny_llama_dir}`" in card and "model.layers.3.mlp.down_proj.weight" in card
    assert "instructions: on" in card and "split seed 0" in card and "held out from training: zsre" in card
    assert re.search(r"\| counterfact \| 6 \| 6 \| train_cf\.json \|", card)
    assert "| 0 |" in card and "| 2 |" in card  # validation history rows (steps 0, 1, 2)
    assert "trained 2 optimizer steps" in card and "max_steps: 2" in card  # summary and the full config
    assert yaml.safe_load((best / TRAINING_CONFIG).read_text())["training"]["max_steps"] == 2


def test_model_card_without_a_run_and_for_the_default_model() -> None:
    card = render_model_card({"model_name": "smollm2-135m-instruct", "weights": []}, None, None, None, [])
    assert "base_model: HuggingFaceTB/SmolLM2-135M-Instruct" in card and "Not recorded" in card


def test_model_card_names_the_editor_method() -> None:
    ke = {"model_name": "smollm2-135m-instruct", "method": "ke", "weights": [],
          "editor": {"lstm_dim": 256, "condition_dim": 1024, "conditioner_dim": 128, "init_edit_lr": 1.0}}
    card = render_model_card(ke, {"data": {"instructions": False, "tasks": ["counterfact"]}}, None, None, [])
    assert "# KE (Knowledge Editor) editor for `smollm2-135m-instruct`" in card and "De Cao" in card and "MEND-style" not in card
    assert "- ke\n" in card and "BiLSTM 256, condition 1024" in card
    mend = render_model_card({"model_name": "m", "weights": [], "editor": {"rank": 8, "n_hidden": 1, "init_edit_lr": 1e-4}}, None, None, None, [])
    assert "MEND-style hypernetwork" in mend and "- mend\n" in mend and "rank 8" in mend


def test_push_and_load_round_trip(tiny_llama_dir: Path, trained_best: Path, tmp_path: Path, fake_hub: tuple[str, FakeHub],
                                  monkeypatch: pytest.MonkeyPatch) -> None:
    url, hub = fake_hub
    best = trained_best
    (best / "optimizer.safetensors").write_bytes(b"local only")  # checkpoints' optimizer state is not shared
    commit_url = push_editor(best, "someone/tiny-editor", token=TOKEN)
    assert commit_url.startswith(f"{url}/someone/tiny-editor/commit/")
    assert {"editor_config.json", "editor.safetensors", "README.md", TRAINING_CONFIG} == set(hub.repos["someone/tiny-editor"])
    assert ("POST", "/api/validate-yaml") in hub.requests  # the card's metadata was checked by the "hub"

    editor = load_editor("someone/tiny-editor")  # not a local path: downloaded through the real client
    local = MENDEditor.from_pretrained(best)
    assert isinstance(editor.editor, MENDEditor)
    for key, value in local.state_dict().items():
        assert torch.equal(value, editor.editor.state_dict()[key]), key
    assert editor.instruction == 0 and editor.model_name == str(tiny_llama_dir)  # settings travel in training_config.yaml
    assert (tmp_path / "hf-cache" / "models--someone--tiny-editor").is_dir()  # the standard Hugging Face cache
    model, tok = load_model(str(tiny_llama_dir))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with editor.apply(model, [Edit("The capital of France is", "Rome")], tok):
        assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())

    push_editor(best, "someone/tiny-editor", token=TOKEN)  # pushing again into the existing repo works
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    requests = len(hub.requests)
    assert load_editor("someone/tiny-editor").instruction == 0  # offline: the cached download, no request
    assert len(hub.requests) == requests
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(PermissionError, match="refused to let this token write to 'someone/other'"):
        push_editor(best, "someone/other", token="hf_wrong")


def test_unknown_hub_repo_fails_clearly(tmp_path: Path, fake_hub: tuple[str, FakeHub]) -> None:
    with pytest.raises(FileNotFoundError, match="hub repo 'someone/missing' does not exist"):
        load_editor("someone/missing")


def test_unreachable_hub_fails_fast(tiny_gpt2_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                    point_hub_at: Callable[[str], None]) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    point_hub_at(f"http://127.0.0.1:{port}")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="did not answer"):
        load_editor("someone/tiny-editor")
    editor_dir = tmp_path / "editor"
    model, _ = load_model(str(tiny_gpt2_dir))
    build_editor(model, load_config(TINY, [f"model.name={tiny_gpt2_dir}"])).save_pretrained(editor_dir)
    with pytest.raises(ConnectionError, match="cannot push"):
        push_editor(editor_dir, "someone/tiny-editor", token=TOKEN)
    assert (editor_dir / "README.md").is_file()  # the card is written before the network is needed
    assert time.perf_counter() - start < 10
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ConnectionError, match="HF_HUB_OFFLINE"):
        load_editor("someone/tiny-editor")
