"""Dialogs: Add from Hub (download with progress and cancel) and Save merged."""

from __future__ import annotations

import html
import re
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.options import OUT_DTYPES, OUTPUT_FORMAT_LABELS
from pivotmerge_gui.core.progress import ProgressEvent

from .errors import describe_exception
from .workers import GeneratorWorker, WorkContext

SAVE_FORMATS = tuple(OUTPUT_FORMAT_LABELS.items())
SAVE_DTYPES = tuple((d, "same as the merge output" if d == "auto" else d) for d in OUT_DTYPES)


def fresh_folder(folder: str | Path) -> Path:
    """``folder`` when it does not exist or is empty, else the first free ``NAME-2``,
    ``NAME-3``, ... beside it (so Save in the dialog's default works without overwriting)."""
    folder = Path(folder).expanduser()
    if not folder.exists() or (folder.is_dir() and not any(folder.iterdir())):
        return folder
    stem = re.sub(r"-\d+$", "", folder.name)
    n = 2
    while (folder.parent / f"{stem}-{n}").exists():
        n += 1
    return folder.parent / f"{stem}-{n}"


def hub_spec(repo: str, revision: str = "", filename: str = "") -> str:
    """``org/name[@rev][:file]`` as the core's hub resolver reads it."""
    spec = repo.strip()
    if revision.strip():
        spec += "@" + revision.strip()
    if filename.strip():
        spec += ":" + filename.strip()
    return spec


def _load_projector_job(spec: str, probe_timeout: float = 3.0):  # type: ignore[no-untyped-def]
    def job(ctx: WorkContext) -> Any:
        import contextlib

        from pivotmerge_gui.core.io import load_projector
        from pivotmerge_gui.core.io.hub import hub_offline, probe_hub, unreachable_hub

        # a quick probe first: offline, the Hub client would wait and retry for up to a minute
        why = None if hub_offline() else probe_hub(probe_timeout)
        with unreachable_hub(why) if why else contextlib.nullcontext():
            return load_projector(spec, progress=ctx.emit, cancel=ctx.cancel)

    return job


class HubDialog(QDialog):
    """Asks for a Hub id and downloads only the projector tensors, with progress and cancel.

    The dialog lives on the GUI thread; the download runs in a :class:`GeneratorWorker`.
    After ``exec()`` returns Accepted, ``spec`` and ``projector`` hold the result.
    """

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Add from the Hugging Face Hub")
        self.repo = QLineEdit()
        self.repo.setPlaceholderText("org/name, e.g. liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5")
        self.revision = QLineEdit()
        self.revision.setPlaceholderText("main")
        self.filename = QLineEdit()
        self.filename.setPlaceholderText("optional, e.g. mm_projector.bin")
        form = QFormLayout()
        form.addRow("Repository", self.repo)
        form.addRow("Revision", self.revision)
        form.addRow("File", self.filename)
        note = QLabel("Only the projector tensors are downloaded; files already in the Hub "
                      "cache are used offline.")
        note.setWordWrap(True)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        # room for a three-line message, so a long error does not squash the fields above
        self.status.setMinimumHeight(3 * self.status.fontMetrics().lineSpacing() + 6)
        self.status.setAlignment(Qt.AlignmentFlag.AlignTop | Qt.AlignmentFlag.AlignLeft)
        self.add_button = QPushButton("Add")
        self.add_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.add_button)
        row.addWidget(self.cancel_button)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(note)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addLayout(row)
        self.resize(560, 0)
        self.add_button.clicked.connect(self.start)
        self.cancel_button.clicked.connect(self.cancel)
        self.worker: GeneratorWorker | None = None
        self.spec = ""
        self.projector: Any = None
        self.error: BaseException | None = None

    def start(self) -> None:
        if not self.repo.text().strip():
            self.status.setText("Enter a repository id (org/name).")
            return
        self.spec = hub_spec(self.repo.text(), self.revision.text(), self.filename.text())
        self.add_button.setEnabled(False)
        self.status.setText(f"Resolving {self.spec} …")
        w = GeneratorWorker(_load_projector_job(self.spec), name="hub-download")
        w.progressed.connect(self._progressed)
        w.finished.connect(self._finished)
        w.failed.connect(self._failed)
        w.cancelled.connect(self._cancelled)
        self.worker = w.start()

    def _progressed(self, ev: ProgressEvent) -> None:
        self.progress.setValue(int(ev.fraction * 1000))
        self.status.setText(ev.message or ev.stage)

    def _finished(self, projector: Any) -> None:
        self.projector = projector
        self.worker = None
        self.accept()

    def _failed(self, exc: BaseException, tb: str) -> None:
        self.error = exc
        self.worker = None
        self.add_button.setEnabled(True)
        short, _ = describe_exception(exc, tb)
        self.status.setText(f"<span style='color:#b71c1c'>{html.escape(short)}</span>")
        self.progress.setValue(0)
        # a longer message grows the dialog; it never takes height from the fields
        self.resize(self.width(), max(self.height(), self.sizeHint().height()))

    def _cancelled(self) -> None:
        self.worker = None
        self.add_button.setEnabled(True)
        self.status.setText("Download cancelled.")
        self.progress.setValue(0)

    def cancel(self) -> None:
        if self.worker is not None:
            self.worker.cancel()
        else:
            self.reject()

    def reject(self) -> None:
        if self.worker is not None:  # closing the dialog cancels the download
            self.worker.cancel()
            self.worker.wait(2000)
        super().reject()


class SaveDialog(QDialog):
    """Chooses output folder, format and dtype for the merged projector. GUI thread."""

    def __init__(self, folder: str, input_family: str = "", parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setWindowTitle("Save merged projector")
        self.folder = QLineEdit(folder)
        browse = QPushButton("Browse…")
        browse.clicked.connect(self._browse)
        frow = QHBoxLayout()
        frow.addWidget(self.folder, 1)
        frow.addWidget(browse)
        self.format = QComboBox()
        for key, label in SAVE_FORMATS:
            self.format.addItem(label, key)
        self.dtype = QComboBox()
        for key, label in SAVE_DTYPES:
            self.dtype.addItem(label, key)
        self.overwrite = QCheckBox("Replace an earlier output in this folder")
        self.into = QLineEdit()
        self.into.setPlaceholderText("optional: a model folder or Hub id (org/name) to save a complete model")
        self.into.setToolTip("Full-model export: the folder becomes that model with the merged projector "
                             "spliced in (its layout and dtype; format and dtype above do not apply). "
                             "The model itself is never changed.")
        form = QFormLayout()
        form.addRow("Folder", frow)
        form.addRow("Format", self.format)
        form.addRow("Dtype", self.dtype)
        form.addRow("Into model", self.into)
        form.addRow("", self.overwrite)
        info = QLabel("Writes the projector, recipe.yml (runs with `pivotmerge merge`) and a "
                      "README.md model card. Inputs are never overwritten."
                      + (f" Input family: {input_family}." if input_family else ""))
        info.setWordWrap(True)
        buttons = QDialogButtonBox(QDialogButtonBox.StandardButton.Save
                                   | QDialogButtonBox.StandardButton.Cancel)
        buttons.accepted.connect(self.accept)
        buttons.rejected.connect(self.reject)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(info)
        lay.addWidget(buttons)
        self.resize(560, 0)

    def _browse(self) -> None:
        d = QFileDialog.getExistingDirectory(self, "Output folder", self.folder.text())
        if d:
            self.folder.setText(d)

    def into_model(self) -> str:
        """The model for a full-model export ("" for the projector alone)."""
        return self.into.text().strip()

    def values(self) -> tuple[Path, str, str, bool]:
        return (Path(self.folder.text()).expanduser(), self.format.currentData(),
                self.dtype.currentData(), self.overwrite.isChecked())


def is_user_error(exc: BaseException) -> bool:
    return isinstance(exc, PivotMergeError)
