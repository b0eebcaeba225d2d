"""Hidden-unit permutation alignment: function preserving, recovers planted permutations."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.alignment import align_all, align_to_pivot, permute_hidden
from pivotmerge_gui.core.errors import IncompatibleExperts
from pivotmerge_gui.core.projector import Layer, Projector
from tests.conftest import make_mlp_projector


def make_mlp3(d_in=12, h1=20, h2=16, d_out=10, seed=0, dtype=torch.float32) -> Projector:
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: (torch.randn(*s, generator=g) * 0.2).to(dtype)
    return Projector(
        family="llava-mlp3x_gelu",
        layers=[
            Layer("0", "linear", {"weight": t(h1, d_in), "bias": t(h1)}),
            Layer("2", "linear", {"weight": t(h2, h1), "bias": t(h2)}),
            Layer("4", "linear", {"weight": t(d_out, h2), "bias": t(d_out)}),
        ],
        ops=("linear:0", "gelu", "linear:2", "gelu", "linear:4"),
        source=f"mlp3-{seed}",
    )


def planted(p: Projector, seed: int) -> tuple[Projector, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    perms = []
    out = p
    for a, _ in p.hidden_pairs():
        n = p.layer(a).weight.shape[0]
        perm = torch.randperm(n, generator=g)
        perms.append(perm)
        out = permute_hidden(out, (a, _), perm)
    return out, perms


def test_planted_permutation_is_recovered_exactly_and_function_preserved():
    pivot = make_mlp_projector(16, 64, 24, seed=1)
    shuffled, (perm,) = planted(pivot, seed=7)
    assert not torch.equal(shuffled.layer("0").weight, pivot.layer("0").weight)
    aligned, info = align_to_pivot(shuffled, pivot)
    for k, v in pivot.state().items():
        assert torch.equal(aligned.state()[k], v), k
    assert not info.is_identity
    assert info.fraction_moved == pytest.approx(float((perm != torch.arange(64)).float().mean()))
    assert info.similarity_after == pytest.approx(1.0, abs=1e-6)
    assert info.similarity_after > info.similarity_before
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(aligned.forward(x), shuffled.forward(x), atol=1e-5, rtol=0)


def test_alignment_is_exactly_function_preserving_for_unrelated_experts():
    pivot = make_mlp_projector(16, 48, 24, seed=1)
    other = make_mlp_projector(16, 48, 24, seed=2)  # a different init: some permutation
    aligned, info = align_to_pivot(other, pivot)
    assert not info.is_identity
    assert info.pairs[0].solver == "assignment"
    x = torch.randn(7, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aligned.forward(x), other.forward(x), atol=1e-5, rtol=0)
    # the matching improved the objective over the identity
    assert info.similarity_after > info.similarity_before
    # a valid permutation
    assert sorted(info.pairs[0].permutation) == list(range(48))


def test_shared_init_gives_identity():
    pivot = make_mlp_projector(16, 64, 24, seed=1)
    g = torch.Generator().manual_seed(5)
    noisy = pivot.with_state({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pivot.state().items()})
    aligned, info = align_to_pivot(noisy, pivot)
    assert info.is_identity and info.fraction_moved == 0.0
    assert info.pairs[0].solver == "certificate-identity"
    assert 0.9 < info.similarity_after <= 1.0
    # large noise: the cheap certificate fails, the full matching still finds the identity
    big = pivot.with_state({k: v + 0.08 * torch.randn(v.shape, generator=g) for k, v in pivot.state().items()})
    _, info2 = align_to_pivot(big, pivot)
    assert info2.is_identity and info2.pairs[0].solver != "certificate-identity"
    for k, v in noisy.state().items():
        assert torch.equal(aligned.state()[k], v)


def test_chain_mlp3x_planted_permutations_recovered():
    pivot = make_mlp3(seed=3)
    shuffled, _perms = planted(pivot, seed=11)
    aligned, info = align_to_pivot(shuffled, pivot)
    assert len(info.pairs) == 2
    for k, v in pivot.state().items():
        assert torch.equal(aligned.state()[k], v), k
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aligned.forward(x), shuffled.forward(x), atol=1e-5, rtol=0)


def test_chain_mlp3x_unrelated_is_function_preserving():
    pivot = make_mlp3(seed=3)
    other = make_mlp3(seed=4)
    aligned, info = align_to_pivot(other, pivot)
    x = torch.randn(4, 12, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(aligned.forward(x), other.forward(x), atol=1e-5, rtol=0)
    for p in info.pairs:
        assert sorted(p.permutation) == list(range(len(p.permutation)))


def test_bf16_inputs_keep_dtype_and_recover_permutation():
    pivot = make_mlp_projector(16, 64, 24, seed=1, dtype=torch.bfloat16)
    shuffled, _ = planted(pivot, seed=9)
    aligned, _info = align_to_pivot(shuffled, pivot)
    assert aligned.layer("0").weight.dtype == torch.bfloat16
    for k, v in pivot.state().items():
        assert torch.equal(aligned.state()[k], v), k
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(aligned.forward(x.bfloat16()).float(), shuffled.forward(x.bfloat16()).float(),
                               atol=1e-5, rtol=0)


def test_large_certificate_path_recovers_planted_permutation():
    """Big enough for the fast (bf16-certificate) path where the device supports it."""
    pivot = make_mlp_projector(256, 1024, 256, seed=2)
    shuffled, (_perm,) = planted(pivot, seed=1)
    aligned, info = align_to_pivot(shuffled, pivot)
    assert info.pairs[0].solver in ("certificate-bf16", "certificate-fp32")
    for k, v in pivot.state().items():
        assert torch.equal(aligned.state()[k], v), k


def test_align_all_and_incompatible():
    a = make_mlp_projector(16, 32, 24, seed=1)
    b, _ = planted(a, seed=2)
    out, infos = align_all([b, a], pivot_index=1)
    assert infos[1].is_identity and infos[1].pairs[0].solver == "pivot"
    assert torch.equal(out[0].layer("0").weight, a.layer("0").weight)
    with pytest.raises(IncompatibleExperts):
        align_to_pivot(make_mlp_projector(16, 30, 24), a)
    with pytest.raises(ValueError):
        align_all([a, b], pivot_index=2)
    d = infos[0].to_dict()
    assert d["pairs"][0]["permutation"] is not None and not d["is_identity"]


def test_identity_certificate_skips_the_gram_matrix_when_hopeless():
    """The cheap O(units x features) gate: experts far from the pivot never pay for the
    pivot's Gram matrix; experts close to it still get the certificate; results agree."""
    from pivotmerge_gui.core.alignment import _identity_certified

    pivot = make_mlp_projector(16, 64, 24, seed=1)
    g = torch.Generator().manual_seed(5)
    near = pivot.with_state({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in pivot.state().items()})
    far = pivot.with_state({k: v + 1.0 * torch.randn(v.shape, generator=g) for k, v in pivot.state().items()})
    pair = pivot.hidden_pairs()[0]
    cache: dict = {}
    ok, _ = _identity_certified(far, pivot, pair, cache)
    assert not ok and cache == {}  # gated: no Gram computed
    ok, _ = _identity_certified(near, pivot, pair, cache)
    assert ok and len(cache) == 1
    # the gated expert still gets the exact optimum from the solver
    aligned, info = align_to_pivot(far, pivot)
    assert info.pairs[0].solver != "certificate-identity"
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(2))
    torch.testing.assert_close(aligned.forward(x), far.forward(x), atol=1e-4, rtol=1e-5)
