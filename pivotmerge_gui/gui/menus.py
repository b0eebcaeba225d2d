"""The main window's menu bar (File, View, Help) and Help's actions."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QUrl
from PySide6.QtGui import QDesktopServices, QKeySequence
from PySide6.QtWidgets import QMessageBox

from pivotmerge_gui import __version__

from .settings import log_dir


def build_menus(window: Any) -> None:
    """File, View (filled by the view registry and :mod:`.layout`) and Help menus; sets
    ``window.action_add``, ``action_save_recipe``, ``action_save_merged`` and ``view_menu``."""
    m = window.menuBar().addMenu("&File")
    window.action_add = m.addAction("&Add experts…", window.list_panel._add_files)
    window.action_add.setShortcut(QKeySequence.StandardKey.Open)
    m.addAction("Add &folder…", window.list_panel._add_folder)
    m.addAction("Add from &Hub…", window.add_from_hub)
    demo = m.addMenu("Open &demo experts")
    demo.addAction("Shared init (with base)", lambda: window.open_demo("shared"))
    demo.addAction("Different inits", lambda: window.open_demo("different"))
    m.addSeparator()
    m.addAction("Open &recipe…", window.open_recipe_dialog)
    window.action_save_recipe = m.addAction("Save re&cipe…", window.save_recipe_dialog)
    window.action_save_merged = m.addAction("&Save merged…", window.save_merged)
    window.action_save_merged.setShortcut(QKeySequence.StandardKey.Save)
    window.action_save_merged.setEnabled(False)
    m.addSeparator()
    m.addAction("&Quit", window.close).setShortcut(QKeySequence.StandardKey.Quit)
    e = window.menuBar().addMenu("&Edit")
    window.action_undo_remove = e.addAction("&Undo remove expert", window.undo_remove)
    window.action_undo_remove.setShortcut(QKeySequence.StandardKey.Undo)
    window.action_undo_remove.setEnabled(False)
    e.addAction("&Remove selected experts (Delete in the list)", window.list_panel.remove_selected)
    window.view_menu = window.menuBar().addMenu("&View")
    h = window.menuBar().addMenu("&Help")
    h.addAction("Open &log folder", lambda: open_log_folder(window))
    h.addAction("&About", lambda: QMessageBox.about(
        window, "PivotMerge Studio", f"PivotMerge Studio {__version__}<br>Merge the cross-modal projectors "
        f"of multimodal LLMs: PivotMerge and baselines.<br>Log folder: {log_dir()}"))


def open_log_folder(window: Any, opener: Any = None) -> bool:
    """Open the log folder in the desktop's file manager; when that cannot be done (no file
    manager, no desktop session) say where the folder is instead of failing silently."""
    folder = log_dir()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        pass
    opened = (opener or QDesktopServices.openUrl)(QUrl.fromLocalFile(str(folder)))
    if not opened:
        window.show_message("Cannot open the log folder",
                            f"No file manager could open it. The log folder is {folder}")
    return bool(opened)
