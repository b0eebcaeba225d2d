"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge (:mod:`.consensus`)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..linalg import map_single_threaded
from .base import MergeJob, Param, register
from .common import subtract_into
from .consensus import EXACT_COUNT_LIMIT, disjoint_merge, elect_sign, sign_from_sums, trim_threshold
from .task_arithmetic import TaskVectorMethod

#: entries per chunk of the TIES loop: a multiple of 1024 (see :func:`ties_merge`); 512 KB of
#: fp32 per expert, small enough that a chunk's stack and temporaries stay near the core
#: (L2/L3) and large enough that the ~35 torch calls per chunk, and their turns at the GIL
#: on two threads, cost little (measured on 2 cores, 4 x 16.8 M entries: 2^17 best on two
#: threads, 2^16 15% and 2^18 25% slower; on one thread 2^15-2^16 are 10% faster)
TIES_CHUNK = 1 << 17

#: up to this many entries per expert the facts' fractions are counted per chunk (below)
FACTS_COUNT_LIMIT = 1 << 24

#: integer dtype of each float dtype's bits (the trim's level below a threshold, :func:`_trim_levels`)
_BITS = {torch.float64: torch.int64, torch.float32: torch.int32, torch.bfloat16: torch.int16,
         torch.float16: torch.int16}


def _trim_levels(thresh: torch.Tensor | None, rows: int) -> list[float] | None:
    """Per-row levels ``lam_k`` with ``|x| >= t_k`` exactly when ``|x| > lam_k`` (the
    fused loop trims with ``torch.threshold_``, which keeps values above its level): the
    next float of the threshold's dtype below ``t_k`` (its bits minus one, for a positive
    float; inf gives the largest finite value), or -1 where ``t_k`` is 0 (everything is
    kept). None when a threshold is NaN or the dtype is not a float listed in ``_BITS``:
    the reference formula then runs."""
    if thresh is None:
        return [-1.0] * rows
    bits = _BITS.get(thresh.dtype)
    if bits is None or bool(torch.isnan(thresh).any()):
        return None
    t = thresh.reshape(-1).contiguous()
    below = (t.view(bits) - 1).view(t.dtype)
    return [-1.0 if tk == 0 else bk for tk, bk in zip(t.tolist(), below.tolist())]


def _exact_count(t: torch.Tensor, most: int) -> int:
    """The sum of ``t``, a float tensor of integers in [0, ``most``], exactly: in float32
    while every partial sum stays within 2^24 (exact integers), else in float64."""
    if t.dtype in (torch.float32, torch.float64) and t.numel() * most <= 1 << 24:
        return int(t.sum())
    return int(t.sum(dtype=torch.float64))


class TaskVectorRows:
    """The stack of weighted task vectors ``w_k * (theta_k - ref)`` [K, n] (entries
    flattened), computed piece by piece where it is read and never held whole: the values of
    :func:`.common.task_vectors` then :func:`.common.weighted`, entry for entry (the same
    subtraction in ``ref``'s dtype, with experts stored narrower converted first, and the
    same product with the weight in that dtype). For TIES on the CPU, writing the whole
    stack (4 x 64 MB for a 4096 x 4096 fp32 tensor) cost more than the two passes that
    read it, and it doubled the merge's peak memory."""

    def __init__(self, tensors: Sequence[torch.Tensor], ref: torch.Tensor, weights: Sequence[float]) -> None:
        self.tensors = [t.reshape(-1) for t in tensors]
        self.ref = ref.reshape(-1)
        self.entry_shape = ref.shape
        self.shape = (len(self.tensors), self.ref.numel())
        self.dtype, self.device = ref.dtype, ref.device
        self.weights = (None if all(w == 1.0 for w in weights)
                        else torch.as_tensor(list(weights), dtype=self.dtype, device=self.device))

    @staticmethod
    def fits(tensors: Sequence[torch.Tensor], ref: torch.Tensor) -> bool:
        """Whether the experts can be read this way: ``ref``'s shape and device, and a dtype
        that widens exactly to ``ref``'s (task_vectors computes in ``ref``'s dtype then)."""
        return bool(tensors) and all(
            t.shape == ref.shape and t.device == ref.device and t.is_floating_point()
            and torch.promote_types(t.dtype, ref.dtype) == ref.dtype for t in tensors)

    def _finish(self, r: int, t: torch.Tensor, ref: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        subtract_into(t, ref, out)  # as task_vectors does, entry for entry
        return out if self.weights is None else out.mul_(self.weights[r])

    def piece(self, r: int, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Entries [start, stop) of row ``r`` (into ``out`` when given)."""
        if out is None:
            out = torch.empty(stop - start, dtype=self.dtype, device=self.device)
        return self._finish(r, self.tensors[r][start:stop], self.ref[start:stop], out)

    def take(self, r: int, idx: torch.Tensor) -> torch.Tensor:
        """Entries ``idx`` of row ``r``."""
        out = torch.empty(idx.shape, dtype=self.dtype, device=self.device)
        return self._finish(r, self.tensors[r][idx], self.ref[idx], out)

    def columns(self, start: int, stop: int) -> torch.Tensor:
        """Entries [start, stop) of every row, [K, stop - start]."""
        out = torch.empty((self.shape[0], stop - start), dtype=self.dtype, device=self.device)
        for r in range(self.shape[0]):
            self.piece(r, start, stop, out=out[r])
        return out


def ties_merge(
    taus: torch.Tensor | TaskVectorRows, density: float, sign_method: str, merge: str,
    facts: dict[str, Any] | None = None, *, divide_by: str = "count", weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES on a stack [K, ...] (or :class:`TaskVectorRows`): keep each expert's
    top-``density`` magnitudes, elect a sign per entry (:func:`.consensus.elect_sign`:
    total mass or count of signs, with the project's one tie rule), then average ('mean',
    the paper's disjoint mean) or add ('sum') the entries that agree with it.

    ``divide_by`` is the mean's divisor per entry: "count" of the agreeing experts (the
    paper, FusionBench) or "weight", the sum of the agreeing experts' ``weights`` [K]
    (mergekit's ``normalize: true``: sum_k w_k tau_k m_k / sum_k w_k m_k, 1 where no
    expert agrees). The stack holds the already weighted task vectors w_k tau_k either way;
    with every weight 1 the two agree.

    ``facts`` (optional) receives the trimmed fraction, the share of entries with a sign
    conflict among the kept values, and the share of entries that keep any value."""
    if divide_by not in ("count", "weight"):
        raise ValueError(f"unknown TIES divisor {divide_by!r}")
    if merge not in ("mean", "sum"):
        raise ValueError(f"unknown disjoint merge {merge!r}")
    k_count = taus.shape[0]
    if isinstance(taus, TaskVectorRows):
        flat: torch.Tensor | TaskVectorRows = taus
        columns, out_shape = taus.columns, taus.entry_shape
    else:
        flat = taus.reshape(k_count, -1)
        columns, out_shape = (lambda s, e: flat[:, s:e]), taus.shape[1:]  # type: ignore[index]
    n = flat.shape[1]
    thresh = trim_threshold(flat, density)
    levels = _trim_levels(thresh, k_count) if k_count <= EXACT_COUNT_LIMIT else None
    w = None
    if merge == "mean" and divide_by == "weight":
        w = torch.as_tensor(list(weights) if weights is not None else [1.0] * k_count,
                            device=taus.device).to(taus.dtype).view(k_count, 1)
    merged = torch.empty(n, dtype=taus.dtype, device=taus.device)
    # the fractions of entries with a conflict / a kept value are float32 means of 0/1
    # masks; up to 2^24 entries that mean is the exact count / n, so counts per chunk do;
    # above, the masks are stored and averaged as they always were
    store_facts = facts is not None and n > FACTS_COUNT_LIMIT
    if store_facts:
        conflict = torch.empty(n, dtype=torch.bool, device=taus.device)
        kept = torch.empty(n, dtype=torch.bool, device=taus.device)

    def reference_chunk(s: int) -> tuple[int, int, int, int]:
        """Merge entries [s, s + chunk) into ``merged`` by the plain formulas; (nonzero
        before, after the trim, entries with a conflict, entries that keep a value). Runs
        where the fused loop cannot (NaN/Inf, see below)."""
        x = columns(s, min(s + chunk, n))
        trimmed = x if thresh is None else x * (x.abs() >= thresh)
        sign = elect_sign(trimmed, method=sign_method)
        total, agree = disjoint_merge(trimmed, sign, reduce="sum")
        agreeing = agree.sum(0) if facts is not None or (merge == "mean" and w is None) else None
        out = merged[s:s + chunk]
        if merge == "sum":
            out.copy_(total)
        elif w is not None:
            divisor = (w * agree).sum(0)
            torch.div(total, torch.where(divisor == 0, torch.ones_like(divisor), divisor), out=out)
        else:  # disjoint_merge's mean, with the count reused for the facts
            torch.div(total, agreeing.clamp(min=1), out=out)  # type: ignore[union-attr]
        if facts is None:
            return 0, 0, 0, 0
        nonzero = (trimmed != 0).sum(0)
        conflicts = torch.lt(agreeing, nonzero)  # some kept non-zero value disagrees
        keeps = torch.gt(agreeing, 0)
        if store_facts:
            conflict[s:s + chunk] = conflicts
            kept[s:s + chunk] = keeps
            return int(torch.count_nonzero(x)), int(nonzero.sum()), 0, 0
        return (int(torch.count_nonzero(x)), int(nonzero.sum()), int(torch.count_nonzero(conflicts)),
                int(torch.count_nonzero(keeps)))

    def fused_chunk(s: int) -> tuple[int, int, int, int]:
        """:func:`reference_chunk` in fewer passes, all of them float ops (torch's ops that
        mix bool masks and floats are several times slower per entry), bit for bit the
        same on finite entries; (nonzero before, after the trim, conflicts, kept entries):

        - after ``threshold_``, ``r`` is ``|trimmed|`` and ``m = sign(r)`` the 0/1 keep mask,
          so ``x * m`` is ``trimmed`` (a dropped negative entry is -0 in both; zeros never
          change a sum, which starts from +0) and the election's ``scale`` is ``r``'s sum;
        - with the elected sign s in {-1, 0, +1}, ``p = relu(trimmed * s)`` holds
          ``|trimmed|`` where it agrees (``trimmed * s > 0``) and 0 elsewhere: its sum is
          the agreeing sum times s (multiplying by -1 commutes with rounding), and
          ``sign(p)`` is the agreement as 0/1, whose sum is the exact count (at most
          EXACT_COUNT_LIMIT experts). A sign of -1 always has an agreeing entry, so the
          product is never a -0 where the formula gives +0.

        A chunk with NaN or Inf (its magnitude sum is not finite; an overflowing sum of
        finite values lands here too, harmlessly) takes :func:`reference_chunk`, whose
        agreement mask treats NaN its own way."""
        x = columns(s, min(s + chunk, n))
        r = x.abs()
        before = _exact_count(torch.sign(r), 1) if facts is not None else 0
        for k, level in enumerate(levels):  # type: ignore[arg-type]
            if level >= 0:
                torch.threshold_(r[k], level, 0.0)
        scale = r.sum(0)
        if not math.isfinite(float(scale.sum())):
            return reference_chunk(s)
        keep = r.sign_()
        trimmed = x * keep
        if sign_method == "count":
            votes = torch.sign(trimmed)
            sign = sign_from_sums(votes.sum(0), keep.sum(0), trimmed, finite=True)
        else:
            sign = sign_from_sums(trimmed.sum(0), scale, trimmed, finite=True)
        p = trimmed.mul_(sign).clamp_(min=0)
        total = p.sum(0).mul_(sign)
        agree = p.sign_()
        out = merged[s:s + chunk]
        agreeing = agree.sum(0) if facts is not None or (merge == "mean" and w is None) else None
        if merge == "sum":
            out.copy_(total)
        elif w is not None:
            divisor = (w * agree).sum(0)
            torch.div(total, torch.where(divisor == 0, torch.ones_like(divisor), divisor), out=out)
        else:
            torch.div(total, agreeing.clamp(min=1), out=out)  # type: ignore[union-attr]
        if facts is None:
            return 0, 0, 0, 0
        nonzero = keep.sum(0)
        if store_facts:
            torch.lt(agreeing, nonzero, out=conflict[s:s + chunk])  # type: ignore[arg-type]
            torch.gt(agreeing, 0, out=kept[s:s + chunk])  # type: ignore[arg-type]
            return before, _exact_count(nonzero, k_count), 0, 0
        # nonzero - agreeing >= 0 is an integer: its sign is 1 exactly at a conflict
        return (before, _exact_count(nonzero, k_count), _exact_count(nonzero.sub_(agreeing).sign_(), 1),
                _exact_count(agreeing.sign_(), 1))  # type: ignore[union-attr]

    # every step is entry-wise or a sum over the experts, so chunks of entries give the
    # whole-stack result exactly (chunks start at multiples of TIES_CHUNK, which keeps
    # torch's reduction over the experts in the same order for any K) and stay in cache;
    # on the CPU they run on parallel threads with single-threaded ops (map_single_threaded)
    chunk = TIES_CHUNK
    counts = map_single_threaded(fused_chunk if levels is not None else reference_chunk,
                                 range(0, n, chunk), flat.device)
    if facts is not None:
        before, nonzero_total, conflicts, keeps = (sum(c[i] for c in counts) for i in range(4))
        facts["trimmed_fraction"] = round((before - nonzero_total) / (n * k_count), 6)
        if store_facts:
            facts["sign_conflict_fraction"] = round(float(conflict.float().mean()), 6)
            facts["kept_fraction"] = round(float(kept.float().mean()), 6)
        else:  # what mean() computes: the (exact) float32 sum divided by n
            facts["sign_conflict_fraction"] = round(float(torch.tensor(float(conflicts), dtype=torch.float32).div_(n)), 6)
            facts["kept_fraction"] = round(float(torch.tensor(float(keeps), dtype=torch.float32).div_(n)), 6)
    return merged.reshape(out_shape)


TIES_PARAMS = (
    Param("density", float, 0.2,
          "k: fraction of each task vector's largest-magnitude entries kept, per tensor (as "
          "mergekit; the paper trims each whole task vector at once)", min=0.0, max=1.0),
    Param("scaling", float, 1.0, "lambda: scale of the merged task vector", min=0.0, max=5.0,
          is_scale=True),
    Param("sign_method", str, "sum", "sign election: total mass ('sum', paper) or count of signs",
          choices=("sum", "count"), advanced=True),
    Param("merge", str, "mean", "disjoint 'mean' (paper) or 'sum' of the agreeing entries "
          "(mergekit's normalize: false, the default of its dare_ties)",
          choices=("mean", "sum"), advanced=True),
    Param("divide_by", str, "count",
          "divisor of the disjoint mean: 'count' of the agreeing experts (default; TIES paper, "
          "FusionBench) or the sum of their expert 'weight's (mergekit's normalize: true); the "
          "same when every weight is 1", choices=("count", "weight"), advanced=True),
)

#: how a mergekit recipe maps onto ours (said in the descriptions and the parity benchmark)
MERGEKIT_NOTE = (
    " Per-expert weights: by default the disjoint mean divides by the count of agreeing "
    "experts (paper); mergekit divides by the sum of their weights: set divide_by: weight "
    "for its ties (normalize: true) and merge: sum for its dare_ties (normalize: false). "
    "Trimming is per tensor, as in mergekit (the paper trims each whole task vector)."
)


def merge_ties(
    method: TaskVectorMethod, taus: torch.Tensor | TaskVectorRows, job: MergeJob, facts: dict
) -> torch.Tensor:
    """TIES with ``method``'s TIES_PARAMS from ``job`` (scaled by its ``scaling``)."""
    merged = ties_merge(
        taus, method.param(job, "density"), method.param(job, "sign_method"), method.param(job, "merge"),
        facts, divide_by=method.param(job, "divide_by"), weights=job.expert_weights,
    )
    scaling = method.param(job, "scaling")
    # 1.0 * x is x, bit for bit: skip a model-sized copy at the default
    return merged if scaling == 1.0 else scaling * merged


@register
class Ties(TaskVectorMethod):
    name = "ties"
    pretty_name = "TIES-Merging"
    reference_url = "https://arxiv.org/abs/2306.01708"
    description = (
        "Trims each task vector to its top-k% magnitudes, elects a sign per entry by total "
        "mass and averages only the agreeing entries (disjoint mean). Reference defaults "
        "(paper): k = 20% (density 0.2), lambda = 1.0." + MERGEKIT_NOTE
    )
    params = TIES_PARAMS
    takes_stored_dtype = True

    def merge_one(self, name, kind, role, tensors, base, job: MergeJob, gen, facts):
        """TaskVectorMethod.merge_one with the task vectors read as :class:`TaskVectorRows`
        where they fit (the experts in their stored dtype, see ``takes_stored_dtype``):
        the same result without holding the stack."""
        ref = self.reference(tensors, base, job)
        if ref.dtype != job.dtype or not TaskVectorRows.fits(tensors, ref):
            return super().merge_one(name, kind, role, tensors, base, job, gen, facts)
        update = merge_ties(self, TaskVectorRows(tensors, ref, job.expert_weights), job, facts)
        return torch.add(ref, update, out=update)  # ref + update, into the update (ours alone)

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        return merge_ties(self, taus, job, facts)
