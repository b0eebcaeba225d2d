"""Issue 15, item 6: the app opens its window even when its log path is a folder or its
config/state folders are files, and says what will not be kept (status bar, stderr, log)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from PySide6.QtGui import QImage

from pivotmerge_gui.gui import app


def _broken_dirs(tmp_path: Path) -> dict[str, str]:
    """XDG homes where the config folder is a file, the log file is a folder and the
    state/data folders are files."""
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "PivotMergeStudio").write_text("not a folder")
    (tmp_path / "state" / "PivotMergeStudio" / "log" / "pivotmerge-gui.log").mkdir(parents=True)
    (tmp_path / "data").write_text("not a folder either")
    return {"XDG_CONFIG_HOME": str(tmp_path / "cfg"), "XDG_STATE_HOME": str(tmp_path / "state"),
            "XDG_DATA_HOME": str(tmp_path / "data"), "XDG_CACHE_HOME": str(tmp_path / "cache")}


def test_fallbacks_name_the_path_and_the_consequence(tmp_path, monkeypatch):
    for k, v in _broken_dirs(tmp_path).items():
        monkeypatch.setenv(k, v)

    def setup():
        raise IsADirectoryError(21, "Is a directory")

    path, problems = app.start_logging(setup)
    log = tmp_path / "state" / "PivotMergeStudio" / "log" / "pivotmerge-gui.log"
    assert path is None and problems == [f"cannot write the log file {log} (Is a directory); logging to the terminal"]
    settings, problem = app.open_settings()
    assert problem.startswith(f"cannot use the settings folder {tmp_path}/cfg/PivotMergeStudio (")
    assert problem.endswith("settings and recent files will not be kept")
    settings.add_recent("/x/mm_projector.bin")  # the temporary settings work
    assert settings.recent_files() == ["/x/mm_projector.bin"]
    assert app.folder_problems() == [f"{tmp_path}/data is a file, not a folder: calibration files cannot be saved"]
    (tmp_path / "state2").write_text("file")
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state2"))
    assert f"{tmp_path}/state2 is a file, not a folder: session autosave cannot be saved" in app.folder_problems()


def test_the_window_opens_with_every_app_folder_broken(tmp_path):
    png = tmp_path / "shot.png"
    env = {**os.environ, **_broken_dirs(tmp_path), "QT_QPA_PLATFORM": "offscreen"}
    proc = subprocess.run([sys.executable, "-m", "pivotmerge_gui.gui.app", "--size", "1200x800", "--screenshot",
                           str(png)], check=False, capture_output=True, text=True, timeout=180, env=env)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert (QImage(str(png)).width(), QImage(str(png)).height()) == (1200, 800)
    assert "Traceback" not in proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if ln.startswith("pivotmerge-gui: ")]
    assert any("cannot write the log file" in ln for ln in said)
    assert any("cannot use the settings folder" in ln for ln in said)
    assert any("calibration files cannot be saved" in ln for ln in said)
