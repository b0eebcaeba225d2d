"""The calibration file (core/calibration/store.py), the recipe's calibration reference and
merges with a domain that has no calibration data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.calibration import Calibration, load_calibration, store
from pivotmerge_gui.core.calibration.features import pooled_features
from pivotmerge_gui.core.errors import CheckpointError, OutputError, RecipeError
from pivotmerge_gui.core.recipe import Recipe
from tests.factories import make_mlp_projector


def _feats(n: int = 3, width: int = 16, rows: int = 12) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {f"dom{k}": torch.randn(rows + k, width, generator=g) for k in range(n)}


def _experts(root: Path, n: int = 3) -> list[str]:
    paths = []
    for k in range(n):
        p = root / f"dom{k}" / "mm_projector.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        torch.save(make_mlp_projector(seed=k).original_state_dict(), p)
        paths.append(str(p))
    return paths


def test_write_read_round_trip_keeps_domains_order_and_provenance(tmp_path):
    feats = _feats()
    prov = store.default_provenance(encoder={"spec": "org/enc", "sha256": "ab" * 32, "kind": "clip"},
                                    images={"dom0": [{"path": "a.png", "sha256": "cd" * 32}]},
                                    sampling={"tokens_per_image": 4, "seed": 1})
    sha = store.write(tmp_path / "c.safetensors", dict(reversed(feats.items())), prov)
    f = store.read(tmp_path / "c.safetensors", expect_sha256=sha, in_features=16)
    assert f.domains == ["dom2", "dom1", "dom0"] and f.sha256 == sha and not f.positional
    assert all(torch.equal(f.tensors[d], feats[d]) for d in feats)
    assert f.provenance["encoder"]["spec"] == "org/enc" and f.provenance["version"] == 1
    assert f.provenance["images"]["dom0"][0]["path"] == "a.png" and f.provenance["tool"].startswith("pivotmerge-gui")
    with pytest.raises(OutputError, match="already exists"):
        store.write(tmp_path / "c.safetensors", feats, prov)  # never overwritten unless asked


@pytest.mark.parametrize("tensors, match", [
    ({"a": torch.randn(3, 4), "b": torch.randn(3, 5)}, "width 5"),
    ({"a": torch.randn(3, 4, 2)}, "expected a float"),
    ({"a": torch.zeros(3, 4, dtype=torch.int64)}, "expected a float"),
    ({"a": torch.full((2, 4), float("nan"))}, "NaN"),
    ({"a": torch.zeros(0, 4)}, "no tokens"),
    ({"": torch.zeros(2, 4)}, "non-empty"),
    ({"bad\nname": torch.zeros(2, 4)}, "control"),
])
def test_bad_files_are_refused_with_the_file_named(tmp_path, tensors, match):
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path), metadata={store.META_KEY: json.dumps({"version": 1})})
    with pytest.raises(CheckpointError, match=match) as err:
        store.read(path)
    assert str(path) in str(err.value)


def test_hash_mismatch_and_newer_versions_are_refused(tmp_path):
    path = tmp_path / "c.safetensors"
    store.write(path, _feats(), {})
    with pytest.raises(CheckpointError, match="sha256"):
        store.read(path, expect_sha256="0" * 64)
    save_file(_feats(), str(path), metadata={store.META_KEY: json.dumps({"version": 99})})
    with pytest.raises(CheckpointError, match="newer"):
        store.read(path)


def test_old_positional_files_still_map_by_position(tmp_path):
    path = tmp_path / "old.safetensors"
    t = _feats(2)
    save_file({"expert_0": t["dom0"], "expert_1": t["dom1"]}, str(path), metadata={"domains": '["x", "y"]'})
    cal = load_calibration(path, ["e0", "e1"], 16)
    assert torch.equal(cal.features[1], t["dom1"]) and cal.source["domains"] == {"e0": "expert_0", "e1": "expert_1"}
    with pytest.raises(RecipeError, match="2 feature sets"):
        load_calibration(path, ["e0", "e1", "e2"], 16)


def test_domains_map_to_experts_by_name_not_position(tmp_path):
    path = tmp_path / "c.safetensors"
    feats = _feats()
    store.write(path, feats, {})
    cal = load_calibration(path, ["dom2", "dom0", "dom1"], 16)
    assert [torch.equal(a, feats[d]) for a, d in zip(cal.features, ["dom2", "dom0", "dom1"])] == [True] * 3
    cal = load_calibration(path, ["ocr", "web"], 16, {"ocr": "dom1", "web": None})
    assert cal.missing == [1] and torch.equal(cal.features[0], feats["dom1"])
    for mapping, match in (({"ocr": "nope", "web": None}, "does not hold"),
                           ({"ocr": "dom1"}, "no entry for expert 'web'"),
                           ({"ocr": "dom1", "web": None, "zzz": "dom0"}, "not an expert"),
                           ({"ocr": None, "web": None}, "every expert to null")):
        with pytest.raises(RecipeError, match=match):
            load_calibration(path, ["ocr", "web"], 16, mapping)
    with pytest.raises(RecipeError, match="no domain named 'ocr'"):
        load_calibration(path, ["ocr", "dom0"], 16)


def test_recipe_reference_forms_and_round_trip():
    r = Recipe.from_dict({"merge_method": "regmean", "models": [{"model": "a"}], "calibration": "c.safetensors"})
    assert r.calibration.file == "c.safetensors" and r.calibration.sha256 is None
    r2 = Recipe.from_yaml(r.to_yaml())
    assert r2.calibration == r.calibration and "sha256" not in r.to_yaml()
    with pytest.raises(RecipeError, match="sha256"):
        Recipe.from_dict({"merge_method": "x", "models": [{"model": "a"}],
                          "calibration": {"file": "c", "sha256": "not-a-hash"}})


def test_plan_refuses_a_changed_file_or_missing_domain_before_any_work(tmp_path):
    paths = _experts(tmp_path)
    path = tmp_path / "c.safetensors"
    store.write(path, _feats(), {})
    ok = Recipe.from_dict({"merge_method": "regmean", "models": [{"model": p} for p in paths],
                           "calibration": {"file": str(path), "domains": {"dom0": "dom0", "dom1": "dom1", "dom2": None}}})
    plan = pipeline.plan(ok)
    assert plan.calibration.missing == [2] and any("no calibration data for dom2" in w for w in plan.warnings)
    bad = ok.model_copy(update={"calibration": ok.calibration.model_copy(update={"sha256": "1" * 64})})
    with pytest.raises(CheckpointError, match="sha256"):
        pipeline.plan(bad)
    rc = cli_main(["merge", str(_write(tmp_path / "r.yml", bad)), str(tmp_path / "out")])
    assert rc == 2 and not (tmp_path / "out").exists()


def _write(path: Path, recipe: Recipe) -> Path:
    path.write_text(recipe.to_yaml())
    return path


@pytest.mark.parametrize("method, params", [("regmean", {}),
                                            ("pivotmerge", {"alm": "data", "alm_uncovered_weight": 1.0})])
def test_an_uncovered_expert_is_fitted_on_the_pooled_stand_in(method, params):
    experts = [make_mlp_projector(seed=k) for k in range(3)]
    g = torch.Generator().manual_seed(1)
    feats = [torch.randn(30, 16, generator=g), None, torch.randn(24, 16, generator=g)]
    stand_in = pooled_features(feats)
    # evenly spaced rows of each covered domain, as many in all as one domain on average
    assert stand_in.shape == (26, 16)
    assert torch.equal(stand_in[:13], feats[0][torch.linspace(0, 29, 13).round().long()])
    missing = pipeline.merge_projectors(experts, method, params, calibration=Calibration(feats, ["a", "", "c"]))
    explicit = pipeline.merge_projectors(experts, method, params,
                                         calibration=Calibration([feats[0], stand_in, feats[2]], ["a", "", "c"]))
    for k, v in missing.projector.state().items():
        torch.testing.assert_close(v, explicit.projector.state()[k], rtol=0, atol=0)
    rep = missing.report
    assert rep["calibration"]["missing"] and rep["calibration"]["tokens"][rep["experts"][1]] == 0
    if method == "pivotmerge":
        assert rep["method_report"]["alm"]["uncovered"] == [rep["experts"][1]]
        # its weight in the refit is a setting of its own
        heavier = pipeline.merge_projectors(experts, method, {**params, "alm_uncovered_weight": 2.0},
                                            calibration=Calibration(feats, ["a", "", "c"]))
        assert not torch.equal(heavier.projector.state()["0.weight"], missing.projector.state()["0.weight"])
    else:
        assert rep["method_report"]["stand_in_domains"] == [rep["experts"][1]]


def _all_methods() -> list[str]:
    from pivotmerge_gui.core.methods import list_methods

    return [m.name for m in list_methods()]


@pytest.mark.parametrize("method", _all_methods())
def test_a_saved_merge_with_calibration_in_memory_reproduces_from_its_recipe(tmp_path, method):
    """What the app does: plan with in-memory features (one domain without), merge, save;
    then ``pivotmerge merge OUT/recipe.yml`` must give the same tensors."""
    from safetensors.torch import load_file

    paths = _experts(tmp_path)
    base = tmp_path / "base" / "mm_projector.bin"
    base.parent.mkdir()
    torch.save(make_mlp_projector(seed=9).original_state_dict(), base)
    g = torch.Generator().manual_seed(3)
    cal = Calibration([torch.randn(40, 16, generator=g), None, torch.randn(32, 16, generator=g)],
                      ["web", "", "charts"])
    params = {"alm": "data"} if method == "pivotmerge" else {}
    recipe = Recipe.from_dict({"merge_method": method, "base_model": str(base), "parameters": params,
                               "models": [{"model": p, "name": f"e{k}"} for k, p in enumerate(paths)],
                               "output_format": "safetensors", "random_seed": 5})
    res = pipeline.run(pipeline.plan(recipe, calibration=cal))
    out = tmp_path / "out"
    written = pipeline.save_result(res, out)
    assert out / pipeline.CALIBRATION_FILE in written
    saved = Recipe.load(out / "recipe.yml")
    assert saved.calibration.file == pipeline.CALIBRATION_FILE and len(saved.calibration.sha256) == 64
    assert saved.calibration.domains == {"e0": "web", "e1": None, "e2": "charts"}
    assert "## Calibration" in (out / "README.md").read_text()
    assert cli_main(["merge", str(out / "recipe.yml"), str(tmp_path / "again"), "--quiet"]) == 0
    proj = written[0].name
    assert proj != pipeline.CALIBRATION_FILE
    a = load_file(str(out / proj))
    b = load_file(str(tmp_path / "again" / proj))
    assert a.keys() == b.keys() and len(a) >= 4
    for k in a:
        assert torch.equal(a[k], b[k]), (method, k)
