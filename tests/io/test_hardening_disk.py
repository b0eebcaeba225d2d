"""Issue 15, item 6: a full disk and a read-only output folder end a merge with exit 2 and
one line naming the folder, leaving it as it was. Real file systems where the test may
mount a small tmpfs (root in a container usually can); otherwise the simulated errors."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest
import torch

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core.io import atomic as atomic_io


def _experts(tmp_path: Path, width: int) -> Path:
    """Two LLaVA linear projectors of ``width`` x ``2 * width`` floats and their recipe."""
    folders = [tmp_path / f"w{width}" / f"e{i}" for i in range(2)]
    for i, folder in enumerate(folders):
        folder.mkdir(parents=True)
        g = torch.Generator().manual_seed(i)
        torch.save({"model.mm_projector.weight": torch.randn(width, 2 * width, generator=g),
                    "model.mm_projector.bias": torch.randn(width, generator=g)}, folder / "mm_projector.bin")
    recipe = tmp_path / f"r{width}.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n - model: {folders[0]}\n - model: {folders[1]}\n")
    return recipe


def _one_line(capsys, argv: list[str]) -> str:
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pivotmerge: error: "), err
    return err[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.exists() else {}


@pytest.fixture
def small_tmpfs(tmp_path):
    """Mount 1 MiB tmpfs file systems (``mount(size, read_only)``); skip where we may not."""
    mounted: list[Path] = []

    def mount(size: str = "1m", read_only: bool = False) -> Path:
        point = tmp_path / f"mnt{len(mounted)}"
        point.mkdir()
        opts = f"size={size}" + (",ro" if read_only else "")
        try:
            proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(point)],
                                  capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.TimeoutExpired) as exc:
            pytest.skip(f"cannot run mount: {exc}")
        if proc.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({proc.stderr.strip() or proc.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True, check=False, timeout=30)


def test_disk_full_on_a_real_tmpfs(tmp_path, capsys, small_tmpfs):
    disk = small_tmpfs("1m")
    small, big = _experts(tmp_path, 64), _experts(tmp_path, 512)  # 33 KB and 2 MB projectors
    out = disk / "out"
    line = _one_line(capsys, ["merge", str(big), str(out), "-q"])
    assert "No space left on device" in line and str(out) in line and "left as it was" in line
    assert os.listdir(disk) == []  # a first save that fails leaves nothing, not even temp files
    assert cli_main(["merge", str(small), str(out), "-q"]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    line = _one_line(capsys, ["merge", str(big), str(out), "-q", "--overwrite"])
    assert "No space left on device" in line
    assert _snapshot(out) == before and os.listdir(disk) == ["out"]


def test_read_only_file_system_on_a_real_tmpfs(tmp_path, capsys, small_tmpfs):
    disk = small_tmpfs("1m", read_only=True)
    line = _one_line(capsys, ["merge", str(_experts(tmp_path, 8)), str(disk / "out"), "-q"])
    assert "Read-only file system" in line and str(disk) in line
    assert os.listdir(disk) == []


@pytest.mark.parametrize("code", [errno.EACCES, errno.EROFS, errno.ENOSPC, errno.EDQUOT])
def test_simulated_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch, code):
    """Where no tmpfs can be mounted (and root ignores permissions), the same failures
    raised by the first write into the output's parent folder."""
    real_open = os.open

    def refusing(path, flags, *args, **kwargs):
        if flags & os.O_CREAT and Path(path).parent == tmp_path / "ro":
            raise OSError(code, os.strerror(code), str(path))
        return real_open(path, flags, *args, **kwargs)

    (tmp_path / "ro").mkdir()
    monkeypatch.setattr(atomic_io.os, "open", refusing)
    line = _one_line(capsys, ["merge", str(_experts(tmp_path, 8)), str(tmp_path / "ro" / "out"), "-q"])
    assert os.strerror(code) in line and str(tmp_path / "ro") in line
    assert os.listdir(tmp_path / "ro") == []
