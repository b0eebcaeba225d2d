"""Identical experts merge to themselves, or to base + the method's scaled update.

With K identical experts theta = base + tau (weights 1), each method's defining formula
gives (written per tensor; "matrix" = a linear layer's 2-D weight):
- linear, cart, regmean, regmean_pp, prodistill: theta itself.
- task_arithmetic, dare_linear (p = 0), breadcrumbs: base + lambda * K * mask(tau)
  (mask = identity for TA/DARE, the two-tailed Breadcrumbs mask otherwise).
- ties, dare_ties (p = 0): base + lambda * trim_density(tau) (every sign agrees).
- tsv_m: matrix: base + alpha * best rank-floor(min(m,n)/K) approximation of tau;
  1-D: base + alpha * tau.
- iso_c: matrix: base + alpha * mean(sigma(K tau)) * U V^T (SVD of tau); 1-D: base + alpha tau.
- iso_cts: matrix: base + alpha * s_iso * U_r V_r^T with r = c + n_task (c the common size,
  n_task the per-task size) and s_iso = K * sum_{i<r} sigma_i(tau) / min(m, n); 1-D as iso_c.
- knots: matrix: base + lambda * U trim_density(U^T tau) (U = left singular vectors; the
  top-k size counts min(m, K n) rows of coefficients, as the reference's SVD of the concatenation);
  1-D: base + lambda * trim_density(tau).
- ssam: matrix: base + lambda * best rank-round(f*min(m,n)) approximation of tau; 1-D: base + lambda tau.
"""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.methods import get_method, list_methods
from pivotmerge_gui.core.methods.breadcrumbs import breadcrumbs_mask
from pivotmerge_gui.core.methods.consensus import trim_top_k
from tests.conftest import make_mlp_projector

from .helpers import calibration_for, job_for, offset, random_delta, run

K = 3
NAMES = [m.name for m in list_methods() if m.name != "pivotmerge"]


def _trunc(t: torch.Tensor, r: int) -> torch.Tensor:
    u, s, vh = torch.linalg.svd(t.double(), full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float()


def expected(name: str, params: dict, key: str, base: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    theta = base + tau
    matrix = key.endswith(".weight") and tau.dim() == 2
    if name in ("linear", "cart", "regmean", "regmean_pp", "prodistill"):
        return theta
    if name in ("task_arithmetic", "dare_linear"):
        return base + params["scaling"] * K * tau
    if name == "breadcrumbs":
        mask = breadcrumbs_mask(tau.unsqueeze(0), params["density"], params["gamma"])[0]
        return base + params["scaling"] * K * tau * mask
    if name in ("ties", "dare_ties"):
        return base + params["scaling"] * trim_top_k(tau.unsqueeze(0), params["density"])[0]
    if name == "tsv_m":
        if not matrix:
            return base + params["alpha"] * tau
        return base + params["alpha"] * _trunc(tau, int(min(tau.shape) / K))
    if name == "iso_c":
        if not matrix:
            return base + params["alpha"] * tau
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        return base + (params["alpha"] * (K * s).mean() * (u @ vh)).float()
    if name == "iso_cts":
        if not matrix:
            return base + params["alpha"] * tau
        min_dim = min(tau.shape)
        common = int(min_dim * params["common_space_fraction"])
        task_total = round((min_dim - common) / K) * K
        common = min_dim - task_total
        r = common + task_total // K
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        s_iso = K * s[:r].sum() / min_dim
        return base + (params["alpha"] * s_iso * (u[:, :r] @ vh[:r])).float()
    if name == "knots":
        if not matrix:
            return base + params["scaling"] * trim_top_k(tau.unsqueeze(0), params["density"])[0]
        # the reference's thin SVD of [tau ... tau] has min(m, K n) directions; the ones past
        # rank(tau) carry zero coefficients but count in the top-k size
        u, s, vh = torch.linalg.svd(tau.double(), full_matrices=False)
        u = u.float()
        coeffs = u.T @ tau
        r = min(tau.shape[0], K * tau.shape[1])
        padded = torch.cat([coeffs, coeffs.new_zeros(r - coeffs.shape[0], coeffs.shape[1])])
        kept = trim_top_k(padded.unsqueeze(0), params["density"])[0][: coeffs.shape[0]]
        return base + params["scaling"] * (u @ kept)
    if name == "ssam":
        if not matrix:
            return base + params["scaling"] * tau
        return base + params["scaling"] * _trunc(tau, max(1, round(min(tau.shape) * params["rank_fraction"])))
    raise AssertionError(f"no identical-experts formula for '{name}': add one to this test")


@pytest.mark.parametrize("name", NAMES)
def test_identical_experts(name):
    base = make_mlp_projector(12, 20, 16, seed=3)
    delta = random_delta(base, 42)
    expert = offset(base, delta)
    experts = [expert.clone() for _ in range(K)]
    overrides = {"drop_rate": 0.0} if name.startswith("dare") else {}
    job = job_for(name, experts, base, overrides,
                  calibration=calibration_for(experts) if get_method(name).needs_calibration else None)
    out = run(name, job)
    for key, b in base.state().items():
        want = expected(name, job.params, key, b, delta[key])
        torch.testing.assert_close(out.state[key], want, rtol=1e-4, atol=1e-5, msg=f"{name} {key}")
