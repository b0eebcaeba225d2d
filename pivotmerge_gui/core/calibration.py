"""Calibration features on disk: one safetensors file, tensors ``expert_0``, ``expert_1``, ...

Each tensor is [N_k, in_features]: unlabelled projector inputs (visual features) from
expert k's own domain. Used by RegMean and by PivotMerge's data-driven ALM.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .errors import CheckpointError
from .methods.base import Calibration


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
