"""Evaluation metrics (DESIGN.md §5) as pure functions: per-probe scores, per-case family means, per-task aggregates.

Every probe is teacher-forced: ``logits`` (n_positions, vocab) are those at the labelled answer
positions of a padded batch, ``targets`` (n_positions,) the gold answer tokens and ``rows``
(n_positions,) the batch row (probe) each position belongs to. A probe's score is in [0, 1]; a
case's score for a probe family is the mean over its probes of that family (and ``family/kind``
the mean over its probes of that kind); a task's score is the mean over the cases that have the
family, reported with that number of cases ``n``. ``aggregate`` serves both protocols: the
generation protocol's per-case scores (``generation_probes``) are averaged the same way, and every
summary says which protocol it belongs to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from instructedit.evaluation.generation import bootstrap_ci
from instructedit.losses import per_row_mean, token_accuracy

# Paper names: reliability = rewrite accuracy, generalization = rephrase accuracy.
FAMILIES = ("reliability", "generalization", "locality", "portability")
SUBKEY_FAMILIES = ("locality", "portability")  # sources name sub-keys (QAItem.kind) for these
MARGIN = "sentiment_margin"


def answer_accuracy(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Share of answer tokens whose argmax is the gold token, per probe -> (n_rows,) in [0, 1]."""
    return token_accuracy(logits, targets, rows, n_rows)


def unchanged_tokens(pre_argmax: torch.Tensor, post_argmax: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Locality: share of answer tokens whose argmax the edit left unchanged, per probe -> (n_rows,).

    Takes argmax ids, not logits, so the pre-edit side can be stored compactly (sequential
    editing); on logits it equals ``losses.unchanged_share``. Not an accuracy against gold.
    """
    return per_row_mean(pre_argmax == post_argmax, rows, n_rows)


def mean_logprob(logits: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int) -> torch.Tensor:
    """Length-normalized log-likelihood of each probe's answer: mean over its tokens of log p(gold)."""
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, targets[:, None]).squeeze(-1)
    return per_row_mean(logp, rows, n_rows)


def sentiment_margin(logprobs: Sequence[float], is_target: Sequence[bool]) -> float | None:
    """ConvSent: mean log p(target-sentiment responses) - mean log p(opposite responses).

    ``logprobs`` are per-response values from ``mean_logprob``; None when either side is empty.
    """
    target = [lp for lp, t in zip(logprobs, is_target, strict=True) if t]
    opposite = [lp for lp, t in zip(logprobs, is_target, strict=True) if not t]
    if not target or not opposite:
        return None
    return sum(target) / len(target) - sum(opposite) / len(opposite)


def family_means(values: Sequence[float], families: Sequence[str], kinds: Sequence[str]) -> dict[str, float]:
    """One case's metrics from its probes' scores: ``family`` and, for locality/portability, ``family/kind``.

    A family (or kind) the case has no probe of is absent, so it drops out of the averages.
    """
    groups: dict[str, list[float]] = {}
    for value, family, kind in zip(values, families, kinds, strict=True):
        groups.setdefault(family, []).append(float(value))
        if family in SUBKEY_FAMILIES:
            groups.setdefault(f"{family}/{kind}", []).append(float(value))
    return {key: sum(v) / len(v) for key, v in groups.items()}


PROTOCOLS = ("teacher_forced", "generation")
PROTOCOL_CHOICES = (*PROTOCOLS, "both")  # what an evaluation may run


@dataclass(frozen=True)
class MetricSummary:
    """A metric averaged over the cases that have it, with its protocol and 95 % bootstrap interval (None: not computed)."""

    mean: float
    n: int
    low: float | None = None
    high: float | None = None
    protocol: str = "teacher_forced"

    def to_dict(self) -> dict[str, float | int | str | None]:
        return {"mean": self.mean, "n": self.n, "ci_low": self.low, "ci_high": self.high, "protocol": self.protocol}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "MetricSummary":
        """Read ``to_dict``'s output; reports written before protocols existed are teacher-forced, without an interval."""
        return cls(data["mean"], data["n"], data.get("ci_low"), data.get("ci_high"), data.get("protocol", "teacher_forced"))


def _metric_order(key: str) -> tuple[int, str]:
    """Families in paper order (generation metrics by the family they measure), then by key."""
    family = key.split("/")[0].removeprefix("gen_")
    rank = next((i for i, f in enumerate(FAMILIES) if family == f or family.startswith(f + "_")), len(FAMILIES))
    return rank, key


def summarize(values: Sequence[float], protocol: str = "teacher_forced", intervals: bool = False) -> MetricSummary:
    """Mean and n of per-case ``values``; with ``intervals``, their 95 % percentile-bootstrap interval (fixed seed)."""
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r} is not one of {list(PROTOCOLS)}")
    mean = sum(values) / len(values)  # the plain mean, as before intervals existed: numbers stay bitwise the same
    if not intervals:
        return MetricSummary(mean, len(values), protocol=protocol)
    ci = bootstrap_ci(values)
    return MetricSummary(mean, len(values), min(ci.low, mean), max(ci.high, mean), protocol)


def aggregate(cases: Iterable[tuple[str, Mapping[str, float]]], protocol: str = "teacher_forced",
              intervals: bool = False) -> dict[str, dict[str, MetricSummary]]:
    """(task, case metrics) pairs -> task -> metric -> mean over the task's cases that have it, with n (see ``summarize``)."""
    sums: dict[str, dict[str, list[float]]] = {}
    for task, metrics in cases:
        per_task = sums.setdefault(task, {})
        for key, value in metrics.items():
            if value is not None and not math.isnan(value):
                per_task.setdefault(key, []).append(float(value))
    return {
        task: {key: summarize(v, protocol, intervals) for key, v in sorted(metrics.items(), key=lambda kv: _metric_order(kv[0]))}
        for task, metrics in sums.items()
    }


def task_average(per_task: Mapping[str, Mapping[str, MetricSummary]], metric: str) -> float | None:
    """Unweighted mean over tasks of one metric (each task counts once, as in the paper's tables)."""
    values = [m[metric].mean for m in per_task.values() if metric in m]
    return sum(values) / len(values) if values else None
