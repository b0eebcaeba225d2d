"""The merge-quality benchmark runs end to end (on a tiny world, two methods, a few images)
and its JSON holds every row with per-seed, per-domain numbers."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from pivotmerge_gui.demo import build

BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "merge_quality.py"


def _load_bench():
    spec = importlib.util.spec_from_file_location("merge_quality", BENCH)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_benchmark_runs_on_a_tiny_world(tmp_path, capsys):
    world = tmp_path / "world"
    build.build(world, tiny=True)
    bench = _load_bench()
    out = tmp_path / "bench.json"
    rc = bench.main(["--artifacts", str(world), "--seeds", "1", "--methods", "linear,task_arithmetic",
                     "--val-n", "2", "--test-n", "3", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## Scenario: shared init" in printed and "## Scenario: different init" in printed
    doc = json.loads(out.read_text())
    shared = {r["label"]: r for r in doc["scenarios"]["shared"]}
    different = {r["label"]: r for r in doc["scenarios"]["different"]}
    assert {"expert: text", "joint (all domains, upper bound)", "linear (default)",
            "task_arithmetic (default)", "task_arithmetic (tuned scaling)"} <= set(shared)
    # no shared init in the different-init scenario: task vectors from the experts' mean
    assert "task_arithmetic [ref=mean] (default)" in different
    row = shared["task_arithmetic (tuned scaling)"]["per_seed"][0]
    assert row["params"]["scaling"] in {0.075, 0.15, 0.225, 0.3, 0.45, 0.6, 0.9}
    for label, r in shared.items():
        test = r["per_seed"][0]["test"]
        assert set(test["per_domain"]) == {"shapes", "text", "count", "texture"}, label
        assert 0.0 <= test["mean"]["token_accuracy"] <= 1.0
        assert test["per_domain"]["text"]["n"] == 3
