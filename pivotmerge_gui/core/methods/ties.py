"""TIES-Merging (Yadav et al., 2023): trim, elect sign, disjoint merge."""

from __future__ import annotations

from typing import Any

import torch

from .base import MergeJob, Param, register
from .task_arithmetic import TaskVectorMethod


def ties_merge(
    taus: torch.Tensor, density: float, sign_method: str, merge: str, facts: dict[str, Any] | None = None
) -> torch.Tensor:
    """TIES on a stack [K, ...]: keep each expert's top-``density`` magnitudes, elect a sign
    per entry (sign of the total mass, or of the count of signs; 0 -> +), then average
    ('mean', the paper's disjoint mean) or add ('sum') the entries that agree with it.

    Same result as ``trim_top_k`` + ``elect_sign`` + ``disjoint_mean`` from :mod:`.common`,
    computed one expert at a time so no K-sized boolean/sign stacks are allocated (on
    4 x 4096x4096 updates, one CPU thread: 2.6 s vs 3.0 s CPU, and much less peak memory)
    while also counting the trimmed and sign-conflicting entries for the report.
    """
    k_count = taus.shape[0]
    flat = taus.reshape(k_count, -1)
    n = flat.shape[1]
    keep = n if density >= 1.0 else max(1, min(n, round(density * n)))
    zero = flat.new_zeros(())
    trimmed = []
    for row in flat:
        if keep < n:
            mags = row.abs()
            threshold = mags.kthvalue(n - keep + 1).values  # keep-th largest magnitude
            row = torch.where(mags >= threshold, row, zero)
        trimmed.append(row)
    if sign_method == "count":
        mass = sum(torch.sign(t) for t in trimmed)
    else:
        mass = sum(trimmed)
    sign = torch.where(mass >= 0, 1.0, -1.0).to(flat.dtype)
    acc = torch.zeros_like(flat[0])
    agreeing = torch.zeros_like(flat[0])
    nonzero = torch.zeros_like(flat[0]) if facts is not None else None
    for t in trimmed:
        agree = (t * sign) > 0
        acc += torch.where(agree, t, zero)
        agreeing += agree
        if nonzero is not None:
            nonzero += t != 0
    merged = acc / agreeing.clamp(min=1) if merge == "mean" else acc
    if facts is not None and nonzero is not None:
        before = int(sum(int(torch.count_nonzero(r)) for r in flat))
        after = int(nonzero.sum())
        facts["trimmed_fraction"] = round((before - after) / (n * k_count), 6)
        # an entry has a sign conflict iff some kept non-zero value disagrees with the elected sign
        facts["sign_conflict_fraction"] = round(float((agreeing < nonzero).float().mean()), 6)
        facts["kept_fraction"] = round(float((agreeing > 0).float().mean()), 6)
    return merged.reshape(taus.shape[1:])


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
