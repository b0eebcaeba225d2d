"""The Sweep view: one or two merge settings over a grid, scored on the test bench's pairs.

The form picks the X (and optional Y) setting: a parameter of the chosen method, the
method itself, or one layer's coefficient, and its values (comma-separated). The grid
fills in as cells finish, coloured by score (best cell starred); clicking a cell opens
that merge (it joins the History). The work itself (:func:`pivotmerge_gui.core.sweep.run_sweep`)
runs in the window's "sweep" job; this panel is the form and the heat map. GUI thread.
"""

from __future__ import annotations

import html
import math
from typing import Any

import yaml
from PySide6.QtCore import Qt, Signal
from PySide6.QtGui import QBrush, QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from pivotmerge_gui.core.sweep import LAYER_PREFIX, SCORE_METRICS, SweepCell, axis_label, best_cell

METRIC_TEXT = {"token_accuracy": "token accuracy (higher is better)", "nll": "caption NLL (lower is better)",
               "retrieval": "retrieval accuracy (higher is better)"}
LOW, HIGH = QColor("#f4cccc"), QColor("#2e8b57")  # worst .. best cell


def parse_values(text: str) -> list[Any]:
    """``"0.5, 1, ties"`` -> ``[0.5, 1, "ties"]`` (YAML scalars: numbers, true/false, names)."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            v = yaml.safe_load(part)
        except yaml.YAMLError:
            v = part
        out.append(v if isinstance(v, (int, float, bool, str)) else part)
    return out


def blend(t: float) -> QColor:
    t = max(0.0, min(1.0, t))
    return QColor(*(round(a + (b - a) * t) for a, b in zip(LOW.getRgb()[:3], HIGH.getRgb()[:3])))


class SweepPanel(QWidget):
    """Sweep form + score heat map (see the module docstring)."""

    run_requested = Signal()
    cancel_requested = Signal()
    cell_opened = Signal(object)  # SweepCell
    save_best_requested = Signal(object)  # SweepCell
    export_requested = Signal()  # save the sweep as a YAML document (for ``pivotmerge sweep``)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.cells: dict[tuple[int, int], SweepCell] = {}
        self.x_values: list[Any] = []
        self.y_values: list[Any] = []
        self.higher_is_better = True
        self.running = False
        self._had_params = False

        self.x_param, self.y_param = QComboBox(), QComboBox()
        for c in (self.x_param, self.y_param):
            c.setMinimumContentsLength(18)
            c.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.x_values_edit, self.y_values_edit = QLineEdit(), QLineEdit()
        self.x_values_edit.setPlaceholderText("values, e.g. 0.5, 1, 1.5")
        self.y_values_edit.setPlaceholderText("values (leave empty for one row)")
        self.metric = QComboBox()
        for k in SCORE_METRICS:
            self.metric.addItem(METRIC_TEXT[k], k)
        self.run_button = QPushButton("Run sweep")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.open_best_button = QPushButton("Open best")
        self.save_best_button = QPushButton("Save best…")
        for b in (self.open_best_button, self.save_best_button):
            b.setEnabled(False)
        self.export_button = QPushButton("Save as YAML…")
        self.export_button.setToolTip("The sweep as a document that `pivotmerge sweep` runs the same way")
        form = QGridLayout()
        form.addWidget(QLabel("X:"), 0, 0)
        form.addWidget(self.x_param, 0, 1)
        form.addWidget(self.x_values_edit, 0, 2)
        form.addWidget(QLabel("Y:"), 1, 0)
        form.addWidget(self.y_param, 1, 1)
        form.addWidget(self.y_values_edit, 1, 2)
        form.addWidget(QLabel("Score:"), 2, 0)
        form.addWidget(self.metric, 2, 1)
        form.setColumnStretch(2, 1)
        buttons = QHBoxLayout()
        for b in (self.run_button, self.cancel_button, self.open_best_button, self.save_best_button):
            buttons.addWidget(b)
        buttons.addStretch(1)
        buttons.addWidget(self.export_button)

        self.table = QTableWidget(0, 0)
        self.table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.verticalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.table.setToolTip("Click a cell to open that merge (it joins the History)")
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(10)
        self.status = QLabel("Pick one or two settings and their values; each cell is merged and scored on "
                             "the Test bench's pairs.")
        self.status.setWordWrap(True)
        self.best_label = QLabel("")
        self.best_label.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.best_label)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)

        self.run_button.clicked.connect(self.run_requested.emit)
        self.cancel_button.clicked.connect(self.cancel_requested.emit)
        self.export_button.clicked.connect(self.export_requested.emit)
        self.table.cellClicked.connect(self._clicked)
        self.open_best_button.clicked.connect(lambda: self._best_signal(self.cell_opened))
        self.save_best_button.clicked.connect(lambda: self._best_signal(self.save_best_requested))
        self.y_param.currentIndexChanged.connect(lambda _i: self.y_values_edit.setEnabled(bool(self.y_param.currentData())))
        self.set_choices([], [])

    # ------------------------------------------------------------------ form
    def set_choices(self, params: list[Any], layers: list[str]) -> None:
        """What can vary: the method's parameters (``Param``), the method, each layer."""
        keep = self._had_params  # a choice made among no parameters (engine loading) is no choice
        self._had_params = bool(params)
        for combo, none in ((self.x_param, False), (self.y_param, True)):
            old = combo.currentData() if keep else None
            combo.blockSignals(True)
            combo.clear()
            if none:
                combo.addItem("(none: one row)", "")
            for p in params:
                rng = f" [{p.min:g}..{p.max:g}]" if p.min is not None and p.max is not None else ""
                combo.addItem(f"{p.name}{rng}", p.name)
                combo.setItemData(combo.count() - 1, p.help, Qt.ItemDataRole.ToolTipRole)
            combo.addItem("method", "method")
            for name in layers:
                combo.addItem(f"layer {name} coefficient", f"{LAYER_PREFIX}{name}")
            i = combo.findData(old)
            if i < 0 and not none:
                i = next((k for k, p in enumerate(params) if p.is_scale), 0)
            combo.setCurrentIndex(max(i, 0))
            combo.blockSignals(False)
        self.y_values_edit.setEnabled(bool(self.y_param.currentData()))

    def set_axis(self, which: str, param: str, values: str) -> None:
        combo, edit = (self.x_param, self.x_values_edit) if which == "x" else (self.y_param, self.y_values_edit)
        combo.setCurrentIndex(combo.findData(param))
        edit.setText(values)

    def document(self, recipe: Any) -> dict[str, Any]:
        """The sweep document of the form around ``recipe`` (for ``SweepSpec.from_dict``)."""
        doc: dict[str, Any] = {"recipe": recipe.to_dict(),
                               "x": {"param": self.x_param.currentData() or "",
                                     "values": parse_values(self.x_values_edit.text())},
                               "score": {"metric": str(self.metric.currentData())}}
        if self.y_param.currentData():
            doc["y"] = {"param": self.y_param.currentData(), "values": parse_values(self.y_values_edit.text())}
        return doc

    def set_running(self, running: bool) -> None:
        self.running = running
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        for w in (self.x_param, self.y_param, self.x_values_edit, self.y_values_edit, self.metric):
            w.setEnabled(not running)
        if not running:
            self.y_values_edit.setEnabled(bool(self.y_param.currentData()))
        self._update_best()

    def show_status(self, text: str, error: bool = False) -> None:
        self.status.setText(f"<span style='color:#b00020'>{html.escape(text)}</span>" if error else html.escape(text))

    # ------------------------------------------------------------------ grid
    def start_grid(self, spec: Any) -> None:
        self.cells.clear()
        self.x_values = list(spec.x.values)
        self.y_values = list(spec.y.values) if spec.y else []
        self.higher_is_better = spec.score.higher_is_better
        rows, cols = spec.shape
        self.table.clear()
        self.table.setRowCount(rows)
        self.table.setColumnCount(cols)
        self.table.setHorizontalHeaderLabels([f"{axis_label(spec.x.param)} = {v}" for v in self.x_values])
        self.table.setVerticalHeaderLabels([f"{axis_label(spec.y.param)} = {v}" for v in self.y_values]
                                           if spec.y else [spec.score.metric])
        self.progress.setValue(0)
        self.best_label.setText("")

    def add_cell(self, cell: SweepCell, fraction: float | None = None) -> None:
        self.cells[(cell.row, cell.col)] = cell
        if fraction is not None:
            self.progress.setValue(int(1000 * max(0.0, min(1.0, fraction))))
        self._paint()

    def best(self) -> SweepCell | None:
        return best_cell(list(self.cells.values()), self.higher_is_better)

    def _paint(self) -> None:
        scores = [c.score for c in self.cells.values() if c.score is not None and math.isfinite(c.score)]
        lo, hi = (min(scores), max(scores)) if scores else (0.0, 1.0)
        best = self.best()
        for (r, c), cell in self.cells.items():
            if cell.score is None:
                it = QTableWidgetItem("failed")
                it.setToolTip(cell.error or "")
                it.setBackground(QBrush(QColor("#dddddd")))
            else:
                t = (cell.score - lo) / (hi - lo) if hi > lo else 1.0
                t = t if self.higher_is_better else 1.0 - t
                star = " \N{BLACK STAR}" if cell is best else ""
                it = QTableWidgetItem(f"{cell.score:.4f}{star}")
                it.setToolTip(f"{cell.label}: {cell.score:.4f} (merge + score {cell.elapsed_s:.1f} s); click to open")
                color = blend(t)
                it.setBackground(QBrush(color))
                it.setForeground(QBrush(QColor("white" if color.lightness() < 100 else "black")))
                if cell is best:
                    f = it.font()
                    f.setBold(True)
                    it.setFont(f)
            it.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
            self.table.setItem(r, c, it)
        self._update_best()

    def _update_best(self) -> None:
        b = self.best()
        ok = b is not None and not self.running
        self.open_best_button.setEnabled(ok)
        self.save_best_button.setEnabled(ok)
        self.best_label.setText(f"Best so far: {b.label} = {b.score:.4f}" if b is not None else "")

    def _clicked(self, row: int, col: int) -> None:
        cell = self.cells.get((row, col))
        if cell is not None:
            self.cell_opened.emit(cell)

    def _best_signal(self, signal: Any) -> None:
        b = self.best()
        if b is not None:
            signal.emit(b)
