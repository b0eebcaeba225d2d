"""The History view: every merge of the session, and two of them compared side by side.

Renders a :class:`~pivotmerge_gui.session.history.MergeHistory` (Qt-free) and asks the
window, through signals, to show, save or bench a result. GUI thread only.

Top: the results (pinned ones marked [pinned], the one shown in the other views in bold) with
Show / Rename / Pin / Delete / Save. Below: A and B pickers, the report values of both
(rows that differ highlighted), the recipe diff (A -> B) and the captions both gave on the
test bench's pairs.
"""

from __future__ import annotations

import html
from typing import Any

from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QColor, QFont, QFontDatabase
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QTextEdit,
    QVBoxLayout,
    QWidget,
)

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.session.history import Comparison, MergeHistory, compare

DIFF_COLOR = QColor("#fff3c4")
RIGHT_COLOR = QColor("#d4edda")
PIN = "[pinned] "  # text, not an emoji: many Linux desktops lack a colour-emoji font


def diff_html(diff: str) -> str:
    """A unified diff as HTML: removed lines red, added lines green, hunk headers grey."""
    rows = []
    for line in diff.splitlines():
        style = ("color:#555555" if line.startswith(("---", "+++", "@@")) else
                 "background:#fde2e1;color:#8b0000" if line.startswith("-") else
                 "background:#dcf5dc;color:#0b5d1e" if line.startswith("+") else "")
        rows.append(f"<span style='{style}'>{html.escape(line)}</span>")
    return "<pre style='margin:0'>" + "\n".join(rows) + "</pre>"


class HistoryPanel(QWidget):
    """Merge history list + A/B comparison (see the module docstring)."""

    show_requested = Signal(int)  # uid: make it the session's result
    save_requested = Signal(int)
    test_requested = Signal(list)  # uids to run on the test bench
    message = Signal(str)

    def __init__(self, history: MergeHistory, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.history = history
        self.captions: dict[str, list[tuple[str, str]]] = {}  # result name -> (reference, caption) per pair
        self.comparison: Comparison | None = None

        self.list = QListWidget()
        self.list.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.list.setToolTip("Every merge of this session; double-click shows it in the other views")
        self.show_button = QPushButton("Show")
        self.show_button.setToolTip("Make this the merged result of the views, the test bench and Save")
        self.rename_button = QPushButton("Rename…")
        self.pin_button = QPushButton("Pin")
        self.pin_button.setToolTip(f"Pinned results are kept; unpinned ones beyond {history.cap} are dropped, "
                                   "oldest first")
        self.delete_button = QPushButton("Delete")
        self.save_button = QPushButton("Save…")
        self.cap_label = QLabel()
        self.cap_label.setWordWrap(True)
        buttons = QHBoxLayout()
        for b in (self.show_button, self.rename_button, self.pin_button, self.delete_button, self.save_button):
            buttons.addWidget(b)
        left = QVBoxLayout()
        left.setContentsMargins(0, 0, 0, 0)
        left.addWidget(QLabel("Merge results"))
        left.addWidget(self.list, 1)
        left.addLayout(buttons)
        left.addWidget(self.cap_label)
        left_w = QWidget()
        left_w.setLayout(left)

        # --- A/B
        self.a_combo, self.b_combo = QComboBox(), QComboBox()
        self.test_button = QPushButton("Run both on the bench")
        self.test_button.setToolTip("Caption the test bench's pairs with A and B (their captions appear below)")
        ab = QHBoxLayout()
        ab.addWidget(QLabel("A:"))
        ab.addWidget(self.a_combo, 1)
        ab.addWidget(QLabel("B:"))
        ab.addWidget(self.b_combo, 1)
        ab.addWidget(self.test_button)
        self.values = QTableWidget(0, 3)
        self.values.setHorizontalHeaderLabels(["", "A", "B"])
        self.values.verticalHeader().setVisible(False)
        self.values.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.values.setWordWrap(False)
        hh = self.values.horizontalHeader()
        hh.setSectionResizeMode(0, QHeaderView.ResizeMode.ResizeToContents)
        hh.setSectionResizeMode(1, QHeaderView.ResizeMode.Stretch)
        hh.setSectionResizeMode(2, QHeaderView.ResizeMode.Stretch)
        self.diff = QTextEdit()
        self.diff.setReadOnly(True)
        self.diff.setFont(QFontDatabase.systemFont(QFontDatabase.SystemFont.FixedFont))
        self.diff.setLineWrapMode(QTextEdit.LineWrapMode.NoWrap)
        self.caption_table = QTableWidget(0, 3)
        self.caption_table.setHorizontalHeaderLabels(["reference", "A", "B"])
        self.caption_table.verticalHeader().setVisible(False)
        self.caption_table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.caption_table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.details = QTabWidget()
        self.details.addTab(self.values, "Report values")
        self.details.addTab(self.diff, "Recipe diff")
        self.details.addTab(self.caption_table, "Captions")
        right = QVBoxLayout()
        right.setContentsMargins(0, 0, 0, 0)
        right.addWidget(QLabel("Compare two results"))
        right.addLayout(ab)
        right.addWidget(self.details, 1)
        right_w = QWidget()
        right_w.setLayout(right)

        split = QSplitter(Qt.Orientation.Vertical)  # the A/B table gets the view's full width
        split.addWidget(left_w)
        split.addWidget(right_w)
        split.setStretchFactor(0, 1)
        split.setStretchFactor(1, 3)
        split.setSizes([190, 520])
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(split)

        self.list.itemSelectionChanged.connect(self._update_buttons)
        self.list.itemDoubleClicked.connect(lambda _it: self._emit(self.show_requested))
        self.show_button.clicked.connect(lambda: self._emit(self.show_requested))
        self.save_button.clicked.connect(lambda: self._emit(self.save_requested))
        self.rename_button.clicked.connect(self._rename_dialog)
        self.pin_button.clicked.connect(self._toggle_pin)
        self.delete_button.clicked.connect(self._delete)
        self.a_combo.currentIndexChanged.connect(lambda _i: self.refresh_comparison())
        self.b_combo.currentIndexChanged.connect(lambda _i: self.refresh_comparison())
        self.test_button.clicked.connect(self._test_both)
        history.changed.connect(self.refresh)
        self.refresh()

    # ------------------------------------------------------------------ list
    def selected_uid(self) -> int | None:
        items = self.list.selectedItems()
        return int(items[0].data(Qt.ItemDataRole.UserRole)) if items else None

    def select(self, uid: int) -> None:
        for i in range(self.list.count()):
            if self.list.item(i).data(Qt.ItemDataRole.UserRole) == uid:
                self.list.setCurrentRow(i)

    def refresh(self) -> None:
        keep = self.selected_uid()
        self.list.blockSignals(True)
        self.list.clear()
        for e in reversed(self.history.entries):  # newest first
            it = QListWidgetItem(f"{PIN if e.pinned else ''}{e.name}\n    {e.summary()}")
            it.setData(Qt.ItemDataRole.UserRole, e.uid)
            it.setToolTip(f"{e.name}\n{e.summary()}\nfrom a {e.origin}")
            if e.uid == self.history.current:
                f = QFont(it.font())
                f.setBold(True)
                it.setFont(f)
            self.list.addItem(it)
        self.list.blockSignals(False)
        if keep is not None and self.history.find(keep) is not None:
            self.select(keep)
        elif self.history.current is not None:
            self.select(self.history.current)
        n, pinned = len(self.history), sum(e.pinned for e in self.history.entries)
        self.cap_label.setText(f"{n} result(s), {pinned} pinned. Unpinned results beyond {self.history.cap} "
                               "are dropped, oldest first." if n else
                               "Every merge appears here. Merge, or open a cell of a sweep.")
        self._fill_combos()
        self._update_buttons()

    def _update_buttons(self) -> None:
        uid = self.selected_uid()
        e = self.history.find(uid)
        for b in (self.show_button, self.rename_button, self.pin_button, self.delete_button, self.save_button):
            b.setEnabled(e is not None)
        self.pin_button.setText("Unpin" if e is not None and e.pinned else "Pin")

    def _emit(self, signal: Any) -> None:
        uid = self.selected_uid()
        if uid is not None:
            signal.emit(uid)

    def rename(self, uid: int, name: str) -> bool:
        try:
            self.history.rename(uid, name)
        except PivotMergeError as exc:
            self.message.emit(f"Cannot rename: {exc}")
            return False
        return True

    def _rename_dialog(self) -> None:
        uid = self.selected_uid()
        e = self.history.find(uid)
        if e is None:
            return
        text, ok = QInputDialog.getText(self, "Rename result", "Name:", text=e.name)
        if ok:
            self.rename(e.uid, text)

    def _toggle_pin(self) -> None:
        e = self.history.find(self.selected_uid())
        if e is not None:
            self.history.set_pinned(e.uid, not e.pinned)

    def _delete(self) -> None:
        uid = self.selected_uid()
        if uid is not None:
            self.history.delete(uid)

    # ------------------------------------------------------------------ A/B
    def _fill_combos(self) -> None:
        entries = self.history.entries
        for combo, default in ((self.a_combo, -2), (self.b_combo, -1)):
            old = combo.currentData()
            combo.blockSignals(True)
            combo.clear()
            for e in entries:
                combo.addItem(e.name, e.uid)
            idx = combo.findData(old) if old is not None else -1
            if idx < 0 and entries:
                idx = max(0, len(entries) + default)
            combo.setCurrentIndex(idx)
            combo.blockSignals(False)
        self.test_button.setEnabled(len(entries) >= 1)
        self.refresh_comparison()

    def set_pair(self, a_uid: int, b_uid: int) -> None:
        self.a_combo.setCurrentIndex(self.a_combo.findData(a_uid))
        self.b_combo.setCurrentIndex(self.b_combo.findData(b_uid))
        self.refresh_comparison()

    def refresh_comparison(self) -> None:
        a, b = self.history.find(self.a_combo.currentData()), self.history.find(self.b_combo.currentData())
        if a is None or b is None:
            self.comparison = None
            self.values.setRowCount(0)
            self.diff.setPlainText("Two results are needed for a comparison: merge twice, or open sweep cells.")
            self.caption_table.setRowCount(0)
            return
        c = self.comparison = compare(a, b)
        self.values.setHorizontalHeaderLabels(["", f"A: {a.name}", f"B: {b.name}"])
        self.values.setRowCount(len(c.rows))
        for i, (label, va, vb) in enumerate(c.rows):
            cells = [QTableWidgetItem(label), QTableWidgetItem(va), QTableWidgetItem(vb)]
            for j, it in enumerate(cells):
                it.setToolTip(it.text())
                if va != vb:
                    it.setBackground(DIFF_COLOR)
                self.values.setItem(i, j, it)
        self.diff.setHtml(diff_html(c.recipe_diff) if c.recipe_diff else "The two recipes are identical.")
        self._fill_captions(a.name, b.name)

    def set_captions(self, name: str, rows: list[tuple[str, str]]) -> None:
        """Captions a result gave on the bench's pairs, in pair order (from the bench)."""
        self.captions[name] = list(rows)
        self.refresh_comparison()

    def _fill_captions(self, a: str, b: str) -> None:
        ra, rb = self.captions.get(a, []), self.captions.get(b, [])
        n = max(len(ra), len(rb))
        self.caption_table.setHorizontalHeaderLabels(["reference", f"A: {a}", f"B: {b}"])
        self.caption_table.setRowCount(n)
        for i in range(n):
            ref = (ra[i] if i < len(ra) else rb[i])[0]
            ca = ra[i][1] if i < len(ra) else "(not run on the bench)"
            cb = rb[i][1] if i < len(rb) else "(not run on the bench)"
            for j, text in enumerate((ref, ca, cb)):
                it = QTableWidgetItem(text)
                it.setToolTip(html.escape(text))
                if j > 0 and text.split() == ref.split():
                    it.setBackground(RIGHT_COLOR)  # the reference caption exactly
                elif j > 0 and ca != cb:
                    it.setBackground(DIFF_COLOR)
                self.caption_table.setItem(i, j, it)
        self.details.setTabText(2, f"Captions ({n})" if n else "Captions")

    def _test_both(self) -> None:
        uids = [u for u in {self.a_combo.currentData(), self.b_combo.currentData()} if u is not None]
        if uids:
            self.test_requested.emit(sorted(uids))
