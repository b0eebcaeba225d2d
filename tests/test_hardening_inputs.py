"""Issue 15, items 6, 7 and 9: inputs that gave tracebacks now give a typed error (CLI:
exit 2 and one line, control characters escaped); ``evaluate --max-pairs 1`` decodes only
the images it uses; decompression bombs are refused from their header."""

from __future__ import annotations

import json
import os
import struct
import zlib
from pathlib import Path

import pytest
import torch

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.cli.text import clean
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.bounded import json_loads
from pivotmerge_gui.core.errors import CheckpointError, MethodError, RecipeError
from pivotmerge_gui.core.evaluation import pairs as pairs_mod
from pivotmerge_gui.core.evaluation.pairs import PairsError, load_pairs
from pivotmerge_gui.core.io.safetensors_header import read_header
from pivotmerge_gui.core.recipe import Recipe
from tests.io.cases import CASE_BY_ID


def _one_line_error(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pivotmerge: error: ") and "Traceback" not in err[0], err
    assert err[0].isprintable()
    return err[0]


def _saved(case: str, folder: Path, seed: int = 0) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    return CASE_BY_ID[case].save(folder, seed=seed)[2]


# ------------------------------------------------------------------ item 6
def test_llava_and_qwen2_vl_experts_mixed_is_one_clear_line(tmp_path, capsys):
    a, b = _saved("hf-llava-new", tmp_path / "a"), _saved("qwen2-vl", tmp_path / "b")
    (tmp_path / "mix.yml").write_text(f"merge_method: linear\nmodels:\n - model: {a}\n - model: {b}\n")
    line = _one_line_error(capsys, ["merge", str(tmp_path / "mix.yml"), str(tmp_path / "out"), "-q"])
    assert "expert 'b' is incompatible with 'a': it has no tensor 'linear_1.weight' (shape [24, 16] in 'a')" in line
    assert "families: qwen2-vl vs hf-llava" in line and not (tmp_path / "out").exists()


@pytest.mark.parametrize("dim", [10**400, 2**63, -1])
def test_impossible_safetensors_dimension_is_one_line(tmp_path, capsys, dim):
    raw = (b'{"multi_modal_projector.linear_1.weight": {"dtype": "F32", "shape": [' + str(dim).encode()
           + b', 2], "data_offsets": [0, 8]}}')
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
    with pytest.raises(CheckpointError, match="invalid shape"):
        read_header(path)
    line = _one_line_error(capsys, ["inspect", str(path)])
    assert "invalid shape" in line and len(line) < 400


def test_integers_past_pythons_digit_limit_are_parse_errors(tmp_path):
    with pytest.raises(json.JSONDecodeError, match="not representable"):
        json_loads('{"x": ' + "9" * 5000 + "}")
    raw = b'{"x": {"dtype": "F32", "shape": [' + b"9" * 5000 + b'], "data_offsets": [0, 4]}}'
    (tmp_path / "m.safetensors").write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 4)
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_header(tmp_path / "m.safetensors")
    with pytest.raises(RecipeError, match="not valid YAML"):
        Recipe.from_yaml("merge_method: linear\nrandom_seed: " + "1" * 5000 + "\nmodels:\n - model: a\n")


def test_random_seed_range(tmp_path, capsys):
    a = _saved("hf-llava-new", tmp_path / "a")
    base = _saved("hf-llava-new", tmp_path / "base", seed=1)
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: dare_ties\nbase_model: {base}\nrandom_seed: {2**70}\nmodels:\n"
                      f" - model: {a}\n - model: {a}\n")
    assert "Input should be less than 18446744073709551616" in _one_line_error(
        capsys, ["merge", str(recipe), str(tmp_path / "o1"), "-q"])
    # every seed torch accepts runs (the per-expert stream is taken modulo 2**64)
    for seed in (2**64 - 1, -(2**63)):
        recipe.write_text(recipe.read_text().replace(f"random_seed: {2**70}", f"random_seed: {seed}")
                          .replace("random_seed: 18446744073709551615", f"random_seed: {seed}"))
        assert cli_main(["merge", str(recipe), str(tmp_path / f"o{seed}"), "-q"]) == 0
    capsys.readouterr()


def test_recipe_in_a_non_utf8_folder_is_one_escaped_line(tmp_path, capsys):
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/caf\xe9"))
    try:
        folder.mkdir()
    except (OSError, UnicodeEncodeError):
        pytest.skip("this file system refuses non-UTF-8 names")
    _saved("hf-llava-new", folder / "a")
    (folder / "r.yml").write_text("merge_method: linear\nmodels:\n - model: a\n - model: a\n")
    line = _one_line_error(capsys, ["merge", str(folder / "r.yml"), str(tmp_path / "out"), "-q"])
    assert "caf\\xe9/a" in line and "is not valid UTF-8" in line


@pytest.mark.parametrize("method", ["ties", "dare_ties", "knots", "regmean", "pivotmerge", "linear"])
def test_zero_unit_layers_are_refused_once_at_plan(tmp_path, capsys, method):
    state = {"model.mm_projector.0.weight": torch.zeros(0, 16), "model.mm_projector.0.bias": torch.zeros(0),
             "model.mm_projector.2.weight": torch.zeros(24, 0), "model.mm_projector.2.bias": torch.zeros(24)}
    for name in ("base", "e1", "e2"):
        (tmp_path / name).mkdir()
        torch.save(state, tmp_path / name / "mm_projector.bin")
    base = f"base_model: {tmp_path / 'base'}\n" if method in ("ties", "dare_ties", "knots") else ""
    text = f"merge_method: {method}\n{base}models:\n - model: {tmp_path / 'e1'}\n - model: {tmp_path / 'e2'}\n"
    with pytest.raises(MethodError, match=r"expert 'e1': tensor '0.weight' has shape \[0, 16\], a layer with no units"):
        pipeline.plan(Recipe.from_yaml(text))
    (tmp_path / "r.yml").write_text(text)
    line = _one_line_error(capsys, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out"), "-q"])
    assert "a layer with no units" in line or "needs calibration" in line  # regmean asks for calibration first


# ------------------------------------------------------------------ images (items 6 and 7)
def _png(path: Path, width: int, height: int) -> Path:
    """A tiny PNG file that declares ``width`` x ``height`` pixels (one row of data)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


def test_decompression_bombs_are_refused_from_their_header(tmp_path, capsys):
    folder = tmp_path / "pairs"
    folder.mkdir()
    bomb = _png(folder / "bomb.png", 100_000, 100_000)
    (folder / "bomb.txt").write_text("a caption")
    assert bomb.stat().st_size < 200
    with pytest.raises(PairsError, match=r"bomb.png: image .*over the [\d,]+-pixel limit \(a decompression bomb"):
        load_pairs(folder)
    _png(folder / "bomb.png", 10_000, 10_000)  # over the limit, under Pillow's own error threshold
    with pytest.raises(PairsError, match=r"bomb.png: image .*over the [\d,]+-pixel limit \(a decompression bomb"):
        load_pairs(folder)
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text(json.dumps({"image": str(bomb), "caption": "x"}) + "\n")
    with pytest.raises(PairsError, match=r"p.jsonl:1: image .*bomb.png: image .*over the [\d,]+-pixel limit"):
        load_pairs(jsonl)
    line = _one_line_error(capsys, ["evaluate", "--pairs", str(folder)])
    assert "decompression bomb" in line


def test_evaluate_max_pairs_1_decodes_one_image_per_domain(tmp_path, capsys, monkeypatch, demo_world):
    from PIL import Image

    folder = tmp_path / "pairs"
    for dom in ("a", "b"):
        (folder / dom).mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (16, 16), (40 * i, 0, 0)).save(folder / dom / f"{i}.png")
            (folder / dom / f"{i}.txt").write_text(f"red {i}")
    decoded: list[str] = []
    real = pairs_mod.open_image
    monkeypatch.setattr(pairs_mod, "open_image", lambda p: decoded.append(Path(p).relative_to(folder).as_posix())
                        or real(p))
    loaded = load_pairs(folder)
    assert len(loaded) == 12 and decoded == [] and not any(p.decoded for p in loaded)
    assert cli_main(["evaluate", "--pairs", str(folder), "--max-pairs", "1", "--json", "-q"]) == 0
    assert json.loads(capsys.readouterr().out)["pairs"] and sorted(decoded) == ["a/0.png", "b/0.png"]


@pytest.mark.parametrize(("line", "problem"), [("[" * 20000 + "]" * 20000, "JSON nested deeper than 64 levels"),
                                               ('{"image": ' + "1" * 5000 + "}", "not valid JSON")])
def test_hostile_jsonl_lines_are_pairs_errors(tmp_path, line, problem):
    (tmp_path / "p.jsonl").write_text(line + "\n")
    with pytest.raises(PairsError, match=f"p.jsonl:1: {problem}"):
        load_pairs(tmp_path / "p.jsonl")


# ------------------------------------------------------------------ item 9
def test_clean_escapes_control_characters_and_keeps_text():
    assert clean("ok café 東京 C:\\x") == "ok café 東京 C:\\x"
    assert clean("a\nb\r\x1b[31mred\x07\x7f\x9b") == "a\\nb\\r\\x1b[31mred\\x07\\x7f\\x9b"
    assert clean("\u202egnp.exe \u2028 \u200b") == "\\u202egnp.exe \\u2028 \\u200b"
    assert clean(os.fsdecode(b"caf\xe9")) == "caf\\xe9"
    assert clean("x" * 50, limit=10) == "x" * 10 + "... (40 more characters)"


def test_hostile_recipe_values_and_names_reach_the_terminal_escaped(tmp_path, capsys):
    evil = "x\n\x1b[2J\x1b]0;pwned\x07y"
    (tmp_path / "r.yml").write_text(json.dumps({"merge_method": evil, "models": [{"model": "a"}]}))
    line = _one_line_error(capsys, ["merge", str(tmp_path / "r.yml"), str(tmp_path / "out"), "-q"])
    assert "\\x1b[2J" in line and "\x1b" not in line
    # a checkpoint whose tensor names hold escapes: inspect prints them escaped, one per line
    state = dict(CASE_BY_ID["hf-llava-new"].build()[1])
    state["model.multi_modal_projector.linear_1.weight\x1b[31m"] = torch.zeros(1)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    assert cli_main(["inspect", str(tmp_path / "model.safetensors")]) == 0
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err
    assert "model.multi_modal_projector.linear_1.weight\\x1b[31m [1] float32" in captured.out
