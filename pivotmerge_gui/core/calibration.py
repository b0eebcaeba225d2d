"""Calibration features: unlabelled projector inputs from each expert's own domain.

The one home of the concept: the :class:`Calibration` value the merge methods take, how it
is built from encoder features (:func:`calibration_from_features`), re-ordered
(:meth:`Calibration.select`), moved to a device, and stored on disk as one safetensors file
with tensors ``expert_0``, ``expert_1``, ... Each tensor is [N_k, in_features]: visual
features from expert k's domain, as the projector sees them. Data-driven merge steps
(RegMean's Gram matrices, PivotMerge's data-driven ALM) need them; no captions are needed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import CheckpointError


@dataclass
class Calibration:
    """Unlabelled projector inputs per expert domain: ``features[k]`` is [N_k, in_features]
    drawn from expert k's own domain (visual features before the projector)."""

    features: list[torch.Tensor]
    domains: list[str] = field(default_factory=list)

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
        return Calibration([self.features[i] for i in idx], domains)


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


def save_calibration(cal: Calibration, path: Path) -> Path:
    from safetensors.torch import save as st_save

    from .io.atomic import atomic_write_bytes

    tensors = {f"expert_{k}": f.detach().to("cpu").contiguous() for k, f in enumerate(cal.features)}
    meta = {"format": "pt", "domains": json.dumps(list(cal.domains))}
    return atomic_write_bytes(Path(path), st_save(tensors, metadata=meta), overwrite=True)


def load_calibration(path: Path, n_experts: int, in_features: int) -> Calibration:
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
            meta = f.metadata() or {}
            missing = [f"expert_{k}" for k in range(n_experts) if f"expert_{k}" not in keys]
            if missing:
                raise CheckpointError(
                    str(path),
                    f"calibration file lacks {', '.join(missing)} (needs one tensor per expert, "
                    f"in recipe order; found {', '.join(sorted(keys)) or 'none'})",
                )
            feats = [f.get_tensor(f"expert_{k}") for k in range(n_experts)]
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(str(path), f"cannot read calibration features: {e}") from None
    for k, t in enumerate(feats):
        if t.dim() != 2 or t.shape[1] != in_features or not t.is_floating_point():
            raise CheckpointError(
                str(path),
                f"calibration tensor expert_{k} has shape {list(t.shape)} and dtype "
                f"{t.dtype}; expected a float [N, {in_features}] matrix",
            )
    try:
        domains = json.loads(meta.get("domains", "[]"))
    except json.JSONDecodeError:
        domains = []
    return Calibration([t.float() for t in feats], [str(d) for d in domains])


def calibration_device(cal: Calibration, device: torch.device, dtype: torch.dtype) -> Calibration:
    return Calibration([f.to(device=device, dtype=dtype) for f in cal.features], list(cal.domains))
