"""Calibration features in memory: unlabelled projector inputs from each expert's domain.

:class:`Calibration` is the value the merge methods take: ``features[k]`` is
[N_k, in_features], visual features from expert k's domain as the projector sees them, or
None when there are none for that expert's domain (the methods then protect that domain,
see :mod:`...methods.pivotmerge.alm`). Data-driven merge steps (RegMean's Gram matrices,
PivotMerge's data-driven ALM) need them; no captions are needed. The file format lives in
:mod:`.store`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch


@dataclass
class Calibration:
    """Unlabelled projector inputs per expert domain: ``features[k]`` is [N_k, in_features]
    drawn from expert k's own domain (visual features before the projector)."""

    features: list[torch.Tensor | None]
    domains: list[str] = field(default_factory=list)
    # where the features came from: {"file", "sha256", "provenance", "domains"} when read
    # from a calibration file (carried into recipes and model cards), else None
    source: dict | None = None

    @property
    def covered(self) -> list[int]:
        """Indices of the experts that have features."""
        return [k for k, f in enumerate(self.features) if f is not None]

    @property
    def missing(self) -> list[int]:
        """Indices of the experts whose domain has no features."""
        return [k for k, f in enumerate(self.features) if f is None]

    def select(self, indices: Sequence[int]) -> Calibration:
        """A new Calibration with ``features[i]`` for ``i`` in ``indices``, in that order
        (e.g. to follow the experts after the user re-ordered them). Domain names follow
        when there is one per feature set; otherwise the result has none."""
        idx = [int(i) for i in indices]
        n = len(self.features)
        bad = [i for i in idx if not -n <= i < n]
        if bad:
            raise IndexError(f"calibration has {n} feature sets; no index {bad[0]}")
        domains = [self.domains[i] for i in idx] if len(self.domains) == n else []
        return Calibration([self.features[i] for i in idx], domains, self.source)


def calibration_from_features(
    features: Mapping[str, torch.Tensor] | Sequence[torch.Tensor],
    domains: Sequence[str] | None = None,
    *,
    max_tokens: int | None = None,
    seed: int = 0,
) -> Calibration:
    """Flatten per-domain features ``[N, tokens, d]`` (or ``[N, d]``) into a
    :class:`Calibration`, in the given domain order.

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


def calibration_device(cal: Calibration, device: torch.device, dtype: torch.dtype) -> Calibration:
    return Calibration([f.to(device=device, dtype=dtype) if f is not None else None for f in cal.features],
                       list(cal.domains), cal.source)
