"""Auto-tune widget: evolutionary search of per-layer merge coefficients, live plot.

Self-contained ``QWidget`` for a main-window tab. API (GUI thread):

- ``AutoTunePanel(parent=None)``
- ``set_experts(experts: Mapping[str, Projector], base=None, calibration=None)``
- ``set_method(name: str, params: dict | None = None)``: the merge form's method + parameters
- ``set_pairs(val_sets, test_sets)``: caption sets (``CaptionSet`` per domain, features
  encoded) and ``set_backend(backend)``; or ``set_user_pairs(backend, pairs)`` (e.g. the
  test bench's pairs: split per domain into validation and held-out halves, encoded in the
  worker); without them the demo world's validation/test splits are used (``pairs per
  domain`` spin box)
- ``run()`` / ``cancel()`` / ``apply()``; ``is_busy()``
- signals: ``apply_requested(TuneSetting)`` (write ``setting.layer_coefficients`` into
  the merge form's per-layer sliders / ``Recipe.layer_coefficients``),
  ``tune_finished(TuneResult)``, ``busy_changed(bool)``

The search runs :func:`pivotmerge_gui.core.tuning.autotune` in a
:class:`~pivotmerge_gui.gui.workers.GeneratorWorker`; every generation's record updates the
plot. A cancelled run keeps its best-so-far setting, which can still be applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..jobs import Jobs, SingleJobPanel
from ..workers import GeneratorWorker, WorkContext


class AutoTunePanel(SingleJobPanel, QWidget):
    """Run auto-tune, plot best fitness per generation, apply the best setting."""

    apply_requested = Signal(object)
    tune_finished = Signal(object)
    busy_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None, methods: list[Any] | None = None) -> None:
        """``methods``: the registry's methods (None: read the registry now, which imports
        torch; the window passes [] at start-up and calls :meth:`set_methods` later)."""
        super().__init__(parent)
        self.experts: dict[str, Any] = {}
        self.base: Any = None
        self.calibration: Any = None
        self.params: dict[str, Any] = {}
        self._params_for = ""
        self.backend: Any = None
        self.val_sets: Any = None
        self.test_sets: Any = None
        self.user_pairs: Any = None
        self.job = Jobs().slot("autotune", progressed=self._progress, finished=self._done,
                               failed=lambda exc, tb: self._error(f"Auto-tune failed: {exc}"),
                               cancelled=self._cancelled, stopped=self._stopped)
        self.records: list[Any] = []
        self.result: Any = None
        self.best: Any = None  # best TuneSetting so far (also after a cancel)
        self.last_error = ""

        self.method_combo = QComboBox()
        if methods is None:
            from pivotmerge_gui.core.methods import list_methods

            methods = list_methods()
        self.set_methods(methods)
        self.metric_combo = QComboBox()
        self.metric_combo.addItem("caption NLL (smooth, fast)", "nll")
        self.metric_combo.addItem("token accuracy (greedy captions)", "token_accuracy")
        self.gen_spin = QSpinBox()
        self.gen_spin.setRange(1, 200)
        self.gen_spin.setValue(8)
        self.pop_spin = QSpinBox()
        self.pop_spin.setRange(2, 64)
        self.pop_spin.setValue(6)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(2, 512)
        self.n_spin.setValue(32)
        self.n_spin.setSuffix(" / domain")
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        form = QFormLayout()
        form.addRow("Method", self.method_combo)
        form.addRow("Fitness", self.metric_combo)
        form.addRow("Generations", self.gen_spin)
        form.addRow("Population", self.pop_spin)
        form.addRow("Demo pairs", self.n_spin)
        form.addRow("Seed", self.seed_spin)
        self.run_button = QPushButton("Auto-tune")
        self.cancel_button = QPushButton("Cancel")
        self.apply_button = QPushButton("Apply best setting")
        self.apply_button.setToolTip("Write the tuned per-layer coefficients into the merge form")
        buttons = QHBoxLayout()
        for b in (self.run_button, self.cancel_button, self.apply_button):
            buttons.addWidget(b)
        self.table = QTableWidget(0, 3)
        self.table.setHorizontalHeaderLabels(["layer", "start", "tuned"])
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.summary = QLabel("Searches the per-layer coefficients of the merge with an evolution "
                              "strategy (CMA-ES); fitness = alignment on the validation pairs, "
                              "checked on held-out test pairs.")
        self.summary.setWordWrap(True)
        self.summary.setTextFormat(Qt.TextFormat.RichText)
        left = QVBoxLayout()
        left.addLayout(form)
        left.addLayout(buttons)
        left.addWidget(self.table, 1)
        left.addWidget(self.summary)
        left_w = QWidget()
        left_w.setLayout(left)
        left_w.setMaximumWidth(380)

        pg.setConfigOptions(antialias=True)
        self.plot = pg.PlotWidget(background="w")
        self.plot.showGrid(x=True, y=True, alpha=0.3)
        self.plot.setLabel("bottom", "generation")
        self.plot.setLabel("left", "fitness (validation)")
        for side in ("left", "bottom"):
            self.plot.getAxis(side).setTextPen("k")
            self.plot.getAxis(side).setPen("#555")
        self.plot.addLegend(offset=(-5, -5))
        self.best_curve = self.plot.plot([], [], pen=pg.mkPen("#1f77b4", width=2.5), symbol="o",
                                         symbolSize=7, symbolBrush="#1f77b4", name="best so far")
        self.mean_curve = self.plot.plot([], [], pen=pg.mkPen("#aaaaaa", width=1.5, style=Qt.PenStyle.DashLine),
                                         name="generation mean")
        self.start_line = pg.InfiniteLine(angle=0, movable=False, label="untuned",
                                          labelOpts={"position": 0.08, "color": "#d62728", "anchors": [(0, 1), (0, 1)]},
                                          pen=pg.mkPen("#d62728", width=1.2, style=Qt.PenStyle.DotLine))
        self.start_line.setVisible(False)
        self.plot.addItem(self.start_line)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(10)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        right = QVBoxLayout()
        right.addWidget(self.plot, 1)
        right.addWidget(self.progress)
        right.addWidget(self.status)
        lay = QHBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addWidget(left_w)
        lay.addLayout(right, 1)

        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.apply_button.clicked.connect(self.apply)
        self._update_buttons()

    # ------------------------------------------------------------------ inputs
    def set_methods(self, methods: list[Any]) -> None:
        current = self.method_combo.currentData()
        self.method_combo.clear()
        for m in methods:
            self.method_combo.addItem(m.pretty_name, m.name)
        i = self.method_combo.findData(current)
        if i >= 0:
            self.method_combo.setCurrentIndex(i)

    def set_experts(self, experts: Mapping[str, Any], base: Any = None, calibration: Any = None) -> None:
        self.experts, self.base, self.calibration = dict(experts), base, calibration
        self._update_buttons()

    def set_method(self, name: str, params: Mapping[str, Any] | None = None) -> None:
        i = self.method_combo.findData(name)
        if i >= 0:
            self.method_combo.setCurrentIndex(i)
        self.params = dict(params or {})
        self._params_for = name

    def set_backend(self, backend: Any) -> None:
        self.backend = backend

    def set_pairs(self, val_sets: Any, test_sets: Any = None) -> None:
        self.val_sets, self.test_sets = val_sets, test_sets
        self.user_pairs = None

    def set_user_pairs(self, backend: Any, pairs: Any) -> None:
        """Tune on ``pairs`` (split half/half per domain; the domains must be the experts')."""
        self.backend, self.user_pairs = backend, list(pairs)
        self.val_sets = self.test_sets = None

    @property
    def method(self) -> str:
        return str(self.method_combo.currentData())

    # ------------------------------------------------------------------ run
    def run(self) -> GeneratorWorker | None:
        if self.worker is not None:
            return None
        if len(self.experts) < 2:
            self._error("Auto-tune needs at least two experts.")
            return None
        experts, base, cal = dict(self.experts), self.base, self.calibration
        method = self.method
        params = dict(self.params) if self._params_for == method else {}
        metric = str(self.metric_combo.currentData())
        gens, pop, seed, n = self.gen_spin.value(), self.pop_spin.value(), self.seed_spin.value(), self.n_spin.value()
        backend, val, test, user = self.backend, self.val_sets, self.test_sets, self.user_pairs

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.tuning import autotune

            nonlocal backend, val, test
            if user is not None and backend is not None:
                from pivotmerge_gui.core.evaluation.layer_scores import caption_sets_from_pairs
                from pivotmerge_gui.core.evaluation.pairs import split_pairs

                val_pairs, test_pairs = split_pairs(user, 0.5, seed)
                val = caption_sets_from_pairs(backend, val_pairs)
                test = caption_sets_from_pairs(backend, test_pairs) if test_pairs else None
            elif backend is None or val is None:
                from pivotmerge_gui.demo import kit

                world = kit.load_world()
                backend, val, test = world.backend, world.caption_sets("val", n), world.caption_sets("test", n)
            return autotune(list(experts.values()), method, params, backend=backend, val_sets=val,
                            test_sets=test, base=base, calibration=cal, names=list(experts), metric=metric,
                            generations=gens, population=pop, seed=seed, cancel=ctx.cancel)

        self.records, self.result, self.best = [], None, None
        self._draw()
        self.table.setRowCount(0)
        w = self.job.start(job)
        self.progress.setValue(0)
        self.status.setText(f"Auto-tuning {method}…")
        self._update_buttons()
        self.busy_changed.emit(True)
        return w

    def apply(self) -> None:
        if self.best is not None:
            self.apply_requested.emit(self.best)

    def _stopped(self) -> None:
        self._update_buttons()
        self.busy_changed.emit(False)

    def _update_buttons(self) -> None:
        busy = self.worker is not None
        self.run_button.setEnabled(not busy and len(self.experts) >= 2)
        self.cancel_button.setEnabled(busy)
        self.apply_button.setEnabled(not busy and self.best is not None)
        for w in (self.method_combo, self.metric_combo, self.gen_spin, self.pop_spin, self.n_spin, self.seed_spin):
            w.setEnabled(not busy)

    def _error(self, text: str) -> None:
        self.last_error = text
        self.status.setText(f"<span style='color:#b00020'>{text}</span>")

    def _progress(self, ev: Any) -> None:
        from pivotmerge_gui.core.tuning import GenerationRecord

        self.progress.setValue(int(max(0.0, min(1.0, ev.fraction)) * 1000))
        if ev.message:
            self.status.setText(ev.message)
        if isinstance(ev.payload, GenerationRecord):
            self.records.append(ev.payload)
            self.best = ev.payload.best
            self._draw()

    def _draw(self) -> None:
        gens = [r.generation for r in self.records]
        self.best_curve.setData(gens, [r.best_fitness for r in self.records])
        self.mean_curve.setData(gens, [r.generation_mean for r in self.records])
        if self.result is not None:
            self.start_line.setPos(self.result.initial_fitness)
            self.start_line.setVisible(True)
        else:
            self.start_line.setVisible(False)

    def _cancelled(self) -> None:
        kept = " The best setting so far can still be applied." if self.best is not None else ""
        self.status.setText("Auto-tune cancelled." + kept)

    def _done(self, result: Any) -> None:
        self.result, self.best = result, result.best
        self._draw()
        layers = list(result.best.layer_coefficients)
        self.table.setRowCount(len(layers))
        for i, name in enumerate(layers):
            for j, text in enumerate((name, f"{result.initial.layer_coefficients[name]:.3f}",
                                      f"{result.best.layer_coefficients[name]:.3f}")):
                it = QTableWidgetItem(text)
                it.setTextAlignment(Qt.AlignmentFlag.AlignCenter)
                self.table.setItem(i, j, it)
        lines = [f"<b>validation</b>: {result.initial_fitness:.4f} → <b>{result.best_fitness:.4f}</b>"]
        if result.holdout_fitness is not None:
            verdict = ("<span style='color:#2ca02c'>generalises</span>" if result.generalises else
                       "<span style='color:#d62728'>does not generalise</span>")
            lines.append(f"<b>held-out test</b>: {result.holdout_initial_fitness:.4f} → "
                         f"<b>{result.holdout_fitness:.4f}</b> ({verdict})")
        unit = "−NLL per token" if result.metric == "nll" else "token accuracy"
        lines.append(f"fitness = {unit}, {result.evaluations} evaluations in {result.elapsed_s:.1f} s "
                     f"({result.mode})")
        self.summary.setText("<br>".join(lines))
        self.progress.setValue(1000)
        self.status.setText("Done. Apply writes the tuned coefficients into the merge form.")
        self._update_buttons()
        self.tune_finished.emit(result)


def demo(screenshot: str | None = None, method: str = "task_arithmetic", generations: int = 8) -> int:
    """Show the panel standalone on the demo experts and run it; with ``screenshot`` save a
    PNG when done and quit."""
    import sys

    from PySide6.QtWidgets import QApplication

    from pivotmerge_gui.demo import kit

    from ..standalone import run_panel

    app = QApplication.instance() or QApplication(sys.argv)
    panel = AutoTunePanel()
    panel.setWindowTitle("PivotMerge Studio — auto-tune")
    panel.resize(1100, 620)
    panel.set_experts(kit.load_experts("shared"), kit.load_projector_file(kit.base_path("shared")),
                      kit.calibration("shared"))
    panel.set_method(method)
    panel.gen_spin.setValue(generations)
    return run_panel(app, panel, panel.tune_finished, screenshot)


if __name__ == "__main__":
    import sys

    raise SystemExit(demo(sys.argv[1] if len(sys.argv) > 1 else None,
                          sys.argv[2] if len(sys.argv) > 2 else "task_arithmetic"))
