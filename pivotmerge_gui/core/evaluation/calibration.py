"""Calibration features: unlabelled projector inputs from each expert's own domain.

Data-driven merge steps (RegMean's Gram matrices, PivotMerge's data-driven ALM) need
samples of what each expert's projector sees at its input: the frozen vision encoder's
patch tokens on images of that expert's domain. No captions are needed.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..methods.base import Calibration


def calibration_from_features(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    domains: Sequence[str] | None = None,
    *,
    max_tokens: int | None = None,
    seed: int = 0,
) -> Calibration:
    """Flatten per-domain features ``[N, tokens, d]`` (or ``[N, d]``) into a
    :class:`~pivotmerge_gui.core.methods.base.Calibration`, in the given domain order.

    ``max_tokens`` keeps a seeded random subset of rows per domain (Gram matrices and
    coefficient fits need a few thousand rows at most).
    """
    if isinstance(features, Mapping):
        order = list(domains) if domains is not None else list(features)
        tensors = [features[d] for d in order]
    else:
        tensors = list(features)
        order = list(domains) if domains is not None else [f"domain {i}" for i in range(len(tensors))]
    if len(order) != len(tensors):
        raise ValueError(f"{len(tensors)} feature sets but {len(order)} domain names")
    out = []
    g = torch.Generator().manual_seed(int(seed))
    for t in tensors:
        flat = t.reshape(-1, t.shape[-1]).float()
        if max_tokens is not None and len(flat) > max_tokens:
            flat = flat[torch.randperm(len(flat), generator=g)[:max_tokens]]
        out.append(flat.contiguous())
    return Calibration(features=out, domains=order)
