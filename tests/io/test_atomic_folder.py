"""Whole-folder saves: a merge's output folder is replaced all at once or not at all."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.calibration import Calibration, save_calibration
from pivotmerge_gui.core.errors import Cancelled, OutputError, OutputLocked
from pivotmerge_gui.core.io import atomic as atomic_io
from pivotmerge_gui.core.progress import CancelToken
from pivotmerge_gui.core.recipe import Recipe
from tests.factories import make_mlp_projector

NAMES = ["README.md", "mm_projector.bin", "recipe.yml"]


def _expert_files(root: Path, n: int = 2, scale: float = 1.0) -> list[str]:
    paths = []
    for k in range(n):
        p = root / f"dom{k}" / "mm_projector.bin"
        p.parent.mkdir(parents=True, exist_ok=True)
        sd = make_mlp_projector(seed=k).original_state_dict()
        torch.save({key: v * scale for key, v in sd.items()}, p)
        paths.append(str(p))
    return paths


def _recipe(paths: list[str], **extra) -> Recipe:
    return Recipe.from_dict({"merge_method": "linear", "models": [{"model": p} for p in paths], **extra})


def _result(paths: list[str], **extra) -> pipeline.MergeResult:
    return pipeline.run(pipeline.plan(_recipe(paths, **extra)))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _siblings(folder: Path) -> list[str]:
    """What a save left beside ``folder`` (temp, old and lock entries)."""
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


@pytest.fixture
def two_results(tmp_path):
    a = _result(_expert_files(tmp_path / "a"))
    b = _result(_expert_files(tmp_path / "b", scale=2.0))
    return tmp_path, a, b


@pytest.fixture
def saved(two_results):
    """(tmp, out, the bytes of the earlier output in out, a second result to save)."""
    tmp, a, b = two_results
    pipeline.save_result(a, tmp / "out")
    return tmp, tmp / "out", _snapshot(tmp / "out"), b


def test_save_replaces_a_previous_output_whole(two_results):
    tmp, a, b = two_results
    out = tmp / "out"
    pipeline.save_result(a, out)
    (out / "notes.txt").write_text("my evaluation notes")  # the user's own file is kept
    old_inode = (out / "mm_projector.bin").stat().st_ino
    paths = pipeline.save_result(b, out, overwrite=True)
    assert [p.name for p in paths] == ["mm_projector.bin", "recipe.yml", "README.md"]
    assert sorted(p.name for p in out.iterdir()) == sorted([*NAMES, "notes.txt"])
    assert (out / "notes.txt").read_text() == "my evaluation notes"
    assert (out / "mm_projector.bin").stat().st_ino != old_inode
    sd = torch.load(out / "mm_projector.bin", weights_only=True)
    torch.testing.assert_close(sd["model.mm_projector.0.weight"], b.projector.state()["0.weight"])
    assert Recipe.load(out / "recipe.yml").models[0].model == b.recipe.models[0].model
    assert _siblings(out) == []


@pytest.mark.parametrize("make_exc", [lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), KeyboardInterrupt])
def test_failure_after_the_projector_leaves_the_old_folder_byte_identical(saved, monkeypatch, make_exc):
    tmp, out, before, b = saved
    real = atomic_io.atomic_write_text
    seen = []

    def failing(path, text, **kw):
        seen.append(sorted(p.name for p in Path(path).parent.iterdir()))
        raise make_exc()

    monkeypatch.setattr(atomic_io, "atomic_write_text", failing)
    with pytest.raises((OutputError, KeyboardInterrupt)) as info:
        pipeline.save_result(b, out, overwrite=True)
    assert seen == [["mm_projector.bin"]]  # the failure came after the projector was written
    if isinstance(info.value, OutputError):
        assert "No space left" in str(info.value) and str(out) in str(info.value)
        assert "left as it was" in str(info.value)
    assert _snapshot(out) == before
    assert _siblings(out) == []
    # a first save that fails leaves no folder at all
    with pytest.raises((OutputError, KeyboardInterrupt)):
        pipeline.save_result(b, tmp / "fresh")
    assert not (tmp / "fresh").exists() and _siblings(tmp / "fresh") == []
    monkeypatch.setattr(atomic_io, "atomic_write_text", real)
    pipeline.save_result(b, out, overwrite=True)
    assert _snapshot(out) != before


def test_interrupt_between_the_two_renames_restores_the_old_folder(saved, monkeypatch):
    _tmp, out, before, b = saved
    real_rename = os.rename
    calls = []

    def rename(src, dst):
        calls.append((Path(src).name, Path(dst).name))
        if Path(src).name.startswith(".out.tmp-") and len(calls) == 2:
            raise KeyboardInterrupt  # out is already renamed aside
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        pipeline.save_result(b, out, overwrite=True)
    assert calls[0][0] == "out" and calls[0][1].startswith(".out.old-")
    assert _snapshot(out) == before
    assert _siblings(out) == []


def test_cancel_before_the_swap_writes_nothing(saved):
    _tmp, out, before, b = saved
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        pipeline.save_result(b, out, overwrite=True, cancel=token)
    assert _snapshot(out) == before and _siblings(out) == []


def test_cli_interrupted_during_the_save_exits_130_and_writes_nothing(tmp_path, monkeypatch, capsys):
    paths = _expert_files(tmp_path)
    recipe = _recipe(paths).save(tmp_path / "recipe.yml")
    out = tmp_path / "out"
    assert cli_main(["merge", str(recipe), str(out), "-q"]) == 0
    before = _snapshot(out)

    def interrupted(path, text, **kw):
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_io, "atomic_write_text", interrupted)
    capsys.readouterr()
    assert cli_main(["merge", str(recipe), str(out), "-q", "--overwrite"]) == 130
    assert "nothing was written" in capsys.readouterr().err
    assert _snapshot(out) == before and _siblings(out) == []


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_second_writer_gets_a_typed_error_naming_the_folder(saved, capsys):
    tmp, out, before, b = saved
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp / ".out.lock"
        lock.write_text(f"{holder.pid}\n")
        with pytest.raises(OutputLocked, match=f"process {holder.pid} is saving") as info:
            pipeline.save_result(b, out, overwrite=True)
        assert str(out) in str(info.value) and info.value.pid == holder.pid
        assert _snapshot(out) == before
        # the CLI: one line, exit 2
        recipe = b.recipe.save(tmp / "b.yml")
        assert cli_main(["merge", str(recipe), str(out), "-q", "--overwrite"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "is saving into this folder" in err[0]
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale and taken over
    pipeline.save_result(b, out, overwrite=True)
    assert not lock.exists() and _siblings(out) == []


def test_a_lock_of_a_dead_process_and_leftovers_of_a_crashed_save_are_cleaned(two_results):
    tmp, a, b = two_results
    out = tmp / "out"
    pipeline.save_result(a, out)
    old_set = _snapshot(out)
    # a save killed between its two renames: out renamed aside, the new set complete beside it
    os.rename(out, tmp / ".out.old-0123456789ab")
    half = tmp / ".out.tmp-ba9876543210"
    half.mkdir()
    (half / "mm_projector.bin").write_bytes(b"partial")
    (tmp / ".out.tmp-aaaaaaaaaaaa").mkdir()
    (tmp / ".out.lock").write_text(f"{_dead_pid()}\n")
    (tmp / ".out.tmp-unrelated").mkdir()  # not a name a save makes: left alone
    pipeline.save_result(b, out, overwrite=True)
    assert _siblings(out) == [".out.tmp-unrelated"]
    assert _snapshot(out) != old_set and sorted(_snapshot(out)) == NAMES
    # the recovery on its own restores the old folder when out is missing
    os.rename(out, tmp / ".out.old-00000000000f")
    removed = atomic_io.recover_folder(out)
    assert removed == [] and sorted(_snapshot(out)) == NAMES


def test_outputs_never_overwrite_the_calibration_file(tmp_path):
    paths = _expert_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    calib = out / "model.safetensors"
    save_calibration(Calibration([torch.randn(8, 16), torch.randn(8, 16)], ["dom0", "dom1"]), calib)
    before = calib.read_bytes()
    plan = pipeline.plan(_recipe(paths, calibration=str(calib), output_format="safetensors"))
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        pipeline.check_output_dir(plan, out, overwrite=True)
    res = pipeline.run(plan)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        pipeline.save_result(res, out, overwrite=True)
    # elsewhere in the folder under another name it is still an input the swap would drop
    other = out / "calibration.safetensors"
    os.rename(calib, other)
    plan = pipeline.plan(_recipe(paths, calibration=str(other)))
    res = pipeline.run(plan)
    with pytest.raises(OutputError, match="refusing to overwrite the input"):
        pipeline.save_result(res, out, overwrite=True)
    assert other.read_bytes() == before and sorted(p.name for p in out.iterdir()) == ["calibration.safetensors"]


def test_folders_a_whole_folder_save_cannot_take(two_results):
    tmp, a, _b = two_results
    (tmp / "file").write_text("x")
    with pytest.raises(OutputError, match="expected a folder"):
        pipeline.save_result(a, tmp / "file")
    sub = tmp / "withsub"
    (sub / "keep").mkdir(parents=True)
    with pytest.raises(OutputError, match="sub-folder 'keep'"):
        pipeline.save_result(a, sub, overwrite=True)
    assert sorted(p.name for p in sub.iterdir()) == ["keep"]
    # an existing empty folder is fine, and a symlink to a folder saves into its target
    (tmp / "empty").mkdir()
    pipeline.save_result(a, tmp / "empty")
    (tmp / "link").symlink_to(tmp / "empty")
    pipeline.save_result(a, tmp / "link", overwrite=True)
    assert (tmp / "link").is_symlink() and sorted(_snapshot(tmp / "empty")) == NAMES


_CHILD = """
import sys
from pivotmerge_gui.cli.main import main
sys.exit(main(["merge", sys.argv[1], sys.argv[2], "-q", "--overwrite"]))
"""


@pytest.mark.slow
def test_sigkill_at_random_points_leaves_the_old_or_the_new_complete_set(tmp_path):
    """A CLI merge with --overwrite is SIGKILLed after a random delay, 20 times: after the
    recovery the next save runs, the folder is the old complete set or the new one."""
    a_paths, b_paths = _expert_files(tmp_path / "a"), _expert_files(tmp_path / "b", scale=2.0)
    rec_a, rec_b = _recipe(a_paths).save(tmp_path / "a.yml"), _recipe(b_paths).save(tmp_path / "b.yml")
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}

    def merge(recipe: Path) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-c", _CHILD, str(recipe), str(out)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def text_files() -> tuple[str, str]:
        return (out / "recipe.yml").read_text(), (out / "README.md").read_text()

    assert merge(rec_b).wait(timeout=120) == 0
    new_set = text_files()
    new_w = torch.load(out / "mm_projector.bin", weights_only=True)
    assert merge(rec_a).wait(timeout=120) == 0
    old_set = text_files()
    old_w = torch.load(out / "mm_projector.bin", weights_only=True)
    # the time a whole run takes, to spread the kills over it (imports, merge, save)
    t0 = time.monotonic()
    assert merge(rec_a).wait(timeout=120) == 0
    span = time.monotonic() - t0
    rng = random.Random(15)
    outcomes = set()
    for _ in range(20):
        proc = merge(rec_b)
        time.sleep(rng.uniform(0.5, 1.0) * span)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
        with atomic_io.folder_lock(out):
            atomic_io.recover_folder(out)
        assert sorted(p.name for p in out.iterdir()) == NAMES
        weights = torch.load(out / "mm_projector.bin", weights_only=True)
        if text_files() == new_set:
            assert all(torch.equal(weights[k], new_w[k]) for k in new_w)
            outcomes.add("new")
            assert merge(rec_a).wait(timeout=120) == 0  # back to the old set for the next kill
        else:
            assert text_files() == old_set
            assert all(torch.equal(weights[k], old_w[k]) for k in old_w)
            outcomes.add("old")
        assert _siblings(out) == []
    assert "old" in outcomes


def test_a_projector_is_not_saved_into_a_complete_model_folder(tmp_path):
    """An earlier --into export holds config.json and shards: a projector-only save there
    would leave loaders reading the wrong weights."""
    paths = _expert_files(tmp_path)
    out = tmp_path / "model"
    out.mkdir()
    (out / "config.json").write_text("{}")
    (out / "model.safetensors.index.json").write_text("{}")
    before = _snapshot(out)
    plan = pipeline.plan(_recipe(paths))
    with pytest.raises(OutputError, match="complete model"):
        pipeline.check_output_dir(plan, out, overwrite=True)
    with pytest.raises(OutputError, match="complete model"):
        pipeline.save_result(pipeline.run(plan), out, overwrite=True)
    assert _snapshot(out) == before
