"""PivotMerge data-driven ALM: the progressive, alignment-guided ridge refit of linear layers."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.alignment import permute_hidden
from pivotmerge_gui.core.errors import Cancelled
from pivotmerge_gui.core.methods import Calibration, MergeJob, get_method
from pivotmerge_gui.core.progress import CancelToken
from tests.conftest import make_mlp_projector

PM = get_method("pivotmerge")


def run(experts, params=None, **kw):
    job = MergeJob(experts=experts, params=PM.validate_params(params or {}), **kw)
    gen = PM().merge(job)
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


def finetuned(base, seed, scale=0.08):
    g = torch.Generator().manual_seed(seed)
    return base.with_state({k: v + scale * torch.randn(v.shape, generator=g) for k, v in base.state().items()},
                           source=f"ft-{seed}")


@pytest.fixture
def family():
    base = make_mlp_projector(12, 40, 20, seed=0)
    return base, [finetuned(base, s) for s in (1, 2, 3)]


def calibration(k, d, n=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Calibration([torch.randn(n, d, generator=g) + 1.5 * i for i in range(k)],
                       [f"dom{i}" for i in range(k)])


def objective(experts, state, cal):
    merged = experts[0].with_state(state)
    return sum(float((merged.forward(x) - e.forward(x)).double().pow(2).sum()) / x.shape[0]
               for e, x in zip(experts, cal.features))


def assert_same_function(a, b, xs, atol=1e-5):
    for x in xs:
        torch.testing.assert_close(a.forward(x), b.forward(x), atol=atol, rtol=0)


def test_fit_reduces_the_calibration_objective_and_reports_per_layer(family):
    base, experts = family
    cal = calibration(3, 12)
    prior = run(experts, {"alm": "data-free"}, base=base, calibration=cal)
    fit = run(experts, {"alm": "data", "alm_tokens": 96}, base=base, calibration=cal)
    auto = run(experts, {"alm_tokens": 96}, base=base, calibration=cal)
    a, b = objective(experts, prior.state, cal), objective(experts, fit.state, cal)
    assert b < 0.5 * a  # a real fit, not a nudge
    alm = fit.report["alm"]
    assert alm["mode"] == "data" and auto.report["alm"]["mode"] == "data"
    assert alm["objective_prior"] == pytest.approx(a, rel=1e-4)
    assert alm["objective"] == pytest.approx(b, rel=1e-4)
    assert alm["tokens_per_domain"] == [96, 96, 96]
    assert [l["layer"] for l in alm["layers"]] == ["0", "2"]  # forward order
    for lay in alm["layers"]:
        assert lay["tokens"] == 288 and lay["mu"] > 0 and lay["alm_ridge"] == PM().defaults()["alm_ridge"]
        assert 0 <= lay["residual_after"] < lay["residual_before"]
    rep = {l["layer"]: l for l in fit.report["layers"]}
    assert rep["0"]["fitted"] and rep["2"]["fitted"] and rep["2"]["source"] == "alm-data-fit"
    for k in fit.state:
        assert torch.equal(fit.state[k], auto.state[k])


def test_last_layer_is_the_least_squares_solution_without_ridge(family):
    """alm_ridge = 0: the gradient of the end-to-end objective w.r.t. the last layer vanishes."""
    base, experts = family
    cal = calibration(3, 12, n=200)
    fit = run(experts, {"alm": "data", "alm_ridge": 0.0, "alm_tokens": 200}, base=base, calibration=cal)
    prior = run(experts, {"alm": "data-free"}, base=base, calibration=cal)

    def grad_last(st):
        state = {k: v.clone().double().requires_grad_(k.startswith("2.")) for k, v in st.items()}
        merged = experts[0].with_state(state)
        loss = sum((merged.forward(x.double()) - e.forward(x).double()).pow(2).sum() / x.shape[0]
                   for e, x in zip(experts, cal.features))
        loss.backward()
        return float(torch.cat([state["2.weight"].grad.flatten(), state["2.bias"].grad]).norm())

    # zero up to the fp32 rounding of the stored weights
    assert grad_last(fit.state) < 1e-4 * grad_last(prior.state)


def test_infinite_ridge_is_the_data_free_merge(family):
    base, experts = family
    cal = calibration(3, 12)
    for b in (base, None):
        prior = run(experts, {"alm": "data-free"}, base=b, calibration=cal)
        fit = run(experts, {"alm": "data", "alm_ridge": 1e12}, base=b, calibration=cal)
        for k in prior.state:
            torch.testing.assert_close(fit.state[k], prior.state[k], atol=1e-6, rtol=1e-6)


def test_identical_experts_come_back(family):
    base, _ = family
    e = finetuned(base, 7)
    cal = calibration(3, 12)
    for b in (base, None):
        out = run([e, e, e], {"alm": "data", "alm_ridge": 0.0}, base=b, calibration=cal)
        for k, v in e.state().items():
            torch.testing.assert_close(out.state[k], v, atol=1e-5, rtol=0)


def test_permuted_different_init_copies_return_the_projector():
    p = make_mlp_projector(12, 48, 20, seed=5)
    g = torch.Generator().manual_seed(1)
    copies = [p] + [permute_hidden(p, ("0", "2"), torch.randperm(48, generator=g)) for _ in range(3)]
    cal = calibration(4, 12)
    out = run(copies, {"alm": "data"}, calibration=cal)
    x = torch.randn(30, 12, generator=g)
    assert_same_function(p.with_state(out.state), p, [x, *cal.features])
    # without hidden-unit alignment the hidden targets do not correspond and the fit is off
    off = run(copies, {"alm": "data", "align_hidden_units": False}, calibration=cal)
    assert float((p.with_state(off.state).forward(x) - p.forward(x)).abs().max()) > 1e-3


def test_fit_beats_the_one_coefficient_fit_with_different_inits():
    """Independently initialised experts, each a different function: the layer refit matches
    every expert on its own domain far better than one coefficient per layer."""
    experts = [make_mlp_projector(12, 40, 20, seed=s) for s in (11, 12, 13)]
    cal = calibration(3, 12, n=128)
    lam = run(experts, {"alm": "data-lambda", "alm_tokens": 128}, calibration=cal)
    fit = run(experts, {"alm": "data", "alm_tokens": 128}, calibration=cal)
    assert objective(experts, fit.state, cal) < 0.5 * objective(experts, lam.state, cal)


def test_user_coefficient_fixes_a_layer_and_scale_multiplies_the_fitted_update(family):
    base, experts = family
    cal = calibration(3, 12)
    off = run(experts, {"alm": "off"}, base=base, calibration=cal)
    fixed = run(experts, {"alm": "data"}, base=base, calibration=cal, layer_coefficients={"0": 0.5})
    ref = base.state()
    tau0 = off.state["0.weight"] - ref["0.weight"]
    torch.testing.assert_close(fixed.state["0.weight"], ref["0.weight"] + 0.5 * tau0, atol=1e-6, rtol=0)
    assert [l["layer"] for l in fixed.report["alm"]["layers"]] == ["2"]
    one = run(experts, {"alm": "data"}, base=base, calibration=cal)
    half = run(experts, {"alm": "data", "scale": 0.5}, base=base, calibration=cal)
    for k in one.state:
        torch.testing.assert_close(half.state[k] - ref[k], 0.5 * (one.state[k] - ref[k]), atol=1e-6, rtol=0)


def test_deterministic(family):
    base, experts = family
    cal = calibration(3, 12)
    a = run(experts, {"alm": "data"}, base=base, calibration=cal, seed=0)
    b = run(experts, {"alm": "data"}, base=base, calibration=cal, seed=3)
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])


def test_cancel_during_the_fit(family):
    base, experts = family
    tok = CancelToken()
    job = MergeJob(experts=experts, base=base, params=PM.validate_params({"alm": "data"}),
                   calibration=calibration(3, 12), cancel=tok)
    gen = PM().merge(job)
    with pytest.raises(Cancelled):
        while True:
            ev = next(gen)
            if ev.stage == "alm":
                tok.cancel()
