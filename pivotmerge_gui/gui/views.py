"""The registry of the window's views: one call adds the tab, its View-menu entry and its
shortcut (Ctrl+1, Ctrl+2, ... in registration order)."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu, QScrollArea, QTabWidget, QWidget


@dataclass
class View:
    key: str  # short id (``pivotmerge-gui --view KEY``)
    name: str  # tab and menu text
    widget: QWidget  # the panel itself
    page: QWidget  # what the tab shows (the panel, or a scroll area around it)
    action: QAction


class ViewRegistry:
    """Views in a tab widget, mirrored by a menu."""

    def __init__(self, tabs: QTabWidget, menu: QMenu) -> None:
        self.tabs = tabs
        self.menu = menu
        self.views: dict[str, View] = {}

    def register(self, key: str, name: str, widget: QWidget, *, scroll: bool = False) -> View:
        """Add a view; ``scroll``: the tab scrolls instead of imposing the panel's minimum
        size on the window."""
        if key in self.views:
            raise ValueError(f"a view {key!r} is already registered")
        page = _scrolled(widget) if scroll else widget
        self.tabs.addTab(page, name)
        action = QAction(name, self.menu)
        n = len(self.views) + 1
        if n <= 9:
            action.setShortcut(QKeySequence(f"Ctrl+{n}"))
        action.triggered.connect(lambda _=False, page=page: self.tabs.setCurrentWidget(page))
        self.menu.addAction(action)
        view = View(key, name, widget, page, action)
        self.views[key] = view
        return view

    def show(self, key: str) -> None:
        self.tabs.setCurrentWidget(self.views[key].page)

    def current(self) -> str | None:
        page = self.tabs.currentWidget()
        return next((k for k, v in self.views.items() if v.page is page), None)


def _scrolled(panel: QWidget) -> QScrollArea:
    area = QScrollArea()
    area.setWidget(panel)
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    return area
