"""Every registered baseline: complete metadata, valid defaults, JSON reports, errors."""

from __future__ import annotations

import json

import pytest
import torch

from pivotmerge_gui.core.errors import (
    Cancelled,
    NeedsBaseError,
    NeedsCalibrationError,
    ParameterError,
)
from pivotmerge_gui.core.methods import list_methods
from pivotmerge_gui.core.progress import CancelToken, ProgressEvent

from .helpers import calibration_for, family, job_for, run

BASELINES = [m for m in list_methods() if m.name != "pivotmerge"]
EXPECTED = {"linear", "task_arithmetic", "ties", "dare_linear", "dare_ties", "breadcrumbs", "tsv_m",
            "iso_c", "iso_cts", "knots", "cart", "regmean", "regmean_pp", "prodistill", "ssam"}


def test_all_baselines_registered():
    assert EXPECTED <= {m.name for m in BASELINES}


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_metadata_complete_and_defaults_validate(cls):
    assert cls.name and cls.pretty_name and len(cls.description) > 40
    assert cls.reference_url.startswith("https://") and ("arxiv.org" in cls.reference_url or "github.com" in cls.reference_url)
    names = [p.name for p in cls.params]
    assert len(names) == len(set(names))
    for p in cls.params:
        assert p.help and p.type in (float, int, bool, str)
        assert p.validate(cls.name, p.default) == p.default
        if p.choices is not None:
            assert p.default in p.choices
    assert cls.validate_params({}) == cls.defaults()
    assert sum(p.is_scale for p in cls.params) <= 1
    json.dumps(cls.describe())
    with pytest.raises(ParameterError):
        cls.validate_params({"no_such_parameter": 1})


def test_flags():
    by = {m.name: m for m in BASELINES}
    data_driven = {"regmean", "regmean_pp", "prodistill"}
    for n in data_driven | {"linear", "cart"}:
        assert not by[n].needs_base, n
    for n in data_driven:
        assert by[n].needs_calibration, n
    for n in EXPECTED - data_driven - {"linear", "cart"}:
        assert by[n].needs_base, n
    assert by["dare_linear"].randomized and by["dare_ties"].randomized
    assert not by["ties"].randomized


@pytest.mark.parametrize("cls", [m for m in BASELINES if m.needs_base], ids=lambda c: c.name)
def test_task_vector_methods_need_base(cls):
    _, experts = family(2)
    with pytest.raises(NeedsBaseError):
        cls.check_job(has_base=False, has_calibration=False)
    with pytest.raises(NeedsBaseError):
        run(cls.name, job_for(cls.name, experts))


def test_regmean_needs_calibration():
    _, experts = family(2)
    with pytest.raises(NeedsCalibrationError):
        run("regmean", job_for("regmean", experts))


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_runs_reports_json_progress_and_determinism(cls):
    base, experts = family(3)
    kw = {"calibration": calibration_for(experts)} if cls.needs_calibration else {}
    events = []
    method = cls()
    gen = method.merge(job_for(cls.name, experts, base, seed=7, **kw))
    try:
        while True:
            events.append(next(gen))
    except StopIteration as stop:
        out = stop.value
    assert events and all(isinstance(e, ProgressEvent) for e in events)
    assert events[-1].fraction == 1.0
    json.dumps(out.report)
    assert set(out.state) == set(experts[0].state())
    for k, v in out.state.items():
        assert v.shape == experts[0].state()[k].shape and v.dtype == torch.float32
        assert torch.isfinite(v).all()
    again = run(cls.name, job_for(cls.name, experts, base, seed=7, **kw))
    for k in out.state:
        assert torch.equal(out.state[k], again.state[k]), k


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_cancel_raises(cls):
    base, experts = family(2)
    kw = {"calibration": calibration_for(experts)} if cls.needs_calibration else {}
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        run(cls.name, job_for(cls.name, experts, base, cancel=token, **kw))


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_experts_equal_to_base_give_base(cls):
    """Zero task vectors must not produce NaNs (rank-0 spectra, empty masks)."""
    base, _ = family(1)
    experts = [base.clone(), base.clone()]
    kw = {"calibration": calibration_for(experts)} if cls.needs_calibration else {}
    out = run(cls.name, job_for(cls.name, experts, base, **kw))
    for k, v in base.state().items():
        torch.testing.assert_close(out.state[k], v, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cls", BASELINES, ids=lambda c: c.name)
def test_bfloat16_compute(cls):
    base, experts = family(2)
    experts = [e.to(dtype=torch.bfloat16) for e in experts]
    base = base.to(dtype=torch.bfloat16)
    kw = {"calibration": calibration_for(experts)} if cls.needs_calibration else {}
    out = run(cls.name, job_for(cls.name, experts, base, dtype=torch.bfloat16, **kw))
    ref = run(cls.name, job_for(cls.name, [e.to(dtype=torch.float32) for e in experts],
                                base.to(dtype=torch.float32), **kw))
    for k, v in out.state.items():
        assert v.dtype == torch.bfloat16 and torch.isfinite(v.float()).all()
        # bf16 rounding can flip individual entries across a trim threshold (TIES, KnOTS,
        # Breadcrumbs), so compare whole tensors, not entries
        err = (v.float() - ref.state[k]).norm() / ref.state[k].norm()
        assert err < 0.05, (k, float(err))


# ------------------------------------------------------------------ discovery
def test_every_method_module_is_discovered():
    import pkgutil

    import pivotmerge_gui.core.methods as pkg
    from pivotmerge_gui.core.methods.base import NOT_METHODS

    modules = {i.name for i in pkgutil.iter_modules(pkg.__path__) if not i.name.startswith("_")}
    registered = {m.__module__.split(".")[3] for m in list_methods()}
    assert registered == modules - NOT_METHODS


def test_a_new_module_with_register_is_enough(tmp_path, monkeypatch):
    """Adding a merge method touches one place: a module in the package."""
    import sys

    import pivotmerge_gui.core.methods as pkg
    from pivotmerge_gui.core.methods import base

    (tmp_path / "zz_probe_method.py").write_text(
        "from pivotmerge_gui.core.methods.base import MergeMethod, register\n"
        "@register\n"
        "class Probe(MergeMethod):\n"
        "    name = 'zz_probe'\n"
        "    pretty_name = 'Probe'\n"
        "    reference_url = 'https://example.org'\n"
        "    description = 'a probe'\n"
    )
    monkeypatch.setattr(pkg, "__path__", [*pkg.__path__, str(tmp_path)])
    monkeypatch.setattr(base, "_loaded", False)
    try:
        assert base.get_method("zz_probe").pretty_name == "Probe"
        assert "zz_probe" in {m.name for m in list_methods()}
    finally:
        base.REGISTRY.pop("zz_probe", None)
        sys.modules.pop("pivotmerge_gui.core.methods.zz_probe_method", None)
