"""The main window's layout: the three-pane splitter (expert list | views | merge form), a
first size that fits the screen, and View-menu toggles that collapse the side panels."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QByteArray, QRect, Qt
from PySide6.QtGui import QAction, QGuiApplication, QKeySequence
from PySide6.QtWidgets import QMainWindow, QSplitter, QWidget

PREFERRED = (1680, 960)  # the first window on a large screen
# share of the width: expert list, views, merge form (the views get what the sides leave)
SHARES = (0.2, 0.54, 0.26)
SIDE_MIN = (240, 300)  # expert list, merge form: narrower is unreadable (collapse them instead)
SIDE_MAX = (520, 460)


def build_splitter(left: QWidget, centre: QWidget, right: QWidget) -> QSplitter:
    """The expert list, the views and the merge form side by side; the side panels can be
    collapsed by dragging the (visible, 6 px) handle to the window's edge."""
    s = QSplitter(Qt.Orientation.Horizontal)
    s.setHandleWidth(6)
    s.setStyleSheet("QSplitter::handle:horizontal { background: palette(mid); margin: 0 2px; }")
    for i, (w, stretch) in enumerate(((left, 0), (centre, 1), (right, 0))):
        s.addWidget(w)
        s.setStretchFactor(i, stretch)
        s.setCollapsible(i, i != 1)
    return s


def available_rect(window: QWidget) -> QRect:
    """The screen area the window may use (without panels and docks)."""
    screen = window.screen() or QGuiApplication.primaryScreen()
    return screen.availableGeometry() if screen is not None else QRect(0, 0, *PREFERRED)


def first_size(avail: QRect) -> tuple[int, int]:
    """The first window size: the preferred one, shrunk to fit the available area (room left
    for a window frame)."""
    return min(PREFERRED[0], max(800, avail.width() - 16)), min(PREFERRED[1], max(560, avail.height() - 40))


def split_sizes(width: int) -> list[int]:
    """Default splitter sizes for a window ``width`` px wide."""
    left = int(min(SIDE_MAX[0], max(SIDE_MIN[0], width * SHARES[0])))
    right = int(min(SIDE_MAX[1], max(SIDE_MIN[1], width * SHARES[2])))
    return [left, max(200, width - left - right - 12), right]


def place_window(window: QMainWindow, size: tuple[int, int] | None = None) -> None:
    """Size the window to fit the screen (or to ``size``), centre it and split it."""
    avail = available_rect(window)
    w, h = size or first_size(avail)
    window.resize(w, h)
    if size is None:
        window.move(avail.x() + max(0, (avail.width() - w) // 2), avail.y() + max(0, (avail.height() - h) // 2))
    window.splitter.setSizes(split_sizes(w))


def restore_layout(window: Any, geometry: QByteArray | None, split: Any) -> None:
    """Reopen the last geometry and splitter state, unless the geometry no longer fits the
    screen (a smaller monitor than last time): then the default layout is used."""
    if geometry is not None and window.restoreGeometry(geometry):
        avail = available_rect(window)
        if window.width() > avail.width() or window.height() > avail.height():
            place_window(window)
            return
        if isinstance(split, QByteArray):
            window.splitter.restoreState(split)
            sync_panel_actions(window)


def add_panel_toggles(window: Any) -> None:
    """View > Expert list / Merge panel: checkable actions that collapse or reopen the side
    panels (also kept in step when the user drags a panel shut). Call after ``window.views``
    exists."""
    menu = window.view_menu
    window.views.insert_before = menu.addSeparator()  # views registered later stay above
    window.panel_actions = []
    for index, text, key in ((0, "Expert list", "Ctrl+Shift+E"), (2, "Merge panel", "Ctrl+Shift+M")):
        action = QAction(text, menu, checkable=True, checked=True)
        action.setShortcut(QKeySequence(key))
        action.toggled.connect(lambda on, i=index: set_panel_open(window, i, on))
        menu.addAction(action)
        window.panel_actions.append((index, action))
    window.splitter.splitterMoved.connect(lambda *_: sync_panel_actions(window))


def set_panel_open(window: Any, index: int, on: bool) -> None:
    """Collapse (``on`` False) or reopen a side panel of the splitter."""
    s = window.splitter
    sizes = s.sizes()
    if (sizes[index] > 0) == on:
        return
    total = sum(sizes)
    if on:
        want = split_sizes(max(total, 1))[index]
        sizes[index] = want
        sizes[1] = max(200, sizes[1] - want)
    else:
        sizes[1] += sizes[index]
        sizes[index] = 0
    s.setSizes(sizes)
    sync_panel_actions(window)


def sync_panel_actions(window: Any) -> None:
    sizes = window.splitter.sizes()
    for index, action in getattr(window, "panel_actions", []):
        action.blockSignals(True)
        action.setChecked(sizes[index] > 0)
        action.blockSignals(False)
