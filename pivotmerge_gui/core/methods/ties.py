"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge (:mod:`.consensus`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..linalg import map_single_threaded
from .base import MergeJob, Param, register
from .consensus import disjoint_merge, elect_sign, trim_threshold
from .task_arithmetic import TaskVectorMethod

#: entries per chunk of the TIES loop: a multiple of 1024 (see :func:`ties_merge`); 4 MB of
#: fp32 per expert, few enough chunks that torch's per-op threading costs little
TIES_CHUNK = 1 << 18


def ties_merge(
    taus: torch.Tensor, density: float, sign_method: str, merge: str, facts: dict[str, Any] | None = None,
    *, divide_by: str = "count", weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """TIES on a stack [K, ...]: keep each expert's top-``density`` magnitudes, elect a sign
    per entry (:func:`.consensus.elect_sign`: total mass or count of signs, with the
    project's one tie rule), then average ('mean', the paper's disjoint mean) or add
    ('sum') the entries that agree with it.

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
    flat = taus.reshape(k_count, -1)
    n = flat.shape[1]
    thresh = trim_threshold(flat, density)
    w = None
    if merge == "mean" and divide_by == "weight":
        w = torch.as_tensor(list(weights) if weights is not None else [1.0] * k_count,
                            device=taus.device).to(taus.dtype).view(k_count, 1)
    merged = torch.empty(n, dtype=taus.dtype, device=taus.device)
    if facts is not None:
        conflict = torch.empty(n, dtype=torch.bool, device=taus.device)
        kept = torch.empty(n, dtype=torch.bool, device=taus.device)

    def one_chunk(s: int) -> tuple[int, int]:
        """Merge entries [s, s + chunk) into ``merged``; (nonzero before, after the trim)."""
        x = flat[:, s:s + chunk]
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
            return 0, 0
        nonzero = (trimmed != 0).sum(0)
        # a sign conflict: some kept non-zero value disagrees with the elected sign
        torch.lt(agreeing, nonzero, out=conflict[s:s + chunk])
        torch.gt(agreeing, 0, out=kept[s:s + chunk])
        return int(torch.count_nonzero(x)), int(nonzero.sum())

    # every step is entry-wise or a sum over the experts, so chunks of entries give the
    # whole-stack result exactly (chunks start at multiples of TIES_CHUNK, which keeps
    # torch's reduction over the experts in the same order for any K) and stay in cache;
    # on the CPU they run on parallel threads with single-threaded ops (map_single_threaded)
    chunk = TIES_CHUNK
    counts = map_single_threaded(one_chunk, range(0, n, chunk), taus.device)
    before = sum(c[0] for c in counts)
    nonzero_total = sum(c[1] for c in counts)
    if facts is not None:
        facts["trimmed_fraction"] = round((before - nonzero_total) / (n * k_count), 6)
        facts["sign_conflict_fraction"] = round(float(conflict.float().mean()), 6)
        facts["kept_fraction"] = round(float(kept.float().mean()), 6)
    return merged.reshape(taus.shape[1:])


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


def merge_ties(method: TaskVectorMethod, taus: torch.Tensor, job: MergeJob, facts: dict) -> torch.Tensor:
    """TIES with ``method``'s TIES_PARAMS from ``job`` (scaled by its ``scaling``)."""
    merged = ties_merge(
        taus, method.param(job, "density"), method.param(job, "sign_method"), method.param(job, "merge"),
        facts, divide_by=method.param(job, "divide_by"), weights=job.expert_weights,
    )
    return method.param(job, "scaling") * merged


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

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        return merge_ties(self, taus, job, facts)
