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

import math
from collections.abc import Sequence

import torch

from ..linalg import map_single_threaded

TIE_RTOL = 1e-5  # a score this small relative to its terms is a tie (fp32 rounding margin)


def _per_expert(weights: torch.Tensor | Sequence[float], like: torch.Tensor) -> torch.Tensor:
    """``weights`` [K] in ``like``'s dtype, shaped to broadcast over a [K, ...] stack."""
    w = torch.as_tensor(weights, device=like.device).to(like.dtype)
    return w.view(like.shape[0], *([1] * (like.dim() - 1)))


#: rows up to this many entries take ``kthvalue`` directly; longer ones are bracketed first
SELECT_DIRECT_LIMIT = 1 << 18
#: entries sampled to bracket the threshold of a long row
SELECT_SAMPLE = 1 << 15


def kth_largest_abs(flat: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k``-th largest magnitude of each row of ``flat`` [K, n], [K, 1]: exactly
    ``flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values``, ties and all.

    Long rows: the magnitudes of a fixed random sample bracket the answer (rank +- 6 sigma of
    the sample quantile), two counts place the bracket's ends among all n entries, and
    ``kthvalue`` runs only on the entries inside it (a few % of the row). Where the bracket
    misses the rank or the row holds NaN (the counts do not add up to n) the row falls back
    to ``kthvalue`` on all of it, so the result never depends on the sample."""
    rows, n = flat.shape
    j = n - k + 1  # ascending rank of the threshold
    if n <= SELECT_DIRECT_LIMIT:
        return flat.abs().kthvalue(j, dim=1, keepdim=True).values
    out = torch.empty((rows, 1), dtype=flat.dtype, device=flat.device)
    gen = torch.Generator(device=flat.device).manual_seed(n)
    idx = torch.randint(n, (SELECT_SAMPLE,), generator=gen, device=flat.device)
    q = j / n
    d = 6.0 * math.sqrt(q * (1.0 - q) / SELECT_SAMPLE) + 4.0 / SELECT_SAMPLE
    lo_i, hi_i = math.floor((q - d) * SELECT_SAMPLE), math.ceil((q + d) * SELECT_SAMPLE)

    def one_row(r: int) -> None:
        a = flat[r].abs()
        sample = a[idx].sort().values
        # entries >= lo and <= hi; NaN is neither, so the counts below add up to n + #NaN
        ge = a >= (sample[lo_i] if lo_i > 0 else 0.0)
        le = a <= (sample[hi_i] if hi_i < SELECT_SAMPLE - 1 else math.inf)
        below = n - int(torch.count_nonzero(ge))
        above = n - int(torch.count_nonzero(le))
        if below < j <= n - above:
            band = a[ge & le]
            if below + band.numel() + above == n:  # no NaN: every entry counted once
                out[r] = band.kthvalue(j - below).values
                return
        out[r] = a.kthvalue(j).values

    map_single_threaded(one_row, range(rows), flat.device)  # rows are independent
    return out


def trim_threshold(flat: torch.Tensor, density: float) -> torch.Tensor | None:
    """Per-row magnitude threshold [K, 1] of the TIES trim of ``flat`` [K, n] (the
    ``density`` fraction of largest magnitudes, at least one entry), or None when it keeps
    everything."""
    if density >= 1.0:
        return None
    n = flat.shape[1]
    k = max(1, round(density * n))
    if k >= n:
        return None
    return kth_largest_abs(flat, k)


def trim_top_k(stack: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the ``density`` fraction of largest-magnitude entries of each stack[k] (TIES
    trim; at least one entry, entries tied with the threshold are kept)."""
    flat = stack.reshape(stack.shape[0], -1)
    thresh = trim_threshold(flat, density)
    if thresh is None:
        return stack
    return (flat * (flat.abs() >= thresh)).reshape(stack.shape)


def elect_sign(
    stack: torch.Tensor, method: str = "sum", *, weights: torch.Tensor | Sequence[float] | None = None
) -> torch.Tensor:
    """Elected sign per entry (-1, 0 or +1; shape ``stack.shape[1:]``) by the module's tie
    rule. ``method``: "sum" (total mass, the TIES paper) or "count" (count of signs);
    ``weights`` [K] weigh each expert (None = all 1)."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown sign election method {method!r}")
    if weights is None and stack.dim() > 1 and stack.shape[0] <= EXACT_COUNT_LIMIT:
        return _elect_sign_unweighted(stack, method)
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


#: a sum of this many -1/0/+1 is exact in every float dtype (bf16 holds integers to 256)
EXACT_COUNT_LIMIT = 256


def _elect_sign_unweighted(stack: torch.Tensor, method: str) -> torch.Tensor:
    """:func:`elect_sign` without weights, with fewer passes over the stack and the same
    result: the count of signs is a sum of -1/0/+1, exact in any order (for at most
    :data:`EXACT_COUNT_LIMIT` experts), so it is taken only
    at the (rare) ties; the total magnitude ``scale`` is 0 exactly where every update is 0
    (and NaN where one is NaN, as ``stack != 0`` is then true), so it marks those entries."""
    score = torch.sign(stack) if method == "count" else stack
    mass = score.sum(0)
    scale = score.abs().sum(0)
    sign = torch.sign(mass)
    empty = scale == 0
    tie = (mass.abs() <= TIE_RTOL * scale) & ~empty
    if bool(tie.any()):
        at = tie.nonzero(as_tuple=True)
        sign[at] = torch.sign(torch.sign(stack[(slice(None), *at)]).sum(0))
    return sign.masked_fill_(empty, 1)


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
