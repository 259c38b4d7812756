"""Memory of meta-training: the estimate per process, before anything is loaded.

The terms follow what a training step keeps alive (training.py, objective.py, editors/mend.py):

- **base model**: the frozen weights, in ``model.dtype`` (spread over a process's GPUs by ``model.device_map``);
- **MEND network**: its parameters, normalization statistics and step sizes α, float32 whatever the base dtype;
- **gradients** and **Adam** (two float32 moments per trainable value, plus the α-only optimizer);
- **edit tensors**: per edited weight W (d_out × d_in), Σ δ̃ ũᵀ and α·Σ δ̃ ũᵀ in float32 (the first is
  kept for α's gradient), W + ΔW in the model dtype, and W + ΔW's gradient during backward; and the
  MEND network's activations (one row of width d_in + d_out per edit token and edited weight);
- **activations**: the edited blocks for every post-edit input (edit_outer and loc, plus ConvSent's
  unlikely responses) at ``max_length`` tokens — only the blocks' input with activation
  checkpointing — and vocabulary logits at the scored positions; the prefix runs without grad and
  keeps only the hidden states entering the edited blocks. A many-edit step (``training.n_edits`` > 1,
  ``objective.many_edits_loss``) holds the larger of its edit pass (every edit input of a chunk through
  the edited blocks with gradients, and their factors) and one packed piece of its scored inputs (more
  pieces are recomputed in backward), plus every scored row's hand-over states; its MEND network keeps
  its activations on every edit's key tokens;
- **optimizer step**: temporaries of the Adam update (foreach on GPUs: one copy of every trainable
  tensor; per tensor on CPUs);
- **runtime**: the CUDA context on a GPU; the interpreter with torch and transformers on a CPU.

peak = runtime + base + MEND + gradients + Adam + max(edit tensors + activations, optimizer step).
Data parallelism does not change it: every process holds all of this. Architectures come from the
model's ``config.json`` (or, for the presets, a table here) and are instantiated on the meta device,
so no weights are read or downloaded.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from instructedit.config import DEFAULT_MODEL, Config, load_config
from instructedit.editors.mend import MENDEditor
from instructedit.editors.registry import build_editor
from instructedit.objective import ONE_PASS_TOKENS, PACKED_ROW_TOKENS

logger = logging.getLogger(__name__)

GIB = 2**30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RUNTIME_BYTES = {"cuda": int(0.5 * GIB), "cpu": int(0.45 * GIB)}  # CUDA context / python + torch + transformers RSS
SCORED_SHARE = 0.25  # share of a row's positions that carry a label (answer tokens)

# config.json numbers of the presets' models (configs/presets/), so their estimates need no download.
KNOWN_ARCHITECTURES: dict[str, dict[str, Any]] = {
    "openai-community/gpt2-xl": dict(model_type="gpt2", n_embd=1600, n_layer=48, n_head=25, vocab_size=50257, n_positions=1024),
    "EleutherAI/gpt-j-6b": dict(model_type="gptj", n_embd=4096, n_layer=28, n_head=16, rotary_dim=64, vocab_size=50400, n_positions=2048),
    "meta-llama/Llama-2-7b-hf": dict(
        model_type="llama", hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=32, vocab_size=32000, tie_word_embeddings=False,
    ),
    "meta-llama/Meta-Llama-3-8B": dict(
        model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False,
    ),
    "Qwen/Qwen2.5-7B": dict(
        model_type="qwen2", hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
        num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False,
    ),
    "mistralai/Mistral-7B-v0.1": dict(
        model_type="mistral", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
        num_key_value_heads=8, vocab_size=32000, tie_word_embeddings=False,
    ),
}


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per process, by term; ``peak`` is what must fit."""

    model: str
    dtype: str
    device: str
    base_params: int
    trainable_params: int
    edited_weights: int
    base: int
    mend: int
    gradients: int
    adam: int
    edit_tensors: int
    activations: int
    optimizer_step: int
    runtime: int

    @property
    def peak(self) -> int:
        common = self.runtime + self.base + self.mend + self.gradients + self.adam
        return common + max(self.edit_tensors + self.activations, self.optimizer_step)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"peak": self.peak}

    def format(self) -> str:
        rows = [
            (f"base model ({self.base_params / 1e9:.2f}B params, {self.dtype})", self.base),
            (f"MEND network + statistics + α ({self.trainable_params / 1e6:.1f}M params, float32)", self.mend),
            ("MEND gradients", self.gradients),
            ("Adam moments", self.adam),
            (f"edit tensors ({self.edited_weights} edited weights)", self.edit_tensors),
            ("activations of the edited blocks + scored logits", self.activations),
            ("optimizer-step temporaries", self.optimizer_step),
            ("runtime (CUDA context)" if self.device == "cuda" else "runtime (interpreter, libraries)", self.runtime),
        ]
        width = max(len(name) for name, _ in rows)
        lines = [f"  {name:<{width}}  {value / GIB:8.2f} GiB" for name, value in rows]
        lines.append(f"  {'peak (per process)':<{width}}  {self.peak / GIB:8.2f} GiB")
        return "\n".join(lines)


def meta_skeleton(config: Config) -> nn.Module:
    """The base model's architecture on the meta device (no weights): from the preset table or its config.json."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from instructedit.models.hub_access import HubUnreachable, hub_fetch

    name = config.model.name
    if name in KNOWN_ARCHITECTURES:
        known = dict(KNOWN_ARCHITECTURES[name])
        hf_config = AutoConfig.for_model(known.pop("model_type"), **known)
    else:
        if name in (DEFAULT_MODEL, "default"):
            from instructedit.models.loading import default_model_dir

            name = str(default_model_dir())
        action = f"reach the Hugging Face hub to read the config.json of {config.model.name!r}"
        try:
            if Path(name).exists():
                hf_config = AutoConfig.from_pretrained(name)
            else:  # a hub name: the hub's rules (cache when unreachable, timeouts)
                hf_config = hub_fetch(lambda cache_only: AutoConfig.from_pretrained(name, local_files_only=cache_only), action)
        except HubUnreachable:  # the hub did not answer: the message says what to set for offline use
            raise
        except OSError as e:
            raise ValueError(
                f"model {config.model.name!r}: cannot read its config.json ({e}); use a local folder, a reachable hub "
                f"name, or one of the models with known shapes: {sorted(KNOWN_ARCHITECTURES)}"
            ) from None
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(hf_config)


def estimate_memory(config: Config, model: nn.Module | None = None, device: str = "cuda") -> MemoryEstimate:
    """Peak memory of one training process for ``config`` on ``device`` ("cuda" or "cpu").

    ``model``: the loaded base model, if there is one; else its architecture is built on the meta device.
    """
    if device not in RUNTIME_BYTES:
        raise ValueError(f"device {device!r} is not one of {list(RUNTIME_BYTES)}")
    model = model if model is not None else meta_skeleton(config)
    with torch.device("meta"):
        editor = build_editor(model, config)
    b = DTYPE_BYTES[config.model.dtype]
    base_params = sum(p.numel() for p in model.parameters())  # tied weights count once
    trainable = sum(p.numel() for p in editor.parameters())
    statistics = sum(buf.numel() * buf.element_size() for buf in editor.buffers())
    step = trainable * 4 if device == "cuda" else max(p.numel() for p in editor.parameters()) * 4
    return MemoryEstimate(
        model=config.model.name,
        dtype=config.model.dtype,
        device=device,
        base_params=base_params,
        trainable_params=trainable,
        edited_weights=len(editor.weights),
        base=base_params * b,
        mend=trainable * 4 + statistics,
        gradients=trainable * 4,
        adam=2 * trainable * 4 + 2 * len(editor.weights) * 4,
        edit_tensors=_edit_tensor_bytes(config, editor),
        activations=_activation_bytes(config, model, editor),
        optimizer_step=step,
        runtime=RUNTIME_BYTES[device],
    )


def _rows(config: Config) -> tuple[float, float]:
    """(edit-input rows, post-edit rows kept for backward) of a micro-batch's records in memory at once, each row at
    ``model.max_length`` tokens.

    Rows per record: ``_record_rows``; a many-edit step holds its ``training.n_edits`` records. A summing editor's records
    (``training.batch_size`` > 1, one edit each) share one pass only while their rows hold at most ``ONE_PASS_TOKENS``
    tokens together, else run one after another (``objective.one_pass``): at once, at most one record's rows at full
    length, or that many tokens.
    """
    edit_rows, kept_rows = _record_rows(config)
    records = float(config.training.batch_size * config.training.n_edits)
    if records > 1 and config.editor.aggregation == "sum" and config.training.n_edits == 1:
        records = min(records, max(1.0, ONE_PASS_TOKENS / (kept_rows * config.model.max_length)))
    return records * edit_rows, records * kept_rows


def _record_rows(config: Config) -> tuple[float, float]:
    """(edit-input rows, post-edit rows) of one record: ConvSent's 2 edit responses and 2 held-out + 2 opposite
    responses + 1 locality input, the other tasks' 1 edit input and 1 outer + 1 locality input.

    One record may be a ConvSent one: its rows. The ``training.n_edits`` records of a many-edit step are drawn from
    the task mixture, so they bring its mean rows per record: with ``data.balance`` ConvSent is at most as large as
    the largest other task, so at most half the records; without it, or with ConvSent oversampled, all may be."""
    d = config.data
    if "convsent" not in d.tasks:
        return 1, 2
    if config.training.n_edits == 1 or not d.balance or len(d.tasks) == 1 or d.oversample.get("convsent", 1) > 1:
        return 2, 5
    return 1.5, 3.5


def _network_rows(config: Config) -> float:
    """Rows (tokens, each at ``max_length`` per input) the MEND network runs on with its activations kept: every edit
    token of the micro-batch; a least-squares editor with ``editor.ls_keys: answer`` only the scored share of them."""
    edit_rows, _ = _rows(config)
    answer_keys = config.editor.aggregation == "least_squares" and config.editor.ls_keys == "answer"
    return edit_rows * config.model.max_length * (SCORED_SHARE if answer_keys else 1.0)


def _edited_blocks_per_token(config: Config, model: nn.Module, editor: MENDEditor) -> int:
    """What the edited blocks keep for backward per token: per block ~10 hidden-wide and 4 MLP-wide values."""
    inner = max(max(w.shape) for w in editor.weights)  # the MLP width
    n_blocks = len(editor.split(model).suffix_indices)
    return (10 * model.config.hidden_size + 4 * inner) * DTYPE_BYTES[config.model.dtype] * n_blocks


def _many_edit_activation_bytes(config: Config, model: nn.Module, editor: MENDEditor) -> int:
    """``_activation_bytes`` of a many-edit step (``objective.many_edits_loss``, ``training.n_edits`` > 1).

    The edit pass runs the edited blocks with gradients over one chunk of edit inputs at a time (least squares:
    ``editor.chunk_edits``; a sum: all of them) and captures every token's factors; it is over before the scored inputs
    run. Those run in packed pieces of at most ``PACKED_ROW_TOKENS`` tokens (``objective._pieces``): one piece keeps its
    activations and logits, several are recomputed one at a time in backward, and every scored row keeps its hand-over
    states (the hidden states entering the edited blocks and leaving the model)."""
    m, n = config.model, config.training.n_edits
    b = DTYPE_BYTES[m.dtype]
    hidden = model.config.hidden_size
    per_token = _edited_blocks_per_token(config, model, editor)
    edit_rows, kept_rows = _record_rows(config)
    chunk = min(n, config.editor.chunk_edits) if config.editor.aggregation == "least_squares" else n
    edit_tokens = chunk * edit_rows * m.max_length
    factors = sum(w.shape[0] + w.shape[1] for w in editor.weights) * b  # u and δ of every edited weight, per token
    edit_pass = edit_tokens * (per_token + factors)
    scored_tokens = n * kept_rows * m.max_length
    piece = min(scored_tokens, PACKED_ROW_TOKENS)
    scored = piece * per_token + int(piece * SCORED_SHARE) * model.config.vocab_size * (b + 8)
    hand_over = scored_tokens * 2 * hidden * b
    return int(max(edit_pass, scored) + hand_over)


def _edit_tensor_bytes(config: Config, editor: MENDEditor) -> int:
    """Full-size update matrices of one edit, and the MEND network's activations on its tokens."""
    b = DTYPE_BYTES[config.model.dtype]
    sizes = [w.shape[0] * w.shape[1] for w in editor.weights]
    # Σ δ̃ũᵀ and α·Σ δ̃ũᵀ (float32), W + ΔW and its gradient (model dtype); float32 temporaries of one weight in backward
    matrices = sum(sizes) * (4 + 4 + 2 * b) + max(sizes) * 8
    # every edit token up to the last target has a non-zero gradient (attention carries it back):
    # one row of width d_in + d_out per token and edited weight
    network = 0
    for ws in editor.groups.values():
        dim = ws[0].shape[0] + ws[0].shape[1]
        per_row = (config.editor.n_hidden + 1) * (3 * dim + min(config.editor.rank, dim)) + dim  # per layer: input, scaled, low-rank, output
        network += len(ws) * _network_rows(config) * per_row * 4
    return int(matrices + network)


def _activation_bytes(config: Config, model: nn.Module, editor: MENDEditor) -> int:
    """The edited blocks' activations kept for backward, the scored logits, the prefix's hand-over states."""
    if config.training.n_edits > 1:
        return _many_edit_activation_bytes(config, model, editor)
    m, t = config.model, config.training
    b = DTYPE_BYTES[m.dtype]
    hidden = model.config.hidden_size
    edit_rows, kept_rows = _rows(config)
    per_token = _edited_blocks_per_token(config, model, editor)
    if t.activation_checkpointing:  # one input's suffix recomputed at a time; the (unchecked) edit pass is as large
        blocks = edit_rows * m.max_length * per_token
    else:
        blocks = kept_rows * m.max_length * per_token
    scored = int(kept_rows * m.max_length * SCORED_SHARE)
    logits = scored * model.config.vocab_size * (b + 8)  # head output + float32 log-softmax kept for backward
    prefix = 4 * t.batch_size * m.max_length * 2 * hidden * b  # hidden entering the suffix + final hidden, per input
    return int(blocks + logits + prefix)


def markdown_table(paths: list[Path]) -> str:
    """The docs' preset table: one row per config file, GPU estimates."""
    lines = [
        "| preset | model | dtype | base | MEND (params + stats) | grads + Adam | edit tensors + activations | peak per GPU |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for path in paths:
        e = estimate_memory(load_config(path))
        g = lambda n: f"{n / GIB:.1f} GiB"  # noqa: E731
        lines.append(
            f"| `{path.stem}` | {e.model} ({e.base_params / 1e9:.2f}B) | {e.dtype} | {g(e.base)} | {g(e.mend)} "
            f"({e.trainable_params / 1e6:.0f}M) | {g(e.gradients + e.adam)} | {g(e.edit_tensors + e.activations)} | **{g(e.peak)}** |"
        )
    return "\n".join(lines)


def log_estimate(config: Config, model: nn.Module, device: str) -> None:
    """Log the estimate for a loaded model; an architecture the estimate does not know only gets a warning."""
    try:
        estimate = estimate_memory(config, model, device)
    except (AttributeError, ValueError) as e:  # training does not need the estimate
        logger.warning("no memory estimate for %s: %s", config.model.name, e)
        return
    logger.info("memory estimate per process (%s):\n%s", device, estimate.format())
