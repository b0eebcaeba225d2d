"""Small helpers shared by the method tests: build jobs, run merges, make experts."""

from __future__ import annotations

import torch

from pivotmerge_gui.core.methods import Calibration, MergeJob, MergeOutput, get_method
from pivotmerge_gui.core.projector import Layer, Projector
from tests.conftest import make_mlp_projector


def run(name: str, job: MergeJob) -> MergeOutput:
    """Drive a method's generator to the end and return its MergeOutput."""
    method = get_method(name)()
    gen = method.merge(job)
    try:
        while True:
            next(gen)
    except StopIteration as stop:
        return stop.value


def job_for(name: str, experts, base=None, params=None, **kw) -> MergeJob:
    cls = get_method(name)
    return MergeJob(experts=list(experts), base=base, params=cls.validate_params(params or {}), **kw)


def offset(base: Projector, delta: dict[str, torch.Tensor], scale: float = 1.0) -> Projector:
    return base.with_state({k: v + scale * delta[k] for k, v in base.state().items()})


def random_delta(base: Projector, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) * 0.05 for k, v in base.state().items()}


def family(k: int = 3, seed: int = 0, d=(16, 32, 24)):
    """A shared base and k experts = base + independent random updates."""
    base = make_mlp_projector(*d, seed=seed)
    experts = [offset(base, random_delta(base, 100 + seed * 10 + i)) for i in range(k)]
    return base, experts


def calibration_for(experts, n: int = 64, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    d_in = experts[0].in_features
    return Calibration([torch.randn(n, d_in, generator=g) + 0.3 * i for i in range(len(experts))])


def qwen_merger(seed: int) -> Projector:
    """A Qwen2-VL-like merger: LayerNorm, 4-token grouping, mlp, an extra vector layer."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g) * 0.1
    return Projector("qwen2-vl-merger",
                     [Layer("ln", "layernorm", {"weight": 1 + t(8), "bias": t(8)}),
                      Layer("0", "linear", {"weight": t(32, 32), "bias": t(32)}),
                      Layer("2", "linear", {"weight": t(16, 32), "bias": t(16)}),
                      Layer("nl", "vector", {"weight": t(16)})],
                     ("layernorm:ln", "merge_tokens:4", "linear:0", "gelu", "linear:2"))
