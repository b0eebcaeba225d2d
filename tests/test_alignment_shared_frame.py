"""With a base given, experts fine-tuned from it skip the permutation search: the cheap
shared-frame test (alignment.shares_coordinates) replaces it and the merge is unchanged."""

from __future__ import annotations

import torch

from pivotmerge_gui.core.alignment import align_to_pivot, permute_hidden, shares_coordinates
from pivotmerge_gui.core.methods.pivotmerge import pivot as pivot_stage
from pivotmerge_gui.core.pipeline import merge_projectors
from tests.factories import make_mlp_projector


def _large_update_experts(n: int = 3, scale: float = 1.0):
    """Experts that moved as far as their init's own scale (the identity certificate of
    align_to_pivot cannot prove these; the search would run)."""
    base = make_mlp_projector(32, 256, 48, seed=100)
    experts = []
    for k in range(n):
        upd = make_mlp_projector(32, 256, 48, seed=k)
        experts.append(base.with_state({n_: base.state()[n_] + scale * upd.state()[n_] for n_ in base.state()},
                                       source=f"e{k}"))
    return base, experts


def test_shares_coordinates_accepts_fine_tuned_and_rejects_permuted_or_unrelated():
    base, experts = _large_update_experts()
    assert all(shares_coordinates(e, base) for e in experts)
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(1))
    shuffled = permute_hidden(experts[0], ("0", "2"), perm)
    assert not shares_coordinates(shuffled, base)
    assert not shares_coordinates(make_mlp_projector(32, 256, 48, seed=55), base)
    # the full search agrees where the test passes: identity for every expert
    for e in experts[1:]:
        _, info = align_to_pivot(e, experts[0])
        assert info.is_identity


def test_pivotmerge_with_base_skips_the_search_and_the_merge_is_unchanged(monkeypatch):
    base, experts = _large_update_experts()
    fast = merge_projectors(experts, "pivotmerge", base=base)
    align = fast.report["method_report"]["alignment"]
    assert all(p["solver"] == "shared-base-frame" for a in align for p in a["pairs"])

    calls = []

    def search_instead(expert, reference, **kw):  # force the full weight matching
        calls.append(1)
        return False

    monkeypatch.setattr(pivot_stage, "shares_coordinates", search_instead)
    full = merge_projectors(experts, "pivotmerge", base=base)
    assert calls and all(p["solver"] != "shared-base-frame"
                         for a in full.report["method_report"]["alignment"] for p in a["pairs"])
    for key, t in full.projector.state().items():
        assert torch.equal(fast.projector.state()[key], t), key


def test_without_base_or_with_permuted_experts_the_search_still_runs():
    base, experts = _large_update_experts()
    perm = torch.randperm(256, generator=torch.Generator().manual_seed(3))
    experts[2] = permute_hidden(experts[2], ("0", "2"), perm)
    res = merge_projectors(experts, "pivotmerge", base=base)
    solvers = {p["solver"] for a in res.report["method_report"]["alignment"] for p in a["pairs"]}
    assert "shared-base-frame" not in solvers
    moved = [a for a in res.report["method_report"]["alignment"] if not a["is_identity"]]
    assert moved  # the planted permutation was found and undone


def test_doomed_bf16_attempt_is_skipped_without_changing_the_matching(monkeypatch):
    from pivotmerge_gui.core import alignment

    monkeypatch.setattr(alignment, "bf16_is_fast", lambda device_type: True)
    pivot = make_mlp_projector(1024, 512, 512, seed=1)
    other = make_mlp_projector(1024, 512, 512, seed=2)  # another init: no certificate possible
    p_in, p_out = alignment._features(pivot, "0", "2")
    e_in, e_out = alignment._features(other, "0", "2")
    pn = (p_in.pow(2).sum(1) + p_out.pow(2).sum(1)).sqrt()
    en = (e_in.pow(2).sum(1) + e_out.pow(2).sum(1)).sqrt()
    assert not alignment._bf16_may_certify(p_in, p_out, e_in, e_out, alignment._BF16_REL_ERROR * pn * en.max())
    _, skipped = align_to_pivot(other, pivot)
    monkeypatch.setattr(alignment, "_bf16_may_certify", lambda *a: True)
    _, tried = align_to_pivot(other, pivot)
    assert skipped.pairs[0].permutation == tried.pairs[0].permutation
    assert skipped.pairs[0].solver == tried.pairs[0].solver == "assignment"


def test_pivot_side_memo_changes_no_matching(monkeypatch):
    """Aligning several experts to one pivot keeps the pivot's norms and joined bf16
    features in the shared cache (computed once, not per expert): every permutation and
    solver is the one a fresh call finds."""
    from pivotmerge_gui.core import alignment

    monkeypatch.setattr(alignment, "bf16_is_fast", lambda device_type: True)
    pivot = make_mlp_projector(64, 1024, 256, seed=1)
    g = torch.Generator().manual_seed(4)
    near = [permute_hidden(pivot.with_state({k: v + 1e-3 * torch.randn(v.shape, generator=g)
                                             for k, v in pivot.state().items()}),
                           ("0", "2"), torch.randperm(1024, generator=g)) for _ in range(2)]
    experts = [pivot, *near, make_mlp_projector(64, 1024, 256, seed=9)]
    cache: dict = {}
    shared = [align_to_pivot(e, pivot, cache=cache)[1] for e in experts[1:]]
    memos = [v for k, v in cache.items() if k[0] == "pivot"]
    assert memos and any(("joined", torch.bfloat16) in m for m in memos) and all("norms" in m for m in memos)
    for e, got in zip(experts[1:], shared):
        fresh = align_to_pivot(e, pivot)[1]
        assert got.pairs[0].permutation == fresh.pairs[0].permutation
        assert got.pairs[0].solver == fresh.pairs[0].solver
    assert [s.pairs[0].solver for s in shared[:2]] == ["certificate-bf16"] * 2
