"""Calibration: unlabelled projector inputs per expert domain, in memory and on disk.

- :mod:`.features`: the :class:`Calibration` value the merge methods take.
- :mod:`.store`: the calibration file (one tensor per domain, with provenance), reading,
  writing, validating and mapping its domains to experts by name.
- :mod:`.compute`: making a calibration file from images with a vision encoder.
"""

from __future__ import annotations

from pathlib import Path

from .features import Calibration, calibration_device, calibration_from_features
from .store import CalibrationFile

__all__ = [
    "Calibration",
    "CalibrationFile",
    "calibration_device",
    "calibration_from_features",
    "load_calibration",
    "save_calibration",
]


def save_calibration(cal: Calibration, path: Path, names: list[str] | None = None,
                     provenance: dict | None = None, *, overwrite: bool = True) -> Path:
    """Write in-memory features as a calibration file (domains named by ``cal.domains``,
    else ``names``, else ``domain k``); returns its path."""
    from . import store

    names = names or [d or f"domain {k}" for k, d in enumerate(cal.domains)] or [
        f"domain {k}" for k in range(len(cal.features))]
    tensors, _ = store.from_calibration(cal, names)
    store.write(path, tensors, store.default_provenance(**(provenance or {})), overwrite=overwrite)
    return Path(path)


def load_calibration(path: Path, expert_names: list[str], in_features: int | None = None,
                     mapping: dict | None = None, sha256: str | None = None) -> Calibration:
    """The features of each expert's domain from a calibration file (see :mod:`.store`)."""
    from . import store

    return store.read(path, expect_sha256=sha256, in_features=in_features).for_experts(expert_names, mapping)
