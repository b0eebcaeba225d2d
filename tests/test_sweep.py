"""Parameter sweeps (core): the grid, validation against the methods' ranges, bounds, the
best cell, cells that fail, cancel, and the memory policy; scored on the demo world."""

from __future__ import annotations

import math

import pytest

from pivotmerge_gui.core.errors import Cancelled, ParameterError, UnknownMethodError
from pivotmerge_gui.core.progress import CancelToken, drain
from pivotmerge_gui.core.sweep import (
    MAX_CELLS,
    SweepCell,
    SweepError,
    SweepSpec,
    apply_overrides,
    best_cell,
    run_sweep,
)

kit = pytest.importorskip("pivotmerge_gui.demo.kit")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _recipe(method: str = "task_arithmetic", base: bool = True) -> dict:
    r = {"merge_method": method, "models": [{"model": str(p), "name": d} for d, p in kit.experts("shared").items()]}
    if base:
        r["base_model"] = str(kit.base_path("shared"))
    return r


def _spec(**doc) -> SweepSpec:
    return SweepSpec.from_dict({"recipe": _recipe(), **doc})


def test_grid_cells_and_overrides():
    spec = _spec(x={"param": "scaling", "values": [0.5, 1.0, 2.0]},
                 y={"param": "layer_coefficients.0", "values": [0.5, 1]})
    assert spec.shape == (2, 3)
    cells = spec.cells()
    assert [(r, c) for r, c, _ in cells] == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    assert cells[4][2] == {"scaling": 1.0, "layer_coefficients.0": 1}
    rec = spec.cell_recipe(cells[5][2])
    assert rec.parameters == {"scaling": 2.0} and rec.layer_coefficients == {"0": 1.0}
    assert SweepCell(1, 2, cells[5][2], rec).label == "scaling=2, layer 0=1"


def test_method_axis_drops_parameters_the_other_method_lacks():
    rec = SweepSpec.from_dict({"recipe": _recipe(), "x": {"param": "method", "values": ["ties", "linear"]}}).recipe
    rec = rec.model_copy(update={"parameters": {"scaling": 0.4}})
    assert apply_overrides(rec, {"method": "ties"}).parameters == {"scaling": 0.4}
    assert apply_overrides(rec, {"method": "linear"}).parameters == {}


@pytest.mark.parametrize(("doc", "error", "match"), [
    ({"x": {"param": "scaling", "values": [0.5, 9.0]}}, ParameterError, "9.0 is above the maximum 5.0"),
    ({"x": {"param": "scaling", "values": ["big"]}}, ParameterError, "expected a number"),
    ({"x": {"param": "density", "values": [0.5]}}, SweepError, "has no parameter 'density'"),
    ({"x": {"param": "method", "values": ["nope"]}}, UnknownMethodError, "unknown merge method 'nope'"),
    ({"x": {"param": "layer_coefficients.0", "values": [1e9]}}, SweepError, "within"),
    ({"x": {"param": "scaling", "values": []}}, SweepError, "non-empty list"),
    ({"x": {"param": "scaling", "values": [1, 1]}}, SweepError, "twice"),
    ({"x": {"param": "scaling"}}, SweepError, r"\{param: NAME, values"),
    ({"x": {"param": "scaling", "values": [1]}, "y": {"param": "scaling", "values": [2]}}, SweepError, "both vary"),
    ({"x": {"param": "scaling", "values": [1]}, "score": {"metric": "bleu"}}, SweepError, "unknown metric 'bleu'"),
    ({"x": {"param": "scaling", "values": [1]}, "colour": 1}, SweepError, "unknown key 'colour'"),
])
def test_bad_documents_raise_typed_errors(doc, error, match):
    with pytest.raises(error, match=match):
        _spec(**doc)


def test_grids_are_bounded():
    n = math.isqrt(MAX_CELLS) + 1
    with pytest.raises(SweepError, match=f"{n * n} cells .* more than the {MAX_CELLS}"):
        _spec(x={"param": "scaling", "values": [round(0.01 * k, 2) for k in range(n)]},
              y={"param": "layer_coefficients.0", "values": [round(0.01 * k, 2) for k in range(n)]})


def test_yaml_document_with_a_relative_recipe(tmp_path):
    from pivotmerge_gui.core.recipe import Recipe

    Recipe.from_dict(_recipe()).save(tmp_path / "r.yml")
    (tmp_path / "s.yml").write_text("recipe: r.yml\nx: {param: scaling, values: [0.5, 1]}\n"
                                    "score: {backend: demo, pairs: 'demo:val:2', metric: nll}\n")
    spec = SweepSpec.load(tmp_path / "s.yml")
    assert spec.x.values == (0.5, 1) and spec.score.metric == "nll" and not spec.score.higher_is_better
    assert spec.base_dir == tmp_path.resolve()
    (tmp_path / "bad.yml").write_text("recipe: [1\n")
    with pytest.raises(SweepError, match="bad.yml: not valid YAML"):
        SweepSpec.load(tmp_path / "bad.yml")


def test_best_cell_respects_the_direction():
    cells = [SweepCell(0, i, {}, None, score=s) for i, s in enumerate([0.2, None, 0.7, float("nan"), 0.1])]
    assert best_cell(cells, True).col == 2 and best_cell(cells, False).col == 4
    assert best_cell(cells[1:2]) is None


def test_run_scores_every_cell_and_the_best_matches_a_direct_evaluation(demo_world):
    from pivotmerge_gui.core.evaluation import evaluate
    from pivotmerge_gui.core.pipeline import merge_projectors

    spec = _spec(x={"param": "scaling", "values": [0.3, 1.5]}, y={"param": "method", "values": ["task_arithmetic", "ties"]})
    sets = demo_world.caption_sets("val", 2)
    events = []
    result = drain(run_sweep(spec, backend=demo_world.backend, sets=sets), events.append)
    cells = [e.payload for e in events if e.stage == "cell"]
    assert len(cells) == 4 and [e.fraction for e in events if e.stage == "cell"] == [0.25, 0.5, 0.75, 1.0]
    assert result.kept == "all" and all(c.result is not None and c.error is None for c in result.cells)
    grid = result.grid()
    assert len(grid) == 2 and len(grid[0]) == 2 and all(0.0 <= v <= 1.0 for row in grid for v in row)
    best = result.best()
    assert best.score == max(v for row in grid for v in row)
    # the best cell's score is what a plain merge of its recipe scores
    experts = kit.load_experts("shared")
    merged = merge_projectors(list(experts.values()), best.recipe.merge_method, best.recipe.parameters,
                              base=kit.load_projector_file(kit.base_path("shared")), names=list(experts))
    direct = evaluate(demo_world.backend, merged.projector, sets, parts=("generate",)).score("token_accuracy")
    assert best.score == pytest.approx(direct)
    d = result.to_dict()
    assert d["best"]["values"] == best.overrides and d["best"]["recipe"]["merge_method"] == best.recipe.merge_method


def test_failed_cells_are_recorded_and_only_the_best_is_kept_when_memory_is_short(demo_world):
    spec = SweepSpec.from_dict({"recipe": _recipe("linear", base=False),
                                "x": {"param": "method", "values": ["linear", "task_arithmetic"]}})
    result = drain(run_sweep(spec, backend=demo_world.backend, sets=demo_world.caption_sets("val", 2), keep_bytes=0))
    ok, failed = result.cells
    assert ok.score is not None and failed.score is None and "needs the shared init" in failed.error
    assert result.kept == "best" and ok.result is not None and result.best() is ok


def test_cancel_between_cells_raises_and_reported_cells_stay(demo_world):
    spec = _spec(x={"param": "scaling", "values": [0.2, 0.4, 0.6]})
    token = CancelToken()
    seen = []

    def on(ev):
        if ev.stage == "cell":
            seen.append(ev.payload)
            token.cancel()

    with pytest.raises(Cancelled):
        drain(run_sweep(spec, backend=demo_world.backend, sets=demo_world.caption_sets("val", 1), cancel=token), on)
    assert len(seen) == 1 and seen[0].score is not None
