"""TaskStack's exact (fp32) stack gives the same products as theta @ x - ref @ x, which the
bf16 sketch path uses: reading one matrix per product instead of two changes no result
beyond rounding."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.linalg import orth
from pivotmerge_gui.core.methods.pivotmerge.sdf import TaskStack, residuals_lowrank


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


def test_bf16_stack_is_filled_in_row_blocks_with_the_exact_norms():
    """The bf16 stack is written in row blocks of 2^20 entries (no full fp32 difference
    beside it): every block lands in place and the energies match the whole differences."""
    g = torch.Generator().manual_seed(2)
    m, n = 300, 5000  # 209 rows per block: two blocks
    ref = torch.randn(m, n, generator=g)
    thetas = [ref + torch.randn(m, n, generator=g) * (i + 1) for i in range(2)]
    ts = TaskStack(thetas, ref, torch.bfloat16)
    for i, th in enumerate(thetas):
        d = th - ref
        assert torch.equal(ts.low[i], d.to(torch.bfloat16))
        assert float(ts.norm2[i]) == pytest.approx(float(d.double().pow(2).sum()), rel=1e-5)


@pytest.mark.parametrize("low_dtype", [torch.float32, torch.bfloat16])
def test_batched_residuals_recover_low_rank_residuals(low_dtype):
    """Every expert's residual R_i = tau_i - U C_i V^T of rank <= 12 comes back whole from the
    batched range finder (bf16 stack: up to its rounding; the final projection is exact)."""
    g = torch.Generator().manual_seed(1)
    m, n, k = 640, 560, 3  # larger side over EXACT_GRAM_LIMIT // 2: the randomized path
    ref = torch.randn(m, n, generator=g)
    thetas = [ref + torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g) for _ in range(k)]
    ts = TaskStack(thetas, ref, low_dtype)
    u, v = orth(torch.randn(m, 3, generator=g)), orth(torch.randn(n, 3, generator=g))
    c = ts.coords(u, v)
    factors = residuals_lowrank(ts, u, c, v, 12, salt=5)
    assert len(factors) == k
    tol = 1e-4 if low_dtype == torch.float32 else 2e-2
    for i, (uu, ss, vv) in enumerate(factors):
        res = (thetas[i] - ref) - u @ c[i] @ v.t()
        approx = (uu * ss) @ vv.t()
        assert float(torch.linalg.norm(approx - res) / torch.linalg.norm(res)) < tol
        torch.testing.assert_close(uu.t() @ uu, torch.eye(uu.shape[1]), atol=1e-4, rtol=0)
        assert bool((ss[:-1] >= ss[1:]).all())


def test_sketch_coordinates_come_from_the_exact_rows():
    """Where the sketch's Rayleigh-Ritz step reads exact rows (an fp32 stack, or a bf16
    copy with the TaskStack's fp32 rows), the shared coordinates come with the bases and
    equal U^T tau_k V computed directly; from a bf16 copy alone there are none."""
    from pivotmerge_gui.core.linalg import shared_subspace_coords

    g = torch.Generator().manual_seed(3)
    m, n, k = 1100, 200, 3  # larger side over EXACT_GRAM_LIMIT: the sketch path
    ref = torch.randn(m, n, generator=g)
    thetas = [ref + torch.randn(m, 8, generator=g) @ torch.randn(8, n, generator=g)
              + 0.01 * torch.randn(m, n, generator=g) for _ in range(k)]
    for low_dtype in (torch.float32, torch.bfloat16):
        ts = TaskStack(thetas, ref, low_dtype)
        u, v, info, c = shared_subspace_coords(ts.low, 0.9, 16, salt=1, total=ts.total,
                                               rows=None if ts.exact else ts.rows)
        assert info["method"].startswith("randomized") and c is not None
        direct = torch.stack([u.t() @ (th - ref) @ v for th in thetas])
        torch.testing.assert_close(c, direct, rtol=1e-4, atol=1e-4 * float(direct.abs().max()))
    *_, none = shared_subspace_coords(TaskStack(thetas, ref, torch.bfloat16).low, 0.9, 16, salt=1)
    assert none is None
