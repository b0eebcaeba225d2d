"""Bounded parsing: YAML aliases (billion laughs) and deep nesting in recipes, safetensors
headers and shard indexes are typed errors, fast and with bounded memory."""

from __future__ import annotations

import json
import struct
import time
import tracemalloc

import pytest

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core.bounded import MAX_DEPTH, NestingError, json_loads, yaml_load
from pivotmerge_gui.core.errors import CheckpointError, RecipeError
from pivotmerge_gui.core.io.discovery import read_index
from pivotmerge_gui.core.io.safetensors_header import read_header
from pivotmerge_gui.core.recipe import Recipe

# the classic "billion laughs": 9 levels of 9 aliases, 9**9 strings once expanded
LAUGHS = "".join(
    [f'a: &a [{",".join(["lol"] * 9)}]\n']
    + [f"{c}: &{c} [{','.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")]
)
DEEP = 20_000


def test_billion_laughs_recipe_fails_fast_with_bounded_memory():
    assert len(LAUGHS) < 400
    tracemalloc.start()
    t0 = time.perf_counter()
    try:
        with pytest.raises(RecipeError, match="recipes may not use YAML anchors/aliases"):
            Recipe.from_yaml(LAUGHS, "laughs.yml")
        _now, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t0 < 2.0
    assert peak < 2_000_000


@pytest.mark.parametrize("text", [
    "merge_method: linear\nmodels: &m [{model: a.bin}]\n",  # an anchor alone is refused too
    "merge_method: linear\nbase_model: x\nmodels: [{model: *x}]\n",
    "base: &b {weight: 1}\nmerge_method: linear\nmodels: [{model: a.bin, parameters: {<<: *b}}]\n",
])
def test_any_anchor_or_alias_in_a_recipe_is_refused(text):
    with pytest.raises(RecipeError, match="anchors/aliases"):
        Recipe.from_yaml(text, "r.yml")


@pytest.mark.parametrize("text", [
    "[" * DEEP + "]" * DEEP,
    "{a: " * DEEP + "1" + "}" * DEEP,
    "".join("  " * i + "k:\n" for i in range(MAX_DEPTH + 2)),  # block style
])
def test_deep_yaml_is_a_typed_error(text):
    with pytest.raises(RecipeError, match=f"nested deeper than {MAX_DEPTH} levels"):
        Recipe.from_yaml(text, "deep.yml")


def test_nesting_up_to_the_limit_parses():
    assert yaml_load("[" * (MAX_DEPTH - 1) + "1" + "]" * (MAX_DEPTH - 1)) is not None
    assert json_loads("[" * MAX_DEPTH + "]" * MAX_DEPTH) == eval("[" * MAX_DEPTH + "]" * MAX_DEPTH)
    with pytest.raises(NestingError):
        json_loads("[" * (MAX_DEPTH + 1) + "]" * (MAX_DEPTH + 1))


def test_cli_refuses_a_hostile_recipe_with_one_line(tmp_path, capsys):
    for name, text in {"laughs.yml": LAUGHS, "deep.yml": "[" * DEEP + "]" * DEEP}.items():
        (tmp_path / name).write_text(text)
        assert cli_main(["merge", str(tmp_path / name), str(tmp_path / "out"), "-q"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and name in err[0] and "Traceback" not in err[0]
    assert not (tmp_path / "out").exists()


def _safetensors_with_header(path, header: str):
    raw = header.encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 16)
    return path


@pytest.mark.parametrize("depth", [MAX_DEPTH + 5, DEEP])
def test_deep_json_in_a_safetensors_header_or_shard_index_is_a_typed_error(tmp_path, depth):
    deep = "[" * depth + "]" * depth
    st = _safetensors_with_header(tmp_path / "model.safetensors", '{"__metadata__": {}, "x": ' + deep + "}")
    with pytest.raises(CheckpointError, match=f"header is nested deeper than {MAX_DEPTH} levels"):
        read_header(st)
    index = tmp_path / "model.safetensors.index.json"
    index.write_text('{"metadata": ' + deep + ', "weight_map": {}}')
    with pytest.raises(CheckpointError, match=f"shard index is nested deeper than {MAX_DEPTH} levels"):
        read_index(index)


def test_cli_inspect_of_a_deep_header_is_one_line(tmp_path, capsys):
    st = _safetensors_with_header(tmp_path / "model.safetensors", json.dumps({"x": 1})[:-1] + ', "y": '
                                  + "[" * DEEP + "]" * DEEP + "}")
    assert cli_main(["inspect", str(st)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nested deeper" in err[0]
