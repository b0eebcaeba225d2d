"""Iso-C and Iso-CTS (Marczak et al., ICML 2025, "No Task Left Behind: Isotropic Model
Merging with Common and Task-Specific Subspaces").

Iso-C: SVD of the summed task matrices, every singular value replaced by their mean
(a flat, isotropic spectrum). Iso-CTS: the top ``common_space_fraction`` of that spectrum's
directions are kept as the common subspace, the rest is replaced by each task's own top
directions outside it, then the bases are orthogonalised and the spectrum flattened.
1-D tensors are averaged, as in the reference code.
"""

from __future__ import annotations

from typing import Any

import torch

from ..linalg import polar, svd_rank_tol, svd_top
from .base import MergeJob, Param, register
from .common import is_matrix
from .task_arithmetic import TaskVectorMethod


def _spectrum_facts(s: torch.Tensor, facts: dict[str, Any], prefix: str = "") -> None:
    facts[prefix + "sigma_max"] = round(float(s.max()), 8) if s.numel() else 0.0
    facts[prefix + "sigma_mean"] = round(float(s.mean()), 8) if s.numel() else 0.0
    facts[prefix + "sigma_min"] = round(float(s.min()), 8) if s.numel() else 0.0


def iso_c_update(summed: torch.Tensor, facts: dict[str, Any] | None = None) -> torch.Tensor:
    """U diag(mean(sigma)) V^T of a matrix, the mean over all min(m, n) singular values.

    As in the paper and FusionBench's ``iso_c``, every direction of the SVD gets the mean,
    however small its own singular value; only numerically zero ones
    (:func:`~..linalg.svd_rank_tol`, a few eps * sigma_max: their vectors are arbitrary)
    are left out. A cut at max(m, n) * eps * sigma_max dropped real directions below
    5e-4 sigma_max in float32 that float64 kept, each worth a full mean singular value."""
    u, s, vh = torch.linalg.svd(summed, full_matrices=False)
    s_mean = s.mean()
    keep = s > svd_rank_tol(s, max(summed.shape))
    if facts is not None:
        _spectrum_facts(s, facts, "ta_")
        facts["rank"] = int(keep.sum())
        facts["iso_sigma"] = round(float(s_mean), 8)
    return s_mean * (u[:, keep] @ vh[keep])


def iso_cts_update(
    taus: torch.Tensor, common_space_fraction: float, facts: dict[str, Any] | None = None
) -> torch.Tensor:
    """Iso-CTS update (before alpha) for a stack of matrix task vectors [K, m, n]."""
    k_count, m, n = taus.shape
    min_dim = min(m, n)
    # common size such that the task-specific remainder splits evenly across tasks (reference)
    common = int(min_dim * common_space_fraction)
    task_total = round((min_dim - common) / k_count) * k_count
    common = min_dim - task_total
    per_task = task_total // k_count
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    uc, sc, vc = u[:, :common], s[:common], vh[:common]
    # When U is a complete basis of the output space (m <= n), the part of tau outside the
    # common subspace is U_perp (U_perp^T tau): its SVD is that of the small
    # (m - common) x n coefficient matrix, mapped back by U_perp, which is exact and avoids
    # an m x m eigenproblem per task.
    complement = u[:, common:] if u.shape[1] == m else None
    us, ss, vs = [], [], []
    for tau in taus:
        if complement is not None:
            ut, st, vt = svd_top(complement.T @ tau, per_task)  # ut in complement coordinates
        else:
            ut, st, vt = svd_top(tau - uc @ (uc.T @ tau), per_task)
        us.append(ut)
        ss.append(st)
        vs.append(vt)
    s_all = torch.cat(ss + [sc])
    v_all = torch.cat(vs + [vc], 0)
    if complement is not None:
        # the task columns live in the complement of U_c, so the Gram matrix of the stacked
        # U is block diagonal and its polar factor is [U_perp polar(task coords), U_c]
        u_orth = torch.cat([complement @ polar(torch.cat(us, 1)), uc], 1)
    else:
        u_orth = polar(torch.cat(us + [uc], 1))
    # mean over all min_dim slots: a task whose remainder has fewer non-zero directions
    # contributes zeros there, as in the reference
    s_iso = s_all.sum() / min_dim
    if facts is not None:
        _spectrum_facts(s, facts, "ta_")
        facts["common_dims"] = int(common)
        facts["task_dims_each"] = int(per_task)
        facts["iso_sigma"] = round(float(s_iso), 8)
    return s_iso * (u_orth @ polar(v_all))


@register
class IsoC(TaskVectorMethod):
    uses_linalg = True
    name = "iso_c"
    pretty_name = "Iso-C"
    reference_url = "https://arxiv.org/abs/2502.04959"
    description = (
        "Sums the task matrices and flattens the spectrum of the sum: every singular value is "
        "replaced by their mean (isotropic merging in the common subspace); 1-D tensors are "
        "averaged. Reference default alpha = 1.0 (FusionBench iso_c; the paper tunes it)."
    )
    params = (
        Param("alpha", float, 1.0, "scale of the merged update", min=0.0, max=5.0, is_scale=True),
    )

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        alpha = self.param(job, "alpha")
        if not is_matrix(kind, role, taus[0]):
            return alpha * taus.mean(0)
        return alpha * iso_c_update(taus.sum(0), facts)


@register
class IsoCTS(TaskVectorMethod):
    uses_linalg = True
    name = "iso_cts"
    pretty_name = "Iso-CTS"
    reference_url = "https://arxiv.org/abs/2502.04959"
    description = (
        "Iso-C with the least significant common directions replaced by each task's own top "
        "directions outside the common subspace; bases orthogonalised, spectrum flattened; "
        "1-D tensors averaged. Reference defaults (FusionBench iso_cts): common space fraction "
        "0.8, alpha = 1.0."
    )
    params = (
        Param("alpha", float, 1.0, "scale of the merged update", min=0.0, max=5.0, is_scale=True),
        Param("common_space_fraction", float, 0.8,
              "fraction of the rank given to the common subspace", min=0.0, max=1.0),
    )

    def merge_update(self, name, kind, role, taus, job: MergeJob, gen, facts):
        alpha = self.param(job, "alpha")
        if not is_matrix(kind, role, taus[0]):
            return alpha * taus.mean(0)
        return alpha * iso_cts_update(taus, self.param(job, "common_space_fraction"), facts)
