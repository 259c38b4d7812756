"""The generation protocol (DESIGN.md §5): batched greedy answers with a natural stop, SQuAD-style scoring, bootstrap intervals.

What a user sees: the edited model is asked the query and decodes greedily (left padding, KV cache,
one batch for many queries); it stops at EOS or at the first token that holds a newline, or after
``max_new_tokens`` (the target's length plus a margin, per row). The answer is the first line,
compared with the target after normalization (lowercase, no punctuation, no articles, single
spaces): exact match and token F1 per query.
"""

from __future__ import annotations

import inspect
import json
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import DynamicLayer

from instructedit.evaluation.decode_attention import decode_attention
from instructedit.evaluation.fast_linears import fast_linears
from instructedit.evaluation.greedy_head import HalfHead, bf16_head_wanted, greedy_logits
from instructedit.evaluation.lower_rows import LowerRows, compacted
from instructedit.losses import argmax_ids
from instructedit.models.split import cache_argument

ANSWER_MARGIN = 8  # tokens allowed beyond the target's own length
BOOTSTRAP_SAMPLES = 1000
BOOTSTRAP_SEED = 0
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD normalization: lowercase, drop punctuation and the articles a/an/the, collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_line(text: str) -> str:
    """The answer part of a generation: its first non-empty line, stripped."""
    for line in text.split("\n"):
        if line.strip():
            return line.strip()
    return ""


NO_ANSWER = "(says nothing)"


def shown(answer: str) -> str:
    """An answer as the reports print it: JSON-quoted, so that leading spaces and odd characters are visible, or
    ``NO_ANSWER`` when it is empty (the model's first token is EOS or a newline)."""
    return json.dumps(answer, ensure_ascii=False) if answer else NO_ANSWER


def shown_change(before: str, after: str) -> str:
    """An answer before -> after, as the demos print it (``shown``), the after side "(as before)" when the edit left it
    unchanged to the character (a plain or chat answer that reads oddly is then the model's own, not the edit's doing)."""
    return f"{shown(before)}  ->  {'(as before)' if after == before else shown(after)}"


def exact_match(prediction: str, target: str) -> float:
    """1.0 when the normalized prediction equals the normalized target, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(target))


def same_answer(after: str, before: str) -> bool:
    """Generation locality of one prompt: the answer (first line) is unchanged by the edit.

    Compared after normalization; when both normalize to nothing (punctuation only, e.g. "?" against "!"), the
    stripped lines themselves are compared, so a changed punctuation-only answer is not counted as kept."""
    a, b = first_line(after), first_line(before)
    na, nb = normalize_answer(a), normalize_answer(b)
    return na == nb if na or nb else a == b


def token_f1(prediction: str, target: str) -> float:
    """SQuAD token F1 between the normalized prediction and target (1.0 when both are empty)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(target).split()
    if not pred or not gold:
        return float(pred == gold)
    common = sum((Counter(pred) & Counter(gold)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


_WORDS = re.compile(r"\w+|[^\w\s]")


def ngram_entropy(text: str, ns: Sequence[int] = (2, 3), weights: Sequence[float] = (2 / 3, 4 / 3)) -> float:
    """Fluency as ROME and EasyEdit measure it: the weighted mean over n of the entropy (bits) of the text's word n-grams.

    Words and punctuation marks are tokens (as nltk's word_tokenize splits them); repetitive text has few
    distinct n-grams and low entropy. The paper reports it ×100 (e.g. 601.93). 0.0 for text shorter than the smallest n.
    """
    tokens = _WORDS.findall(text)
    values = []
    for n, weight in zip(ns, weights, strict=True):
        grams = Counter(tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1))
        total = sum(grams.values())
        entropy = -sum(c / total * math.log2(c / total) for c in grams.values()) if total else 0.0
        values.append(weight * entropy)
    return sum(values) / len(values)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95 % percentile-bootstrap interval over the per-case values."""

    mean: float
    low: float
    high: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        return {"mean": self.mean, "ci_low": self.low, "ci_high": self.high, "n": self.n}


def bootstrap_ci(values: Sequence[float], samples: int = BOOTSTRAP_SAMPLES, seed: int = BOOTSTRAP_SEED, level: float = 0.95) -> Interval:
    """Mean of ``values`` and its percentile-bootstrap interval (fixed seed: the same values give the same interval)."""
    n = len(values)
    if n == 0:
        raise ValueError("bootstrap_ci needs at least one value")
    data = torch.tensor([float(v) for v in values], dtype=torch.float64)
    mean = float(data.mean())
    if n == 1:
        return Interval(mean, mean, mean, 1)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n, (samples, n), generator=gen)
    means = data[idx].mean(1).sort().values
    tail = (1 - level) / 2
    low, high = float(means[int(tail * (samples - 1))]), float(means[int(round((1 - tail) * (samples - 1)))])
    return Interval(mean, min(low, mean), max(high, mean), n)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[torch.Tensor, torch.Tensor]:
    """Ids of the vocabulary tokens whose text holds a newline, and of those that are whitespace only.

    A newline ends an answer once it has begun: a leading newline (the model opening its answer on
    the next line) does not.
    """
    cached = getattr(tokenizer, "_instructedit_stop_ids", None)
    if cached is not None:
        return cached
    texts = [tokenizer.decode([i]) for i in range(len(tokenizer))]
    newline = torch.tensor([i for i, t in enumerate(texts) if "\n" in t], dtype=torch.long)
    blank = torch.tensor([i for i, t in enumerate(texts) if not t.strip()], dtype=torch.long)
    try:
        tokenizer._instructedit_stop_ids = (newline, blank)  # decoding the whole vocabulary once costs ~0.5 s
    except AttributeError:
        pass
    return newline, blank


def answer_budget(tokenizer: PreTrainedTokenizerBase, target: str, margin: int = ANSWER_MARGIN) -> int:
    """``max_new_tokens`` for a query whose expected answer is ``target``: its token count plus ``margin``."""
    return len(tokenizer(" " + target.strip(), add_special_tokens=False)["input_ids"]) + margin


def in_frame_budget(tokenizer: PreTrainedTokenizerBase, answer: str, target: str, margin: int = ANSWER_MARGIN) -> int:
    """``max_new_tokens`` for another question asked in an edit's frame (in-frame locality): room for its own ``answer``
    and for the edit's ``target``, which it should not now say."""
    return max(answer_budget(tokenizer, answer, margin), answer_budget(tokenizer, target, margin))


MIN_SHARED_PREFIX = 8  # a batch whose prompts share at least this many leading tokens computes them once
PRUNE_SHARE = 0.05  # finished rows leave the batch once they are this share of it


@torch.no_grad()
def greedy_generate(model: nn.Module, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                    batch_size: int = 32, max_length: int | None = None,
                    rows_context: Callable[[list[int]], AbstractContextManager] | None = None, progress: str | None = None,
                    token_ids: bool = False) -> list[str] | list[list[int]]:
    """Greedy continuations of ``prompts`` (batched, left-padded, KV cache), each cut at its stop (EOS or newline) or budget.

    Returns the raw continuation text of every prompt (up to and including a newline token, without EOS);
    ``first_line`` gives the answer (``token_ids``: the tokens decoded instead of their text).
    ``rows_context(prompt indices)``: a context each batch is decoded
    in (``row_edits.per_row_updates``: every row with its own edit); it is entered again for the rows
    still decoding when finished rows leave the batch. ``progress``: a progress bar with this label.

    Work that does not change the answers is skipped: prompts are batched by shared leading tokens (an
    instruction template) and, without ``rows_context`` (whose per-row edits change every position),
    a batch's shared prefix passes the model once; rows that have stopped leave the batch.
    """
    budgets, encoded = encode_prompts(tokenizer, prompts, max_new_tokens, max_length)
    device = next(model.parameters()).device
    newline, blank = (t.to(device) for t in stop_token_ids(tokenizer))
    eos = tokenizer.eos_token_id
    outputs: list = [""] * len(prompts)
    order = batch_order(encoded)
    for start in tqdm(range(0, len(order), batch_size), desc=progress, unit="batch", disable=progress is None or len(order) <= batch_size):
        rows = order[start : start + batch_size]
        shared = 0 if rows_context is not None else shared_prefix([encoded[i] for i in rows])
        ids, mask = left_padded([encoded[i][shared:] for i in rows], pad_id(tokenizer))
        context = (lambda active, rows=rows: rows_context([rows[a] for a in active])) if rows_context is not None else None
        tokens = greedy_loop(model, ids.to(device), mask.to(device), [budgets[i] for i in rows], newline, blank, eos,
                              prefix=encoded[rows[0]][:shared], context=context)
        for r, i in enumerate(rows):
            outputs[i] = tokens[r] if token_ids else tokenizer.decode(tokens[r], skip_special_tokens=True)
    return outputs


def pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], max_new_tokens: Sequence[int] | int,
                   max_length: int | None) -> tuple[list[int], list[list[int]]]:
    """Per prompt: its token budget and its token ids; a prompt whose answer would pass ``max_length`` raises."""
    budgets = [max_new_tokens] * len(prompts) if isinstance(max_new_tokens, int) else list(max_new_tokens)
    if len(budgets) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} max_new_tokens values")
    encoded = [tokenizer(p)["input_ids"] for p in prompts]
    if max_length is not None:
        long = [i for i, ids in enumerate(encoded) if len(ids) + budgets[i] > max_length]
        if long:
            raise ValueError(f"query {long[0]} ({prompts[long[0]][:50]!r}...) and its answer exceed {max_length} tokens")
    return budgets, encoded


def left_padded(rows: Sequence[Sequence[int]], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask) of ``rows`` padded on the left to the longest."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, width - len(row) :] = torch.tensor(row, dtype=torch.long)
        mask[r, width - len(row) :] = 1
    return ids, mask


def group_keys(encoded: Sequence[Sequence[int]], key_tokens: int = MIN_SHARED_PREFIX) -> list[tuple[int, ...]]:
    """Per prompt, the group it is batched with: its first ``key_tokens`` tokens when another prompt begins with
    them too (an instruction template), else () (the prompts that share no head)."""
    heads = Counter(tuple(ids[:key_tokens]) for ids in encoded if len(ids) > key_tokens)
    out = []
    for ids in encoded:
        head = tuple(ids[:key_tokens])
        out.append(head if heads.get(head, 0) > 1 and len(ids) > key_tokens else ())
    return out


def batch_order(encoded: Sequence[Sequence[int]], key_tokens: int = MIN_SHARED_PREFIX) -> list[int]:
    """Prompt indices in decoding order: prompts of one ``group_keys`` group together, then by length."""
    keys = group_keys(encoded, key_tokens)
    return sorted(range(len(encoded)), key=lambda i: (keys[i], len(encoded[i])))


def shared_prefix(encoded: Sequence[Sequence[int]]) -> int:
    """How many leading tokens all rows of a batch share (0 below ``MIN_SHARED_PREFIX`` or for one row); every row keeps one of its own."""
    if len(encoded) < 2:
        return 0
    n = min(len(ids) for ids in encoded) - 1
    first = encoded[0]
    for k in range(n):
        if any(ids[k] != first[k] for ids in encoded[1:]):
            n = k
            break
    return n if n >= MIN_SHARED_PREFIX else 0


def last_logits_only(model: nn.Module) -> dict[str, int]:
    """The forward argument that projects only the last position onto the vocabulary (the prompt's other positions
    would cost a (tokens × vocab) projection for nothing), under the name this transformers version uses."""
    parameters = inspect.signature(model.forward).parameters
    for name in ("logits_to_keep", "num_logits_to_keep"):
        if name in parameters:
            return {name: 1}
    return {}


@contextmanager
def contiguous_head(model: nn.Module) -> Iterator[None]:
    """Within the block, the model's vocabulary projection reads a contiguous input.

    A pass with ``logits_to_keep=1`` hands the head the last position of every row, a strided (rows, 1, d) view, which
    ``torch.matmul`` runs as one matrix-vector product per row, each reading the whole (vocab × d) weight: 142 ms for
    30 rows on the default model, against 18 ms for the same product on a contiguous copy (a 30-prompt prefill: 0.91
    → 0.80 s). The same logits up to float rounding."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        yield
        return

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        x = args[0] if args else None
        return (x.contiguous(), *args[1:]) if isinstance(x, torch.Tensor) and not x.is_contiguous() else None

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()


def returned_cache(out):
    cache = getattr(out, "cache", None)
    return cache if cache is not None else getattr(out, "past_key_values", None)


class RoomyLayer(DynamicLayer):
    """A ``DynamicLayer`` whose keys and values live at the start of buffers with room for more positions.

    ``DynamicLayer.update`` concatenates: every decoding step copies the whole cache (a quarter of a decoding
    loop's time on the default model, 200 rows). Here a step writes its position into the buffer, and
    rows that leave the batch (``batch_select_indices``) are compacted within it: after the buffers are
    made nothing is allocated but the moved rows' scratch copy (fresh memory costs page faults: ~3 ms per 8 MB
    here). ``keys``/``values`` are views of the filled part, what every reader of a layer sees. Past the room
    the buffers double."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int, rows: int | None = None) -> None:
        """``keys``/``values``: the buffers (capacity rows, heads, capacity positions, head_dim), of which the first ``rows``
        (default: all) rows and ``length`` positions are filled."""
        super().__init__()
        self.device, self.dtype, self.is_initialized = keys.device, keys.dtype, True
        self._keys, self._values, self._length = keys, values, length
        self._rows = keys.shape[0] if rows is None else rows
        self._views()

    @staticmethod
    def buffer_shapes(parts: Sequence[tuple[torch.Tensor, torch.Tensor]], room: int, width: int,
                      spare_rows: int = 0) -> tuple[torch.Size, torch.Size]:
        """The (keys, values) buffer shapes ``padded`` gives ``parts``."""
        rows = sum(k.shape[0] for k, _ in parts) + spare_rows
        (k0, v0) = parts[0]
        return (torch.Size((rows, k0.shape[1], width + room, k0.shape[-1])),
                torch.Size((rows, v0.shape[1], width + room, v0.shape[-1])))

    @classmethod
    def padded(cls, parts: Sequence[tuple[torch.Tensor, torch.Tensor]], room: int, width: int | None = None,
               spare_rows: int = 0, buffers: tuple[torch.Tensor, torch.Tensor] | None = None) -> "RoomyLayer":
        """One layer holding the rows of ``parts`` ((keys, values) pairs) one after another, shorter ones padded on the
        left to ``width`` (default: the longest; zeros: masked), with ``room`` positions to grow and room for
        ``spare_rows`` more rows (``append_copies``). ``buffers``: (keys, values) tensors of ``buffer_shapes`` to fill
        (memory used before: ``DecodeMemory``), else new ones."""
        width = width if width is not None else max(k.shape[-2] for k, _ in parts)
        rows = sum(k.shape[0] for k, _ in parts)
        (k0, v0) = parts[0]
        # the room stays untouched until decoding writes it (fresh memory costs page faults: zeroing it all cost 2.5 s
        # for 360 rows on the default model); the padding is zeroed (masked, but a NaN there would still spread)
        if buffers is None:
            shapes = cls.buffer_shapes(parts, room, width, spare_rows)
            buffers = (k0.new_empty(shapes[0]), v0.new_empty(shapes[1]))
        keys, values = buffers
        keys[:rows, :, :width].zero_()
        values[:rows, :, :width].zero_()
        at = 0
        for k, v in parts:
            n = k.shape[0]
            keys[at : at + n, :, width - k.shape[-2] : width] = k
            values[at : at + n, :, width - v.shape[-2] : width] = v
            at += n
        return cls(keys, values, width, rows)

    def _views(self) -> None:
        self.keys = self._keys[: self._rows, :, : self._length]
        self.values = self._values[: self._rows, :, : self._length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        new = key_states.shape[-2]
        if self._length + new > self._keys.shape[-2]:
            room = max(new, self._length)
            self._keys, self._values = (torch.nn.functional.pad(t, (0, 0, 0, room)) for t in (self.keys, self.values))
            self._rows = self._keys.shape[0]
        self._keys[: self._rows, :, self._length : self._length + new] = key_states
        self._values[: self._rows, :, self._length : self._length + new] = value_states
        self._length += new
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self._length

    def crop(self, tokens_to_remove: int) -> None:
        raise NotImplementedError("a decoding cache with reserved room is not cropped")

    def batch_repeat_interleave(self, repeats: int) -> None:  # no room left: the next update doubles the buffers
        self._keys, self._values = self.keys.repeat_interleave(repeats, dim=0), self.values.repeat_interleave(repeats, dim=0)
        self._rows = self._keys.shape[0]
        self._views()

    def append_copies(self, rows: Sequence[int]) -> None:
        """Append copies of ``rows`` (their keys and values so far) as new rows at the end."""
        if not rows:
            return
        index = torch.tensor(list(rows), device=self._keys.device)
        if self._rows + len(rows) > self._keys.shape[0]:
            grow = max(len(rows), self._rows)
            self._keys, self._values = (torch.nn.functional.pad(t, (0, 0, 0, 0, 0, 0, 0, grow)) for t in (self._keys, self._values))
        for buffer in (self._keys, self._values):
            buffer[self._rows : self._rows + len(rows), :, : self._length] = buffer[index, :, : self._length]
        self._rows += len(rows)
        self._views()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (in this order), in place: only the rows whose place changes are copied (``compacted``
        moves few)."""
        moved = (indices != torch.arange(len(indices), device=indices.device)).nonzero()[:, 0]
        if len(moved):
            sources = indices[moved]
            for buffer in (self._keys, self._values):  # index_select/index_copy_: 2-3x faster here than indexing both sides
                filled = buffer[:, :, : self._length]
                filled.index_copy_(0, moved, filled.index_select(0, sources))
        self._rows = len(indices)
        self._views()


class DecodeMemory:
    """Memory for decoding caches, kept with a model between calls (``for_model``) so that a cache is not built in fresh
    memory every time: first touch of fresh memory costs page faults (a 30-case loop's cache on the default model is
    ~0.75 GB touched, 0.4-1.6 s of faults on this machine, depending on the host). One flat block, grown when a call
    needs more; ``take`` hands out views of it (a caller holding it exclusively: ``claim``). ``release(model)`` drops it."""

    _ATTRIBUTE = "_instructedit_decode_memory"

    def __init__(self) -> None:
        self.blocks: dict[str, torch.Tensor] = {}
        self.busy = False
        self._half_head: HalfHead | None = None

    def half_head(self, weight: torch.Tensor) -> HalfHead:
        """The bfloat16 copy of a vocabulary projection ``weight`` (``greedy_head``), made again when the weight changed."""
        if self._half_head is None or self._half_head.key != HalfHead.key_of(weight):
            self._half_head = None  # the old copy goes before the new one is made
            self._half_head = HalfHead.of(weight)
        return self._half_head

    @property
    def block(self) -> torch.Tensor | None:
        """The decoding caches' block (None before the first)."""
        return self.blocks.get("cache")

    @classmethod
    def for_model(cls, model: nn.Module) -> "DecodeMemory":
        memory = getattr(model, cls._ATTRIBUTE, None)
        if memory is None:
            memory = cls()
            setattr(model, cls._ATTRIBUTE, memory)
        return memory

    @classmethod
    def release(cls, model: nn.Module) -> None:
        """Free the memory kept with ``model`` (the next decoding builds its cache in fresh memory again)."""
        if hasattr(model, cls._ATTRIBUTE):
            delattr(model, cls._ATTRIBUTE)

    @contextmanager
    def claim(self) -> Iterator["DecodeMemory | None"]:
        """This memory for the block's caches, or None when another caller holds it (then build in fresh memory)."""
        if self.busy:
            yield None
            return
        self.busy = True
        try:
            yield self
        finally:
            self.busy = False

    def take(self, shapes: Sequence[torch.Size], like: torch.Tensor, slot: str = "cache") -> list[torch.Tensor]:
        """Tensors of ``shapes`` (``like``'s dtype and device), views of the ``slot`` block one after another (slots:
        "cache" for the decoding cache, "logits" and "half_logits" for the steps' vocabulary logits, ``projected_into``)."""
        sizes = [math.prod(shape) for shape in shapes]
        need = sum(sizes)
        block = self.blocks.get(slot)
        if block is None or block.numel() < need or block.dtype != like.dtype or block.device != like.device:
            self.blocks.pop(slot, None)  # the old block goes before the new one is made
            self.blocks[slot] = block = like.new_empty(need)
        out, at = [], 0
        for shape, size in zip(shapes, sizes):
            out.append(block[at : at + size].view(shape))
            at += size
        return out


@contextmanager
def projected_into(model: nn.Module, memory: DecodeMemory | None, rows: int, greedy: bool = False) -> Iterator[None]:
    """Within the block, the model's vocabulary projection (an ``nn.Linear`` head) writes its logits for up to ``rows``
    positions into ``memory``'s "logits" block instead of a new tensor: a decoding step's logits (rows × vocabulary: 42 MB
    for 216 rows on the default model) would otherwise be fresh memory every step (page faults). The logits a step
    returns are then a view, overwritten by the next step. Other heads, or more positions, project as usual.

    ``greedy``: the caller reads only each row's argmax. Where ``greedy_head.bf16_head_wanted`` (a CPU with bfloat16
    units: AMX or AVX512-BF16) and the head is a float32 one without bias, it projects in bfloat16 and decides the argmax in
    float32 (``greedy_head.greedy_logits``: the same token, the other entries not logits), its bfloat16 copy of the
    weight kept with the model (``DecodeMemory``)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(head, nn.Linear) or rows < 1:
        yield
        return
    half = None
    if greedy and head.bias is None and head.weight.dtype == torch.float32 and head.weight.device.type == "cpu" and bf16_head_wanted():
        half = (memory or DecodeMemory.for_model(model)).half_head(head.weight)
    if memory is None and half is None:
        yield
        return
    shape = torch.Size((rows, head.out_features))
    buffer = memory.take([shape], head.weight, slot="logits")[0] if memory is not None else None
    # the bfloat16 logits, also not fresh memory each step
    half_buffer = memory.take([shape], half.half, slot="half_logits")[0] if memory is not None and half is not None else None
    usual, own = head.forward, head.__dict__.get("forward")  # own: a forward the instance already had (kept)

    def forward(x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        if x.dtype != head.weight.dtype or torch.is_grad_enabled():
            return usual(x)
        n = flat.shape[0] if flat.shape[0] <= rows else None  # more rows than the buffers hold: fresh memory
        out = buffer[:n] if buffer is not None and n is not None else None
        if half is not None:
            out = greedy_logits(flat, half, out, half_out=half_buffer[:n] if half_buffer is not None and n is not None else None)
        elif out is None:
            return usual(x)
        else:
            torch.mm(flat, head.weight.t(), out=out)
            if head.bias is not None:
                out += head.bias
        return out.view(*x.shape[:-1], head.out_features)

    head.forward = forward
    try:
        yield
    finally:
        if own is not None:
            head.forward = own
        else:
            del head.forward


def with_room(cache: Any, room: int) -> Any:
    """``cache`` (a transformers ``DynamicCache``) with room for ``room`` more positions in every layer (``RoomyLayer``);
    a cache of another kind, or one already roomy, is returned as it is."""
    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not layer.is_initialized for layer in layers):
        return cache
    cache.layers = [RoomyLayer.padded([(layer.keys, layer.values)], room) for layer in layers]
    return cache


def greedy_loop(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor, budgets: list[int], newline: torch.Tensor,
                 blank: torch.Tensor, eos: int | None, prefix: Sequence[int] = (),
                 context: Callable[[list[int]], AbstractContextManager] | None = None,
                 start: tuple[torch.Tensor, Any] | None = None, given: Sequence[Sequence[int]] | None = None,
                 lower: LowerRows | None = None, memory: DecodeMemory | None = None) -> list[list[int]]:
    """Greedy decoding of a left-padded batch; a row is done at its budget, at EOS or after a newline that ends some text.

    ``prefix``: tokens every row begins with, before its own (left-padded) ``ids``: they pass the model
    once and their cache is shared. ``context(active rows)``: entered around the forward passes.
    ``start``: (last-position logits, KV cache) of ``ids`` already run through the model (the prefill is skipped).
    ``given``: per row, answer tokens already decided (``before_after.Seed``): they end its ``ids`` and
    begin its answer, none of them a stop; ``budgets`` count the tokens still to come.
    ``lower`` (with ``start``): rows that share the blocks below ``lower.split_at`` (``lower_rows.LowerRows``; the
    start cache's lower layers hold its lower rows). ``memory``: the steps' logits go into its memory
    (``projected_into``).
    """
    if lower is not None and start is None:
        raise ValueError("rows share their lower layers only from a start cache built for them")
    n = ids.shape[0]
    keep = last_logits_only(model)
    cache_arg = cache_argument(model)
    past = None
    if len(prefix):
        past = returned_cache(model(input_ids=torch.tensor([list(prefix)], device=ids.device), use_cache=True, **keep))
        past.batch_repeat_interleave(n)
        mask = torch.cat([torch.ones((n, len(prefix)), dtype=mask.dtype, device=mask.device), mask], dim=1)
    position = (mask.cumsum(-1) - 1).clamp(min=0)[:, len(prefix) :]  # left padding does not shift positions
    blank_ids = set(blank.tolist()) if given is not None else set()
    tokens: list[list[int]] = [list(g) for g in given] if given is not None else [[] for _ in range(n)]
    # the row has produced non-blank text
    started = torch.tensor([any(t not in blank_ids for t in row) for row in tokens], dtype=torch.bool, device=ids.device)
    done = torch.zeros(n, dtype=torch.bool, device=ids.device)
    limit = torch.tensor(budgets, device=ids.device)
    active = list(range(n))  # batch row -> row of the caller's batch
    step_ids, step_pos = ids, position
    with ExitStack() as stack, contiguous_head(model), projected_into(model, memory, n, greedy=True), decode_attention(model), \
            fast_linears(model):
        if context is not None:
            stack.enter_context(context(active))
        for step in range(max(budgets)):
            if step == 0 and start is not None:
                logits, past = start
            elif lower is not None:  # the lower blocks run once per lower row, the upper ones per row
                reader = lower.inputs(step_ids, done, past)
                with lower.widened():
                    out = model(input_ids=step_ids[reader], attention_mask=mask[reader], position_ids=step_pos[reader], use_cache=True,
                                **{cache_arg: past}, **keep)
                logits = out.logits[:, -1]
            else:
                out = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, use_cache=True, **{cache_arg: past}, **keep)
                logits, past = out.logits[:, -1], returned_cache(out)
            if step == 0:
                past = with_room(past, max(budgets))
            nxt = argmax_ids(logits)  # (rows,)
            is_eos = nxt == eos if eos is not None else torch.zeros_like(done)
            is_blank = torch.isin(nxt, blank)
            stop = (torch.isin(nxt, newline) & (started | ~is_blank)) | is_eos
            started |= ~is_blank
            said = nxt.tolist()  # one device-to-host copy a step (int(nxt[r]) per row syncs a GPU once per row)
            for r in (~done & ~is_eos).nonzero()[:, 0].tolist():
                tokens[active[r]].append(said[r])  # a newline token is kept: text before its newline belongs to the answer
            done |= stop | (step + 1 >= limit)
            if bool(done.all()):
                break
            step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1
            mask = torch.cat([mask, torch.ones((len(active), 1), dtype=mask.dtype, device=mask.device)], dim=1)
            if past is not None and int(done.sum()) >= PRUNE_SHARE * len(active):  # finished rows leave the batch
                still = compacted(done)
                if lower is not None:
                    lower.select(still, past)
                else:
                    past.batch_select_indices(still)
                step_ids, step_pos, mask = step_ids[still], step_pos[still], mask[still]
                started, done, limit = started[still], done[still], limit[still]
                active = [active[i] for i in still.tolist()]
                if context is not None:
                    stack.close()
                    stack.enter_context(context(active))
    return tokens
