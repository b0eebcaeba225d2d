"""The demo's calibration file, made by the same driver as ``pivotmerge calibrate``.

:class:`DemoEncoder` is the demo world's frozen :class:`~.models.VisionEncoder` as a
:class:`~pivotmerge_gui.core.calibration.encoders.FeatureEncoder`; the images are the
demo's procedurally generated ones (:mod:`.data`), given as sources whose provenance is
the generator's seed, split and index instead of a file path.
:func:`build_demo_calibration` writes the file; its features equal
``kit.calibration(split=split, n=n_images)``. This module takes the demo world
(``kit.load_world()``) as an argument; it does not import :mod:`.kit` (which uses it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.calibration.compute import (
    CalibrationSummary,
    ImageItem,
    ImageSource,
    compute_calibration,
)
from ..core.progress import CancelToken, ProgressEvent
from .data import generate
from .train import encode

GENERATOR = "pivotmerge-demo"


class DemoEncoder:
    """The demo world's vision encoder: ``[3, 16, 16]`` images -> ``[16, 48]`` tokens."""

    token_group = 1

    def __init__(self, world: Any) -> None:
        self.world = world  # a kit.DemoWorld
        self.in_features = int(self.world.config.vision_width)

    def encode(self, images: Sequence[Any]) -> list[torch.Tensor]:
        from ..core.evaluation.pairs import images_for_backend

        if not images:
            return []
        batch = images_for_backend(self.world.backend, images)  # Pillow images resized to 16x16
        with torch.no_grad():
            return list(encode(self.world.encoder, batch).float().unbind(0))

    def provenance(self) -> dict[str, Any]:
        man = self.world.manifest
        return {"encoder": {"spec": "demo", "revision": f"demo build seed {man.get('seed')}",
                            "sha256": man["files"].get("vision_encoder.safetensors"), "kind": "demo"},
                "features": {"layer": "output", "select": "full",
                             "description": "demo VisionEncoder output (after its final LayerNorm): one "
                                            f"{self.in_features}-d token per 4x4 patch"}}


def demo_sources(world: Any, n_images: int = 48, split: str = "train") -> list[ImageSource]:
    """One generated source per demo domain (named like the demo experts)."""
    seed = int(world.manifest["data_seed"])
    out = []
    for dom in world.domains:
        data = generate(dom, split, n_images, seed)
        items = [ImageItem(f"{dom} #{i}", {"generator": GENERATOR, "seed": seed, "split": split, "domain": dom,
                                           "index": i}, (lambda im=data.images[i]: im))
                 for i in range(len(data))]
        out.append(ImageSource(dom, f"{GENERATOR}:{split}", items))
    return out


def build_demo_calibration(out_path: Path | str, world: Any, n_images: int = 48, split: str = "train", *,
                           overwrite: bool = False, progress: Callable[[ProgressEvent], Any] | None = None,
                           cancel: CancelToken | None = None) -> CalibrationSummary:
    """Write the demo's calibration file (all 16 tokens of ``n_images`` images per domain of
    ``world``, the demo world of ``kit.load_world()``)."""
    return compute_calibration(DemoEncoder(world), demo_sources(world, n_images, split), out_path,
                               all_tokens=True, batch_size=64, overwrite=overwrite, progress=progress,
                               cancel=cancel)

