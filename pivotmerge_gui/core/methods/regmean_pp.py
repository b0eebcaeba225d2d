"""RegMean++ (Nguyen et al., 2025, "RegMean++: Enhancing Effectiveness and Generalization
of Regression Mean for Model Merging", arXiv 2508.03121; reference code:
github.com/nthehai01/RegMean-plusplus, FusionBench ``regmean_plusplus``).

RegMean (:mod:`.regmean`) merges each linear layer on its own: layer l's Gram matrices
come from the inputs that expert k's OWN earlier layers produce on its calibration
features. RegMean++ takes them from the MERGED model instead: the layers are merged in
forward order, and layer l's inputs ``X_k`` are expert k's calibration features run
through the already merged layers 0..l-1 (norms, activations, token grouping included),
so a layer is fitted to the features the merged model will actually feed it. The solve is
RegMean's, unchanged (same alpha shrink of the off-diagonal Gram entries, same targets:
each expert's own weights ``W_k`` applied to those inputs):

  W_l^T = (sum_k w_k G'_k)^-1 sum_k w_k G'_k W_{k,l}^T,
  G'_k = alpha X_k^T X_k + (1 - alpha) diag(X_k^T X_k),   X_k = merged_{<l}(features_k).

As in the reference, biases, norms and every other tensor are averaged (weighted); the
reference treats a transformer block as the unit (inside a block the expert's own
sub-layers run on the merged block input); a projector's units are its linear layers, so
every linear layer sees the merged layers before it. Gram matrices are plain sums over
tokens (like this project's RegMean, so that the first linear layer of a projector is
RegMean's exactly); the reference averages them per expert, which differs only when
domains have different token counts. Base-free, needs calibration.
"""

from __future__ import annotations

from collections.abc import Generator

import torch

from ..linalg import solve_normal_equations
from ..progress import ProgressEvent
from ..projector import Projector, forward_layer_names
from .base import MergeJob, MergeMethod, MergeOutput, register
from .regmean import ALPHA, add_expert_terms, data_report, expert_features, weighted_average


def progressive_layers(ref: Projector) -> list[str]:
    """The linear layers with a 2-D weight, in the order the forward applies them (a layer
    the forward applies twice is fitted once, where it first appears)."""
    order = forward_layer_names(ref.ops, heads=("linear",))
    return [n for n in dict.fromkeys(order) if ref.layer(n).weight.dim() == 2]


def averaged_state(job: MergeJob) -> dict[str, torch.Tensor]:
    """The weighted average of every tensor: the merged model before any layer is fitted
    (its norms and biases stay; its linear weights are replaced one by one)."""
    states = [e.state() for e in job.experts]
    return {key: weighted_average(states, job.expert_weights, key) for key in states[0]}


def merged_inputs(ref: Projector, state: dict[str, torch.Tensor], name: str, x: torch.Tensor) -> torch.Tensor:
    """Input rows [N', in] of layer ``name`` when the projector with ``state`` runs on ``x``
    (only the layers before ``name`` matter)."""
    with torch.no_grad():
        h = ref.with_state(state).forward_with_inputs(x, capture=True)[1][name]
    return h.reshape(-1, h.shape[-1])


@register
class RegMeanPlusPlus(MergeMethod):
    name = "regmean_pp"
    pretty_name = "RegMean++"
    reference_url = "https://arxiv.org/abs/2508.03121"
    description = (
        "RegMean++ (Nguyen et al., 2025): RegMean's closed-form least-squares merge per "
        "linear layer, with each layer's Gram matrices taken from the inputs the MERGED "
        "earlier layers produce on each expert's calibration features (layers merged in "
        "forward order). Other tensors are averaged. Base-free, needs calibration."
    )
    needs_calibration = True
    uses_calibration = True
    params = (ALPHA,)

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        alpha = float(job.params.get("alpha", ALPHA.default))
        xs, names, missing = expert_features(job, self.name)
        w = job.expert_weights
        ref = job.experts[0]
        state = averaged_state(job)
        layers = progressive_layers(ref)
        steps = max(1, len(layers) * len(xs))
        solved: list[str] = []
        for li, lname in enumerate(layers):
            width = ref.layer(lname).weight.shape
            lhs = xs[0].new_zeros(width[1], width[1], dtype=torch.float64)
            rhs = xs[0].new_zeros(width[1], width[0], dtype=torch.float64)
            for k, (expert, x) in enumerate(zip(job.experts, xs)):
                job.cancel.raise_if_cancelled()
                yield ProgressEvent("merge", (li * len(xs) + k) / steps,
                                    f"RegMean++: layer {lname}, inputs of {names[k]} through the merged layers")
                h = merged_inputs(ref, state, lname, x)
                # float64 like RegMean: the shrunk Gram is often ill-conditioned
                add_expert_terms(lhs, rhs, h.double(), expert.layer(lname).weight.double(), alpha, w[k])
            key = f"{lname}.weight"
            state[key] = solve_normal_equations(lhs, rhs).T.to(job.dtype).contiguous()
            solved.append(key)
        yield ProgressEvent("merge", 1.0, "RegMean++: done")
        return MergeOutput(state, data_report(self.name, {"alpha": alpha}, xs, names, missing, solved))
