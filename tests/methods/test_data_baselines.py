"""The data-driven baselines RegMean, RegMean++ and closed-form ProDistill: their defining
formulas on small cases with known answers, every projector family, a missing domain."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pivotmerge_gui.core.calibration.features import pooled_features
from pivotmerge_gui.core.methods import Calibration, get_method
from pivotmerge_gui.core.projector import Layer, Projector

from .helpers import calibration_for, family, job_for, qwen_merger, run

DATA_METHODS = ("regmean", "regmean_pp", "prodistill")


def deep_mlp(seed: int) -> Projector:
    """LLaVA mlp3x_gelu: linear, gelu, linear, gelu, linear."""
    g = torch.Generator().manual_seed(seed)
    t = lambda *s: torch.randn(*s, generator=g) * 0.2
    return Projector("llava-mlp3x_gelu",
                     [Layer("0", "linear", {"weight": t(20, 12), "bias": t(20)}),
                      Layer("2", "linear", {"weight": t(20, 20), "bias": t(20)}),
                      Layer("4", "linear", {"weight": t(16, 20), "bias": t(16)})],
                     ("linear:0", "gelu", "linear:2", "gelu", "linear:4"))


def linear_projector(w: torch.Tensor, b: torch.Tensor | None = None) -> Projector:
    tensors = {"weight": w} | ({"bias": b} if b is not None else {})
    return Projector("llava-linear", [Layer("0", "linear", tensors)], ops=("linear:0",))


def features(n_domains: int, n: int, width: int, seed: int = 0) -> Calibration:
    g = torch.Generator().manual_seed(seed)
    return Calibration([torch.randn(n, width, generator=g) + 0.3 * k for k in range(n_domains)])


FAMILIES = {
    "mlp2x_gelu": (lambda s: family(1, seed=s)[1][0], 16),
    "mlp3x_gelu": (deep_mlp, 12),
    "linear": (lambda s: linear_projector(torch.randn(6, 10, generator=torch.Generator().manual_seed(s)),
                                          torch.randn(6, generator=torch.Generator().manual_seed(s + 50))), 10),
    "qwen2_vl_merger": (qwen_merger, 8),
}


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name", DATA_METHODS)
def test_one_expert_merges_to_itself(name, fam):
    make, width = FAMILIES[fam]
    expert = make(1)
    out = run(name, job_for(name, [expert], calibration=features(1, 96, width)))
    for k, v in expert.state().items():
        torch.testing.assert_close(out.state[k], v, atol=2e-5, rtol=1e-4, msg=f"{name} {fam} {k}")


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name", DATA_METHODS)
def test_identical_experts_merge_to_that_expert_on_every_family(name, fam):
    make, width = FAMILIES[fam]
    expert = make(2)
    out = run(name, job_for(name, [expert.clone() for _ in range(3)], calibration=features(3, 64, width),
                            weights=[1.0, 2.0, 0.5]))
    for k, v in expert.state().items():
        torch.testing.assert_close(out.state[k], v, atol=2e-5, rtol=1e-4, msg=f"{name} {fam} {k}")


@pytest.mark.parametrize("fam", FAMILIES)
@pytest.mark.parametrize("name", ("regmean_pp", "prodistill"))
def test_different_experts_on_every_family_fit_every_linear_layer(name, fam):
    make, width = FAMILIES[fam]
    experts = [make(s) for s in (3, 4, 5)]
    out = run(name, job_for(name, experts, calibration=features(3, 64, width)))
    linear = [layer.name for layer in experts[0].layers if layer.kind == "linear"]
    assert [k.split(".")[0] for k in out.report["solved_tensors"] if k.endswith("weight")] == linear
    for layer in experts[0].layers:  # norms and vectors are the average
        if layer.kind != "linear":
            for role in layer.tensors:
                key = f"{layer.name}.{role}"
                torch.testing.assert_close(out.state[key], sum(e.state()[key] for e in experts) / 3)
    assert all(torch.isfinite(v).all() for v in out.state.values())


def test_regmean_pp_first_layer_is_regmean_and_later_layers_use_merged_inputs():
    _, experts = family(3)
    cal = calibration_for(experts)
    a = run("regmean", job_for("regmean", experts, calibration=cal, weights=[1.0, 2.0, 3.0]))
    b = run("regmean_pp", job_for("regmean_pp", experts, calibration=cal, weights=[1.0, 2.0, 3.0]))
    torch.testing.assert_close(b.state["0.weight"], a.state["0.weight"], rtol=0, atol=0)
    for key in ("0.bias", "2.bias"):  # biases averaged by both
        torch.testing.assert_close(b.state[key], a.state[key])
    assert (b.state["2.weight"] - a.state["2.weight"]).abs().max() > 1e-4
    # layer 2 exactly: RegMean's alpha = 1 solve on the inputs of the merged layer 0
    out = run("regmean_pp", job_for("regmean_pp", experts, calibration=cal, params={"alpha": 1.0}))
    w0, b0 = out.state["0.weight"], out.state["0.bias"]
    hs = [F.gelu(x @ w0.T + b0).double() for x in cal.features]
    ys = [h @ e.state()["2.weight"].double().T for h, e in zip(hs, experts)]
    want = torch.linalg.lstsq(torch.cat(hs), torch.cat(ys)).solution.T
    torch.testing.assert_close(out.state["2.weight"].double(), want, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ("regmean", "regmean_pp"))
def test_alpha_one_is_plain_least_squares(name):
    g = torch.Generator().manual_seed(5)
    ws = [torch.randn(5, 7, generator=g) for _ in range(3)]
    xs = [torch.randn(30, 7, generator=g) + k for k in range(3)]
    out = run(name, job_for(name, [linear_projector(w) for w in ws], params={"alpha": 1.0},
                            calibration=Calibration(xs)))
    want = torch.linalg.lstsq(torch.cat(xs).double(),
                              torch.cat([x @ w.T for x, w in zip(xs, ws)]).double()).solution.T
    torch.testing.assert_close(out.state["0.weight"].double(), want, atol=1e-5, rtol=1e-4)


def _realisable_family():
    """Three mlp2x_gelu experts that share layer 0, with domain features such that ONE
    layer 2 [W b] reproduces every expert's layer-2 output on its own domain: expert k's
    layer 2 = Theta* + Z_k (I - P_k), P_k the projector onto the row space of [H_k 1]
    (H_k = domain k's hidden activations), so the experts differ where their domain has
    no data. 4 tokens per domain, 12 in all > 9 unknowns per output: Theta* is unique."""
    g = torch.Generator().manual_seed(11)
    w0, b0 = torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(8, generator=g, dtype=torch.float64)
    theta = torch.randn(5, 9, generator=g, dtype=torch.float64)
    xs, experts = [], []
    for _ in range(3):
        x = torch.randn(4, 6, generator=g, dtype=torch.float64)
        a = torch.cat([F.gelu(x @ w0.T + b0), torch.ones(4, 1, dtype=torch.float64)], 1)
        p = a.T @ torch.linalg.solve(a @ a.T, a)
        t = theta + torch.randn(5, 9, generator=g, dtype=torch.float64) @ (torch.eye(9, dtype=torch.float64) - p)
        experts.append(Projector("llava-mlp2x_gelu",
                                 [Layer("0", "linear", {"weight": w0.clone(), "bias": b0.clone()}),
                                  Layer("2", "linear", {"weight": t[:, :8].clone(), "bias": t[:, 8].clone()})],
                                 ("linear:0", "gelu", "linear:2")))
        xs.append(x)
    return experts, Calibration(xs), theta


def test_prodistill_without_ridge_recovers_an_exactly_realisable_layer():
    experts, cal, theta = _realisable_family()
    out = run("prodistill", job_for("prodistill", experts, params={"ridge": 0.0}, calibration=cal,
                                    dtype=torch.float64))
    torch.testing.assert_close(out.state["0.weight"], experts[0].state()["0.weight"])
    torch.testing.assert_close(out.state["2.weight"], theta[:, :8], atol=1e-8, rtol=1e-7)
    torch.testing.assert_close(out.state["2.bias"], theta[:, 8], atol=1e-8, rtol=1e-7)
    # the merged projector reproduces every expert on its own domain
    merged = experts[0].with_state(out.state)
    for e, x in zip(experts, cal.features):
        torch.testing.assert_close(merged.forward(x), e.forward(x), atol=1e-8, rtol=1e-7)
    assert [f["mu"] for f in out.report["layers"]] == [0.0, 0.0]
    # a ridge pulls towards the average: between the exact fit and the average
    avg = (sum(e.state()["2.weight"] for e in experts) / 3)
    ridged = run("prodistill", job_for("prodistill", experts, params={"ridge": 1.0}, calibration=cal,
                                       dtype=torch.float64)).state["2.weight"]
    assert 0 < (ridged - theta[:, :8]).norm() < (avg - theta[:, :8]).norm()


def test_prodistill_targets_are_each_experts_own_outputs_with_per_domain_weights():
    """Layer 2 solves the weighted ridge normal equations built from the merged layer 0's
    activations and each expert's own layer-2 output (own layer 0), each domain weighted
    w_k / n_k."""
    _, experts = family(2)
    g = torch.Generator().manual_seed(2)
    xs = [torch.randn(40, 16, generator=g), torch.randn(24, 16, generator=g) + 0.5]
    w, ridge = [1.0, 3.0], 0.1
    out = run("prodistill", job_for("prodistill", experts, params={"ridge": ridge}, calibration=Calibration(xs),
                                    weights=w))
    st = out.state
    m, r = torch.zeros(33, 33, dtype=torch.float64), torch.zeros(33, 24, dtype=torch.float64)
    for wk, x, e in zip(w, xs, experts):
        a = torch.cat([F.gelu(x @ st["0.weight"].T + st["0.bias"]), torch.ones(len(x), 1)], 1).double()
        y = e.forward(x).double()  # expert's own layer 2 on its own layer 0
        m += wk / (len(x) * sum(w)) * a.T @ a
        r += wk / (len(x) * sum(w)) * a.T @ y
    prior = torch.cat([sum(wk * e.state()[k] for wk, e in zip(w, experts)).double().reshape(24, -1) / 4
                       for k in ("2.weight", "2.bias")], 1)
    mu = ridge * float(m.diagonal().sum()) / 33
    want = torch.linalg.solve(m + mu * torch.eye(33, dtype=torch.float64), r + mu * prior.T).T
    torch.testing.assert_close(st["2.weight"].double(), want[:, :32], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(st["2.bias"].double(), want[:, 32], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", DATA_METHODS)
def test_missing_domain_uses_the_pooled_stand_in(name):
    _, experts = family(3)
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(48, 16, generator=g), None, torch.randn(40, 16, generator=g) + 0.5]
    names = ["web", "charts", "docs"]
    out = run(name, job_for(name, experts, calibration=Calibration(feats), expert_names=names))
    assert out.report["stand_in_domains"] == ["charts"]
    explicit = Calibration([feats[0], pooled_features(feats), feats[2]])
    same = run(name, job_for(name, experts, calibration=explicit, expert_names=names))
    assert same.report["stand_in_domains"] is None
    for k, v in out.state.items():
        torch.testing.assert_close(v, same.state[k], rtol=0, atol=0)


@pytest.mark.parametrize("name", DATA_METHODS)
def test_searched_parameter_grid(name):
    searched = [p for p in get_method(name).params if p.search is not None]
    assert len(searched) == 1 and len(searched[0].search) == 7
    p = searched[0]
    assert all(p.validate(name, v) == v for v in p.search)
