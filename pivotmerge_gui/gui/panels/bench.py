"""Test bench: caption and score the experts and the merged projector before saving.

The scoring is ``core.evaluation.bench.run_bench`` on the built-in demo world (a frozen
vision encoder and language model whose projectors are the demo experts); it runs on a
worker thread and fills the table when done. Projectors of other models need their own
back end (``core.evaluation.llava_hf`` with a local LLaVA checkpoint), which the app does
not load.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QTableView,
    QTextBrowser,
    QVBoxLayout,
    QWidget,
)

from ..models import LayerTableModel
from .inspect import ColorBarDelegate

METRIC_HELP = {
    "token_accuracy": "share of reference words the greedy caption gets right (higher is better)",
    "exact_match": "share of captions reproduced exactly (higher is better)",
    "nll": "teacher-forced caption NLL per token (lower is better)",
}


def bench_rows(result: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Table rows (one per projector) from a ``BenchResult``: mean and per-domain metrics."""
    rows: list[dict[str, Any]] = []
    help_: dict[str, str] = {"projector": "expert, or the merged result"}
    for name in result.projectors:
        ev = result.metrics[name]
        row: dict[str, Any] = {"projector": name}
        for metric in ("token_accuracy", "exact_match", "nll"):
            value = getattr(ev.mean, metric)
            if value is not None:
                key = f"mean {metric}"
                row[key] = float(value)
                help_[key] = f"mean over domains: {METRIC_HELP[metric]}"
        for dom, m in ev.per_domain.items():
            if m.token_accuracy is not None:
                key = f"{dom} token_accuracy"
                row[key] = float(m.token_accuracy)
                help_[key] = f"domain {dom}: {METRIC_HELP['token_accuracy']}"
        rows.append(row)
    return rows, help_


class TestBenchPanel(QWidget):
    """Runs the demo test bench on the loaded experts (+ Merged). GUI thread; the scoring
    runs in a worker started by the main window (``run_requested``)."""

    __test__ = False  # not a pytest test class despite the name

    run_requested = Signal()
    cancel_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.split_combo = QComboBox()
        self.split_combo.addItem("validation split", "val")
        self.split_combo.addItem("test split", "test")
        self.split_combo.setCurrentIndex(1)
        self.n_spin = QSpinBox()
        self.n_spin.setRange(1, 512)
        self.n_spin.setValue(8)
        self.n_spin.setSuffix(" pairs / domain")
        self.run_button = QPushButton("Run test bench")
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        bar = QHBoxLayout()
        bar.addWidget(QLabel("Demo world,"))
        bar.addWidget(self.split_combo)
        bar.addWidget(self.n_spin)
        bar.addStretch(1)
        bar.addWidget(self.run_button)
        bar.addWidget(self.cancel_button)
        self.status = QLabel("Scores the experts and the merged projector on the built-in demo "
                             "world's image-caption pairs (greedy captions, teacher-forced NLL).")
        self.status.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setTextVisible(False)
        self.model = LayerTableModel(self)
        self.table = QTableView()
        self.table.setModel(self.model)
        self.table.setItemDelegate(ColorBarDelegate(self.table))
        self.table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        self.table.verticalHeader().setVisible(False)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        self.samples = QTextBrowser()
        self.samples.setPlaceholderText("Sample captions appear here after a run.")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(4, 4, 4, 4)
        lay.addLayout(bar)
        lay.addWidget(self.status)
        lay.addWidget(self.progress)
        lay.addWidget(self.table, 2)
        lay.addWidget(self.samples, 1)
        self.run_button.clicked.connect(self.run_requested.emit)
        self.cancel_button.clicked.connect(self.cancel_requested.emit)
        self.result: Any = None

    @property
    def split(self) -> str:
        return str(self.split_combo.currentData())

    @property
    def pairs_per_domain(self) -> int:
        return int(self.n_spin.value())

    def set_running(self, running: bool) -> None:
        self.run_button.setEnabled(not running)
        self.cancel_button.setEnabled(running)
        if running:
            self.progress.setValue(0)

    def show_progress(self, fraction: float, text: str) -> None:
        self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.status.setText(text)

    def set_result(self, result: Any) -> None:
        self.result = result
        if result is None:
            self.model.set_rows([])
            self.samples.setHtml("")
            return
        rows, help_ = bench_rows(result)
        self.model.set_rows(rows, help_)
        self.status.setText(f"{len(result.pairs)} pairs, {len(result.projectors)} projectors, "
                            f"{result.elapsed_s:.1f} s ({result.backend}).")
        self.progress.setValue(1000)
        parts = []
        by_proj = result.results
        shown: dict[str, int] = {}
        picks = []
        for i, pair in enumerate(result.pairs):  # the first two pairs of every domain
            if shown.get(pair.domain, 0) < 2:
                shown[pair.domain] = shown.get(pair.domain, 0) + 1
                picks.append(i)
        for i in picks:
            pair = result.pairs[i]
            parts.append(f"<p><b>{pair.domain}</b> — reference: <i>{pair.caption}</i><br>")
            for name in result.projectors:
                r = next((x for x in by_proj[name] if x.index == i), None)
                if r is not None:
                    parts.append(f"&nbsp;&nbsp;{name}: {r.caption}<br>")
            parts.append("</p>")
        self.samples.setHtml("".join(parts))
