"""Tensor helpers shared by several merge methods (task vectors, TIES pieces, low rank)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def task_vectors(tensors: Sequence[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    """Stack of tau_k = theta_k - ref, shape [K, *shape]."""
    return torch.stack([t - ref for t in tensors])


def weighted(stack: torch.Tensor, weights: Sequence[float]) -> torch.Tensor:
    """Multiply stack[k] by weights[k]."""
    w = torch.as_tensor(list(weights), dtype=stack.dtype, device=stack.device)
    return stack * w.view(-1, *([1] * (stack.dim() - 1)))


def trim_top_k(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of each stack[k] (TIES trim)."""
    if density >= 1.0:
        return stack
    flat = stack.reshape(stack.shape[0], -1)
    n = flat.shape[1]
    k = max(1, round(density * n))
    if k >= n:
        return stack
    # threshold = k-th largest magnitude per row
    thresh = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
    return (flat * (flat.abs() >= thresh)).reshape(stack.shape)


def elect_sign(stack: torch.Tensor, method: str = "sum") -> torch.Tensor:
    """TIES sign election per entry: sign of the total mass ('sum') or of the count ('count')."""
    if method == "count":
        s = torch.sign(stack).sum(0)
    else:
        s = stack.sum(0)
    sign = torch.sign(s)
    sign[sign == 0] = 1.0
    return sign


def disjoint_mean(stack: torch.Tensor, sign: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean over the entries that agree with the elected sign (zeros never count).

    Returns (merged, agree_mask)."""
    agree = (torch.sign(stack) == sign.unsqueeze(0)) & (stack != 0)
    kept = stack * agree
    count = agree.sum(0).clamp(min=1)
    return kept.sum(0) / count, agree


def low_rank(m: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of a 2-D tensor (truncated SVD)."""
    if rank <= 0:
        return torch.zeros_like(m)
    if rank >= min(m.shape):
        return m
    u, s, vh = torch.linalg.svd(m.float(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(m.dtype)


# ---------------------------------------------------------------------------------------
# Helpers added for the baseline methods (TSV-M, Iso-C/CTS, KnOTS, CART, SSAM, DARE).
# They work in the tensors' own dtype and device, so the CUDA path is the same code.


def is_matrix(kind: str, role: str, t: torch.Tensor) -> bool:
    """True for the weight of a ``linear`` layer: the tensors SVD-based methods treat as
    matrices (everything else takes each method's documented 1-D fallback)."""
    return kind == "linear" and role == "weight" and t.dim() == 2


def _rank_tol(eigvals: torch.Tensor, size: int) -> float:
    """Eigenvalues of a Gram matrix below this are numerically zero (matrix_rank rule,
    applied to sigma^2 = eigenvalue)."""
    if eigvals.numel() == 0:
        return 0.0
    top = float(eigvals.max().clamp(min=0))
    return top * size * torch.finfo(eigvals.dtype).eps


def svd_top(m: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` singular triplets (U [r_m, r], S [r], Vh [r, n]) of a 2-D tensor.

    Computed from ``eigh`` of the Gram matrix on the smaller side rather than a full SVD:
    for 4096x4096 updates that is about 3x faster on CPU, and only the leading, well
    separated components are asked for. Components whose singular value is numerically
    zero are dropped, so fewer than ``rank`` may come back.
    """
    rows, cols = m.shape
    rank = max(0, min(int(rank), rows, cols))
    if rank == 0:
        return m.new_zeros(rows, 0), m.new_zeros(0), m.new_zeros(0, cols)
    if rows <= cols:
        evals, evecs = torch.linalg.eigh(m @ m.T)
    else:
        evals, evecs = torch.linalg.eigh(m.T @ m)
    evals, evecs = evals.flip(0)[:rank], evecs.flip(1)[:, :rank]
    keep = evals > _rank_tol(evals, max(rows, cols))
    evals, evecs = evals[keep], evecs[:, keep]
    s = evals.sqrt()
    if rows <= cols:
        u = evecs
        vh = (evecs.T @ m) / s.unsqueeze(1)
    else:
        vh = evecs.T
        u = (m @ evecs) / s.unsqueeze(0)
    return u, s, vh


def polar(a: torch.Tensor) -> torch.Tensor:
    """Orthonormal polar factor of ``a`` (the U V^T of its SVD), via eigh of the Gram matrix.

    Directions whose singular value is numerically zero are left out (a pseudo-polar
    factor): where the references orthogonalise a rank-deficient stack with a full SVD, the
    vectors they attach to zero singular values are arbitrary (LAPACK-dependent), so we
    drop them instead. For full-rank input this is exactly U V^T.
    """
    rows, cols = a.shape
    if cols <= rows:
        evals, q = torch.linalg.eigh(a.T @ a)
        keep = evals > _rank_tol(evals, rows)
        q, evals = q[:, keep], evals[keep]
        return (a @ q) @ (q.T / evals.sqrt().unsqueeze(1))
    return polar(a.T).T


def bernoulli_keep(shape: torch.Size, keep_prob: float, gen: torch.Generator,
                   like: torch.Tensor) -> torch.Tensor:
    """0/1 mask with P(1) = keep_prob drawn from ``gen`` on ``like``'s device (seeded DARE)."""
    u = torch.rand(shape, generator=gen, device=like.device, dtype=torch.float32)
    return (u < keep_prob).to(like.dtype)
