"""Small tensor helpers shared by the task-vector methods (stacks, weights, masks).

Linear algebra (SVD pieces, polar factor, low rank) lives in :mod:`..linalg`; trimming,
sign election and the disjoint merge live in :mod:`.consensus`.
"""

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


def is_matrix(kind: str, role: str, t: torch.Tensor) -> bool:
    """True for the weight of a ``linear`` layer: the tensors SVD-based methods treat as
    matrices (everything else takes each method's documented 1-D fallback)."""
    return kind == "linear" and role == "weight" and t.dim() == 2


def bernoulli_keep(shape: torch.Size, keep_prob: float, gen: torch.Generator,
                   like: torch.Tensor) -> torch.Tensor:
    """0/1 mask with P(1) = keep_prob drawn from ``gen`` on ``like``'s device (seeded DARE)."""
    u = torch.rand(shape, generator=gen, device=like.device, dtype=torch.float32)
    return (u < keep_prob).to(like.dtype)
