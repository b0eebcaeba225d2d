"""DARE (Yu et al., 2024, "Language Models are Super Mario"): Drop And REscale.

Each task vector entry is dropped with probability p and the survivors are multiplied by
1 / (1 - p), so the sparsified vector equals the original in expectation. The masks come
from the job's seeded generator: the same seed gives the same merge on every run.
"""

from __future__ import annotations

import torch

from .base import MergeJob, Param, register
from .common import bernoulli_keep
from .task_arithmetic import TaskVectorMethod
from .ties import MERGEKIT_NOTE, TIES_PARAMS, merge_ties


def dare(taus: torch.Tensor, drop_rate: float, gen: torch.Generator, rescale: bool = True) -> torch.Tensor:
    """Drop each entry of every stack[k] with probability ``drop_rate``; rescale survivors."""
    if drop_rate <= 0.0:
        return taus
    if drop_rate >= 1.0:
        return torch.zeros_like(taus)
    keep = bernoulli_keep(taus.shape, 1.0 - drop_rate, gen, taus)
    out = taus * keep
    return out / (1.0 - drop_rate) if rescale else out


_DARE_PARAMS = (
    Param("drop_rate", float, 0.5, "p: probability of dropping each task-vector entry", min=0.0,
          max=0.99),
    Param("rescale", bool, True, "multiply the kept entries by 1/(1-p) (keeps the expectation)",
          advanced=True),
)


@register
class DareLinear(TaskVectorMethod):
    name = "dare_linear"
    pretty_name = "DARE (Task Arithmetic)"
    reference_url = "https://arxiv.org/abs/2311.03099"
    description = (
        "Randomly drops a fraction p of each task vector, rescales the rest by 1/(1-p) and "
        "adds them with Task Arithmetic. Reference defaults (FusionBench DareTaskArithmetic): "
        "p = 0.5, lambda = 0.3."
    )
    randomized = True
    params = _DARE_PARAMS + (
        Param("scaling", float, 0.3, "lambda: scale of the summed task vectors", min=0.0, max=5.0,
              is_scale=True),
    )

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        p = self.param(job, "drop_rate")
        dropped = dare(taus, p, gen, self.param(job, "rescale"))
        facts["dropped_fraction"] = round(float(((dropped == 0) & (taus != 0)).float().mean()), 6)
        return self.param(job, "scaling") * dropped.sum(0)


@register
class DareTies(TaskVectorMethod):
    name = "dare_ties"
    pretty_name = "DARE + TIES"
    reference_url = "https://arxiv.org/abs/2311.03099"
    description = (
        "DARE drop-and-rescale on each task vector, then TIES (trim, sign election, disjoint "
        "mean), in that order as in the DARE code and FusionBench's DareTiesMerging. Defaults: "
        "p = 0.5 (FusionBench), TIES density 0.2 and lambda = 1.0 (TIES paper)." + MERGEKIT_NOTE
    )
    randomized = True
    params = _DARE_PARAMS + TIES_PARAMS

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        dropped = dare(taus, self.param(job, "drop_rate"), gen, self.param(job, "rescale"))
        facts["dropped_fraction"] = round(float(((dropped == 0) & (taus != 0)).float().mean()), 6)
        return merge_ties(self, dropped, job, facts)
