"""Analysis API: spectra, ranks, similarities, conflicts, shared rank, alignment."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pivotmerge_gui.core.alignment import permute_hidden
from pivotmerge_gui.core.analysis import (
    Analysis,
    analyze,
    effective_rank,
    iter_analysis,
    singular_values,
    stable_rank,
)
from pivotmerge_gui.core.errors import Cancelled
from pivotmerge_gui.core.progress import CancelToken, ProgressEvent
from pivotmerge_gui.core.projector import Layer, Projector
from tests.conftest import make_mlp_projector


def linear_projector(w: torch.Tensor, name: str = "p") -> Projector:
    return Projector("llava-linear", [Layer("0", "linear", {"weight": w})], ("linear:0",), source=name)


def test_stable_and_effective_rank_of_known_matrices():
    # diag(3, 1, 1): stable rank (9 + 1 + 1) / 9; effective rank exp(H(3/5, 1/5, 1/5))
    w = torch.diag(torch.tensor([3.0, 1.0, 1.0]))
    assert stable_rank(w) == pytest.approx(11 / 9, rel=1e-9)
    p = np.array([0.6, 0.2, 0.2])
    assert effective_rank([3.0, 1.0, 1.0]) == pytest.approx(math.exp(-(p * np.log(p)).sum()), rel=1e-12)
    # an orthogonal matrix has every rank equal to its size
    q, _ = torch.linalg.qr(torch.randn(20, 20, generator=torch.Generator().manual_seed(0)))
    s = singular_values(q)
    assert s.complete and s.stable_rank == pytest.approx(20, rel=1e-6)
    assert s.effective_rank == pytest.approx(20, rel=1e-6)
    # rank one
    r1 = torch.outer(torch.arange(1.0, 6.0), torch.arange(1.0, 4.0))
    assert stable_rank(r1) == pytest.approx(1.0, rel=1e-9)
    assert effective_rank(singular_values(r1).values) == pytest.approx(1.0, abs=1e-6)


def test_truncated_spectrum_matches_exact_top_values():
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(1500, 1100, generator=g))
    v, _ = torch.linalg.qr(torch.randn(1100, 1100, generator=g))
    sv = torch.linspace(10.0, 0.01, 1100) ** 2
    w = (u * sv) @ v.t()
    s = singular_values(w, top=64)
    assert not s.complete and s.values.size == 64
    # a flat-topped spectrum is the hard case for randomized methods: a few %
    np.testing.assert_allclose(s.values, sv[:64].double().numpy(), rtol=5e-2)
    assert s.stable_rank == pytest.approx(float((sv**2).sum() / sv[0] ** 2), rel=2e-2)
    # a decaying spectrum (like a task vector's) comes out almost exactly
    sd = 10.0 * 0.8 ** torch.arange(1100.0)
    s2 = singular_values((u * sd) @ v.t(), top=32)
    np.testing.assert_allclose(s2.values, sd[:32].double().numpy(), rtol=1e-3)
    exact = singular_values(w, top=None)
    assert exact.complete
    np.testing.assert_allclose(exact.values[:64], sv[:64].double().numpy(), rtol=1e-4)


def test_identical_experts_cosine_one_conflict_zero():
    e = make_mlp_projector(8, 24, 12, seed=0)
    base = make_mlp_projector(8, 24, 12, seed=1)
    a = analyze([e, e.clone(), e.clone()], base=base, names=["a", "b", "c"])
    for l in a.layers:
        np.testing.assert_allclose(l.cosine_weights, np.ones((3, 3)), atol=1e-9)
        np.testing.assert_allclose(l.cosine_tasks, np.ones((3, 3)), atol=1e-9)
        assert l.sign_conflict == 0.0
    w0 = a.layers[0]
    assert w0.tensor == "0.weight" and w0.shape == (24, 8)
    # identical task vectors: all energy is shared and every expert fully aligned
    assert w0.shared_energy == pytest.approx(1.0, abs=1e-4) or w0.shared_energy >= 0.9
    np.testing.assert_allclose(w0.alignment_scores, w0.shared_energy, atol=1e-6)
    np.testing.assert_allclose(w0.effective_ranks, w0.effective_ranks[0])


def test_orthogonal_task_vectors_cosine_zero_and_alignment_scores():
    base = torch.zeros(6, 6)
    t1 = torch.zeros(6, 6)
    t1[0, 0] = 2.0
    t2 = torch.zeros(6, 6)
    t2[3, 4] = -1.0
    exps = [linear_projector(base + t1, "e1"), linear_projector(base + t2, "e2")]
    a = analyze(exps, base=linear_projector(base, "base"), shared_energy=0.5)
    l = a.layers[0]
    assert l.cosine_tasks[0, 1] == pytest.approx(0.0, abs=1e-12)
    assert l.sign_conflict == 0.0  # disjoint supports never conflict
    # energy 4 vs 1: the rank-1 shared subspace holds expert 1's update only
    assert l.shared_rank == 1
    assert l.shared_energy == pytest.approx(0.8, abs=1e-6)
    np.testing.assert_allclose(l.alignment_scores, [1.0, 0.0], atol=1e-6)
    # opposite task vectors conflict everywhere they are nonzero
    b = analyze([linear_projector(t1), linear_projector(-t1)], base=linear_projector(base))
    assert b.layers[0].cosine_tasks[0, 1] == pytest.approx(-1.0)
    assert b.layers[0].sign_conflict == pytest.approx(1 / 36)


def test_alignment_before_similarity_and_merged_and_dicts():
    p = make_mlp_projector(8, 32, 12, seed=2)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(0))
    q = permute_hidden(p, ("0", "2"), perm)
    aligned = analyze([p, q], names=["p", "q"], merged=q)
    for l in aligned.layers:
        np.testing.assert_allclose(l.cosine_weights, np.ones((3, 3)), atol=1e-6)
    assert aligned.aligned and not aligned.alignment[1]["is_identity"]
    assert any("permuted" in n for n in aligned.notes)
    raw = analyze([p, q], names=["p", "q"], align=False)
    assert raw.layers[0].cosine_weights[0, 1] < 0.5
    rows = aligned.layer_table()
    assert [r["layer"] for r in rows] == ["0", "2"]
    for r in rows:
        for col in ("norm", "effective_rank", "stable_rank", "cos_weights", "cos_tasks", "sign_conflict",
                    "shared_rank", "shared_energy", "alignment[p]", "merged_effective_rank"):
            assert col in r, col
        assert r["cos_weights"] == pytest.approx(1.0, abs=1e-6)
    d = aligned.to_dict()
    json.dumps(d)
    assert d["similarity_names"] == ["p", "q", "merged"]
    assert set(aligned.spectra()["0"]) == {"p", "q", "merged"}
    assert aligned.shared_ranks().keys() == {"0", "2"}


def test_progress_and_cancel():
    exps = [make_mlp_projector(8, 16, 8, seed=s) for s in range(3)]
    gen = iter_analysis(exps)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            result = stop.value
            break
    assert isinstance(result, Analysis)
    assert all(isinstance(e, ProgressEvent) for e in events) and events[-1].fraction == 1.0
    tok = CancelToken()
    gen = iter_analysis(exps, cancel=tok)
    next(gen)
    tok.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(gen)
