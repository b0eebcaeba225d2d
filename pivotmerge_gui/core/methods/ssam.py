"""SSAM-style shared-subspace merge (after Reza et al., 2026, arXiv 2603.21584, "Singular
Subspace Alignment for Merging Multimodal LLMs").

Per linear weight with task updates Delta_k [m, n]:
  U_c = top-r eigenvectors of sum_k Delta_k Delta_k^T    (shared output subspace)
  V_c = top-r eigenvectors of sum_k Delta_k^T Delta_k    (shared input subspace)
  M_k = U_c^T Delta_k V_c   (each update in the shared r x r coordinates)
  Delta = lambda * U_c merge(M_k) V_c^T,  merge = mean (default) or sum.
Both subspaces come from eigh of Gram matrices (never an SVD of a concatenation), in
float64 when float32 rounding would blur the eigenvalues asked for.

Choices made here (the paper's exact defaults were not available to us): rank fraction
r = 0.5 * min(m, n), merge by the mean, lambda = 1.0; 1-D tensors take the same merge
(mean or sum) of their task vectors. With one expert and r = full rank this is exactly
Task Arithmetic; with one expert and smaller r it is lambda * (best rank-r approximation).
"""

from __future__ import annotations

import torch

from ..linalg import gram_top_eigvecs
from .base import MergeJob, Param, register
from .common import is_matrix
from .task_arithmetic import TaskVectorMethod


def shared_subspaces(taus: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(U_c [m, r], V_c [n, r]): top-``rank`` eigenvectors of the summed Gram matrices
    (float64 where the compute dtype's rounding would blur them:
    :func:`~..linalg.gram_top_eigvecs`)."""
    return gram_top_eigvecs(taus, rank), gram_top_eigvecs(taus, rank, right=True)


@register
class SSAM(TaskVectorMethod):
    uses_linalg = True
    name = "ssam"
    pretty_name = "SSAM (shared subspace)"
    reference_url = "https://arxiv.org/abs/2603.21584"
    description = (
        "Finds the shared output and input subspaces of all task updates (top eigenvectors of "
        "sum Delta Delta^T and sum Delta^T Delta), projects every update into them, merges there "
        "and maps back. Our defaults (not the paper's, which we could not check): rank "
        "fraction 0.5, mean merge, lambda 1.0."
    )
    params = (
        Param("rank_fraction", float, 0.5, "shared subspace rank as a fraction of min(out, in)",
              min=0.0, max=1.0),
        Param("scaling", float, 1.0, "lambda: scale of the merged update", min=0.0, max=5.0,
              is_scale=True),
        Param("merge", str, "mean", "merge in the subspace: 'mean' or 'sum' of the projections",
              choices=("mean", "sum")),
    )

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        scale = self.param(job, "scaling")
        reduce = (lambda x: x.mean(0)) if self.param(job, "merge") == "mean" else (lambda x: x.sum(0))
        if not is_matrix(kind, role, taus[0]):
            return scale * reduce(taus)
        rank = max(1, round(min(taus.shape[1:]) * self.param(job, "rank_fraction")))
        u, v = shared_subspaces(taus, rank)
        coords = torch.einsum("ir,kij,js->krs", u, taus, v)
        norms = taus.flatten(1).pow(2).sum(1).clamp(min=torch.finfo(taus.dtype).tiny)
        facts["rank"] = [int(u.shape[1]), int(v.shape[1])]
        facts["captured_energy"] = [round(float(x), 6) for x in coords.flatten(1).pow(2).sum(1) / norms]
        return scale * (u @ reduce(coords) @ v.T)
