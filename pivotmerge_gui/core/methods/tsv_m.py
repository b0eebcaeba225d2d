"""TSV-M: Task Singular Vectors Merge (Gargiulo et al., CVPR 2025).

Per linear weight: keep the top 1/K of each task vector's singular triplets, stack the
U's and the V's of all tasks, whiten (orthogonalise) the stacks to remove the interference
between tasks, and rebuild  Delta = polar(U_cat) diag(S_cat) polar(V_cat).
"""

from __future__ import annotations

import torch

from ..linalg import polar, svd_top
from .base import MergeJob, Param, register
from .common import is_matrix
from .task_arithmetic import TaskVectorMethod


def tsv_bases(
    taus: torch.Tensor, rank_fraction: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int]]:
    """Whitened stacked bases of TSV-M for a stack of matrix task vectors [K, m, n].

    Returns (U_orth [m, R], S [R], V_orth [R, n], ranks per task). ``rank_fraction`` is
    the per-task fraction of min(m, n) kept; 0 means the reference's 1/K.
    """
    k_count, m, n = taus.shape
    frac = rank_fraction if rank_fraction > 0 else 1.0 / k_count
    rank = max(1, int(min(m, n) * frac))
    us, ss, vs, ranks = [], [], [], []
    for tau in taus:
        u, s, vh = svd_top(tau, rank)
        us.append(u)
        ss.append(s)
        vs.append(vh)
        ranks.append(int(s.numel()))
    u_cat, s_cat, v_cat = torch.cat(us, 1), torch.cat(ss), torch.cat(vs, 0)
    if s_cat.numel() == 0:
        return u_cat, s_cat, v_cat, ranks
    return polar(u_cat), s_cat, polar(v_cat), ranks


@register
class TSVMerge(TaskVectorMethod):
    uses_linalg = True
    name = "tsv_m"
    pretty_name = "TSV-M (Task Singular Vectors)"
    reference_url = "https://arxiv.org/abs/2412.00081"
    description = (
        "Keeps each task vector's top singular vectors (1/K of the rank per task), "
        "orthogonalises the stacked U's and V's across tasks to cut interference and rebuilds "
        "the update; 1-D tensors are averaged as in the reference code. Reference defaults: "
        "alpha = 1.0, per-task rank fraction 1/K."
    )
    params = (
        Param("alpha", float, 1.0, "scale of the merged update", min=0.0, max=5.0, is_scale=True),
        Param("rank_fraction", float, 0.0,
              "per-task fraction of singular vectors kept; 0 = 1/K (reference)", min=0.0, max=1.0,
              advanced=True),
    )

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        alpha = self.param(job, "alpha")
        if not is_matrix(kind, role, taus[0]):
            return alpha * taus.mean(0)
        u, s, v, ranks = tsv_bases(taus, self.param(job, "rank_fraction"))
        facts["rank_per_task"] = ranks
        facts["total_rank"] = int(sum(ranks))
        if s.numel() == 0:
            return torch.zeros_like(taus[0])
        return alpha * (u * s.unsqueeze(0)) @ v


__all__ = ["TSVMerge", "tsv_bases"]
