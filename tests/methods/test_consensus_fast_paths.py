"""The fast TIES paths (bracketed threshold, chunked trim/elect/merge, fewer passes in the
unweighted sign election, task vectors written in place) give bit for bit what the plain
whole-stack formulas give, which are written out here as the reference."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.methods import consensus, ties
from pivotmerge_gui.core.methods.common import task_vectors
from pivotmerge_gui.core.methods.consensus import TIE_RTOL, elect_sign, kth_largest_abs, trim_top_k
from pivotmerge_gui.core.methods.ties import TIES_CHUNK, ties_merge


def ref_trim(stack, density):
    flat = stack.reshape(stack.shape[0], -1)
    n = flat.shape[1]
    k = max(1, round(density * n))
    if density >= 1.0 or k >= n:
        return stack
    thresh = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
    return (flat * (flat.abs() >= thresh)).reshape(stack.shape)


def ref_elect(stack, method="sum"):
    votes = torch.sign(stack)
    score = votes if method == "count" else stack
    mass, scale, count = score.sum(0), score.abs().sum(0), votes.sum(0)
    sign = torch.where(mass.abs() <= TIE_RTOL * scale, torch.sign(count), torch.sign(mass))
    return torch.where((stack != 0).any(0), sign, torch.ones_like(sign))


def ref_ties(taus, density, sign_method, merge, divide_by="count", weights=None):
    """TIES as one pass over the whole stack (the implementation before chunking)."""
    k = taus.shape[0]
    trimmed = ref_trim(taus, density)
    sign = ref_elect(trimmed, sign_method)
    agree = (trimmed != 0) & (torch.sign(trimmed) == sign.unsqueeze(0))
    total = (trimmed * agree).sum(0)
    if merge == "sum":
        merged = total
    elif divide_by == "weight":
        w = torch.as_tensor(weights).to(taus.dtype).view(k, *([1] * (taus.dim() - 1)))
        divisor = (w * agree).sum(0)
        merged = total / torch.where(divisor == 0, torch.ones_like(divisor), divisor)
    else:
        merged = total / agree.sum(0).clamp(min=1)
    n = trimmed[0].numel()
    nonzero, agreeing = (trimmed != 0).sum(0), agree.sum(0)
    facts = {
        "trimmed_fraction": round((int(torch.count_nonzero(taus)) - int(nonzero.sum())) / (n * k), 6),
        "sign_conflict_fraction": round(float((agreeing < nonzero).float().mean()), 6),
        "kept_fraction": round(float((agreeing > 0).float().mean()), 6),
    }
    return merged, facts


def bits(x: torch.Tensor) -> torch.Tensor:
    """The raw bits (so that -0.0 and +0.0, and NaN payloads, count as different)."""
    return x.view({torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float64: torch.int64}[x.dtype])


def awkward_stack(k: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """Heavy-tailed values with many exact zeros, repeated magnitudes (ties at the trim
    threshold) and entries that cancel exactly across experts (sign-election ties)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(k, n, generator=g) * torch.exp(2 * torch.randn(k, n, generator=g))
    x[torch.rand(k, n, generator=g) < 0.3] = 0.0
    q = torch.rand(k, n, generator=g) < 0.2
    x[q] = torch.round(x[q])  # a few small integers: magnitudes tied in bulk
    x[1, : n // 10] = -x[0, : n // 10]  # exact cancellations
    x[0, 5:9] = -0.0
    return x.to(dtype)


@pytest.mark.parametrize("k", [1, 100, 123_457, 250_000, 299_999, 300_000])
def test_bracketed_threshold_is_kthvalue_exactly(k):
    flat = awkward_stack(3, 300_000, seed=k).reshape(3, -1)
    assert flat.shape[1] > consensus.SELECT_DIRECT_LIMIT  # the bracketed path runs
    ref = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
    assert torch.equal(bits(kth_largest_abs(flat, k)), bits(ref))


def test_bracketed_threshold_on_constant_and_nan_rows():
    n = 300_001
    flat = torch.stack([torch.full((n,), 2.5), torch.zeros(n), torch.randn(n)])
    flat[2, 17] = float("nan")  # counts no longer add up: that row falls back to kthvalue
    for k in (1, 1000, n // 2):
        got = kth_largest_abs(flat, k)
        ref = flat.abs().kthvalue(n - k + 1, dim=1, keepdim=True).values
        assert torch.equal(got[:2], ref[:2])
        assert torch.isnan(got[2]) == torch.isnan(ref[2]) and (torch.isnan(ref[2]) or got[2] == ref[2])


def test_bracketed_threshold_with_a_tiny_sample(monkeypatch):
    """A 64-entry sample brackets loosely (or misses, then kthvalue on the row): same answer."""
    monkeypatch.setattr(consensus, "SELECT_SAMPLE", 64)
    flat = awkward_stack(4, 280_000, seed=3)
    for k in (1, 5000, 56_000, 279_000):
        ref = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        assert torch.equal(kth_largest_abs(flat, k), ref)


def test_trim_top_k_matches_reference_bitwise():
    s = awkward_stack(4, 300_000, seed=1).reshape(4, 600, 500)
    for d in (0.0, 0.2, 0.5, 0.999, 1.0):
        assert torch.equal(bits(trim_top_k(s, d)), bits(ref_trim(s, d)))


@pytest.mark.parametrize("k", [2, 4, 5, 13])
@pytest.mark.parametrize("sign_method,merge,divide_by", [
    ("sum", "mean", "count"), ("count", "mean", "count"), ("sum", "sum", "count"), ("sum", "mean", "weight"),
])
def test_chunked_ties_is_bitwise_the_whole_stack_formula(k, sign_method, merge, divide_by, monkeypatch):
    monkeypatch.setattr(ties, "TIES_CHUNK", 1 << 14)  # smaller chunks, still a multiple of 1024
    n = 7 * ((2 * ties.TIES_CHUNK + 4099) // 7)  # chunks and a ragged tail
    taus = awkward_stack(k, n, seed=k).reshape(k, 7, n // 7)
    weights = [0.5 + 0.25 * i for i in range(k)]
    facts: dict = {}
    got = ties_merge(taus, 0.3, sign_method, merge, facts, divide_by=divide_by, weights=weights)
    ref, ref_facts = ref_ties(taus, 0.3, sign_method, merge, divide_by, weights)
    assert got.shape == ref.shape == taus.shape[1:]
    assert torch.equal(bits(got), bits(ref))
    assert facts == ref_facts


def test_chunked_ties_at_the_real_chunk_size():
    taus = awkward_stack(5, TIES_CHUNK + 333, seed=8)
    facts: dict = {}
    got = ties_merge(taus, 0.2, "sum", "mean", facts)
    ref, ref_facts = ref_ties(taus, 0.2, "sum", "mean")
    assert torch.equal(bits(got), bits(ref)) and facts == ref_facts


def test_chunked_ties_bf16_and_no_trim(monkeypatch):
    monkeypatch.setattr(ties, "TIES_CHUNK", 1 << 14)
    taus = awkward_stack(5, 3 * ties.TIES_CHUNK + 333, seed=9, dtype=torch.bfloat16)
    for density in (0.2, 1.0):
        facts: dict = {}
        got = ties_merge(taus, density, "sum", "mean", facts)
        ref, ref_facts = ref_ties(taus, density, "sum", "mean")
        assert got.dtype == torch.bfloat16 and torch.equal(bits(got), bits(ref))
        assert facts == ref_facts


def test_unweighted_election_matches_reference_bitwise():
    s = awkward_stack(6, 50_000, seed=4)
    s[:, 100] = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.0, 0.0])  # mass 0, signs tie: 0
    s[:, 101] = torch.tensor([1.0, -1.0, 2.0, -2.0, 3.0, -3.0 + 1e-7])  # rounding tie
    s[:, 102] = torch.tensor([float("nan"), 1.0, 0, 0, 0, 0])
    s[:, 103] = torch.tensor([float("inf"), -float("inf"), 1.0, 0, 0, 0])
    s[:, 104] = 0.0
    for method in ("sum", "count"):
        assert torch.equal(bits(elect_sign(s, method)), bits(ref_elect(s, method)))
    assert elect_sign(s)[100] == 0 and elect_sign(s)[104] == 1


def test_task_vectors_in_place_equal_stacked_differences():
    g = torch.Generator().manual_seed(0)
    ref = torch.randn(33, 17, generator=g)
    same = [torch.randn(33, 17, generator=g) for _ in range(3)]
    assert torch.equal(bits(task_vectors(same, ref)), bits(torch.stack([t - ref for t in same])))
    mixed = [same[0].to(torch.bfloat16), same[1]]
    got = task_vectors(mixed, ref.to(torch.bfloat16))
    assert got.dtype == torch.float32
    assert torch.equal(got, torch.stack([t - ref.to(torch.bfloat16) for t in mixed]))


def test_election_of_scalar_stacks_and_many_experts():
    """A stack of scalars [K] and more experts than a bf16 count holds take the general path."""
    s = torch.tensor([1.0, -1.0, 2.0, -2.0])
    assert torch.equal(bits(elect_sign(s)), bits(ref_elect(s))) and elect_sign(s) == 0
    assert elect_sign(torch.tensor([0.0, -0.0])) == 1
    many = awkward_stack(300, 64, seed=5, dtype=torch.bfloat16)
    assert torch.equal(bits(elect_sign(many, "count")), bits(ref_elect(many, "count")))
    facts: dict = {}
    merged = ties_merge(torch.tensor([3.0, -1.0, 2.0]), 1.0, "sum", "mean", facts)
    assert merged.shape == () and merged == 2.5 and facts["kept_fraction"] == 1.0
