"""Named demo worlds: the shipped ``demo`` and the larger benchmark-only ``large`` ones.

A preset fixes everything a build needs besides the seeds: the domains (and so the
vocabulary), the architecture (:class:`~.models.WorldConfig`), the training recipe
(:class:`~.train.TrainConfig`), the split sizes and the torch thread count. ``demo`` is
exactly the shipped world (its manifest carries no ``preset`` key, as before presets
existed); the others are opt-in and recorded in their manifest as ``"preset"``.

- ``demo``: 4 domains, vision 48 -> projector 48 -> 64 -> 64 -> LM 64 (about 6.5 minutes
  on one core).
- ``large``: 6 domains (``relation`` and ``digits`` added), vision 256 -> projector
  256 -> 1024 -> 1024 -> LM 1024 (2 layers), for checking that merge results transfer
  beyond the tiny widths; builds in about 3-3.5 minutes on 2 idle cores (Xeon, torch
  2.11), well inside the 15 minutes asked for.
- ``large-unequal``: ``large`` with experts of unequal strength: expert *i* gets a
  fraction 1, 1/8, 1/2, 1/4, 1, 1/8 (domain order) of its domain's training examples and
  of the projector steps; the joint projector trains on the union of those subsets.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from .data import ALL_DOMAINS, DOMAINS, SPLIT_SIZES
from .models import WorldConfig
from .train import TINY, TrainConfig


@dataclass(frozen=True)
class Preset:
    name: str
    domains: tuple[str, ...]
    world: WorldConfig  # vocab_size is filled in from the preset's vocabulary at build time
    train: TrainConfig
    tiny: TrainConfig
    split_sizes: dict[str, int]
    threads: int
    tiny_sizes: dict[str, int]  # examples per domain and split of a ``--tiny`` build


DEMO_TINY_SIZES = {"train": 32, "val": 12, "test": 12}


DEMO = Preset("demo", DOMAINS, WorldConfig(), TrainConfig(), TINY, dict(SPLIT_SIZES), 1, DEMO_TINY_SIZES)

_LARGE_WORLD = WorldConfig(vision_width=256, vision_layers=2, vision_heads=4,
                           lm_width=1024, lm_layers=2, lm_heads=8, lm_ff=256)
# Step counts sized for < 15 min on 2 cores (the LM's 1024 width dominates every step, the
# projectors' included: their gradient flows back through the frozen LM). Measured on 2
# idle cores: encoder 36 s, LM 66 s, 13 projectors 84 s, validation matrix 23 s. Longer
# LM/projector training (300/100 steps) did not clearly raise the experts' validation
# accuracy (mixed, within the noise of 16 examples per domain); the encoder (slot
# accuracy about 0.6 after 600 steps) is the likelier limit; untested.
_LARGE_TRAIN = TrainConfig(encoder_steps=600, encoder_lr=2e-3, lm_steps=150, lm_lr=1.5e-3,
                           projector_steps=50, projector_lr=2e-3, joint_steps_factor=3.0, batch=16)
_LARGE_TINY = TrainConfig(encoder_steps=3, lm_steps=2, projector_steps=2, batch=4)
_LARGE_SIZES = {"train": 1024, "val": 16, "test": 256}
UNEQUAL_FRACTIONS = (1.0, 0.125, 0.5, 0.25, 1.0, 0.125)

# tiny: the real widths (the projector's shape is the point) on 1-2 examples per domain
LARGE = Preset("large", ALL_DOMAINS, _LARGE_WORLD, _LARGE_TRAIN, _LARGE_TINY, _LARGE_SIZES, 2,
               {"train": 8, "val": 1, "test": 1})
LARGE_UNEQUAL = replace(LARGE, name="large-unequal",
                        train=replace(_LARGE_TRAIN, expert_fractions=UNEQUAL_FRACTIONS),
                        tiny=replace(_LARGE_TINY, expert_fractions=UNEQUAL_FRACTIONS))

PRESETS: dict[str, Preset] = {p.name: p for p in (DEMO, LARGE, LARGE_UNEQUAL)}


def get(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown demo preset '{name}'; choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
