"""The merge-quality benchmark runs end to end (on a tiny world, a few methods, a few
images) and its JSON holds every row with per-seed, per-domain numbers and the value its
validation search chose."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch

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
    rc = bench.main(["--artifacts", str(world), "--seeds", "1", "--methods", "linear,task_arithmetic,regmean",
                     "--regimes", "full,missing", "--val-n", "2", "--test-n", "3", "--json", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "## Scenario: shared init" in printed and "## Scenario: different init" in printed
    assert "calibration `missing`" in printed and "PivotMerge" not in printed.split("\n")[0]
    doc = json.loads(out.read_text())
    shared = doc["scenarios"]["shared"]
    assert set(shared) == {"reference", "data-free", "full", "missing"}
    ref = {r["label"] for r in shared["reference"]}
    assert {"expert: text", "joint (all domains, upper bound)", "base (shared init, untrained)"} <= ref
    free = {r["label"]: r for r in shared["data-free"]}
    assert set(free) == {"linear", "task_arithmetic"}
    ta = free["task_arithmetic"]["per_seed"][0]
    # 7 scale values tried on validation, the chosen one among them
    assert len(ta["val_scores"]) == 7 and str(ta["chosen"]) in ta["val_scores"]
    assert ta["chosen"] in {0.075, 0.15, 0.225, 0.3, 0.45, 0.6, 0.9}
    assert "chosen" not in free["linear"]["per_seed"][0]  # nothing to search
    rm = {r["label"]: r for r in shared["missing"]}["regmean"]["per_seed"][0]
    assert len(rm["val_scores"]) == 7
    # no shared init in the different-init scenario: task vectors from the experts' mean
    assert "task_arithmetic [ref=mean]" in {r["label"] for r in doc["scenarios"]["different"]["data-free"]}
    for tables in doc["scenarios"].values():
        for rows in tables.values():
            for r in rows:
                test = r["per_seed"][0]["test"]
                assert set(test["per_domain"]) == {"shapes", "text", "count", "texture"}, r["label"]
                assert 0.0 <= test["mean"]["token_accuracy"] <= 1.0
                assert test["per_domain"]["text"]["n"] == 3
    assert bench.main(["--from-json", str(out)]) == 0
    assert "### Data-free methods" in capsys.readouterr().out


def test_benchmark_many_experts_shards_each_domains_calibration(tmp_path, capsys):
    world = tmp_path / "world"
    build.build(world, tiny=True)
    bench = _load_bench()
    from pivotmerge_gui.demo import kit

    w = kit.load_world(world)
    experts_of = {d: [f"{d}-1", f"{d}-2"] for d in w.domains}
    one = bench.make_calibration(w, "missing", 0)
    two = bench.make_calibration(w, "missing", 0, experts_of)
    assert two.domains == [d for d in w.domains for _ in (1, 2)]
    assert two.features[0] is None and two.features[1] is None  # seed 0: domain 0 has no data
    for k in range(1, len(w.domains)):  # the two shards are the one-expert draw, split
        assert torch.equal(torch.cat([two.features[2 * k], two.features[2 * k + 1]]), one.features[k])

    out = tmp_path / "many.json"
    rc = bench.main(["--artifacts", str(world), "--seeds", "1", "--methods", "task_arithmetic,regmean,pivotmerge",
                     "--scenarios", "shared", "--regimes", "missing", "--experts-per-domain", "2",
                     "--no-retrieval", "--ablation-regimes", "data-free",
                     "--val-n", "2", "--test-n", "2", "--json", str(out)])
    assert rc == 0
    assert "2 experts per domain" in capsys.readouterr().out.split("\n")[0]
    doc = json.loads(out.read_text())
    assert doc["experts_per_domain"] == 2 and doc["domains"] == list(w.domains)
    shared = doc["scenarios"]["shared"]
    experts = [r["label"] for r in shared["reference"] if r["kind"] == "expert"]
    assert experts == [f"expert: {d}-{j}" for d in w.domains for j in (1, 2)]
    rm = {r["label"]: r for r in shared["missing"]}["regmean"]["per_seed"][0]
    assert set(rm["test"]["per_domain"]) == set(w.domains) and len(rm["val_scores"]) == 7
    # --ablation-regimes data-free: stage ablations there, none with calibration
    assert any(r["label"].startswith("pivotmerge (data-free): ") for r in shared["data-free"])
    missing = [r["label"] for r in shared["missing"]]
    assert "pivotmerge (data)" in missing and not any(lab.startswith("pivotmerge (data): ") for lab in missing)
    # --no-retrieval: test scores without retrieval accuracy, NLL still there
    assert rm["test"]["mean"]["retrieval_accuracy"] is None and rm["test"]["mean"]["nll"] is not None
