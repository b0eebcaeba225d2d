"""Every registered method runs on CUDA and agrees with its CPU result (skipped without a
CUDA device; run on the GPU machine). Randomized methods draw from per-device generators,
so for them the check is shape, dtype, finiteness and the report's device."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.calibration import Calibration
from pivotmerge_gui.core.methods import list_methods
from pivotmerge_gui.core.pipeline import merge_projectors
from tests.factories import make_mlp_projector

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def _world():
    base = make_mlp_projector(d_in=24, d_hidden=48, d_out=40, seed=100)
    experts = []
    for k in range(3):
        e = make_mlp_projector(d_in=24, d_hidden=48, d_out=40, seed=k)
        state = {n: base.state()[n] + 0.3 * (t - base.state()[n]) for n, t in e.state().items()}
        experts.append(e.with_state(state))
    g = torch.Generator().manual_seed(0)
    cal = Calibration([torch.randn(96, 24, generator=g) for _ in range(3)], ["a", "b", "c"])
    return experts, base, cal


@pytest.mark.parametrize("cls", list_methods(), ids=lambda c: c.name)
def test_method_on_cuda_matches_cpu(cls):
    experts, base, cal = _world()
    kw = {"base": base if (cls.needs_base or cls.uses_base) else None,
          "calibration": cal if (cls.needs_calibration or cls.uses_calibration) else None,
          "names": ["a", "b", "c"], "seed": 3}
    cpu = merge_projectors(experts, cls.name, {}, device="cpu", **kw)
    gpu = merge_projectors(experts, cls.name, {}, device="cuda", **kw)
    assert str(gpu.report.get("device", "cuda")).startswith("cuda")
    ref = base if base is not None else experts[0]
    for key, v in cpu.projector.state().items():
        w = gpu.projector.state()[key]
        assert w.shape == v.shape and w.dtype == v.dtype and torch.isfinite(w.float()).all(), key
        if cls.randomized:
            continue
        upd = (v.float() - ref.state()[key].float()).norm().item() + 1e-6
        err = (w.float().cpu() - v.float()).norm().item()
        assert err <= 1e-3 * upd, f"{cls.name} {key}: CPU/CUDA differ by {err:.3g} (update norm {upd:.3g})"
