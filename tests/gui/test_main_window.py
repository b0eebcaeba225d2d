"""The main window end to end (offscreen): drops, flagged inputs, live validation, merge,
cancel, save, recipe round trip to the CLI path."""

from __future__ import annotations

import subprocess
import sys
import time
import warnings
from pathlib import Path

from PySide6.QtCore import QMimeData, QPoint, Qt, QUrl
from PySide6.QtGui import QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QApplication

from pivotmerge_gui.core.progress import ProgressEvent
from tests.gui.conftest import wait_idle


def _drop(widget, paths) -> None:  # type: ignore[no-untyped-def]
    """Deliver a real QDropEvent carrying file URLs, as a file manager would."""
    mime = QMimeData()
    mime.setUrls([QUrl.fromLocalFile(str(p)) for p in paths])
    with warnings.catch_warnings():  # PySide marks the QPoint constructor deprecated; it is Qt's only one
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(QPoint(10, 10), Qt.DropAction.CopyAction, mime,
                                Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, enter)
    assert enter.isAccepted()
    event = QDropEvent(QPoint(10, 10).toPointF(), Qt.DropAction.CopyAction, mime,
                       Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(widget, event)
    assert event.isAccepted()


def _add(window, qtbot, *paths):  # type: ignore[no-untyped-def]
    window.add_paths([str(p) for p in paths])
    wait_idle(qtbot, window)


def test_window_is_up_before_torch_is_imported():
    code = (
        "import os, sys, time; os.environ['QT_QPA_PLATFORM']='offscreen'\n"
        "from PySide6.QtWidgets import QApplication\n"
        "app = QApplication([])\n"
        "from pivotmerge_gui.gui.main_window import MainWindow\n"
        "w = MainWindow(); w.show()\n"
        "at_show = ('torch' in sys.modules, w.isVisible())\n"
        "t0 = time.time()\n"
        "while not w.core_ready and time.time() - t0 < 100:\n"
        "    app.processEvents(); time.sleep(0.01)\n"
        "print(at_show, 'torch' in sys.modules, w.core_ready)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    # torch was not imported when the window showed; the engine (and torch) came after
    assert proc.stdout.strip().splitlines()[-1] == "(False, True) True True", proc.stdout


def test_drop_files_a_folder_and_a_broken_file(qtbot, window, expert_files):
    _drop(window, [expert_files["e0"], expert_files["folder"], expert_files["broken"]])
    wait_idle(qtbot, window)
    entries = window.experts.entries
    assert [e.name for e in entries] == ["expert0", "domain0", "domain1", "broken"]
    assert [e.status for e in entries] == ["ready", "ready", "ready", "error"]
    ready = entries[0]
    assert ready.family.startswith("LLaVA") and ready.shapes == "8 → 16 → 12"
    assert ready.dtype == "float32" and ready.size_bytes and ready.short_hash
    broken = entries[3]
    assert str(expert_files["broken"]) in broken.message  # the reason names the file
    tip = window.experts.data(window.experts.index(3, 1), Qt.ItemDataRole.ToolTipRole)
    assert tip == broken.message
    window.list_panel.view.selectRow(3)
    assert broken.message in window.list_panel.details.toPlainText()
    # the broken input blocks the merge with the reason, and the app is still alive
    assert not window.merge_panel.merge_button.isEnabled()
    assert "broken" in window.merge_reason
    # drops on the list view itself go the same way; duplicates are not added twice
    _drop(window.list_panel.view.viewport(), [expert_files["e1"], expert_files["e0"]])
    wait_idle(qtbot, window)
    assert [e.name for e in window.experts.entries][-1] == "expert1"
    assert len(window.experts.entries) == 5
    # and drops on the rest of the expert panel (here the base row) reach the window
    _drop(window.list_panel.base_label, [expert_files["e2"]])
    wait_idle(qtbot, window)
    assert [e.name for e in window.experts.entries][-1] == "expert2"


def test_live_validation_names_the_reason(qtbot, window, expert_files):
    mp = window.merge_panel
    assert not mp.merge_button.isEnabled() and "Add at least two experts" in window.merge_reason
    _add(window, qtbot, expert_files["e0"])
    assert not mp.merge_button.isEnabled() and "one more expert" in window.merge_reason
    _add(window, qtbot, expert_files["wide"])
    assert not mp.merge_button.isEnabled()
    assert "incompatible" in window.merge_reason and "[20, 8]" in window.merge_reason
    window.experts.remove_rows([1])
    _add(window, qtbot, expert_files["e1"])
    assert mp.set_method_name("task_arithmetic")
    wait_idle(qtbot, window)
    assert not mp.merge_button.isEnabled() and "base" in window.merge_reason
    window.set_base(str(expert_files["base"]))
    wait_idle(qtbot, window)
    assert mp.merge_button.isEnabled(), window.merge_reason
    assert "Ready" in window.merge_reason


def _merge(qtbot, window):  # type: ignore[no-untyped-def]
    assert window.merge_panel.merge_button.isEnabled(), window.merge_reason
    with qtbot.waitSignal(window.merge_finished, timeout=60_000) as blocker:
        window.merge_panel.merge_button.click()
    wait_idle(qtbot, window)
    return blocker.args[0]


def test_merge_save_writes_three_files_and_recipe_runs_on_the_cli_path(qtbot, window, expert_files, tmp_path):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    window.experts.setData(window.experts.index(2, window.experts.WEIGHT), "2")
    assert window.merge_panel.set_method_name("linear")
    wait_idle(qtbot, window)
    result = _merge(qtbot, window)
    assert window.merge_result is result
    assert window.merge_panel.save_button.isEnabled()
    assert "Weight average" in window.report_panel.browser.toPlainText()
    out = tmp_path / "merged"
    w = window.save_to(out, fmt="safetensors", dtype="float16")
    with qtbot.waitSignal(w.stopped, timeout=30_000):
        pass
    assert w.outcome == "finished"
    names = sorted(p.name for p in out.iterdir())
    assert "recipe.yml" in names and "README.md" in names and len(names) == 3
    projector_file = next(p for p in out.iterdir() if p.name not in ("recipe.yml", "README.md"))
    assert projector_file.suffix == ".safetensors"

    # the recipe the GUI saves is the one the CLI runs
    from pivotmerge_gui.core import pipeline
    from pivotmerge_gui.core.io import load_projector
    from pivotmerge_gui.core.recipe import Recipe

    recipe_path = window.save_recipe(tmp_path / "gui-recipe.yml")
    recipe = Recipe.load(recipe_path)
    assert recipe.merge_method == "linear" and recipe.weights == [1.0, 1.0, 2.0]
    cli_result = pipeline.run(pipeline.plan(recipe, base_dir=recipe_path.parent))
    for k, t in cli_result.projector.state().items():
        assert (t - result.projector.state()[k]).abs().max().item() < 1e-6, k
    saved = load_projector(str(projector_file))
    assert saved.dtype.__repr__().endswith("float16")


def test_open_recipe_restores_the_setup(qtbot, window, expert_files, tmp_path):
    from pivotmerge_gui.core.recipe import Recipe

    recipe = Recipe(
        merge_method="task_arithmetic",
        base_model="base/mm_projector.bin",
        models=[{"model": "expert0/mm_projector.bin", "name": "ocr", "parameters": {"weight": 0.5}},
                {"model": "expert1/mm_projector.bin"}],
        parameters={"scaling": 0.7},
        random_seed=3,
        dtype="float64",
    )
    path = recipe.save(expert_files["base"].parent.parent / "r.yml")
    window.open_recipe(path)
    wait_idle(qtbot, window)
    assert [e.name for e in window.experts.entries] == ["ocr", "expert1"]
    assert window.experts.entries[0].weight == 0.5
    assert window.base_entry is not None and window.base_entry.ready
    assert window.merge_panel.method_name() == "task_arithmetic"
    assert window.merge_panel.form.values() == {"scaling": 0.7}
    assert window.merge_panel.settings()["random_seed"] == 3
    assert window.merge_panel.merge_button.isEnabled(), window.merge_reason
    again = window.current_recipe()
    assert again.parameters == {"scaling": 0.7} and again.dtype == "float64"


def test_cancel_stops_the_merge_within_a_second_and_writes_nothing(qtbot, window, expert_files, tmp_path, monkeypatch):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"])
    assert window.merge_panel.set_method_name("linear")
    wait_idle(qtbot, window)
    from pivotmerge_gui.core import pipeline

    def slow_execute(plan, cancel=None):  # a merge that would take minutes
        for i in range(100_000):
            time.sleep(0.01)
            yield ProgressEvent("merge", i / 100_000, f"tensor {i}")
        raise AssertionError("not cancelled")

    monkeypatch.setattr(pipeline, "execute", slow_execute)
    window.merge_panel.merge_button.click()
    qtbot.waitUntil(lambda: window.merge_panel.progress.value() > 0 or "tensor" in window.merge_panel.stage_label.text(),
                    timeout=10_000)
    assert window.merge_panel.cancel_button.isEnabled()
    t0 = time.perf_counter()
    window.merge_panel.cancel_button.click()
    qtbot.waitUntil(lambda: window.merge_worker is None, timeout=5_000)
    assert time.perf_counter() - t0 < 1.0
    assert window.merge_result is None
    assert "cancelled" in window.merge_panel.stage_label.text()
    assert not window.merge_panel.save_button.isEnabled()
    assert window.merge_panel.merge_button.isEnabled()


def test_settings_recent_files_and_geometry_persist(qtbot, expert_files):
    from pivotmerge_gui.gui.main_window import MainWindow
    from pivotmerge_gui.gui.settings import AppSettings

    w = MainWindow(start_core=False)
    qtbot.addWidget(w)
    w.resize(700, 500)  # inside the offscreen screen (800x600), so no clamping
    w.add_paths([str(expert_files["e0"])])
    w.close()
    settings = AppSettings()
    assert settings.recent_files() == [str(Path(expert_files["e0"]).resolve())]
    w2 = MainWindow(settings, start_core=False)
    qtbot.addWidget(w2)
    assert (w2.width(), w2.height()) == (700, 500)
    w2.close()


def test_calibration_file_enables_methods_that_need_it(qtbot, window, expert_files, tmp_path):
    import torch

    from pivotmerge_gui.core.calibration import save_calibration
    from pivotmerge_gui.core.methods.base import Calibration

    _add(window, qtbot, expert_files["e0"], expert_files["e1"])
    needs = [m.name for m in window.methods if m.needs_calibration]
    assert needs, "the registry should have a method that needs calibration (RegMean)"
    assert window.merge_panel.set_method_name(needs[0])
    wait_idle(qtbot, window)
    assert not window.merge_panel.merge_button.isEnabled() and "calibration" in window.merge_reason
    g = torch.Generator().manual_seed(0)
    cal = save_calibration(Calibration([torch.randn(32, 8, generator=g) for _ in range(2)], ["a", "b"]),
                           tmp_path / "cal.safetensors")
    window.merge_panel.calibration_chosen.emit(str(cal))  # as the Choose… dialog does
    wait_idle(qtbot, window)
    assert window.merge_panel.merge_button.isEnabled(), window.merge_reason
    ref = window.current_recipe().calibration
    assert ref.file == str(cal) and ref.domains == {"expert0": "a", "expert1": "b"}  # no name in common: by position


def test_dragging_rows_reorders_the_expert_list(qtbot, window, expert_files):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    view = window.list_panel.view
    model = window.experts
    before = [e.name for e in model.entries]
    view.selectRow(0)
    mime = model.mimeData(view.selectionModel().selectedIndexes())
    target = view.visualRect(model.index(2, 1))
    pos = target.center() + QPoint(0, target.height() // 4)  # lower half of the last row
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        enter = QDragEnterEvent(pos, Qt.DropAction.MoveAction, mime,
                                Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(view.viewport(), enter)
    assert enter.isAccepted()
    drop = QDropEvent(pos.toPointF(), Qt.DropAction.MoveAction, mime,
                      Qt.MouseButton.LeftButton, Qt.KeyboardModifier.NoModifier)
    QApplication.sendEvent(view.viewport(), drop)
    assert drop.isAccepted()
    # nothing was removed or duplicated; the first expert is now last, and selected
    assert [e.name for e in model.entries] == before[1:] + before[:1]
    assert window.list_panel.selected_rows() == [2]
    wait_idle(qtbot, window)
    assert all(e.status == "ready" for e in model.entries)


def test_views_are_registered_once_with_tab_menu_entry_and_shortcut(window):
    keys = list(window.views.views)
    assert keys == ["layers", "spectra", "similarity", "report", "bench", "autotune", "history", "sweep"]
    titles = [window.tabs.tabText(i) for i in range(window.tabs.count())]
    menu = [a.text() for a in window.view_menu.actions()[:len(keys)]]  # then the side-panel toggles
    assert titles == menu == ["Layers", "Spectra", "Similarity", "Merge report", "Test bench", "Auto-tune",
                             "History", "Sweep"]
    shortcuts = [a.shortcut().toString() for a in window.view_menu.actions()[:len(keys)]]
    assert shortcuts == [f"Ctrl+{i}" for i in range(1, 9)]
    window.view_menu.actions()[4].trigger()
    assert window.views.current() == "bench" and window.tabs.currentIndex() == 4
    # the auto-tune panel got the registry's methods once the engine was up
    assert window.autotune_panel.method_combo.count() == len(window.methods) > 0


def test_compute_calibration_dialog_result_becomes_the_sessions_calibration(qtbot, window, expert_files, tmp_path):
    import torch

    from pivotmerge_gui.core.calibration import Calibration, save_calibration

    _add(window, qtbot, expert_files["e0"], expert_files["e1"])
    window.compute_calibration()
    dlg = window._calibration_dialog
    assert [r.name for r in dlg.rows] == ["expert0", "expert1"]
    path = save_calibration(Calibration([torch.randn(16, 8)], ["web"]), tmp_path / "c.safetensors")
    dlg.calibration_written.emit(str(path), {"expert0": "web", "expert1": None})
    assert window.session.calibration_path == str(path)
    assert window.current_recipe().calibration.domains == {"expert0": "web", "expert1": None}
    text = window.merge_panel.calibration_label.text()
    assert "c.safetensors" in text and "No calibration data for expert1" in text
    dlg.close()
