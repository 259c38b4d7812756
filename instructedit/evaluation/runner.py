"""The evaluation runner: per case one batched pre/post-edit scoring of all its probes, the edit, a verified exact rollback.

Speed (BENCHMARKS.md): a case's probes (rewrite, rephrases, portability, locality) form one padded
batch; the vocabulary projection runs only at the labelled answer positions. For a MEND editor the
rows are packed into one row that holds their common instruction once (``pack``), one pass of the
unedited prefix over it serves the pre-edit logits and the edit itself, and only the edited blocks
re-run with the new weights, functionally, for the post-edit logits (the model is never written). Any other editor goes through ``editor.apply`` / ``handle.rollback()``.
Either way a ``WeightGuard`` proves after every case that the parameters are bitwise the originals.

The generation protocol (``generation_probes``) runs beside it: every case's pre-edit answers are
generated up front in large batches (the unedited model does not change), and each case's
post-edit answers in one batched call while its edit is written into the model (MEND: the
``EditResult`` already computed for the logits, applied in place and rolled back).
"""

from __future__ import annotations

import datetime
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from instructedit.editors.base import EditHandle, EditResult, Editor, WeightEditHandle, apply_in_place
from instructedit.editors.mend import MENDEditor
from instructedit.evaluation import generation_probes as gen
from instructedit.evaluation.generation import ANSWER_MARGIN
from instructedit.evaluation.guard import RestorationError, WeightGuard  # noqa: F401 (RestorationError: re-exported)
from instructedit.evaluation.metrics import (
    MARGIN, PROTOCOL_CHOICES, MetricSummary, aggregate, answer_accuracy, family_means, mean_logprob, sentiment_margin,
    unchanged_tokens,
)
from instructedit.evaluation.report import PHASES, CaseResult, EvalReport, EvalSettings, SequentialPoint
from instructedit.records import EditRecord, TokenBatch
from instructedit.tasks.collate import IGNORE, Collator, PromptTooLongError
from instructedit.tasks.instructions import InstructionPool

logger = logging.getLogger(__name__)

SCORED = ("reliability", "generalization", "portability")  # accuracy against the gold answer
OPPOSITE = "opposite"  # ConvSent responses of the other sentiment: scored only for the sentiment margin
MAX_LENGTH_CAP = 1024
MIN_SHARED = 4  # tokens a packed row must share to be worth it


@dataclass(frozen=True)
class Probe:
    """One scored input of a case: its family (reliability, ...), sub-key, prompt (as fed) and answer."""

    family: str
    kind: str
    prompt: str
    answer: str


def case_probes(collator: Collator, record: EditRecord, instruction: int | None) -> list[Probe]:
    """Every probe of a record. Edit, rephrase and portability prompts are wrapped; locality never is.

    ConvSent: reliability = the first target response (part of the edit), generalization = the
    held-out target responses ``[k:2k]`` (as ``Collator.meta_batch``'s edit_outer), plus the first
    ``k`` opposite responses for the sentiment margin.
    """
    prompt = collator.wrap(record, record.prompt, instruction)
    probes = [Probe("reliability", "default", prompt, record.target_new)]
    if record.convsent is not None:
        k, cs = collator.convsent_pairs, record.convsent
        probes += [Probe("generalization", "default", prompt, r) for r in cs.target_responses[k : 2 * k]]
        probes += [Probe(OPPOSITE, "default", prompt, r) for r in cs.opposite_responses[:k]]
    else:
        probes += [Probe("generalization", "default", collator.wrap(record, r, instruction), record.target_new) for r in record.rephrase]
        probes += [Probe("portability", q.kind, collator.wrap(record, q.prompt, instruction), q.answer) for q in record.portability]
    probes += [Probe("locality", q.kind, q.prompt, q.answer) for q in record.locality]
    return probes


def edit_pairs(collator: Collator, record: EditRecord, instruction: int | None) -> list[tuple[str, str]]:
    """The edit input, as ``Collator.meta_batch``'s edit_inner: wrapped prompt + target (ConvSent: the first k responses)."""
    prompt = collator.wrap(record, record.prompt, instruction)
    if record.convsent is not None:
        return [(prompt, r) for r in record.convsent.target_responses[: collator.convsent_pairs]]
    return [(prompt, record.target_new)]


def sequential_schedule(n: int) -> list[int]:
    """Edit counts after which sequential editing re-scores: 1, 2, 4, 8, ... and n."""
    points, k = [], 1
    while k < n:
        points.append(k)
        k *= 2
    return points + [n] if n > 0 else []


def scored_logits(model: nn.Module, batch: TokenBatch, positions: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (n_positions, vocab) at the labelled positions only: decoder hidden states, then the head on those rows."""
    out = model.base_model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, position_ids=positions, use_cache=False)
    return model.get_output_embeddings()(out.last_hidden_state[batch.label_mask])


def pack(batch: TokenBatch, shareable: Sequence[bool], dtype: torch.dtype, min_shared: int = MIN_SHARED) -> tuple[TokenBatch, torch.Tensor, torch.Tensor]:
    """All rows of a right-padded ``batch`` as one row; shareable rows that start alike hold their common start once.

    The wrapped probes of a case all begin with the same instruction, so it is run once. Each row
    keeps its own positions and sees only itself (and the shared start, if it shares it), so every
    logit equals the unpacked one up to float rounding. Returns the packed batch, whose
    ``attention_mask`` is a 4-D additive mask (1, 1, L, L), its position ids (1, L) and the owner
    row of each position (L,), -1 on the shared start.
    """
    lengths = batch.attention_mask.sum(1).tolist()
    rows = [batch.input_ids[i, :n] for i, n in enumerate(lengths)]
    labels = [batch.labels[i, :n] for i, n in enumerate(lengths)]
    group = [i for i, row in enumerate(rows) if shareable[i] and len(row) > min_shared and torch.equal(row[:min_shared], rows[0][:min_shared])]
    shared = 0
    if len(group) >= 2:
        limit = min(int((labels[i] != IGNORE).nonzero()[0]) for i in group)  # a label never falls in the shared part
        same = torch.stack([rows[i][:limit] == rows[group[0]][:limit] for i in group]).all(0)
        shared = int(same.long().cumprod(0).sum())
    if shared < min_shared:
        group, shared = [], 0
    device = batch.input_ids.device
    start_ids = rows[group[0]][:shared] if group else rows[0][:0]
    ids, pos = [start_ids], [torch.arange(shared, device=device)]
    lab, owner = [torch.full_like(start_ids, IGNORE)], [torch.full_like(start_ids, -1)]
    for i, row in enumerate(rows):
        start = shared if i in group else 0
        ids.append(row[start:])
        pos.append(torch.arange(start, len(row), device=device))
        lab.append(labels[i][start:])
        owner.append(torch.full((len(row) - start,), i, device=device))
    owner_t = torch.cat(owner)
    sees_shared = torch.tensor([i in group for i in range(len(rows))] + [True], device=device)[owner_t]  # -1 -> last
    visible = (owner_t[:, None] == owner_t[None, :]) | ((owner_t[None, :] == -1) & sees_shared[:, None])
    visible &= torch.ones_like(visible).tril()  # causal in packed order; the shared start comes first
    mask = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)
    packed = TokenBatch(torch.cat(ids)[None], mask[None, None], torch.cat(lab)[None])
    return packed, torch.cat(pos)[None], owner_t


@dataclass
class _Layout:
    """A case's probe rows as forward passes: right-padded batches, or packed rows with their position ids."""

    chunks: list[TokenBatch]
    positions: list[torch.Tensor | None]
    edit_view: TokenBatch  # the first chunk labelled on the edit rows only: MEND edits on the shared prefix pass


@dataclass
class _Case:
    index: int
    record: EditRecord
    probes: list[Probe]  # the edit rows first (without a stop token, the reliability probe is one of them), then the others
    edit: TokenBatch  # the edit input on its own, for ``editor.apply``
    padded: _Layout  # at most batch_size rows per chunk; the first chunk holds every edit row
    targets: torch.Tensor  # (n_positions,) gold tokens, probe by probe (the same in both layouts)
    rows: torch.Tensor  # (n_positions,) probe index of each position
    packed: _Layout | None = None
    pre: dict[str, float] | None = None
    pre_argmax: torch.Tensor | None = None  # kept for sequential editing's locality
    queries: list[gen.Query] = field(default_factory=list)  # the generation protocol's questions
    pre_answers: list[str] = field(default_factory=list)

    def layout(self, packed: bool, dtype: torch.dtype) -> _Layout:
        if not packed:
            return self.padded
        if self.packed is None:
            n_edit = self.edit.input_ids.shape[0]
            chunks, positions, owners = [], [], []
            for c, chunk in enumerate(self.padded.chunks):
                # Only one edit row may share the instruction: MEND transforms each token's (u, δ) on
                # its own, so two edit rows must not merge their instruction tokens into one.
                shareable = [not (c == 0 and 1 <= r < n_edit) for r in range(chunk.input_ids.shape[0])]
                packed_chunk, pos, owner = pack(chunk, shareable, dtype)
                chunks.append(packed_chunk), positions.append(pos), owners.append(owner)
            first, not_edit = chunks[0], (owners[0] >= n_edit)[None]
            self.packed = _Layout(chunks, positions, TokenBatch(first.input_ids, first.attention_mask, first.labels.masked_fill(not_edit, IGNORE)))
        return self.packed


def _prepare(collator: Collator, records: Sequence[EditRecord], instruction: int | None, batch_size: int,
             device: torch.device) -> tuple[list[_Case], list[dict[str, str]]]:
    cases, skipped = [], []
    for index, record in enumerate(records):
        pairs = edit_pairs(collator, record, instruction)
        # An edit row that ends in a stop token is no teacher-forced probe (those score the answer alone): its own row.
        probes = _edit_rows_first(case_probes(collator, record, instruction), pairs, match=not collator.stop_ids)
        bounds = [0, *range(max(batch_size, len(pairs)), len(probes), batch_size), len(probes)]
        try:
            chunks = [collator.qa_batch([(p.prompt, p.answer) for p in probes[lo:hi]], record.source,
                                        stop=[i < len(pairs) for i in range(lo, hi)]).to(device)
                      for lo, hi in zip(bounds, bounds[1:])]
            edit = collator.qa_batch(pairs, record.source, stop=True).to(device)
        except PromptTooLongError as err:
            skipped.append({"source": record.source, "reason": str(err)})
            continue
        first = chunks[0]
        not_edit = torch.arange(first.input_ids.shape[0], device=device)[:, None] >= len(pairs)  # (rows, 1)
        padded = _Layout(chunks, [None] * len(chunks), TokenBatch(first.input_ids, first.attention_mask, first.labels.masked_fill(not_edit, IGNORE)))
        targets = torch.cat([c.labels[c.label_mask] for c in chunks])
        rows = torch.cat([c.label_mask.nonzero()[:, 0] + lo for c, lo in zip(chunks, bounds)])
        cases.append(_Case(index, record, probes, edit, padded, targets, rows))
    if skipped:
        logger.warning("skipped %d of %d records that exceed max_length=%d tokens (e.g. %s)", len(skipped), len(records),
                       collator.max_length, skipped[0]["source"])
    return cases, skipped


def _edit_rows_first(probes: list[Probe], pairs: Sequence[tuple[str, str]], match: bool = True) -> list[Probe]:
    """Reorder so the edit input's rows come first; an edit row that is no probe (ConvSent's 2nd..k-th; every edit row
    when ``match`` is off) is family 'edit', which is not scored."""
    rest = list(probes)
    head = []
    for prompt, answer in pairs:
        found = next((p for p in rest if (p.prompt, p.answer) == (prompt, answer)), None) if match else None
        if found is not None:
            rest.remove(found)
        head.append(found or Probe("edit", "default", prompt, answer))
    return head + rest


def _accuracy_metrics(case: _Case, logits: torch.Tensor) -> dict[str, float]:
    """Reliability / generalization / portability (+ ConvSent's sentiment margin) of one case."""
    n = len(case.probes)
    acc = answer_accuracy(logits, case.targets, case.rows, n).tolist()
    scored = [i for i, p in enumerate(case.probes) if p.family in SCORED]
    metrics = family_means([acc[i] for i in scored], [case.probes[i].family for i in scored], [case.probes[i].kind for i in scored])
    if case.record.convsent is not None:
        target = "generalization" if any(p.family == "generalization" for p in case.probes) else "reliability"
        chosen = [i for i, p in enumerate(case.probes) if p.family in (target, OPPOSITE)]
        logp = mean_logprob(logits, case.targets, case.rows, n).tolist()
        margin = sentiment_margin([logp[i] for i in chosen], [case.probes[i].family == target for i in chosen])
        if margin is not None:
            metrics[MARGIN] = margin
    return metrics


def _post_metrics(case: _Case, logits: torch.Tensor, pre_argmax: torch.Tensor) -> dict[str, float]:
    metrics = _accuracy_metrics(case, logits)
    same = unchanged_tokens(pre_argmax, logits.argmax(-1), case.rows, len(case.probes)).tolist()
    local = [i for i, p in enumerate(case.probes) if p.family == "locality"]
    metrics.update(family_means([same[i] for i in local], ["locality"] * len(local), [case.probes[i].kind for i in local]))
    return metrics


@contextmanager
def _positions(model: nn.Module, positions: torch.Tensor | None) -> Iterator[None]:
    """Feed ``position_ids`` to every forward of ``model`` (SplitModel.prefix calls the model itself)."""
    if positions is None:
        yield
        return
    handle = model.register_forward_pre_hook(lambda module, args, kwargs: (args, {**kwargs, "position_ids": positions}), with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


@torch.no_grad()
def _logits(model: nn.Module, layout: _Layout) -> torch.Tensor:
    return torch.cat([scored_logits(model, chunk, pos) for chunk, pos in zip(layout.chunks, layout.positions)])


Asker = Callable[[], list[str]]  # a case's post-edit answers, asked while its edit is in the model


def _score_in_place(model: nn.Module, editor: Editor, case: _Case, ask: Asker | None = None) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Any editor: pre-edit forward, ``apply``, post-edit forward (and answers), ``rollback`` (padded rows: editors may read them)."""
    pre = _logits(model, case.padded)
    handle = editor.apply(model, case.edit)
    try:
        post = _logits(model, case.padded)
        answers = ask() if ask is not None else []
    finally:
        handle.rollback()
    return pre, post, answers


def _answer_edited(model: nn.Module, result: EditResult, ask: Asker | None) -> list[str]:
    """MEND's post-edit answers: the edit already computed for the logits, written in place, rolled back bit for bit."""
    if ask is None:
        return []
    with apply_in_place(model, result):
        return ask()


@torch.no_grad()
def _score_mend(editor: MENDEditor, model: nn.Module, layout: _Layout) -> tuple[torch.Tensor, torch.Tensor, EditResult]:
    """MEND: one prefix pass serves the pre-edit logits and the edit; only the edited blocks re-run post-edit.

    The edit is taken on the first chunk with labels on the edit rows only: the other rows get an
    exactly zero output gradient, so their tokens drop out of the gradient factors.
    """
    split = editor.split(model)
    states = []
    for chunk, pos in zip(layout.chunks, layout.positions):
        with _positions(model, pos):
            states.append(split.prefix(chunk))
    was_training = editor.training
    editor.eval()
    try:
        result = editor.edit(split, layout.edit_view, states[0])
    finally:
        editor.train(was_training)
    pre = [split.logits_at(state.final_hidden, chunk.label_mask) for state, chunk in zip(states, layout.chunks)]
    post = [split.logits_at(split.suffix(state, result.new_params), chunk.label_mask) for state, chunk in zip(states, layout.chunks)]
    return torch.cat(pre), torch.cat(post), result


def _check_packing(editor: MENDEditor, model: nn.Module, case: _Case,
                   dtype: torch.dtype) -> tuple[bool, tuple[torch.Tensor, torch.Tensor, EditResult]]:
    """Score one case packed and compare its pre-edit logits with padded rows: an architecture may ignore 4-D masks.

    Returns whether packing is used, and this case's (pre, post, edit) in the layout chosen.
    """
    try:
        packed = _score_mend(editor, model, case.layout(True, dtype))
    except (RuntimeError, ValueError, TypeError) as err:  # e.g. an attention kernel without 4-D mask support
        logger.warning("packed rows failed on %s (%s); using padded batches", case.record.source, err)
        return False, _score_mend(editor, model, case.padded)
    split = editor.split(model)
    with torch.no_grad():
        padded = torch.cat([split.logits_at(split.prefix(c).final_hidden, c.label_mask) for c in case.padded.chunks])
    tol = (1e-4 if dtype == torch.float32 else 5e-2) * max(1.0, float(padded.abs().max()))  # float32 rounding: ~1e-6
    worst = float((packed[0] - padded).abs().max())
    if worst > tol:
        logger.warning("packed rows differ from padded ones by %.3g (> %.3g) on %s; using padded batches", worst, tol, case.record.source)
        return False, _score_mend(editor, model, case.padded)
    return True, packed


def _rescore(model: nn.Module, collator: Collator, cases: Sequence[_Case], batch_size: int, edits: int) -> SequentialPoint:
    """Reliability of every case edited so far and their locality against the unedited model."""
    items = [(c, i) for c in cases for i, p in enumerate(c.probes) if p.family in ("reliability", "locality")]
    device = cases[0].edit.input_ids.device
    per_case: dict[int, dict[str, list[float]]] = {}
    for start in range(0, len(items), batch_size):
        part = items[start : start + batch_size]
        batch = collator.qa_batch([(c.probes[i].prompt, c.probes[i].answer) for c, i in part]).to(device)
        with torch.no_grad():
            logits = scored_logits(model, batch)
        rows, n = batch.label_mask.nonzero()[:, 0], len(part)
        acc = answer_accuracy(logits, batch.labels[batch.label_mask], rows, n).tolist()
        pre_ids = torch.cat([c.pre_argmax[c.rows == i] for c, i in part])
        same = unchanged_tokens(pre_ids, logits.argmax(-1), rows, n).tolist()
        for j, (c, i) in enumerate(part):
            family = c.probes[i].family
            per_case.setdefault(c.index, {}).setdefault(family, []).append(acc[j] if family == "reliability" else same[j])
    rel = [sum(v["reliability"]) / len(v["reliability"]) for v in per_case.values() if "reliability" in v]
    loc = [sum(v["locality"]) / len(v["locality"]) for v in per_case.values() if "locality" in v]
    return SequentialPoint(edits, sum(rel) / len(rel), len(rel), sum(loc) / len(loc) if loc else None, len(loc))


def _asker(model: nn.Module, generation: gen.GenerationRun | None, case: _Case) -> Asker | None:
    if generation is None or not case.queries:
        return None
    return lambda: generation.answer_edited(model, case.queries)


def _case_result(case: _Case, pre: dict[str, float], post: dict[str, float], answers: list[str],
                 generation: gen.GenerationRun | None, teacher_forced: bool) -> CaseResult:
    """One case's result under the protocols asked for: teacher-forced metrics, generation metrics and answers."""
    gen_pre, gen_post, log = ({}, {}, [])
    if generation is not None and case.queries:
        gen_pre, gen_post, log = generation.case_result(case.queries, case.pre_answers, answers)
    if not teacher_forced:
        pre, post = {}, {}
    return CaseResult(case.index, case.record.source, case.record.task, pre, post, gen_pre, gen_post, log)


def _run_single(model: nn.Module, editor: Editor, cases: list[_Case], guard: WeightGuard, generation: gen.GenerationRun | None,
                teacher_forced: bool, fast_path: bool, pack_rows: bool, progress: bool,
                cases_together: int = 1) -> tuple[list[CaseResult], bool]:
    """Edit, score and roll back each case in turn; returns the results and whether rows were packed.

    MEND (fast path): the post-edit answers of ``cases_together`` cases are decoded in one batch, each
    row with its own case's weight update added by hooks (``row_edits``); the weights are never written.
    """
    dtype = next(model.parameters()).dtype
    probe_case = min(cases, key=lambda c: sum(chunk.input_ids.numel() for chunk in c.padded.chunks))  # cheapest to check
    packed, first_scores = _check_packing(editor, model, probe_case, dtype) if fast_path and pack_rows else (False, None)
    together = fast_path and generation is not None and cases_together > 1
    results: list[CaseResult] = []
    pending: list[tuple[_Case, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]] = []  # case, pre, post, ΔW

    def flush() -> None:
        answers = generation.answer_edited_together(model, [c.queries for c, *_ in pending], [u for *_, u in pending],
                                                    {w.name: w.transposed for w in editor.weights})
        for (case, pre, post, _), said in zip(pending, answers):
            guard.verify(where=f"case {case.index} ({case.record.source})")
            results.append(_case_result(case, _accuracy_metrics(case, pre), _post_metrics(case, post, pre.argmax(-1)), said,
                                        generation, teacher_forced))
        pending.clear()

    for case in tqdm(cases, desc="evaluate", unit="case", disable=not progress):
        ask = _asker(model, generation, case)
        if fast_path:
            scores = first_scores if first_scores is not None and case is probe_case else _score_mend(editor, model, case.layout(packed, dtype))
            if together:
                pending.append((case, scores[0], scores[1], scores[2].updates))
                if len(pending) >= cases_together:
                    flush()
                continue
            pre, post, answers = scores[0], scores[1], _answer_edited(model, scores[2], ask)
        else:
            pre, post, answers = _score_in_place(model, editor, case, ask)
        guard.verify(where=f"case {case.index} ({case.record.source})")
        results.append(_case_result(case, _accuracy_metrics(case, pre), _post_metrics(case, post, pre.argmax(-1)), answers,
                                    generation, teacher_forced))
    if pending:
        flush()
    return results, packed


def _run_sequential(model: nn.Module, editor: Editor, collator: Collator, cases: list[_Case], guard: WeightGuard, batch_size: int,
                    generation: gen.GenerationRun | None, teacher_forced: bool, progress: bool) -> tuple[list[CaseResult], list[SequentialPoint]]:
    """Keep every edit; pre-edit values come from the unedited model; the model is restored at the end.

    A case's post-edit answers are asked right after its own edit, with every earlier edit still in the model.
    """
    for case in tqdm(cases, desc="pre-edit", unit="case", disable=not progress):
        logits = _logits(model, case.padded)
        case.pre, case.pre_argmax = _accuracy_metrics(case, logits), logits.argmax(-1)
    schedule = set(sequential_schedule(len(cases)))
    held: list[EditHandle] = []  # editors that add modules/hooks: undone last-in first-out at the end
    results, curve = [], []
    try:
        for k, case in enumerate(tqdm(cases, desc="sequential edits", unit="edit", disable=not progress), start=1):
            handle = editor.apply(model, case.edit)
            if isinstance(handle, WeightEditHandle):
                handle.keep()  # the guard's copies restore the weights; per-edit copies would cost memory
            else:
                held.append(handle)
            post = _post_metrics(case, _logits(model, case.padded), case.pre_argmax)
            ask = _asker(model, generation, case)
            results.append(_case_result(case, case.pre, post, ask() if ask is not None else [], generation, teacher_forced))
            if k in schedule:
                curve.append(_rescore(model, collator, cases[:k], batch_size, k))
    finally:
        for handle in reversed(held):
            handle.rollback()
        guard.restore()
    return results, curve


def _complete_settings(settings: EvalSettings | None, model: nn.Module, editor: Editor, records: Sequence[EditRecord],
                       pool: InstructionPool | None, instruction: int | None, **values: object) -> EvalSettings:
    base = settings or EvalSettings()
    tasks = list(dict.fromkeys(r.task for r in records))
    text = None
    if pool is not None and instruction is not None and len(tasks) == 1 and tasks[0] in pool.descriptions:
        text = pool.descriptions[tasks[0]][instruction]
    return replace(
        base, task=base.task or ",".join(tasks), method=base.method or ("mend" if isinstance(editor, MENDEditor) else type(editor).__name__),
        model_name=base.model_name or str(getattr(model, "name_or_path", "")), instruction=instruction, instruction_text=text,
        instruction_source=pool.source if pool is not None and instruction is not None else None,
        torch_version=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), **values,
    )


def evaluate(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    editor: Editor,
    records: Sequence[EditRecord],
    pool: InstructionPool | None,
    instruction: int | None,
    batch_size: int = 16,
    sequential: bool = False,
    progress: bool = True,
    *,
    convsent_pairs: int = 2,
    max_length: int | None = None,
    fast: bool = True,
    pack_rows: bool = True,
    settings: EvalSettings | None = None,
    protocol: str = "both",
    answer_stop: str = "none",
    queries: Sequence[str] = gen.QUERY_FORMS,
    generation_batch_size: int = 32,
    judge: gen.Judge | None = None,
    cases_together: int = 16,
) -> EvalReport:
    """Edit each record in turn and score it before and after (DESIGN.md §5); the model ends as it began.

    ``instruction``: description index of ``pool`` wrapping edit/rephrase/portability prompts, or
    None for none. ``batch_size``: most probe rows per forward pass. ``sequential``: keep every edit
    and report the decay of earlier edits. ``fast``: score MEND editors functionally (same numbers,
    no weight writes); ``pack_rows``: and run each case's rows as one packed row (checked against
    padded rows on the first case). ``settings``: run metadata (task, split, ...) to complete and store.
    ``protocol``: teacher_forced, generation or both. ``answer_stop``: what the edit input's answer
    ends with (as the editor was trained; the collator's ``answer_stop``). ``queries``: forms of the
    edit prompt the generation protocol asks (``generation_probes.QUERY_FORMS``), answered in
    batches of ``generation_batch_size``. ``judge``: adds ``gen_reliability_judge``. ``cases_together``:
    MEND's post-edit answers of this many cases decode in one batch (each row with its own edit added by
    hooks; equal to one case at a time up to float rounding; 1: each case's edit written into the model).
    """
    if batch_size < 1 or generation_batch_size < 1:
        raise ValueError(f"batch_size and generation_batch_size must be >= 1, got {batch_size} and {generation_batch_size}")
    if protocol not in PROTOCOL_CHOICES:
        raise ValueError(f"protocol {protocol!r} is not one of {list(PROTOCOL_CHOICES)}")
    if instruction is not None and pool is None:
        raise ValueError("an instruction index was given but no instruction pool")
    if not records:
        raise ValueError("no records to evaluate")
    forms = gen.check_forms(queries)
    start = time.perf_counter()
    device = next(model.parameters()).device
    max_length = max_length or min(getattr(model.config, "max_position_embeddings", None) or MAX_LENGTH_CAP, MAX_LENGTH_CAP)
    collator = Collator(tokenizer, max_length, pool, convsent_pairs=convsent_pairs, answer_stop=answer_stop)
    cases, skipped = _prepare(collator, records, instruction, batch_size, device)
    if not cases:
        raise ValueError(f"none of the {len(records)} records fits max_length={max_length} tokens")
    fast_path = fast and not sequential and isinstance(editor, MENDEditor)
    watch = [w.name for w in editor.weights] if isinstance(editor, MENDEditor) else []
    if sequential and not watch:  # unknown editor: restoring needs a copy of every parameter
        watch = [name for name, _ in model.named_parameters()]
    guard = WeightGuard(model, watch)
    generation = gen.GenerationRun(tokenizer, generation_batch_size, max_length, judge, progress) if protocol != "teacher_forced" else None
    if generation is not None:
        for case in cases:
            case.queries = gen.case_queries(collator, case.record, instruction, forms)
    setup_s = time.perf_counter() - start

    curve: list[SequentialPoint] = []
    run_start = time.perf_counter()
    if generation is not None:
        for case, said in zip(cases, generation.answer_unedited(model, [c.queries for c in cases])):
            case.pre_answers = said
    teacher_forced = protocol != "generation"
    packed = False
    if sequential:
        results, curve = _run_sequential(model, editor, collator, cases, guard, batch_size, generation, teacher_forced, progress)
    else:
        results, packed = _run_single(model, editor, cases, guard, generation, teacher_forced, fast_path, pack_rows, progress,
                                      cases_together)
    run_s = time.perf_counter() - run_start
    per_case_checks = guard.verified
    verify_start = time.perf_counter()
    checked = guard.verify(full=True, where="end of evaluation")
    verify_s = time.perf_counter() - verify_start

    total_s = time.perf_counter() - start
    n = len(results)
    timing = {"setup_s": setup_s, "run_s": run_s, "verify_s": verify_s, "total_s": total_s,
              "cases_per_s": n / run_s if run_s > 0 else float("inf"), "cases_per_s_total": n / total_s}
    if generation is not None:
        timing |= {f"generation_{stage}_s": seconds for stage, seconds in generation.seconds.items()}
    return EvalReport(
        settings=_complete_settings(settings, model, editor, records, pool, instruction, sequential=sequential, batch_size=batch_size,
                                    convsent_pairs=convsent_pairs, max_length=max_length, fast_path=fast_path, packed_rows=packed,
                                    device=str(device), protocol=protocol, answer_stop=answer_stop, queries=forms,
                                    generation_margin=ANSWER_MARGIN if generation is not None else None,
                                    judge=judge.name if judge is not None and generation is not None else None),
        cases=results,
        aggregates=_aggregates(results, ("pre", "post") * teacher_forced + ("gen_pre", "gen_post") * (generation is not None)),
        timing=timing,
        skipped=skipped,
        restoration={"verified": True, "per_case_checks": per_case_checks, "copied_parameters": len(guard.originals),
                     "fingerprinted_parameters": len(guard.digests), "final_full_check_parameters": checked,
                     "mode": _restoration_mode(sequential, fast_path, generation is not None, cases_together > 1)},
        sequential=curve,
    )


def _aggregates(results: Sequence[CaseResult], phases: Sequence[str]) -> dict[str, dict[str, dict[str, MetricSummary]]]:
    """task -> phase -> metric -> summary, with its protocol and 95 % bootstrap interval over the task's cases."""
    by_phase = {phase: aggregate(((c.task, getattr(c, phase)) for c in results), PHASES[phase], intervals=True) for phase in phases}
    return {task: {phase: by_phase[phase].get(task, {}) for phase in phases} for task in dict.fromkeys(c.task for c in results)}


def _restoration_mode(sequential: bool, fast_path: bool, generation: bool, together: bool = False) -> str:
    if sequential:
        return "sequential: kept, restored at the end"
    if fast_path and together:
        return "functional (weights never written; post-edit answers decoded with per-row weight updates)"
    if fast_path:
        return "functional scoring; edited weights written for generation, rolled back per case" if generation else \
            "functional (weights never written)"
    return "in place, rolled back per case"
