"""The plan/execute pipeline and the CLI, end to end in temp dirs."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
import yaml

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.errors import (
    Cancelled,
    IncompatibleExperts,
    MethodError,
    NeedsBaseError,
    OutputError,
    ParameterError,
    RecipeError,
    UnknownMethodError,
)
from pivotmerge_gui.core.progress import CancelToken
from pivotmerge_gui.core.recipe import Recipe
from tests.factories import make_mlp_projector


def _save(p, path: Path, dtype=torch.float32) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.to(dtype) for k, v in p.original_state_dict().items()}, path)
    return str(path)


@pytest.fixture
def world(tmp_path):
    base = make_mlp_projector(seed=100)
    experts = []
    for k in range(3):
        upd = make_mlp_projector(seed=k)
        experts.append(base.with_state({n: base.state()[n] + 0.3 * upd.state()[n] for n in base.state()}))
    paths = [_save(e, tmp_path / f"dom{k}" / "mm_projector.bin") for k, e in enumerate(experts)]
    base_path = _save(base, tmp_path / "init" / "mm_projector.bin")
    return tmp_path, base, experts, paths, base_path


def _recipe(paths, method="linear", **extra) -> Recipe:
    return Recipe.from_dict({"merge_method": method, "models": [{"model": p} for p in paths], **extra})


def test_linear_merge_end_to_end_writes_three_files(world):
    tmp, base, experts, paths, _ = world
    plan = pipeline.plan(_recipe(paths))
    events = list(pipeline.execute(plan))
    assert events[-1].stage == "done" and events[-1].fraction == 1.0
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions)
    result = events[-1].payload
    expected = torch.stack([e.layer("0").weight for e in experts]).mean(0)
    torch.testing.assert_close(result.projector.layer("0").weight, expected)
    out = pipeline.save_result(result, tmp / "out")
    assert [p.name for p in out] == ["mm_projector.bin", "recipe.yml", "README.md"]
    sd = torch.load(out[0], weights_only=True)
    assert sorted(sd) == sorted(experts[0].original_state_dict())
    assert all(v.dtype == torch.float32 for v in sd.values())
    card = out[2].read_text()
    assert card.startswith("---\n") and "merge_method: linear" in card
    assert result.input_hashes and all(len(h) == 64 for h in result.input_hashes.values())


def test_saved_recipe_runs_again_with_same_result(world):
    tmp, *_rest, paths, base_path = world
    r = _recipe(paths, "task_arithmetic", base_model=base_path, parameters={"scaling_coef": 0.5}) \
        if "scaling_coef" in [p.name for p in pipeline.get_method("task_arithmetic").params] else \
        _recipe(paths, "task_arithmetic", base_model=base_path)
    res1 = pipeline.run(pipeline.plan(r))
    out = pipeline.save_result(res1, tmp / "o1")
    again = Recipe.load(out[1])
    res2 = pipeline.run(pipeline.plan(again))
    for k, v in res1.projector.state().items():
        torch.testing.assert_close(res2.projector.state()[k], v)


def test_output_dtype_defaults_to_experts_and_can_be_set(world):
    tmp, base, experts, _, _ = world
    paths = [_save(e, tmp / f"bf{k}" / "mm_projector.bin", torch.bfloat16) for k, e in enumerate(experts)]
    res = pipeline.run(pipeline.plan(_recipe(paths)))
    assert res.projector.dtype == torch.bfloat16
    assert res.report["compute_dtype"] == "float32"
    res = pipeline.run(pipeline.plan(_recipe(paths, out_dtype="float32")))
    assert res.projector.dtype == torch.float32


def test_plan_errors_are_typed_and_early(world):
    tmp, base, experts, paths, base_path = world
    with pytest.raises(UnknownMethodError):
        pipeline.plan(_recipe(paths, "no_such_method"))
    with pytest.raises(ParameterError, match="unknown parameter"):
        pipeline.plan(_recipe(paths, "linear", parameters={"bogus": 1}))
    with pytest.raises(NeedsBaseError, match="base"):
        pipeline.plan(_recipe(paths, "ties"))
    other = _save(make_mlp_projector(d_hidden=40), tmp / "wide" / "mm_projector.bin")
    with pytest.raises(IncompatibleExperts, match=r"\[40, 16\]"):
        pipeline.plan(_recipe([*paths, other]))
    with pytest.raises(RecipeError, match="unknown layer 'nope'"):
        pipeline.plan(_recipe(paths, layer_coefficients={"nope": 1.0}))
    nan = experts[0].with_state({k: v.clone() for k, v in experts[0].state().items()})
    nan.layer("2").weight[0, 0] = float("nan")
    nan_path = _save(nan, tmp / "nan" / "mm_projector.bin")
    with pytest.raises(MethodError, match="NaN"):
        pipeline.plan(_recipe([paths[0], nan_path]))


def test_layer_coefficients_scale_the_update(world):
    tmp, base, experts, paths, base_path = world
    r = _recipe(paths, "linear", base_model=base_path, layer_coefficients={"2": 0.0})
    res = pipeline.run(pipeline.plan(r))
    torch.testing.assert_close(res.projector.layer("2").weight, base.layer("2").weight)
    assert res.report["layer_coefficients_applied"] == {"2": 0.0}


def test_cancel_raises_cancelled(world):
    *_r, paths, _ = world
    token = CancelToken()
    gen = pipeline.execute(pipeline.plan(_recipe(paths)), token)
    next(gen)
    token.cancel()
    with pytest.raises(Cancelled):
        for _ in gen:
            pass


def test_interrupted_cli_merge_writes_nothing(world, monkeypatch, capsys):
    """The CLI writes OUT_DIR after the merge: an interrupt during the merge leaves no
    folder behind, while the same command without the interrupt does write it."""
    tmp, *_r, paths, _ = world
    recipe = _recipe(paths).save(tmp / "recipe.yml")
    out = tmp / "out"
    real_execute = pipeline.execute

    def interrupted(*a, **k):
        gen = real_execute(*a, **k)
        yield next(gen)
        gen.close()
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "execute", interrupted)
    assert cli_main(["merge", str(recipe), str(out), "-q"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert not out.exists()
    monkeypatch.setattr(pipeline, "execute", real_execute)
    assert cli_main(["merge", str(recipe), str(out), "-q"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "mm_projector.bin", "recipe.yml"]


def test_cli_out_dtype_accepts_every_recipe_dtype(world, capsys):
    tmp, *_r, paths, _ = world
    recipe = _recipe(paths).save(tmp / "recipe.yml")
    assert cli_main(["merge", str(recipe), str(tmp / "f64"), "--out-dtype", "float64", "-q"]) == 0
    sd = torch.load(tmp / "f64" / "mm_projector.bin", weights_only=True)
    assert {v.dtype for v in sd.values()} == {torch.float64}
    assert Recipe.load(tmp / "f64" / "recipe.yml").out_dtype == "float64"


def test_never_overwrites_inputs_and_asks_before_replacing_outputs(world):
    tmp, *_r, paths, _ = world
    res = pipeline.run(pipeline.plan(_recipe(paths)))
    before = Path(paths[0]).read_bytes()
    with pytest.raises(OutputError):
        pipeline.save_result(res, Path(paths[0]).parent, overwrite=True)
    assert Path(paths[0]).read_bytes() == before
    pipeline.save_result(res, tmp / "out")
    with pytest.raises(OutputError):
        pipeline.save_result(res, tmp / "out")
    pipeline.save_result(res, tmp / "out", overwrite=True)


def test_cli_merge_inspect_methods_analyze(world, tmp_path, capsys):
    tmp, base, experts, paths, base_path = world
    recipe = tmp / "recipe.yml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "pivotmerge",
        "models": [{"model": os.path.relpath(p, tmp)} for p in paths],
    }))
    assert cli_main(["merge", str(recipe), str(tmp / "cli_out"), "--json", "-q"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["report"]["method"] == "pivotmerge"
    assert (tmp / "cli_out" / "mm_projector.bin").is_file()
    # the written recipe runs again from anywhere
    assert cli_main(["merge", str(tmp / "cli_out" / "recipe.yml"), str(tmp / "cli_out2"), "-q"]) == 0
    capsys.readouterr()
    # an existing output needs --overwrite: one clear line, exit 2, refused before merging
    from pivotmerge_gui.core import pipeline

    ran = []
    real_execute = pipeline.execute
    pipeline.execute = lambda *a, **k: ran.append(1) or real_execute(*a, **k)
    try:
        assert cli_main(["merge", str(recipe), str(tmp / "cli_out"), "-q"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("pivotmerge: error:") and "Traceback" not in err
        assert "mm_projector.bin: already exists" in err and ran == []
        # nor may an output folder be an input's folder (the input is never overwritten)
        assert cli_main(["merge", str(recipe), str(Path(paths[0]).parent), "-q", "--overwrite"]) == 2
        assert "refusing to overwrite the input" in capsys.readouterr().err and ran == []
        assert cli_main(["merge", str(recipe), str(tmp / "cli_out"), "--overwrite"]) == 0
        assert ran == [1]
        assert capsys.readouterr().out.startswith(f"merged {len(paths)} experts with PivotMerge")
    finally:
        pipeline.execute = real_execute
    assert cli_main(["inspect", paths[0], "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info[0]["family"].startswith("llava")
    assert cli_main(["methods", "--json"]) == 0
    names = {m["name"] for m in json.loads(capsys.readouterr().out)}
    assert {"pivotmerge", "linear", "ties", "regmean", "ssam"} <= names
    assert cli_main(["analyze", *paths, "--base", base_path]) == 0
    assert "0" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    bad = tmp_path / "broken.bin"
    bad.write_bytes(b"not a checkpoint")
    assert cli_main(["inspect", str(bad)]) == 2
    err = capsys.readouterr().err
    assert str(bad) in err and "Traceback" not in err and err.count("\n") == 1
    r = tmp_path / "r.yml"
    r.write_text("merge_method: linear\nmodels: [{model: a}]\nmodle: 1\n")
    assert cli_main(["merge", str(r), str(tmp_path / "o")]) == 2
    assert "unknown key 'modle'" in capsys.readouterr().err


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(world):
    _, _, _, paths, base_path = world
    for method in ("linear", "ties", "pivotmerge"):
        r = _recipe(paths, method, base_model=base_path)
        cpu = pipeline.run(pipeline.plan(r, device="cpu"))
        gpu = pipeline.run(pipeline.plan(r, device="cuda"))
        assert gpu.report["device"].startswith("cuda")
        for k, v in cpu.projector.state().items():
            torch.testing.assert_close(gpu.projector.state()[k], v, atol=1e-4, rtol=1e-4)


def test_memory_guard_refuses_with_numbers(world, monkeypatch):
    from pivotmerge_gui.core.errors import ResourceError

    _, _, _, paths, _ = world
    monkeypatch.setattr(pipeline, "available_memory", lambda dev: 1000)
    with pytest.raises(ResourceError) as e:
        pipeline.plan(_recipe(paths))
    assert "GiB" in str(e.value) and e.value.available == 1000 and e.value.needed > 1000
    p = pipeline.plan(_recipe(paths), allow_low_memory=True)
    assert p.estimated_peak_bytes > 0


def test_memory_estimate_covers_inputs_and_workspace():
    experts = [make_mlp_projector(d_in=64, d_hidden=256, d_out=256, seed=s) for s in range(4)]
    est = pipeline.estimate_peak_bytes(experts, None, torch.float32, pipeline.get_method("ties"))
    assert est >= (4 + 1) * experts[0].num_params * 4


def test_cuda_oom_becomes_typed_error_offering_cpu(world, monkeypatch):
    from pivotmerge_gui.core.errors import DeviceOutOfMemory
    from pivotmerge_gui.core.methods import get_method

    _, _, _, paths, _ = world
    plan = pipeline.plan(_recipe(paths))

    def boom(self, job):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        yield  # pragma: no cover

    monkeypatch.setattr(get_method("linear"), "merge", boom)
    with pytest.raises(DeviceOutOfMemory, match="--device cpu"):
        pipeline.run(plan)


def test_cli_cpu_fallback_after_oom(world, monkeypatch, capsys):
    from pivotmerge_gui.core.errors import DeviceOutOfMemory

    tmp, *_r, paths, _ = world
    recipe = tmp / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "linear", "models": [{"model": p} for p in paths]}))
    real_execute = pipeline.execute
    calls = []

    def flaky(plan, cancel=None, **kw):
        calls.append(str(plan.device))
        if len(calls) == 1:
            raise DeviceOutOfMemory("cuda:0")
        return (yield from real_execute(plan, cancel, **kw))

    monkeypatch.setattr(pipeline, "execute", flaky)
    assert cli_main(["merge", str(recipe), str(tmp / "a"), "-q"]) == 2
    assert "--device cpu" in capsys.readouterr().err
    calls.clear()
    assert cli_main(["merge", str(recipe), str(tmp / "b"), "-q", "--cpu-fallback"]) == 0
    assert calls == ["cpu", "cpu"] and (tmp / "b" / "mm_projector.bin").exists()
    assert "retrying on the CPU" in capsys.readouterr().err


def test_release_inputs_gives_the_same_result_and_frees_the_plan(world):
    _, _, _, paths, base_path = world
    r = _recipe(paths, "ties", base_model=base_path)
    kept = pipeline.run(pipeline.plan(r))
    plan = pipeline.plan(r)
    released = pipeline.run(plan, release_inputs=True)
    assert plan.experts == [] and plan.base is None
    assert released.input_hashes == kept.input_hashes and released.protected == kept.protected
    for k, v in kept.projector.state().items():
        torch.testing.assert_close(released.projector.state()[k], v)


def test_nonfinite_inputs_block_unless_allowed(world, capsys):
    tmp, base, experts, paths, _ = world
    nan = experts[0].with_state({k: v.clone() for k, v in experts[0].state().items()})
    nan.layer("0").bias[1] = float("inf")
    nan_path = _save(nan, tmp / "inf" / "mm_projector.bin")
    r = _recipe([paths[1], nan_path])
    with pytest.raises(MethodError, match="--allow-nonfinite"):
        pipeline.plan(r)
    p = pipeline.plan(r, allow_nonfinite=True)
    assert any("NaN/Inf" in w for w in p.warnings)
    res = pipeline.run(p)
    assert any("allowed by the user" in w for w in res.report["warnings"])
    recipe = tmp / "inf.yml"
    recipe.write_text(r.to_yaml())
    assert cli_main(["merge", str(recipe), str(tmp / "o_inf"), "-q"]) == 2
    assert cli_main(["merge", str(recipe), str(tmp / "o_inf"), "-q", "--allow-nonfinite"]) == 0


def test_mixed_precision_experts_merge_in_compute_dtype_and_keep_the_most_precise(world):
    tmp, base, experts, _, _ = world
    paths = [
        _save(experts[0], tmp / "m16" / "mm_projector.bin", torch.float16),
        _save(experts[1], tmp / "mbf" / "mm_projector.bin", torch.bfloat16),
        _save(experts[2], tmp / "m32" / "mm_projector.bin", torch.float32),
    ]
    p = pipeline.plan(_recipe(paths))
    assert any("mixed dtypes" in w and "float16" in w and "bfloat16" in w for w in p.warnings)
    res = pipeline.run(p)
    assert res.projector.dtype == torch.float32
    expected = torch.stack([
        experts[0].layer("0").weight.half().float(),
        experts[1].layer("0").weight.bfloat16().float(),
        experts[2].layer("0").weight,
    ]).mean(0)
    torch.testing.assert_close(res.projector.layer("0").weight, expected)
    two = pipeline.plan(_recipe(paths[:2]))  # fp16 + bf16: neither holds the other's values
    assert pipeline.run(two).projector.dtype == torch.float32
