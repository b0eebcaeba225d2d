"""Small tensor helpers shared by the task-vector methods (stacks, weights, masks).

Linear algebra (SVD pieces, polar factor, low rank) lives in :mod:`..linalg`; trimming,
sign election and the disjoint merge live in :mod:`.consensus`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def task_vectors(tensors: Sequence[torch.Tensor], ref: torch.Tensor) -> torch.Tensor:
    """Stack of tau_k = theta_k - ref, shape [K, *shape], written in place into one
    allocation (no K temporaries besides the stack: half the peak of stacking differences)."""
    if not tensors or any(t.shape != ref.shape or t.device != ref.device for t in tensors):
        return torch.stack([t - ref for t in tensors])
    dtype = ref.dtype
    for t in tensors:
        dtype = torch.promote_types(dtype, t.dtype)
    out = torch.empty((len(tensors), *ref.shape), dtype=dtype, device=ref.device)
    for i, t in enumerate(tensors):
        subtract_into(t, ref, out[i])
    return out


def subtract_into(t: torch.Tensor, ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``out = t - ref`` in ``out``'s dtype. A narrower ``t`` beside a ``ref`` in that dtype
    (bf16 experts, fp32 base) is first converted into ``out``: torch's subtraction computes
    in that dtype either way, and its per-entry casting path is 4x slower than a conversion
    and a plain subtraction together."""
    widen = t.dtype != out.dtype and ref.dtype == out.dtype
    return torch.sub(out.copy_(t) if widen else t, ref, out=out)


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
