"""Closed-form progressive layer-wise distillation, after ProDistill (Xu et al., 2025,
"Scalable Model Merging with Progressive Layer-wise Distillation", arXiv 2502.12706;
reference code: github.com/JingXuTHU/Scalable_Model_Merging_with_Progressive_Layerwise_Distillation).

ProDistill merges layer by layer in forward order. For layer l it keeps two streams per
expert k on k's own calibration data: the MERGED stream (the features through the already
merged layers 0..l-1) and the expert's OWN stream (the features through k's own layers
0..l-1). The merged layer is trained so that, fed the merged stream, it reproduces what
expert k's layer l outputs on the own stream (feature distillation, squared error).

What this method does (the closed-form linear-layer variant): for each linear layer l in
forward order, with ``H_k`` = merged-stream inputs of layer l on expert k's features,
``A_k = [H_k 1]`` (a ones column when the layer has a bias), targets ``Y_k`` = expert k's
own pre-activation output of layer l on its own stream, ``c_k = w_k / (n_k sum_j w_j)``
(each domain counts by its weight, not its token count), ``P = [W_avg b_avg]`` the
weighted average of the experts' layer:

  min_Theta  sum_k c_k ||A_k Theta^T - Y_k||^2 + mu ||Theta - P||^2,
  M = sum_k c_k A_k^T A_k,  R = sum_k c_k A_k^T Y_k,  mu = ridge * trace(M) / cols(M),
  Theta = P + D,  (M + mu I) D^T = R - M P^T   (float64; the minimum-norm D when singular).

``ridge`` is relative to the mean eigenvalue of the per-token input second moment ``M``,
so the same values mean the same shrink at any width; with ``ridge = 0`` the fit is plain
least squares, and of its minimisers the one nearest the average.

Why closed form, not ProDistill's training: ProDistill learns element-wise merging
coefficients of task vectors (base + sum_k lambda_k * tau_k) by Adam over epochs. For a
linear layer with fixed inputs the distillation loss is a convex quadratic in the weight,
so its exact minimiser over the whole weight is one solve: no learning rate, epochs or
batch order to tune, deterministic, and base-free (task vectors need the shared init;
experts with different inits have none). The ridge towards the average takes the place
of ProDistill's start from the averaged model and its early stopping. A projector's
layers are small, so the solve is cheap.

Bias: fitted jointly (the ones column). The merged stream is shifted against each
expert's own stream (its earlier layers changed), and the least-squares affine fit
re-centres the layer's output for that shift; keeping the averaged bias would leave the
shift in the output. The ridge pulls the bias towards the average like the weight.
Norm layers and every other tensor are averaged (weighted). Base-free, needs calibration.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import torch
import torch.nn.functional as F

from ..linalg import solve_normal_equations
from ..progress import ProgressEvent
from .base import MergeJob, MergeMethod, MergeOutput, Param, register
from .regmean import data_report, expert_features
from .regmean_pp import averaged_state, merged_inputs, progressive_layers

RIDGE = Param("ridge", float, 0.01,
              "pull towards the weight average, relative to the mean eigenvalue of the "
              "layer inputs' second moment (0 = plain least squares)",
              min=0.0, search=(0.0, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0))


def with_ones(h: torch.Tensor, bias: bool) -> torch.Tensor:
    return torch.cat([h, h.new_ones(h.shape[0], 1)], 1) if bias else h


@register
class ProDistill(MergeMethod):
    name = "prodistill"
    pretty_name = "ProDistill (closed form)"
    reference_url = "https://arxiv.org/abs/2502.12706"
    description = (
        "Progressive layer-wise distillation after ProDistill (Xu et al., 2025), closed-form "
        "variant: each linear layer, in forward order, is the ridge least-squares fit (weight "
        "and bias) that maps the MERGED earlier layers' outputs on each expert's calibration "
        "features to that expert's own layer output, pulled towards the weight average. "
        "Norms are averaged. Base-free, needs calibration."
    )
    needs_calibration = True
    uses_calibration = True
    params = (RIDGE,)

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        ridge = float(job.params.get("ridge", RIDGE.default))
        xs, names, missing = expert_features(job, self.name)
        w = job.expert_weights
        total_w = sum(w)
        ref = job.experts[0]
        state = averaged_state(job)
        layers = progressive_layers(ref)
        with torch.no_grad():  # each expert's own stream: the inputs of every layer, once
            own_inputs = [expert.forward_with_inputs(x, capture=True)[1] for expert, x in zip(job.experts, xs)]
        steps = max(1, len(layers) * len(xs))
        fits: list[dict[str, Any]] = []
        for li, lname in enumerate(layers):
            has_bias = ref.layer(lname).bias is not None
            wkey, bkey = f"{lname}.weight", f"{lname}.bias"
            d_out, d_in = ref.layer(lname).weight.shape
            cols = d_in + int(has_bias)
            m = xs[0].new_zeros(cols, cols, dtype=torch.float64)
            r = xs[0].new_zeros(cols, d_out, dtype=torch.float64)
            tokens = 0
            for k, (expert, x) in enumerate(zip(job.experts, xs)):
                job.cancel.raise_if_cancelled()
                yield ProgressEvent("merge", (li * len(xs) + k) / steps,
                                    f"ProDistill: layer {lname}, distilling {names[k]}")
                a = with_ones(merged_inputs(ref, state, lname, x), has_bias).double()
                el = expert.layer(lname)  # expert k's own layer l on its own stream
                with torch.no_grad():
                    y = F.linear(own_inputs[k][lname], el.weight, el.bias).reshape(-1, d_out).double()
                c = w[k] / (a.shape[0] * total_w)
                m += c * (a.T @ a)
                r += c * (a.T @ y)
                tokens += int(a.shape[0])
            prior = state[wkey].double()
            if has_bias:
                prior = torch.cat([prior, state[bkey].double().unsqueeze(1)], 1)
            mu = ridge * float(torch.diagonal(m).sum()) / cols
            lhs = m.clone()
            lhs.diagonal().add_(mu)
            theta = prior + solve_normal_equations(lhs, r - m @ prior.T).T
            state[wkey] = theta[:, :d_in].to(job.dtype).contiguous()
            if has_bias:
                state[bkey] = theta[:, d_in].to(job.dtype).contiguous()
            fits.append({"layer": lname, "tokens": tokens, "mu": mu, "bias_fitted": has_bias})
        yield ProgressEvent("merge", 1.0, "ProDistill: done")
        solved = [f"{f['layer']}.{role}" for f in fits for role in (("weight", "bias") if f["bias_fitted"] else ("weight",))]
        report = data_report(self.name, {"ridge": ridge}, xs, names, missing, solved)
        report["layers"] = fits  # per fitted layer: tokens, the ridge mu it used, whether the bias was fitted
        return MergeOutput(state, report)
