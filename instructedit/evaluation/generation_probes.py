"""The generation protocol per case (DESIGN.md §5): the queries a case asks, their greedy answers before and after the edit, the scores.

A case asks the edit prompt in up to three forms (``QUERY_FORMS``: instruction-wrapped as edited,
plain, and as the user turn of the chat template), each rephrase and portability prompt wrapped
like its teacher-forced probe, and each locality prompt raw. Per case and query family the scores
are exact match (``gen_reliability``, ...) and token F1 (``gen_reliability_f1``, ...) of the first
line of the answer against the expected answer; ``gen_locality`` is the share of locality prompts
whose post-edit answer equals the pre-edit one (after normalization). ConvSent has no single
answer to match and asks nothing.

In-frame locality (``case_queries(in_frame=...)``): another record's question asked in each form the edit prompt is
asked in, in the edit's frame (wrapped in its instruction), keeps its pre-edit answer (``gen_locality_in_frame``,
``_plain``, ``_chat``); ``gen_in_frame_target`` (``_plain``, ``_chat``) is the share of those answers that now say the
edit's target. The paper's locality asks raw prompts only; an edit can change the answers to other questions asked in its
frame far more (results/analysis/in-frame-locality/).

Same-relation locality (``case_queries(same_relation=...)``): the edit's question with its subject swapped for other
entities (``evaluation.runner``'s ``same_relation`` probes), asked in each form in the edit's frame, keeps its pre-edit
answer (``gen_locality_same_relation``, ``_plain``, ``_chat``); ``gen_same_relation_target`` is the share that now say the
edit's target. These are the questions an edit leaks into most (results/analysis/in-frame-locality/relation/).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from torch import nn
from transformers import PreTrainedTokenizerBase

from instructedit.evaluation.before_after import Seed, greedy_before_after
from instructedit.evaluation.generation import (
    ANSWER_MARGIN, answer_budget, exact_match, first_line, greedy_generate, in_frame_budget, ngram_entropy, same_answer, stop_token_ids,
    token_f1,
)
from instructedit.evaluation.row_edits import Updates
from instructedit.models.split import SplitModel
from instructedit.records import EditRecord
from instructedit.tasks.collate import Collator, chat_query

logger = logging.getLogger(__name__)

FLUENCY_TOKENS = 48  # length of a ConvSent response generated for the fluency score
QUERY_FORMS = ("wrapped", "plain", "chat")  # forms of the edit prompt; rephrases/portability are wrapped, locality raw
PREFIX = "gen_"
JUDGE_METRIC = "gen_reliability_judge"
# another question asked in the edit's frame (family): the metric of its answers that now say the edit's target
SAYS_TARGET = {"locality_in_frame": "in_frame_target", "locality_same_relation": "same_relation_target"}


@dataclass(frozen=True)
class Query:
    """One question of a case: its family, form, sub-key, the raw question, the prompt as fed, the expected answer and token budget."""

    family: str  # reliability | generalization | portability | locality | locality_in_frame | locality_same_relation
    form: str  # wrapped | plain | chat | raw
    kind: str
    question: str
    prompt: str
    target: str  # locality_in_frame, locality_same_relation: the edit's target (what the other question should not now say)
    budget: int

    @property
    def metric(self) -> str:
        """Per-case metric key: gen_reliability, gen_reliability_plain, gen_reliability_chat, gen_generalization, ..."""
        return PREFIX + self.family + (f"_{self.form}" if self.form in ("plain", "chat") else "")


class Judge(Protocol):
    """Says whether an answer states the target: 1.0 / 0.0, or None when it could not tell (``judge.LLMJudge``)."""

    name: str

    def verdict(self, question: str, target: str, answer: str) -> float | None:
        ...


def check_forms(forms: Sequence[str]) -> list[str]:
    """The query forms as a list; an unknown one raises naming the valid ones."""
    bad = [f for f in forms if f not in QUERY_FORMS]
    if bad:
        raise ValueError(f"unknown query form(s) {bad}; valid forms: {list(QUERY_FORMS)}")
    return list(dict.fromkeys(forms))


def case_queries(collator: Collator, record: EditRecord, instruction: int | None, forms: Sequence[str],
                 margin: int = ANSWER_MARGIN, in_frame: EditRecord | None = None, same_relation: Sequence[str] = ()) -> list[Query]:
    """Every query of a record (none for ConvSent), each with its token budget; ``in_frame``: another record, whose
    question is also asked in each form the edit prompt is, in the record's frame (in-frame locality); ``same_relation``:
    questions of the edit's relation about other entities, asked likewise (same-relation locality).

    'plain' is asked only with an instruction (without one it is the 'wrapped' query); 'chat' only
    when the tokenizer has a chat template. A query without room for an answer in
    ``collator.max_length`` is left out; one with little room gets a smaller budget.
    """
    if record.convsent is not None:  # no single answer: the response is scored for fluency only
        prompt = collator.wrap(record, record.prompt, instruction) if "wrapped" in forms else record.prompt
        budget = min(FLUENCY_TOKENS, collator.max_length - len(collator.tokenizer(prompt)["input_ids"]))
        return [Query("fluency", "wrapped", "default", record.prompt, prompt, record.target_new, budget)] if budget >= 1 else []
    tok = collator.tokenizer
    target = record.target_new
    asked: list[tuple[str, str, str, str, str, str]] = []  # family, form, kind, question, prompt, target
    if "wrapped" in forms:
        asked.append(("reliability", "wrapped", "default", record.prompt, collator.wrap(record, record.prompt, instruction), target))
    if "plain" in forms and instruction is not None:
        asked.append(("reliability", "plain", "default", record.prompt, record.prompt, target))
    chat = chat_query(tok, record.prompt) if "chat" in forms else None
    if chat is not None:
        asked.append(("reliability", "chat", "default", record.prompt, chat, target))
    # (family, form, kind, question, prompt, expected, its budget: ``in_frame_budget``)
    framed = [("locality_in_frame", form, "default", in_frame.prompt, collator.form_prompt(record, form, instruction, in_frame.prompt),
               target, in_frame_budget(tok, in_frame.target_new, target, margin)) for _, form, *_ in asked] if in_frame is not None else []
    framed += [("locality_same_relation", form, "default", question, collator.form_prompt(record, form, instruction, question),
                target, answer_budget(tok, target, margin)) for question in same_relation for _, form, *_ in asked]
    asked += [("generalization", "wrapped", "default", r, collator.wrap(record, r, instruction), target) for r in record.rephrase]
    asked += [("portability", "wrapped", q.kind, q.prompt, collator.wrap(record, q.prompt, instruction), q.answer) for q in record.portability]
    asked += [("locality", "raw", q.kind, q.prompt, q.prompt, q.answer) for q in record.locality]
    queries = []
    for family, form, kind, question, prompt, expected, *sized in [*asked, *framed]:
        room = collator.max_length - len(tok(prompt)["input_ids"])
        budget = min(sized[0] if sized else answer_budget(tok, expected, margin), room)
        if budget < 1:
            logger.debug("%s: %s query left out, no room for an answer in %d tokens", record.source, family, collator.max_length)
            continue
        queries.append(Query(family, form, kind, question, prompt, expected, budget))
    return queries


def in_frame_neighbours(records: Sequence[EditRecord]) -> list[int]:
    """Per record, the index of the record whose question it asks in its own frame (``case_queries(in_frame=...)``,
    ``generation_check.generation_scores(in_frame=True)``): the next one of the same task, cyclically; the next one of any
    task where its task has no other."""
    n = len(records)
    return [next((k for k in ((i + step) % n for step in range(1, n)) if records[k].task == record.task), (i + 1) % n)
            for i, record in enumerate(records)]


def answer(model: nn.Module, tokenizer: PreTrainedTokenizerBase, queries: Sequence[Query], batch_size: int,
           max_length: int | None = None, progress: str | None = None) -> list[str]:
    """Greedy answers (raw continuations) to ``queries``, in one batched call (``progress``: a bar with this label)."""
    if not queries:
        return []
    return greedy_generate(model, tokenizer, [q.prompt for q in queries], [q.budget for q in queries], batch_size, max_length,
                           progress=progress)


def answer_all(model: nn.Module, tokenizer: PreTrainedTokenizerBase, per_case: Sequence[Sequence[Query]], batch_size: int,
               max_length: int | None = None, progress: str | None = None) -> list[list[str]]:
    """Answers to every case's queries, generated together (the unedited model is the same for all), split back per case."""
    return _per_case(answer(model, tokenizer, [q for queries in per_case for q in queries], batch_size, max_length, progress), per_case)


def _per_case(flat: Sequence[str], per_case: Sequence[Sequence[Query]]) -> list[list[str]]:
    """``flat`` (answers to every case's queries in order) split back per case."""
    out, start = [], 0
    for queries in per_case:
        out.append(list(flat[start : start + len(queries)]))
        start += len(queries)
    return out


def answer_scores(queries: Sequence[Query], answers: Sequence[str], reference: Sequence[str] | None = None) -> dict[str, float]:
    """One case's generation metrics: exact match (``metric``) and token F1 (``metric_f1``) per family and form,
    ``family/kind`` exact match for portability; with the pre-edit ``reference`` answers, ``gen_locality`` (and per kind)."""
    groups: dict[str, list[float]] = {}
    for query, raw, before in zip(queries, answers, reference if reference is not None else [None] * len(queries), strict=True):
        said = first_line(raw)
        if query.family == "fluency":  # ConvSent: n-gram entropy of the response (reported ×100, as the paper does)
            groups.setdefault(query.metric, []).append(ngram_entropy(raw))
            continue
        if query.family == "locality" or query.family in SAYS_TARGET:
            if before is None:  # locality compares post- with pre-edit answers: no pre-edit value
                continue
            same = float(same_answer(said, before))
            groups.setdefault(query.metric, []).append(same)
            if query.family == "locality":
                groups.setdefault(f"{query.metric}/{query.kind}", []).append(same)
            else:  # another question asked in the edit's frame: does it now say the edit's target? (per form, as the metric)
                groups.setdefault(query.metric.replace(query.family, SAYS_TARGET[query.family]), []).append(exact_match(said, query.target))
            continue
        match = exact_match(said, query.target)
        groups.setdefault(query.metric, []).append(match)
        groups.setdefault(f"{query.metric}_f1", []).append(token_f1(said, query.target))
        if query.family == "portability":
            groups.setdefault(f"{query.metric}/{query.kind}", []).append(match)
    return {key: sum(v) / len(v) for key, v in groups.items()}


def judge_scores(judge: Judge, queries: Sequence[Query], answers: Sequence[str]) -> dict[str, float]:
    """``gen_reliability_judge``: the judge's verdict on the answer to the wrapped edit prompt (absent if it could not tell)."""
    for query, raw in zip(queries, answers, strict=True):
        if query.family == "reliability" and query.form == "wrapped":
            verdict = judge.verdict(query.question, query.target, first_line(raw))
            return {} if verdict is None else {JUDGE_METRIC: verdict}
    return {}


def answer_log(queries: Sequence[Query], pre: Sequence[str], post: Sequence[str]) -> list[dict[str, str]]:
    """What the model said, per query: the raw question, expected answer, pre/post first line and raw text."""
    return [
        {"family": q.family, "form": q.form, "kind": q.kind, "question": q.question, "target": q.target,
         "pre": first_line(a), "post": first_line(b), "pre_text": a, "post_text": b}
        for q, a, b in zip(queries, pre, post, strict=True)
    ]


@dataclass
class GenerationRun:
    """The generation protocol within one evaluation: how to ask, the optional judge, and the seconds spent per stage."""

    tokenizer: PreTrainedTokenizerBase
    batch_size: int
    max_length: int | None = None
    judge: Judge | None = None
    progress: bool = False
    seconds: dict[str, float] = field(default_factory=lambda: {"pre": 0.0, "post": 0.0, "before_after": 0.0, "judge": 0.0})

    def answer_unedited(self, model: nn.Module, per_case: Sequence[Sequence[Query]]) -> list[list[str]]:
        """Every case's pre-edit answers, in large batches."""
        logger.info("answering %d pre-edit queries of %d cases", sum(len(q) for q in per_case), len(per_case))
        start = time.perf_counter()
        out = answer_all(model, self.tokenizer, per_case, self.batch_size, self.max_length, "pre-edit answers" if self.progress else None)
        self.seconds["pre"] += time.perf_counter() - start
        return out

    def answer_edited(self, model: nn.Module, queries: Sequence[Query]) -> list[str]:
        """One case's post-edit answers (its edit is in the model), in one batched call."""
        start = time.perf_counter()
        out = answer(model, self.tokenizer, queries, self.batch_size, self.max_length)
        self.seconds["post"] += time.perf_counter() - start
        return out

    @property
    def stop_ids(self) -> set[int]:
        """Token ids that end an answer once it has begun: those holding a newline, and EOS."""
        newline, _ = stop_token_ids(self.tokenizer)
        return set(newline.tolist()) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())

    def answer_before_after(self, model: nn.Module, split: SplitModel, per_case: Sequence[Sequence[Query]], updates: Sequence[Updates],
                            transposed: Mapping[str, bool],
                            seeds: Sequence[Sequence[tuple[Seed, Seed] | None] | None] | None = None) -> tuple[list[list[str]], list[list[str]]]:
        """Pre- and post-edit answers of several cases, decoded together from one prefill per batch
        (``before_after``): each post-edit row with its own case's update (``row_edits``). ``seeds``: per case, None
        or per query its seeds (``before_after.Seed``): those queries are not prefilled."""
        start = time.perf_counter()
        flat = [q for queries in per_case for q in queries]
        owner = [c for c, queries in enumerate(per_case) for _ in queries]
        flat_seeds = None
        if seeds is not None:
            flat_seeds = [s for queries, case in zip(per_case, seeds, strict=True) for s in (case or [None] * len(queries))]
        before, (after,) = greedy_before_after(model, self.tokenizer, split, [q.prompt for q in flat], [q.budget for q in flat],
                                               lambda variant, i: updates[owner[i]], transposed, 1, self.batch_size, self.max_length,
                                               seeds=flat_seeds)
        self.seconds["before_after"] += time.perf_counter() - start
        return _per_case(before, per_case), _per_case(after, per_case)

    def case_result(self, queries: Sequence[Query], pre: Sequence[str],
                    post: Sequence[str]) -> tuple[dict[str, float], dict[str, float], list[dict[str, str]]]:
        """(pre-edit metrics, post-edit metrics, answer log) of one case; the judge's verdicts join the metrics."""
        before, after = answer_scores(queries, pre), answer_scores(queries, post, reference=pre)
        if self.judge is not None:
            start = time.perf_counter()
            before |= judge_scores(self.judge, queries, pre)
            after |= judge_scores(self.judge, queries, post)
            self.seconds["judge"] += time.perf_counter() - start
        return before, after, answer_log(queries, pre, post)
