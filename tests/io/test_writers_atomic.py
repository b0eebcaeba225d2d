"""Atomic writes, input protection, overwrite policy, output formats' details."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from pivotmerge_gui.core.errors import Cancelled, OutputError
from pivotmerge_gui.core.io import (
    atomic_write,
    atomic_write_text,
    load_projector,
    output_filename,
    write_projector,
)
from pivotmerge_gui.core.progress import CancelToken
from tests.factories import make_mlp_projector

from .cases import CASE_BY_ID


def _leftovers(folder):
    return [p.name for p in folder.iterdir() if p.name.endswith(".pmtmp")]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "recipe.yml"
    target.write_text("old")

    def boom(tmp):
        tmp.write_text("half a rec")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, boom, overwrite=True)
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_writer_that_writes_nothing_is_an_error(tmp_path):
    with pytest.raises(OutputError, match="produced no file"):
        atomic_write(tmp_path / "x.bin", lambda tmp: None)
    assert list(tmp_path.iterdir()) == []


def test_existing_output_needs_overwrite(tmp_path):
    target = tmp_path / "README.md"
    atomic_write_text(target, "v1")
    with pytest.raises(OutputError, match="already exists"):
        atomic_write_text(target, "v2")
    assert target.read_text() == "v1"
    atomic_write_text(target, "v2", overwrite=True)
    assert target.read_text() == "v2"
    mode = target.stat().st_mode & 0o777
    assert mode & 0o044, "final file must not keep mkstemp's 0600"


def test_protected_inputs_by_path_symlink_and_hardlink(tmp_path):
    inp = tmp_path / "in" / "mm_projector.bin"
    inp.parent.mkdir()
    inp.write_bytes(b"input")
    out = tmp_path / "out"
    out.mkdir()
    (out / "link.bin").symlink_to(inp)
    os.link(inp, out / "hard.bin")
    for target in (inp, out / "link.bin", out / "hard.bin", tmp_path / "in" / ".." / "in" / "mm_projector.bin"):
        with pytest.raises(OutputError, match="input"):
            atomic_write_text(target, "clobber", protected=[inp], overwrite=True)
    # protecting the input folder protects every existing file in it
    with pytest.raises(OutputError, match="input folder"):
        atomic_write_text(inp, "clobber", protected=[inp.parent], overwrite=True)
    assert inp.read_bytes() == b"input"


def test_write_projector_never_overwrites_its_own_input(tmp_path):
    _, _, path = CASE_BY_ID["llava-mlp2x"].save(tmp_path)
    p = load_projector(path)
    before = path.read_bytes()
    with pytest.raises(OutputError, match="input checkpoint"):
        write_projector(p, tmp_path, overwrite=True)
    merged = p.with_state({k: v * 2 for k, v in p.state().items()})  # what a merge returns
    with pytest.raises(OutputError, match="input checkpoint"):
        write_projector(merged, tmp_path, overwrite=True)
    assert path.read_bytes() == before


def test_write_projector_overwrite_policy(tmp_path):
    p = make_mlp_projector()
    first = write_projector(p, tmp_path)
    assert first.name == "mm_projector.bin"
    with pytest.raises(OutputError, match="already exists"):
        write_projector(p, tmp_path)
    q = p.with_state({k: v + 1 for k, v in p.state().items()})
    write_projector(q, tmp_path, overwrite=True)
    r = load_projector(first)
    assert torch.equal(r.state()["0.weight"], q.state()["0.weight"])


def test_process_killed_mid_save_leaves_previous_file(tmp_path):
    target = tmp_path / "mm_projector.bin"
    target.write_bytes(b"previous")
    script = textwrap.dedent(f"""
        import sys, time
        from pivotmerge_gui.core.io import atomic_write
        def slow(tmp):
            with open(tmp, "wb") as fh:
                fh.write(b"partial")
                fh.flush()
                print("writing", flush=True)
                time.sleep(30)
        atomic_write({str(target)!r}, slow, overwrite=True)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline().strip() == b"writing"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert target.read_bytes() == b"previous"


def test_output_dtype_metadata_and_contiguity(tmp_path):
    from safetensors import safe_open

    p = make_mlp_projector()
    # a non-contiguous view (as a merge might return) must be written as its own values
    w = p.state()["0.weight"]
    p = p.with_state(p.state() | {"0.weight": w.t().contiguous().t()})
    out = write_projector(p, tmp_path, fmt="safetensors", dtype=torch.float16,
                          metadata={"recipe": "merge_method: ties", "sha256.expert_a": "ab" * 32})
    assert out.name == "model.safetensors"
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "recipe": "merge_method: ties", "sha256.expert_a": "ab" * 32}
        assert set(fh.keys()) == set(p.original_state_dict())
        assert fh.get_tensor("model.mm_projector.0.weight").dtype == torch.float16
    q = load_projector(out)
    assert q.family == p.family and q.dtype == torch.float16
    torch.testing.assert_close(q.state()["0.weight"].float(), w, atol=1e-3, rtol=1e-3)


def test_unknown_format(tmp_path):
    with pytest.raises(OutputError, match="unknown output format"):
        write_projector(make_mlp_projector(), tmp_path, fmt="gguf")
    assert output_filename(make_mlp_projector()) == "mm_projector.bin"


def test_cancel_and_progress_while_loading(tmp_path):
    _, _, path = CASE_BY_ID["hf-llava-file"].save(tmp_path)
    token = CancelToken()
    token.cancel()
    with pytest.raises(Cancelled):
        load_projector(path, cancel=token)
    events = []
    load_projector(path, progress=events.append)
    fractions = [e.fraction for e in events]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0
    assert all(e.stage == "load" for e in events)
