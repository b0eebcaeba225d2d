"""Numerical building blocks shared by the merge methods, the alignment and the analysis.

One home for: LAPACK/torch thread control, orthonormalisation, descending ``eigh``,
the bf16-speed probe, fixed-seed Gaussian test matrices and randomized range finders
(sketches), the energy rule for a rank, the shared subspace of a stack of updates,
truncated SVD / polar factor / best low rank, and PSD solves. Everything here is pure
torch on the tensors' own device; callers decide dtypes and what the results mean.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch

EXACT_GRAM_LIMIT = 1024  # shared_subspace: Gram + eigh when the larger side is at most this
OVERSAMPLE = 16  # extra sketch columns beyond the rank asked for
POWER_ITERS = 1  # subspace iterations of the shared-subspace sketch
SKETCH_SEED = 20260422  # test matrices do not depend on the job's seed: same inputs -> same result


# =============================================================================== threads
@contextmanager
def lapack_threads(big: bool = False) -> Iterator[None]:
    """Run small CPU LAPACK calls (QR of 4096 x 272, eigh of 272 x 272) on one thread.

    Multi-threaded LAPACK on such thin problems spends its time in thread start-up and
    spin-waits, which on a busy machine costs many times the work itself. ``big`` (or a
    non-CPU device at the caller) keeps the current setting. The thread count is restored
    afterwards (process-wide setting: only speed, never results, of other threads can be
    affected meanwhile)."""
    n = torch.get_num_threads()
    if big or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def map_single_threaded(fn: Callable[[Any], Any], items: Iterable[Any], device: torch.device) -> list[Any]:
    """``[fn(x) for x in items]`` for independent pieces of memory-bound work (entry-wise
    chunks, rows), on the CPU spread over torch's thread count of Python threads with every
    torch op inside single-threaded.

    Why: a chunked loop of small entry-wise ops opens one OpenMP parallel region per op,
    and each region waits for its slowest thread: on a busy machine a descheduled thread
    stalls every op (measured on 2 shared cores at load 10: TIES on 4 x 16.8 M entries took
    41 s wall, 12 s CPU with 2 OpenMP threads; 5 s wall, 1.4 s CPU with one). Independent
    pieces on separate Python threads (torch releases the GIL inside ops) keep both cores
    without per-op barriers. Results are those of the sequential loop: each piece runs the
    same ops on the same data, only elsewhere. Off the CPU (or with one thread) it is the
    plain loop."""
    items = list(items)
    n = torch.get_num_threads()
    if device.type != "cpu" or n == 1 or len(items) <= 1:
        return [fn(x) for x in items]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=min(n, len(items))) as pool:
            return list(pool.map(fn, items))
    finally:
        torch.set_num_threads(n)


# =============================================================================== bf16 probe
@cache
def bf16_is_fast(device_type: str) -> bool:
    """Whether bf16 matrix products beat fp32 clearly here (CUDA: yes; CPU: AMX/avx512-bf16).

    Read from the CPU flags on Linux, else measured once per process on a 512^3 product.
    Callers use it for speed only (sketches, certified alignment), never for results that
    depend on it."""
    if device_type == "cuda":
        return True
    if device_type != "cpu":
        return False
    try:  # deterministic where the CPU says so (a timing probe is noisy on a busy machine)
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as f:
            flags = f.read()
        return "amx_bf16" in flags or "avx512_bf16" in flags
    except OSError:
        pass
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))
    b16 = a.to(torch.bfloat16)
    a @ a
    b16 @ b16
    t0 = time.perf_counter()
    for _ in range(3):
        a @ a
    t32 = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(3):
        b16 @ b16
    t16 = time.perf_counter() - t0
    return t16 < 0.5 * t32


def product_dtype(device: torch.device, big: bool) -> torch.dtype:
    """bf16 for ``big`` products on a device where bf16 is fast, else fp32."""
    return torch.bfloat16 if big and bf16_is_fast(device.type) else torch.float32


# =============================================================================== small pieces
def orth(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of ``y`` (reduced QR in fp32)."""
    with lapack_threads(y.device.type != "cpu"):
        return torch.linalg.qr(y.float(), mode="reduced")[0]


def eigh_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenpairs of the symmetric part of ``g``, eigenvalues descending and clamped at 0."""
    with lapack_threads(g.shape[0] > 2048 or g.device.type != "cpu"):
        vals, vecs = torch.linalg.eigh((g + g.transpose(-1, -2)) / 2)
    return vals.flip(0).clamp(min=0.0), vecs.flip(1)


def gaussian(shape: Sequence[int], salt: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian test matrix from ``SKETCH_SEED + salt``, drawn on the CPU (same numbers on
    every device)."""
    gen = torch.Generator().manual_seed(SKETCH_SEED + salt)
    return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)


def energy_rank(vals: torch.Tensor, total: float, energy: float) -> int:
    """Smallest r with ``sum(vals[:r]) >= energy * total`` (``vals`` descending); all of
    them when even the full sum falls short, 0 when ``total`` is 0."""
    if total <= 0:
        return 0
    cum = torch.cumsum(vals, 0) / total
    hit = (cum >= energy - 1e-9).nonzero()
    return int(hit[0]) + 1 if hit.numel() else int(vals.numel())


def rank_tol(eigvals: torch.Tensor, size: int) -> float:
    """Eigenvalues of a Gram matrix below this are numerically zero (matrix_rank rule,
    applied to sigma^2 = eigenvalue)."""
    if eigvals.numel() == 0:
        return 0.0
    top = float(eigvals.max().clamp(min=0))
    return top * size * torch.finfo(eigvals.dtype).eps


# =============================================================================== sketches
def _subspace_iterate(t: torch.Tensor, q: torch.Tensor, power_iters: int) -> torch.Tensor:
    """``power_iters`` subspace iterations of an orthonormal basis ``q`` [m, p] with
    A = sum_k t_k t_k^T (two passes over the stack each; products in ``t``'s dtype)."""
    for _ in range(power_iters):
        z = torch.matmul(t.transpose(1, 2), q.to(t.dtype))  # [K, n, p]
        q = orth(torch.matmul(t, z).float().sum(0))
    return q


#: ``rows(q)`` -> Q^T t_k for every k, [K, p, n] fp32: the exact rows of a stack whose
#: sketch copy is bf16 (the caller holds the fp32 tensors)
RowsFn = Callable[[torch.Tensor], torch.Tensor]


def _rayleigh_ritz(
    t: torch.Tensor, q: torch.Tensor, rows: RowsFn | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Eigenpairs of A = sum_k t_k t_k^T restricted to the basis ``q`` [m, p] (one pass):
    (eigenvalues desc, eigenvectors U = Q W [m, p], B = Q^T t [K, p, n] in fp32 (from
    ``rows`` when given), W [p, p])."""
    b = rows(q) if rows is not None else torch.matmul(q.t().to(t.dtype), t).float()  # [K, p, n]
    h = torch.matmul(b, b.transpose(1, 2)).sum(0)
    vals, w = eigh_desc(h.double())
    w = w.float()
    return vals.float(), q @ w, b, w


def sketch_eigh(
    t: torch.Tensor, p: int, salt: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p eigenpairs of A = sum_k t_k t_k^T for a stack ``t`` [K, m, n] (possibly a bf16
    copy or a transposed view) by randomized subspace iteration on M = [t_1 ... t_K]
    (Halko et al. 2011). Returns (eigenvalues desc, eigenvectors [m, p]); the big products
    run in ``t``'s dtype, QR and the small eigenproblem in fp32/fp64."""
    k, _m, n = t.shape
    omega = gaussian((k, n, p), salt, t.device, t.dtype)
    # explicit (batched) matmuls: einsum would copy the transposed 4096x4096 stacks
    q = _subspace_iterate(t, orth(torch.matmul(t, omega).float().sum(0)), power_iters)
    vals, vecs, _, _ = _rayleigh_ritz(t, q)
    return vals, vecs


def sketch_eigh_both(
    t: torch.Tensor, p: int, salt: int, power_iters: int, rows: RowsFn | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]:
    """Top-p eigenpairs of both ``sum_k t_k t_k^T`` (left, as :func:`sketch_eigh`) and
    ``sum_k t_k^T t_k`` (right) of a stack [K, m, n], in 3 + 2 * power_iters passes over it
    instead of 2 * (2 + 2 * power_iters).

    The right side needs no pass of its own before its Rayleigh-Ritz step: the left one
    already computed B_k = Q^T t_k, the rows of every t_k along the dominant left
    directions (the right singular directions of t_k scaled by their singular values, as
    one subspace iteration would give them). A p x p Gaussian per expert mixes them into a
    start basis, and ``power_iters`` subspace iterations on the small stacked B [K p, n]
    (not on the stack) turn it towards B's dominant right directions, the ones that carry
    the shared coordinates U^T t_k V. Measured at LLaVA-1.5 size (4 x 4096 x 4096, bf16,
    p = 272, one power iteration), energy of the shared coordinates sum_k ||U^T t_k V||^2
    (top 256): 0.99886 on a decaying spectrum, 0.496 on experts from different inits
    (task vectors against their mean), 0.492 with updates as large as the init, 0.034 on
    full-rank noise; iterating on the stack instead (2 more passes, 0.2 s more per layer
    on 2 cores) gave 0.99881, 0.492, 0.489, 0.028.

    The fifth element is (B, W) with U^T t_k = W^T B_k (B from ``rows`` when given, else
    from ``t`` in its dtype): where B is exact, the caller's coordinates U^T t_k V cost no
    pass of their own."""
    k, _m, n = t.shape
    omega = gaussian((k, n, p), salt * 2, t.device, t.dtype)
    q = _subspace_iterate(t, orth(torch.matmul(t, omega).float().sum(0)), power_iters)
    va, ua, b, w = _rayleigh_ritz(t, q, rows)
    mix = gaussian((k, p, p), salt * 2 + 1, t.device, torch.float32)
    qv = orth(torch.matmul(b.transpose(1, 2), mix).sum(0))
    bs = b.reshape(k * p, n)
    for _ in range(power_iters):
        qv = orth(bs.t() @ (bs @ qv))
    del bs
    vb, ub, _, _ = _rayleigh_ritz(t.transpose(1, 2), qv)
    return va, ua, vb, ub, (b, w)


def range_finder(a: torch.Tensor, p: int, power_iters: int, dtype: torch.dtype) -> torch.Tensor:
    """Orthonormal basis [m, p] of the dominant column space of one matrix ``a`` [m, n]:
    a Gaussian sketch (seed 0) and ``power_iters`` subspace iterations with the products in
    ``dtype`` and fp32 QR."""
    am = a.to(dtype)
    omega = torch.randn(a.shape[1], p, generator=torch.Generator().manual_seed(0)).to(a.device, dtype)
    q = orth(am @ omega)
    for _ in range(power_iters):
        q = orth(am @ (am.t() @ q.to(dtype)))
    return q


def shared_subspace(
    taus: torch.Tensor, energy: float, max_rank: int, *, salt: int = 0, total: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """See :func:`shared_subspace_coords` (the same bases, without the coordinates)."""
    u, v, info, _ = shared_subspace_coords(taus, energy, max_rank, salt=salt, total=total)
    return u, v, info


def shared_subspace_coords(
    taus: torch.Tensor, energy: float, max_rank: int, *, salt: int = 0, total: float | None = None,
    rows: RowsFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any], torch.Tensor | None]:
    """Shared bases (U_s [m, r], V_s [n, r], fp32) of a stack of updates ``taus`` [K, m, n].

    U_s: top-r eigenvectors of ``sum tau tau^T``; V_s: of ``sum tau^T tau``; r = the
    smallest rank whose eigenvalues hold ``energy`` of the trace on either side (the larger
    of the two), capped by ``max_rank`` (0 = no cap). Small layers use the exact Gram
    matrices; large ones randomized subspace iteration with ``max_rank + OVERSAMPLE``
    columns, both sides in 5 passes over the stack (:func:`sketch_eigh_both`; bf16
    products where they are fast; the subspace is approximate, everything
    computed from it afterwards is exact). ``taus`` may be a bf16 copy; ``total`` is then
    the exact fp32 energy sum_k ||tau_k||^2, and ``rows`` (see :data:`RowsFn`) may give the
    exact rows Q^T tau_k for the sketch's Rayleigh-Ritz step. Never a full SVD of the
    concatenation. The info dict says how (``method``), the ranks and the captured energies.

    The fourth element: the coordinates C_k = U_s^T tau_k V_s [K, r, r] (fp32) where the
    sketch computed the exact rows U^T tau_k anyway (fp32 stack or ``rows``), else None."""
    k, m, n = taus.shape
    if total is None:
        total = float(torch.linalg.vector_norm(taus.float())) ** 2
    cap = min(m, n) if max_rank <= 0 else min(max_rank, m, n)
    info: dict[str, Any] = {"method": "exact-gram"}
    if total == 0.0:
        z = taus.new_zeros
        return z(m, 0), z(n, 0), {"method": "zero", "rank": 0, "rank_u": 0, "rank_v": 0,
                                  "energy_u": 1.0, "energy_v": 1.0, "spectrum": []}, None
    left, exact_rows = None, False
    if max(m, n) <= EXACT_GRAM_LIMIT:
        t = taus.float()
        a = torch.matmul(t, t.transpose(1, 2)).sum(0)
        b = torch.matmul(t.transpose(1, 2), t).sum(0)
        va, ua = eigh_desc(a)
        vb, ub = eigh_desc(b)
    else:
        mm_dtype = product_dtype(taus.device, m * n * k >= 2**22)
        p = min(cap + OVERSAMPLE, min(m, n)) if max_rank > 0 else min(256, min(m, n))
        t = taus.to(mm_dtype)
        # the Rayleigh-Ritz rows are exact from ``rows``, or from a stack that is neither a
        # rounded copy (bf16 taus) nor rounded here (bf16 products)
        full = (torch.float32, torch.float64)
        exact_rows = rows is not None or (taus.dtype in full and t.dtype in full)
        while True:
            va, ua, vb, ub, left = sketch_eigh_both(t, p, salt, POWER_ITERS, rows)
            reached = energy_rank(va, total, energy) < p - OVERSAMPLE // 2 or p >= min(m, n)
            if max_rank > 0 or reached:
                break
            p = min(2 * p, min(m, n))
        info = {"method": f"randomized-{str(mm_dtype).replace('torch.', '')}", "sketch": p}
    r_u = min(energy_rank(va, total, energy), cap)
    r_v = min(energy_rank(vb, total, energy), cap)
    r = max(1, max(r_u, r_v))
    r = min(r, cap, ua.shape[1], ub.shape[1])
    info.update(
        rank=r, rank_u=r_u, rank_v=r_v,
        energy_u=float(va[:r].sum() / total), energy_v=float(vb[:r].sum() / total),
        spectrum=[float(v / total) for v in va[: min(64, va.numel())]],
    )
    u, v = ua[:, :r].contiguous(), ub[:, :r].contiguous()
    coords = None
    if left is not None and exact_rows:  # C_k = (W_r^T B_k) V: small products only
        b, w = left
        coords = torch.matmul(torch.matmul(w[:, :r].t(), b), v)
    return u, v, info, coords


# =============================================================================== low rank
#: a Gram-matrix eigenproblem in the input's own dtype is trusted only when every eigenvalue
#: asked for is at least this many eps (of that dtype) times the largest: then the Gram
#: matrix's rounding (~eps * sigma_max^2) moves it by at most 1e-5 relative. Otherwise the
#: Gram matrix and its eigenproblem run in float64 (lambda down to ~1e-14 lambda_max)
GRAM_SAFE_EPS = 1e5
#: svd_top tries its input's dtype first only for ranks up to this fraction of min(m, n)
#: (CART-like truncations, which stay among the large singular values)
SMALL_RANK_FRACTION = 0.125


def svd_top(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (U [r_m, r], S [r], Vh [r, n]) of a 2-D tensor, in its
    dtype.

    From ``eigh`` of the Gram matrix on the smaller side (faster than an SVD). The Gram
    matrix squares the condition number, so in float32 singular values under ~sqrt(eps)
    sigma_max would come back wrong or not at all: the eigenproblem runs in the input's
    dtype only for a small ``rank`` whose every eigenvalue is well above its rounding
    (:data:`GRAM_SAFE_EPS`), else in float64, where singular values down to ~1e-7 sigma_max
    keep their own vectors (a float32 merge then agrees with a float64 one up to the
    rounding of the inputs). Components whose singular value is numerically zero in float64
    (:func:`rank_tol`) are dropped, so fewer than ``rank`` may come back."""
    rows, cols = m.shape
    rank = max(0, min(int(rank), rows, cols))
    if rank == 0:
        return m.new_zeros(rows, 0), m.new_zeros(0), m.new_zeros(0, cols)
    wide = rows <= cols
    if m.dtype != torch.float64 and rank <= SMALL_RANK_FRACTION * min(rows, cols):
        evals, evecs = torch.linalg.eigh(m @ m.T if wide else m.T @ m)
        evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
        top = float(evals[0])
        if top > 0 and float(evals[-1]) >= GRAM_SAFE_EPS * torch.finfo(evals.dtype).eps * top:
            s = evals.sqrt()
            if wide:
                return evecs, s, (evecs.T @ m) / s.unsqueeze(1)
            return (m @ evecs) / s.unsqueeze(0), s, evecs.T
    m64 = m.double()
    evals, evecs = torch.linalg.eigh(m64 @ m64.T if wide else m64.T @ m64)
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    keep = evals > rank_tol(evals, max(rows, cols))
    evals, evecs = evals[keep], evecs[:, keep]
    s = evals.sqrt()
    if wide:
        u, vh = evecs, (evecs.T @ m64) / s.unsqueeze(1)
    else:
        u, vh = (m64 @ evecs) / s.unsqueeze(0), evecs.T
    return u.to(m.dtype), s.to(m.dtype), vh.to(m.dtype)


def gram_float64(stack: torch.Tensor) -> torch.Tensor:
    """``sum_k T_k T_k^T`` [m, m] of a stack [K, m, n] in float64, accumulated one expert at
    a time (one float64 copy of an update alive, not of the whole stack)."""
    gram = stack.new_zeros((stack.shape[1], stack.shape[1]), dtype=torch.float64)
    for t in stack:
        t64 = t.double()
        gram.addmm_(t64, t64.T)
    return gram


def gram_top_eigvecs(stack: torch.Tensor, rank: int, *, right: bool = False) -> torch.Tensor:
    """Top-``rank`` eigenvectors [d, r] of ``sum_k T_k T_k^T`` (or ``sum_k T_k^T T_k`` with
    ``right``) for a stack [K, m, n], largest first, in the stack's dtype.

    The Gram matrix and ``eigh`` run in the stack's dtype when every eigenvalue asked for is
    well above their rounding (>= GRAM_SAFE_EPS * eps * lambda_max); otherwise in float64
    (the Gram matrix accumulated one expert at a time), where an eigenvalue of 1e-6
    lambda_max (singular values spanning 1000x) still has its own eigenvector. Eigenvalues
    that are zero up to float64 rounding (:func:`rank_tol`) are dropped, so fewer than
    ``rank`` may come back."""
    mats = stack.transpose(1, 2) if right else stack
    k_count, d, other = mats.shape
    rank = max(0, min(int(rank), d))
    if rank == 0:
        return stack.new_zeros(d, 0)
    evals, evecs = torch.linalg.eigh(torch.matmul(mats, mats.transpose(1, 2)).sum(0))
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    top = float(evals[0])
    if top > 0 and float(evals[-1]) >= GRAM_SAFE_EPS * torch.finfo(evals.dtype).eps * top:
        return evecs
    evals, evecs = torch.linalg.eigh(gram_float64(mats))
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    return evecs[:, evals > rank_tol(evals, max(d, other) * k_count)].to(stack.dtype)


def polar(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor of ``a`` (the U V^T of its thin SVD, as TSV-M's and
    FusionBench's ``svd`` of the stacked bases), in ``a``'s dtype.

    Computed as a (A^T A)^-1/2 on the smaller side with the Gram matrix, its ``eigh`` and
    the products in float64 whatever ``a``'s dtype: cheaper than an SVD, and singular values
    down to ~1e-7 sigma_max keep their directions. (In float32 the Gram matrix lost every
    direction under ~sqrt(n eps) sigma_max, 2 % of sigma_max at n = 4096, which changed
    TSV-M/Iso-CTS merges by several percent against float64.) Directions whose singular
    value is zero up to float64 rounding (:func:`rank_tol`) are left out (a pseudo-polar
    factor): where the references orthogonalise a rank-deficient stack, the vectors they
    attach to zero singular values are arbitrary (LAPACK-dependent), so we drop them
    instead. For full-rank input this is exactly U V^T."""
    rows, cols = a.shape
    if a.numel() == 0:
        return a.new_zeros(a.shape)
    if cols > rows:
        return polar(a.T).T
    a64 = a.double()
    evals, q = torch.linalg.eigh(a64.T @ a64)
    keep = evals > rank_tol(evals, rows)
    q, evals = q[:, keep], evals[keep]
    return ((a64 @ q) @ (q.T / evals.sqrt().unsqueeze(1))).to(a.dtype)


def svd_rank_tol(s: torch.Tensor, size: int) -> float:
    """Singular values (computed by an SVD, not from a Gram matrix) at or below this are
    numerically zero: sigma_max * eps * 2 sqrt(max(m, n)). The SVD of an exactly
    rank-deficient matrix returns its zero singular values at a few eps * sigma_max
    (measured: under 8 eps at n = 1024, growing like sqrt(n)), while numpy's
    ``matrix_rank`` rule (max(m, n) * eps) would also drop real directions down to
    5e-4 sigma_max in float32 at n = 4096, which float64 keeps."""
    if s.numel() == 0:
        return 0.0
    return float(s.max()) * torch.finfo(s.dtype).eps * 2.0 * size**0.5


def low_rank(m: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of a 2-D tensor (truncated SVD)."""
    if rank <= 0:
        return torch.zeros_like(m)
    if rank >= min(m.shape):
        return m
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(m.dtype)


# =============================================================================== solves
def solve_normal_equations(lhs: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """lhs^-1 rhs for a symmetric PSD ``lhs``: Cholesky when it is positive definite (the
    usual case, ~5x cheaper than LU); when it is singular, the minimum-norm solution from
    its eigendecomposition (eigenvalues under :func:`rank_tol` dropped). LAPACK's
    least-squares driver gave run-to-run different answers for an exactly singular
    matrix here, and CUDA's has no rank-revealing driver at all."""
    if lhs.dtype in (torch.float16, torch.bfloat16):  # no half-precision linalg kernels
        return solve_normal_equations(lhs.float(), rhs.float()).to(lhs.dtype)
    chol, info = torch.linalg.cholesky_ex(lhs)
    if int(info) == 0:
        sol = torch.cholesky_solve(rhs, chol)
        if torch.isfinite(sol).all():
            return sol
    sym = (lhs + lhs.transpose(-1, -2)) / 2
    w, v = torch.linalg.eigh(sym)
    keep = w > rank_tol(w, sym.shape[-1])
    vk = v[:, keep]
    return vk @ ((vk.transpose(-1, -2) @ rhs) / w[keep].unsqueeze(-1))
    sol = torch.linalg.lstsq(lhs, rhs).solution
    if not torch.isfinite(sol).all():
        sol = torch.linalg.pinv(lhs) @ rhs
    return sol
