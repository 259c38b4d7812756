"""Many edits at once and in sequence (issue "Many edits"): batch-editing and lifelong studies, both protocols.

``batch_study``: for each N, the first N cases are edited in **one** call (the editor's aggregation:
MEND sums the per-edit updates, ``least_squares`` solves for one shift, DESIGN.md §9), then every
case is scored on the edited model: teacher-forced reliability / generalization (answer-token
accuracy) and locality (answer-token argmax unchanged), and under generation exact match of the
greedy answer (wrapped prompt, rephrases) and generation locality (answer unchanged). Seconds per
edit are the edit call's wall time over N. The weights are restored bit for bit after each N (checked).

``sequential_study``: edits applied one call after another (``batch`` cases per call); after 1, 2,
4, ..., T edits, the reliability of every edit so far (both protocols), the locality of a fixed
probe set, and capability retention: the perplexity of a fixed held-out text sample (the locality
prompts and answers of cases not edited). Rolled back at the end, bit for bit (checked).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from instructedit.editors.aggregation import KeyMemory, remembering
from instructedit.editors.base import Editor, OutlierEdits, SequentialWeightEdits, keep_in_sequence, scaled_step_sizes
from instructedit.editors.learned import AUTO_AS_SINGLE, apply_in_rounds, check_rounds, check_sample_weight, schedule_for
from instructedit.editors.preservation import continuation_batch, key_memory, own_answers  # noqa: F401 (re-exported)
from instructedit.evaluation.generation import bootstrap_ci
from instructedit.evaluation.generation_probes import answer_all, answer_scores, case_queries
from instructedit.evaluation.guard import WeightGuard
from instructedit.evaluation.packing import probe_scores, scored_logits
from instructedit.evaluation.probes import case_probes
from instructedit.evaluation.runner import sequential_schedule
from instructedit.losses import masked_nll
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator

logger = logging.getLogger(__name__)

FAMILIES = ("reliability", "generalization", "locality")
OTHER_FORMS = ("gen_reliability_plain", "gen_reliability_chat")  # the edit prompt asked bare / as a chat turn
GEN_BATCH = 32


@dataclass
class _Probes:
    """The teacher-forced probes of some cases: (case, family, prompt, answer), and their pre-edit argmax ids."""

    items: list[tuple[int, str, str, str]]
    pre_argmax: list[torch.Tensor] | None = None

    def upto(self, n: int) -> _Probes:
        """The probes of the first ``n`` cases (items are in case order), with their pre-edit argmax ids."""
        kept = [item for item in self.items if item[0] < n]
        return _Probes(kept, self.pre_argmax[: len(kept)])

    def of(self, case: int) -> _Probes:
        """The probes of one case, numbered as case 0, with their pre-edit argmax ids."""
        index = [i for i, item in enumerate(self.items) if item[0] == case]
        return _Probes([(0, *self.items[i][1:]) for i in index], [self.pre_argmax[i] for i in index])


def _probes(collator: Collator, records: Sequence[EditRecord], instruction: int | None) -> _Probes:
    """The runner's probes of each case (``case_probes``) in the studied families."""
    return _Probes([(c, p.family, p.prompt, p.answer) for c, r in enumerate(records)
                    for p in case_probes(collator, r, instruction) if p.family in FAMILIES])


def _score(model: nn.Module, collator: Collator, probes: _Probes, batch_size: int) -> list[dict[str, list[float]]]:
    """Per case, per family: answer-token accuracy (reliability, generalization) or unchanged share (locality, against
    ``probes.pre_argmax``); stores the argmax ids as ``pre_argmax`` when there are none yet."""
    acc, same, argmax = probe_scores(model, collator, [(p, a) for _, _, p, a in probes.items], probes.pre_argmax, batch_size)
    if probes.pre_argmax is None:
        probes.pre_argmax = argmax
    per_case: dict[int, dict[str, list[float]]] = {}
    for (c, family, _, _), a, u in zip(probes.items, acc, same, strict=True):
        per_case.setdefault(c, {}).setdefault(family, []).append(u if family == "locality" else a)
    return [per_case.get(c, {}) for c in range(max((c for c, *_ in probes.items), default=-1) + 1)]


def _summary(values: Sequence[float], protocol: str) -> dict[str, float | int | str] | None:
    return {**bootstrap_ci(values).to_dict(), "protocol": protocol} if values else None


def _aggregate(tf: Sequence[dict[str, list[float]]], gen: Sequence[dict[str, float]] | None) -> dict[str, dict | None]:
    """Mean over cases (each case's mean over its probes) with 95 % intervals, per family and protocol; where the edit
    prompt was also asked bare or as a chat turn, ``gen_reliability_plain`` / ``_chat`` too."""
    out: dict[str, dict | None] = {}
    for family in FAMILIES:
        out[family] = _summary([sum(v[family]) / len(v[family]) for v in tf if v.get(family)], "teacher_forced")
    if gen is not None:
        for family in FAMILIES:
            key = f"gen_{family}"
            out[key] = _summary([g[key] for g in gen if key in g], "generation")
        for key in OTHER_FORMS:
            if any(key in g for g in gen):
                out[key] = _summary([g[key] for g in gen if key in g], "generation")
    return out


def _kept(point: dict, single: dict) -> dict[str, float | None]:
    """Reliability of an N-edit call over that of the same N cases edited one at a time, per protocol (None: no single value)."""
    out: dict[str, float | None] = {}
    for key in ("reliability", "gen_reliability"):
        if point.get(key) is not None and single.get(key) is not None:
            out[key] = point[key]["mean"] / single[key]["mean"] if single[key]["mean"] > 0 else None
    return out


class _Generation:
    """Greedy answers (the edit prompt in ``forms``, rephrases, locality) of some cases, before and after edits."""

    def __init__(self, model: nn.Module, tokenizer: PreTrainedTokenizerBase, collator: Collator, records: Sequence[EditRecord],
                 instruction: int | None, families: Collection[str] = FAMILIES, forms: Sequence[str] = ("wrapped",)) -> None:
        self.model, self.tokenizer = model, tokenizer
        self.queries = [[q for q in case_queries(collator, r, instruction, forms) if q.family in families] for r in records]
        self.pre = answer_all(model, tokenizer, self.queries, GEN_BATCH, collator.max_length)

    def scores(self, cases: Sequence[int] | None = None) -> list[dict[str, float]]:
        cases = range(len(self.queries)) if cases is None else cases
        queries = [self.queries[c] for c in cases]
        post = answer_all(self.model, self.tokenizer, queries, GEN_BATCH, None)
        return [answer_scores(q, a, reference=self.pre[c]) for c, q, a in zip(cases, queries, post, strict=True)]


def _edit_batch(collator: Collator, records: Sequence[EditRecord], instruction: int | None, forms: Sequence[str] | None = None):
    """The records' edit inputs, each in ``forms`` (default: ``collator.edit_forms``)."""
    pairs = [pair for r in records for pair in collator.edit_pairs(r, instruction, forms)]
    return collator.qa_batch(pairs, "edit inputs", stop=True)


def batch_study(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: Editor, collator: Collator, records: Sequence[EditRecord],
                instruction: int | None, sizes: Sequence[int], generation: bool = True, batch_size: int = 16,
                progress: bool = True, memory: KeyMemory | None = None, singles: bool = False, rounds: int | str = 1,
                sample_weight: float | None = None, unedited: Sequence[EditRecord] = (), single_rounds: int = 1,
                many_edit_scale: float = 1.0, scored: Mapping[int, dict] | None = None,
                on_point: Callable[[dict], None] | None = None, ask_forms: Sequence[str] = ("wrapped",),
                many_forms: Sequence[str] | None = None) -> dict:
    """Quality and cost of N edits in one call, per N in ``sizes`` (the first N of ``records``); see the module docstring.

    ``memory``: every N-edit call solves with its keys held still (a least-squares editor and a preservation sample; give
    it ``past_weight`` 0: the calls are rolled back, so no earlier edit stays). The single edits are made with it only
    when the editor has no preservation sample of its own (the memory is then the editor's sample in this study); an
    editor with one (``calibrate --preserve``) makes them with its own, as it makes them outside the study.
    ``singles``: also edit each of the first
    max(``sizes``) cases alone and score it the same way (``single``): the reference "N edits keep X % of the
    single-edit reliability" is measured against; each point then also holds the single edits of its own N cases
    (``single_same_cases``) and its reliability over theirs (``kept_of_single``, per protocol). ``rounds``: every N-edit
    call is made in that many rounds (``LearnedEditor.apply``; "auto": as ``editors.learned.schedule_for`` chooses for
    its N, with the step sizes × ``many_edit_scale`` where its many-edit rule applies: the editor's
    ``queries.many_edit_scale``); ``sample_weight``: in those calls the editor's own preservation sample counts as that
    many tokens; each point records the three. The single edits are made as the editor makes them (its calibrated weight, in ``single_rounds`` rounds:
    the editor's ``queries.edit_rounds``; also what "auto" gives calls of up to 16 edits).
    ``unedited``: records no call edits whose locality prompts every N-edit call is also scored on (each point's
    ``unedited``: teacher-forced and generation locality over them): a larger locality sample than the N cases' own.
    ``on_point``: handed each N's point as soon as it is scored (to save it); ``scored``: points by N that an interrupted
    run of the same study scored, taken as they are instead of being made again (the single edits are made again).
    ``ask_forms``: the forms the edit prompt is asked in under generation ("wrapped": ``gen_reliability``; "plain", "chat":
    ``gen_reliability_plain`` / ``_chat``); the edits are made in ``collator.edit_forms``, in a call of more than 16
    (``AUTO_AS_SINGLE``) in ``many_forms`` (default: the same; the editor's ``queries.many_edit_forms``).
    """
    sizes = sorted(set(sizes))
    if not sizes or sizes[0] < 1 or sizes[-1] > len(records):
        raise ValueError(f"sizes must be between 1 and the {len(records)} records given, got {sizes}")
    schedules = {n: schedule_for(editor, n, rounds, sample_weight, single_rounds, many_edit_scale)
                 for n in sizes}  # before any scoring: bad values fail here
    check_rounds(editor, single_rounds)
    for n_rounds, weight, _ in schedules.values():
        check_rounds(editor, n_rounds)
        check_sample_weight(editor, weight)
    device = next(model.parameters()).device
    records = list(records[: sizes[-1]])
    probes = _probes(collator, records, instruction)
    pre = _score(model, collator, probes, batch_size)
    asker = _Generation(model, tokenizer, collator, records, instruction, forms=ask_forms) if generation else None
    others = _Probes([item for item in _probes(collator, unedited, instruction).items if item[1] == "locality"]) if unedited else None
    if others is not None:
        if not others.items:
            raise ValueError(f"the {len(unedited)} unedited records have no locality prompts to score")
        _score(model, collator, others, batch_size)  # their pre-edit argmax ids
    others_asker = _Generation(model, tokenizer, collator, unedited, instruction, ("locality",)) if others is not None and generation else None
    guard = WeightGuard(model)

    def unedited_locality() -> dict[str, dict | None]:
        """Locality over the unedited records' prompts on the model as it is now (both protocols)."""
        scores = _aggregate(_score(model, collator, others, batch_size), others_asker.scores() if others_asker is not None else None)
        return {"n_cases": len(unedited), "n_prompts": len(others.items),
                **{k: v for k, v in scores.items() if k in ("locality", "gen_locality")}}

    def edited(lo: int, hi: int, scored: _Probes, rounds: int = 1, sample_weight: float | None = None, step_scale: float = 1.0,
               also: dict | None = None) -> tuple[float, list[dict[str, list[float]]], list[dict[str, float]] | None, int]:
        """Cases lo..hi-1 edited in one call (of ``rounds`` rounds) and scored (``scored``: their probes); (seconds of the
        call, teacher-forced scores, generation scores, rounds made), at the step sizes × ``step_scale``. Rolled back afterwards. ``also``: receives the
        unedited records' locality (``unedited``) before the rollback."""
        batch = _edit_batch(collator, records[lo:hi], instruction, many_forms if hi - lo > AUTO_AS_SINGLE else None).to(device)
        start = time.perf_counter()
        handle = apply_in_rounds(editor, model, batch, rounds, sample_weight, step_scale=step_scale)
        seconds = time.perf_counter() - start
        try:
            scores = _score(model, collator, scored, batch_size), asker.scores(range(lo, hi)) if asker is not None else None
            if also is not None and others is not None:
                also["unedited"] = unedited_locality()
            return seconds, *scores, getattr(handle, "rounds_made", 1)
        finally:
            handle.rollback()

    # one untimed edit first: the process's one-time work (kernel choices timed once per process, memory touched for the
    # first time) is not charged to the first timed call (it made N = 1 look 6-8× dearer per edit than it is: 1.29 s against
    # 0.17-0.2 s on the default model); outside the key memory, which would remember it
    apply_in_rounds(editor, model, _edit_batch(collator, records[:1], instruction).to(device), 1, None).rollback()
    guard.verify(full=True, where="after the untimed warm-up edit")
    points = []
    out: dict = {"pre": _aggregate(pre, None)}
    with remembering(editor, memory):
        for n in tqdm(sizes, desc="batch sizes", disable=not progress):
            if scored and n in scored:
                points.append(dict(scored[n]))
                continue
            also: dict = {}
            seconds, tf, gen, made = edited(0, n, probes.upto(n), *schedules[n], also=also)
            guard.verify(full=True, where=f"after the {n}-edit call")
            points.append({"n_edits": n, "rounds": schedules[n].rounds, "rounds_made": made, "sample_weight": schedules[n].sample_weight,
                           "step_scale": schedules[n].step_scale, "seconds": seconds,
                           "seconds_per_edit": seconds / n, **_aggregate(tf, gen), **also})
            if on_point is not None:
                on_point(points[-1])
    if singles:  # as the editor makes them: its own sample if it has one, else the study's memory as its sample
        tf, gen, total = [], [] if asker is not None else None, 0.0
        with remembering(editor, memory if getattr(editor, "preservation", None) is None else None):
            for c in tqdm(range(len(records)), desc="single edits", unit="edit", disable=not progress):
                seconds, case_tf, case_gen, _ = edited(c, c + 1, probes.of(c), single_rounds)
                guard.verify(where=f"after single edit {c}")
                total += seconds
                tf.extend(case_tf)
                if gen is not None:
                    gen.extend(case_gen)
        guard.verify(full=True, where="after the single edits")
        out["single"] = {"n_edits": 1, "n_cases": len(records), "rounds": single_rounds, "seconds_per_edit": total / len(records),
                         **_aggregate(tf, gen)}
        for p in points:  # the N-edit call against the single edits of the same N cases
            n = p["n_edits"]
            p["single_same_cases"] = _aggregate(tf[:n], None if gen is None else gen[:n])
            p["kept_of_single"] = _kept(p, p["single_same_cases"])
    out["points"] = points
    return out


def distinct_subjects(records: Sequence[EditRecord]) -> list[EditRecord]:
    """The first record of each subject (its prompt where it names none), in order: edits of one call that share a subject
    can ask for contradictory answers to one question (ZsRE's test file: 43 of the first 256 records' 181 subjects have
    two or more targets), which no shift can give at once."""
    seen: set[str] = set()
    out = []
    for r in records:
        key = (r.subject or r.prompt).strip().lower()
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def locality_texts(records: Sequence[EditRecord]) -> list[tuple[str, str]]:
    """The (prompt, answer) pairs of the records' locality prompts: the perplexity and preservation samples."""
    return [(q.prompt, q.answer) for r in records for q in r.locality]


def without_measured(texts: list[tuple[str, str]], measured: set[tuple[str, str]], source: str, by: str) -> list[tuple[str, str]]:
    """A preservation sample's (prompt, answer) ``texts`` (from ``source``, e.g. "--preserve-data FILE") without those
    ``by`` (the study, this run, the calibration) also scores (holding them still would flatter the score): left out with a
    warning; all of them: an error."""
    kept = [t for t in texts if t not in measured]
    if not kept:
        raise ValueError(f"{source}: all {len(texts)} of its texts are among those {by} measures; "
                         "preserve other records (--preserve-start, or another file)")
    if len(kept) < len(texts):
        logger.warning("%s: left out %d of its %d texts that %s also measures (e.g. %r)",
                       source, len(texts) - len(kept), len(texts), by, next(t for t in texts if t in measured)[0])
    return kept


def perplexity(model: nn.Module, collator: Collator, texts: Sequence[tuple[str, str]], batch_size: int = 16) -> float:
    """exp of the mean answer-token NLL of (prompt, continuation) pairs: the capability-retention sample."""
    device = next(model.parameters()).device
    total, tokens = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(texts), batch_size):
            batch = collator.qa_batch(list(texts[start : start + batch_size])).to(device)
            logits = scored_logits(model, batch)
            count = int(batch.label_mask.sum())
            total += float(masked_nll(logits, batch.labels[batch.label_mask])) * count
            tokens += count
    return math.exp(total / tokens)


def sequential_study(model: nn.Module, tokenizer: PreTrainedTokenizerBase, editor: Editor, collator: Collator,
                     records: Sequence[EditRecord], held_out: Sequence[EditRecord], instruction: int | None, edits: int,
                     batch: int = 1, generation: bool = True, batch_size: int = 16, progress: bool = True,
                     on_point: Callable[[dict], None] | None = None, scored: Collection[int] = (),
                     memory: KeyMemory | None = None, step_scale: float = 1.0, forms: Sequence[str] | None = None,
                     ask_forms: Sequence[str] = ("wrapped",)) -> dict:
    """Lifelong editing: ``edits`` cases edited ``batch`` per call, scored after 1, 2, 4, ... and ``edits``
    (``sequential_schedule``); see the module docstring. Every call is made in one round at the editor's step sizes ×
    ``step_scale`` (the editor's ``queries.many_edit_scale``, as ``apply_sequential`` makes them), in ``forms`` (default
    ``collator.edit_forms``; the editor's ``queries.many_edit_forms``); ``ask_forms`` as ``batch_study``'s.

    ``held_out``: cases never edited; their locality prompt + answer form the perplexity sample.
    ``on_point``: called with each scored point (to save partial results of a long run).
    ``scored``: edit counts already scored by an interrupted run of the same study (resume): the edits are
    replayed (the weights were not saved; edits are deterministic) but those points are not scored again.
    """
    if edits < 1 or edits > len(records):
        raise ValueError(f"edits must be between 1 and the {len(records)} records given, got {edits}")
    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    device = next(model.parameters()).device
    records = list(records[:edits])
    texts = locality_texts(held_out)
    if not texts:
        raise ValueError("the held-out cases have no locality prompts to measure perplexity on")
    probes = _probes(collator, records, instruction)
    _score(model, collator, probes, batch_size)  # pre-edit argmax ids, for locality
    asker = _Generation(model, tokenizer, collator, records, instruction, forms=ask_forms) if generation else None
    guard = WeightGuard(model)
    base_ppl = perplexity(model, collator, texts, batch_size)
    # Weight edits are kept as ONE sequence holding one copy of the original weights (not one copy per call:
    # 1,000 MEND edits of the default model would hold 30 GiB); editors that add hooks keep a handle per call.
    weights, handles, points, done = SequentialWeightEdits(model, editor, step_scale, memory), [], [], 0
    refused: list[int] = []  # edits not kept: their update would have wrecked the model (``OutlierEdits``)
    outliers = OutlierEdits()
    marks = sequential_schedule(edits)
    bar = tqdm(total=edits, desc="sequential edits", disable=not progress)
    try:
        with remembering(editor, memory), scaled_step_sizes(editor, step_scale):
            while done < edits:
                upto = min(done + batch, edits, next(m for m in marks if m > done))
                edit_batch = _edit_batch(collator, records[done:upto], instruction, forms).to(device)
                if not keep_in_sequence(weights, handles, editor.apply(model, edit_batch), edit_batch, outliers,
                                        where=f"edit call {done + 1}-{upto} of {edits}", memory=memory):
                    refused += range(done, upto)  # scored like every other edit: the model does not hold them
                bar.update(upto - done)
                done = upto
                if done in marks and done not in scored:
                    tf = _score(model, collator, probes.upto(done), batch_size)
                    gen = asker.scores(range(done)) if asker is not None else None
                    ppl = perplexity(model, collator, texts, batch_size)
                    point = {"n_edits": done, **_aggregate(tf, gen), "perplexity": ppl, "perplexity_ratio": ppl / base_ppl,
                             "refused": len(refused)}
                    points.append(point)
                    if on_point is not None:
                        on_point(point)
    finally:
        bar.close()
        for handle in reversed(handles):
            handle.rollback()
        weights.rollback()
    guard.verify(full=True, where=f"after rolling back the sequential edit calls of {done} edits")
    return {"base_perplexity": base_ppl, "perplexity_texts": len(texts), "batch": batch, "step_scale": step_scale, "points": points,
            "refused": refused, "rolled_back_bitwise": True}
