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
    # an entry with no non-zero score gets +1; torch.sign(NaN) is 0, so in the count
    # election a NaN update casts no vote (the only case where score and stack differ)
    return torch.where((score != 0).any(0), sign, torch.ones_like(sign))


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


def hostile_stack(k: int, n: int, seed: int, dtype=torch.float32) -> torch.Tensor:
    """:func:`awkward_stack` plus NaN and +-Inf in a few chunks only (those chunks take the
    reference path of the fused loop, the others the fused one), exact ties in the sign
    election, whole columns of zeros and of -0.0."""
    x = awkward_stack(max(k, 2), n, seed)[:k].clone()
    g = torch.Generator().manual_seed(seed + 1000)
    if n > 3000:
        x[0, 2000] = float("nan")
        x[k - 1, 2100] = float("inf")
        x[k // 2, 2200] = -float("inf")
    x[:, 7] = 0.0
    x[:, 11] = -0.0
    if k >= 2:
        x[:2, 13] = torch.tensor([2.0, -2.0])  # mass 0: a tie, the count of signs decides
        x[2:, 13] = 0.0
    cols = torch.randint(n, (n // 50,), generator=g)
    x[:, cols] = x[:, cols].round()  # many small integers: ties at the trim threshold
    return x.to(dtype)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("with_facts", [True, False])
def test_fused_ties_is_bitwise_the_plain_formula(k, dtype, with_facts, monkeypatch):
    """The fused loop (float ops only, facts counted per chunk) against the plain formula
    (trim -> elect sign -> disjoint mean, :func:`ref_ties`) on stacks with NaN, Inf, zeros,
    -0.0, ties at the threshold and in the election: every merge mode, both divisors."""
    monkeypatch.setattr(ties, "TIES_CHUNK", 1 << 10)  # many chunks; NaN/Inf in a few
    n = 6 * 1024 + 77
    taus = hostile_stack(k, n, seed=10 * k, dtype=dtype)
    weights = [0.5 + 0.25 * i for i in range(k)]
    for density in (0.0, 0.3, 1.0):
        for sign_method, merge, divide_by in [("sum", "mean", "count"), ("count", "mean", "count"),
                                              ("sum", "sum", "count"), ("count", "sum", "count"),
                                              ("sum", "mean", "weight"), ("count", "mean", "weight")]:
            facts: dict | None = {} if with_facts else None
            got = ties_merge(taus, density, sign_method, merge, facts, divide_by=divide_by, weights=weights)
            ref, ref_facts = ref_ties(taus, density, sign_method, merge, divide_by, weights)
            case = (density, sign_method, merge, divide_by)
            assert got.dtype == dtype and torch.equal(bits(got), bits(ref)), case
            if with_facts:
                assert facts == ref_facts, case


def test_fused_ties_on_finite_stacks_runs_fused_and_counts_facts_as_mean_does(monkeypatch):
    """Finite stacks never take the reference chunk; the facts counted per chunk equal the
    float32 means of the stored masks (the path kept for more than 2^24 entries)."""
    monkeypatch.setattr(ties, "TIES_CHUNK", 1 << 12)
    taus = awkward_stack(4, 5 * 4096 + 5, seed=21)
    calls = []
    real_elect = ties.elect_sign
    monkeypatch.setattr(ties, "elect_sign", lambda *a, **kw: calls.append(1) or real_elect(*a, **kw))
    fused: dict = {}
    got = ties_merge(taus, 0.2, "sum", "mean", fused)
    assert not calls  # the reference chunk (the only caller of elect_sign) never ran
    monkeypatch.setattr(ties, "FACTS_COUNT_LIMIT", 1000)  # store the masks, as above 2^24
    stored: dict = {}
    again = ties_merge(taus, 0.2, "sum", "mean", stored)
    ref, ref_facts = ref_ties(taus, 0.2, "sum", "mean")
    assert torch.equal(bits(got), bits(ref)) and torch.equal(bits(again), bits(ref))
    assert fused == stored == ref_facts


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_bracketed_threshold_in_pieces_every_dtype(dtype, monkeypatch):
    """The CPU bracketing pass (pieces through numpy, in a float32/float64 buffer) gives
    kthvalue's answer for every float dtype, with a ragged last piece, NaN and Inf."""
    monkeypatch.setattr(consensus, "SELECT_PIECE", 10_007)
    flat = awkward_stack(3, 300_000, seed=31).to(dtype)
    flat[1, 1234] = float("inf")
    for k in (1, 1000, 60_000, 250_000, 299_999):
        ref = flat.abs().kthvalue(flat.shape[1] - k + 1, dim=1, keepdim=True).values
        got = kth_largest_abs(flat, k)
        assert got.dtype == dtype
        assert torch.equal(got.view(torch.int16) if dtype == torch.float16 else bits(got),
                           ref.view(torch.int16) if dtype == torch.float16 else bits(ref)), k
    flat[2, 99] = float("nan")  # that row's counts no longer add up: kthvalue on all of it
    got = kth_largest_abs(flat, 1000)
    ref = flat.abs().kthvalue(flat.shape[1] - 1000 + 1, dim=1, keepdim=True).values
    assert torch.equal(got[:2], ref[:2]) and torch.isnan(got[2]) == torch.isnan(ref[2])


def test_task_vectors_widen_narrower_experts_exactly():
    """bf16 experts beside an fp32 ref are converted into their slot first: the values of
    torch's promoting subtraction (and of converting the experts up front)."""
    g = torch.Generator().manual_seed(3)
    ref = torch.randn(40, 33, generator=g)
    experts = [torch.randn(40, 33, generator=g).to(torch.bfloat16) for _ in range(3)] + [torch.randn(40, 33)]
    got = task_vectors(experts, ref)
    assert got.dtype == torch.float32
    assert torch.equal(bits(got), bits(torch.stack([t - ref for t in experts])))
    assert torch.equal(bits(got), bits(torch.stack([t.float() - ref for t in experts])))


@pytest.mark.parametrize("n", [5_000, 300_011])  # the direct threshold and the bracketed one
@pytest.mark.parametrize("stored,compute", [(torch.bfloat16, torch.float32), (torch.float32, torch.float32),
                                            (torch.bfloat16, torch.float64), (torch.float16, torch.float32)])
def test_ties_on_task_vector_rows_is_the_materialized_stack(n, stored, compute, monkeypatch):
    """Ties.merge_one reads the task vectors piece by piece (TaskVectorRows, the experts in
    their stored dtype): the result and facts of task_vectors + weighted + ties_merge on
    compute-dtype experts, with unit and other weights, NaN and Inf included."""
    from pivotmerge_gui.core.methods import get_method
    from pivotmerge_gui.core.methods.base import MergeJob
    from pivotmerge_gui.core.methods.common import weighted

    monkeypatch.setattr(ties, "TIES_CHUNK", 1 << 14)
    g = torch.Generator().manual_seed(n)
    base = torch.randn(n // 11, 11, generator=g).to(stored)
    experts = [(base.float() + 0.1 * torch.randn(n // 11, 11, generator=g)).to(stored) for _ in range(4)]
    experts[1][3, 4] = float("nan")
    experts[2][100, 1] = float("inf")
    experts[3][:, 2] = base[:, 2]  # zeros in the task vector
    method = get_method("ties")()
    for weights in ([1.0] * 4, [0.5, 1.0, 2.0, 0.3]):
        for params in ({}, {"sign_method": "count", "merge": "sum", "scaling": 0.7}, {"divide_by": "weight"}):
            job = MergeJob(experts=[], weights=weights, params=params, dtype=compute)
            facts: dict = {}
            got = method.merge_one("w", "linear", "weight", experts, base.to(compute), job, None, facts)
            ref = base.to(compute)
            taus = task_vectors([e.to(compute) for e in experts], ref)
            if any(w != 1.0 for w in weights):
                taus = weighted(taus, weights)
            want_facts: dict = {}
            full = {**{p.name: p.default for p in method.params}, **params}
            want = ref + full["scaling"] * ties_merge(taus, full["density"], full["sign_method"], full["merge"],
                                                      want_facts, divide_by=full["divide_by"], weights=weights)
            assert got.dtype == compute and torch.equal(bits(got), bits(want)), (weights, params)
            assert facts == want_facts
