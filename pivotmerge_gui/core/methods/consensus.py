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
from typing import Protocol

import numpy as np
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
#: entries per piece of a long CPU row in the bracketing pass: the piece and its masks stay
#: in cache (a whole-row pass writes and faults in a row-sized temporary per step) and the
#: Python between numpy's calls holds the GIL rarely enough for rows on two threads to run
#: in parallel (measured, 4 x 16.8 M entries on 2 cores: 2^18 best, 2^16 50% slower)
SELECT_PIECE = 1 << 18


class Rows(Protocol):
    """A stack [K, n] whose rows may be computed where they are read rather than held
    (:class:`.ties.TaskVectorRows`): what :func:`kth_largest_abs` reads of it."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device

    def piece(self, r: int, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of row ``r`` (1-D)."""
        ...

    def take(self, r: int, idx: torch.Tensor) -> torch.Tensor:
        """Entries ``idx`` of row ``r``."""
        ...


class _TensorRows:
    """:class:`Rows` of a tensor [K, n] (views)."""

    def __init__(self, flat: torch.Tensor) -> None:
        self.flat, self.shape, self.dtype, self.device = flat, tuple(flat.shape), flat.dtype, flat.device

    def piece(self, r: int, start: int, stop: int) -> torch.Tensor:
        return self.flat[r, start:stop]

    def take(self, r: int, idx: torch.Tensor) -> torch.Tensor:
        return self.flat[r][idx]


def kth_largest_abs(flat: torch.Tensor | Rows, k: int) -> torch.Tensor:
    """The ``k``-th largest magnitude of each row of ``flat`` [K, n] (a tensor or
    :class:`Rows`), [K, 1]: exactly ``flat.abs().kthvalue(n - k + 1, dim=1,
    keepdim=True).values``, ties and all.

    Long rows: the magnitudes of a fixed random sample bracket the answer (rank +- 6 sigma of
    the sample quantile), two counts place the bracket's ends among all n entries, and the
    selection runs only on the entries inside it (a few % of the row; on the CPU with
    numpy's partition, elsewhere ``kthvalue``). Where the bracket misses the rank or the row
    holds NaN (the counts do not add up to n) the row falls back to ``kthvalue`` on all of
    it, so the result never depends on the sample. On the CPU long rows are read in pieces,
    so a :class:`Rows` that computes them (TIES's task vectors) is never held whole."""
    rows, n = flat.shape
    src = _TensorRows(flat) if isinstance(flat, torch.Tensor) else flat
    j = n - k + 1  # ascending rank of the threshold
    if n <= SELECT_DIRECT_LIMIT:
        whole = flat if isinstance(flat, torch.Tensor) else torch.stack([src.piece(r, 0, n) for r in range(rows)])
        return whole.abs().kthvalue(j, dim=1, keepdim=True).values
    out = torch.empty((rows, 1), dtype=src.dtype, device=src.device)
    gen = torch.Generator(device=src.device).manual_seed(n)
    idx = torch.randint(n, (SELECT_SAMPLE,), generator=gen, device=src.device)
    q = j / n
    d = 6.0 * math.sqrt(q * (1.0 - q) / SELECT_SAMPLE) + 4.0 / SELECT_SAMPLE
    lo_i, hi_i = math.floor((q - d) * SELECT_SAMPLE), math.ceil((q + d) * SELECT_SAMPLE)
    cpu = src.device.type == "cpu"
    wide = torch.float64 if src.dtype == torch.float64 else torch.float32

    def one_row(r: int) -> None:
        # on the CPU, numpy sorts the sample and selects in the band 2-4x faster than torch
        # (in float32/float64, which hold every narrower float exactly)
        sample = src.take(r, idx).abs()
        ranked = np.sort(sample.to(wide).numpy()) if cpu else sample.sort().values
        lo = float(ranked[lo_i]) if lo_i > 0 else 0.0
        hi = float(ranked[hi_i]) if hi_i < SELECT_SAMPLE - 1 else math.inf
        below, above, band = _bracket_cpu(src, r, lo, hi) if cpu else _bracket(src, r, lo, hi)
        # NaN is neither >= lo nor <= hi: with NaN the counts add up to less than n
        if below < j <= n - above and below + len(band) + above == n:
            if isinstance(band, np.ndarray):
                out[r] = float(np.partition(band, j - below - 1)[j - below - 1])
            else:
                out[r] = band.kthvalue(j - below).values
        else:
            out[r] = src.piece(r, 0, n).abs().kthvalue(j).values

    map_single_threaded(one_row, range(rows), src.device)  # rows are independent
    return out


def _bracket(src: Rows, r: int, lo: float, hi: float) -> tuple[int, int, torch.Tensor]:
    """(entries of ``|row r|`` below ``lo``, entries above ``hi``, the entries in [lo, hi]
    in row order); ``lo`` and ``hi`` are values of the rows' dtype (exact as floats)."""
    a = src.piece(r, 0, src.shape[1]).abs()
    ge, le = a >= lo, a <= hi
    return a.numel() - int(torch.count_nonzero(ge)), a.numel() - int(torch.count_nonzero(le)), a[ge & le]


def _bracket_cpu(src: Rows, r: int, lo: float, hi: float) -> tuple[int, int, np.ndarray]:
    """:func:`_bracket` on the CPU, in pieces of :data:`SELECT_PIECE` entries through numpy:
    its comparisons into bool masks and its mask selection run several times faster than
    torch's (measured: 20 ms against 50 ms for torch in pieces and 110 ms on the whole
    row, per 16.8 M entries). Each piece's magnitudes are written by torch into a float32
    buffer (float64 for float64 rows), exactly: every narrower float converts exactly, so
    the counts and the selected values (returned in that buffer's dtype) are those of the
    rows' own dtype."""
    wide = torch.float64 if src.dtype == torch.float64 else torch.float32
    n = src.shape[1]
    size = min(SELECT_PIECE, n)
    buf = torch.empty(size, dtype=wide)
    mags, ge, le = buf.numpy(), np.empty(size, dtype=bool), np.empty(size, dtype=bool)
    lo_, hi_ = mags.dtype.type(lo), mags.dtype.type(hi)
    below = above = 0
    parts = []
    for s in range(0, n, size):
        m = min(size, n - s)
        piece = src.piece(r, s, s + m)
        if piece.dtype == wide:
            torch.abs(piece, out=buf[:m])
        else:
            buf[:m].copy_(piece).abs_()
        a, g, l_ = mags[:m], ge[:m], le[:m]
        np.greater_equal(a, lo_, out=g)
        np.less_equal(a, hi_, out=l_)
        below += m - int(np.count_nonzero(g))
        above += m - int(np.count_nonzero(l_))
        parts.append(a[np.logical_and(g, l_, out=g)])
    return below, above, np.concatenate(parts)


def trim_threshold(flat: torch.Tensor | Rows, density: float) -> torch.Tensor | None:
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
    (and NaN where one is NaN, as ``stack != 0`` is then true), so it marks those entries.
    In the count election the score is ``torch.sign``, which maps NaN to 0: there a NaN
    update casts no vote, and an entry whose only non-zero update is NaN counts as empty
    (+1), where :func:`elect_sign`'s general formula gives 0."""
    score = torch.sign(stack) if method == "count" else stack
    return sign_from_sums(score.sum(0), score.abs().sum(0), stack)


def sign_from_sums(
    mass: torch.Tensor, scale: torch.Tensor, stack: torch.Tensor, *, finite: bool = False
) -> torch.Tensor:
    """The unweighted election's sign from the score's sums over the experts, ``mass``
    (sum) and ``scale`` (sum of magnitudes), both in the order :func:`_elect_sign_unweighted`
    takes them; ``stack`` is read only at ties. For callers that have the sums at hand (the
    fused TIES loop) so that the rule stays written once.

    ``finite``: the caller knows both sums are finite. The same signs then come from float
    ops only (torch's comparisons into bool masks, ``any`` and ``masked_fill_`` cost several
    times a float op per entry): ``sign(scale)`` is 1 where an update is non-zero and 0
    where all are (empty), ``TIE_RTOL * scale - |mass|`` is >= 0 exactly at a tie (the sign
    of a difference is exact), and an empty entry's ``sign(mass)`` is 0 (a sum starts from
    +0), so adding ``1 - sign(scale)`` gives it +1 and leaves the others as they are."""
    sign = torch.sign(mass)
    if finite:
        vacant = torch.sign(scale).neg_().add_(1)  # 1 where empty, else 0
        slack = (TIE_RTOL * scale).sub_(mass.abs()).sub_(vacant)  # < 0 where empty
        if float(slack.amax()) >= 0:
            at = (slack >= 0).nonzero(as_tuple=True)
            sign[at] = torch.sign(torch.sign(stack[(slice(None), *at)]).sum(0))
        return sign.add_(vacant)
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
