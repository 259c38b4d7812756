"""A case as forward passes: its probe rows padded into batches, or packed into one row that holds their shared instruction once.

Also how a functional editor (``FunctionalEditor``, e.g. MEND) is scored on such a layout: one pass
of the unedited prefix serves the pre-edit logits and the edit, and only the edited blocks re-run
with the new weights, functionally. ``check_packing`` compares packed with padded rows on one case,
since an architecture may ignore 4-D attention masks.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from instructedit.editors.base import EditResult, FunctionalEditor, ThinParams
from instructedit.editors.rounds import rounds_result
from instructedit.evaluation import generation_probes as gen
from instructedit.evaluation.before_after import Seed
from instructedit.evaluation.metrics import answer_accuracy, unchanged_tokens
from instructedit.evaluation.probes import Probe, case_probes, edit_rows_first
from instructedit.evaluation.row_edits import per_row_updates
from instructedit.losses import argmax_ids
from instructedit.models.packing import pack, positions_fed, shareable_rows
from instructedit.models.split import PrefixState, SplitModel
from instructedit.records import EditRecord, TokenBatch
from instructedit.tasks.collate import IGNORE, Collator, PromptTooLongError

logger = logging.getLogger(__name__)


def scored_logits(model: nn.Module, batch: TokenBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (n_positions, vocab) at the labelled positions only: decoder hidden states, then the head on those rows."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, use_cache=False)
    return model.get_output_embeddings()(out.last_hidden_state[batch.label_mask])


@torch.no_grad()
def probe_scores(model: nn.Module, collator: Collator, pairs: Sequence[tuple[str, str]], pre_argmax: Sequence[torch.Tensor] | None,
                 batch_size: int) -> tuple[list[float], list[float], list[torch.Tensor]]:
    """Per (prompt, answer) pair, in batches: its answer-token accuracy, the share of its answer tokens whose argmax is
    ``pre_argmax``'s (1.0 without one) and its argmax ids (on the CPU): a model scored after edits, one probe per row."""
    device = next(model.parameters()).device
    accuracy: list[float] = []
    unchanged: list[float] = []
    argmax: list[torch.Tensor] = []
    for start in range(0, len(pairs), batch_size):
        batch = collator.qa_batch(list(pairs[start : start + batch_size])).to(device)
        logits = scored_logits(model, batch)
        rows, n = batch.label_mask.nonzero()[:, 0], batch.n_rows
        ids = argmax_ids(logits)
        pre = torch.cat([pre_argmax[start + j].to(device) for j in range(n)]) if pre_argmax is not None else ids
        accuracy += answer_accuracy(logits, batch.labels[batch.label_mask], rows, n).tolist()
        unchanged += unchanged_tokens(pre, ids, rows, n).tolist()
        argmax += [ids[rows == j].cpu() for j in range(n)]
    return accuracy, unchanged, argmax


@dataclass
class Layout:
    """A case's probe rows as forward passes: right-padded batches, or packed rows with their position ids."""

    chunks: list[TokenBatch]
    positions: list[torch.Tensor | None]
    edit_view: TokenBatch  # the first chunk labelled on the edit rows only: MEND edits on the shared prefix pass
    owners: list[torch.Tensor] | None = None  # packed: per chunk, the row each position belongs to (-1: the shared start)

    def row_tokens(self, chunk: int, row: int) -> tuple[int, torch.Tensor]:
        """Where row ``row`` of chunk ``chunk`` of the padded layout lies in this one: (batch row, its token positions in order)."""
        if self.owners is None:
            return row, torch.arange(int(self.chunks[chunk].attention_mask[row].sum()), device=self.chunks[chunk].input_ids.device)
        owner, own = self.owners[chunk], (self.owners[chunk] == row).nonzero()[:, 0]
        if int(self.positions[chunk][0, own[0]]) > 0:  # the row begins with the shared start
            own = torch.cat([(owner == -1).nonzero()[:, 0], own])
        return 0, own


@dataclass
class Case:
    index: int
    record: EditRecord
    probes: list[Probe]  # the edit rows first (without a stop token, the reliability probe is one of them), then the others
    edit: TokenBatch  # the edit input on its own, for ``editor.apply``
    n_edit_rows: int  # the edit rows the layouts begin with (0: none that is no probe, ``prepare_cases(edit_rows=0)``)
    padded: Layout  # at most batch_size rows per chunk; the first chunk holds every edit row
    targets: torch.Tensor  # (n_positions,) gold tokens, probe by probe (the same in both layouts)
    rows: torch.Tensor  # (n_positions,) probe index of each position
    packed: Layout | None = None
    pre: dict[str, float] | None = None
    pre_argmax: torch.Tensor | None = None  # kept for sequential editing's locality
    queries: list[gen.Query] = field(default_factory=list)  # the generation protocol's questions
    pre_answers: list[str] = field(default_factory=list)

    def layout(self, packed: bool, dtype: torch.dtype) -> Layout:
        if not packed:
            return self.padded
        if self.packed is None:
            n_edit = self.n_edit_rows
            chunks, positions, owners = [], [], []
            for c, chunk in enumerate(self.padded.chunks):
                shareable = shareable_rows(chunk.input_ids.shape[0], n_edit if c == 0 else 0)  # the edit rows are in chunk 0
                packed_chunk, pos, owner = pack(chunk, shareable, dtype)
                chunks.append(packed_chunk), positions.append(pos), owners.append(owner)
            first, not_edit = chunks[0], (owners[0] >= n_edit)[None]
            self.packed = Layout(chunks, positions, TokenBatch(first.input_ids, first.attention_mask, first.labels.masked_fill(not_edit, IGNORE),
                                                               owner=first.owner), owners)
        return self.packed


def prepare_cases(collator: Collator, records: Sequence[EditRecord], instruction: int | None, batch_size: int,
             device: torch.device, edit_rows: int | None = None) -> tuple[list[Case], list[dict[str, str]]]:
    """Each record as a ``Case``: its probes in chunks of at most ``batch_size`` rows, the edit rows first.

    ``edit_rows``: the layouts hold a case's edit rows that are no probe only where it has at most this many (None: always;
    0: never). An edit made in several rounds (``score_functional(rounds > 1)``, as ``apply`` makes one) is made from
    ``Case.edit``; where that is one row it reads the probe pass's state of its row, first in the layout
    (``_edit_state``), instead of a pass of its own; more rows would pass the model for nothing (ZsRE with an answer stop:
    15 % of a case's packed tokens)."""
    cases, skipped = [], []
    for index, record in enumerate(records):
        pairs = collator.edit_pairs(record, instruction)
        # An edit row that ends in a stop token is no teacher-forced probe (those score the answer alone): its own row.
        probes = edit_rows_first(case_probes(collator, record, instruction), pairs, match=not collator.stop_ids)
        n_edit = len(pairs)
        if edit_rows is not None and n_edit > edit_rows:  # the probes stay, an edit row among them (no stop token) scored as any probe
            probes, n_edit = [p for p in probes if p.family != "edit"], 0
        bounds = [0, *range(max(batch_size, n_edit), len(probes), batch_size), len(probes)]
        try:
            chunks = [collator.qa_batch([(p.prompt, p.answer) for p in probes[lo:hi]], record.source,
                                        stop=[i < n_edit for i in range(lo, hi)]).to(device)
                      for lo, hi in zip(bounds, bounds[1:])]
            edit = collator.qa_batch(pairs, record.source, stop=True).to(device)
        except PromptTooLongError as err:
            skipped.append({"source": record.source, "reason": str(err)})
            continue
        first = chunks[0]
        not_edit = torch.arange(first.input_ids.shape[0], device=device)[:, None] >= n_edit  # (rows, 1)
        padded = Layout(chunks, [None] * len(chunks), TokenBatch(first.input_ids, first.attention_mask, first.labels.masked_fill(not_edit, IGNORE)))
        targets = torch.cat([c.labels[c.label_mask] for c in chunks])
        rows = torch.cat([c.label_mask.nonzero()[:, 0] + lo for c, lo in zip(chunks, bounds)])
        cases.append(Case(index, record, probes, edit, n_edit, padded, targets, rows))
    if skipped:
        logger.warning("skipped %d of %d records that exceed max_length=%d tokens (e.g. %s)", len(skipped), len(records),
                       collator.max_length, skipped[0]["source"])
    return cases, skipped


@torch.no_grad()
def layout_logits(model: nn.Module, layout: Layout) -> torch.Tensor:
    return torch.cat([scored_logits(model, chunk, pos) for chunk, pos in zip(layout.chunks, layout.positions)])


KV = list[tuple[DynamicCache, DynamicCache]]  # per chunk: every layer's keys and values before the edit, the edited blocks' after it


@torch.no_grad()
def score_functional(editor: FunctionalEditor, model: nn.Module, layout: Layout, keep_cache: bool = False,
                     rounds: int = 1, edit: TokenBatch | None = None) -> tuple[torch.Tensor, torch.Tensor, EditResult, KV | None]:
    """One prefix pass serves the pre-edit logits and the edit; only the edited blocks re-run post-edit.

    The edit is taken on the first chunk with labels on the edit rows only: the other rows get an
    exactly zero output gradient, so their tokens drop out of the gradient factors. ``keep_cache``:
    also returns the passes' keys and values (``KV``), from which ``case_seeds`` begins the
    generation protocol's answers. ``rounds`` > 1 (a learned editor): the edit is made from ``edit`` (the case's edit
    batch) in that many rounds, as ``apply`` makes them (``editors.rounds.rounds_result``: each round with the rounds
    before it added by hooks, or written into the model and rolled back bit for bit before the scoring), starting from
    the edit row's state in the first chunk's pass where the layout begins with it (``_edit_state``), instead of once
    from the layout's edit rows.
    """
    split = editor.split(model)
    if rounds > 1 and edit is None:
        raise ValueError("score_functional: rounds > 1 need the case's edit batch (edit=)")
    recorded, kv = [], []
    for chunk, pos in zip(layout.chunks, layout.positions):
        cache = DynamicCache() if keep_cache else None
        with positions_fed(model, pos):
            recorded.append(split.prefix(chunk, cache))
        kv.append(cache)
    states = [state.with_cache(None) for state in recorded] if keep_cache else recorded  # re-runs must not append to the cache
    was_training = editor.training
    editor.eval()
    try:
        result = editor.edit(split, layout.edit_view, states[0]) if rounds == 1 else \
            rounds_result(editor, model, edit, rounds, _edit_state(split, layout, recorded[0], edit))
    finally:
        editor.train(was_training)
    pre = [split.logits_at(state.final_hidden, chunk.label_mask) for state, chunk in zip(states, layout.chunks)]
    edited = [DynamicCache() if keep_cache else None for _ in states]  # lazily grown: only the edited blocks' layers fill
    # An edit made once, as thin factors, of float32 weights: the post-edit passes add x · left · right by hooks
    # (``row_edits``, as generation adds it) and W + ΔW is never formed. Else (rounds: the weights they wrote; a half-
    # precision model: W + ΔW rounded to its dtype, as the edit is used) the edited weights run functionally.
    hooked = isinstance(result.new_params, ThinParams) and result.low_rank is not None and all(
        model.get_parameter(name).dtype == torch.float32 for name in result.low_rank)
    params = None if hooked else result.new_params
    with per_row_updates(model, [result.low_rank] * max(c.input_ids.shape[0] for c in layout.chunks),
                         result.new_params.transposed) if hooked else contextlib.nullcontext():
        post = [split.logits_at(split.suffix(state.with_cache(cache) if keep_cache else state, params), chunk.label_mask)
                for state, chunk, cache in zip(recorded, layout.chunks, edited)]
    return torch.cat(pre), torch.cat(post), result, list(zip(kv, edited)) if keep_cache else None


def _edit_state(split: SplitModel, layout: Layout, first: PrefixState, edit: TokenBatch) -> PrefixState | None:
    """The state an edit made in rounds starts from (``LearnedEditor.round_state``: the blocks below the edited ones over
    ``edit``), read from the pass over the layout's first chunk ``first`` where its first row is the edit input (one row,
    no padding; ``prepare_cases``): no pass of its own (the same state up to float rounding). None: not so."""
    if edit.input_ids.shape[0] != 1 or not bool(edit.attention_mask.all()):
        return None
    row, index = layout.row_tokens(0, 0)
    if len(index) != edit.input_ids.shape[1] or not torch.equal(layout.chunks[0].input_ids[row, index], edit.input_ids[0]):
        return None
    return split.row_state(first, row, index, edit)


def case_seeds(case: Case, layout: Layout, kv: KV, pre: torch.Tensor, post: torch.Tensor, first_edited: int,
               stops: set[int]) -> list[tuple[Seed, Seed] | None]:
    """Per generation query of ``case``, the (pre-edit, post-edit) ``Seed`` its teacher-forced probe gives, or None.

    A query asked exactly as a probe (same family, prompt and expected answer: the wrapped edit prompt,
    rephrases, portability, locality) was already run, answer included, before and after the edit
    (``score_functional(keep_cache=True)``, logits ``pre`` / ``post``): its prompt needs no prefill, and
    greedy decoding would say the expected answer's first tokens as long as each is the argmax where
    it is predicted. The seed holds the keys and values of the prompt and those tokens (layers below
    ``first_edited`` are the same before and after the edit), the logits that follow, and the tokens.
    ``stops``: token ids that end an answer (newline, EOS): the seed ends before one.
    """
    sizes = [chunk.input_ids.shape[0] for chunk in case.padded.chunks]
    where = [(c, r) for c, size in enumerate(sizes) for r in range(size)]  # probe -> (chunk, row of the padded chunk)
    pre_ids, post_ids = argmax_ids(pre), argmax_ids(post)
    used: set[int] = set()
    out: list[tuple[Seed, Seed] | None] = []
    for query in case.queries:
        i = next((k for k, p in enumerate(case.probes) if k not in used and p.family == query.family and p.kind == query.kind
                  and p.prompt == query.prompt and p.answer == query.target), None)
        if i is None:
            out.append(None)
            continue
        used.add(i)
        at = case.rows == i
        targets = case.targets[at].tolist()
        chunk, (row, index) = where[i][0], layout.row_tokens(*where[i])
        prompt_length = len(index) - len(targets) + 1  # the row holds the prompt and the answer but its last token
        before, after = kv[chunk]
        pair: list[Seed] = []
        for logits, ids, edited in ((pre[at], pre_ids[at], False), (post[at], post_ids[at], True)):
            j, limit = 0, min(len(targets), query.budget) - 1  # the seed's logits give one more token
            ids = ids.tolist()  # one device-to-host copy (int(ids[j]) per token syncs a GPU once per token)
            while j < limit and ids[j] == targets[j] and targets[j] not in stops:
                j += 1
            keep = index[: prompt_length + j]
            layers = [after.layers[l] if edited and l >= first_edited else layer for l, layer in enumerate(before.layers)]
            own = [(layer.keys[row].index_select(1, keep), layer.values[row].index_select(1, keep))  # a third of [:, keep]'s time
                   if l >= first_edited or not pair or j != len(pair[0].given)
                   else pair[0].layers[l] for l, layer in enumerate(layers)]  # below the edit, the same tokens: the pre-edit seed's own
            pair.append(Seed(own, logits[j], targets[:j]))
        out.append((pair[0], pair[1]))
    return out


def check_packing(editor: FunctionalEditor, model: nn.Module, case: Case, dtype: torch.dtype,
                  keep_cache: bool = False, rounds: int = 1) -> tuple[bool, tuple[torch.Tensor, torch.Tensor, EditResult, KV | None]]:
    """Score one case packed and compare its pre-edit logits with padded rows: an architecture may ignore 4-D masks.

    Returns whether packing is used, and this case's ``score_functional`` in the layout chosen.
    """
    try:
        packed = score_functional(editor, model, case.layout(True, dtype), keep_cache, rounds, case.edit)
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. an attention kernel without 4-D mask support
        logger.warning("packed rows failed on %s (%s); using padded batches", case.record.source, err)
        return False, score_functional(editor, model, case.padded, keep_cache, rounds, case.edit)
    split = editor.split(model)
    with torch.no_grad():
        padded = torch.cat([split.logits_at(split.prefix(c).final_hidden, c.label_mask) for c in case.padded.chunks])
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, float(padded.abs().max()))  # float32 rounding: ~1e-6
    worst = float((packed[0] - padded).abs().max())
    if worst > tol:
        logger.warning("packed rows differ from padded ones by %.3g (> %.3g) on %s; using padded batches", worst, tol, case.record.source)
        return False, score_functional(editor, model, case.padded, keep_cache, rounds, case.edit)
    return True, packed
