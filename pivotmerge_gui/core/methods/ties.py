"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge (:mod:`.consensus`)."""

from __future__ import annotations

from typing import Any

import torch

from .base import MergeJob, Param, register
from .consensus import disjoint_merge, elect_sign, trim_top_k
from .task_arithmetic import TaskVectorMethod


def ties_merge(
    taus: torch.Tensor, density: float, sign_method: str, merge: str, facts: dict[str, Any] | None = None
) -> torch.Tensor:
    """TIES on a stack [K, ...]: keep each expert's top-``density`` magnitudes, elect a sign
    per entry (:func:`.consensus.elect_sign`: total mass or count of signs, with the
    project's one tie rule), then average ('mean', the paper's disjoint mean) or add
    ('sum') the entries that agree with it.

    ``facts`` (optional) receives the trimmed fraction, the share of entries with a sign
    conflict among the kept values, and the share of entries that keep any value."""
    k_count = taus.shape[0]
    trimmed = trim_top_k(taus, density)
    sign = elect_sign(trimmed, method=sign_method)
    merged, agree = disjoint_merge(trimmed, sign, reduce=merge)
    if facts is not None:
        n = trimmed[0].numel()
        before = int(torch.count_nonzero(taus))
        nonzero = (trimmed != 0).sum(0)
        agreeing = agree.sum(0)
        facts["trimmed_fraction"] = round((before - int(nonzero.sum())) / (n * k_count), 6)
        # an entry has a sign conflict iff some kept non-zero value disagrees with the elected sign
        facts["sign_conflict_fraction"] = round(float((agreeing < nonzero).float().mean()), 6)
        facts["kept_fraction"] = round(float((agreeing > 0).float().mean()), 6)
    return merged


TIES_PARAMS = (
    Param("density", float, 0.2, "k: fraction of each task vector's largest-magnitude entries kept",
          min=0.0, max=1.0),
    Param("scaling", float, 1.0, "lambda: scale of the merged task vector", min=0.0, max=5.0,
          is_scale=True),
    Param("sign_method", str, "sum", "sign election: total mass ('sum', paper) or count of signs",
          choices=("sum", "count"), advanced=True),
    Param("merge", str, "mean", "disjoint 'mean' (paper) or 'sum' of the agreeing entries",
          choices=("mean", "sum"), advanced=True),
)


@register
class Ties(TaskVectorMethod):
    name = "ties"
    pretty_name = "TIES-Merging"
    reference_url = "https://arxiv.org/abs/2306.01708"
    description = (
        "Trims each task vector to its top-k% magnitudes, elects a sign per entry by total "
        "mass and averages only the agreeing entries (disjoint mean). Reference defaults "
        "(paper): k = 20% (density 0.2), lambda = 1.0."
    )
    params = TIES_PARAMS

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        merged = ties_merge(
            taus, self.param(job, "density"), self.param(job, "sign_method"), self.param(job, "merge"), facts
        )
        return self.param(job, "scaling") * merged
