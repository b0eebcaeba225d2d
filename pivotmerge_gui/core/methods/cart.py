"""CART: Centered Arithmetic with Rank-reduced Task vectors (Choi et al., 2024,
"Revisiting Weight Averaging for Model Merging").

The reference point is the average of the experts (no shared init needed): task vectors
are centred, tau_k = theta_k - theta_avg, each matrix one is replaced by its best low-rank
approximation, and theta = theta_avg + lambda * sum_k lowrank(tau_k). Centred vectors sum to
zero, so at full rank this is exactly the weight average; the low-rank truncation is what
keeps the task-specific directions. 1-D tensors are averaged.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..linalg import svd_top
from .base import MergeJob, Param, register
from .common import is_matrix
from .task_arithmetic import TaskVectorMethod


@register
class CART(TaskVectorMethod):
    uses_linalg = True
    name = "cart"
    pretty_name = "CART (centered, low-rank)"
    reference_url = "https://arxiv.org/abs/2412.12153"
    description = (
        "Centres the experts on their weighted average and adds back the low-rank part of each "
        "centred update: theta_avg + lambda * sum_k SVD_r(theta_k - theta_avg); base-free. "
        "Defaults: rank fraction 0.08 (the paper's best region, ~8% of the rank), lambda 1.0."
    )
    needs_base = False
    uses_base = False
    params = (
        Param("rank_fraction", float, 0.08, "fraction of min(out, in) kept in each centred update",
              min=0.0, max=1.0),
        Param("scaling", float, 1.0, "lambda: scale of the summed low-rank centred updates",
              min=0.0, max=5.0, is_scale=True),
    )

    def reference(self, tensors: Sequence[torch.Tensor], base, job: MergeJob) -> torch.Tensor:
        w = job.expert_weights
        total = sum(w)
        if abs(total) < 1e-12:
            from ..errors import ParameterError

            raise ParameterError(self.name, "weight", "the expert weights sum to zero")
        return sum(wk * t for wk, t in zip(w, tensors)) / total

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        if not is_matrix(kind, role, taus[0]):
            return torch.zeros_like(taus[0])
        rank = max(1, round(min(taus.shape[1:]) * self.param(job, "rank_fraction")))
        total = torch.zeros_like(taus[0])
        kept = []
        for tau in taus:
            u, s, vh = svd_top(tau, rank)
            total += (u * s.unsqueeze(0)) @ vh
            kept.append(int(s.numel()))
        facts["rank_per_task"] = kept
        return self.param(job, "scaling") * total
