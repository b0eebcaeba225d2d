"""Each baseline's defining property on small tensors."""

from __future__ import annotations

import torch

from pivotmerge_gui.core.linalg import polar, svd_top
from pivotmerge_gui.core.methods.breadcrumbs import breadcrumbs_mask
from pivotmerge_gui.core.methods.dare import dare
from pivotmerge_gui.core.methods.knots import knots_align
from pivotmerge_gui.core.methods.regmean import regmean_solve, shrink_gram
from pivotmerge_gui.core.methods.tsv_m import tsv_bases
from pivotmerge_gui.core.projector import Layer, Projector

from .helpers import calibration_for, family, job_for, run


def vector_projector(values: list[float]) -> Projector:
    """One 'vector' layer: lets a test drive a method on a hand-written 1-D tensor."""
    return Projector("test-vector", [Layer("v", "vector", {"weight": torch.tensor(values)})], ops=())


def matrix_projector(w: torch.Tensor) -> Projector:
    return Projector("test-linear", [Layer("0", "linear", {"weight": w})], ops=("linear:0",))


# ------------------------------------------------------------------ linear
def test_linear_is_weighted_mean():
    _, experts = family(3)
    out = run("linear", job_for("linear", experts, weights=[1.0, 2.0, 5.0]))
    for k, v in out.state.items():
        want = (experts[0].state()[k] + 2 * experts[1].state()[k] + 5 * experts[2].state()[k]) / 8
        torch.testing.assert_close(v, want)
    plain = run("linear", job_for("linear", experts))
    for k, v in plain.state.items():
        torch.testing.assert_close(v, torch.stack([e.state()[k] for e in experts]).mean(0))


# ------------------------------------------------------------------ task arithmetic
def test_task_arithmetic_weights_multiply_task_vectors():
    base, experts = family(2)
    out = run("task_arithmetic", job_for("task_arithmetic", experts, base, {"scaling": 0.5}, weights=[1.0, 3.0]))
    for k, b in base.state().items():
        taus = [e.state()[k] - b for e in experts]
        torch.testing.assert_close(out.state[k], b + 0.5 * (taus[0] + 3 * taus[1]))


# ------------------------------------------------------------------ TIES
def test_ties_hand_worked_example():
    # task vectors (base = 0), density 0.5 -> keep the 2 largest magnitudes of each:
    #   t1 = [ 4, -1,  3, 0.5]  -> [ 4,  0,  3,  0]
    #   t2 = [-2,  5, -6, 0.1]  -> [ 0,  5, -6,  0]
    #   t3 = [ 1, -3,  2, -7 ]  -> [ 0, -3,  0, -7]
    # elected sign (sign of the column sum): [+, +, -, -]
    # disjoint mean of agreeing entries: [4/1, 5/1, -6/1, -7/1]
    base = vector_projector([0.0, 0.0, 0.0, 0.0])
    experts = [vector_projector(v) for v in ([4, -1, 3, 0.5], [-2, 5, -6, 0.1], [1, -3, 2, -7])]
    out = run("ties", job_for("ties", experts, base, {"density": 0.5, "scaling": 1.0}))
    torch.testing.assert_close(out.state["v.weight"], torch.tensor([4.0, 5.0, -6.0, -7.0]))
    facts = out.report["tensors"]["v.weight"]
    # 6 of 12 entries trimmed; conflicting signs among kept entries in columns 1 and 2
    assert facts["trimmed_fraction"] == 0.5
    assert facts["sign_conflict_fraction"] == 0.5
    # lambda scales the disjoint mean; 'sum' adds the agreeing entries
    out = run("ties", job_for("ties", experts, base, {"density": 1.0, "scaling": 2.0, "merge": "sum"}))
    # density 1 keeps everything; column sums 3, 1, -1, -6.4 elect [+, +, -, -]; agreeing sums:
    # col0: 4,-2,1 -> sum 3 (+): 4+1 = 5; col1: -1,5,-3 -> 1 (+): 5; col2: 3,-6,2 -> -1 (-): -6;
    # col3: 0.5,0.1,-7 -> (-): -7
    torch.testing.assert_close(out.state["v.weight"], 2.0 * torch.tensor([5.0, 5.0, -6.0, -7.0]))


# ------------------------------------------------------------------ DARE
def test_dare_unbiased_and_seeded():
    tau = torch.linspace(-1.0, 1.0, 50).reshape(1, 50)
    draws = torch.stack([dare(tau, 0.7, torch.Generator().manual_seed(s)) for s in range(4000)])
    kept = draws != 0
    # survivors are rescaled by exactly 1/(1-p); dropped fraction ~ p
    torch.testing.assert_close(draws[kept], (tau.expand_as(draws) / 0.3)[kept])
    assert abs(1 - kept[:, :, tau[0] != 0].float().mean().item() - 0.7) < 0.01
    # unbiased: the average over draws approaches tau (standard error ~ 0.02 here)
    assert (draws.mean(0) - tau).abs().max().item() < 0.08
    same = dare(tau, 0.7, torch.Generator().manual_seed(5))
    assert torch.equal(same, dare(tau, 0.7, torch.Generator().manual_seed(5)))
    assert not torch.equal(same, dare(tau, 0.7, torch.Generator().manual_seed(6)))


def test_dare_methods_deterministic_per_seed():
    base, experts = family(3)
    for name in ("dare_linear", "dare_ties"):
        a = run(name, job_for(name, experts, base, seed=1))
        b = run(name, job_for(name, experts, base, seed=1))
        c = run(name, job_for(name, experts, base, seed=2))
        assert all(torch.equal(a.state[k], b.state[k]) for k in a.state)
        assert any(not torch.equal(a.state[k], c.state[k]) for k in a.state)


# ------------------------------------------------------------------ Breadcrumbs
def test_breadcrumbs_masks_both_tails():
    tau = torch.arange(1.0, 101.0) * torch.where(torch.arange(100) % 2 == 0, 1.0, -1.0)
    keep = breadcrumbs_mask(tau.unsqueeze(0), density=0.8, gamma=0.05)[0]
    mags = tau.abs()
    # the 5 largest magnitudes (96..100) and the 15 smallest (1..15) are removed
    assert not keep[mags > 95].any() and not keep[mags <= 15].any()
    assert keep[(mags > 15) & (mags <= 95)].all()
    assert int(keep.sum()) == 80
    base = vector_projector([0.0] * 100)
    out = run("breadcrumbs", job_for("breadcrumbs", [vector_projector(tau.tolist())], base,
                                     {"density": 0.8, "gamma": 0.05, "scaling": 1.0}))
    torch.testing.assert_close(out.state["v.weight"], tau * keep)


# ------------------------------------------------------------------ Iso-C / Iso-CTS
def test_iso_c_flat_spectrum():
    base, experts = family(4)
    out = run("iso_c", job_for("iso_c", experts, base, {"alpha": 1.0}))
    for key in ("0.weight", "2.weight"):
        update = out.state[key] - base.state()[key]
        s = torch.linalg.svdvals(update.double())
        summed = sum(e.state()[key] - base.state()[key] for e in experts)
        s_ta = torch.linalg.svdvals(summed.double())
        torch.testing.assert_close(s, torch.full_like(s, s_ta.mean().item()), rtol=1e-4, atol=1e-6)
        # same singular directions as the task-arithmetic sum
        u, _, vh = torch.linalg.svd(summed.double(), full_matrices=False)
        torch.testing.assert_close(update.double(), s_ta.mean() * u @ vh, rtol=1e-4, atol=1e-6)
    assert out.report["tensors"]["0.weight"]["iso_sigma"] > 0


def test_iso_cts_flat_spectrum_full_rank():
    base, experts = family(4)
    out = run("iso_cts", job_for("iso_cts", experts, base))
    update = out.state["2.weight"] - base.state()["2.weight"]
    s = torch.linalg.svdvals(update.double())
    assert (s.max() - s.min()) / s.max() < 1e-4  # isotropic over the whole min(m, n) rank
    facts = out.report["tensors"]["2.weight"]
    assert facts["common_dims"] + 4 * facts["task_dims_each"] == 24


# ------------------------------------------------------------------ TSV-M
def test_tsv_m_bases_orthogonal_after_whitening():
    base, experts = family(4, d=(16, 40, 24))
    taus = torch.stack([e.state()["0.weight"] - base.state()["0.weight"] for e in experts])  # [4, 40, 16]
    u, s, v, ranks = tsv_bases(taus)
    assert ranks == [4, 4, 4, 4]
    eye = torch.eye(16)
    torch.testing.assert_close(u.T @ u, eye, atol=1e-4, rtol=0)
    torch.testing.assert_close(v @ v.T, eye, atol=1e-4, rtol=0)
    # before whitening the stacked task bases are not orthogonal
    u0 = torch.cat([torch.linalg.svd(t, full_matrices=False)[0][:, :4] for t in taus], 1)
    assert (u0.T @ u0 - eye).abs().max() > 1e-2
    out = run("tsv_m", job_for("tsv_m", experts, base))
    torch.testing.assert_close(out.state["0.weight"] - base.state()["0.weight"], (u * s) @ v, rtol=1e-4, atol=1e-6)
    assert out.report["tensors"]["0.weight"]["rank_per_task"] == [4, 4, 4, 4]


# ------------------------------------------------------------------ KnOTS / SSAM
def test_knots_single_expert():
    base, experts = family(1)
    tau = experts[0].state()["0.weight"] - base.state()["0.weight"]
    # aligned coefficients reproduce the update exactly
    u, coeffs = knots_align(tau.unsqueeze(0))
    torch.testing.assert_close(u @ coeffs[0], tau, atol=1e-5, rtol=1e-4)
    # density 1: KnOTS-TIES of one expert is Task Arithmetic with lambda = scaling
    out = run("knots", job_for("knots", experts, base, {"density": 1.0, "scaling": 0.6}))
    for k, b in base.state().items():
        torch.testing.assert_close(out.state[k], b + 0.6 * (experts[0].state()[k] - b), atol=1e-5, rtol=1e-4)


def test_knots_linear_merge_equals_task_arithmetic():
    base, experts = family(3)
    out = run("knots", job_for("knots", experts, base, {"merge": "linear", "scaling": 0.3}))
    ta = run("task_arithmetic", job_for("task_arithmetic", experts, base, {"scaling": 0.3}))
    for k in out.state:
        torch.testing.assert_close(out.state[k], ta.state[k], atol=1e-5, rtol=1e-4)


def test_ssam_single_expert_and_subspace():
    base, experts = family(1)
    out = run("ssam", job_for("ssam", experts, base, {"rank_fraction": 1.0}))
    for k in base.state():
        torch.testing.assert_close(out.state[k], experts[0].state()[k], atol=1e-5, rtol=1e-4)
    # rank 4 of min(32, 16): best rank-4 approximation of the single update
    out = run("ssam", job_for("ssam", experts, base, {"rank_fraction": 0.25}))
    tau = experts[0].state()["0.weight"] - base.state()["0.weight"]
    u, s, vh = torch.linalg.svd(tau, full_matrices=False)
    torch.testing.assert_close(out.state["0.weight"] - base.state()["0.weight"], (u[:, :4] * s[:4]) @ vh[:4],
                               atol=1e-5, rtol=1e-4)
    # several experts: the merged update lies inside the shared subspaces
    base, experts = family(3)
    out = run("ssam", job_for("ssam", experts, base, {"rank_fraction": 0.25}))
    upd = out.state["2.weight"] - base.state()["2.weight"]  # [24, 32] -> rank round(0.25 * 24) = 6
    assert torch.linalg.matrix_rank(upd).item() == 6


# ------------------------------------------------------------------ CART
def test_cart_centres_on_mean_and_full_rank_is_average():
    _, experts = family(3)
    avg = run("linear", job_for("linear", experts))
    full = run("cart", job_for("cart", experts, params={"rank_fraction": 1.0}))
    for k in avg.state:
        torch.testing.assert_close(full.state[k], avg.state[k], atol=1e-5, rtol=1e-4)
    low = run("cart", job_for("cart", experts, params={"rank_fraction": 0.125, "scaling": 1.0}))
    mean_w = avg.state["2.weight"]
    # 2.weight is [24, 32]: rank round(0.125 * 24) = 3 per centred update
    want = mean_w.clone()
    for e in experts:
        c = e.state()["2.weight"] - mean_w
        u, s, vh = torch.linalg.svd(c, full_matrices=False)
        want += (u[:, :3] * s[:3]) @ vh[:3]
    torch.testing.assert_close(low.state["2.weight"], want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(low.state["2.bias"], avg.state["2.bias"])


# ------------------------------------------------------------------ RegMean
def test_regmean_is_least_squares_solution():
    torch.manual_seed(0)
    ws = [torch.randn(5, 7) for _ in range(3)]
    xs = [torch.randn(40, 7) + i for i in range(3)]
    experts = [matrix_projector(w) for w in ws]
    from pivotmerge_gui.core.methods import Calibration

    out = run("regmean", job_for("regmean", experts, params={"alpha": 1.0}, calibration=Calibration(xs)))
    x_all = torch.cat(xs)
    y_all = torch.cat([x @ w.T for x, w in zip(xs, ws)])
    w_ls = torch.linalg.lstsq(x_all.double(), y_all.double()).solution.T.float()
    torch.testing.assert_close(out.state["0.weight"], w_ls, atol=1e-4, rtol=1e-4)
    # the residual gradient vanishes: sum_k X_k^T (X_k W^T - X_k W_k^T) = 0
    grad = sum(x.T @ (x @ out.state["0.weight"].T - x @ w.T) for x, w in zip(xs, ws))
    assert grad.abs().max() < 1e-2
    # alpha shrinks the off-diagonal Gram entries
    g = torch.tensor([[2.0, 1.0], [1.0, 3.0]])
    torch.testing.assert_close(shrink_gram(g, 0.5), torch.tensor([[2.0, 0.5], [0.5, 3.0]]))
    torch.testing.assert_close(regmean_solve([ws[0]], [torch.eye(7)]), ws[0])


def test_regmean_on_mlp_uses_layer_inputs_and_averages_biases():
    _, experts = family(2)
    cal = calibration_for(experts)
    out = run("regmean", job_for("regmean", experts, calibration=cal))
    assert out.report["solved_tensors"] == ["0.weight", "2.weight"]
    for k in ("0.bias", "2.bias"):
        torch.testing.assert_close(out.state[k], (experts[0].state()[k] + experts[1].state()[k]) / 2)


# ------------------------------------------------------------------ helpers
def test_svd_top_and_polar_match_svd():
    torch.manual_seed(1)
    for shape in ((30, 12), (12, 30)):
        m = torch.randn(*shape, dtype=torch.float64)
        u, s, vh = svd_top(m, 5)
        u0, s0, vh0 = torch.linalg.svd(m, full_matrices=False)
        torch.testing.assert_close(s, s0[:5])
        torch.testing.assert_close((u * s) @ vh, (u0[:, :5] * s0[:5]) @ vh0[:5])
        torch.testing.assert_close(polar(m), u0 @ vh0)
    # rank-deficient input: null directions are dropped, not invented
    a = torch.randn(20, 3, dtype=torch.float64)
    dup = torch.cat([a, a], 1)
    p = polar(dup)
    assert torch.linalg.matrix_rank(p).item() == 3
    _, s, _ = svd_top(dup, 6)
    assert s.numel() == 3


def test_compute_dtype_is_respected():
    base, experts = family(2)
    e64 = [e.to(dtype=torch.float64) for e in experts]
    out = run("tsv_m", job_for("tsv_m", e64, base.to(dtype=torch.float64), dtype=torch.float64))
    assert all(v.dtype == torch.float64 for v in out.state.values())


def test_fused_ties_equals_reference_composition():
    from pivotmerge_gui.core.methods.consensus import disjoint_merge, elect_sign, trim_top_k
    from pivotmerge_gui.core.methods.ties import ties_merge

    g = torch.Generator().manual_seed(3)
    taus = torch.randn(4, 300, 256, generator=g).round(decimals=1)  # many exact ties and zeros
    for method in ("sum", "count"):
        trimmed = trim_top_k(taus, 0.3)
        want, _ = disjoint_merge(trimmed, elect_sign(trimmed, method))
        facts: dict = {}
        torch.testing.assert_close(ties_merge(taus, 0.3, method, "mean", facts), want)
        assert 0.0 < facts["sign_conflict_fraction"] < 1.0


def test_regmean_few_samples_path_matches_gram_formula():
    from pivotmerge_gui.core.methods import Calibration

    g = torch.Generator().manual_seed(4)
    ws = [torch.randn(5, 9, generator=g) for _ in range(2)]
    xs = [torch.randn(4, 9, generator=g) for _ in range(2)]  # fewer samples than inputs
    out = run("regmean", job_for("regmean", [matrix_projector(w) for w in ws], params={"alpha": 0.6},
                                 calibration=Calibration(xs), weights=[1.0, 2.0]))
    grams = [c * shrink_gram(x.T @ x, 0.6) for c, x in zip((1.0, 2.0), xs)]
    torch.testing.assert_close(out.state["0.weight"], regmean_solve(ws, grams), atol=1e-4, rtol=1e-4)


def test_iso_cts_complement_path_matches_direct_residual():
    """m <= n uses the exact complement-coordinates shortcut; compare with the direct formula."""
    from pivotmerge_gui.core.methods.iso import iso_cts_update

    g = torch.Generator().manual_seed(9)
    taus = torch.randn(3, 12, 20, generator=g, dtype=torch.float64)  # m = 12 <= n = 20
    got = iso_cts_update(taus, 0.5)
    # direct: residual SVDs in the full space
    u, s, vh = torch.linalg.svd(taus.sum(0), full_matrices=False)
    common = 6
    uc = u[:, :common]
    parts_u, parts_s, parts_v = [], [], []
    for t in taus:
        ru, rs, rv = torch.linalg.svd(t - uc @ (uc.T @ t), full_matrices=False)
        parts_u.append(ru[:, :2]); parts_s.append(rs[:2]); parts_v.append(rv[:2])
    u_all = torch.cat(parts_u + [uc], 1)
    v_all = torch.cat(parts_v + [vh[:common]], 0)
    s_iso = torch.cat(parts_s + [s[:common]]).sum() / 12
    pu = torch.linalg.svd(u_all, full_matrices=False)
    pv = torch.linalg.svd(v_all, full_matrices=False)
    want = s_iso * (pu[0] @ pu[2]) @ (pv[0] @ pv[2])
    torch.testing.assert_close(got, want)


def test_iso_cts_extreme_common_fractions():
    from pivotmerge_gui.core.methods.iso import iso_c_update, iso_cts_update

    g = torch.Generator().manual_seed(2)
    for shape in ((12, 20), (20, 12)):
        taus = torch.randn(3, *shape, generator=g, dtype=torch.float64)
        # everything common: Iso-CTS is Iso-C
        torch.testing.assert_close(iso_cts_update(taus, 1.0), iso_c_update(taus.sum(0)))
        # nothing common: still a flat spectrum over the full rank
        s = torch.linalg.svdvals(iso_cts_update(taus, 0.0))
        assert (s.max() - s.min()) / s.max() < 1e-8
