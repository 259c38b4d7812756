"""benchmarks/count_flops.py counts the work behind the speed ratios: each counted op at its textbook cost."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from count_flops import CountFlops  # noqa: E402


def test_products_linears_and_attention_are_counted_and_elementwise_work_is_not() -> None:
    a, b = torch.randn(5, 7), torch.randn(7, 3)
    with CountFlops() as count:
        a @ b
        torch.relu(a) * 2 + 1  # elementwise: not counted
    assert count.total == 2 * 5 * 7 * 3
    q = k = v = torch.randn(1, 2, 6, 4)
    with CountFlops() as count:
        F.scaled_dot_product_attention(q, k, v)
    assert count.total == 4 * 1 * 2 * 6 * 6 * 4  # q·kᵀ and the weights · v, 2·L·S·E each per head


@pytest.mark.skipif(not hasattr(torch.ops.mkldnn, "_linear_pointwise") or not torch.backends.mkldnn.is_available(),
                    reason="no oneDNN linear in this PyTorch build (the fast decoding kernels are off there too)")
def test_onednn_linears_are_counted() -> None:
    """The evaluation routes linears through oneDNN (fast_linears), which flop_counter has no formula for."""
    x, w = torch.randn(2, 3, 8), torch.randn(16, 8)
    with CountFlops() as count:
        out = torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")
    torch.testing.assert_close(out, x @ w.T)
    assert count.total == 2 * 6 * 8 * 16 and list(count.by_op) == ["mkldnn._linear_pointwise"]
