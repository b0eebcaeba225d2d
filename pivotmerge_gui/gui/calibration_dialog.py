"""Calibration dialog: a calibration file from a folder (or pair file) per expert.

One row per expert names the images of its domain (a folder, recursive, or a ``.jsonl``
with an ``image`` path per line; prefilled from the test bench's pairs when the caller
knows them); an empty row means that expert has no calibration data. The encoder is a
model folder or Hub id (only its vision tower is loaded) or ``demo``. The work runs on a
background thread through the same driver as ``pivotmerge calibrate``
(:func:`pivotmerge_gui.core.calibration.compute.calibration_job`) with progress and
Cancel; a cancelled run writes nothing. On success :attr:`CalibrationDialog.calibration_written`
carries the file's path and the expert -> domain mapping (None for experts without data).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from pivotmerge_gui.core.progress import ProgressEvent

from .errors import describe_exception
from .jobs import Jobs
from .settings import data_dir
from .workers import WorkContext


def default_output() -> Path:
    """A new file in the app's data folder: ``calibration/calibration-<time>.safetensors``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return data_dir() / "calibration" / f"calibration-{stamp}.safetensors"


class _SourceRow:
    """One expert's images: path field + Folder… / File… buttons."""

    def __init__(self, dialog: CalibrationDialog, name: str, path: str | None) -> None:
        self.name = name
        self.edit = QLineEdit(path or "")
        self.edit.setPlaceholderText("folder of images or .jsonl (empty: no calibration data)")
        self.folder = QPushButton("Folder…")
        self.file = QPushButton("File…")
        self.folder.clicked.connect(lambda: self._pick(dialog, folder=True))
        self.file.clicked.connect(lambda: self._pick(dialog, folder=False))

    def _pick(self, dialog: QWidget, folder: bool) -> None:
        start = self.edit.text() or str(Path.home())
        if folder:
            path = QFileDialog.getExistingDirectory(dialog, f"Images for {self.name}", start)
        else:
            path, _ = QFileDialog.getOpenFileName(dialog, f"Image list for {self.name}", start,
                                                  "Image lists (*.jsonl)")
        if path:
            self.edit.setText(path)

    @property
    def path(self) -> str:
        return self.edit.text().strip()


class CalibrationDialog(QDialog):
    """See the module docstring. ``sources``: expert name -> prefilled image source path
    (or None), in expert order."""

    calibration_written = Signal(str, dict)

    def __init__(self, sources: Mapping[str, str | None], *, encoder: str = "",
                 output: str | Path | None = None, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Calibration")
        self.rows = [_SourceRow(self, name, path) for name, path in sources.items()]
        grid = QGridLayout()
        for r, row in enumerate(self.rows):
            grid.addWidget(QLabel(row.name), r, 0)
            grid.addWidget(row.edit, r, 1)
            grid.addWidget(row.folder, r, 2)
            grid.addWidget(row.file, r, 3)
        grid.setColumnStretch(1, 1)
        images = QGroupBox("Images of each expert's domain")
        images.setLayout(grid)

        self.encoder = QLineEdit(encoder)
        self.encoder.setPlaceholderText("model folder or Hub id (Llava, LlavaNext, Qwen2-VL, CLIP, SigLIP) or 'demo'")
        self.encoder.setToolTip("Only the vision tower and image processor are loaded, never the language model.")
        browse_enc = QPushButton("Browse…")
        browse_enc.clicked.connect(self._browse_encoder)
        enc_row = QHBoxLayout()
        enc_row.addWidget(self.encoder, 1)
        enc_row.addWidget(browse_enc)

        from pivotmerge_gui.core.calibration.compute import DEFAULT_TOKENS_PER_IMAGE

        self.tokens = QSpinBox()
        self.tokens.setRange(1, 1_000_000)
        self.tokens.setValue(DEFAULT_TOKENS_PER_IMAGE)
        self.tokens.setToolTip("A seeded random subset of tokens per image: a few dozen tokens from many images "
                               "describe a domain better than all tokens of a few, and the file stays small.")
        self.all_tokens = QCheckBox("All tokens")
        self.all_tokens.toggled.connect(lambda on: self.tokens.setEnabled(not on))
        tok_row = QHBoxLayout()
        tok_row.addWidget(self.tokens)
        tok_row.addWidget(self.all_tokens)
        tok_row.addStretch(1)
        self.max_images = QSpinBox()
        self.max_images.setRange(0, 10_000_000)
        self.max_images.setSpecialValueText("all")
        self.device = QComboBox()
        self.device.addItem("auto", "auto")
        from pivotmerge_gui.core.devices import available_devices

        for d in available_devices():
            self.device.addItem(d.label, d.name)

        self.output = QLineEdit(str(output) if output is not None else str(default_output()))
        browse_out = QPushButton("Browse…")
        browse_out.clicked.connect(self._browse_output)
        out_row = QHBoxLayout()
        out_row.addWidget(self.output, 1)
        out_row.addWidget(browse_out)
        self.overwrite = QCheckBox("Replace an existing file")

        form = QFormLayout()
        form.addRow("Encoder", enc_row)
        form.addRow("Tokens per image", tok_row)
        form.addRow("Max images per domain", self.max_images)
        form.addRow("Device", self.device)
        form.addRow("Output file", out_row)
        form.addRow("", self.overwrite)

        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.run_button = QPushButton("Compute")
        self.run_button.setDefault(True)
        self.close_button = QPushButton("Close")
        buttons = QHBoxLayout()
        buttons.addStretch(1)
        buttons.addWidget(self.run_button)
        buttons.addWidget(self.close_button)
        lay = QVBoxLayout(self)
        lay.addWidget(images)
        lay.addLayout(form)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addLayout(buttons)
        self.resize(720, 0)

        self.run_button.clicked.connect(self.start)
        self.close_button.clicked.connect(self.cancel)
        self.jobs = Jobs()
        self.job = self.jobs.slot("calibration", progressed=self._progressed, finished=self._finished,
                                  failed=self._failed, cancelled=self._cancelled, stopped=self._stopped)
        self.summary: Any = None
        self.error: BaseException | None = None

    # ------------------------------------------------------------ inputs
    def _browse_encoder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Model folder", self.encoder.text() or str(Path.home()))
        if path:
            self.encoder.setText(path)

    def _browse_output(self) -> None:
        path, _ = QFileDialog.getSaveFileName(self, "Calibration file", self.output.text(),
                                              "Calibration (*.safetensors)")
        if path:
            self.output.setText(path if path.endswith(".safetensors") else path + ".safetensors")

    def mapping(self) -> dict[str, str | None]:
        """Expert name -> domain name in the file (its own name) or None (no images)."""
        return {row.name: row.name if row.path else None for row in self.rows}

    def settings(self) -> dict[str, Any]:
        return {
            "encoder": self.encoder.text().strip(),
            "sources": {row.name: row.path for row in self.rows if row.path},
            "tokens_per_image": None if self.all_tokens.isChecked() else self.tokens.value(),
            "all_tokens": self.all_tokens.isChecked(),
            "max_images": self.max_images.value() or None,
            "device": self.device.currentData(),
            "output": self.output.text().strip(),
            "overwrite": self.overwrite.isChecked(),
        }

    # ------------------------------------------------------------ work
    def start(self) -> None:
        s = self.settings()
        problem = ("Enter an encoder (model folder, Hub id or 'demo')." if not s["encoder"] else
                   "Give images for at least one expert." if not s["sources"] else
                   "Choose an output file." if not s["output"] else "")
        if problem:
            self._show_error(problem)
            return
        self.error = None
        self.summary = None
        self.run_button.setEnabled(False)
        self.close_button.setText("Cancel")
        self.progress.setValue(0)
        self.status.setText(f"Loading the encoder {s['encoder']} …")
        self.job.start(_calibration_job(s))

    def _progressed(self, ev: ProgressEvent) -> None:
        self.progress.setValue(int(ev.fraction * 1000))
        self.status.setText(ev.message or ev.stage)

    def _finished(self, summary: Any) -> None:
        self.summary = summary
        self.progress.setValue(1000)
        lines = "<br>".join(summary.lines())
        skipped = [f"{d}: {img}: {why}" for d, dom in summary.domains.items() for img, why in dom.skipped[:3]]
        self.status.setText(f"Wrote {summary.path} (sha256 {summary.sha256[:12]}…)<br>{lines}"
                            + ("<br>Skipped: " + "; ".join(skipped) if skipped else ""))
        self.calibration_written.emit(str(summary.path), self.mapping())

    def _failed(self, exc: BaseException, tb: str) -> None:
        self.error = exc
        short, _ = describe_exception(exc, tb)
        self._show_error(short)

    def _show_error(self, text: str) -> None:
        import html

        self.status.setText(f"<span style='color:#b71c1c'>{html.escape(text)}</span>")

    def _cancelled(self) -> None:
        self.progress.setValue(0)
        self.status.setText("Cancelled; nothing was written.")

    def _stopped(self) -> None:
        self.run_button.setEnabled(True)
        self.close_button.setText("Close")

    @property
    def busy(self) -> bool:
        return self.job.busy

    def cancel(self) -> None:
        """Cancel the running job, or close the dialog when idle."""
        if self.job.busy:
            self.job.cancel()
        else:
            self.reject()

    def reject(self) -> None:
        if self.job.worker is not None:  # closing the dialog cancels the work
            worker = self.job.worker
            worker.cancel()
            worker.wait(5000)
        self.jobs.detach_all()
        super().reject()


def _calibration_job(s: dict[str, Any]):  # type: ignore[no-untyped-def]
    def job(ctx: WorkContext) -> Any:
        from pivotmerge_gui.core.calibration.compute import calibration_job, source_from_path
        from pivotmerge_gui.core.progress import rescaled

        sources = [source_from_path(name, Path(path).expanduser()) for name, path in s["sources"].items()]
        yield ProgressEvent("load", 0.0, f"loading the encoder {s['encoder']}")
        if s["encoder"] == "demo":  # the demo world's encoder (as `pivotmerge calibrate --encoder demo`)
            from pivotmerge_gui.demo.calibration import DemoEncoder
            from pivotmerge_gui.demo.kit import load_world

            encoder: Any = DemoEncoder(load_world())
        else:
            from pivotmerge_gui.core.calibration.encoders import load_encoder

            encoder = load_encoder(s["encoder"], device=s["device"])
        ctx.raise_if_cancelled()
        gen = calibration_job(encoder, sources, Path(s["output"]).expanduser(),
                              tokens_per_image=s["tokens_per_image"], all_tokens=s["all_tokens"],
                              max_images=s["max_images"], overwrite=s["overwrite"],
                              protected=[Path(x.root) for x in sources], cancel=ctx.cancel)
        return (yield from rescaled(gen, 0.05, 1.0, ctx.cancel))

    return job
