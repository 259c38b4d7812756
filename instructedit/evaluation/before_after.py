"""Greedy answers before and after an edit from ONE prefill: the blocks below the first edited one run once.

An edit changes only the blocks from ``split.first_layer`` on, so the prompt's keys, values and
hidden states below them are the same before and after it. Per batch of prompts, the unedited model
runs the prompts once (as ``greedy_generate`` would), while hooks keep what each edited block was
called with; each edited variant's prefill then re-runs only the edited blocks on those inputs,
every row with its own edit (``row_edits``), into a cache whose lower layers are the unedited ones
(shared, not copied). The leading tokens a group of prompts shares (an instruction template, a chat system turn) pass
the model once, for one row, and the edited blocks replay them row by row. The rows of several
batches, unedited and edited, then decode in one loop, so each decoding step reads the weights once
for all of them (shorter caches padded on the left, in one cache with room for the answers: ``RoomyLayer``;
``decode_rows_for`` bounds its size); an edited row fed the same tokens as its unedited twin so far runs the blocks
below the edited ones with it, once (``lower_rows``: the cache's lower layers hold one row for both). On the default model (30 blocks, 3 edited) an edited prefill
costs a tenth of a full one: the evaluation runner asks every case before and after its edit, the
training validation asks before and after its edit at several step-size multipliers.

The answers equal ``greedy_generate`` calls without and with the per-row edits up to float
rounding; the first batch on a model checks that re-running the suffix without edits gives the
unedited logits (once per model), and where it does not (an architecture whose final projection does more than
norm + head), the two calls are made separately instead.

A prompt that already passed the model (``Seed``: the evaluation runner's teacher-forced pass over
the prompt and its expected answer) is not prefilled: its rows decode on from the seed's keys and
values, with the answer tokens that pass verified as greedy's already given.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Collection, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

from instructedit.evaluation.fast_linears import fast_linears
from instructedit.evaluation.generation import (
    DecodeMemory, RoomyLayer, cache_argument, contiguous_head, group_keys, shared_prefix, encode_prompts, greedy_generate, greedy_loop, last_logits_only,
    left_padded, pad_id, projected_into, returned_cache, stop_token_ids,
)
from instructedit.evaluation.lower_rows import LowerRows
from instructedit.evaluation.row_edits import Updates, per_row_updates
from instructedit.models.split import SplitModel, with_cache

logger = logging.getLogger(__name__)


@dataclass
class Seed:
    """A query's answer begun elsewhere (``packing.case_seeds``: its teacher-forced pass over prompt + expected answer).

    ``layers``: per layer the keys and values (heads, length, head_dim) of the prompt and the ``given``
    tokens, the answer's first tokens that greedy decoding would produce (none a stop); ``logits``: the
    next-token logits after them. Decoding goes on from there without a prefill.
    """

    layers: list[tuple[torch.Tensor, torch.Tensor]]
    logits: torch.Tensor
    given: list[int]

    @property
    def length(self) -> int:
        return self.layers[0][0].shape[-2]


Source = tuple[list[tuple[torch.Tensor, torch.Tensor]], torch.Tensor]  # per layer (keys, values) of some rows; their attention mask


def seed_sources(seeds: Sequence[Seed]) -> list[Source]:
    """Every seed as a one-row ``Source`` (views of its keys and values: ``_merged`` copies them once, into the decoding
    cache; a version that gathered a pass row's seeds together and kept the rows alive instead was slower, 1.67× against
    1.60× the teacher-forced time)."""
    return [([(k[None], v[None]) for k, v in seed.layers], torch.ones((1, seed.length), dtype=torch.long, device=seed.logits.device))
            for seed in seeds]


_REPLAY_CHECKED = "_instructedit_replay_checked"  # set on a model whose edited blocks' replay was checked
DECODE_ROWS = 512  # most rows (prompts × (variants + 1)) one decoding loop holds: each step reads the weights once for all
DECODE_CACHE_BYTES = 3 * 2**30  # and at most this much KV cache (rows × DECODE_ROW_TOKENS tokens): fewer rows for a larger model
DECODE_ROW_TOKENS = 128


def decode_rows_for(model: nn.Module) -> int:
    """How many rows one decoding loop holds on ``model``: ``DECODE_ROWS``, fewer where their keys and values would pass
    ``DECODE_CACHE_BYTES`` (the default model: 46 KB per token in float32, 512 rows; a 7B LLaMA in bfloat16: 512 KB, 48)."""
    config = getattr(model, "config", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    heads = getattr(config, "num_attention_heads", None) or getattr(config, "n_head", None)
    hidden = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if not (layers and heads and hidden):
        return DECODE_ROWS // 2
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    per_token = 2 * layers * kv_heads * head_dim * next(model.parameters()).element_size()
    return max(16, min(DECODE_ROWS, DECODE_CACHE_BYTES // (per_token * DECODE_ROW_TOKENS)))


RowUpdates = Callable[[int, int], Updates | None]  # (variant, prompt index) -> the row's weight update (None: unedited)


class _SharedStart:
    """Leading tokens several prefill batches begin with (an instruction template, a chat system turn), passed through the
    unedited model once, for one row: its cache, and what the edited blocks were called with (``_Prefill`` replays them)."""

    def __init__(self, model: nn.Module, split: SplitModel, tokens: Sequence[int], device: torch.device) -> None:
        self.length = len(tokens)
        with split.recording_block_inputs() as captured:
            out = model(input_ids=torch.tensor([list(tokens)], device=device), use_cache=True, **last_logits_only(model))
        self.hidden, self.block_args = split.block_arguments(captured)
        self.cache = returned_cache(out)

    def repeated(self, n: int) -> Cache:
        """A cache of ``n`` rows that each begin with these tokens (views of this one: the rows' pass appends by concatenation,
        which copies; nothing writes this cache)."""
        cache = copy.copy(self.cache)
        cache.layers = []
        for layer in self.cache.layers:
            row = copy.copy(layer)
            row.keys, row.values = layer.keys.expand(n, -1, -1, -1), layer.values.expand(n, -1, -1, -1)
            cache.layers.append(row)
        return cache


class _Prefill:
    """The unedited prefill of one left-padded batch and what the edited blocks were called with.

    ``start``: tokens every row begins with (``_SharedStart``, shared by the batches of a group): they passed the model
    once, for one row, and the rows' own tokens run on a copy of its cache; the edited blocks are replayed on both parts,
    row by row (``replay``).
    """

    def __init__(self, model: nn.Module, split: SplitModel, ids: torch.Tensor, mask: torch.Tensor, start: _SharedStart | None = None) -> None:
        with contiguous_head(model):
            self._run(model, split, ids, mask, start)

    def _run(self, model: nn.Module, split: SplitModel, ids: torch.Tensor, mask: torch.Tensor, start: _SharedStart | None) -> None:
        self.split = split
        n, keep, extra, shared = ids.shape[0], last_logits_only(model), {}, 0
        self.stages: list[tuple[torch.Tensor, list]] = []  # (input of the first edited block, block arguments) per pass, in order
        if start is not None:
            shared = start.length
            self.stages.append((start.hidden.expand(n, -1, -1).contiguous(), start.block_args))
            mask = torch.cat([torch.ones((n, shared), dtype=mask.dtype, device=mask.device), mask], dim=1)
            extra = {cache_argument(model): start.repeated(n)}
        self.mask = mask  # over the shared start and the rows' own tokens
        with split.recording_block_inputs() as captured:
            position = (mask.cumsum(-1) - 1).clamp(min=0)[:, shared:]  # left padding does not shift positions
            out = model(input_ids=ids, attention_mask=mask, position_ids=position, use_cache=True, **extra, **keep)
        self.stages.append(split.block_arguments(captured))
        self.logits = out.logits[:, -1]
        self.cache = returned_cache(out)

    def replay(self, rows: torch.Tensor | None = None) -> tuple[torch.Tensor, Cache]:
        """Last-position logits and the cache of the edited blocks re-run on the unedited inputs, with whatever edits are active.
        ``rows``: the batch rows to re-run, in this order, a row as often as it is listed (one prompt under several edits);
        None: every row once.

        The cache's layers below the first edited one are the unedited cache's own (shared, not copied: nothing
        writes them before ``_merged`` copies them into the decoding cache), one row per batch row whatever ``rows``."""
        cache = copy.copy(self.cache)
        suffix = set(self.split.suffix_indices)
        cache.layers = [DynamicLayer() if i in suffix else layer for i, layer in enumerate(self.cache.layers)]
        n = self.mask.shape[0]
        for hidden, recorded in self.stages:  # the shared prefix (if any), then the rows' own tokens
            if rows is not None:
                hidden, recorded = hidden.index_select(0, rows), _batch_rows(recorded, rows, n)
            out = self.split.blocks(hidden, with_cache(recorded, cache))
        return self.split.head(out[:, -1]), cache

    def replay_matches(self) -> bool:
        """Whether the suffix re-run without edits reproduces the unedited logits."""
        return torch.allclose(self.replay()[0].float(), self.logits.float(), atol=1e-4, rtol=1e-3)


def _batch_rows(value: Any, rows: torch.Tensor, n: int) -> Any:
    """``value`` (block arguments: tuples, lists, dicts of tensors) with every per-row tensor of a batch of ``n`` rows (two
    or more dimensions, the first ``n`` long: masks, positions, rotary embeddings) taken at ``rows``; a tensor broadcast over
    the rows (first dimension 1: a shared start's arguments), one of one dimension (cache positions) and a cache as given."""
    if isinstance(value, torch.Tensor):
        return value.index_select(0, rows) if value.dim() >= 2 and value.shape[0] == n else value
    if isinstance(value, tuple):
        return tuple(_batch_rows(v, rows, n) for v in value)
    if isinstance(value, list):
        return [_batch_rows(v, rows, n) for v in value]
    if isinstance(value, dict):
        return {k: _batch_rows(v, rows, n) for k, v in value.items()}
    return value


def _merged(sources: Sequence[Source], room: int, split_at: int = 0, lower: Sequence[bool] | None = None,
            memory: DecodeMemory | None = None) -> tuple[Cache, torch.Tensor]:
    """One cache holding the rows of ``sources`` one after another, shorter ones padded on the left (zero keys and values,
    masked), with ``room`` positions to decode into (``RoomyLayer``: every source is copied once), and the attention mask
    of its rows. ``lower[s]`` False: source ``s`` is left out of the layers below ``split_at`` (its rows read another
    source's there: ``_lower_rows``), which keep room for the rows left out. ``memory``: the buffers are views of it
    (an earlier cache's memory: no page faults), else new."""
    width = max(mask.shape[1] for _, mask in sources)
    lower = lower if lower is not None else [True] * len(sources)
    left_out = sum(mask.shape[0] for (_, mask), kept in zip(sources, lower, strict=True) if not kept)
    parts = [[layers[i] for (layers, _), kept in zip(sources, lower) if kept or i >= split_at] for i in range(len(sources[0][0]))]
    spare = [left_out if i < split_at else 0 for i in range(len(parts))]
    buffers: list[tuple[torch.Tensor, torch.Tensor] | None] = [None] * len(parts)
    if memory is not None:
        shapes = [shape for i, p in enumerate(parts) for shape in RoomyLayer.buffer_shapes(p, room, width, spare[i])]
        views = memory.take(shapes, parts[0][0][0])
        buffers = list(zip(views[0::2], views[1::2]))
    cache = DynamicCache()
    cache.layers = [RoomyLayer.padded(p, room, width, spare_rows=spare[i], buffers=buffers[i]) for i, p in enumerate(parts)]
    return cache, torch.cat([torch.nn.functional.pad(mask, (width - mask.shape[1], 0)) for _, mask in sources])


def _lower_rows(sources: Sequence[Sequence[Source]], split_at: int,
                rows_of: Sequence[list[int] | None] | None = None) -> tuple[list[int], list[bool]]:
    """(per decoding row its lower row, per source whether it enters the lower layers) for ``sources`` per variant (0: the
    unedited), their rows in that order: an edited source whose layers below ``split_at`` are its unedited twin's own
    tensors (the same prompt, the same tokens: a prefill's replay, a seed with the same given tokens) reads the twin's
    lower rows (``lower_rows.LowerRows``). ``rows_of[s]``: the twin's row each row of source ``s``'s edited sources
    replays (``_Prefill.replay(rows)``: a prompt under several edits); None: row for row."""
    lower: list[int] = []
    kept: list[bool] = []
    firsts: list[int] = []  # per unedited source, its first lower row
    count = 0
    for v, per_variant in enumerate(sources):
        for s, (layers, mask) in enumerate(per_variant):
            n = mask.shape[0]
            rows = rows_of[s] if rows_of is not None and v > 0 else None  # None: row for row
            twin_layers, twin_mask = sources[0][s] if v > 0 else (None, None)
            twin = v > 0 and _same_tensors(layers[:split_at], twin_layers[:split_at]) and \
                torch.equal(mask, twin_mask if rows is None else twin_mask[rows])
            first = firsts[s] if twin else count
            count += 0 if twin else n
            if v == 0:
                firsts.append(first)
            lower += [first + r for r in rows] if twin and rows is not None else range(first, first + n)
            kept.append(not twin)
    return lower, kept


def _same_tensors(a: Sequence[tuple[torch.Tensor, torch.Tensor]], b: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> bool:
    """Whether two lists of (keys, values) are views of the same memory, element by element."""
    return len(a) == len(b) and all(x.data_ptr() == y.data_ptr() and x.shape == y.shape and x.stride() == y.stride()
                                    for pa, pb in zip(a, b) for x, y in zip(pa, pb))


def _chunks(encoded: Sequence[Sequence[int]], batch_size: int, seeded: Sequence[bool] | None = None,
            served: Collection[int] | None = None) -> list[tuple[list[int], int | None]]:
    """Prefill batches in decoding order: the prompts to prefill (not ``seeded``) grouped by the leading tokens they share
    (``group_keys`` among themselves), then by length; at most ``batch_size`` prompts of one group per batch, cut where
    padding costs more than a pass (``_pieces``); each with the number of leading tokens its prompts share. A group whose
    shared start would save fewer tokens than its own passes cost joins the prompts without one (CounterFact: a plain
    question shares its head with a seeded probe or one other question; alone, each was a one-row pass). Then the seeded
    prompts (no prefill), ``batch_size`` at a time, with None. ``served``: prompts another prompt's row answers (the same
    tokens, ``_same_prompts``), in no batch."""
    seeded = seeded or [False] * len(encoded)
    todo = [i for i in range(len(encoded)) if not seeded[i] and (served is None or i not in served)]
    keys = group_keys([encoded[i] for i in todo])
    worth: dict[tuple[int, ...], bool] = {}
    for key in set(keys):
        rows = [encoded[i] for i, k in zip(todo, keys) if k == key]
        shared = shared_prefix(rows) if key else 0
        worth[key] = shared > 0 and len(rows) * shared > shared + 2 * PREFILL_CALL_TOKENS  # its start's pass and its own
    key_of = {i: key if worth[key] else () for i, key in zip(todo, keys)}
    chunks: list[list[int]] = []
    for i in sorted(todo, key=lambda i: (key_of[i], len(encoded[i]))):
        if chunks and len(chunks[-1]) < batch_size and key_of[chunks[-1][0]] == key_of[i]:
            chunks[-1].append(i)
        else:
            chunks.append([i])
    out: list[tuple[list[int], int | None]] = [piece for rows in chunks for piece in _pieces(encoded, rows)]
    with_seed = [i for i in range(len(encoded)) if seeded[i]]
    return out + [(with_seed[k : k + batch_size], None) for k in range(0, len(with_seed), batch_size)]


def _same_prompts(encoded: Sequence[Sequence[int]], seeded: Sequence[bool]) -> dict[int, list[int]]:
    """Per prompt with rows of its own, the prompts they answer: itself, then every later one with the same tokens (a
    ``seeded`` prompt: itself alone, its seed is a pass of its own). Their unedited answer is one, and their edited rows
    replay one prefill row, each under its own edit (the evaluation runner asks another case's question in a case's
    frame: the plain and chat forms of that case's own question)."""
    first: dict[tuple[int, ...], int] = {}
    served: dict[int, list[int]] = {}
    for i, ids in enumerate(encoded):
        served.setdefault(i if seeded[i] else first.setdefault(tuple(ids), i), []).append(i)
    return served


PREFILL_CALL_TOKENS = 48  # what one more prefill pass costs beyond its tokens (reading the weights: ~55 ms, ~35 tokens here)


def _pieces(encoded: Sequence[Sequence[int]], rows: Sequence[int]) -> list[tuple[list[int], int]]:
    """A prefill batch (``rows`` by length) cut into the runs that cost least: padded tokens plus ``PREFILL_CALL_TOKENS``
    per pass. The leading tokens all its prompts share (``shared_prefix``) pass the model once for every run
    (``_SharedStart``); each run comes with their number.

    Left padding costs as much as tokens: 30 plain ZsRE questions of 7 to 18 tokens padded together are 540 tokens
    for 353; 30 chat-template questions, 720 for 533 after their shared 24-token system turn."""
    shared = shared_prefix([encoded[i] for i in rows])

    def cost(a: int, b: int) -> int:
        return (b - a) * (max(len(encoded[i]) for i in rows[a:b]) - shared) + PREFILL_CALL_TOKENS

    best: list[tuple[int, int]] = [(0, 0)]  # per prefix of the rows: (least cost, start of its last run)
    for b in range(1, len(rows) + 1):
        best.append(min((best[a][0] + cost(a, b), a) for a in range(b)))
    out, b = [], len(rows)
    while b:
        a = best[b][1]
        out.append((list(rows[a:b]), shared))
        b = a
    return out[::-1]


@torch.no_grad()
def greedy_before_after(model: nn.Module, tokenizer: PreTrainedTokenizerBase, split: SplitModel, prompts: Sequence[str],
                        max_new_tokens: Sequence[int] | int, updates: RowUpdates, transposed: Mapping[str, bool], variants: int = 1,
                        batch_size: int = 32, max_length: int | None = None,
                        variant_scales: Sequence[float] | None = None, decode_rows: int | None = None,
                        seeds: Sequence[tuple[Seed, Seed] | None] | None = None) -> tuple[list[str], list[list[str]]]:
    """Greedy continuations of ``prompts`` by the unedited model and by ``variants`` edited ones, from one prefill per batch.

    ``updates(variant, prompt index)``: the weight update (``row_edits.Updates``, or None: unedited) the
    prompt is answered with in that variant, added row by row on blocks ``split.first_layer`` and
    later (``transposed`` as ``per_row_updates`` takes it), times ``variant_scales[variant]`` if
    given (one update at several step-size multipliers). Returns (unedited answers, answers per variant); each equals a ``greedy_generate`` call with the same per-row edits up to float rounding.

    Prompts are prefilled in batches of at most ``batch_size`` that share their leading tokens (an
    instruction template: it passes the model once per batch); the batches' rows, unedited and
    edited, then decode together in one loop of up to ``decode_rows`` rows (default: ``decode_rows_for``; fewer, longer-lived
    loops: each decoding step reads the weights once for all of them).

    ``seeds`` (one variant only): per prompt, None or its (unedited, edited) ``Seed``: the prompt's
    keys and values and the first answer tokens from a teacher-forced pass that already ran (the
    evaluation runner's); it is not prefilled, and its rows decode on from where the seeds end.

    Prompts to prefill with the same tokens (the runner's in-frame questions are other cases' plain and chat questions)
    are prefilled and answered unedited once, to the largest of their budgets, each answer cut to its own; each prompt's
    edited rows replay that prefill row under its own edits and share its lower rows (``_same_prompts``).
    """
    budgets, encoded = encode_prompts(tokenizer, prompts, max_new_tokens, max_length)
    if not prompts:
        return [], [[] for _ in range(variants)]
    if seeds is not None and (variants != 1 or len(seeds) != len(prompts)):
        raise ValueError(f"seeds need one variant and one entry per prompt, got {variants} variants and {len(seeds)} seeds "
                         f"for {len(prompts)} prompts")
    seeds = seeds if seeds is not None else [None] * len(prompts)
    for i, pair in enumerate(seeds):
        if pair is not None and any(seed.length - len(seed.given) != len(encoded[i]) for seed in pair):
            raise ValueError(f"the seed of prompt {i} ({prompts[i][:50]!r}...) does not begin with its {len(encoded[i])} tokens")
    device = next(model.parameters()).device
    newline, blank = (t.to(device) for t in stop_token_ids(tokenizer))
    eos = tokenizer.eos_token_id
    before: list[str] = [""] * len(prompts)
    after: list[list[str]] = [[""] * len(prompts) for _ in range(variants)]

    def rows_context(owners: Sequence[tuple[int, int] | None]) -> AbstractContextManager:  # (variant, prompt) per batch row
        scales = None if variant_scales is None else [1.0 if o is None else variant_scales[o[0]] for o in owners]
        return per_row_updates(model, [None if o is None else updates(*o) for o in owners], transposed, scales)

    seeded = [pair is not None for pair in seeds]
    served = _same_prompts(encoded, seeded)  # a prompt's unedited row and prefill serve every later one with its tokens
    chunks = _chunks(encoded, batch_size, seeded, {j for rows in served.values() for j in rows[1:]})

    def decoded(chunk: tuple[list[int], int | None]) -> int:  # a batch's decoding rows: one unedited per prompt it prefills,
        return len(chunk[0]) + variants * sum(len(served[i]) for i in chunk[0])  # an edited one per prompt answered

    per_loop = max(batch_size * (variants + 1), decode_rows or decode_rows_for(model))  # rows decoded in one loop
    checked = getattr(model, _REPLAY_CHECKED, False)  # once per model: the check costs a replay of the edited blocks
    starts: dict[tuple[int, ...], _SharedStart] = {}  # leading tokens of several batches: they pass the model once
    # an earlier call's cache memory (no page faults; on a GPU the caching allocator reuses freed memory, and a block kept
    # with the model would hold gigabytes between calls, through training too); prefills too through oneDNN where it is
    # faster (``fast_linears``)
    kept = DecodeMemory.for_model(model).claim() if next(model.parameters()).device.type == "cpu" else nullcontext()
    with kept as memory, fast_linears(model):
        while chunks:
            group: list[tuple[list[int], int | None]] = []
            while chunks and (not group or sum(map(decoded, group)) + decoded(chunks[0]) <= per_loop):
                group.append(chunks.pop(0))
            # per variant (0: unedited), per chunk: next-token logits, and the keys and values of its rows
            logits: list[list[torch.Tensor]] = [[] for _ in range(variants + 1)]
            sources: list[list[Source]] = [[] for _ in range(variants + 1)]
            edited: list[int] = []  # the prompts of the edited rows, per variant in this order
            rows_of: list[list[int] | None] = []  # per source, the unedited row each edited row replays (None: row for row)
            for rows, shared in group:
                if shared is None:  # seeded: decoding goes on from the seeds
                    for v in range(2):
                        logits[v].append(torch.stack([seeds[i][v].logits for i in rows]))
                        sources[v] += seed_sources([seeds[i][v] for i in rows])
                    edited += rows
                    rows_of += [None] * len(rows)  # a source per seed
                    continue
                ids, mask = (t.to(device) for t in left_padded([encoded[i][shared:] for i in rows], pad_id(tokenizer)))
                head = tuple(encoded[rows[0]][:shared])
                if head and head not in starts:
                    starts[head] = _SharedStart(model, split, head, device)
                with projected_into(model, None, len(rows), greedy=checked):  # bfloat16 head: exact logits for the check
                    prefill = _Prefill(model, split, ids, mask, starts.get(head))
                if not checked and not prefill.replay_matches():
                    logger.warning("re-running the edited blocks of %s does not reproduce its logits: the unedited and edited answers are "
                                   "decoded separately (full prefills)", type(model).__name__)
                    return (greedy_generate(model, tokenizer, prompts, budgets, batch_size, max_length),
                            [greedy_generate(model, tokenizer, prompts, budgets, batch_size, max_length,
                                             rows_context=lambda idx, v=v: rows_context([(v, i) for i in idx])) for v in range(variants)])
                if not checked:
                    setattr(model, _REPLAY_CHECKED, True)
                checked = True
                logits[0].append(prefill.logits)
                sources[0].append(([(layer.keys, layer.values) for layer in prefill.cache.layers], prefill.mask))
                mine = [j for u in rows for j in served[u]]  # each prompt's edited rows, those of a prompt it serves after it
                replayed = [k for k, u in enumerate(rows) for _ in served[u]] if len(mine) > len(rows) else None
                index = None if replayed is None else torch.tensor(replayed, device=device)
                for v in range(variants):
                    with rows_context([(v, i) for i in mine]), projected_into(model, None, len(mine), greedy=True):
                        edited_logits, cache = prefill.replay(index)
                    logits[v + 1].append(edited_logits)
                    sources[v + 1].append(([(layer.keys, layer.values) for layer in cache.layers],
                                           prefill.mask if index is None else prefill.mask[index]))
                edited += mine
                rows_of.append(replayed)
            # one decoding loop for all: the unedited rows, then each variant's (each forward reads the weights once)
            rows = [i for r, _ in group for i in r]
            lower, kept = _lower_rows(sources, split.first_layer, rows_of)
            prompt_of = rows + edited * variants  # per decoding row
            owners = [None] * len(rows) + [(v, i) for v in range(variants) for i in edited]
            # an unedited row decodes to the largest budget of the prompts it serves
            room = [max(budgets[j] for j in served[i]) if o is None else budgets[i] for o, i in zip(owners, prompt_of)]
            cache, mask = _merged([source for per_variant in sources for source in per_variant], max(room), split.first_layer, kept,
                                  memory)
            given = [seeds[i][o is not None].given if seeds[i] is not None else [] for o, i in zip(owners, prompt_of)]
            tokens = greedy_loop(model, mask, mask, [b - len(g) for b, g in zip(room, given)], newline, blank, eos,
                                 start=(torch.cat([t for per_variant in logits for t in per_variant]), cache),  # ids: start holds the prefill
                                 context=lambda active, owners=owners: rows_context([owners[a] for a in active]), given=given,
                                 lower=LowerRows(split.layers, split.first_layer, lower), memory=memory)
            for r, i in enumerate(rows):
                for j in served[i]:  # cut to each one's budget: what greedy decoding to that budget says
                    before[j] = tokenizer.decode(tokens[r][: budgets[j]], skip_special_tokens=True)
            for k, (o, i) in enumerate(zip(owners[len(rows) :], prompt_of[len(rows) :]), start=len(rows)):
                after[o[0]][i] = tokenizer.decode(tokens[k], skip_special_tokens=True)
    return before, after
