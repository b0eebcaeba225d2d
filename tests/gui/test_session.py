"""Session autosave: the expert list and settings survive a killed app."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

from pivotmerge_gui.core.recipe import Recipe
from pivotmerge_gui.gui.settings import session_file

from .conftest import wait_idle


def _reopen(qtbot, n_experts: int):  # type: ignore[no-untyped-def]
    """A second main window that restores the autosaved session and has settled."""
    from pivotmerge_gui.gui.main_window import MainWindow

    again = MainWindow(restore_layout=False)
    again.quiet_errors = True
    qtbot.addWidget(again)
    again.show()
    qtbot.waitUntil(lambda: again.core_ready, timeout=60_000)
    assert again.restore_session()
    qtbot.waitUntil(lambda: len(again.experts.entries) == n_experts, timeout=10_000)
    wait_idle(qtbot, again)
    return again


def test_autosave_and_restore_round_trip(qtbot, window, expert_files):
    window.add_paths([str(expert_files["e0"]), str(expert_files["e1"])])
    window.set_base(str(expert_files["base"]))
    wait_idle(qtbot, window)
    window.merge_panel.set_method_name("ties")
    qtbot.waitUntil(lambda: session_file().is_file(), timeout=10_000)
    qtbot.waitUntil(lambda: Recipe.load(session_file()).merge_method == "ties", timeout=10_000)
    saved = Recipe.load(session_file())
    assert [m.model for m in saved.models] == [str(expert_files["e0"]), str(expert_files["e1"])]
    assert saved.base_model == str(expert_files["base"])

    again = _reopen(qtbot, 2)
    assert [e.spec for e in again.experts.entries] == [m.model for m in saved.models]
    assert again.base_entry is not None and again.base_entry.spec == saved.base_model
    assert again.merge_panel.method.name == "ties"


def test_emptied_list_removes_the_session_and_bad_file_is_set_aside(qtbot, window, expert_files):
    window.add_paths([str(expert_files["e0"])])
    wait_idle(qtbot, window)
    qtbot.waitUntil(lambda: session_file().is_file(), timeout=10_000)
    window.experts.clear()
    qtbot.waitUntil(lambda: not session_file().exists(), timeout=10_000)
    session_file().write_text("merge_method: [broken\n")
    assert window.restore_session() is False
    assert session_file().with_suffix(".bad.yml").is_file() and not session_file().exists()


def test_killed_app_reopens_its_session(tmp_path, expert_files):
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "pivotmerge_gui.gui.app", str(expert_files["e0"]), str(expert_files["e2"])],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not session_file().is_file():
            time.sleep(0.2)
        assert session_file().is_file(), "the app never autosaved its session"
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    restored = Recipe.load(session_file())
    assert [m.model for m in restored.models] == [str(expert_files["e0"]), str(expert_files["e2"])]


def test_restore_keeps_calibration_coefficients_and_bench_pairs(qtbot, window, expert_files, tmp_path):
    """Calibration features held in memory, a per-layer override and the test bench's pairs
    come back after a restart; a calibration file that changed meanwhile is named in one
    message while the rest restores."""
    import torch

    from pivotmerge_gui.core.calibration import Calibration

    window.add_paths([str(expert_files["e0"]), str(expert_files["e1"])])
    wait_idle(qtbot, window)
    s = window.session
    uids = [e.uid for e in s.experts.entries]
    feats = [torch.randn(6, 8), torch.randn(5, 8)]
    s.set_memory_calibration(Calibration(feats, ["web", "ocr"]), "from the test bench pairs (in memory)", uids)
    assert window.merge_panel.set_method_name("pivotmerge")
    window.merge_panel.coefficients.set_overrides({"0": 0.75})
    window.bench_panel.load_demo_samples("val", 2)
    wait_idle(qtbot, window)
    window.autosave_session()

    again = _reopen(qtbot, 2)
    assert again.merge_panel.coefficients.overrides() == {"0": 0.75}
    ref = again.current_recipe().calibration
    assert ref is not None and ref.domains == {"expert0": "web", "expert1": "ocr"}
    assert again.session.uncovered_experts() == []
    assert len(again.bench_panel.pairs) == 8 and again.bench_panel.pair_sources == [{"demo": "val", "n": 2}]
    assert not again.errors_shown
    # the calibration file changes behind the app's back: named once, the rest restores
    from pathlib import Path

    Path(ref.file).write_bytes(b"changed")
    third = _reopen(qtbot, 2)
    assert len(third.errors_shown) == 1 and "calibration" in third.errors_shown[0]
    assert "changed" in third.errors_shown[0]
    assert third.session.calibration_path is None and len(third.bench_panel.pairs) == 8


def test_merge_and_save_headless_reproduces_with_the_cli(tmp_path, expert_files):
    """``pivotmerge-gui PATHS --merge --save DIR``: the app merges with its settings, saves
    through the Save dialog's code and exits 0; the saved recipe gives the same tensors."""
    import torch

    from pivotmerge_gui.cli.main import main as cli_main
    from pivotmerge_gui.core.io import load_projector

    out = tmp_path / "out"
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run(
        [sys.executable, "-m", "pivotmerge_gui.gui.app", str(expert_files["e0"]), str(expert_files["e1"]),
         "--base", str(expert_files["base"]), "--method", "ties", "--merge", "--save", str(out), "--timeout", "120"],
        check=False, env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "saved:" in proc.stdout and (out / "recipe.yml").is_file()
    assert Recipe.load(out / "recipe.yml").merge_method == "ties"
    assert cli_main(["merge", str(out / "recipe.yml"), str(tmp_path / "cli"), "--quiet"]) == 0
    name = next(p.name for p in out.iterdir() if p.suffix in (".bin", ".safetensors"))
    a, b = load_projector(str(out / name)).state(), load_projector(str(tmp_path / "cli" / name)).state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # --save without --merge is refused in one line
    bad = subprocess.run([sys.executable, "-m", "pivotmerge_gui.gui.app", "--save", str(out)],
                         check=False, env=env, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and "--save needs --merge" in bad.stderr
