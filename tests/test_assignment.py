"""Exact sparse assignment with a dual certificate (core.assignment) and the alignment's
bf16 option for big layers: same optimum as the dense solver on every kind of matrix."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from pivotmerge_gui.core import alignment as al
from pivotmerge_gui.core import assignment as asg
from tests.conftest import make_mlp_projector

N = 1200  # above DENSE_LIMIT: the sparse path runs; the dense reference takes ~0.1 s


def _score(s: torch.Tensor, perm: torch.Tensor) -> float:
    return float(s.double()[torch.arange(s.shape[0]), perm].sum())


def _dense_optimum(s: torch.Tensor) -> tuple[torch.Tensor, float]:
    r, c = linear_sum_assignment(s.double().numpy(), maximize=True)
    perm = torch.from_numpy(c[np.argsort(r)])
    return perm, _score(s, perm)


def _matrices() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    planted = torch.randn(N, N, generator=g)
    p = torch.randperm(N, generator=g)
    planted[torch.arange(N), p] += 3.0
    return {
        "gaussian": torch.randn(N, N, generator=g),
        "similarity": torch.randn(N, 300, generator=g) @ torch.randn(300, N, generator=g),
        "planted": planted,
        # every row prefers the same few columns: row candidates alone crowd onto them
        "column-biased": torch.randn(N, N, generator=g) + 10.0 * torch.randn(1, N, generator=g),
        "low-rank": torch.randn(N, 3, generator=g) @ torch.randn(3, N, generator=g),
        "integer-ties": torch.randint(0, 4, (N, N), generator=g).float(),
        "constant": torch.full((N, N), 2.5),
        "negative": -torch.rand(N, N, generator=g) - 5.0,
    }


@pytest.mark.parametrize("name", list(_matrices()))
def test_matches_the_dense_optimum(name):
    s = _matrices()[name]
    perm, how = asg.max_weight_matching(s)
    assert sorted(perm.tolist()) == list(range(N))
    ref_perm, ref = _dense_optimum(s)
    scale = float(s.abs().max())
    assert _score(s, perm) >= ref - N * 1e-5 * scale, name
    if name in ("gaussian", "similarity", "planted", "column-biased"):
        assert how == "sparse-certified"
        assert torch.equal(perm, ref_perm)  # unique optimum: the same matching


@pytest.mark.parametrize("name", ["gaussian", "similarity", "integer-ties"])
def test_half_precision_scores_are_solved_without_an_fp32_copy(name):
    """A bf16 score matrix (the alignment's fast path) is matched as is: its values are
    exact in fp32, so the certified optimum is the dense optimum of those values."""
    s16 = _matrices()[name].to(torch.bfloat16)
    perm, _ = asg.max_weight_matching(s16)
    assert sorted(perm.tolist()) == list(range(N))
    s32 = s16.float()
    _, ref = _dense_optimum(s32)
    assert _score(s32, perm) >= ref - N * 1e-5 * float(s32.abs().max()), name


def test_few_candidates_take_certified_rounds(monkeypatch):
    """With 4 candidates per row the first sparse optimum is not the dense one: the dual
    check finds the violating entries, they join, and the answer is still exact."""
    s = _matrices()["similarity"]
    calls = []
    real = asg._violations

    def spy(*a, **k):
        out = real(*a, **k)
        calls.append(out[1])
        return out

    monkeypatch.setattr(asg, "START_CANDIDATES", 4)
    monkeypatch.setattr(asg, "_violations", spy)
    perm, how = asg.max_weight_matching(s)
    assert how == "sparse-certified"
    assert len(calls) >= 2 and calls[0] > 0 and calls[-1] == 0
    assert torch.equal(perm, _dense_optimum(s)[0])


def test_small_and_degenerate_inputs():
    s = torch.randn(50, 50, generator=torch.Generator().manual_seed(1))
    perm, how = asg.max_weight_matching(s)
    assert how == "dense" and torch.equal(perm, _dense_optimum(s)[0])
    perm, how = asg.max_weight_matching(torch.zeros(N, N))
    assert sorted(perm.tolist()) == list(range(N))
    with pytest.raises(ValueError, match="square"):
        asg.max_weight_matching(torch.zeros(3, 4))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_scores_give_the_cpu_answer():
    s = _matrices()["similarity"]
    perm, how = asg.max_weight_matching(s.cuda())
    assert how == "sparse-certified" and perm.device.type == "cpu"
    assert torch.equal(perm, asg.max_weight_matching(s)[0])


def _force_bf16_assignment(monkeypatch):
    monkeypatch.setattr(al, "_BF16_MIN_MACS", 1)
    monkeypatch.setattr(al, "_BF16_ASSIGN_MIN_MACS", 1)
    monkeypatch.setattr(al, "bf16_is_fast", lambda device_type: True)


def test_bf16_assignment_is_near_optimal_and_function_preserving(monkeypatch):
    """precision="auto" on a (forced) big layer solves the bf16 similarities: a valid
    permutation, exactly function preserving, whose fp32 score is within the documented
    bound of the fp32 optimum; "float32" gives the fp32 optimum itself."""
    _force_bf16_assignment(monkeypatch)
    pivot = make_mlp_projector(32, 96, 40, seed=1)
    other = make_mlp_projector(32, 96, 40, seed=2)  # a different init
    a16, info16 = al.align_to_pivot(other, pivot)
    a32, info32 = al.align_to_pivot(other, pivot, precision="float32")
    assert info16.pairs[0].solver == "assignment-bf16"
    assert info32.pairs[0].solver == "assignment"
    x = torch.randn(6, 32, generator=torch.Generator().manual_seed(0))
    for aligned in (a16, a32):
        torch.testing.assert_close(aligned.forward(x), other.forward(x), atol=1e-5, rtol=0)
    a, b = pivot.hidden_pairs()[0]
    p_in, p_out = al._features(pivot, a, b)
    e_in, e_out = al._features(other, a, b)
    s = al._similarity(p_in, p_out, e_in, e_out, torch.float32)
    best = _dense_optimum(s)[1]
    assert _score(s, torch.tensor(info32.pairs[0].permutation)) == pytest.approx(best, rel=1e-6)
    pn = (p_in.pow(2).sum(1) + p_out.pow(2).sum(1)).sqrt()
    en = (e_in.pow(2).sum(1) + e_out.pow(2).sum(1)).sqrt()
    bound = 2.0 * float((al._BF16_REL_ERROR * pn * en.max()).sum())
    got = _score(s, torch.tensor(info16.pairs[0].permutation))
    assert best - bound <= got <= best + 1e-4


def test_planted_permutation_survives_the_bf16_path(monkeypatch):
    _force_bf16_assignment(monkeypatch)
    pivot = make_mlp_projector(16, 64, 24, seed=1)
    g = torch.Generator().manual_seed(7)
    perm = torch.randperm(64, generator=g)
    shuffled = al.permute_hidden(pivot, pivot.hidden_pairs()[0], perm)
    aligned, info = al.align_to_pivot(shuffled, pivot)
    assert info.pairs[0].solver in ("certificate-bf16", "assignment-bf16")
    for k, v in pivot.state().items():
        assert torch.equal(aligned.state()[k], v), k


def test_unknown_precision_is_refused():
    pivot = make_mlp_projector(16, 64, 24, seed=1)
    other = make_mlp_projector(16, 64, 24, seed=2)
    with pytest.raises(ValueError, match="precision"):
        al.align_to_pivot(other, pivot, precision="fp8")
