"""The InstructEdit / MEND meta-objective for one batch: edit, score, L = c_edit·L_e + c_loc·L_loc (+ c_margin·L_margin).

DESIGN.md §4. The frozen prefix of the base model runs once per input (``SplitModel.prefix``); the
pre-edit locality logits, the edit gradient, the post-edit edit loss and the post-edit locality all
reuse it, and only the edited blocks are re-run and back-propagated through.

``c_margin`` (0 by default, i.e. DESIGN.md §4 exactly) adds ``losses.locality_margin`` on the
locality positions: a hinge that keeps each pre-edit top-1 answer ahead, which is what the
locality metric counts. ``c_context`` (0 by default) adds the same KL on the locality input's
prompt positions (``l_loc_context``): the answer tokens are where the metric looks, but an edit
that leaks its target into unrelated text (after a question, say) changes the prompt positions'
predictions first.

``loc_scale`` (1 by default, i.e. DESIGN.md §4 exactly) scores the locality terms (KL, margin, context) with the
update multiplied by it: an editor used at a multiple of its learned step sizes (the generation-calibrated
``edit_scale``) is then trained to keep unrelated inputs at that strength, not only at the strength the edit loss sees.

``many_edits_loss`` is the same objective for N edits made by one aggregated edit
(``training.n_edits``, DESIGN.md §9), with every scored input run in chunks recomputed in backward.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial

import torch
from torch.utils.checkpoint import checkpoint

from instructedit.editors.base import EditResult
from instructedit.editors.hooks import capture_factors
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation.row_edits import per_row_updates
from instructedit.losses import answer_margin, locality_kl, locality_margin, masked_nll, token_accuracy, unchanged_share, unlikelihood
from instructedit.models.architectures import transposed_of
from instructedit.models.packing import pack, positions_fed, shareable_rows
from instructedit.models.split import CheckpointedSplitModel, PrefixState, SplitModel
from instructedit.records import MetaBatch, TokenBatch
from instructedit.tasks.collate import IGNORE


def _scored(split: SplitModel, state: PrefixState, batch: TokenBatch, params: dict | None) -> torch.Tensor:
    return split.logits_at(split.suffix(state, params), batch.label_mask)


Selections = dict[str, tuple[torch.Tensor, torch.Tensor]]  # name -> (final hidden states, positions to score)


def _locality_params(editor: MENDEditor, split: SplitModel, edit: EditResult, loc_scale: float) -> dict[str, torch.Tensor]:
    """The weights the locality terms are scored with: the edit's, or the base weights plus ``loc_scale`` × the update."""
    if loc_scale == 1.0:
        return edit.new_params
    return editor.edited_params(split, {k: loc_scale * u for k, u in edit.updates.items()})


def _padded_inputs(editor: MENDEditor, split: SplitModel, batch: MetaBatch, context: bool,
                   loc_scale: float = 1.0) -> tuple[EditResult, Selections]:
    """The edit, and the hidden states the loss scores: one prefix pass per input (padded rows)."""
    inner = split.prefix(batch.edit_inner)
    same_outer = torch.equal(batch.edit_outer.input_ids, batch.edit_inner.input_ids)
    outer = inner if same_outer else split.prefix(batch.edit_outer)
    loc = split.prefix(batch.loc)
    unlikely_state = split.prefix(batch.unlikely) if batch.unlikely is not None else None  # ConvSent's opposite responses
    loc_mask, outer_mask = batch.loc.label_mask, batch.edit_outer.label_mask
    edit = editor.edit(split, batch.edit_inner, inner)
    post_loc_hidden = split.suffix(loc, _locality_params(editor, split, edit, loc_scale))
    selections = {"pre_loc": (loc.final_hidden, loc_mask), "pre_outer": (outer.final_hidden, outer_mask),
                  "post_outer": (split.suffix(outer, edit.new_params), outer_mask), "post_loc": (post_loc_hidden, loc_mask)}
    if context:  # the locality prompt's positions
        prompt = batch.loc.attention_mask.bool() & ~loc_mask
        selections |= {"pre_context": (loc.final_hidden, prompt), "post_context": (post_loc_hidden, prompt)}
    if unlikely_state is not None:
        selections["post_unlikely"] = (split.suffix(unlikely_state, edit.new_params), batch.unlikely.label_mask)
    return edit, selections


def _stacked(batches: Sequence[TokenBatch]) -> TokenBatch:
    """The rows of right-padded ``batches`` as one right-padded batch."""
    width = max(b.input_ids.shape[1] for b in batches)

    def padded(t: torch.Tensor, value: int) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=value)

    return TokenBatch(*(torch.cat([padded(getattr(b, name), value) for b in batches])
                        for name, value in (("input_ids", 0), ("attention_mask", 0), ("labels", IGNORE))))


def _record_row(split: SplitModel, batch: MetaBatch) -> tuple[TokenBatch, torch.Tensor, Callable[[str], torch.Tensor], bool]:
    """Every input of one record's step as ONE packed row (``models.packing``): (row, its position ids, ``of(name)``:
    the (1, L) positions of an input — "inner", "outer", "loc", "unlikely" — and whether the outer input is the inner one)."""
    same_outer = torch.equal(batch.edit_outer.input_ids, batch.edit_inner.input_ids)
    parts = {"inner": batch.edit_inner, **({} if same_outer else {"outer": batch.edit_outer}), "loc": batch.loc,
             **({"unlikely": batch.unlikely} if batch.unlikely is not None else {})}
    bounds, start = {}, 0
    for name, part in parts.items():
        bounds[name] = (start, start + part.n_rows)
        start += part.n_rows
    shareable = shareable_rows(start, batch.edit_inner.n_rows)
    row, positions, owner = pack(_stacked(list(parts.values())), shareable, next(split.model.parameters()).dtype)

    def of(name: str) -> torch.Tensor:
        lo, hi = bounds[name]
        return ((owner >= lo) & (owner < hi))[None]

    return row, positions, of, same_outer


def _selections(state_final: torch.Tensor, post: torch.Tensor, post_loc: torch.Tensor, labelled: torch.Tensor,
                of: Callable[[str], torch.Tensor], same_outer: bool, context: bool, unlikely: bool) -> Selections:
    """The positions a record's loss reads in its packed row: pre- and post-edit outer and locality (and locality prompt,
    and ConvSent's opposite responses)."""
    outer_mask, loc_mask = of("inner" if same_outer else "outer") & labelled, of("loc") & labelled
    selections = {"pre_loc": (state_final, loc_mask), "pre_outer": (state_final, outer_mask),
                  "post_outer": (post, outer_mask), "post_loc": (post_loc, loc_mask)}
    if context:
        prompt = of("loc") & ~labelled
        selections |= {"pre_context": (state_final, prompt), "post_context": (post_loc, prompt)}
    if unlikely:
        selections["post_unlikely"] = (post, of("unlikely") & labelled)
    return selections


def _packed_inputs(editor: MENDEditor, split: SplitModel, batch: MetaBatch, context: bool,
                   loc_scale: float = 1.0) -> tuple[EditResult, Selections]:
    """``_padded_inputs`` from ONE packed row: every input passes the frozen prefix in one forward (the instruction
    they share once), the edit is taken on the edit rows' labels only (the other rows get an exactly zero gradient,
    so their tokens drop out of the gradient factors), and one post-edit suffix pass serves every scored input (a
    second one, with the scaled update, the locality terms when ``loc_scale`` != 1)."""
    rows, positions, of, same_outer = _record_row(split, batch)
    float32 = all(split.model.get_parameter(w.name).dtype == torch.float32 for w in editor.weights)
    thin = editor.config.aggregation == "sum" and float32 and not isinstance(split, CheckpointedSplitModel)
    if thin:  # the edit's pass gives the unedited output (below); the lower blocks pass the row after a start they have seen
        state = split.prefix_after_start(rows, positions, split.starts)
    else:
        with positions_fed(split.model, positions):
            state = split.prefix(rows)
    edit_rows = TokenBatch(rows.input_ids, rows.attention_mask, rows.labels.masked_fill(~of("inner"), IGNORE), rows.owner)
    if thin:
        # the summed update as its factors: the post-edit suffix adds x · ũᵀ · α·δ̃ to the packed row (``row_edits``'s
        # hooks, as generation adds a case's edit), and no dense ΔW,
        # W + ΔW or dense gradient of either is formed (~30 ms of a 0.34 s step on the default model, one thread).
        # float32 weights only: a bfloat16 / float16 edit is used as W + ΔW rounded to the weight's dtype, which can
        # drop a small update, and training sees the update as it will be used. The edit's own pass through the
        # edited blocks (unedited weights) is the unedited model's output, the pre-edit logits' input: the prefix
        # stops below the edited blocks instead of running them once more without gradients.
        factors, loss, unedited = editor.edit_factors_and_output(split, edit_rows, state)
        if state.final_hidden is None:
            state.final_hidden = unedited
        updates, low_rank = editor.transform(factors, with_factors=True, dense=False)
        edit = EditResult(new_params={}, updates=updates, pre_edit_loss=loss, low_rank=low_rank)
        transposed = transposed_of(editor.weights)
        with per_row_updates(split.model, [low_rank], transposed):
            post = split.suffix(state)
        post_loc = post
        if loc_scale != 1.0:
            with per_row_updates(split.model, [low_rank], transposed, [loc_scale]):
                post_loc = split.suffix(state)
    else:  # least squares (its solve's graph), checkpointed edited blocks (they recompute from the edited weights), half precision
        edit = editor.edit(split, edit_rows, state)
        post = split.suffix(state, edit.new_params)
        post_loc = post if loc_scale == 1.0 else split.suffix(state, _locality_params(editor, split, edit, loc_scale))
    return edit, _selections(state.final_hidden, post, post_loc, rows.label_mask, of, same_outer, context, batch.unlikely is not None)


def _one_row(rows: Sequence[TokenBatch], positions: Sequence[torch.Tensor]) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """Packed rows (each (1, L_i), a (1, 1, L_i, L_i) additive mask) one after another as ONE row: a block-diagonal
    mask (no position sees another row's), the position ids, and the row (record) each position comes from."""
    total = sum(r.input_ids.shape[1] for r in rows)
    dtype, device = rows[0].attention_mask.dtype, rows[0].input_ids.device
    mask = torch.full((1, 1, total, total), torch.finfo(dtype).min, dtype=dtype, device=device)
    start = 0
    for row in rows:
        n = row.input_ids.shape[1]
        mask[..., start : start + n, start : start + n] = row.attention_mask
        start += n
    owner = torch.cat([torch.full((r.input_ids.shape[1],), i, device=device) for i, r in enumerate(rows)])
    joined = TokenBatch(torch.cat([r.input_ids for r in rows], 1), mask, torch.cat([r.labels for r in rows], 1))
    return joined, torch.cat(list(positions), 1), owner


@contextmanager
def _record_updates(model: torch.nn.Module, owner: torch.Tensor, updates: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                    scale: float = 1.0) -> Iterator[None]:
    """Within the block, every position of a one-row forward adds its own record's update to the edited modules'
    outputs: ``updates[name]`` = (ũ (T, d_in), α·δ̃ (T, d_out), record of each of the T tokens), and position p adds
    x_p · Σ_{t of its record} ũ_tᵀ α·δ̃_t, i.e. ((x · ũᵀ) ⊙ [record(p) = record(t)]) · α·δ̃ (times ``scale``)."""
    handles = []

    def adder(u: torch.Tensor, d: torch.Tensor, same: torch.Tensor):
        def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            x = args[0][0].to(u.dtype)  # (L, d_in): the one row
            added = ((x @ u.T) * same) @ d
            return output + (added if scale == 1.0 else added * scale).to(output.dtype)[None]

        return hook

    try:
        for name, (u, d, record) in updates.items():
            same = (owner[:, None] == record[None, :]).to(u.dtype)  # (L, T)
            handles.append(model.get_submodule(name.rsplit(".", 1)[0]).register_forward_hook(adder(u, d, same)))
        yield
    finally:
        for handle in handles:
            handle.remove()


ONE_PASS_TOKENS = 360  # the most tokens a micro-batch's records run in one pass with (``one_pass``)


def one_pass(split: SplitModel, batches: Sequence[MetaBatch]) -> bool:
    """Whether the records of ``batches`` are better run in one pass (``batched_meta_loss``) than one after another: while
    their packed rows hold at most ``ONE_PASS_TOKENS`` tokens together. A short row's pass costs what reading the weights
    costs, so the records share one read (two CounterFact records: 0.72x the time per record, with the kept task
    instructions of ``SplitModel.prefix_after_start``); two ConvSent records (~480 tokens) in one pass would hold both
    records' activations and logits at once (peak training RSS of the paper recipe 1.55 GiB against 1.40)."""
    return sum(_record_row(split, batch)[0].input_ids.shape[1] for batch in batches) <= ONE_PASS_TOKENS


def batched_meta_loss(editor: MENDEditor, split: SplitModel, batches: Sequence[MetaBatch], c_edit: float, c_loc: float,
                      c_margin: float = 0.0, c_answer: float = 0.0, answer_cap: float = 2.0, c_context: float = 0.0,
                      loc_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean of ``meta_loss`` over several records, each with ITS OWN edit, in one pass (``training.batch_size``).

    Each record's inputs are packed into one row (``_record_row``) and the rows run one after another as ONE row
    (``_one_row``, no padding): one prefix pass, one backward for every record's gradient factors (δ from the sum of
    the records' mean edit NLLs: no position sees another record's, so each record's δ is its own), the MEND network
    on each record's factors in turn (its running statistics merge them in the order one record per micro-batch
    would), and one post-edit suffix in which every position adds its own record's update as low-rank factors
    (``_record_updates``). Equal to the mean of the records' packed ``meta_loss`` calls, statistics included, up to
    float rounding. A summing MEND editor only. (The Trainer runs records whose rows are long one at a time instead:
    ``one_pass``.)
    """
    if editor.config.aggregation != "sum":
        raise ValueError(f"per-record edits in one pass need a summing MEND editor (editor.aggregation is {editor.config.aggregation!r})")
    packed = [_record_row(split, batch) for batch in batches]
    rows, positions, owner = _one_row([row for row, *_ in packed], [pos for _, pos, *_ in packed])
    n = len(batches)
    offsets = [0]
    for row, *_ in packed:
        offsets.append(offsets[-1] + row.input_ids.shape[1])

    def placed(r: int, mask: torch.Tensor) -> torch.Tensor:  # record r's (1, L_r) mask as a (1, L) one
        out = torch.zeros((1, offsets[-1]), dtype=torch.bool, device=mask.device)
        out[0, offsets[r] : offsets[r + 1]] = mask[0]
        return out

    # the lower blocks pass each record's tokens after a start they have seen; the edit's pass below gives the unedited output
    state = split.prefix_after_start(rows, positions, split.starts, offsets[:-1])
    inner = torch.stack([placed(r, of("inner")) for r, (_, _, of, _) in enumerate(packed)]).any(0)
    edit_mask = rows.label_mask & inner
    with torch.enable_grad(), capture_factors(split.model, editor.weights) as capture:
        unedited = split.suffix(state)
        logits = split.logits_at(unedited, edit_mask)
        nll = torch.nn.functional.cross_entropy(logits.float(), rows.labels[edit_mask], reduction="none")
        record = owner[edit_mask[0]]
        per_record = torch.zeros(n, device=nll.device).index_add(0, record, nll) / torch.bincount(record, minlength=n).clamp(min=1)
        factors = capture.factors(per_record.sum())  # each record's δ: the gradient of its own mean NLL
    state.final_hidden = unedited.detach()
    # the MEND network once per record, in order: in training each call first merges its tokens into the running
    # statistics it normalizes with, so the records see the statistics they would see one micro-batch at a time
    parts: dict[str, list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]] = {w.name: [] for w in editor.weights}
    for r in range(n):  # every record calls it, even without tokens: data-parallel processes exchange statistics per call
        own = {name: f.select(owner[f.positions] == r) for name, f in factors.items()}
        for i, w, _, u_w, d_w in editor.network_outputs(own):
            parts[w.name].append((u_w, editor.edit_lrs[i] * d_w, torch.full((u_w.shape[0],), r, device=u_w.device)))
    updates = {name: tuple(torch.cat(t) for t in zip(*chunks, strict=True)) for name, chunks in parts.items() if chunks}
    with _record_updates(split.model, owner, updates):
        post = split.suffix(state)
    post_loc = post
    if loc_scale != 1.0:
        with _record_updates(split.model, owner, updates, loc_scale):
            post_loc = split.suffix(state)
    selections: list[Selections] = []
    for r, (_, _, of, same_outer) in enumerate(packed):
        def of_r(name: str, r: int = r, of: Callable[[str], torch.Tensor] = of) -> torch.Tensor:
            return placed(r, of(name))
        selections.append(_selections(state.final_hidden, post, post_loc, rows.label_mask, of_r, same_outer, bool(c_context),
                                      batches[r].unlikely is not None))
    flat = split.logits_at_many([pair for chosen in selections for pair in chosen.values()])
    results = []
    for r, chosen in enumerate(selections):
        logits_r = dict(zip(chosen, flat[: len(chosen)], strict=True))
        flat = flat[len(chosen) :]
        results.append(_terms(logits_r, batches[r], float(per_record[r].detach()), c_edit, c_loc, c_margin, c_answer, answer_cap, c_context))
    return _mean_over_records(results)


def _mean_over_records(results: Sequence[tuple[torch.Tensor, dict[str, float]]]) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean loss and the mean of every metric of several records' (loss, metrics)."""
    metrics = {k: sum(m[k] for _, m in results) / len(results) for k in results[0][1]}
    return torch.stack([loss for loss, _ in results]).mean(), metrics


def per_record_meta_loss(editor: MENDEditor, split: SplitModel, batches: Sequence[MetaBatch], *args: float, packed: bool = False,
                         **kwargs: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The mean of ``meta_loss`` over the records, one call each: what ``batched_meta_loss`` computes in one pass, for
    where it cannot run (an architecture that ignores packed rows' masks, a least-squares editor)."""
    return _mean_over_records([meta_loss(editor, split, batch, *args, packed=packed, **kwargs) for batch in batches])


@torch.no_grad()
def packing_matches(editor: MENDEditor, split: SplitModel, batch: MetaBatch, tolerance: float = 1e-3, many: bool = False) -> bool:
    """Whether ``meta_loss(packed=True)`` (``many``: ``many_edits_loss(packed=True)``, one edit of all the batch's records)
    gives the padded rows' loss on ``batch`` (an architecture may ignore 4-D attention masks); the editor runs in eval
    mode (its statistics are not updated)."""
    objective = partial(many_edits_loss, chunk=editor.config.chunk_edits) if many else partial(meta_loss, c_context=1.0)
    was_training = editor.training
    editor.eval()
    try:
        padded, _ = objective(editor, split, batch, 1.0, 1.0)
        try:
            packed, _ = objective(editor, split, batch, 1.0, 1.0, packed=True)
        except (RuntimeError, ValueError, TypeError):  # e.g. an attention kernel without 4-D mask support
            return False
    finally:
        editor.train(was_training)
    return bool(torch.isclose(packed, padded, rtol=tolerance, atol=tolerance))


def meta_loss(editor: MENDEditor, split: SplitModel, batch: MetaBatch, c_edit: float, c_loc: float, c_margin: float = 0.0,
              c_answer: float = 0.0, answer_cap: float = 2.0, c_context: float = 0.0,
              packed: bool = False, loc_scale: float = 1.0) -> tuple[torch.Tensor, dict[str, float]]:
    """One meta-training loss; gradients reach only the MEND network and the step sizes α.

    ``c_answer`` weighs ``losses.answer_margin`` on the edit_outer answer tokens (0: DESIGN.md §4 exactly);
    ``c_context`` the locality KL on the locality input's prompt positions (0: DESIGN.md §4 exactly);
    ``loc_scale`` the multiple of the update the locality terms (and the ``locality`` metric) are scored at (1: §4 exactly).
    ``packed``: every input of the step runs as ONE packed row (``models.packing``; the same loss up to float
    rounding, checked by ``packing_matches``): one prefix pass, the shared instruction once, one post-edit suffix.
    """
    inputs = _packed_inputs if packed else _padded_inputs
    edit, selections = inputs(editor, split, batch, bool(c_context), loc_scale)
    logits = dict(zip(selections, split.logits_at_many(list(selections.values())), strict=True))
    return _terms(logits, batch, float(edit.pre_edit_loss), c_edit, c_loc, c_margin, c_answer, answer_cap, c_context)


def _terms(logits: dict[str, torch.Tensor], batch: MetaBatch, pre_edit_loss: float, c_edit: float, c_loc: float, c_margin: float,
           c_answer: float, answer_cap: float, c_context: float) -> tuple[torch.Tensor, dict[str, float]]:
    """The loss and metrics of one record's (or one summed edit's) step from the logits at its scored positions."""
    pre_loc, pre_outer = logits["pre_loc"].detach(), logits["pre_outer"].detach()  # targets, not trained
    post_outer, post_loc = logits["post_outer"], logits["post_loc"]

    outer_targets = batch.edit_outer.labels[batch.edit_outer.label_mask]  # packed: the same tokens in the same order
    l_edit = masked_nll(post_outer, outer_targets)
    l_answer = answer_margin(post_outer, outer_targets, answer_cap) if c_answer else None
    if batch.unlikely is not None:  # ConvSent: push the opposite sentiment's responses down
        l_edit = l_edit + unlikelihood(logits["post_unlikely"], batch.unlikely.labels[batch.unlikely.label_mask])
    l_loc = locality_kl(pre_loc, post_loc)
    loss = c_edit * l_edit + c_loc * l_loc
    l_context = None
    if c_context:
        l_context = locality_kl(logits["pre_context"].detach(), logits["post_context"])
        loss = loss + c_context * l_context
    if l_answer is not None:
        loss = loss + c_answer * l_answer
    l_margin = None
    if c_margin:
        l_margin = locality_margin(pre_loc, post_loc)
        loss = loss + c_margin * l_margin

    n_outer, n_loc = batch.edit_outer.input_ids.shape[0], batch.loc.input_ids.shape[0]
    metrics = {
        "loss": loss.item(),
        "l_edit": l_edit.item(),
        "l_loc": l_loc.item(),
        **({"l_margin": l_margin.item()} if l_margin is not None else {}),
        **({"l_answer": l_answer.item()} if l_answer is not None else {}),
        **({"l_loc_context": l_context.item()} if l_context is not None else {}),
        "pre_edit_loss": pre_edit_loss,
        "edit_acc_pre": token_accuracy(pre_outer, outer_targets, batch.edit_outer.label_rows, n_outer).mean().item(),
        "edit_acc": token_accuracy(post_outer.detach(), outer_targets, batch.edit_outer.label_rows, n_outer).mean().item(),
        "locality": unchanged_share(pre_loc, post_loc.detach(), batch.loc.label_rows, n_loc).mean().item(),
    }
    return loss, metrics


# (pre-edit logits, post-edit logits, targets) at the scored positions -> named mean terms
Terms = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], dict[str, torch.Tensor]]


def _chunk_sums(split: SplitModel, batch: TokenBatch, params: dict, terms: Terms, state: PrefixState) -> dict[str, torch.Tensor]:
    """Sums over one chunk's scored positions of ``terms``, and of the per-row accuracies (no grad); ``state``: the
    unedited model's pass over the chunk (``split.prefix``)."""
    with torch.no_grad():
        pre = split.logits_at(state.final_hidden, batch.label_mask)
    post = _scored(split, state, batch, params)
    targets = batch.labels[batch.label_mask]
    sums = {name: value * targets.numel() for name, value in terms(pre, post, targets).items()}
    with torch.no_grad():
        rows, n_rows = batch.label_rows, batch.n_label_rows  # a packed piece: its original rows (a row without labels adds 0)
        sums["acc_pre"] = token_accuracy(pre, targets, rows, n_rows).sum()
        sums["acc"] = token_accuracy(post, targets, rows, n_rows).sum()
        sums["unchanged"] = unchanged_share(pre, post, rows, n_rows).sum()
    return sums


# a packed row of a many-edit step's scored inputs holds at most this many tokens (or one row): a row's attention costs
# tokens² under its mask; on the default model, one thread, a step of the recommended recipe packed this way took 0.84
# of the padded rows' time (rows of at most 192 tokens 0.92, 320 0.88, 512 0.86; side by side, 2026-12-03)
PACKED_ROW_TOKENS = 768
PACKED_EDIT_TOKENS = 2048  # its edit inputs are packed into one row up to this many tokens


def _pieces(batch: TokenBatch, chunk: int, packed: bool, dtype: torch.dtype) -> list[tuple[TokenBatch, torch.Tensor | None]]:
    """``batch`` in the pieces ``_scored_means`` runs one at a time, each with its position ids (None: as padded):
    ``chunk`` rows at a time; ``packed``: consecutive rows packed into one row of at most ``PACKED_ROW_TOKENS`` tokens
    (and ``chunk`` rows), without their padding. Short rows share a pass without padding, and each packed row's
    attention (tokens² under its mask) stays small."""
    if not packed:
        return [(piece, None) for piece in batch.chunks(chunk)]
    lengths = batch.attention_mask.sum(1).tolist()
    groups: list[list[int]] = []
    for i, n in enumerate(lengths):
        if groups and len(groups[-1]) < chunk and sum(lengths[j] for j in groups[-1]) + n <= PACKED_ROW_TOKENS:
            groups[-1].append(i)
        else:
            groups.append([i])
    out = []
    for group in groups:
        rows = batch.rows(group[0], group[-1] + 1)
        row, positions, _ = pack(rows, [False] * rows.n_rows, dtype)  # no shared start: each row sees only itself
        out.append((row, positions))
    return out


def _scored_means(split: SplitModel, batch: TokenBatch, params: dict, terms: Terms, chunk: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """``terms`` averaged over all scored positions of ``batch``, accuracies over its rows; run ``chunk`` rows at a time
    (``packed``: several rows packed into one, ``_pieces``).

    The unedited model passes over each piece once (``split.prefix``, no gradients: its weights are frozen; a packed
    piece's rows after the starts the lower blocks keep of them, ``SplitModel.prefix_after_start``). Under
    autograd, when ``batch`` takes several pieces, the rest of each (post-edit suffix, logits, terms) is one checkpoint
    segment, which backward recomputes, so what is kept between forward and backward is the pieces' prefix states (the
    hidden states entering the edited blocks and leaving the unedited model), not their activations or vocabulary
    logits, and memory does not grow with the rows; a batch of one piece (at most ``chunk`` rows, or one packed row)
    keeps its activations instead of recomputing them (a step of 8 edits of the recommended recipe: 8 % of its time).
    (The segment once held the frozen prefix too, run again in backward: 228 block passes a step of 8 edits, now 138.)
    """
    totals: dict[str, torch.Tensor] = {}
    dtype = next(split.model.parameters()).dtype
    pieces = _pieces(batch, chunk, packed, dtype)
    segments = torch.is_grad_enabled() and len(pieces) > 1
    for piece, positions in pieces:
        with torch.no_grad():
            if positions is not None:  # a packed piece: the lower blocks pass each row after the start kept of it
                state = split.prefix_after_start(piece, positions, split.starts, segments_of(positions))
                state.final_hidden = split.suffix(state)
            else:
                state = split.prefix(piece)
        sums = (checkpoint(_chunk_sums, split, piece, params, terms, state, use_reentrant=False) if segments
                else _chunk_sums(split, piece, params, terms, state))
        totals = {k: totals[k] + v for k, v in sums.items()} if totals else sums
    n_positions, n_rows = int(batch.label_mask.sum()), batch.n_rows
    return {k: v / (n_rows if k in ("acc_pre", "acc", "unchanged") else n_positions) for k, v in totals.items()}


def _many_edit(editor: MENDEditor, split: SplitModel, inner: TokenBatch, packed: bool) -> EditResult:
    """The one edit of a many-edit step; ``packed``: its edit inputs as one packed row without their padding (each row
    sees only itself, so every token's factors are the padded rows' own, in the same order), where they are one chunk
    of the editor's (``editor.chunk_edits``) and at most ``PACKED_EDIT_TOKENS`` tokens."""
    tokens = int(inner.attention_mask.sum())
    one_chunk = editor.config.aggregation != "least_squares" or inner.n_rows <= editor.config.chunk_edits
    if not packed or not one_chunk or tokens > PACKED_EDIT_TOKENS:
        return editor.edit(split, inner)
    row, positions, _ = pack(inner, [False] * inner.n_rows, next(split.model.parameters()).dtype)
    # the lower blocks pass each edit input after the task instruction kept of it (``SplitModel.prefix_after_start``)
    return editor.edit(split, row, split.prefix_after_start(row, positions, split.starts, segments_of(positions)))


def segments_of(positions: torch.Tensor) -> list[int]:
    """Where each row of a packed row without a shared start begins (``pack(shareable=[False, ...])``): its position 0."""
    return (positions[0] == 0).nonzero()[:, 0].tolist()


def many_edits_loss(editor: MENDEditor, split: SplitModel, batch: MetaBatch, c_edit: float, c_loc: float, c_margin: float = 0.0,
                    c_answer: float = 0.0, answer_cap: float = 2.0, chunk: int = 16, packed: bool = False) -> tuple[torch.Tensor, dict[str, float]]:
    """``meta_loss`` for the N records of ``batch`` edited by ONE aggregated edit (``training.n_edits``).

    The editor combines the N edits as ``editor.aggregation`` says (least squares: in chunks of
    ``editor.chunk_edits``); the edit loss of all N and the locality loss are then the token means of
    ``meta_loss``, computed ``chunk`` rows at a time. For a summing editor it equals ``meta_loss``.
    Backward keeps the edit's graph (the network on every edit token, KᵀD, the solve) and each
    chunk's inputs, not the scored inputs' activations or vocabulary logits. ``packed``: the edit inputs and the scored
    inputs run as packed rows without their padding (``_many_edit``, ``_pieces``; the same loss up to float rounding,
    checked by ``packing_matches``): a step of 8 edits of the recommended recipe holds ~30 % padding.
    """
    edit = _many_edit(editor, split, batch.edit_inner, packed)
    params = edit.new_params

    def edit_terms(pre: torch.Tensor, post: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        answer = {"l_answer": answer_margin(post, targets, answer_cap)} if c_answer else {}
        return {"l_edit": masked_nll(post, targets), **answer}

    def loc_terms(pre: torch.Tensor, post: torch.Tensor, targets: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"l_loc": locality_kl(pre, post), **({"l_margin": locality_margin(pre, post)} if c_margin else {})}

    outer = _scored_means(split, batch.edit_outer, params, edit_terms, chunk, packed)
    loc = _scored_means(split, batch.loc, params, loc_terms, chunk, packed)
    l_edit = outer["l_edit"]
    if batch.unlikely is not None:  # ConvSent: push the opposite sentiment's responses down
        l_edit = l_edit + _scored_means(split, batch.unlikely, params, lambda pre, post, t: {"l": unlikelihood(post, t)}, chunk, packed)["l"]
    loss = c_edit * l_edit + c_loc * loc["l_loc"] + c_answer * outer.get("l_answer", 0.0) + c_margin * loc.get("l_margin", 0.0)
    optional = {"l_margin": loc.get("l_margin"), "l_answer": outer.get("l_answer")}
    metrics = {
        "loss": loss.item(),
        "l_edit": l_edit.item(),
        "l_loc": loc["l_loc"].item(),
        **{k: v.item() for k, v in optional.items() if v is not None},
        "pre_edit_loss": float(edit.pre_edit_loss),
        "edit_acc_pre": outer["acc_pre"].item(),
        "edit_acc": outer["acc"].item(),
        "locality": loc["unchanged"].item(),
    }
    return loss, metrics
