"""Dropped files and folders become checkpoint specs (core.io.discovery.expand_paths)."""

from __future__ import annotations

from pivotmerge_gui.core.io.discovery import expand_paths


def test_expand_paths_keeps_checkpoint_folders_and_expands_folders_of_experts(tmp_path):
    ckpt = tmp_path / "run1"
    ckpt.mkdir()
    (ckpt / "mm_projector.bin").write_bytes(b"0")
    many = tmp_path / "many"
    (many / "a").mkdir(parents=True)
    (many / "a" / "mm_projector.bin").write_bytes(b"0")
    (many / "b.safetensors").write_bytes(b"0")
    (many / "notes.txt").write_text("x")
    empty = tmp_path / "empty"
    empty.mkdir()
    out = expand_paths([ckpt, many, empty, ckpt])
    assert out == [str(ckpt), str(many / "a"), str(many / "b.safetensors"), str(empty)]
