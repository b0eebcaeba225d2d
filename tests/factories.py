"""Helpers that tests import (fixtures stay in ``conftest.py``): tiny synthetic projectors."""

from __future__ import annotations

import torch

from pivotmerge_gui.core.projector import Layer, Projector


def make_mlp_projector(
    d_in: int = 16, d_hidden: int = 32, d_out: int = 24, seed: int = 0, dtype=torch.float32
) -> Projector:
    """A LLaVA ``mlp2x_gelu`` projector with random weights and LLaVA's original keys."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g).to(dtype) * 0.1
    return Projector(
        family="llava-mlp2x_gelu",
        layers=[
            Layer("0", "linear", {"weight": t(d_hidden, d_in), "bias": t(d_hidden)},
                  {"weight": "model.mm_projector.0.weight", "bias": "model.mm_projector.0.bias"}),
            Layer("2", "linear", {"weight": t(d_out, d_hidden), "bias": t(d_out)},
                  {"weight": "model.mm_projector.2.weight", "bias": "model.mm_projector.2.bias"}),
        ],
        ops=("linear:0", "gelu", "linear:2"),
        source=f"synthetic-{seed}",
    )
