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
    k = max(1, int(round(density * n)))
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
