"""Torch-free spec helpers of core.io.discovery: display names, dropped paths, Hub ids."""

from __future__ import annotations

import subprocess
import sys

import pytest

from pivotmerge_gui.core.io.discovery import (
    display_name,
    expand_paths,
    is_checkpoint_dir,
    parse_hub_id,
)


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("/runs/chart/mm_projector.bin", "chart"),
        ("/runs/chart/model.safetensors", "chart"),
        ("runs/ocr/pytorch_model.bin", "ocr"),
        ("/runs/expert_a.safetensors", "expert_a"),
        ("/runs/expert_b.pt", "expert_b"),
        ("/runs/expert_c.BIN", "expert_c"),
        ("/runs/folder", "folder"),
        ("mm_projector.bin", "mm_projector"),  # no folder to name it by
        ("liuhaotian/llava-v1.5-7b", "llava-v1.5-7b"),
        ("org/name@main", "name"),
        ("org/name@v1.0:mm_projector.bin", "name"),
        ("org/name:sub/model.safetensors", "name"),
        ("dir/mm_projector.bin", "dir"),  # a (missing) local file, not a Hub repo
    ],
)
def test_display_name(spec, name):
    assert display_name(spec) == name


def test_parse_hub_id():
    assert parse_hub_id("org/name@rev:file.bin") == ("org/name", "rev", "file.bin")
    assert parse_hub_id("org/name") == ("org/name", None, None)
    assert parse_hub_id("/abs/path") is None
    assert parse_hub_id("a/b/c") is None
    assert parse_hub_id("dir/x.safetensors") is None


def test_expand_paths_passes_on_what_it_cannot_expand(tmp_path):
    """(Folders of experts: tests/io/test_expand_paths.py.) Missing paths, files and Hub
    ids pass unchanged, so the loader can say what is wrong with them."""
    many = tmp_path / "many"
    many.mkdir()
    (many / "UPPER.BIN").write_bytes(b"0")
    (many / "b.pt").write_bytes(b"0")
    (many / "x.txt").write_text("x")
    file = many / "x.txt"
    missing = tmp_path / "missing.bin"
    out = expand_paths([str(missing), file, "org/name", many, missing])
    assert out == [str(missing), str(file), "org/name", str(many / "UPPER.BIN"),
                   str(many / "b.pt")]


def test_is_checkpoint_dir(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text("{}")
    single = tmp_path / "single"
    single.mkdir()
    (single / "weights.pt").write_bytes(b"0")
    nested = tmp_path / "nested"
    (nested / "sub").mkdir(parents=True)
    (nested / "weights.pt").write_bytes(b"0")
    two = tmp_path / "two"
    two.mkdir()
    (two / "a.pt").write_bytes(b"0")
    (two / "b.pt").write_bytes(b"0")
    assert is_checkpoint_dir(hf) and is_checkpoint_dir(single)
    assert not is_checkpoint_dir(nested) and not is_checkpoint_dir(two)
    assert not is_checkpoint_dir(tmp_path / "nope") and not is_checkpoint_dir(single / "weights.pt")


def test_gui_facing_core_modules_do_not_import_torch():
    """The window appears before torch loads: the modules it needs at start must not pull it."""
    code = (
        "import sys\n"
        "import pivotmerge_gui.core.io.discovery, pivotmerge_gui.core.options, pivotmerge_gui.core.recipe\n"
        "import pivotmerge_gui.core.io as io\n"
        "assert io.display_name('org/x') == 'x'\n"
        "print('torch' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_io_package_still_exports_its_public_names():
    from pivotmerge_gui.core import io

    for name in io.__all__:
        assert getattr(io, name) is not None
    assert io.readers.load_projector is io.load_projector
    with pytest.raises(AttributeError):
        io.no_such_name  # noqa: B018
