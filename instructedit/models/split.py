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
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.func import functional_call
from torch.utils.checkpoint import checkpoint
from transformers.cache_utils import Cache

from instructedit.models.architectures import ArchSpec
from instructedit.records import TokenBatch


FEW_ROWS = 8  # up to this many rows, the CPU vocabulary projection may run as (W · rowsᵀ)ᵀ (``weight_on_left``)
TIMED_HEAD_SIZE = 2**22  # a smaller head (a tiny test model) is projected the usual way: its products take microseconds
LEFT_MARGIN = 0.8  # (W · rowsᵀ)ᵀ, or a padded backward, is taken only when it is timed this much faster: a near tie keeps the usual product
PADDED_ROWS = (4, FEW_ROWS)  # row counts a few rows' backward product may be padded to (``backward_rows``)

_LEFT_FASTER: dict[tuple, bool] = {}  # (rows, weight shape, dtype, threads) -> whether (W · rowsᵀ)ᵀ was the faster
_BACKWARD_ROWS: dict[tuple, int] = {}  # (rows, weight shape, dtype, threads) -> rows the backward's grad · W is padded to


def _timing_key(rows: int, weight: torch.Tensor) -> tuple:
    return (rows, tuple(weight.shape), weight.dtype, torch.get_num_threads())


def weight_on_left(rows: int, weight: torch.Tensor) -> bool:
    """Whether ``rows`` rows are projected onto the CPU head ``weight`` (vocab, d) as (W · rowsᵀ)ᵀ rather than rows · Wᵀ.

    Which orientation CPU BLAS runs near memory speed for a few rows depends on the CPU: 3 rows × 49,152 × 576, one
    thread, took 20 ms as rows · Wᵀ and 6 ms as (W · rowsᵀ)ᵀ on one machine of this project's type, and 9 against 23 ms
    on another (2026-12-02). Both are timed once per process for each row count, weight shape, dtype and thread count
    (best of 3, ~0.1 s), and (W · rowsᵀ)ᵀ is taken where it is more than ``1 / LEFT_MARGIN`` times faster.
    """
    if rows > FEW_ROWS or weight.numel() < TIMED_HEAD_SIZE:
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
    Timed once per process for each row count, weight shape, dtype and thread count (best of 3, ~0.1 s per count)."""
    if rows > FEW_ROWS or weight.numel() < TIMED_HEAD_SIZE:
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
        early = not final and cache is None and getattr(self.model, _SHARED_ARGS, {}).get(self.first_layer, False)

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
