"""The expert list: drop zone, add/remove/reorder/rename, pivot mark, weights, base slot."""

from __future__ import annotations

from PySide6.QtCore import QItemSelectionModel, Qt, Signal
from PySide6.QtGui import QAction, QDragEnterEvent, QDropEvent, QKeySequence, QShortcut
from PySide6.QtWidgets import (
    QAbstractItemView,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QPlainTextEdit,
    QSplitter,
    QTableView,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from pivotmerge_gui.core.io.discovery import CHECKPOINT_SUFFIXES
from pivotmerge_gui.session import ExpertEntry

from ..item_models import ExpertListModel, human_size, paths_from_mime

FILE_FILTER = ("Projector checkpoints (" + " ".join(f"*{s}" for s in CHECKPOINT_SUFFIXES)
               + " *.json);;All files (*)")


class ExpertTableView(QTableView):
    """Table of experts accepting file drops, with rows reordered by dragging. GUI thread."""

    rows_moved = Signal(list)  # new rows of the experts moved by a drag

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAcceptDrops(True)
        self.setDragEnabled(True)
        self.setDragDropMode(QAbstractItemView.DragDropMode.DragDrop)
        self.setDefaultDropAction(Qt.DropAction.MoveAction)
        self.setDragDropOverwriteMode(False)
        self.setDropIndicatorShown(True)
        self.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.setSelectionMode(QAbstractItemView.SelectionMode.ExtendedSelection)
        self.setEditTriggers(QAbstractItemView.EditTrigger.DoubleClicked
                             | QAbstractItemView.EditTrigger.EditKeyPressed
                             | QAbstractItemView.EditTrigger.SelectedClicked)
        self.setAlternatingRowColors(True)
        self.verticalHeader().setVisible(False)
        self.setWordWrap(False)

    def _internal_rows(self, event) -> list[int]:  # type: ignore[no-untyped-def]
        model = self.model()
        return model.dragged_rows(event.mimeData()) if isinstance(model, ExpertListModel) else []

    def drop_row(self, pos) -> int:  # type: ignore[no-untyped-def]
        """The row a drop at viewport position ``pos`` inserts before (row count: the end)."""
        idx = self.indexAt(pos)
        if not idx.isValid():
            return self.model().rowCount()
        rect = self.visualRect(idx)
        return idx.row() + (1 if pos.y() > rect.center().y() else 0)

    # Drops anywhere on the view (also below the last row) go to the model.
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if paths_from_mime(event.mimeData()) or self._internal_rows(event):
            event.acceptProposedAction()
        else:
            super().dragEnterEvent(event)

    def dragMoveEvent(self, event) -> None:  # type: ignore[no-untyped-def]
        if paths_from_mime(event.mimeData()) or self._internal_rows(event):
            super().dragMoveEvent(event)  # draws the drop indicator
            event.acceptProposedAction()
        else:
            super().dragMoveEvent(event)

    def dropEvent(self, event: QDropEvent) -> None:
        model = self.model()
        rows = self._internal_rows(event)
        if isinstance(model, ExpertListModel) and rows:
            new_rows = model.move_rows_to(rows, self.drop_row(event.position().toPoint()))
            # the model moved the rows itself: report a copy so the drag source does not
            # also try to remove them
            event.setDropAction(Qt.DropAction.CopyAction)
            event.accept()
            self.stopAutoScroll()
            self.setState(QAbstractItemView.State.NoState)
            self.viewport().update()
            self.rows_moved.emit(new_rows)
        elif isinstance(model, ExpertListModel) and paths_from_mime(event.mimeData()):
            model.dropMimeData(event.mimeData(), Qt.DropAction.CopyAction, -1, -1, self.rootIndex())
            event.acceptProposedAction()
        else:
            super().dropEvent(event)


class ModelListPanel(QWidget):
    """Experts, base slot and details pane. Runs on the GUI thread.

    Emits requests (``paths_added``, ``hub_requested``, ``base_chosen``, ``base_cleared``,
    ``recent_chosen``); the main window owns loading.
    """

    paths_added = Signal(list)
    hub_requested = Signal()
    base_chosen = Signal(str)
    base_cleared = Signal()
    remove_requested = Signal(list)  # rows; the window asks before it discards a merge

    def __init__(self, model: ExpertListModel, settings, parent: QWidget | None = None) -> None:  # type: ignore[no-untyped-def]
        super().__init__(parent)
        self.model = model
        self.settings = settings
        self.base_entry: ExpertEntry | None = None

        title = QLabel("<b>Experts</b> — drop checkpoints here, drag rows to reorder")
        title.setWordWrap(True)
        self.view = ExpertTableView()
        self.view.setModel(model)
        self.view.rows_moved.connect(self._select_rows)
        hh = self.view.horizontalHeader()
        hh.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(ExpertListModel.NAME, QHeaderView.ResizeMode.Interactive)
        hh.setStretchLastSection(True)
        self.view.setColumnWidth(ExpertListModel.NAME, 110)
        self.view.setToolTip("Drop checkpoint files or folders here; drag rows to reorder. "
                             "Double-click a name or weight to edit it; tick Pivot to choose "
                             "the frame of reference.")

        bar = QHBoxLayout()
        bar.setSpacing(4)
        self.add_button = self._tool("Add…", "Add checkpoint files", self._add_files)
        add_menu = QMenu(self.add_button)
        add_menu.addAction("Files…", self._add_files)
        add_menu.addAction("Folder…", self._add_folder)
        add_menu.addAction("From Hub…", self.hub_requested.emit)
        self.recent_menu = add_menu.addMenu("Recent")
        self.recent_menu.aboutToShow.connect(self._fill_recent)
        self.add_button.setMenu(add_menu)
        self.add_button.setPopupMode(QToolButton.ToolButtonPopupMode.MenuButtonPopup)
        self.remove_button = self._tool("Remove", "Remove the selected experts (Delete; Ctrl+Z brings "
                                        "them back)", self.remove_selected)
        delete = QShortcut(QKeySequence(QKeySequence.StandardKey.Delete), self.view, self.remove_selected,
                           context=Qt.ShortcutContext.WidgetShortcut)
        self._delete_shortcut = delete
        self.up_button = self._tool("▲", "Move the selected expert up", lambda: self._move(-1))
        self.down_button = self._tool("▼", "Move the selected expert down", lambda: self._move(1))
        for b in (self.add_button, self.remove_button, self.up_button, self.down_button):
            bar.addWidget(b)
        bar.addStretch(1)

        base_row = QHBoxLayout()
        self.base_label = QLabel()
        self.base_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.base_label.setWordWrap(True)
        self.base_set = self._tool("Set base…", "Optional shared init (base) checkpoint; "
                                   "task-vector methods need it", self._choose_base)
        self.base_clear = self._tool("Clear", "Remove the base checkpoint", self.base_cleared.emit)
        base_row.addWidget(self.base_label, 1)
        base_row.addWidget(self.base_set)
        base_row.addWidget(self.base_clear)

        self.details = QPlainTextEdit()
        self.details.setReadOnly(True)
        self.details.setPlaceholderText("Select an expert to see its details and any problem.")

        top = QWidget()
        tl = QVBoxLayout(top)
        tl.setContentsMargins(0, 0, 0, 0)
        tl.addWidget(title)
        tl.addLayout(bar)
        tl.addWidget(self.view, 1)
        tl.addLayout(base_row)
        splitter = QSplitter(Qt.Orientation.Vertical)
        splitter.addWidget(top)
        splitter.addWidget(self.details)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 1)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(splitter)

        # drops on the rest of the panel propagate to the main window, which adds them
        model.paths_dropped.connect(self.paths_added.emit)
        self.view.selectionModel().selectionChanged.connect(self.update_details)
        model.dataChanged.connect(self.update_details)
        model.rowsRemoved.connect(self.update_details)
        self.set_base(None)
        self.update_details()

    def _tool(self, text: str, tip: str, slot) -> QToolButton:  # type: ignore[no-untyped-def]
        b = QToolButton()
        b.setText(text)
        b.setToolTip(tip)
        b.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextOnly)
        b.clicked.connect(slot)
        return b

    # ------------------------------------------------------------------ actions
    def _add_files(self) -> None:
        files, _ = QFileDialog.getOpenFileNames(self, "Add expert projectors", self.settings.last_dir(),
                                                FILE_FILTER)
        if files:
            self.settings.set_last_dir(files[0])
            self.paths_added.emit(files)

    def _add_folder(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Add a checkpoint folder or a folder of experts",
                                                  self.settings.last_dir())
        if folder:
            self.settings.set_last_dir(folder)
            self.paths_added.emit([folder])

    def _choose_base(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Choose the base (shared init) checkpoint",
                                           self.settings.last_dir(), FILE_FILTER)
        if f:
            self.settings.set_last_dir(f)
            self.base_chosen.emit(f)

    def _fill_recent(self) -> None:
        self.recent_menu.clear()
        recent = self.settings.recent_files()
        for spec in recent:
            act = QAction(spec, self.recent_menu)
            act.triggered.connect(lambda _=False, s=spec: self.paths_added.emit([s]))
            self.recent_menu.addAction(act)
        if not recent:
            a = self.recent_menu.addAction("(none yet)")
            a.setEnabled(False)
        else:
            self.recent_menu.addSeparator()
            self.recent_menu.addAction("Clear recent", self.settings.clear_recent)

    def selected_rows(self) -> list[int]:
        return sorted({i.row() for i in self.view.selectionModel().selectedRows()})

    def remove_selected(self) -> None:
        rows = self.selected_rows()
        if rows:
            self.remove_requested.emit(rows)

    def _select_rows(self, rows: list[int]) -> None:
        sel = self.view.selectionModel()
        sel.clearSelection()
        for r in rows:
            sel.select(self.model.index(r, 0),
                       QItemSelectionModel.SelectionFlag.Select | QItemSelectionModel.SelectionFlag.Rows)

    def _move(self, delta: int) -> None:
        rows = self.selected_rows()
        if len(rows) != 1:
            return
        new = self.model.move(rows[0], delta)
        self.view.selectionModel().select(
            self.model.index(new, 0),
            QItemSelectionModel.SelectionFlag.ClearAndSelect | QItemSelectionModel.SelectionFlag.Rows)

    # ------------------------------------------------------------------ base + details
    def set_base(self, entry: ExpertEntry | None) -> None:
        self.base_entry = entry
        self.base_clear.setEnabled(entry is not None)
        if entry is None:
            self.base_label.setText("<b>Base</b>: none (optional shared init)")
            self.base_label.setToolTip("")
            return
        state = {"loading": "loading…", "ready": entry.shapes, "error": "⚠ " + entry.message}[entry.status]
        self.base_label.setText(f"<b>Base</b>: {entry.name} — {state}")
        self.base_label.setToolTip(entry.spec if entry.status != "error" else entry.message)

    def update_details(self, *args: object) -> None:
        rows = self.selected_rows()
        if len(rows) != 1:
            errors = [e for e in self.model.entries if e.status == "error"]
            if errors:
                self.details.setPlainText("Problems:\n" + "\n".join(f"• {e.name}: {e.message}" for e in errors))
            else:
                self.details.setPlainText("")
            return
        e = self.model.entry(rows[0])
        lines = [f"Name:    {e.name}", f"Source:  {e.spec}", f"Status:  {e.status}"]
        if e.status == "error":
            lines.append(f"Problem: {e.message}")
        else:
            lines += [f"Family:  {e.family}", f"Shapes:  {e.shapes}", f"Dtype:   {e.dtype}",
                      f"Size:    {human_size(e.size_bytes)}", f"SHA-256: {e.short_hash}…" if e.short_hash else "SHA-256: -",
                      f"Weight:  {e.weight:g}"]
            if e.message:
                lines.append(f"Note:    {e.message}")
            extras = getattr(e.projector, "extras", None) or {}
            if extras:
                # imported here: torch is loaded once a projector is, not at window start
                from pivotmerge_gui.core.io.extras import describe_extras

                lines.append("Carried: other tensors of the adapter file, kept in merges:")
                lines += [f"         {line}" for line in describe_extras(extras)]
        if e.details:
            lines += ["", e.details]
        self.details.setPlainText("\n".join(lines))
