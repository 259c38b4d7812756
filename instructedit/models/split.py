"""The frozen base model cut at its first edited block, so the unedited prefix runs once per input.

Editing touches only the last few blocks, so the hidden states entering the first edited block are
the same before and after an edit. ``SplitModel.prefix`` runs the model once (no grad) and keeps,
for every block from the first edited one on, the exact positional and keyword arguments the
architecture's own forward passed to it (causal mask, rotary embeddings, ...), plus the unedited
final hidden states. ``SplitModel.suffix`` then re-runs only those blocks, optionally with edited
weights applied functionally, and ``logits_at`` projects to the vocabulary only where asked.
``CheckpointedSplitModel`` is the same view with activation checkpointing of the edited blocks.
"""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache, DynamicCache

from instructedit.config import env_switch
from instructedit.models.architectures import ArchSpec
from instructedit.models.packing import positions_fed
from instructedit.records import TokenBatch
from instructedit.tasks.collate import IGNORE

logger = logging.getLogger(__name__)


FEW_ROWS = 8  # up to this many rows, the CPU vocabulary projection may run as (W · rowsᵀ)ᵀ (``weight_on_left``)
TIMED_HEAD_SIZE = 2**22  # a smaller head (a tiny test model) is projected the usual way: its products take microseconds
LEFT_MARGIN = 0.8  # (W · rowsᵀ)ᵀ, or a padded backward, is taken only when it is timed this much faster: a near tie keeps the usual product
PADDED_ROWS = (4, FEW_ROWS)  # row counts a few rows' backward product may be padded to (``backward_rows``)

FAST_KERNELS_ENV = "INSTRUCTEDIT_FAST_KERNELS"  # "0": no product chosen by timing (BLAS's own, as PyTorch calls it); "1" or unset: as timed
_LEFT_FASTER: dict[tuple, bool] = {}  # (rows, weight shape, dtype, threads) -> whether (W · rowsᵀ)ᵀ was the faster
_BACKWARD_ROWS: dict[tuple, int] = {}  # (rows, weight shape, dtype, threads) -> rows the backward's grad · W is padded to


def fast_kernels_wanted() -> bool:
    """Whether products may be chosen by timing them (``weight_on_left``, ``backward_rows``, ``evaluation.fast_linears``,
    ``evaluation.decode_attention``): ``$INSTRUCTEDIT_FAST_KERNELS`` "0" switches them all off ("1" or unset: on). The
    timings are taken once per process and can come out either way under load, so two processes can multiply the same
    numbers in another order and differ in the last bits, which a long sequence of kept edits grows
    (results/analysis/in-frame-locality/sequential/neighbours/rerun/); with "0" reruns give the same weights to the bit."""
    return env_switch(FAST_KERNELS_ENV) is not False


def _timing_key(rows: int, weight: torch.Tensor) -> tuple:
    return (rows, tuple(weight.shape), weight.dtype, torch.get_num_threads())


def weight_on_left(rows: int, weight: torch.Tensor) -> bool:
    """Whether ``rows`` rows are projected onto the CPU head ``weight`` (vocab, d) as (W · rowsᵀ)ᵀ rather than rows · Wᵀ.

    Which orientation CPU BLAS runs near memory speed for a few rows depends on the CPU: 3 rows × 49,152 × 576, one
    thread, took 20 ms as rows · Wᵀ and 6 ms as (W · rowsᵀ)ᵀ on one machine of this project's type, and 9 against 23 ms
    on another (2026-12-02). Both are timed once per process for each row count, weight shape, dtype and thread count
    (best of 3, ~0.1 s), and (W · rowsᵀ)ᵀ is taken where it is more than ``1 / LEFT_MARGIN`` times faster (never with
    ``$INSTRUCTEDIT_FAST_KERNELS=0``, ``fast_kernels_wanted``).
    """
    if rows > FEW_ROWS or weight.numel() < TIMED_HEAD_SIZE or not fast_kernels_wanted():
        return False
    key = _timing_key(rows, weight)
    if key not in _LEFT_FASTER:
        x = torch.zeros((rows, weight.shape[1]), dtype=weight.dtype, device=weight.device)
        with torch.no_grad():
            left, usual = (_best_of(lambda: weight @ x.T), _best_of(lambda: x @ weight.T))
        _LEFT_FASTER[key] = left < LEFT_MARGIN * usual
    return _LEFT_FASTER[key]


def backward_rows(rows: int, weight: torch.Tensor) -> int:
    """How many rows the backward product grad · W (grad: ``rows`` × vocab) of a few rows' CPU projection is computed
    with: ``rows``, or the grad padded with zero rows to one of ``PADDED_ROWS`` where that is more than ``1 / LEFT_MARGIN``
    times faster (the padded rows are dropped; the real rows' numbers are the same up to float rounding).

    Some CPU BLAS builds take a slow path for two or three rows: grad · W for 3 rows × 49,152 × 576 took 34 ms, for 4
    rows 16 ms (AMD EPYC Zen 4, one thread, 2026-12-04), a third of a one-record edit's time on the default model.
    Timed once per process for each row count, weight shape, dtype and thread count (best of 3, ~0.1 s per count); never
    padded with ``$INSTRUCTEDIT_FAST_KERNELS=0``."""
    if rows > FEW_ROWS or weight.numel() < TIMED_HEAD_SIZE or not fast_kernels_wanted():
        return rows
    key = _timing_key(rows, weight)
    if key not in _BACKWARD_ROWS:
        grads = {n: torch.zeros((n, weight.shape[0]), dtype=weight.dtype, device=weight.device)
                 for n in (rows, *(p for p in PADDED_ROWS if p > rows))}
        with torch.no_grad():
            times = {n: _best_of(lambda g=g: g @ weight) for n, g in grads.items()}
        fastest = min(times, key=times.get)
        _BACKWARD_ROWS[key] = fastest if times[fastest] < LEFT_MARGIN * times[rows] else rows
    return _BACKWARD_ROWS[key]


def _best_of(product, repeats: int = 3) -> float:
    product()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return min(times)


class _FewRows(torch.autograd.Function):
    """rows · Wᵀ for a frozen (vocab, d) W and a few rows: computed as (W · rowsᵀ)ᵀ where ``left`` (``weight_on_left``),
    its backward grad · W with the grad padded to ``padded`` rows (``backward_rows``). The same numbers up to float rounding."""

    @staticmethod
    def forward(ctx, rows: torch.Tensor, weight: torch.Tensor, left: bool = True, padded: int = 0) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.padded = padded
        return (weight @ rows.T).T.contiguous() if left else rows @ weight.T

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None, None]:
        (weight,) = ctx.saved_tensors
        n = grad.shape[0]
        if ctx.padded > n:
            grad = torch.cat([grad, grad.new_zeros((ctx.padded - n, grad.shape[1]))])
        return (grad @ weight)[:n], None, None, None


def cache_argument(model: nn.Module) -> str:
    """The forward argument that takes the KV cache: ``cache`` (transformers >= 5.2x) or ``past_key_values`` (before)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


BlockArgs = list[tuple[tuple[Any, ...], dict[str, Any]]]  # per edited block, its call's arguments without the hidden state


def with_cache(block_args: BlockArgs, cache: Cache | None) -> BlockArgs:
    """``block_args`` with every KV cache they hold replaced by ``cache`` (None: the blocks keep no cache).

    A prefix pass that filled a cache recorded it in the blocks' arguments: re-running the edited blocks
    on those arguments would append to it. With another cache, their keys and values go there instead.
    """
    return [(tuple(cache if isinstance(a, Cache) else a for a in rest), {k: cache if isinstance(v, Cache) else v for k, v in kwargs.items()})
            for rest, kwargs in block_args]


class _StopForward(Exception):
    """Raised from the final-norm hook (or the first edited block's, ``prefix(final=False)``): everything needed has been captured."""


_SHARED_ARGS = "_instructedit_suffix_args_shared"  # on a model: {first edited block: whether blocks from it on get the same arguments}


def _same_arguments(a: tuple[tuple, dict], b: tuple[tuple, dict]) -> bool:
    """Whether two recorded block calls passed the same objects apart from the hidden state (the first positional
    argument, or ``hidden_states``)."""
    (args_a, kw_a), (args_b, kw_b) = a, b
    rest_a, rest_b = args_a[1:], args_b[1:]
    kw_a, kw_b = ({k: v for k, v in kw.items() if k != "hidden_states"} for kw in (kw_a, kw_b))
    return (len(rest_a) == len(rest_b) and all(x is y for x, y in zip(rest_a, rest_b)) and kw_a.keys() == kw_b.keys()
            and all(kw_a[k] is kw_b[k] for k in kw_a))


@dataclass
class PrefixState:
    """What the unedited prefix produced for one batch."""

    hidden: torch.Tensor  # (batch, seq, d_model): input of the first edited block
    block_args: BlockArgs  # per suffix block, hidden state removed
    final_hidden: torch.Tensor | None  # (batch, seq, d_model): unedited output of the final norm (None: not run, ``final=False``)
    batch: TokenBatch

    def with_cache(self, cache: Cache | None) -> "PrefixState":
        """The same state whose edited blocks write their keys and values to ``cache`` (None: nowhere)."""
        return dataclasses.replace(self, block_args=with_cache(self.block_args, cache))


@dataclass
class ChunkStates:
    """The prefix states of a batch taken ``size`` rows at a time (``TokenBatch.chunks(size)``), one per chunk, in order:
    what an edit made in several rounds starts every round from (``LearnedEditor.apply``: the blocks below the edited
    ones never change, so their pass over the edit inputs is the same in every round)."""

    size: int
    states: list[PrefixState]


MIN_START = 8  # tokens of a kept start a row must begin with for it to be used (every task's instruction begins alike)
START_CAPACITY = 32  # starts kept (the least recently used dropped first): ~1.5 MB each on the default model
KEEP_SHARE = 0.6  # a row sharing this much of a kept start (or more) shortens it to what they share (below)
SEEN_CAPACITY = 1024  # first tokens of rows remembered, for a start to be kept only once another row began alike


@dataclass
class _Start:
    ids: tuple[int, ...]
    layers: list[tuple[torch.Tensor, torch.Tensor]]  # per block below the edited ones, its keys and values over the start
    hidden: torch.Tensor  # (1, len(ids), d_model): the first edited block's input there

    def cut(self, n: int) -> "_Start":
        return _Start(self.ids[:n], [(k[:, :, :n].clone(), v[:, :, :n].clone()) for k, v in self.layers], self.hidden[:, :n].clone())


class StartCache:
    """What the unedited blocks below the edited ones make of the starts that many rows begin with (a task instruction):
    their keys and values there, and the first edited block's input. ``SplitModel.prefix_after_start`` then passes those
    blocks over the rest of a row only: a meta-training step's edit input begins with one of a few instructions (the 9
    seen descriptions of each task), most of the tokens its frozen prefix passed.

    A row's start is its tokens before its first label that see only the tokens before them. It uses the kept start with
    which it shares the most tokens (at least ``MIN_START``: the keys and values of a start's first tokens depend on those
    alone). Which part of a start is the instruction is found from the rows: a row that shares at least ``KEEP_SHARE``
    of a kept start (the same instruction, another prompt) shortens it to what they share; a row that shares less (another
    description of the task), or nothing, is kept as a new start once a row before it began with the same ``MIN_START``
    tokens (``admits``: a prompt no other row begins like, a locality prompt, is not kept). At most ``capacity`` starts,
    the least recently used dropped first. ``checked``: whether a row's state was once compared with
    ``SplitModel.prefix``'s (an architecture whose blocks do not all take the same arguments is not served: ``usable`` is
    then False)."""

    def __init__(self, capacity: int = START_CAPACITY) -> None:
        self.starts: OrderedDict[tuple[int, ...], _Start] = OrderedDict()
        self.capacity = capacity
        self.checked = False
        self.usable = True
        self.reused_tokens = 0  # over the rows served: tokens the lower blocks did not pass again, and those they passed
        self.passed_tokens = 0
        self.seen: OrderedDict[tuple[int, ...], None] = OrderedDict()  # the first MIN_START tokens of rows served

    def admits(self, ids: Sequence[int]) -> bool:
        """Whether a start ``ids`` not kept is kept now: a row served before began with the same first ``MIN_START`` tokens
        (the ``SEEN_CAPACITY`` most recent are remembered). Every call remembers ``ids``' first tokens."""
        key = tuple(ids[:MIN_START])
        known = key in self.seen
        self.seen[key] = None
        self.seen.move_to_end(key)
        while len(self.seen) > SEEN_CAPACITY:
            self.seen.popitem(last=False)
        return known

    def longest(self, ids: Sequence[int]) -> tuple[_Start | None, int]:
        """The kept start sharing the most leading tokens with ``ids``, and how many (at least ``MIN_START``; else None, 0)."""
        best, length = None, 0
        for start in self.starts.values():
            n = 0
            for a, b in zip(start.ids, ids):
                if a != b:
                    break
                n += 1
            if n > length:
                best, length = start, n
        if length < MIN_START:
            return None, 0
        self.starts.move_to_end(best.ids)
        return best, length

    def keep(self, start: _Start, replaces: _Start | None = None) -> None:
        if replaces is not None:
            self.starts.pop(replaces.ids, None)
        self.starts[start.ids] = start
        self.starts.move_to_end(start.ids)
        while len(self.starts) > self.capacity:
            self.starts.popitem(last=False)


class SplitModel:
    """A causal LM viewed as frozen prefix + editable suffix (blocks ``first_layer`` .. end)."""

    def __init__(self, model: nn.Module, spec: ArchSpec, first_layer: int) -> None:
        self.model = model
        self.spec = spec
        self.layers = model.get_submodule(spec.layers)
        self.norm = model.get_submodule(spec.final_norm)
        self.head = model.get_output_embeddings()
        if not 0 <= first_layer < len(self.layers):
            raise ValueError(f"first edited layer {first_layer} is outside the model's {len(self.layers)} layers")
        self.first_layer = first_layer
        self.starts = StartCache()  # row starts the lower blocks have passed (``prefix_after_start``)

    @property
    def suffix_indices(self) -> range:
        return range(self.first_layer, len(self.layers))

    @contextmanager
    def recording_block_inputs(self) -> Iterator[dict[int, tuple[tuple, dict]]]:
        """Within the block, every forward records what each block from ``first_layer`` on was called with (args, kwargs)."""
        captured: dict[int, tuple[tuple, dict]] = {}

        def keep_inputs(index: int):
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
                captured[index] = (args, kwargs)

            return hook

        handles = [self.layers[i].register_forward_pre_hook(keep_inputs(i), with_kwargs=True) for i in self.suffix_indices]
        try:
            yield captured
        finally:
            for handle in handles:
                handle.remove()

    def block_arguments(self, captured: dict[int, tuple[tuple, dict]]) -> tuple[torch.Tensor, BlockArgs]:
        """(input of the first edited block, per edited block its arguments with the hidden state removed) from a recording."""
        if len(captured) != len(self.suffix_indices):
            raise RuntimeError(f"could not capture the block inputs at {self.spec.layers}/{self.spec.final_norm}; check the architecture table")
        block_args = []
        hidden = None
        for i in self.suffix_indices:
            args, kwargs = captured[i]
            if args:
                h, rest = args[0], (None, *args[1:])
            else:  # hidden state passed by keyword
                kwargs = dict(kwargs)
                h, rest = kwargs.pop("hidden_states"), ()
            hidden = h if hidden is None else hidden
            block_args.append((rest, kwargs))
        return hidden, block_args

    @torch.no_grad()
    def prefix(self, batch: TokenBatch, cache: Cache | None = None, final: bool = True) -> PrefixState:
        """One forward pass of the unedited model up to the final norm (no vocabulary projection).

        ``cache``: filled with every layer's keys and values of the batch (the state's blocks then write to
        it too: ``PrefixState.with_cache`` before re-running them). ``final=False`` (an edit, which reads only
        the edited blocks' inputs): the pass stops at the first edited block where the model calls every edited
        block with the same arguments (checked on the model's first full pass: a causal mask, rotary embeddings;
        not so for an architecture whose blocks alternate attention kinds), and ``final_hidden`` is None."""
        final_out: list[torch.Tensor] = []
        early = not final and cache is None and self._blocks_share_arguments()

        def stop(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            final_out.append(output)
            raise _StopForward

        def stop_at_first(module: nn.Module, args: tuple, kwargs: dict) -> None:
            raise _StopForward

        with ExitStack() as stack:
            captured = stack.enter_context(self.recording_block_inputs())
            if early:  # registered after the recording hook: the first edited block's inputs are kept, then the pass stops
                handle = self.layers[self.first_layer].register_forward_pre_hook(stop_at_first, with_kwargs=True)
            else:
                handle = self.norm.register_forward_hook(stop)
            stack.callback(handle.remove)
            try:
                kv = {} if cache is None else {cache_argument(self.model): cache}
                self.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=cache is not None, **kv)
            except _StopForward:
                pass
        if early:
            captured.update({i: captured[self.first_layer] for i in self.suffix_indices})
            hidden, block_args = self.block_arguments(captured)
            return PrefixState(hidden=hidden, block_args=block_args, final_hidden=None, batch=batch)
        if not final_out:
            raise RuntimeError(f"could not capture the final norm's output at {self.spec.final_norm}; check the architecture table")
        shared = getattr(self.model, _SHARED_ARGS, None)
        if cache is None and (shared is None or self.first_layer not in shared):
            first = captured[self.first_layer]
            shared = {**(shared or {}), self.first_layer: all(_same_arguments(first, captured[i]) for i in self.suffix_indices)}
            setattr(self.model, _SHARED_ARGS, shared)
        hidden, block_args = self.block_arguments(captured)
        return PrefixState(hidden=hidden, block_args=block_args, final_hidden=final_out[0], batch=batch)

    def _blocks_share_arguments(self) -> bool:
        """Whether this model is known to call every edited block with the same arguments (recorded by ``prefix`` on its
        first pass without a cache)."""
        return getattr(self.model, _SHARED_ARGS, {}).get(self.first_layer, False)

    def row_state(self, state: PrefixState, row: int, index: torch.Tensor, batch: TokenBatch) -> PrefixState | None:
        """What ``prefix(batch, final=False)`` gives for ``batch``, one row whose tokens are those at ``index`` of row ``row``
        of the pass ``state`` was taken on (the blocks below the edited ones saw the same tokens before each there: a row
        of a packed pass with its shared start, or a padded one): their hidden states, and the edited blocks' arguments
        for ``batch`` alone (``_row_arguments``). None where this model's edited blocks are not known to all take the
        same arguments (``prefix`` records it on a pass without a cache)."""
        if not self._blocks_share_arguments():
            return None
        return PrefixState(hidden=state.hidden[row : row + 1, index], block_args=self._row_arguments(batch, None),
                           final_hidden=None, batch=batch)

    @torch.no_grad()
    def prefix_after_start(self, row: TokenBatch, positions: torch.Tensor, starts: StartCache,
                           segments: Sequence[int] = (0,)) -> PrefixState:
        """``prefix(row, final=False)`` under ``positions_fed(positions)`` for ONE packed row (a 4-D mask: ``models.packing``),
        with the blocks below the edited ones passing only the tokens after the longest start that ``starts`` keeps of each
        of its segments (attending to those starts' kept keys and values): the same state up to float rounding.
        ``segments``: where the row's segments begin (the records of ``objective.batched_meta_loss``, one after another;
        no token sees another segment's), each with its own start. ``starts`` learns the segments' starts (``StartCache``).
        The first row served is also run the usual way and compared (its state and the edited blocks' output); an
        architecture where they differ is served the usual way from then on."""
        usual = not starts.usable or row.input_ids.shape[0] != 1 or row.attention_mask.dim() != 4
        n = row.input_ids.shape[1]
        bounds = list(zip(segments, [*segments[1:], n]))
        lengths = [] if usual else [self._start_length(row, positions, lo, hi) for lo, hi in bounds]
        if usual or max(lengths) < MIN_START or not starts.checked:
            with positions_fed(self.model, positions):
                state = self.prefix(row, final=False)
            if usual or max(lengths) < MIN_START:
                return state
        ids = row.input_ids[0].tolist()
        found = [starts.longest(ids[lo : lo + length]) if length >= MIN_START else (None, 0) for (lo, _), length in zip(bounds, lengths)]
        device = row.input_ids.device
        past = torch.cat([torch.arange(lo, lo + reused, device=device) for (lo, _), (_, reused) in zip(bounds, found)])
        rest = torch.cat([torch.arange(lo + reused, hi, device=device) for (lo, hi), (_, reused) in zip(bounds, found)])
        kept_layers = [[(k[:, :, :reused], v[:, :, :reused]) for k, v in start.layers] for start, reused in found if start is not None]
        cache = DynamicCache(ddp_cache_data=[(torch.cat([s[l][0] for s in kept_layers], 2), torch.cat([s[l][1] for s in kept_layers], 2))
                                             for l in range(self.first_layer)]) if kept_layers else DynamicCache()
        args, kwargs = self._inputs_of(self.first_layer, input_ids=row.input_ids[:, rest], position_ids=positions[:, rest],
                                       attention_mask=row.attention_mask[:, :, rest][..., torch.cat([past, rest])], use_cache=True,
                                       **{cache_argument(self.model): cache})
        after = args[0] if args else kwargs["hidden_states"]  # the rest's input of the first edited block
        hidden = after.new_empty((1, n, after.shape[-1]))
        hidden[:, rest] = after
        if len(past):
            hidden[:, past] = torch.cat([start.hidden[:, :reused] for start, reused in found if start is not None], 1)
        where = torch.empty(n, dtype=torch.long, device=device)  # each position's place in the cache: the starts', then the rest
        where[torch.cat([past, rest])] = torch.arange(n, device=device)
        for (lo, _), length in zip(bounds, lengths):
            if length < MIN_START:
                continue
            start, reused = starts.longest(ids[lo : lo + length])  # with what the segments before it kept
            if start is not None and reused < len(start.ids) and reused >= KEEP_SHARE * len(start.ids):
                starts.keep(start.cut(reused), replaces=start)  # the same instruction, another prompt: keep what they share
            elif (start is None or reused < KEEP_SHARE * len(start.ids)) and starts.admits(ids[lo : lo + length]):  # another one
                at = where[lo : lo + length]
                layers = [(layer.keys[:, :, at].clone(), layer.values[:, :, at].clone()) for layer in cache.layers[: self.first_layer]]
                starts.keep(_Start(tuple(ids[lo : lo + length]), layers, hidden[:, lo : lo + length].clone()))
        served = PrefixState(hidden=hidden, block_args=self._row_arguments(row, positions), final_hidden=None, batch=row)
        starts.reused_tokens += len(past)
        starts.passed_tokens += len(rest)
        if not starts.checked:
            starts.checked = True
            expected = self.suffix(state)
            tol = 1e-4 if state.hidden.dtype == torch.float32 else 5e-2  # float32 rounding ~1e-6; half precision's ~1e-3
            same = (torch.allclose(served.hidden, state.hidden, atol=tol * max(1.0, float(state.hidden.abs().max())), rtol=0)
                    and torch.allclose(self.suffix(served), expected, atol=tol * max(1.0, float(expected.abs().max())), rtol=0))
            if not same:
                starts.usable = False
                logger.warning("a row's state from the lower blocks after a kept start differs from its full pass on this "
                               "architecture; every row passes them whole")
                return state
        return served

    @staticmethod
    def _start_length(row: TokenBatch, positions: torch.Tensor, lo: int, hi: int) -> int:
        """How many first tokens of the segment ``lo:hi`` of a packed row form a start another row may share: before its
        first label, each seeing exactly the segment's tokens before it, at positions 0, 1, ..."""
        labelled = (row.labels[0, lo:hi] != IGNORE).nonzero()
        limit = int(labelled[0]) if len(labelled) else hi - lo
        visible = row.attention_mask[0, 0, lo : lo + limit, :] == 0
        causal = torch.zeros_like(visible)
        causal[:, lo : lo + limit] = torch.ones((limit, limit), dtype=torch.bool, device=visible.device).tril()
        plain = (visible == causal).all(1) & (positions[0, lo : lo + limit] == torch.arange(limit, device=positions.device))
        return int(plain.long().cumprod(0).sum())

    def _row_arguments(self, row: TokenBatch, positions: torch.Tensor) -> BlockArgs:
        """What the edited blocks are called with on ``row`` (its whole mask, rotary embeddings of its positions): what
        the model passes its first block, stopped there (no block runs; every block takes the same arguments: checked
        once by ``prefix_after_start``)."""
        first = self._inputs_of(0, input_ids=row.input_ids, attention_mask=row.attention_mask, position_ids=positions, use_cache=False)
        return self.block_arguments({i: first for i in self.suffix_indices})[1]

    def _inputs_of(self, index: int, **inputs: Any) -> tuple[tuple, dict]:
        """The arguments (args, kwargs) the model calls block ``index`` with on ``inputs`` (its forward's keyword
        arguments); the pass stops there."""
        captured: list[tuple[tuple, dict]] = []

        def stop(module: nn.Module, args: tuple, kwargs: dict) -> None:
            captured.append((args, kwargs))
            raise _StopForward

        handle = self.layers[index].register_forward_pre_hook(stop, with_kwargs=True)
        try:
            self.model(**inputs)
        except _StopForward:
            pass
        finally:
            handle.remove()
        return captured[0]

    def suffix(self, state: PrefixState, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Final hidden states (batch, seq, d_model) with ``params`` (full names) replacing weights."""
        return self.blocks(state.hidden, state.block_args, params)

    def blocks(self, hidden: torch.Tensor, block_args: BlockArgs,
               params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The edited blocks (then the final norm) on ``hidden`` with the recorded ``block_args``, ``params`` replacing weights."""
        params = params or {}
        h = hidden
        for i, (rest, kwargs) in zip(self.suffix_indices, block_args):
            block = self.layers[i]
            prefix = f"{self.spec.layers}.{i}."
            local = {name[len(prefix) :]: t for name, t in params.items() if name.startswith(prefix)}
            args = (h, *rest[1:]) if rest else ()
            kw = kwargs if rest else {**kwargs, "hidden_states": h}
            out = functional_call(block, local, args, kw) if local else block(*args, **kw)
            h = out[0] if isinstance(out, tuple) else out
        return self.norm(h)

    def logits_at(self, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits (n_positions, vocab) only at the positions where ``mask`` is True."""
        return self.project(hidden[mask])

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """``head(rows)`` for (n, d_model) rows; a few rows on a CPU as (W · rowsᵀ)ᵀ where that is faster (``weight_on_left``),
        their backward with the grad padded to more rows where that is faster (``backward_rows``)."""
        head = self.head
        if (rows.device.type == "cpu" and rows.dim() == 2 and rows.shape[0] <= FEW_ROWS and isinstance(head, nn.Linear)
                and head.bias is None and not head.weight.requires_grad and head.weight.dtype == rows.dtype):
            n = rows.shape[0]
            left = weight_on_left(n, head.weight)
            padded = backward_rows(n, head.weight) if rows.requires_grad else n
            if left or padded != n:
                return _FewRows.apply(rows, head.weight, left, padded)
        return head(rows)

    def logits_at_many(self, selections: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """``logits_at`` of several (hidden, mask) pairs from ONE vocabulary projection (and one in backward).

        At the few scored positions of a meta-training step the projection's cost is reading the output
        embedding (vocab × d_model); one read serves every input of the step instead of one read each.
        """
        rows = [hidden[mask] for hidden, mask in selections]
        return list(self.project(torch.cat(rows)).split([r.shape[0] for r in rows]))


class CheckpointedSplitModel(SplitModel):
    """Activation checkpointing of the edited blocks: post-edit passes keep only the blocks' input.

    The whole suffix is one checkpoint segment, recomputed in backward with the same edited weights
    (they are inputs of the segment, so their gradients flow). The edit pass itself (no ``params``)
    is not checkpointed: its activations are freed as soon as the gradient factors are taken, and
    the factor hooks must not fire again during a recomputation.
    """

    def suffix(self, state: PrefixState, params: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        if not params or not torch.is_grad_enabled():
            return super().suffix(state, params)
        names = list(params)

        def run(hidden: torch.Tensor, *values: torch.Tensor) -> torch.Tensor:
            return SplitModel.suffix(self, dataclasses.replace(state, hidden=hidden), dict(zip(names, values)))

        return checkpoint(run, state.hidden, *params.values(), use_reentrant=False)
