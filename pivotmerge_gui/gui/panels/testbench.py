"""Test bench widget: caption image-caption pairs with several projectors side by side.

Self-contained ``QWidget`` for a main-window tab. API (GUI thread):

- ``TestBenchPanel(parent=None)``
- ``set_experts(experts: Mapping[str, Projector], base: Projector | None = None)``: the
  loaded experts (names = domains for the demo, so alignment scores know each expert's data)
- ``set_merged(projector: Projector | None, name="Merged")``: the merge result in memory
- ``add_projector_file(path)``, ``add_pairs(path)`` (folder with ``.txt`` side files or
  ``.jsonl``; also by drag and drop), ``load_demo_samples(split, n_per_domain)``
- ``use_llava(path_or_id)`` / ``use_demo()``: the back end (LLaVA is loaded once, in a worker)
- ``run()`` / ``cancel()`` / ``compute_alignment_scores()``; ``is_busy()``
- signals: ``bench_finished(BenchResult)``, ``alignment_scores_ready(LayerAlignmentScores,
  Calibration)`` (for the Layers view and PivotMerge's data-driven ALM / RegMean),
  ``busy_changed(bool)``

All scoring runs in :class:`~pivotmerge_gui.gui.workers.GeneratorWorker` threads over the
core's generators (:func:`~pivotmerge_gui.core.evaluation.bench.run_bench`,
:func:`~pivotmerge_gui.core.evaluation.layer_scores.layer_alignment_scores`); per-pair
results fill the grid as their chunk finishes.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyqtgraph as pg
from PySide6.QtCore import QSize, Qt, Signal
from PySide6.QtGui import QColor
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFileDialog,
    QHBoxLayout,
    QHeaderView,
    QInputDialog,
    QLabel,
    QListWidget,
    QListWidgetItem,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..jobs import Jobs, SingleJobPanel
from ..workers import GeneratorWorker, WorkContext
from .thumbs import THUMB, thumb_icon

PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
METRIC_LABELS = {
    "token_accuracy": "token accuracy (higher is better)",
    "exact_match": "exact match (higher is better)",
    "nll": "caption NLL per token (lower is better)",
}


class TestBenchPanel(SingleJobPanel, QWidget):
    """Sample pairs x projectors grid, per-domain bar chart, alignment scores."""

    __test__ = False  # not a pytest class

    bench_finished = Signal(object)
    alignment_scores_ready = Signal(object, object)
    busy_changed = Signal(bool)

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setAcceptDrops(True)
        self.pairs: list[Any] = []
        self.pair_sources: list[dict] = []  # {"pairs": path} or {"demo": split, "n": n}
        self.experts: dict[str, Any] = {}
        self.base: Any = None
        self.merged: tuple[str, Any] | None = None
        self.files: dict[str, Any] = {}
        self.results: dict[str, Any] = {}  # merge-history results (set_results), extra columns
        self.result: Any = None
        self.scores: Any = None
        self.calibration: Any = None
        self.backend: Any = None  # loaded lazily in a worker
        self.backend_spec = "demo"
        self.job = Jobs().slot("bench", progressed=self._progress, stopped=self._stopped,
                               cancelled=lambda: self.status.setText("Cancelled."))
        self._columns: list[str] = []
        self._ran: dict[str, Any] = {}  # the projectors of the columns shown (a replaced one is stale)
        self._partial: dict[str, list[Any]] = {}
        self.last_error = ""

        # --- pairs bar
        self.add_pairs_button = QPushButton("Add pairs…")
        self.add_pairs_button.setToolTip("A folder of images with .txt captions (sub-folder = domain) or a "
                                         ".jsonl of {image, caption, domain}; you can also drop them here")
        self.split_combo = QComboBox()
        self.split_combo.addItem("validation", "val")
        self.split_combo.addItem("test", "test")
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 256)
        self.n_spin.setValue(4)
        self.n_spin.setSuffix(" / domain")
        self.demo_button = QPushButton("Demo samples")
        self.clear_button = QPushButton("Clear pairs")
        self.backend_combo = QComboBox()
        self.backend_combo.addItem("Demo model (built in)", "demo")
        self.backend_combo.addItem("LLaVA (transformers)…", "llava")
        bar = QHBoxLayout()  # two short rows: the tab fits a 1366 px screen beside the side panels
        top_bar = QHBoxLayout()
        top_bar.addWidget(QLabel("Back end:"))
        top_bar.addWidget(self.backend_combo)
        top_bar.addStretch(1)
        bar.addWidget(self.demo_button)
        bar.addWidget(self.split_combo)
        bar.addWidget(self.n_spin)
        bar.addWidget(self.add_pairs_button)
        bar.addWidget(self.clear_button)
        bar.addStretch(1)

        # --- projector picker
        self.projector_list = QListWidget()
        self.projector_list.setMaximumWidth(170)
        self.projector_list.setToolTip("Ticked projectors are compared side by side")
        self.add_file_button = QPushButton("Add projector file…")
        self.run_button = QPushButton("Run")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.scores_button = QPushButton("Alignment scores")
        self.scores_button.setToolTip("Per-layer alignment contribution of every expert on its own domain's "
                                      "pairs (NLL increase when the layer is reset to the reference), and "
                                      "calibration features for PivotMerge's data-driven ALM and RegMean")
        left = QVBoxLayout()
        left.addWidget(QLabel("Projectors"))
        left.addWidget(self.projector_list, 1)
        left.addWidget(self.add_file_button)
        left.addWidget(self.run_button)
        left.addWidget(self.cancel_button)
        left.addWidget(self.scores_button)
        left_w = QWidget()
        left_w.setLayout(left)
        left_w.setMaximumWidth(170)

        # --- grid
        self.grid = QTableWidget(0, 2)
        self.grid.setIconSize(QSize(THUMB, THUMB))
        self.grid.setWordWrap(True)
        self.grid.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        self.grid.verticalHeader().setDefaultSectionSize(THUMB + 8)
        self.grid.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.Stretch)
        self.grid.verticalHeader().setVisible(False)

        # --- chart
        self.metric_combo = QComboBox()
        for k, v in METRIC_LABELS.items():
            self.metric_combo.addItem(v, k)
        pg.setConfigOptions(antialias=True)
        self.plot = pg.PlotWidget(background="w")
        self.plot.showGrid(y=True, alpha=0.3)
        self.plot.setMinimumHeight(180)
        self.plot.getAxis("left").enableAutoSIPrefix(False)
        for side in ("left", "bottom"):
            self.plot.getAxis(side).setTextPen("k")
            self.plot.getAxis(side).setPen("#555")
        self.legend = self.plot.addLegend(offset=(10, 5))
        chart = QVBoxLayout()
        ch_bar = QHBoxLayout()
        ch_bar.addWidget(QLabel("Per domain:"))
        ch_bar.addWidget(self.metric_combo)
        ch_bar.addStretch(1)
        chart.addLayout(ch_bar)
        chart.addWidget(self.plot)
        chart_w = QWidget()
        chart_w.setLayout(chart)

        right = QSplitter(Qt.Orientation.Vertical)
        right.addWidget(self.grid)
        right.addWidget(chart_w)
        right.setStretchFactor(0, 3)
        right.setStretchFactor(1, 2)
        right.setSizes([480, 320])
        body = QSplitter(Qt.Orientation.Horizontal)
        body.addWidget(left_w)
        body.addWidget(right)
        body.setStretchFactor(1, 1)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.progress.setMaximumHeight(10)
        self.status = QLabel("Add image-caption pairs (or the demo samples), tick projectors, press Run.")
        self.status.setWordWrap(True)
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(top_bar)
        lay.addLayout(bar)
        lay.addWidget(body, 1)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)

        self.demo_button.clicked.connect(lambda: self.load_demo_samples(self.split, self.n_spin.value()))
        self.add_pairs_button.clicked.connect(self._choose_pairs)
        self.clear_button.clicked.connect(lambda: self.set_pairs([]))
        self.add_file_button.clicked.connect(self._choose_projector)
        self.run_button.clicked.connect(self.run)
        self.cancel_button.clicked.connect(self.cancel)
        self.scores_button.clicked.connect(self.compute_alignment_scores)
        self.metric_combo.currentIndexChanged.connect(lambda _: self._draw_chart())
        self.backend_combo.activated.connect(self._backend_chosen)
        self._update_buttons()

    # ------------------------------------------------------------------ inputs
    @property
    def split(self) -> str:
        return str(self.split_combo.currentData())

    def set_experts(self, experts: Mapping[str, Any], base: Any = None) -> None:
        self.experts = dict(experts)
        self.base = base
        self._refresh_projectors()

    def set_merged(self, projector: Any, name: str = "Merged") -> None:
        self.merged = (name, projector) if projector is not None else None
        self._refresh_projectors()

    def set_results(self, results: Mapping[str, Any]) -> None:
        self.results = dict(results)
        self._refresh_projectors()

    def add_projector_file(self, path: str | Path) -> None:
        """Load a saved projector (typed errors end up in the status line)."""
        from pivotmerge_gui.core.errors import PivotMergeError
        from pivotmerge_gui.core.io import load_projector
        from pivotmerge_gui.core.recipe import display_name

        try:
            proj = load_projector(str(path))
        except PivotMergeError as e:
            self._error(str(e))
            return
        name = display_name(str(path))
        while name in self.experts or name in self.files:
            name += "'"
        self.files[name] = proj
        self._refresh_projectors(tick=name)

    def _refresh_projectors(self, tick: str | None = None) -> None:
        ticked = set(self.selected_names()) | ({tick} if tick else set())
        fresh = not self.projector_list.count()
        self.projector_list.clear()
        entries = [(n, "expert") for n in self.experts] + \
                  ([(self.merged[0], "merged")] if self.merged else []) + [(n, "file") for n in self.files] + \
                  [(n, "result") for n in self.results if not (self.merged and n == self.merged[0])]
        for n, kind in entries:
            it = QListWidgetItem(n if kind == "expert" else f"{n}  ({kind})")
            it.setData(Qt.ItemDataRole.UserRole, n)
            on = n in ticked or fresh or kind == "merged"
            it.setCheckState(Qt.CheckState.Checked if on else Qt.CheckState.Unchecked)
            self.projector_list.addItem(it)
        self._update_buttons()
        self._drop_stale_columns()

    def selected_names(self) -> list[str]:
        out = []
        for i in range(self.projector_list.count()):
            it = self.projector_list.item(i)
            if it.checkState() == Qt.CheckState.Checked:
                out.append(str(it.data(Qt.ItemDataRole.UserRole)))
        return out

    def projectors(self) -> dict[str, Any]:
        pool = self._pool()
        return {n: pool[n] for n in self.selected_names() if n in pool}

    def _pool(self) -> dict[str, Any]:
        """Every projector the bench can run, by name (ticked or not)."""
        pool = dict(self.experts)
        if self.merged:
            pool[self.merged[0]] = self.merged[1]
        pool.update(self.files)
        pool.update({n: p for n, p in self.results.items() if n not in pool})
        return pool

    def _drop_stale_columns(self) -> None:
        """Remove the columns (and bars) of projectors that are gone or were replaced since
        the run (a new merge, an expert removed): their scores describe another projector."""
        if not self._columns or self.worker is not None:
            return
        pool = self._pool()
        stale = [n for n in self._columns if pool.get(n) is not self._ran.get(n)]
        if not stale:
            return
        keep = [n for n in self._columns if n not in stale]
        self._rebuild_grid(keep)
        for n in keep:
            for r in (self.result.results.get(n, []) if self.result is not None else self._partial.get(n, [])):
                self._fill_cell(r)
        self._draw_chart()
        self.status.setText(f"{', '.join(stale)} changed or went away since the run: "
                            f"{'its column was' if len(stale) == 1 else 'their columns were'} removed. "
                            "Press Run to test again.")

    def load_demo_samples(self, split: str = "val", n_per_domain: int = 4) -> None:
        from pivotmerge_gui.core.evaluation.pairs import pairs_from_caption_sets
        from pivotmerge_gui.demo import kit

        world = kit.load_world()
        self.split_combo.setCurrentIndex(max(0, self.split_combo.findData(split)))
        self.n_spin.setValue(n_per_domain)
        self.set_pairs(pairs_from_caption_sets(world.caption_sets(split, n_per_domain)),
                       [{"demo": split, "n": int(n_per_domain)}])

    def add_pairs(self, path: str | Path) -> bool:
        from pivotmerge_gui.core.errors import PivotMergeError
        from pivotmerge_gui.core.evaluation.pairs import load_pairs

        try:
            new = load_pairs(path)
        except PivotMergeError as e:
            self._error(str(e))
            return False
        self.set_pairs(self.pairs + new, [*self.pair_sources, {"pairs": str(Path(path).resolve())}])
        return True

    def set_pairs(self, pairs: list[Any], sources: list[dict] | None = None) -> None:
        """Replace the pairs; ``sources`` says where they came from (kept by the autosave)."""
        self.pairs = list(pairs)
        self.pair_sources = list(sources or [])
        self.result = None
        self._partial = {}
        self._rebuild_grid([])
        domains = sorted({p.domain for p in self.pairs})
        self.status.setText(f"{len(self.pairs)} pairs in {len(domains)} domain(s): {', '.join(domains)}"
                            if self.pairs else "No pairs: add a folder/.jsonl or the demo samples.")
        self._draw_chart()
        self._update_buttons()

    # ------------------------------------------------------------------ back end
    def use_demo(self) -> None:
        self.backend, self.backend_spec = None, "demo"
        self.backend_combo.setCurrentIndex(0)

    def use_llava(self, path_or_id: str) -> None:
        """Use a transformers Llava model (loaded once, on the first run)."""
        self.backend, self.backend_spec = None, f"llava:{path_or_id}"
        if self.backend_combo.count() < 3:
            self.backend_combo.addItem("", "llava-set")
        self.backend_combo.setItemText(2, f"LLaVA: {path_or_id}")
        self.backend_combo.setCurrentIndex(2)

    def _backend_chosen(self, index: int) -> None:
        data = self.backend_combo.itemData(index)
        if data == "demo":
            self.use_demo()
        elif data == "llava":
            text, ok = QInputDialog.getText(self, "LLaVA model", "Local model folder or Hub id "
                                            "(e.g. llava-hf/llava-1.5-7b-hf):")
            if ok and text.strip():
                self.use_llava(text.strip())
            else:
                self.backend_combo.setCurrentIndex(0 if self.backend_spec == "demo" else 2)

    def _get_backend(self) -> Any:
        """Worker thread: the back end, loaded once and kept."""
        if self.backend is None:
            if self.backend_spec == "demo":
                from pivotmerge_gui.demo import kit

                self.backend = kit.load_world().backend
            else:
                from pivotmerge_gui.core.evaluation.llava_hf import LlavaHFBackend

                self.backend = LlavaHFBackend.from_pretrained(self.backend_spec.removeprefix("llava:"))
        return self.backend

    # ------------------------------------------------------------------ run
    def run(self) -> GeneratorWorker | None:
        """Caption and score every pair with every ticked projector (worker)."""
        projs = self.projectors()
        if self.worker is not None:
            return None
        if not self.pairs or not projs:
            self._error("Nothing to run: " + ("add pairs first." if not self.pairs else "tick a projector."))
            return None
        pairs = list(self.pairs)
        self._ran = dict(projs)
        self._rebuild_grid(list(projs))
        self._partial = {n: [] for n in projs}

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.evaluation.bench import run_bench
            from pivotmerge_gui.core.progress import ProgressEvent

            def token(update: Any) -> None:  # streaming back ends: the caption as it grows
                ctx.emit(ProgressEvent("token", -1.0, "", update))

            return run_bench(self._get_backend(), projs, pairs, cancel=ctx.cancel, on_token=token)

        return self._start(job, "bench", self._bench_done)

    def compute_alignment_scores(self) -> GeneratorWorker | None:
        """Per-layer alignment scores of the experts + calibration features (worker)."""
        if self.worker is not None:
            return None
        if not self.experts or not self.pairs:
            self._error("Alignment scores need the experts and pairs of their domains.")
            return None
        experts, base, pairs = dict(self.experts), self.base, list(self.pairs)

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.evaluation.layer_scores import (
                calibration_from_sets,
                caption_sets_from_pairs,
                layer_alignment_scores,
            )

            backend = self._get_backend()
            sets = caption_sets_from_pairs(backend, pairs)
            scores = yield from layer_alignment_scores(backend, experts, sets, base=base, cancel=ctx.cancel)
            return scores, calibration_from_sets(backend, sets, scores.domains)

        return self._start(job, "alignment-scores", self._scores_done)

    def _start(self, job: Any, name: str, done: Any) -> GeneratorWorker | None:
        self.job.name = name
        w = self.job.start(job, finished=done, failed=lambda exc, tb: self._error(f"{name} failed: {exc}"))
        self.progress.setValue(0)
        self._update_buttons()
        self.busy_changed.emit(True)
        return w

    def _stopped(self) -> None:
        self._update_buttons()
        self._drop_stale_columns()  # a projector replaced while the run was finishing
        self.busy_changed.emit(False)

    def _update_buttons(self) -> None:
        busy = self.worker is not None
        self.run_button.setEnabled(not busy and bool(self.pairs) and self.projector_list.count() > 0)
        self.scores_button.setEnabled(not busy and bool(self.pairs) and bool(self.experts))
        self.cancel_button.setEnabled(busy)
        for w in (self.demo_button, self.add_pairs_button, self.clear_button, self.backend_combo,
                  self.add_file_button):
            w.setEnabled(not busy)

    def _progress(self, ev: Any) -> None:
        if ev.stage == "token":
            self._stream_cell(ev.payload)
            return
        self.progress.setValue(int(max(0.0, min(1.0, ev.fraction)) * 1000))
        if ev.message:
            self.status.setText(ev.message)
        if ev.stage == "caption" and isinstance(ev.payload, list):
            for r in ev.payload:
                self._partial.setdefault(r.projector, []).append(r)
                self._fill_cell(r)

    def _error(self, text: str) -> None:
        self.last_error = text
        self.status.setText(f"<span style='color:#b00020'>{html.escape(text)}</span>")

    def _bench_done(self, result: Any) -> None:
        self.result = result
        for rows in result.results.values():
            for r in rows:
                self._fill_cell(r)
        self._draw_chart()
        mean = ", ".join(f"{n}: {result.metrics[n].mean.token_accuracy:.2f}" for n in result.projectors)
        self.status.setText(f"{len(result.pairs)} pairs x {len(result.projectors)} projectors in "
                            f"{result.elapsed_s:.1f} s ({result.backend}). Mean token accuracy: {mean}")
        self.progress.setValue(1000)
        self.bench_finished.emit(result)

    def _scores_done(self, value: Any) -> None:
        self.scores, self.calibration = value
        s = self.scores
        per = ", ".join(f"layer {l}: {v:+.3f}" for l, v in s.per_layer().items())
        self.status.setText(f"Alignment scores ({s.reference} reference), mean NLL increase when a layer "
                            f"is reset: {per}. Calibration ready for {len(s.experts)} experts.")
        self.progress.setValue(1000)
        self.alignment_scores_ready.emit(self.scores, self.calibration)

    # ------------------------------------------------------------------ grid and chart
    def _rebuild_grid(self, names: list[str]) -> None:
        self._columns = names
        self.grid.clear()
        self.grid.setColumnCount(1 + len(names))
        self.grid.setHorizontalHeaderLabels(["image / reference"] + names)
        self.grid.setRowCount(len(self.pairs))
        for i, p in enumerate(self.pairs):
            it = QTableWidgetItem(thumb_icon(p.image), f"[{p.domain}] {p.caption}")
            it.setToolTip(f"{p.name}\n{p.caption}")
            self.grid.setItem(i, 0, it)

    def _fill_cell(self, r: Any) -> None:
        if r.projector not in self._columns or r.index >= self.grid.rowCount():
            return
        col = 1 + self._columns.index(r.projector)
        it = QTableWidgetItem(f"{r.caption}\nNLL {r.nll:.2f} · acc {r.token_accuracy:.2f}")
        it.setToolTip(f"reference: {r.reference}\ncaption: {r.caption}\nNLL/token {r.nll:.4f}, "
                      f"token accuracy {r.token_accuracy:.3f}")
        acc = max(0.0, min(1.0, r.token_accuracy))
        it.setBackground(QColor(int(255 - 110 * acc), 255, int(255 - 110 * acc)) if acc >= 0.5
                         else QColor(255, int(205 + 90 * acc), int(205 + 90 * acc)))
        self.grid.setItem(r.index, col, it)

    def _stream_cell(self, update: Any) -> None:
        if update.projector not in self._columns or update.index >= self.grid.rowCount():
            return
        it = QTableWidgetItem(update.text + " …")
        it.setForeground(QColor("#777777"))
        self.grid.setItem(update.index, 1 + self._columns.index(update.projector), it)

    def chart_values(self) -> tuple[list[str], dict[str, list[float]]]:
        """Domains (+ "mean") and, per projector, the selected metric (what the chart shows)."""
        if self.result is None:
            return [], {}
        metric = str(self.metric_combo.currentData())
        doms = list(next(iter(self.result.metrics.values())).per_domain) + ["mean"]
        out = {}
        for n in self.result.projectors:
            if n not in self._columns:
                continue  # dropped as stale
            ev = self.result.metrics[n]
            vals = [getattr(ev.per_domain[d], metric) for d in doms[:-1]] + [getattr(ev.mean, metric)]
            out[n] = [float(v) if v is not None else 0.0 for v in vals]
        return doms, out

    def _draw_chart(self) -> None:
        self.plot.clear()
        if self.legend is not None:
            self.legend.clear()
        doms, vals = self.chart_values()
        if not doms:
            return
        k = max(len(vals), 1)
        width = 0.8 / k
        for j, (name, v) in enumerate(vals.items()):
            xs = [i - 0.4 + width * (j + 0.5) for i in range(len(doms))]
            bar = pg.BarGraphItem(x=xs, height=v, width=width * 0.95, brush=PALETTE[j % len(PALETTE)],
                                  pen=pg.mkPen(None), name=name)
            self.plot.addItem(bar)  # named items join the legend by themselves
        cols = max(1, min(k, 6, self.plot.width() // 150))  # legend names stay readable
        if self.legend is not None:
            self.legend.setColumnCount(cols)
        rows = -(-k // cols)
        top = max((x for v in vals.values() for x in v), default=1.0)
        self.plot.setYRange(0, top * (1.1 + 0.25 * rows) if top > 0 else 1.0, padding=0)  # room for the legend
        ax = self.plot.getAxis("bottom")
        ax.setTicks([[(i, d) for i, d in enumerate(doms)]])
        self.plot.setLabel("left", METRIC_LABELS[str(self.metric_combo.currentData())])
        self.plot.setXRange(-0.6, len(doms) - 0.4, padding=0)

    # ------------------------------------------------------------------ drag and drop / dialogs
    def dragEnterEvent(self, event: Any) -> None:
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event: Any) -> None:
        for url in event.mimeData().urls():
            p = Path(url.toLocalFile())
            if p.is_dir() or p.suffix.lower() == ".jsonl":
                self.add_pairs(p)
            else:
                self.add_projector_file(p)
        event.acceptProposedAction()

    def _choose_pairs(self) -> None:
        folder = QFileDialog.getExistingDirectory(self, "Folder of images with .txt captions")
        if folder:
            self.add_pairs(folder)

    def _choose_projector(self) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Projector file", "",
                                              "Checkpoints (*.bin *.safetensors *.pt *.pth);;All files (*)")
        if path:
            self.add_projector_file(path)
