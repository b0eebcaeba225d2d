"""The finite check runs on what is written: a cast to a narrower output dtype that turns
finite values into Inf is a typed error before anything is written."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.errors import CastOverflow
from pivotmerge_gui.core.recipe import Recipe
from tests.factories import make_mlp_projector


def _experts(tmp_path, big: float | None = 1e5, nan: bool = False) -> list[str]:
    paths = []
    for k in range(2):
        sd = make_mlp_projector(seed=k).original_state_dict()
        if big is not None:
            sd["model.mm_projector.2.weight"][1, 3] = big
        if nan and k == 0:
            sd["model.mm_projector.0.bias"][0] = float("nan")
        p = tmp_path / f"dom{k}" / "mm_projector.bin"
        p.parent.mkdir(parents=True)
        torch.save(sd, p)
        paths.append(str(p))
    return paths


def _recipe(paths, **extra) -> Recipe:
    return Recipe.from_dict({"merge_method": "linear", "models": [{"model": p} for p in paths], **extra})


def test_float16_overflow_is_a_typed_error_naming_tensor_value_and_max(tmp_path):
    paths = _experts(tmp_path)
    with pytest.raises(CastOverflow) as info:
        pipeline.run(pipeline.plan(_recipe(paths, out_dtype="float16")))
    err = info.value
    assert err.tensor == "2.weight" and err.largest == pytest.approx(1e5) and err.dtype_max == 65504
    assert "'2.weight'" in str(err) and "100000" in str(err) and "65504" in str(err) and "float16" in str(err)
    # bfloat16 holds 1e5 (its range is float32's): no error, finite output
    res = pipeline.run(pipeline.plan(_recipe(paths, out_dtype="bfloat16")))
    assert all(bool(torch.isfinite(t).all()) for t in res.projector.state().values())


def test_cli_overflowing_cast_exits_2_with_one_line_and_writes_nothing(tmp_path, capsys):
    recipe = _recipe(_experts(tmp_path), out_dtype="float16").save(tmp_path / "recipe.yml")
    out = tmp_path / "out"
    assert cli_main(["merge", str(recipe), str(out), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pivotmerge: error:") and "2.weight" in err[0]
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dom0", "dom1", "recipe.yml"]


def test_save_with_a_narrower_dtype_is_checked_before_writing(tmp_path):
    res = pipeline.run(pipeline.plan(_recipe(_experts(tmp_path))))
    assert res.projector.dtype == torch.float32
    with pytest.raises(CastOverflow, match="2.weight"):
        pipeline.save_result(res, tmp_path / "out", dtype=torch.float16)
    assert not (tmp_path / "out").exists()


def test_allowed_nonfinite_inputs_keep_their_behaviour(tmp_path):
    paths = _experts(tmp_path, big=None, nan=True)
    res = pipeline.run(pipeline.plan(_recipe(paths, out_dtype="float16"), allow_nonfinite=True))
    assert res.projector.dtype == torch.float16
    assert bool(torch.isnan(res.projector.state()["0.bias"][0]))
    pipeline.save_result(res, tmp_path / "out")  # NaN that was there already is no cast overflow


@pytest.mark.parametrize("dtype", [torch.int8, torch.int64, torch.bool, torch.complex64])
@pytest.mark.parametrize("as_base", [False, True])
def test_non_float_and_complex_experts_are_refused_at_plan(tmp_path, capsys, dtype, as_base):
    from pivotmerge_gui.core.errors import CheckpointError

    paths = _experts(tmp_path, big=None)
    sd = make_mlp_projector(seed=5).original_state_dict()
    sd["model.mm_projector.2.bias"] = sd["model.mm_projector.2.bias"].to(dtype)
    odd = tmp_path / "odd" / "mm_projector.bin"
    odd.parent.mkdir()
    torch.save(sd, odd)
    recipe = _recipe(paths, base_model=str(odd)) if as_base else _recipe([*paths, str(odd)])
    with pytest.raises(CheckpointError) as info:
        pipeline.plan(recipe)
    msg = str(info.value)
    assert msg.startswith(str(odd)) and "'model.mm_projector.2.bias'" in msg
    assert str(dtype).removeprefix("torch.") in msg and "floating-point" in msg
    assert ("(complex)" in msg) == dtype.is_complex
    path = recipe.save(tmp_path / "recipe.yml")
    assert cli_main(["merge", str(path), str(tmp_path / "out"), "-q"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "mm_projector.2.bias" in err[0]
    assert not (tmp_path / "out").exists()
