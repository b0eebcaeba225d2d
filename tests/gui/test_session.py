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

    from pivotmerge_gui.gui.main_window import MainWindow

    again = MainWindow(restore_layout=False)
    again.quiet_errors = True
    qtbot.addWidget(again)
    again.show()
    qtbot.waitUntil(lambda: again.core_ready, timeout=60_000)
    assert again.restore_session()
    qtbot.waitUntil(lambda: len(again.experts.entries) == 2, timeout=10_000)
    wait_idle(qtbot, again)
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
