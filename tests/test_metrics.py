"""The evaluation metrics pinned on hand-built logits (DESIGN.md §5)."""

from __future__ import annotations

import math

import pytest
import torch

from instructedit.evaluation.metrics import (
    MetricSummary, aggregate, answer_accuracy, family_means, mean_logprob, sentiment_margin, task_average, unchanged_tokens,
)
from instructedit.losses import argmax_ids, locality_margin, unchanged_share

VOCAB = 5


def one_hot_logits(argmax: list[int]) -> torch.Tensor:
    """Logits (n, VOCAB) whose argmax at each position is the given id."""
    logits = torch.zeros(len(argmax), VOCAB)
    logits[torch.arange(len(argmax)), torch.tensor(argmax)] = 3.0
    return logits


def test_accuracy_two_of_three_answer_tokens() -> None:
    logits = one_hot_logits([1, 2, 4])
    targets = torch.tensor([1, 2, 3])
    acc = answer_accuracy(logits, targets, torch.zeros(3, dtype=torch.long), 1)
    assert acc.tolist() == pytest.approx([2 / 3])


def test_accuracy_is_per_probe_then_averaged_not_pooled() -> None:
    # probe 0: 1 token right of 1; probe 1: 1 right of 3 -> per-probe 1 and 1/3; pooled would be 2/4
    logits = one_hot_logits([0, 1, 0, 0])
    targets = torch.tensor([0, 1, 2, 2])
    rows = torch.tensor([0, 1, 1, 1])
    acc = answer_accuracy(logits, targets, rows, 2)
    assert acc.tolist() == pytest.approx([1.0, 1 / 3])
    assert family_means(acc.tolist(), ["portability"] * 2, ["Reasoning"] * 2)["portability"] == pytest.approx(2 / 3)


def test_locality_one_flipped_argmax() -> None:
    n = 4
    pre = one_hot_logits([1, 2, 3, 4])
    post = one_hot_logits([1, 2, 0, 4])  # one argmax flips; the gold answer plays no part
    rows = torch.zeros(n, dtype=torch.long)
    same = unchanged_tokens(pre.argmax(-1), post.argmax(-1), rows, 1)
    assert same.tolist() == pytest.approx([1 - 1 / n])
    assert torch.equal(same, unchanged_share(pre, post, rows, 1))


def test_locality_ignores_logit_changes_that_keep_the_argmax() -> None:
    pre = one_hot_logits([1, 2])
    post = pre * 5 + 0.5
    assert unchanged_tokens(pre.argmax(-1), post.argmax(-1), torch.zeros(2, dtype=torch.long), 1).item() == 1.0


def test_mean_logprob_is_length_normalized() -> None:
    logits = torch.zeros(3, VOCAB)  # uniform: log p = -log V at every token
    rows = torch.tensor([0, 1, 1])
    lp = mean_logprob(logits, torch.tensor([0, 1, 2]), rows, 2)
    assert lp.tolist() == pytest.approx([-math.log(VOCAB)] * 2)


def test_sentiment_margin() -> None:
    assert sentiment_margin([-1.0, -3.0, -4.0], [True, True, False]) == pytest.approx(-2.0 - -4.0)
    assert sentiment_margin([-1.0], [True]) is None


def test_family_means_and_subkeys() -> None:
    metrics = family_means(
        [1.0, 0.0, 0.5, 1.0],
        ["locality", "locality", "locality", "reliability"],
        ["Relation_Specificity", "Relation_Specificity", "Forgetfulness", "default"],
    )
    assert metrics == pytest.approx({
        "locality": 0.5, "locality/Relation_Specificity": 0.5, "locality/Forgetfulness": 0.5, "reliability": 1.0,
    })
    assert "reliability/default" not in metrics  # sub-keys only for locality and portability


def test_aggregate_excludes_cases_without_a_family_and_reports_n() -> None:
    cases = [
        ("counterfact", {"reliability": 1.0, "portability": 0.5, "portability/Reasoning": 0.5}),
        ("counterfact", {"reliability": 0.0}),  # no portability probe: not counted as 0
        ("zsre", {"reliability": 0.5, "locality": 1.0}),
    ]
    agg = aggregate(cases)
    assert agg["counterfact"]["reliability"] == MetricSummary(0.5, 2)
    assert agg["counterfact"]["portability"] == MetricSummary(0.5, 1)
    assert agg["counterfact"]["portability/Reasoning"].n == 1
    assert "locality" not in agg["counterfact"]
    assert agg["zsre"]["locality"] == MetricSummary(1.0, 1)
    assert list(agg["counterfact"]) == ["reliability", "portability", "portability/Reasoning"]
    assert task_average(agg, "reliability") == pytest.approx((0.5 + 0.5) / 2)
    assert task_average(agg, "generalization") is None


def test_locality_margin_is_zero_while_every_lead_holds() -> None:
    pre = torch.tensor([[2.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    assert locality_margin(pre, pre).item() == 0.0
    assert locality_margin(pre, pre + torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])).item() == 0.0  # lead grew


def test_locality_margin_counts_an_eroded_lead_up_to_the_cap() -> None:
    pre = torch.tensor([[2.0, 1.0, 0.0], [0.0, 5.0, 0.0]])
    flipped = torch.tensor([[1.0, 2.0, 0.0], [0.0, 5.0, 0.0]])  # row 0: lead 1 -> -1
    assert locality_margin(pre, flipped).item() == pytest.approx((2.0 + 0.0) / 2)
    shrunk = torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 0.0]])  # row 1: lead 5 (capped at 2) -> 1
    assert locality_margin(pre, shrunk, cap=2.0).item() == pytest.approx((0.0 + 1.0) / 2)


def test_argmax_ids_is_argmax_with_ties_and_nan() -> None:
    torch.manual_seed(0)
    logits = torch.randn(6, 5, 300)
    logits[0, :, 7] = logits[0, :, 100] = logits[0].amax(-1) + 1  # a tie: the first index
    logits[1, 2, 250] = float("nan")  # a NaN: its index
    logits[2] = 0.0  # all equal: index 0
    assert torch.equal(argmax_ids(logits), logits.argmax(-1))
    assert argmax_ids(logits)[0].tolist() == [7] * 5 and int(argmax_ids(logits)[1, 2]) == 250 and argmax_ids(logits)[2].eq(0).all()


def test_paired_differences_compares_two_reports_case_by_case() -> None:
    """b − a per case with its bootstrap interval, over the cases both score; other cases are refused; paired_lines prints them."""
    from instructedit.evaluation.report import paired_differences, paired_lines

    def report(said: list[float | None], loc: list[float]) -> dict:
        return {"cases": [{"source": f"f.json#{i}", "gen_post": {"gen_reliability": s}, "post": {"locality": l}}
                          for i, (s, l) in enumerate(zip(said, loc))]}

    a, b = report([0.0, 1.0, 0.0, None], [1.0, 1.0, 0.5, 1.0]), report([1.0, 1.0, 1.0, 1.0], [1.0, 0.5, 0.5, 1.0])
    out = paired_differences(a, b, (("gen_reliability", "gen_post"), ("locality", "post"), ("absent", "post")), labels=("x", "y"))
    said = out["gen_reliability"]
    assert said["n"] == 3 and said["x"] == pytest.approx(1 / 3) and said["y"] == 1.0 and said["cases_differing"] == 2
    assert said["difference"] == pytest.approx(2 / 3) and said["ci_low"] <= 2 / 3 <= said["ci_high"] and said["protocol"] == "generation"
    assert out["locality"]["difference"] == pytest.approx(-0.125) and out["locality"]["protocol"] == "teacher_forced"
    assert "absent" not in out
    with pytest.raises(ValueError, match="do not hold the same cases"):
        paired_differences(a, report([1.0], [1.0]), (("locality", "post"),))
    lines = paired_lines({"n_cases": 4, **out}, ("x", "y"))  # what a results script prints: one line per metric, in points
    assert lines[1] == "locality (teacher_forced): 87.5 -> 75.0, -12.5 [{:+.1f}, {:+.1f}]".format(
        100 * out["locality"]["ci_low"], 100 * out["locality"]["ci_high"])
    assert len(lines) == 2 and lines[0].startswith("gen_reliability (generation): 33.3 -> 100.0, +66.7 [")


def test_paired_point_compares_two_sequences_case_by_case_at_a_point_of_their_curves() -> None:
    """The last point by default, or the one after ``edits``; each side's cases' values paired; a curve without per-case
    values (a report from before) or without the point is refused by name."""
    from instructedit.evaluation.report import paired_point

    def report(last: list[float], at2: list[float]) -> dict:
        cases = [{"source": f"f.json#{i}"} for i in range(len(last))]
        return {"cases": cases, "sequential": [
            {"edits": 2, "cases": {str(i): {"gen_reliability": v, "locality": 1.0} for i, v in enumerate(at2)}},
            {"edits": len(last), "cases": {str(i): {"gen_reliability": v, "locality": 0.5} for i, v in enumerate(last)}}]}

    a, b = report([0.0, 0.0, 1.0, 0.0], [1.0, 1.0]), report([1.0, 1.0, 1.0, 0.0], [1.0, 0.0])
    out = paired_point(a, b, labels=("x", "y"))
    assert out["gen_reliability"]["x"] == 0.25 and out["gen_reliability"]["y"] == 0.75 and out["gen_reliability"]["n"] == 4
    assert out["gen_reliability"]["difference"] == pytest.approx(0.5) and out["gen_reliability"]["cases_differing"] == 2
    assert out["gen_reliability"]["protocol"] == "generation" and out["locality"]["protocol"] == "teacher_forced"
    assert out["locality"]["difference"] == 0.0 and set(out) == {"gen_reliability", "locality"}
    early = paired_point(a, b, edits=2)["gen_reliability"]
    assert (early["a"], early["b"], early["n"]) == (1.0, 0.5, 2)
    with pytest.raises(ValueError, match="report 'a' has no per-case values at a point after 3 edits"):
        paired_point(a, b, edits=3, labels=("a", "b"))
    old = report([1.0, 1.0, 1.0, 1.0], [1.0, 1.0])
    del old["sequential"][-1]["cases"]
    with pytest.raises(ValueError, match="report 'b' has no per-case values at its last point"):
        paired_point(a, old)
    with pytest.raises(ValueError, match="do not hold the same cases"):
        paired_point(a, report([1.0], [1.0, 1.0]))
