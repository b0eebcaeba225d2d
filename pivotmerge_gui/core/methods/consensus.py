"""Sign consensus of a stack of updates [K, ...]: trim, elect a sign, disjoint merge.

The TIES recipe (Yadav et al., 2023), shared by TIES, DARE-TIES, KnOTS and PivotMerge's
conflict filtering so that all of them resolve sign conflicts, and ties, the same way.

Tie rule (:func:`elect_sign`, the only one in the project): the sign of an entry is the
sign of its total (weighted) mass ``sum_k w_k tau_k`` (``method="sum"``, as in TIES and
mergekit's ``get_mask``), or of the weighted count of signs (``method="count"``). Where
that score is zero up to rounding (``|score| <= TIE_RTOL * sum_k |score_k|``; updates
measured from the experts' own mean sum to zero exactly this way) the majority of signs
decides; if that ties as well, no sign is elected (0) and every update of the entry is
dropped. An entry where every update is zero gets +1 (there is nothing to keep).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

TIE_RTOL = 1e-5  # a score this small relative to its terms is a tie (fp32 rounding margin)


def _per_expert(weights: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``weights`` [K] in ``like``'s dtype, shaped to broadcast over a [K, ...] stack."""
    w = torch.as_tensor(weights, device=like.device).to(like.dtype)
    return w.view(like.shape[0], *([1] * (like.dim() - 1)))


def trim_top_k(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of each stack[k] (TIES
    trim; at least one entry, entries tied with the threshold are kept)."""
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


def elect_sign(
    stack: torch.Tensor, method: str = "sum", *, weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Elected sign per entry (-1, 0 or +1; shape ``stack.shape[1:]``) by the module's tie
    rule. ``method``: "sum" (total mass, the TIES paper) or "count" (count of signs);
    ``weights`` [K] weigh each expert (None = all 1)."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown sign election method {method!r}")
    w = None if weights is None else _per_expert(weights, stack)
    votes = torch.sign(stack) if w is None else torch.sign(stack) * w
    if method == "count":
        score = votes
    else:
        score = stack if w is None else stack * w
    mass = score.sum(0)
    scale = score.abs().sum(0)
    count = votes.sum(0)
    del score, votes
    tie = mass.abs() <= TIE_RTOL * scale
    sign = torch.where(tie, torch.sign(count), torch.sign(mass))
    return torch.where((stack != 0).any(0), sign, torch.ones_like(sign))


def agreement(stack: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Boolean mask [K, ...]: the nonzero updates whose sign is the elected one."""
    return (stack != 0) & (torch.sign(stack) == sign.unsqueeze(0))


def disjoint_merge(
    stack: torch.Tensor,
    sign: torch.Tensor,
    weights: torch.Tensor | Sequence[float] | None = None,
    *,
    reduce: str = "mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge only the updates that agree with ``sign`` (zeros never count).

    ``reduce="mean"``: (weighted) mean over the agreeing updates, the TIES disjoint mean;
    an entry with none is 0. ``reduce="sum"``: their (weighted) sum. Returns
    (merged, agree mask [K, ...])."""
    if reduce not in ("mean", "sum"):
        raise ValueError(f"unknown disjoint merge {reduce!r}")
    agree = agreement(stack, sign)
    if weights is None:
        total = (stack * agree).sum(0)
        if reduce == "sum":
            return total, agree
        return total / agree.sum(0).clamp(min=1), agree
    w = _per_expert(weights, stack)
    total = (stack * w * agree).sum(0)
    if reduce == "sum":
        return total, agree
    return total / (w * agree).sum(0).clamp(min=1e-12), agree
