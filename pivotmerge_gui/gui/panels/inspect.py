"""Inspect views: Layers table with colour bars, Spectra plots, Similarity heatmaps.

The panels draw plain data (lists of dicts, numpy arrays) that :mod:`..analysis_view`
extracts from the core's ``Analysis``; no tensor math happens here.
"""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import numpy as np
import pyqtgraph as pg
from PySide6.QtCore import QModelIndex, QPersistentModelIndex, QRectF, Qt
from PySide6.QtGui import QColor, QPainter
from PySide6.QtWidgets import (
    QAbstractItemView,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QMenu,
    QPushButton,
    QStackedLayout,
    QStyledItemDelegate,
    QStyleOptionViewItem,
    QTableView,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from ..item_models import LayerTableModel
from .analysis_view import AnalysisView, Curve, view_of, with_layer_scores

pg.setConfigOptions(antialias=True, background="w", foreground="k")

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f", "#bcbd22", "#17becf"]
MERGED_COLOR = "#000000"
BAR_COLOR = QColor(158, 202, 225, 200)  # one pale hue: bar length alone carries the value


def _placeholder(text: str) -> QLabel:
    lab = QLabel(text)
    lab.setAlignment(Qt.AlignmentFlag.AlignCenter)
    lab.setWordWrap(True)
    lab.setStyleSheet("color: #666; font-size: 13px; padding: 20px;")
    return lab


class _StackedPanel(QWidget):
    """A view with a message page shown until there is data. GUI thread."""

    EMPTY = "Drop two or more expert projectors on the list to see this view."

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._stack = QStackedLayout(self)
        self.message = _placeholder(self.EMPTY)
        self._stack.addWidget(self.message)
        self.content = QWidget()
        self._stack.addWidget(self.content)
        self.view: AnalysisView | None = None

    def show_message(self, text: str) -> None:
        self.message.setText(text)
        self._stack.setCurrentWidget(self.message)

    def show_content(self) -> None:
        self._stack.setCurrentWidget(self.content)

    def set_analysis(self, analysis: Any, problem: str = "") -> None:
        if analysis is None:
            self.view = None
            self.show_message(f"Analysis failed: {problem}" if problem else self.EMPTY)
            return
        self.set_view(view_of(analysis))

    def set_view(self, view: AnalysisView) -> None:
        raise NotImplementedError


# ----------------------------------------------------------------------------- layers
class ColorBarDelegate(QStyledItemDelegate):
    """Paints a pale bar behind numeric cells, proportional to the value in its column."""

    def paint(self, painter: QPainter, option: QStyleOptionViewItem,
              index: QModelIndex | QPersistentModelIndex) -> None:
        frac = index.data(LayerTableModel.BAR_ROLE)
        if isinstance(frac, float):
            r = option.rect.adjusted(2, 3, -2, -3)
            w = int(r.width() * max(0.0, min(1.0, frac)))
            color = BAR_COLOR
            painter.save()
            painter.fillRect(QRectF(r.x(), r.y(), w, r.height()), color)
            painter.restore()
        super().paint(painter, option, index)


class LayersPanel(_StackedPanel):
    """Per-layer table (shapes, norms, ranks, shared energy, conflicts, alignment). GUI thread."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.model = LayerTableModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setItemDelegate(ColorBarDelegate(self.table))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.setAlternatingRowColors(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.table.verticalHeader().setVisible(False)
        self.caption = QLabel()
        self.caption.setWordWrap(True)
        self.caption.setStyleSheet("color: #444;")
        self.export_button = QPushButton("Export CSV…")
        self.export_button.clicked.connect(self._export)
        top = QHBoxLayout()
        top.addWidget(self.caption, 1)
        top.addWidget(self.export_button)
        lay = QVBoxLayout(self.content)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(top)
        lay.addWidget(self.table, 1)

    layer_scores: Any = None  # data-driven scores from the test bench (LayerAlignmentScores)
    frame_note = ""  # which expert the hidden units are aligned to, and why (set by the window)

    def set_view(self, view: AnalysisView) -> None:
        self.view = view
        self._fill()
        self.caption.setText(view.summary + self.frame_note)
        self.show_content()

    def set_layer_scores(self, scores: Any) -> None:
        self.layer_scores = scores
        if self.view is not None:
            self._fill()

    def _fill(self) -> None:
        assert self.view is not None
        rows, help_ = with_layer_scores(self.view.layer_rows, self.view.column_help, self.layer_scores)
        self.model.set_rows(rows, help_)

    def export_csv(self, path: str | Path) -> None:
        write_csv(path, self.model.columns, [[r.get(c, "") for c in self.model.columns] for r in self.model.rows])

    def _export(self) -> None:
        f, _ = QFileDialog.getSaveFileName(self, "Export layer table", "layers.csv", "CSV (*.csv)")
        if f:
            self.export_csv(f)


def write_csv(path: str | Path, header: list[str], rows: list[list[Any]]) -> None:
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


# ----------------------------------------------------------------------------- spectra
class LogAxis(pg.AxisItem):
    """A y axis that labels log plots in plain numbers at 1, 2 and 5 per decade (pyqtgraph
    labels decades only, so a spectrum between 1 and 10 had no label above 1)."""

    def logTickValues(self, minVal: float, maxVal: float, size: float, stdTicks: Any) -> list[Any]:
        return log_ticks(minVal, maxVal)

    def logTickStrings(self, values: list[float], scale: float, spacing: float) -> list[str]:
        return [f"{10 ** v * scale:g}" for v in values]


def log_ticks(lo: float, hi: float) -> list[tuple[float | None, list[float]]]:
    """Tick levels for a log axis spanning 10**lo .. 10**hi: decades, plus 2 and 5 times a
    decade when the span is under 4 decades (and 3 when under one)."""
    if not (np.isfinite(lo) and np.isfinite(hi)) or hi <= lo:
        return []
    span = hi - lo
    decades = range(int(np.floor(lo)), int(np.ceil(hi)) + 1)
    majors = [float(d) for d in decades if lo <= d <= hi]
    mults = (2, 3, 5) if span < 1 else (2, 5) if span < 4 else ()
    minors = [d + float(np.log10(m)) for d in decades for m in mults if lo <= d + np.log10(m) <= hi]
    return [(1.0, majors), (None, minors)]


class SpectraPanel(_StackedPanel):
    """Singular-value spectra per layer, experts and the merged result overlaid. GUI thread.

    Modes: raw singular values, normalised (sigma / sigma_1) and cumulative energy
    (sum sigma_i^2 / total). The shared rank chosen by the analysis is a dashed line.
    """

    MODES = (("σ", "raw"), ("σ / σ₁", "normalised"), ("cumulative energy", "cumulative"))

    def __init__(self, settings: Any = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.settings = settings
        self.layer_combo = QComboBox()
        self.layer_combo.setMinimumContentsLength(4)
        self.layer_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.mode_combo = QComboBox()
        for label, key in self.MODES:
            self.mode_combo.addItem(label, key)
        self.mode_combo.setToolTip("Singular values σᵢ, normalised σᵢ/σ₁, or the cumulative share "
                                   "of the energy ‖W‖² held by the top i directions")
        self.mode_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.mode_combo.setMinimumContentsLength(6)
        self.source_combo = QComboBox()
        self.source_combo.setSizeAdjustPolicy(QComboBox.SizeAdjustPolicy.AdjustToMinimumContentsLengthWithIcon)
        self.source_combo.setMinimumContentsLength(6)
        self.source_combo.setToolTip("Spectra of the experts' weights, or of their task vectors "
                                     "(updates relative to the base / the experts' mean)")
        self.log_check = QCheckBox("Log")
        self.log_check.setToolTip("Logarithmic y axis")
        self.log_check.setChecked(True)
        self.export_button = QToolButton()
        self.export_button.setText("Export")
        self.export_button.setPopupMode(QToolButton.ToolButtonPopupMode.InstantPopup)
        export_menu = QMenu(self.export_button)
        export_menu.addAction("Plot as PNG…", self._export_png_dialog)
        export_menu.addAction("Curves as CSV…", self._export_csv_dialog)
        self.export_button.setMenu(export_menu)
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Layer"))
        bar.addWidget(self.layer_combo)
        bar.addWidget(self.source_combo)
        bar.addWidget(self.mode_combo)
        bar.addWidget(self.log_check)
        bar.addStretch(1)
        self.pending = QLabel("")  # "computing the merged curve…" while the analysis reruns
        self.pending.setStyleSheet("color: #8a5a00;")
        bar.addWidget(self.pending)
        bar.addWidget(self.export_button)
        self.plot = pg.PlotWidget(axisItems={"left": LogAxis("left")})
        self.plot.showGrid(x=True, y=True, alpha=0.25)
        self.plot.setLabel("bottom", "index i (singular direction)")
        self.legend = self.plot.addLegend(offset=(-10, 10))
        self.readout = QLabel(" ")
        self.readout.setStyleSheet("font-family: monospace;")
        self.readout.setWordWrap(True)
        lay = QVBoxLayout(self.content)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(bar)
        lay.addWidget(self.plot, 1)
        lay.addWidget(self.readout)
        self._curves: dict[str, np.ndarray] = {}
        self._shared_line: pg.InfiniteLine | None = None
        self._hover: int | None = None  # the singular index under the mouse, for the read-out
        self.colors: dict[str, str] = {}  # curve name -> colour (each expert keeps its own)
        self.extra: dict[str, dict[str, dict[str, Any]]] = {}  # source -> layer -> name -> Curve (history)
        self.layer_combo.currentIndexChanged.connect(self.redraw)
        self.source_combo.currentIndexChanged.connect(self.redraw)
        self.mode_combo.currentIndexChanged.connect(self.redraw)
        self.log_check.toggled.connect(self.redraw)
        self._mouse_proxy = pg.SignalProxy(self.plot.scene().sigMouseMoved, rateLimit=30, slot=self._mouse_moved)

    def set_view(self, view: AnalysisView) -> None:
        self.view = view
        _refill(self.layer_combo, view.spectrum_layers)
        _refill(self.source_combo, list(view.spectra))
        if not view.spectrum_layers:
            self.show_message("No 2-D weights to decompose in these projectors.")
            return
        self.show_content()
        self.redraw()

    @property
    def mode(self) -> str:
        return str(self.mode_combo.currentData())

    def set_pending(self, text: str) -> None:
        """Say that a curve (the merged one) is being computed; "" when done."""
        self.pending.setText(text)

    def set_colors(self, colors: dict[str, str]) -> None:
        """Curve colours by expert name (they follow the expert, not its list position)."""
        if colors != self.colors:
            self.colors = dict(colors)
            self.redraw()

    def set_extra(self, extra: dict[str, dict[str, dict[str, Any]]]) -> None:
        """More curves (pinned merge-history results), drawn dotted beside the analysis'."""
        self.extra = extra
        self.redraw()

    def curves(self) -> dict[str, np.ndarray]:
        """The curves currently drawn (name -> y values), after the mode transform."""
        return dict(self._curves)

    def redraw(self, *args: object) -> None:
        if self.view is None:
            return
        layer = self.layer_combo.currentText()
        source = self.source_combo.currentText()
        extra = self.extra.get(source, {}).get(layer, {})
        data = {**self.view.spectra.get(source, {}).get(layer, {}), **extra}
        self.plot.clear()
        self.legend.clear()
        self._curves = {}
        log_y = self.log_check.isChecked()
        self.plot.setLogMode(x=False, y=log_y)
        incomplete = False
        for i, (name, curve) in enumerate(data.items()):
            y = transform_spectrum(curve, self.mode)
            incomplete |= not curve.complete
            self._curves[name] = y
            if log_y:
                y = np.clip(y, 1e-12, None)
            x = np.arange(1, len(y) + 1)
            special = name in ("merged", "base")
            color = (MERGED_COLOR if name == "merged" else "#888888" if name == "base"
                     else self.colors.get(name, PALETTE[i % len(PALETTE)]))
            pen = pg.mkPen(color, width=2.6 if special else 1.6,
                           style=Qt.PenStyle.DashLine if special else
                           Qt.PenStyle.DotLine if name in extra else Qt.PenStyle.SolidLine)
            self.plot.plot(x, y, pen=pen, name="Merged" if name == "merged" else name)
        label = {"raw": "singular value σᵢ", "normalised": "σᵢ / σ₁",
                 "cumulative": "cumulative energy Σσ² / ‖W‖²"}[self.mode]
        self.plot.setLabel("left", label)
        title = f"Layer {layer}: singular values of the {source}"
        if incomplete:
            title += f" (top {max((len(v) for v in self._curves.values()), default=0)})"
        self.plot.setTitle(title)
        rank = self.view.shared_rank.get(layer)
        self._shared_line = None
        if rank:
            line = pg.InfiniteLine(pos=rank, angle=90, movable=False,
                                   pen=pg.mkPen("#555", width=1.5, style=Qt.PenStyle.DashLine),
                                   label=f"shared rank r = {rank}",
                                   labelOpts={"position": 0.06, "color": "#333", "fill": (255, 255, 255, 220),
                                              "anchors": [(1, 1), (1, 1)]})
            self.plot.addItem(line)
            self._shared_line = line
        self.plot.enableAutoRange()
        # the read-out shows this mode's values (not the previous mode's) at the same index
        self.readout.setText(self.readout_at(self._hover) if self._hover is not None else " ")

    def _mouse_moved(self, evt: tuple[Any, ...]) -> None:
        pos = evt[0]
        if not self._curves or not self.plot.sceneBoundingRect().contains(pos):
            return
        p = self.plot.plotItem.vb.mapSceneToView(pos)
        self._hover = i = round(p.x())
        self.readout.setText(self.readout_at(i))

    def readout_at(self, i: int) -> str:
        """Text of the hover read-out at singular index ``i`` (1-based)."""
        parts = [f"i={i}"]
        for name, y in self._curves.items():
            if 1 <= i <= len(y):
                parts.append(f"{name}: {y[i - 1]:.4g}")
        return "   ".join(parts) if len(parts) > 1 else " "

    def export_png(self, path: str | Path) -> None:
        from pyqtgraph.exporters import ImageExporter

        exporter = ImageExporter(self.plot.plotItem)
        exporter.parameters()["width"] = 1200
        exporter.export(str(path))

    def export_csv(self, path: str | Path) -> None:
        names = list(self._curves)
        n = max((len(v) for v in self._curves.values()), default=0)
        rows = [[i + 1] + [(f"{self._curves[k][i]:.8g}" if i < len(self._curves[k]) else "") for k in names]
                for i in range(n)]
        write_csv(path, ["index"] + names, rows)

    def _export_png_dialog(self) -> None:
        f, _ = QFileDialog.getSaveFileName(self, "Export plot", f"spectra-{self.layer_combo.currentText()}.png", "PNG (*.png)")
        if f:
            self.export_png(f)

    def _export_csv_dialog(self) -> None:
        f, _ = QFileDialog.getSaveFileName(self, "Export spectra", f"spectra-{self.layer_combo.currentText()}.csv", "CSV (*.csv)")
        if f:
            self.export_csv(f)


def transform_spectrum(curve: Curve, mode: str) -> np.ndarray:
    """Display transform of a descending singular-value curve (plot scaling only).

    Cumulative energy divides by the exact total energy, so a curve with only the top
    values computed ends below 1 by exactly the energy it leaves out."""
    sv = curve.values
    if sv.size == 0:
        return sv
    if mode == "normalised":
        return sv / sv[0] if sv[0] > 0 else sv
    if mode == "cumulative":
        e = np.cumsum(sv ** 2)
        total = curve.total_energy if curve.total_energy > 0 else float(e[-1])
        return e / total if total > 0 else e
    return sv


def _refill(combo: QComboBox, items: list[str]) -> None:
    """Replace a combo's items, keeping the current choice when it still exists."""
    current = combo.currentText()
    combo.blockSignals(True)
    combo.clear()
    combo.addItems(items)
    i = combo.findText(current)
    combo.setCurrentIndex(max(i, 0))
    combo.blockSignals(False)


# ----------------------------------------------------------------------------- similarity
class SimilarityPanel(_StackedPanel):
    """Heatmap of pairwise cosine similarity between experts per layer. GUI thread."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.layer_combo = QComboBox()
        self.layer_combo.setMinimumContentsLength(12)
        self.kind_combo = QComboBox()
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Layer"))
        bar.addWidget(self.layer_combo)
        bar.addWidget(QLabel("of"))
        bar.addWidget(self.kind_combo)
        bar.addStretch(1)
        self.glw = pg.GraphicsLayoutWidget()
        self.plot = self.glw.addPlot()
        self.plot.setAspectLocked(True)
        self.plot.invertY(True)
        self.plot.hideButtons()
        self.plot.setMouseEnabled(x=False, y=False)
        self.image = pg.ImageItem()
        self.plot.addItem(self.image)
        self.cmap = pg.colormap.get("viridis")
        self.colorbar = pg.ColorBarItem(values=(-1, 1), colorMap=self.cmap, interactive=False, label="cosine similarity")
        self.colorbar.setImageItem(self.image)
        self.glw.addItem(self.colorbar)
        self._texts: list[pg.TextItem] = []
        self.note = QLabel()
        self.note.setWordWrap(True)
        self.note.setStyleSheet("color: #444;")
        lay = QVBoxLayout(self.content)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(bar)
        lay.addWidget(self.glw, 1)
        lay.addWidget(self.note)
        self.layer_combo.currentIndexChanged.connect(self.redraw)
        self.kind_combo.currentIndexChanged.connect(self.redraw)
        self.matrix: np.ndarray | None = None

    def set_view(self, view: AnalysisView) -> None:
        self.view = view
        _refill(self.layer_combo, list(view.similarity))
        _refill(self.kind_combo, view.similarity_kinds)
        if not view.similarity:
            self.show_message("Similarity needs at least two loaded experts.")
            return
        self.show_content()
        self.redraw()

    def redraw(self, *args: object) -> None:
        if self.view is None:
            return
        mats = self.view.similarity.get(self.layer_combo.currentText(), {})
        m = mats.get(self.kind_combo.currentText())
        for t in self._texts:
            self.plot.removeItem(t)
        self._texts = []
        if m is None:
            self.matrix = None
            self.image.clear()
            self.note.setText("Task-vector similarity needs a base or at least two experts." if mats else "")
            return
        m = np.asarray(m, dtype=np.float64)
        self.matrix = m
        names = [("Merged" if n == "merged" else n) for n in self.view.similarity_names[: m.shape[0]]]
        # ImageItem indexes [x, y]; transpose so row i of the matrix is drawn at y = i
        self.image.setImage(m.T, levels=(-1.0, 1.0), autoLevels=False)
        self.image.setRect(QRectF(0, 0, m.shape[1], m.shape[0]))
        ticks = [(i + 0.5, n) for i, n in enumerate(names)]
        self.plot.getAxis("bottom").setTicks([ticks])
        self.plot.getAxis("left").setTicks([ticks])
        if m.shape[0] <= 10:
            for i in range(m.shape[0]):
                for j in range(m.shape[1]):
                    color = "w" if m[i, j] < 0.35 else "k"
                    t = pg.TextItem(f"{m[i, j]:.2f}", color=color, anchor=(0.5, 0.5))
                    t.setPos(j + 0.5, i + 0.5)
                    self.plot.addItem(t)
                    self._texts.append(t)
        self.plot.setRange(xRange=(0, m.shape[1]), yRange=(0, m.shape[0]), padding=0.02)
        off = m[~np.eye(m.shape[0], dtype=bool)] if m.shape[0] > 1 else np.array([])
        self.note.setText(f"{self.kind_combo.currentText()} of layer {self.layer_combo.currentText()}: "
                          + (f"mean off-diagonal similarity {off.mean():.3f}, min {off.min():.3f}" if off.size else ""))
