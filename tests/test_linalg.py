"""core.linalg: the shared numerical building blocks, checked against plain SVD/eigh."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core import linalg


def _rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


@pytest.mark.parametrize("shape", [(30, 12), (12, 30), (9, 9)])
def test_polar_is_orthogonal_and_matches_svd(shape):
    a = _rand(*shape, seed=1)
    p = linalg.polar(a)
    u, _, vh = torch.linalg.svd(a, full_matrices=False)
    torch.testing.assert_close(p, u @ vh)
    k = min(shape)
    gram = p.T @ p if shape[1] <= shape[0] else p @ p.T
    torch.testing.assert_close(gram, torch.eye(k, dtype=a.dtype))


def test_polar_drops_null_directions():
    a = _rand(20, 3, seed=2)
    p = linalg.polar(torch.cat([a, a], 1))
    assert torch.linalg.matrix_rank(p).item() == 3
    # on its range it is still an isometry: singular values are exactly 1 or 0
    s = torch.linalg.svdvals(p)
    torch.testing.assert_close(s[:3], torch.ones(3, dtype=a.dtype))


def test_svd_top_and_low_rank_match_truncated_svd():
    m = _rand(25, 40, seed=3)
    u0, s0, vh0 = torch.linalg.svd(m, full_matrices=False)
    u, s, vh = linalg.svd_top(m, 4)
    torch.testing.assert_close(s, s0[:4])
    best = (u0[:, :4] * s0[:4]) @ vh0[:4]
    torch.testing.assert_close((u * s) @ vh, best)
    torch.testing.assert_close(linalg.low_rank(m, 4), best, atol=1e-4, rtol=0)  # fp32 SVD inside
    assert torch.equal(linalg.low_rank(m, 0), torch.zeros_like(m))


def test_orth_and_eigh_desc():
    y = _rand(50, 6, seed=4)
    q = linalg.orth(y)
    torch.testing.assert_close(q.T @ q, torch.eye(6), atol=1e-5, rtol=0)
    # same column space: projecting y onto span(q) keeps it
    torch.testing.assert_close(q @ (q.T @ y.float()), y.float(), atol=1e-4, rtol=0)
    g = y @ y.T
    vals, vecs = linalg.eigh_desc(g)
    assert bool((vals[:-1] >= vals[1:]).all()) and bool((vals >= 0).all())
    torch.testing.assert_close((vecs[:, :6] * vals[:6]) @ vecs[:, :6].T, g)


def test_energy_rank():
    vals = torch.tensor([4.0, 3.0, 2.0, 1.0])
    assert linalg.energy_rank(vals, 10.0, 0.7) == 2
    assert linalg.energy_rank(vals, 10.0, 0.71) == 3
    assert linalg.energy_rank(vals, 10.0, 1.0) == 4
    assert linalg.energy_rank(vals, 20.0, 0.9) == 4  # the spectrum falls short: all of it
    assert linalg.energy_rank(vals, 0.0, 0.5) == 0


def test_sketches_find_an_exactly_low_rank_range():
    g = torch.Generator().manual_seed(5)
    taus = torch.stack([torch.randn(300, 5, generator=g) @ torch.randn(5, 200, generator=g) for _ in range(3)])
    exact = torch.linalg.eigvalsh((taus @ taus.transpose(1, 2)).sum(0).double()).flip(0)[:15].float()
    vals, vecs = linalg.sketch_eigh(taus, 15, salt=0, power_iters=1)
    torch.testing.assert_close(vals, exact, rtol=1e-3, atol=1e-2 * float(exact[0]) * 1e-3)
    torch.testing.assert_close(vecs.T @ vecs, torch.eye(15), atol=1e-4, rtol=0)
    q = linalg.range_finder(taus[0], 8, 2, torch.float32)
    torch.testing.assert_close(q @ (q.T @ taus[0]), taus[0], atol=1e-3, rtol=0)


def test_shared_subspace_of_one_direction_is_rank_one():
    u = torch.nn.functional.normalize(_rand(40, seed=6, dtype=torch.float32), dim=0)
    v = torch.nn.functional.normalize(_rand(30, seed=7, dtype=torch.float32), dim=0)
    taus = torch.stack([c * torch.outer(u, v) for c in (1.0, 2.0, -0.5)])
    us, vs, info = linalg.shared_subspace(taus, 0.9, 0)
    assert info["method"] == "exact-gram" and info["rank"] == 1 and us.shape == (40, 1)
    assert abs(float(us[:, 0] @ u)) == pytest.approx(1.0, abs=1e-5)
    assert abs(float(vs[:, 0] @ v)) == pytest.approx(1.0, abs=1e-5)
    zero_u, _, zero_info = linalg.shared_subspace(torch.zeros(2, 5, 4), 0.9, 0)
    assert zero_u.shape == (5, 0) and zero_info["method"] == "zero"


def test_solve_normal_equations_definite_and_singular():
    a = _rand(8, 5, seed=8)
    lhs = a.T @ a + 0.1 * torch.eye(5, dtype=a.dtype)
    rhs = _rand(5, 3, seed=9)
    torch.testing.assert_close(lhs @ linalg.solve_normal_equations(lhs, rhs), rhs)
    sing = torch.diag(torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))
    sol = linalg.solve_normal_equations(sing, torch.tensor([[2.0], [3.0], [0.0]], dtype=torch.float64))
    torch.testing.assert_close(sol[:2, 0], torch.tensor([1.0, 3.0], dtype=torch.float64))


def test_rank_tol_scales_with_the_top_eigenvalue():
    assert linalg.rank_tol(torch.tensor([]), 10) == 0.0
    t = linalg.rank_tol(torch.tensor([4.0, 1.0]), 10)
    assert t == pytest.approx(4.0 * 10 * torch.finfo(torch.float32).eps)


def test_lapack_threads_restores_the_thread_count():
    before = torch.get_num_threads()
    with linalg.lapack_threads():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
    with linalg.lapack_threads(big=True):
        assert torch.get_num_threads() == before
    with pytest.raises(RuntimeError), linalg.lapack_threads():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == before


def test_map_single_threaded_keeps_order_results_and_the_thread_count():
    before = torch.get_num_threads()
    x = _rand(8, 5000, seed=3, dtype=torch.float32)
    seen_threads = []

    def piece(i):
        seen_threads.append(torch.get_num_threads())
        return (x[i].abs() * 3).sum(), i

    got = linalg.map_single_threaded(piece, range(8), x.device)
    assert [i for _, i in got] == list(range(8))
    for (val, i) in got:
        assert torch.equal(val, (x[i].abs() * 3).sum())
    assert torch.get_num_threads() == before
    if before > 1:
        assert set(seen_threads) == {1}  # every piece ran with single-threaded ops
    with pytest.raises(ValueError, match="boom"):
        linalg.map_single_threaded(lambda i: (_ for _ in ()).throw(ValueError("boom")), range(3), x.device)
    assert torch.get_num_threads() == before
    assert linalg.map_single_threaded(lambda i: i * 2, [], x.device) == []


def test_bf16_probe_and_product_dtype():
    assert linalg.bf16_is_fast("cuda") is True
    assert linalg.bf16_is_fast("meta") is False
    assert isinstance(linalg.bf16_is_fast("cpu"), bool)
    assert linalg.product_dtype(torch.device("cpu"), big=False) == torch.float32
    assert linalg.product_dtype(torch.device("meta"), big=True) == torch.float32


def test_gaussian_is_seed_fixed_and_salted():
    a = linalg.gaussian((4, 3), 1, torch.device("cpu"), torch.float32)
    assert torch.equal(a, linalg.gaussian((4, 3), 1, torch.device("cpu"), torch.float32))
    assert not torch.equal(a, linalg.gaussian((4, 3), 2, torch.device("cpu"), torch.float32))


def _spectrum(m, n, spread, seed):
    g = torch.Generator().manual_seed(seed)
    r = min(m, n)
    u = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    s = torch.logspace(0.0, -torch.log10(torch.tensor(spread)).item(), r, dtype=torch.float64)
    return ((u * s) @ v.T).float()


@pytest.mark.parametrize("shape", [(96, 96), (128, 48), (40, 100)])
def test_polar_float32_keeps_small_singular_directions(shape):
    """Singular values spanning 1e3: the float32 polar factor is U V^T of the float64 SVD
    to ~eps * 1e3 (its condition number; the Gram-matrix eigh it replaced lost every
    direction under sqrt(n eps) sigma_max, about 4e-3 here: a unit-norm error each)."""
    a = _spectrum(*shape, spread=1e3, seed=6)
    u, _, vh = torch.linalg.svd(a.double(), full_matrices=False)
    p = linalg.polar(a)
    assert p.dtype == torch.float32
    err = torch.linalg.matrix_norm(p.double() - u @ vh) / torch.linalg.matrix_norm(u @ vh)
    assert float(err) < 5e-5


@pytest.mark.parametrize("rank", [4, 30, 48])
def test_svd_top_float32_is_accurate_for_small_singular_values(rank):
    """Top-rank triplets of a matrix whose spectrum spans 1e4: large ranks reach singular
    values far below sqrt(eps) sigma_max, where the Gram shortcut is not taken."""
    a = _spectrum(128, 48, spread=1e4, seed=7)
    u0, s0, vh0 = torch.linalg.svd(a.double(), full_matrices=False)
    u, s, vh = linalg.svd_top(a, rank)
    assert s.numel() == rank
    torch.testing.assert_close(s.double(), s0[:rank], rtol=1e-5, atol=1e-7 * float(s0[0]))
    best = (u0[:, :rank] * s0[:rank]) @ vh0[:rank]
    err = torch.linalg.matrix_norm(((u * s) @ vh).double() - best) / torch.linalg.matrix_norm(best)
    assert float(err) < 1e-5


def test_svd_rank_tol_separates_null_from_real_directions():
    """Exactly rank-deficient float32 stacks: the computed zero singular values fall under
    the tolerance, the smallest real one (1e-4 sigma_max) stays above it."""
    a = _spectrum(200, 30, spread=1e4, seed=8)
    dup = torch.cat([a, a], 1)  # rank 30 of 60
    s = torch.linalg.svdvals(dup)
    tol = linalg.svd_rank_tol(s, 200)
    assert int((s > tol).sum()) == 30
    assert float(s[29]) > 10 * tol
    assert linalg.polar(dup).shape == dup.shape
    assert int(torch.linalg.matrix_rank(linalg.polar(dup))) == 30


@pytest.mark.parametrize("right", [False, True])
def test_gram_top_eigvecs_float32_matches_float64_subspace(right):
    """The shared subspace of a stack whose spectra span 1e4: float32 input gives the
    float64 subspace (the eigenproblem moves to float64 when float32 would blur it)."""
    stack = torch.stack([_spectrum(60, 40, spread=1e4, seed=s) for s in (10, 11)])
    for rank in (5, 35):
        q32 = linalg.gram_top_eigvecs(stack, rank, right=right)
        q64 = linalg.gram_top_eigvecs(stack.double(), rank, right=right)
        assert q32.dtype == torch.float32 and q32.shape == q64.shape
        proj = q32.double() @ q32.double().T - q64 @ q64.T
        assert float(torch.linalg.matrix_norm(proj, ord=2)) < 1e-4


def test_sketch_eigh_both_matches_the_exact_eigenpairs_of_a_low_rank_stack():
    """Both sides of an exactly rank-6 stack come back exactly (right side from the left
    side's Rayleigh-Ritz rows, no Gaussian pass of its own)."""
    g = torch.Generator().manual_seed(4)
    a, b = torch.randn(70, 6, generator=g), torch.randn(6, 50, generator=g)
    taus = torch.stack([a @ torch.randn(6, 6, generator=g) @ b for _ in range(3)])  # rank 6 on both sides
    va, ua, vb, ub, _ = linalg.sketch_eigh_both(taus, 12, salt=1, power_iters=1)
    for vals, vecs, gram in ((va, ua, (taus @ taus.transpose(1, 2)).sum(0)),
                             (vb, ub, (taus.transpose(1, 2) @ taus).sum(0))):
        exact = torch.linalg.eigvalsh(gram.double()).flip(0)[:6].float()
        torch.testing.assert_close(vals[:6], exact, rtol=1e-4, atol=1e-3)
        proj = vecs[:, :6] @ vecs[:, :6].t()  # the top-6 eigenvectors span the stack's range
        torch.testing.assert_close(proj @ gram, gram, rtol=0, atol=1e-3 * float(gram.abs().max()))
        assert float(vals[6:].abs().max()) < 1e-3 * float(vals[0])
