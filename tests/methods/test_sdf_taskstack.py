"""TaskStack's exact (fp32) stack gives the same products as theta @ x - ref @ x, which the
bf16 sketch path uses: reading one matrix per product instead of two changes no result
beyond rounding."""

from __future__ import annotations

import torch

from pivotmerge_gui.core.methods.pivotmerge.sdf import TaskStack


def test_exact_stack_products_equal_the_two_matrix_form():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(96, 80, generator=g)
    thetas = [ref + torch.randn(96, 80, generator=g) for _ in range(3)]
    exact = TaskStack(thetas, ref, torch.float32)
    sketch = TaskStack(thetas, ref, torch.bfloat16)
    assert exact.exact and not sketch.exact
    assert exact.total == sketch.total  # the norms are computed from the same fp32 differences
    x, y = torch.randn(80, 7, generator=g), torch.randn(96, 5, generator=g)
    for i in range(3):
        assert torch.equal(exact.tau(i), thetas[i] - ref)
        torch.testing.assert_close(exact.mul(i, x), sketch.mul(i, x), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(exact.tmul(i, y), sketch.tmul(i, y), rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(exact.mul(i, x), (thetas[i] - ref) @ x, rtol=0, atol=0)
