"""Auto-tune: the CMA-ES search on toy problems, determinism, cancel; the merge objective."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pivotmerge_gui.core.errors import Cancelled
from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.core.progress import CancelToken, drain
from pivotmerge_gui.core.tuning import MergeObjective, autotune, evolve

OPT = np.array([0.3, 1.7, 1.1])


def _toy(x: np.ndarray) -> float:
    return -float(((x - OPT) ** 2).sum())


def test_es_finds_the_known_optimum_and_improves_monotonically():
    events = []
    gen = evolve(_toy, [1.0, 1.0, 1.0], sigma0=0.3, generations=40, population=8, seed=1)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            best_x, best_f, f0, history, evals = stop.value
            break
    assert f0 == pytest.approx(_toy(np.ones(3)))
    assert np.abs(best_x - OPT).max() < 0.02 and best_f > -1e-3
    bests = [r.best_fitness for r in history]
    assert bests == sorted(bests) and len(history) == 40 and evals == 1 + 40 * 8
    assert events[-1].payload.best.layer_coefficients["1"] == pytest.approx(best_x[1])


def test_bounds_are_respected_and_an_optimum_on_the_bound_is_reached():
    seen = []

    def f(x):
        seen.append(x.copy())
        return -float(((x - np.array([-1.0, 3.0])) ** 2).sum())

    best_x, *_ = drain(evolve(f, [1.0, 1.0], generations=25, population=6, bounds=(0.0, 2.0)))
    assert all((s >= 0).all() and (s <= 2).all() for s in seen)
    np.testing.assert_allclose(best_x, [0.0, 2.0], atol=1e-3)


def test_seeded_and_deterministic():
    a = drain(evolve(_toy, [1, 1, 1], generations=5, population=6, seed=3))
    b = drain(evolve(_toy, [1, 1, 1], generations=5, population=6, seed=3))
    c = drain(evolve(_toy, [1, 1, 1], generations=5, population=6, seed=4))
    assert [r.best_fitness for r in a[3]] == [r.best_fitness for r in b[3]]
    np.testing.assert_array_equal(a[0], b[0])
    assert not np.array_equal(a[0], c[0])


def test_cancel_stops_within_one_evaluation():
    token = CancelToken()
    calls = []

    def f(x):
        calls.append(1)
        if len(calls) == 5:
            token.cancel()
        return _toy(x)

    with pytest.raises(Cancelled):
        drain(evolve(f, [1, 1, 1], generations=50, population=8, cancel=token))
    assert len(calls) == 5


def test_es_rejects_bad_sizes():
    with pytest.raises(ValueError):
        drain(evolve(_toy, [], generations=1))
    with pytest.raises(ValueError):
        drain(evolve(_toy, [1.0], generations=1, population=1))


def test_one_dimension_and_no_bounds_work():
    best_x, *_ = drain(evolve(lambda x: -float((x[0] - 0.7) ** 2), [1.0], sigma0=0.3,
                                      generations=30, population=6, seed=2))
    assert abs(best_x[0] - 0.7) < 0.02
    best_x, *_ = drain(evolve(lambda x: -float((x[0] + 3.0) ** 2), [1.0], sigma0=1.0,
                              generations=40, population=6, bounds=None, seed=2))
    assert abs(best_x[0] + 3.0) < 0.05


def test_the_search_does_not_use_or_disturb_numpys_global_generator():
    np.random.seed(0)
    a = drain(evolve(lambda x: _toy(x) + 0 * np.random.rand(), [1, 1, 1], generations=4, population=6, seed=5))
    np.random.seed(123)
    b = drain(evolve(lambda x: _toy(x) + 0 * np.random.rand(), [1, 1, 1], generations=4, population=6, seed=5))
    np.testing.assert_array_equal(a[0], b[0])
    np.random.seed(7)
    want = np.random.rand()
    np.random.seed(7)
    drain(evolve(_toy, [1, 1, 1], generations=2, population=4, seed=0))
    assert np.random.rand() == want


# ------------------------------------------------------------------ merges (demo world)
pytestmark = pytest.mark.usefixtures("one_torch_thread")


kit = pytest.importorskip("pivotmerge_gui.demo.kit")




@pytest.mark.parametrize("method", ["task_arithmetic", "ties"])
def test_affine_fast_path_equals_a_pipeline_merge(demo_world, method):
    experts = list(kit.load_experts("shared").values())
    base = kit.load_projector_file(kit.base_path("shared"))
    obj = MergeObjective(experts, method, backend=demo_world.backend, base=base)
    assert obj.affine and obj.mode == "affine"
    x = np.array([0.6, 1.4])
    want = merge_projectors(experts, method, base=base, layer_coefficients={"0": 0.6, "2": 1.4}).projector
    got = obj.projector(x)
    for k, v in want.state().items():
        torch.testing.assert_close(got.state()[k], v, rtol=1e-5, atol=1e-6)


def test_autotune_on_demo_improves_validation_and_reports_holdout(demo_world):
    experts = kit.load_experts("shared")
    base = kit.load_projector_file(kit.base_path("shared"))
    val, test = demo_world.caption_sets("val", 6), demo_world.caption_sets("test", 6)
    events = []
    gen = autotune(list(experts.values()), "task_arithmetic", backend=demo_world.backend, val_sets=val,
                   test_sets=test, base=base, names=list(experts), generations=2, population=4, seed=0)
    while True:
        try:
            events.append(next(gen))
        except StopIteration as stop:
            res = stop.value
            break
    assert events[-1].stage == "done" and events[-1].payload is res
    assert [e.payload.generation for e in events if e.stage == "generation"] == [1, 2]
    assert res.best_fitness >= res.initial_fitness and res.evaluations == 1 + 2 * 4
    assert res.initial.layer_coefficients == {"0": 1.0, "2": 1.0}
    assert res.holdout_fitness is not None and res.holdout_initial_fitness is not None
    assert isinstance(res.generalises, bool)
    # the reported fitness is what the pipeline's merge of the best setting scores
    obj = MergeObjective(list(experts.values()), "task_arithmetic", backend=demo_world.backend, base=base)
    merged = merge_projectors(list(experts.values()), "task_arithmetic", base=base,
                              layer_coefficients=res.best.layer_coefficients).projector
    assert obj.score_projector(merged, val) == pytest.approx(res.best_fitness, abs=1e-4)
    assert res.best.recipe_update()["layer_coefficients"] == res.best.layer_coefficients


def test_every_method_scale_is_linear_so_layer_coefficients_subsume_it():
    """Why auto-tune searches only the per-layer coefficients: every registered method's
    ``is_scale`` parameter multiplies the same update (merged - reference) that the
    coefficients multiply, so scaling it is one more coefficient vector."""
    from pivotmerge_gui.core.methods import list_methods
    from pivotmerge_gui.core.methods.base import Calibration
    from tests.factories import make_mlp_projector

    base = make_mlp_projector(6, 10, 8, seed=100)
    experts = []
    for k in range(3):
        d = make_mlp_projector(6, 10, 8, seed=k).state()
        experts.append(base.with_state({n: base.state()[n] + 0.3 * d[n] for n in d}))
    g = torch.Generator().manual_seed(0)
    cal = Calibration([torch.randn(64, 6, generator=g) for _ in range(3)], ["a", "b", "c"])
    checked = 0
    for m in list_methods():
        scale = [p for p in m.params if p.is_scale]
        if not scale:
            continue
        p = scale[0]
        kw = {"base": base if (m.needs_base or m.uses_base) else None,
              "calibration": cal if (m.needs_calibration or m.uses_calibration) else None}
        ref = merge_projectors(experts, m.name, layer_coefficients={"0": 0.0, "2": 0.0}, **kw).projector.state()
        a = merge_projectors(experts, m.name, {p.name: p.default}, **kw).projector.state()
        b = merge_projectors(experts, m.name, {p.name: 0.5 * p.default}, **kw).projector.state()
        for k in a:
            torch.testing.assert_close(b[k] - ref[k], 0.5 * (a[k] - ref[k]), rtol=1e-4, atol=1e-5,
                                       msg=lambda s, n=m.name, k=k: f"{n} {k}: {s}")
        checked += 1
    assert checked >= 10
