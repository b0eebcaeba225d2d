"""Around the window: excepthooks, the Hub dialog offline, the command line with --screenshot."""

from __future__ import annotations

import subprocess
import sys
import threading

from PySide6.QtGui import QImage

from pivotmerge_gui.core.errors import CheckpointError
from pivotmerge_gui.gui.dialogs import HubDialog, hub_spec
from pivotmerge_gui.gui.errors import ExceptionHookBridge, describe_exception, install_excepthooks


def test_worker_thread_errors_reach_the_gui_thread(qtbot, monkeypatch):
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    monkeypatch.setattr(threading, "excepthook", threading.excepthook)
    bridge = ExceptionHookBridge()
    install_excepthooks(bridge)

    def boom():
        raise ValueError("bug in a thread")

    with qtbot.waitSignal(bridge.exception_raised, timeout=5_000) as blocker:
        t = threading.Thread(target=boom)
        t.start()
        t.join()
    short, details = blocker.args
    assert "ValueError: bug in a thread" in short and "log file" in short
    assert "Traceback" in details


def test_user_errors_are_short_and_bugs_carry_the_traceback():
    short, _ = describe_exception(CheckpointError("/x.bin", "not a checkpoint"))
    assert short == "/x.bin: not a checkpoint"
    try:
        raise KeyError("k")
    except KeyError as exc:
        short, details = describe_exception(exc)
    assert short.startswith("Unexpected error: KeyError") and "KeyError" in details


def test_hub_dialog_offline_without_cache_shows_the_reason(qtbot):
    assert hub_spec("org/name", "v1", "mm_projector.bin") == "org/name@v1:mm_projector.bin"
    dlg = HubDialog()
    qtbot.addWidget(dlg)
    dlg.repo.setText("nobody/not-cached-anywhere")
    dlg.start()
    assert dlg.worker is not None
    qtbot.waitUntil(lambda: dlg.worker is None, timeout=30_000)
    assert dlg.projector is None and dlg.error is not None
    assert "nobody/not-cached-anywhere" in dlg.status.text()
    assert dlg.add_button.isEnabled()


def test_command_line_screenshot_of_the_real_window(tmp_path, expert_files):
    png = tmp_path / "shot.png"
    proc = subprocess.run(
        [sys.executable, "-m", "pivotmerge_gui.gui.app", str(expert_files["e0"]), str(expert_files["e1"]),
         "--method", "linear", "--merge", "--view", "spectra", "--size", "1200x800", "--screenshot", str(png)],
        check=False, capture_output=True, text=True, timeout=180,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    img = QImage(str(png))
    assert (img.width(), img.height()) == (1200, 800)


def test_save_dialog_offers_every_output_format_and_returns_the_choice(qtbot, tmp_path):
    from pivotmerge_gui.core.io import FORMATS
    from pivotmerge_gui.gui.dialogs import SaveDialog

    dlg = SaveDialog(str(tmp_path / "out"), "LLaVA (mlp2x_gelu)")
    qtbot.addWidget(dlg)
    offered = [dlg.format.itemData(i) for i in range(dlg.format.count())]
    assert offered[0] == "auto" and set(offered[1:]) <= set(FORMATS) | {"auto"}
    assert {"llava-bin", "safetensors", "hf-llava"} <= set(offered)
    dlg.format.setCurrentIndex(offered.index("hf-llava"))
    dlg.dtype.setCurrentIndex(dlg.dtype.findData("bfloat16"))
    dlg.overwrite.setChecked(True)
    assert dlg.values() == (tmp_path / "out", "hf-llava", "bfloat16", True)


def test_pydantic_is_loaded_before_qt_installs_its_import_hook():
    """Regression: shiboken's import hook inspects every later module; pydantic imported
    under it in a worker thread failed with a circular import on a fresh install."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from pivotmerge_gui.gui.app import preload_before_qt\n"
        "assert 'PySide6' not in sys.modules\n"
        "preload_before_qt()\n"
        "assert 'pydantic' in sys.modules and 'torch' not in sys.modules\n"
        "names = list(sys.modules)\n"
        "import PySide6.QtWidgets\n"
        "print('ok')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr
