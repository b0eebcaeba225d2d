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
from pathlib import PurePath
from typing import Any

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

    def with_stand_ins(self) -> Calibration:
        """Every expert with features: one whose domain has none gets the other domains'
        features pooled (:func:`pooled_features`). The data-driven steps then fit that
        expert's own function on those inputs (distillation on proxy data from the same
        encoder) instead of ignoring its domain; benchmarks/missing_domain.py measures it."""
        if not self.missing:
            return self
        pooled = pooled_features(self.features)
        return Calibration([f if f is not None else pooled for f in self.features], list(self.domains), self.source)

    def select(self, indices: Sequence[int | None]) -> Calibration:
        """A new Calibration with ``features[i]`` for ``i`` in ``indices``, in that order
        (e.g. to follow the experts after the user re-ordered them); ``None`` gives an
        expert no features (its domain is uncovered). Domain names follow when there is one
        per feature set; otherwise the result has none."""
        idx = [int(i) if i is not None else None for i in indices]
        n = len(self.features)
        bad = [i for i in idx if i is not None and not -n <= i < n]
        if bad:
            raise IndexError(f"calibration has {n} feature sets; no index {bad[0]}")
        domains = [self.domains[i] if i is not None else "" for i in idx] if len(self.domains) == n else []
        return Calibration([self.features[i] if i is not None else None for i in idx], domains, self.source)


def pooled_features(features: Sequence[torch.Tensor | None]) -> torch.Tensor:
    """The covered domains' features pooled: evenly spaced rows of each, as many in all as
    one domain has on average (raises ValueError when no domain has features)."""
    have = [f for f in features if f is not None]
    if not have:
        raise ValueError("no domain has calibration features")
    per = max(1, sum(len(f) for f in have) // len(have) // len(have))
    parts = [f[torch.linspace(0, len(f) - 1, min(per, len(f)), device=f.device).round().long()] for f in have]
    return torch.cat(parts, 0)


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


def calibration_summary(cal: Calibration, names: Sequence[str]) -> dict[str, Any]:
    """What the report and the model card say of the calibration a merge used."""
    src = cal.source or {}
    prov = src.get("provenance") or {}
    return {
        "file": PurePath(src["file"]).name if src.get("file") else None,
        "sha256": src.get("sha256"),
        "tokens": {n: (int(f.shape[0]) if f is not None else 0) for n, f in zip(names, cal.features)},
        "domains": {n: (cal.domains[k] or None) if k < len(cal.domains) else None for k, n in enumerate(names)},
        "missing": [names[k] for k in cal.missing],
        "encoder": (prov.get("encoder") or {}).get("spec"),
        "provenance": {k: prov[k] for k in ("encoder", "features", "sampling", "tool", "created") if k in prov},
    }
