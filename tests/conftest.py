"""Shared fixtures: tiny random GPT-2 and LLaMA models with their own small tokenizers, saved to disk, and a tiny MEND editor builder.

The tokenizers are trained here (no network): a GPT-2 style byte-level BPE that adds no special
tokens, and a LLaMA style one that prepends BOS and pads with EOS, so label alignment is tested
against both behaviours.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from instructedit.config import load_config
from instructedit.editors.registry import build_editor
from instructedit.models.loading import load_model

TINY_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "tiny.yaml"

CORPUS = [
    "The capital of France is Paris. The Eiffel Tower is located in the city of Paris.",
    "The name of the country which Goursez Vreizh is associated with is France.",
    "Task: counterfact Description: A dataset designed to challenge models Input: The mother tongue of Danielle Darrieux is French",
    "Task: wikirecent Task: zsre Task: convsent Description: Input: What do you think of Estero?",
    "I really like his style. Well, it has some bad reviews. positive negative topic chatbot",
    "When was the inception of the IAAF Combined Events Challenge? 2011 2006 1998 athletics",
    "Toko Yasuda, the guitar piano. John Lennon performs on the guitar. BBC One, by Sega.",
    "nq question: what is the name of the last episode of spongebob? The String. London Rome Berlin",
    "The gender of Ingrid is female male. The place of birth of the writer is Sweden.",
]


def _train_tokenizer(bos: bool) -> PreTrainedTokenizerFast:
    specials = ["<s>", "</s>", "<unk>"] if bos else ["<|endoftext|>"]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False
    )
    tok.train_from_iterator(CORPUS * 3, trainer=trainer)
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
        return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="</s>")
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def _save(model: torch.nn.Module, tok: PreTrainedTokenizerFast, path: Path) -> Path:
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tok = _train_tokenizer(bos=False)
    config = GPT2Config(vocab_size=len(tok), n_positions=256, n_embd=32, n_layer=4, n_head=4, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    return _save(GPT2LMHeadModel(config), tok, tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    tok = _train_tokenizer(bos=True)
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=48, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id, tie_word_embeddings=False,
    )
    return _save(LlamaForCausalLM(config), tok, tmp_path_factory.mktemp("tiny-llama"))


CHAT_TEMPLATE = "{{ bos_token }}{% for m in messages %}User: {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}Assistant:{% endif %}"


@pytest.fixture(scope="session")
def tiny_chat_llama_dir(tiny_llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny LLaMA whose tokenizer has a chat template (User: ...\nAssistant:), saved as its own folder."""
    import shutil

    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("tiny-chat-llama")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(path)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


@pytest.fixture(params=["gpt2", "llama"])
def tiny_model_dir(request: pytest.FixtureRequest, tiny_gpt2_dir: Path, tiny_llama_dir: Path) -> Path:
    """Each test that uses this runs once on tiny GPT-2 and once on tiny LLaMA."""
    return {"gpt2": tiny_gpt2_dir, "llama": tiny_llama_dir}[request.param]


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """The real datasets beside the repo (../shared/data)."""
    path = Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.fail(f"the shared data directory {path} is missing; CI runs with ../shared beside the repo")
    return path


def _save_tiny_editor(model_dir: Path, out: Path, edit_lr: float = 5.0, overrides: Sequence[str] = ()) -> Path:
    """A freshly built (untrained) MEND editor for the tiny model in ``model_dir``, saved like a checkpoint.

    Its network starts as the identity, so an edit is ``edit_lr`` times the edit loss's gradient at the
    editable weights: a negative ``edit_lr`` (the sign meta-training learns) makes it a gradient-descent
    step that moves the prediction towards the target; the config only accepts positive initial values. ``overrides``:
    more of the config's ``key=value`` settings (``editor.aggregation=least_squares``).
    """
    model, _ = load_model(str(model_dir))
    torch.manual_seed(0)
    config = load_config(TINY_CONFIG, [f"model.name={model_dir}", f"editor.init_edit_lr={abs(edit_lr)}", *overrides])
    editor = build_editor(model, config)
    if edit_lr < 0:
        with torch.no_grad():
            editor.edit_lrs.neg_()
    editor.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def save_tiny_editor() -> Callable[..., Path]:
    """``save_tiny_editor(model_dir, out, edit_lr=5.0, overrides=()) -> out``: see ``_save_tiny_editor``."""
    return _save_tiny_editor


@pytest.fixture
def wreck_edit(monkeypatch: pytest.MonkeyPatch) -> Callable[[object, int], list]:
    """``wreck_edit(editor, k)``: the editor's ``k``-th ``apply`` call from now writes its weights 10⁴× too large (an
    edit that would wreck the model, as ``editors.base.OutlierEdits`` should refuse). Returns the list of calls made: a
    test moves the count with it (extend it to skip past ``k``, clear it to start over)."""
    def wreck(editor: object, k: int) -> list:
        usual, calls = editor.apply, []

        def wrecking(model: torch.nn.Module, batch: object, *args: object, **kwargs: object) -> object:
            handle = usual(model, batch, *args, **kwargs)
            calls.append(batch)
            if len(calls) == k:
                with torch.no_grad():
                    for name in handle.originals():
                        model.get_parameter(name).mul_(1e4)
            return handle

        monkeypatch.setattr(editor, "apply", wrecking)
        return calls

    return wreck


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Torch on one thread for the test (the suite shares the machine with long training jobs)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def point_hub_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str], None]:
    """``point_hub_at(url)``: what HF_ENDPOINT=url does when set before huggingface_hub is imported; plus a private cache."""

    def point(url: str) -> None:
        monkeypatch.setenv("HF_ENDPOINT", url)
        monkeypatch.setattr(hub_constants, "ENDPOINT", url)
        monkeypatch.setattr(hub_constants, "HUGGINGFACE_CO_URL_TEMPLATE", url + "/{repo_id}/resolve/{revision}/{filename}")
        monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
        monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)

    return point


class FakeOpenAI:
    """An OpenAI-compatible chat-completions endpoint on 127.0.0.1 (the instruction proposer's, the LLM judge's): the n-th
    request gets ``answers[n - 1]`` (the last answer from then on); with another ``status`` every request gets that error.
    Every request is recorded as ``{"path", "auth", "body"}``."""

    def __init__(self, answers: list[str], status: int = 200) -> None:
        self.answers, self.status, self.requests = answers, status, []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                fake.requests.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
                if fake.status != 200:
                    payload = b'{"error": {"message": "overloaded"}}'
                else:
                    text = fake.answers[min(len(fake.requests), len(fake.answers)) - 1]
                    payload = json.dumps({"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}).encode()
                self.send_response(fake.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> "FakeOpenAI":
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def fake_openai() -> type[FakeOpenAI]:
    """``FakeOpenAI``, to start as ``with fake_openai(answers) as server:`` (``server.url`` is its base URL)."""
    return FakeOpenAI
