"""``pivotmerge sweep`` end to end on the demo: table, JSON, the saved best, one-line errors."""

from __future__ import annotations

import json

import pytest
import yaml

from pivotmerge_gui.cli.main import main
from pivotmerge_gui.core.io import load_projector
from pivotmerge_gui.core.recipe import Recipe

kit = pytest.importorskip("pivotmerge_gui.demo.kit")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _write(tmp_path, **doc):
    recipe = {"merge_method": "task_arithmetic", "base_model": str(kit.base_path("shared")),
              "models": [{"model": str(p), "name": d} for d, p in kit.experts("shared").items()]}
    Recipe.from_dict(recipe).save(tmp_path / "recipe.yml")
    doc = {"recipe": "recipe.yml", "score": {"backend": "demo", "pairs": "demo:val:1", "metric": "token_accuracy"},
           **doc}
    path = tmp_path / "sweep.yml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_sweep_prints_the_table_and_saves_the_best(tmp_path, capsys, demo_world):
    path = _write(tmp_path, x={"param": "scaling", "values": [0.3, 1.5]},
                  y={"param": "layer_coefficients.0", "values": [0.5, 1.0]})
    assert main(["sweep", str(path), "--out", str(tmp_path / "best"), "--quiet"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "token_accuracy (higher is better), x = scaling, y = layer_coefficients.0"
    assert out[1].split() == ["layer_coefficients.0", "0.3", "1.5"]
    assert out[2].split()[0] == "0.5" and out[3].split()[0] == "1.0"
    assert sum(line.count("*") for line in out[2:4]) == 1
    best_line = next(line for line in out if line.startswith("best: "))
    data = json.loads((tmp_path / "best" / "sweep.json").read_text())
    best = data["best"]
    assert best_line.startswith(f"best: scaling={best['values']['scaling']:g}")
    assert data["grid"][best["row"]][best["col"]] == best["score"] == max(max(r) for r in data["grid"])
    saved = Recipe.load(tmp_path / "best" / "recipe.yml")
    assert saved.parameters["scaling"] == best["values"]["scaling"]
    assert saved.layer_coefficients == {"0": float(best["values"]["layer_coefficients.0"])}
    assert load_projector(str(tmp_path / "best")).layer_names == ["0", "2"]
    # an existing output folder is refused before any work, in one line
    assert main(["sweep", str(path), "--out", str(tmp_path / "best"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "exists and is not an empty folder" in err[0]


def test_sweep_json(tmp_path, capsys, demo_world):
    path = _write(tmp_path, x={"param": "method", "values": ["task_arithmetic", "linear"]})
    assert main(["sweep", str(path), "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert [c["values"]["method"] for c in d["cells"]] == ["task_arithmetic", "linear"]
    assert d["metric"] == "token_accuracy" and d["higher_is_better"] and d["saved"] == []
    assert all(isinstance(v, float) for v in d["grid"][0])


@pytest.mark.parametrize(("doc", "message"), [
    ({"x": {"param": "scaling", "values": [7.0]}}, "parameter 'scaling': 7.0 is above the maximum 5.0"),
    ({"x": {"param": "scaling", "values": list(range(21))}, "y": {"param": "layer_coefficients.0",
                                                                   "values": list(range(20))}}, "420 cells"),
    ({"x": {"param": "scaling", "values": [1]}, "score": {"pairs": "demo:train:2"}}, "is not demo:SPLIT:N"),
    ({"x": {"param": "scaling", "values": [1]}, "score": {"backend": "gpt"}}, "unknown back end 'gpt'"),
])
def test_bad_sweeps_exit_2_with_one_line(tmp_path, capsys, doc, message):
    path = _write(tmp_path, **doc)
    assert main(["sweep", str(path), "--quiet"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pivotmerge: error: ") and message in err[0], err
