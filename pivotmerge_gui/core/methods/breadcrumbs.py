"""Model Breadcrumbs (Davari & Belilovsky, 2024): mask both magnitude tails, then add."""

from __future__ import annotations

import torch

from .base import MergeJob, Param, register
from .task_arithmetic import TaskVectorMethod


def breadcrumbs_mask(taus: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    """Per expert: drop the ``gamma`` fraction of largest magnitudes (outliers) and the
    smallest ones so that a ``density`` fraction is left (mergekit's magnitude_outliers).

    Thresholds come from ``kthvalue`` (linear time) instead of a full sort; entries tied
    exactly at a threshold are kept."""
    k_count = taus.shape[0]
    flat = taus.reshape(k_count, -1).abs()
    n = flat.shape[1]
    n_top = min(n, round(gamma * n))
    n_keep = max(0, min(n - n_top, round(density * n)))
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_keep == 0:
        return torch.zeros_like(taus, dtype=torch.bool)
    if n_top > 0:
        hi = flat.kthvalue(n - n_top, dim=1, keepdim=True).values  # largest value kept
        keep &= flat <= hi
    lowest_rank = n - n_top - n_keep + 1  # 1-based rank (ascending) of the smallest kept value
    if lowest_rank > 1:
        lo = flat.kthvalue(lowest_rank, dim=1, keepdim=True).values
        keep &= flat >= lo
    return keep.reshape(taus.shape)


@register
class Breadcrumbs(TaskVectorMethod):
    name = "breadcrumbs"
    pretty_name = "Model Breadcrumbs"
    reference_url = "https://arxiv.org/abs/2312.06795"
    description = (
        "Per tensor and expert, removes the largest-magnitude outliers (top gamma) and the "
        "smallest entries (keeping a density fraction in between), then adds the masked task "
        "vectors with Task Arithmetic. Defaults: density 0.9, gamma 0.01 (mergekit's "
        "documented values), lambda 0.3 (as Task Arithmetic)."
    )
    params = (
        Param("density", float, 0.9, "fraction of entries kept per task vector", min=0.0, max=1.0),
        Param("gamma", float, 0.01, "fraction of largest-magnitude entries removed", min=0.0, max=1.0),
        Param("scaling", float, 0.3, "lambda: scale of the summed masked task vectors", min=0.0,
              max=5.0, is_scale=True),
    )

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        keep = breadcrumbs_mask(taus, self.param(job, "density"), self.param(job, "gamma"))
        facts["kept_fraction"] = round(float(keep.float().mean()), 6)
        return self.param(job, "scaling") * (taus * keep).sum(0)
