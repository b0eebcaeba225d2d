"""Sign consensus (trim, sign election with its one tie rule, disjoint merge) on hand-made
stacks, and that TIES and PivotMerge's conflict filtering both go through it."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.methods.consensus import (
    agreement,
    disjoint_merge,
    elect_sign,
    trim_top_k,
)
from pivotmerge_gui.core.methods.pivotmerge import elect_and_merge
from pivotmerge_gui.core.methods.ties import ties_merge


def t(*rows):
    return torch.tensor(rows, dtype=torch.float64)


def test_trim_keeps_each_experts_largest_magnitudes():
    s = t([1.0, -5.0, 2.0, 0.5, 0.0, 3.0], [3.0, 0.1, -0.2, -4.0, 0.0, 0.0])  # keep 3 of 6
    assert torch.equal(trim_top_k(s, 0.5), t([0.0, -5.0, 2.0, 0.0, 0.0, 3.0], [3.0, 0.0, -0.2, -4.0, 0.0, 0.0]))
    assert trim_top_k(s, 1.0) is s
    assert int((trim_top_k(s, 0.0) != 0).sum()) == 2  # at least one entry per expert


def test_sign_is_the_sign_of_the_total_mass():
    # columns: mass +3; mass -3 (majority of signs says +); mass -1
    s = t([1.0, 1.0, 1.0], [3.0, 1.0, -3.0], [-1.0, -5.0, 1.0])
    assert torch.equal(elect_sign(s), t(1.0, -1.0, -1.0))


def test_tie_rule_exact_and_rounding_ties():
    # exact tie of mass and of signs: no sign (0), every update of the entry is dropped
    s = t([0.5, 2.0], [-0.5, -2.0], [0.0, 0.0])
    assert torch.equal(elect_sign(s), t(0.0, 0.0))
    merged, agree = disjoint_merge(s, elect_sign(s))
    assert torch.equal(merged, t(0.0, 0.0)) and not bool(agree.any())
    # mass zero only up to rounding: the majority of signs decides (2 positive, 1 negative)
    s = t([1.0], [1.0], [-2.0 - 1e-9])
    assert float(s.sum()) < 0
    assert torch.equal(elect_sign(s), t(1.0))
    # an entry with no update at all gets +1 (nothing to keep either way)
    assert torch.equal(elect_sign(torch.zeros(3, 2)), torch.ones(2))


def test_weighted_and_count_election():
    s = t([1.0], [-2.0])
    assert torch.equal(elect_sign(s), t(-1.0))
    assert torch.equal(elect_sign(s, weights=[3.0, 1.0]), t(1.0))
    s = t([1.0], [1.0], [-5.0])
    assert torch.equal(elect_sign(s, "sum"), t(-1.0))
    assert torch.equal(elect_sign(s, "count"), t(1.0))
    with pytest.raises(ValueError):
        elect_sign(s, "median")


def test_disjoint_merge_mean_sum_and_weights():
    s = t([1.0, -2.0, 0.0], [3.0, 1.0, 0.0], [-1.0, -2.0, 0.0])
    sign = t(1.0, -1.0, 1.0)
    merged, agree = disjoint_merge(s, sign)
    assert torch.equal(merged, t(2.0, -2.0, 0.0))
    assert torch.equal(agree, agreement(s, sign)) and int(agree.sum()) == 4
    summed, _ = disjoint_merge(s, sign, reduce="sum")
    assert torch.equal(summed, t(4.0, -4.0, 0.0))
    w = torch.tensor([1.0, 3.0, 1.0], dtype=torch.float64)
    weighted, _ = disjoint_merge(s, sign, w)
    # column 0: (1*1 + 3*3) / (1 + 3); column 1: (1*-2 + 1*-2) / (1 + 1)
    assert torch.equal(weighted, t(2.5, -2.0, 0.0))


def test_ties_uses_the_same_tie_rule():
    # column 0 ties exactly (dropped), column 1 has mass +1
    taus = torch.tensor([[2.0, 3.0], [-2.0, -2.0]])
    facts: dict = {}
    merged = ties_merge(taus, 1.0, "sum", "mean", facts)
    assert torch.equal(merged, torch.tensor([0.0, 3.0]))
    assert facts["kept_fraction"] == 0.5 and facts["sign_conflict_fraction"] == 1.0


def test_pivotmerge_filtering_is_the_weighted_consensus():
    g = torch.Generator().manual_seed(0)
    stack = torch.randn(4, 30, 20, generator=g).round(decimals=1)
    w = torch.tensor([0.5, 1.5, 1.0, 1.0])
    merged, stats = elect_and_merge(stack, w, filter_conflicts=True)
    want, agree = disjoint_merge(stack, elect_sign(stack, weights=w), w)
    assert torch.equal(merged, want)
    nonzero = stack != 0
    assert stats["conflict_fraction"] == pytest.approx(float((nonzero & ~agree).sum() / nonzero.sum()))
