"""KnOTS (Stoica et al., ICLR 2025, "Model merging with SVD to tie the KnOTS").

Per linear weight: the task updates are concatenated along the input dimension,
[Delta_1 ... Delta_K] = U S [V_1 ... V_K], which puts all of them in one shared output
basis U; the aligned per-task coefficients S V_k (``s_on_V`` in the reference) are merged
with TIES (or summed), and the update is rebuilt as U * merged.

U comes from ``eigh(sum_k Delta_k Delta_k^T)`` (an m x m problem) instead of an SVD of the
m x (K n) concatenation, and S V_k = U^T Delta_k needs no division by S. The Gram matrix
and its eigenproblem are computed in float64 whatever the compute dtype: in float32 the
Gram matrix squares the condition number, so directions below ~sqrt(eps) sigma_max come
back as an arbitrary rotation of the small subspace, and TIES on the aligned coefficients
depends on that basis (a float32 merge differed from float64 by up to 30 %). As in the
reference (a thin SVD of the concatenation), the basis has min(m, K n) directions, null
ones included (their coefficients are zero, so they only count in the top-k size). For a
1-D tensor the same construction on a 1-row matrix gives U = +-1 and S V_k = Delta_k, i.e.
TIES on the raw task vectors, which is what this module does there.
"""

from __future__ import annotations

import torch

from ..linalg import gram_float64
from .base import MergeJob, Param, register
from .common import is_matrix
from .task_arithmetic import TaskVectorMethod
from .ties import ties_merge


def knots_align(taus: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(U [m, r], coefficients [K, r, n]) with Delta_k = U @ coefficients[k] (up to
    rounding) and r = min(m, K n): the left singular vectors of [Delta_1 ... Delta_K],
    largest first."""
    k_count, m, n = taus.shape
    _, evecs = torch.linalg.eigh(gram_float64(taus))
    u64 = evecs[:, m - min(m, k_count * n):].flip(1)
    # coefficients in float64 too, rounded once: TIES' trim and sign decisions on them
    # then see the same numbers as a float64 merge up to that one rounding
    coeffs = torch.stack([(u64.T @ tau.double()).to(taus.dtype) for tau in taus])
    return u64.to(taus.dtype), coeffs


@register
class KnOTS(TaskVectorMethod):
    uses_linalg = True
    name = "knots"
    pretty_name = "KnOTS"
    reference_url = "https://arxiv.org/abs/2410.19735"
    description = (
        "Aligns the task updates in the shared basis of the SVD of their concatenation, merges "
        "the aligned coefficients S V_k with TIES and rebuilds the update; 1-D tensors get TIES "
        "directly. Reference defaults (KnOTS-TIES, ViT-B/32 config): top-k 20% (density 0.2), "
        "disjoint mean, scaling 0.6."
    )
    params = (
        Param("density", float, 0.2, "TIES top-k fraction kept in each aligned coefficient matrix",
              min=0.0, max=1.0),
        Param("scaling", float, 0.6, "lambda: scale of the merged update", min=0.0, max=5.0,
              is_scale=True),
        Param("merge", str, "ties", "how aligned coefficients are merged: 'ties' or 'linear' (sum)",
              choices=("ties", "linear")),
    )

    def _merge_coeffs(self, coeffs: torch.Tensor, job: MergeJob, facts: dict) -> torch.Tensor:
        if self.param(job, "merge") == "linear":
            return coeffs.sum(0)
        return ties_merge(coeffs, self.param(job, "density"), "sum", "mean", facts)

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        scale = self.param(job, "scaling")
        if not is_matrix(kind, role, taus[0]):
            return scale * self._merge_coeffs(taus, job, facts)
        u, coeffs = knots_align(taus)
        facts["shared_rank"] = int(u.shape[1])
        if u.shape[1] == 0:
            return torch.zeros_like(taus[0])
        return scale * (u @ self._merge_coeffs(coeffs, job, facts))
