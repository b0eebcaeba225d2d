"""The registry of the window's views: one call adds the tab, its View-menu entry and its
shortcut (Ctrl+1, Ctrl+2, ... in registration order)."""

from __future__ import annotations

from dataclasses import dataclass

from PySide6.QtCore import QEvent, QObject
from PySide6.QtGui import QAction, QKeySequence
from PySide6.QtWidgets import QMenu, QScrollArea, QTabWidget, QWidget

MAX_PAGE_MIN_WIDTH = 470  # views column of a 1024 px window beside the expert list and merge form


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
        self.insert_before: QAction | None = None  # views go above this menu entry (panel toggles)

    def register(self, key: str, name: str, widget: QWidget, *, scroll: bool = False) -> View:
        """Add a view; ``scroll``: the tab scrolls instead of imposing the panel's minimum
        size on the window."""
        if key in self.views:
            raise ValueError(f"a view {key!r} is already registered")
        # a panel wider than a small screen's views column scrolls instead of widening the window
        page = _scrolled(widget) if scroll or widget.minimumSizeHint().width() > MAX_PAGE_MIN_WIDTH else widget
        self.tabs.addTab(page, name)
        action = QAction(name, self.menu)
        n = len(self.views) + 1
        if n <= 9:
            action.setShortcut(QKeySequence(f"Ctrl+{n}"))
        action.triggered.connect(lambda _=False, page=page: self.tabs.setCurrentWidget(page))
        if self.insert_before is not None:
            self.menu.insertAction(self.insert_before, action)
        else:
            self.menu.addAction(action)
        view = View(key, name, widget, page, action)
        self.views[key] = view
        return view

    def show(self, key: str) -> None:
        self.tabs.setCurrentWidget(self.views[key].page)

    def current(self) -> str | None:
        page = self.tabs.currentWidget()
        return next((k for k, v in self.views.items() if v.page is page), None)


class FitScrollArea(QScrollArea):
    """A scroll area that gives its panel the space there is, and scrolls only below the
    panel's minimum size. (``widgetResizable`` sizes a panel with a word-wrapped label to
    its preferred height instead, which on a 768 px screen pushed buttons out of sight.)"""

    def __init__(self, panel: QWidget) -> None:
        super().__init__()
        self.setWidget(panel)
        self.setWidgetResizable(False)
        self.setFrameShape(QScrollArea.Shape.NoFrame)
        panel.installEventFilter(self)

    def fit(self) -> None:
        panel, room, least = self.widget(), self.viewport().size(), self.widget().minimumSizeHint()
        panel.resize(max(room.width(), least.width()), max(room.height(), least.height()))

    def resizeEvent(self, event: QEvent) -> None:  # type: ignore[override]
        super().resizeEvent(event)
        self.fit()

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if obj is self.widget() and event.type() == QEvent.Type.LayoutRequest:
            self.fit()
        return super().eventFilter(obj, event)


def _scrolled(panel: QWidget) -> QScrollArea:
    return FitScrollArea(panel)
