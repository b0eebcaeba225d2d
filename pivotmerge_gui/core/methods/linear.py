"""Weighted average of the experts' weights (model soup / mergekit ``linear``); base-free."""

from __future__ import annotations

from collections.abc import Generator

import torch

from ..errors import ParameterError
from ..progress import ProgressEvent
from .base import MergeJob, MergeMethod, MergeOutput, Param, register


@register
class Linear(MergeMethod):
    name = "linear"
    workspace_stacks = 0.5  # a running weighted sum
    pretty_name = "Weight average"
    reference_url = "https://arxiv.org/abs/2203.05482"
    description = (
        "Element-wise weighted average sum_k w_k theta_k / sum_k w_k of the experts (Model "
        "Soups; mergekit 'linear'). Needs no shared init. Reference default: equal weights, "
        "normalised."
    )
    params = (
        Param("normalize", bool, True,
              "divide by the sum of the expert weights (off: plain weighted sum)"),
    )

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        normalize = job.params.get("normalize", True)
        w = job.expert_weights
        total = sum(w)
        if normalize and abs(total) < 1e-12:
            raise ParameterError(self.name, "weight", "the expert weights sum to zero; cannot normalise")
        states = [e.state() for e in job.experts]
        names = list(states[0])
        out: dict[str, torch.Tensor] = {}
        for i, key in enumerate(names):
            job.cancel.raise_if_cancelled()
            yield ProgressEvent("merge", i / len(names), f"{self.pretty_name}: {key}")
            acc = sum(wk * s[key] for wk, s in zip(w, states))
            out[key] = acc / total if normalize else acc
        yield ProgressEvent("merge", 1.0, f"{self.pretty_name}: done")
        norm = [wk / total for wk in w] if normalize else list(w)
        return MergeOutput(out, {"method": self.name, "effective_weights": norm})
