"""PivotMerge: stages, report, alignment, ALM, overrides, cancel, determinism."""

from __future__ import annotations

import json

import pytest
import torch

from pivotmerge_gui.core.alignment import permute_hidden
from pivotmerge_gui.core.errors import Cancelled, MethodError, ParameterError
from pivotmerge_gui.core.methods import Calibration, MergeJob, get_method
from pivotmerge_gui.core.methods.pivotmerge import (
    elect_and_merge,
    overlap_normalised_sum,
    shared_subspace,
)
from pivotmerge_gui.core.progress import CancelToken, ProgressEvent
from tests.conftest import make_mlp_projector

PM = get_method("pivotmerge")
ALL_OFF = {"align_hidden_units": False, "sdf": False, "filter_conflicts": False, "residuals": False,
           "alm": "off"}


def run(experts, params=None, **kw):
    job = MergeJob(experts=experts, params=PM.validate_params(params or {}), **kw)
    gen = PM().merge(job)
    events = []
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            return stop.value, events


def finetuned(base, seed, scale=0.05, rank=None):
    """base + a (low-rank) update per 2-D weight, small noise on vectors."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in base.state().items():
        if v.dim() == 2 and rank:
            upd = torch.randn(v.shape[0], rank, generator=g) @ torch.randn(rank, v.shape[1], generator=g)
            upd = upd * scale / rank**0.5
        else:
            upd = scale * torch.randn(v.shape, generator=g)
        out[k] = v + upd
    return base.with_state(out, source=f"ft-{seed}")


@pytest.fixture
def family():
    base = make_mlp_projector(16, 48, 24, seed=0)
    experts = [finetuned(base, s, rank=4) for s in (1, 2, 3)]
    return base, experts


def test_registered_metadata():
    d = PM.describe()
    assert d["reference_url"] == "https://arxiv.org/abs/2604.22823"
    assert "abstract" in d["description"]
    assert PM.uses_base and PM.uses_calibration and PM.handles_layer_coefficients
    names = {p["name"]: p for p in d["parameters"]}
    for n in ("pivot", "align_hidden_units", "sdf", "shared_energy", "max_rank", "filter_conflicts",
              "trim_density", "residuals", "residual_rank", "residual_weight", "alm", "scale"):
        assert n in names
    for n in ("align_hidden_units", "sdf", "filter_conflicts", "residuals"):
        assert names[n]["type"] == "bool"
    assert names["scale"]["is_scale"]
    assert set(names["alm"]["choices"]) == {"auto", "data", "data-lambda", "data-free", "off"}


def test_identical_experts_merge_to_themselves():
    e = make_mlp_projector(16, 48, 24, seed=4)
    # no base: reference is their mean = the expert itself
    out, _ = run([e, e.clone(), e.clone()])
    for k, v in e.state().items():
        torch.testing.assert_close(out.state[k], v, atol=1e-6, rtol=0)
    # with a base and a low-rank update the shared subspace holds all of it
    base = make_mlp_projector(16, 48, 24, seed=5)
    ft = finetuned(base, 9, rank=3)
    out, _ = run([ft, ft.clone()], base=base)
    for k, v in ft.state().items():
        torch.testing.assert_close(out.state[k], v, atol=1e-5, rtol=0)


def test_all_stages_off_is_weight_average_and_scale_is_task_arithmetic(family):
    base, experts = family
    out, _ = run(experts, ALL_OFF, base=base)
    for k in base.state():
        mean = torch.stack([e.state()[k] for e in experts]).mean(0)
        torch.testing.assert_close(out.state[k], mean, atol=1e-6, rtol=0)
    out, _ = run(experts, {**ALL_OFF, "scale": 2.0}, base=base)
    for k, b in base.state().items():
        tv = torch.stack([e.state()[k] - b for e in experts]).mean(0)
        torch.testing.assert_close(out.state[k], b + 2.0 * tv, atol=1e-6, rtol=0)
    out, _ = run(experts, ALL_OFF)  # no base: mean of the experts
    for k in base.state():
        mean = torch.stack([e.state()[k] for e in experts]).mean(0)
        torch.testing.assert_close(out.state[k], mean, atol=1e-6, rtol=0)


def test_stage_toggles_change_the_result(family):
    base, experts = family
    default, _ = run(experts, {"alm": "off"}, base=base)
    for change in ({"sdf": False}, {"filter_conflicts": True}, {"residuals": False},
                   {"shared_energy": 0.5}, {"trim_density": 0.3}):
        other, _ = run(experts, {"alm": "off", **change}, base=base)
        diff = max(float((other.state[k] - default.state[k]).abs().max()) for k in default.state)
        assert diff > 1e-4, change
    # data-free ALM restores magnitude lost to cancellation (a plain mean cancels)
    plain, _ = run(experts, {"alm": "off", "filter_conflicts": False}, base=base)
    alm, _ = run(experts, {"alm": "data-free", "filter_conflicts": False}, base=base)
    assert all(l["lambda"] > 1.05 for l in alm.report["layers"])
    diff = max(float((alm.state[k] - plain.state[k]).abs().max()) for k in plain.state)
    assert diff > 1e-4
    # ... but not when the reference is the experts' own mean (no base): nothing to restore
    nobase, _ = run(experts, {"alm": "data-free"})
    assert all(l["lambda"] == 1.0 for l in nobase.report["layers"]) and "note" in nobase.report["alm"]


def test_report_has_every_field(family):
    base, experts = family
    out, events = run(experts, base=base, expert_names=["a", "b", "c"])
    rep = out.report
    json.dumps(rep)  # JSON-able
    assert rep["pivot"]["index"] in (0, 1, 2) and rep["pivot"]["name"] in ("a", "b", "c")
    assert rep["pivot"]["chosen_by"].startswith("medoid")
    assert len(rep["pivot"]["scores"]) == 3
    assert [a["expert"] for a in rep["alignment"]] == ["a", "b", "c"]
    for a in rep["alignment"]:
        assert a["is_identity"] is True and a["fraction_moved"] == 0.0
    w = {t["tensor"]: t for t in rep["tensors"]}
    for key in ("0.weight", "2.weight"):
        assert w[key]["mode"] == "sdf"
        assert 1 <= w[key]["rank"] <= 24
        assert 0.0 < w[key]["shared_energy"] <= 1.0
        assert 0.0 <= w[key]["conflict_fraction"] <= 1.0
    assert 0.0 <= w["0.bias"]["conflict_fraction"] <= 1.0
    assert {l["layer"] for l in rep["layers"]} == {"0", "2"}
    for l in rep["layers"]:
        assert 1.0 <= l["lambda"] <= 3.0 and l["source"] == "alm-data-free"
        assert 0.0 < l["shared_energy_fraction"] <= 1.0
    assert rep["alm"]["mode"] == "data-free"
    assert rep["reference"].startswith("base")
    assert set(rep["lambdas"]) == {"0", "2"}
    stages = {e.stage for e in events}
    assert {"pivot", "align", "reference", "sdf", "compose"} <= stages
    fr = [e.fraction for e in events]
    assert fr == sorted(fr) and fr[-1] == 1.0 and all(isinstance(e, ProgressEvent) for e in events)


def test_alignment_makes_permuted_copies_merge_back_to_the_projector():
    p = make_mlp_projector(16, 64, 24, seed=3)
    g = torch.Generator().manual_seed(0)
    copies = [p] + [permute_hidden(p, ("0", "2"), torch.randperm(64, generator=g)) for _ in range(3)]
    x = torch.randn(9, 16, generator=g)
    out, _ = run(copies, {"pivot": 2})
    merged = p.with_state(out.state)
    torch.testing.assert_close(merged.forward(x), p.forward(x), atol=1e-5, rtol=0)
    assert out.report["pivot"]["chosen_by"] == "user"
    moved = [a["fraction_moved"] for a in out.report["alignment"]]
    assert moved[2] == 0.0 and all(m > 0.5 for i, m in enumerate(moved) if i != 2)
    # without alignment the same merge is far off
    off, _ = run(copies, {"pivot": 2, "align_hidden_units": False})
    err = (p.with_state(off.state).forward(x) - p.forward(x)).abs().max()
    assert err > 1e-2
    # automatic pivot works as well
    auto, _ = run(copies)
    torch.testing.assert_close(p.with_state(auto.state).forward(x), p.forward(x), atol=1e-5, rtol=0)


def _calibration(experts, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    d = experts[0].in_features
    feats = [torch.randn(n, d, generator=g) + 2.0 * i for i in range(len(experts))]
    return Calibration(feats, [f"dom{i}" for i in range(len(experts))])


def _objective(experts, state, cal):
    merged = experts[0].with_state(state)
    return sum(float((merged.forward(x) - e.forward(x)).pow(2).sum()) / x.shape[0]
               for e, x in zip(experts, cal.features))


def test_alm_data_driven_reduces_the_objective(family):
    base, experts = family
    cal = _calibration(experts)
    at1, _ = run(experts, {"alm": "off"}, base=base, calibration=cal)
    fit, _ = run(experts, {"alm": "auto"}, base=base, calibration=cal)
    assert fit.report["alm"]["mode"] == "data"
    assert fit.report["pivot"]["chosen_by"].startswith("calibration")
    a, b = _objective(experts, at1.state, cal), _objective(experts, fit.state, cal)
    assert b < a * 0.999
    assert fit.report["alm"]["objective"] == pytest.approx(b, rel=1e-3)
    assert fit.report["alm"]["objective_at_1"] == pytest.approx(a, rel=1e-3)
    with pytest.raises(MethodError):
        run(experts, {"alm": "data"}, base=base)
    with pytest.raises(MethodError):
        run(experts, base=base, calibration=Calibration(cal.features[:2]))


def test_user_layer_coefficients_override_alm(family):
    base, experts = family
    cal = _calibration(experts)
    for cal_ in (None, cal):
        out, _ = run(experts, {"scale": 0.7}, base=base, calibration=cal_, layer_coefficients={"2": 0.25})
        rep = {l["layer"]: l for l in out.report["layers"]}
        assert rep["2"]["coefficient"] == 0.25 and rep["2"]["source"] == "user"
        assert out.report["lambdas"]["2"] == 0.25
        ref = base.state()
        off, _ = run(experts, {"alm": "off"}, base=base, calibration=cal_)
        # layer 2 = base + 0.25 * tau*  (tau* does not depend on ALM)
        tau = off.state["2.weight"] - ref["2.weight"]
        torch.testing.assert_close(out.state["2.weight"], ref["2.weight"] + 0.25 * tau, atol=1e-6, rtol=0)
    with pytest.raises(ParameterError):
        run(experts, base=base, layer_coefficients={"nope": 1.0})


def test_cancel_raises(family):
    base, experts = family
    tok = CancelToken()
    job = MergeJob(experts=experts, base=base, params=PM.validate_params({}), cancel=tok)
    gen = PM().merge(job)
    next(gen)
    tok.cancel()
    with pytest.raises(Cancelled):
        while True:
            next(gen)


def test_deterministic(family):
    base, experts = family
    a, _ = run(experts, base=base, seed=0)
    b, _ = run(experts, base=base, seed=1)
    for k in a.state:
        assert torch.equal(a.state[k], b.state[k])


def test_randomized_subspace_matches_exact_on_low_rank():
    g = torch.Generator().manual_seed(0)
    taus = torch.stack([torch.randn(1100, 6, generator=g) @ torch.randn(6, 1200, generator=g) for _ in range(3)])
    u, v, info = shared_subspace(taus, 0.999, 32)
    assert info["method"].startswith("randomized")
    assert info["rank"] <= 18
    c = torch.matmul(torch.matmul(u.t(), taus), v)
    assert float(c.pow(2).sum() / taus.pow(2).sum()) > 0.99
    u2, _v2, info2 = shared_subspace(taus[:, :300, :400].contiguous(), 0.999, 0)
    assert info2["method"] == "exact-gram"
    torch.testing.assert_close(u2.t() @ u2, torch.eye(u2.shape[1]), atol=1e-5, rtol=0)


def test_elect_and_merge_hand_example():
    stack = torch.tensor([[1.0, -2.0, 0.5], [3.0, 1.0, -0.5], [-1.0, -1.0, 0.0]])
    merged, st = elect_and_merge(stack, torch.ones(3), filter_conflicts=True)
    # column 0: mass +3 -> mean(1, 3) = 2; column 1: mass -2 -> mean(-2, -1); column 2: tie
    torch.testing.assert_close(merged, torch.tensor([2.0, -1.5, 0.0]))
    assert st["conflict_fraction"] == pytest.approx(4 / 8)
    plain, _ = elect_and_merge(stack, torch.ones(3), filter_conflicts=False)
    torch.testing.assert_close(plain, stack.mean(0))


def test_overlap_normalised_sum_limits():
    g = torch.Generator().manual_seed(0)
    q, _ = torch.linalg.qr(torch.randn(20, 8, generator=g))
    p, _ = torch.linalg.qr(torch.randn(15, 8, generator=g))
    s = torch.tensor([3.0, 2.0])
    one = (q[:, :2], s, p[:, :2])
    single = (q[:, :2] * s) @ p[:, :2].t()
    torch.testing.assert_close(overlap_normalised_sum([one, one, one]), single, atol=1e-5, rtol=0)
    two = (q[:, 2:4], s, p[:, 2:4])
    other = (q[:, 2:4] * s) @ p[:, 2:4].t()
    torch.testing.assert_close(overlap_normalised_sum([one, two]), single + other, atol=1e-5, rtol=0)


def test_bf16_compute_dtype_close_to_fp32(family):
    base, experts = family
    cal = _calibration(experts)
    ref, _ = run(experts, {"alm": "data"}, base=base, calibration=cal)
    lo = [e.to(dtype=torch.bfloat16) for e in experts]
    out, _ = run(lo, {"alm": "data"}, base=base.to(dtype=torch.bfloat16), dtype=torch.bfloat16,
                 calibration=Calibration([f.bfloat16() for f in cal.features]))
    for k, v in ref.state.items():
        assert out.state[k].dtype == torch.bfloat16
        torch.testing.assert_close(out.state[k].float(), v, atol=0.05 * float(v.abs().max()), rtol=0)


def test_data_alm_is_bounded_and_handles_merge_tokens_and_vectors():
    """Qwen2-VL-like merger (layernorm, 4-token merge, extra vector) from different inits:
    1-D updates averaged around their own mean vanish and are not fitted; lambdas stay sane."""
    from .helpers import qwen_merger

    experts = [qwen_merger(s) for s in range(3)]
    g = torch.Generator().manual_seed(0)
    cal = Calibration([torch.randn(400, 8, generator=g) for _ in range(3)])
    out, _ = run(experts, {"alm_tokens": 64, "filter_conflicts": False}, calibration=cal)
    lam = out.report["lambdas"]
    assert lam["ln"] == 1.0 and lam["nl"] == 1.0  # nothing to scale (mean of 1-D updates = 0)
    assert all(0.0 <= v <= 4.0 for v in lam.values())
    assert out.report["alm"]["tokens_per_domain"] == [64, 64, 64]
    assert out.report["alm"]["objective"] <= out.report["alm"]["objective_at_1"]


def test_align_precision_reaches_the_matching(monkeypatch):
    """``align_precision`` picks the similarities of big layers' matching (forced big here):
    'auto' solves the bf16 ones, 'float32' the fp32 ones; both merges are made of exactly
    permuted experts, so a copy set of one projector still merges back to it."""
    from pivotmerge_gui.core import alignment as al

    monkeypatch.setattr(al, "_BF16_MIN_MACS", 1)
    monkeypatch.setattr(al, "_BF16_ASSIGN_MIN_MACS", 1)
    monkeypatch.setattr(al, "bf16_is_fast", lambda device_type: True)
    experts = [make_mlp_projector(16, 48, 24, seed=s) for s in (1, 2, 3)]

    def solvers(out):
        return {p["solver"] for a in out.report["alignment"] for p in a["pairs"]}

    auto, _ = run(experts, {"pivot": 0, "sdf": False})
    exact, _ = run(experts, {"pivot": 0, "sdf": False, "align_precision": "float32"})
    assert "assignment-bf16" in solvers(auto) and "assignment-bf16" not in solvers(exact)
    assert "assignment" in solvers(exact)
    p = experts[0]
    g = torch.Generator().manual_seed(0)
    copies = [p] + [permute_hidden(p, ("0", "2"), torch.randperm(48, generator=g)) for _ in range(2)]
    x = torch.randn(5, 16, generator=g)
    for prec in ("auto", "float32"):
        out, _ = run(copies, {"pivot": 0, "align_precision": prec})
        torch.testing.assert_close(p.with_state(out.state).forward(x), p.forward(x), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="align_precision"):
        PM.validate_params({"align_precision": "fp8"})


def test_owned_experts_are_swapped_for_their_aligned_versions():
    """A job that owns its working copies (the pipeline's) gets each permuted expert
    replaced by its aligned, function-identical version (its unaligned copy is freed), and
    where nothing after SDF reads their values (every ALM mode but "data") by structure-only
    (meta) versions, each tensor let go once merged; a caller's own list is left alone, and
    the merge is the same either way."""
    p = make_mlp_projector(16, 64, 24, seed=3)
    g = torch.Generator().manual_seed(0)
    copies = [p] + [permute_hidden(p, ("0", "2"), torch.randperm(64, generator=g)) for _ in range(2)]
    x = torch.randn(5, 16, generator=g)
    snapshot = [{k: v.clone() for k, v in c.state().items()} for c in copies]
    mine = list(copies)
    ref, _ = run(mine, {"pivot": 0})
    assert all(a is b for a, b in zip(mine, copies))
    owned = list(copies)
    out, _ = run(owned, {"pivot": 0}, owns_experts=True)  # data-free ALM: released
    for e, orig in zip(owned, copies):
        assert e.device.type == "meta" and list(e.state()) == list(orig.state())
        assert [t.shape for t in e.state().values()] == [t.shape for t in orig.state().values()]
    for c, snap in zip(copies, snapshot):  # the caller's projectors are untouched
        assert all(torch.equal(c.state()[k], v) for k, v in snap.items())
    for k, v in ref.state.items():
        assert torch.equal(out.state[k], v), k
    cal = _calibration(copies)
    owned = list(copies)
    data, _ = run(owned, {"pivot": 0, "alm": "data"}, owns_experts=True, calibration=cal)
    assert owned[0] is copies[0] and all(owned[i] is not copies[i] for i in (1, 2))
    for e, orig in zip(owned, copies):
        torch.testing.assert_close(e.forward(x), orig.forward(x), atol=1e-5, rtol=0)
        assert torch.equal(e.layer("0").weight, p.layer("0").weight)  # in the pivot's frame
    again, _ = run(list(copies), {"pivot": 0, "alm": "data"}, calibration=cal)
    for k, v in again.state.items():
        assert torch.equal(data.state[k], v), k
