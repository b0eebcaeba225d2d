"""RegMean (Jin et al., ICLR 2023, "Dataless Knowledge Fusion by Merging Weights of
Language Models").

For every linear layer the merged weight minimises sum_k ||X_k W^T - X_k W_k^T||^2 where
X_k are the layer's INPUTS when expert k runs on its own domain's calibration features:
  W^T = (sum_k G_k)^-1 sum_k G_k W_k^T,   G_k = X_k^T X_k.
As in the reference, the off-diagonal entries of every G_k are multiplied by alpha < 1
(a shrink towards the diagonal that keeps the solve well conditioned); alpha = 1 is the
plain least-squares solution. Biases, norms and every other tensor are averaged.
Per-expert weights scale G_k (and the averages). Base-free.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch

from ..errors import MethodError, NeedsCalibrationError
from ..linalg import solve_normal_equations
from ..progress import ProgressEvent
from .base import MergeJob, MergeMethod, MergeOutput, Param, register


def shrink_gram(gram: torch.Tensor, alpha: float) -> torch.Tensor:
    """alpha * G + (1 - alpha) * diag(G)."""
    if alpha >= 1.0:
        return gram
    return alpha * gram + (1.0 - alpha) * torch.diag(torch.diagonal(gram))


def regmean_solve(weights: list[torch.Tensor], grams: list[torch.Tensor]) -> torch.Tensor:
    """W with W^T = (sum G_k)^-1 sum G_k W_k^T (least squares; pseudo-inverse if singular)."""
    lhs = sum(grams)
    rhs = sum(g @ w.T for g, w in zip(grams, weights))
    return solve_normal_equations(lhs, rhs).T


def add_expert_terms(
    lhs: torch.Tensor, rhs: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, alpha: float, scale: float
) -> None:
    """Add scale * G' and scale * G' W^T of one expert to the normal equations, in place,
    with G' = alpha G + (1 - alpha) diag(G) and G = X^T X. When X has fewer rows than
    columns, G' W^T is formed as alpha X^T (X W^T) + (1 - alpha) diag(G) W^T, which never
    multiplies two d x d matrices."""
    gram = x.T @ x
    diag = torch.diagonal(gram).clone()
    if x.shape[0] < x.shape[1]:
        gw = alpha * (x.T @ (x @ weight.T)) + (1.0 - alpha) * diag.unsqueeze(1) * weight.T
    else:
        gw = shrink_gram(gram, alpha) @ weight.T
    lhs += scale * shrink_gram(gram, alpha)
    rhs += scale * gw


def expert_features(job: MergeJob, method: str) -> tuple[list[torch.Tensor], list[str], list[int]]:
    """Each expert's calibration features [N_k, in] on the job's device and dtype, checked
    (one feature set per expert, the projector's input width); an expert whose domain has
    none gets the covered domains' features pooled (``Calibration.with_stand_ins``).
    Returns the features, the expert names and the indices of the stand-in experts."""
    cal = job.calibration
    if cal is None or not cal.features:
        raise NeedsCalibrationError(method)
    k_count = len(job.experts)
    if len(cal.features) != k_count:
        raise MethodError(
            f"method '{method}': got calibration features for {len(cal.features)} domains but "
            f"there are {k_count} experts; give one feature set per expert, in expert order"
        )
    names = job.expert_names or [e.source or f"expert {i}" for i, e in enumerate(job.experts)]
    missing = cal.missing
    xs = []
    for k, (expert, feats) in enumerate(zip(job.experts, cal.with_stand_ins().features)):
        x = feats.to(device=job.device, dtype=job.dtype)
        if x.shape[-1] != expert.in_features:
            raise MethodError(
                f"method '{method}': calibration features for '{names[k]}' have width "
                f"{x.shape[-1]} but the projector takes {expert.in_features}"
            )
        xs.append(x.reshape(-1, x.shape[-1]))
    return xs, list(names), missing


def data_report(method: str, params: dict[str, Any], xs: list[torch.Tensor], names: list[str],
                missing: list[int], solved: list[str]) -> dict[str, Any]:
    """The report of a calibration-driven merge (JSON-serialisable)."""
    return {
        "method": method,
        "params": params,
        "calibration_samples": [int(x.shape[0]) for x in xs],
        "stand_in_domains": [names[k] for k in missing] or None,
        "solved_tensors": solved,
    }


def weighted_average(states: list[dict[str, torch.Tensor]], w: list[float], key: str) -> torch.Tensor:
    """sum_k w_k theta_k[key] / sum_k w_k."""
    return sum(wk * s[key] for wk, s in zip(w, states)) / sum(w)


#: RegMean's (and RegMean++'s) one knob. The paper treats alpha as a hyperparameter in
#: [0, 1] chosen on validation data; the grid spans it with more points near 1, where the
#: off-diagonal shrink is mild and where validation ended up on the demo world (issue 12)
ALPHA = Param("alpha", float, 0.6,
              "scale of the Gram matrices' off-diagonal entries (1 = plain least squares)",
              min=0.0, max=1.0, search=(0.1, 0.3, 0.5, 0.7, 0.9, 0.95, 1.0))


@register
class RegMean(MergeMethod):
    name = "regmean"
    pretty_name = "RegMean"
    reference_url = "https://arxiv.org/abs/2212.09849"
    description = (
        "Closed-form least-squares merge per linear layer from the Gram matrices of each "
        "expert's layer inputs on its own calibration features; other tensors are averaged. "
        "Base-free, needs calibration. Reference default: off-diagonal scaling alpha = 0.6 "
        "(FusionBench reduce_non_diagonal_ratio)."
    )
    needs_calibration = True
    uses_calibration = True
    params = (ALPHA,)

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        alpha = float(job.params.get("alpha", ALPHA.default))
        xs, names, missing = expert_features(job, self.name)
        k_count = len(job.experts)
        w = job.expert_weights
        ref = job.experts[0]
        states = [e.state() for e in job.experts]
        # normal equations per linear layer, accumulated one expert at a time so that only
        # one expert's layer inputs are held in memory
        normal: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for k, (expert, x) in enumerate(zip(job.experts, xs)):
            job.cancel.raise_if_cancelled()
            yield ProgressEvent("calibrate", 0.8 * k / k_count, f"RegMean: inputs of {names[k]}")
            with torch.no_grad():
                _, inputs = expert.forward_with_inputs(x, capture=True)
            for layer in expert.linear_layers():
                if layer.name not in inputs or layer.weight.dim() != 2:
                    continue
                xi = inputs[layer.name].reshape(-1, inputs[layer.name].shape[-1])
                wk = layer.weight
                if layer.name not in normal:  # accumulated and solved in float64: the
                    # shrunk Gram is often ill-conditioned, and a float32 solve moved the
                    # merge by ~1e-3 of the update against float64
                    normal[layer.name] = (xi.new_zeros(wk.shape[1], wk.shape[1], dtype=torch.float64), xi.new_zeros(wk.shape[1], wk.shape[0], dtype=torch.float64))
                lhs, rhs = normal[layer.name]
                add_expert_terms(lhs, rhs, xi.double(), wk.double(), alpha, w[k])
        out: dict[str, torch.Tensor] = {}
        solved: list[str] = []
        n_tensors = len(states[0])
        i = 0
        for layer in ref.layers:
            for role in layer.tensors:
                key = f"{layer.name}.{role}"
                job.cancel.raise_if_cancelled()
                yield ProgressEvent("merge", 0.8 + 0.2 * i / n_tensors, f"RegMean: {key}")
                if layer.kind == "linear" and role == "weight" and layer.name in normal:
                    lhs, rhs = normal[layer.name]
                    out[key] = solve_normal_equations(lhs, rhs).T.to(job.dtype).contiguous()
                    solved.append(key)
                else:
                    out[key] = weighted_average(states, w, key)
                i += 1
        yield ProgressEvent("merge", 1.0, "RegMean: done")
        return MergeOutput(out, data_report(self.name, {"alpha": alpha}, xs, names, missing, solved))
