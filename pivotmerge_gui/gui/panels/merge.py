"""Merge setup: method picker, generated settings form, device/dtypes/seed, per-layer
coefficients, live validation, progress and cancel.

The settings form is generated from the method's ``Param`` metadata (bool -> check box,
int/float -> spin box with the declared range, choices -> combo box, str -> line edit), so
a new method in the core registry needs no GUI code.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGridLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QProgressBar,
    QPushButton,
    QScrollArea,
    QSlider,
    QSpinBox,
    QToolButton,
    QVBoxLayout,
    QWidget,
)

from pivotmerge_gui.core.options import DTYPES

SLIDER_STEPS = 100  # slider ticks per 1.0 of coefficient
COEF_MAX = 3.0


def _param_tooltip(p: Any, reference_url: str) -> str:
    rng = ""
    if p.min is not None or p.max is not None:
        rng = f"<br>range: {'' if p.min is None else p.min} … {'' if p.max is None else p.max}"
    return (f"<b>{p.name}</b> ({p.type.__name__}, default {p.default!r})<br>{p.help}{rng}"
            f"<br><i>reference: {reference_url}</i>")


class ParamFormPanel(QWidget):
    """Widgets generated from a method's ``params`` metadata. GUI thread.

    ``values()`` returns only the parameters that differ from the defaults, so recipes stay
    short and a later change of a default reaches old setups. Advanced parameters sit in a
    collapsible group.
    """

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._params: list[Any] = []
        self._widgets: dict[str, QWidget] = {}
        self._layout = QVBoxLayout(self)
        self._layout.setContentsMargins(0, 0, 0, 0)
        self._host: QWidget | None = None

    #: Parameters set elsewhere in the window (the pivot is ticked in the expert list).
    EXTERNAL: ClassVar[dict[str, str]] = {"pivot": "Tick the Pivot column of the expert list (none ticked = automatic)."}

    def set_method(self, method: Any) -> None:
        if self._host is not None:
            self._layout.removeWidget(self._host)
            self._host.hide()  # deleted later, by the event loop: not drawn under the new form meanwhile
            self._host.deleteLater()
        self._params = list(method.params)
        self._widgets = {}
        host = QWidget()
        outer = QVBoxLayout(host)
        outer.setContentsMargins(0, 0, 0, 0)
        basic = QFormLayout()
        basic.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        adv_host = QWidget()
        adv = QFormLayout(adv_host)
        adv.setContentsMargins(0, 0, 0, 0)
        adv.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.AllNonFixedFieldsGrow)
        adv_count = 0
        self.external_labels: dict[str, QLabel] = {}
        for p in self._params:
            tip = _param_tooltip(p, method.reference_url)
            if p.name in self.EXTERNAL:
                ext = QLabel("automatic")
                ext.setWordWrap(True)
                ext.setToolTip(tip + "<br>" + self.EXTERNAL[p.name])
                ext.setStyleSheet("color: #444;")
                self.external_labels[p.name] = ext
                basic.addRow(p.name.replace("_", " "), ext)
                continue
            w = self._make_widget(p)
            w.setToolTip(tip)
            label = QLabel(p.name.replace("_", " "))
            label.setToolTip(tip)
            self._widgets[p.name] = w
            if p.advanced:
                adv.addRow(label, w)
                adv_count += 1
            else:
                basic.addRow(label, w)
        outer.addLayout(basic)
        self.advanced_toggle = QToolButton()
        self.advanced_toggle.setCheckable(True)
        self.advanced_toggle.setToolButtonStyle(Qt.ToolButtonStyle.ToolButtonTextBesideIcon)
        self.advanced_toggle.setArrowType(Qt.ArrowType.RightArrow)
        self.advanced_toggle.setText(f"Advanced settings ({adv_count})")
        self.advanced_toggle.setAutoRaise(True)

        def _toggle(on: bool) -> None:
            adv_host.setVisible(on)
            self.advanced_toggle.setArrowType(Qt.ArrowType.DownArrow if on else Qt.ArrowType.RightArrow)

        self.advanced_toggle.toggled.connect(_toggle)
        _toggle(False)
        if adv_count:
            outer.addWidget(self.advanced_toggle)
            outer.addWidget(adv_host)
        else:
            self.advanced_toggle.hide()
            adv_host.deleteLater()
        if not self._params:
            outer.addWidget(QLabel("This method has no settings."))
        self._host = host
        self._layout.addWidget(host)

    def _make_widget(self, p: Any) -> QWidget:
        if p.choices is not None:
            w = QComboBox()
            for c in p.choices:
                w.addItem(str(c), c)
            w.setCurrentIndex(list(p.choices).index(p.default) if p.default in p.choices else 0)
            w.currentIndexChanged.connect(self._emit)
            return w
        if p.type is bool:
            w = QCheckBox()
            w.setChecked(bool(p.default))
            w.toggled.connect(self._emit)
            return w
        if p.type is int:
            w = QSpinBox()
            w.setRange(int(p.min) if p.min is not None else -1_000_000,
                       int(p.max) if p.max is not None else 1_000_000)
            w.setValue(int(p.default))
            w.valueChanged.connect(self._emit)
            return w
        if p.type is float:
            w = QDoubleSpinBox()
            lo = float(p.min) if p.min is not None else -1e6
            hi = float(p.max) if p.max is not None else 1e6
            w.setRange(lo, hi)
            span = hi - lo
            w.setDecimals(4 if span <= 10 else 3)
            w.setSingleStep(0.01 if span <= 2 else 0.1 if span <= 20 else 1.0)
            w.setValue(float(p.default))
            w.valueChanged.connect(self._emit)
            return w
        w = QLineEdit(str(p.default))
        w.textChanged.connect(self._emit)
        return w

    def set_external(self, name: str, text: str) -> None:
        lab = getattr(self, "external_labels", {}).get(name)
        if lab is not None:
            lab.setText(text)

    def _emit(self, *args: object) -> None:
        self.changed.emit()

    def widget(self, name: str) -> QWidget | None:
        return self._widgets.get(name)

    def all_values(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self._params:
            w = self._widgets.get(p.name)
            if w is None:
                continue
            if isinstance(w, QComboBox):
                out[p.name] = w.currentData()
            elif isinstance(w, QCheckBox):
                out[p.name] = w.isChecked()
            elif isinstance(w, QSpinBox):
                out[p.name] = int(w.value())
            elif isinstance(w, QDoubleSpinBox):
                out[p.name] = float(w.value())
            elif isinstance(w, QLineEdit):
                out[p.name] = w.text()
        return out

    def values(self) -> dict[str, Any]:
        """Parameters that differ from the method's defaults."""
        defaults = {p.name: p.default for p in self._params}
        out: dict[str, Any] = {}
        for k, v in self.all_values().items():
            d = defaults[k]
            if isinstance(v, float) and isinstance(d, (int, float)) and not isinstance(d, bool):
                if math.isclose(v, float(d), rel_tol=1e-9, abs_tol=1e-12):
                    continue
            elif v == d:
                continue
            out[k] = v
        return out

    def set_values(self, values: dict[str, Any]) -> None:
        for k, v in values.items():
            w = self._widgets.get(k)
            if w is None:
                continue
            if isinstance(w, QComboBox):
                i = w.findData(v)
                if i >= 0:
                    w.setCurrentIndex(i)
            elif isinstance(w, QCheckBox):
                w.setChecked(bool(v))
            elif isinstance(w, QSpinBox):
                w.setValue(int(v))
            elif isinstance(w, QDoubleSpinBox):
                w.setValue(float(v))
            elif isinstance(w, QLineEdit):
                w.setText(str(v))


class LayerCoefficientsPanel(QWidget):
    """One slider per layer: the coefficient the merge used (filled from the report) and an
    "override" tick that puts the user's value into ``Recipe.layer_coefficients``. GUI thread."""

    changed = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self._rows: dict[str, tuple[QCheckBox, QSlider, QDoubleSpinBox, QLabel]] = {}
        self._grid = QGridLayout(self)
        self._grid.setContentsMargins(0, 0, 0, 0)
        self._empty = QLabel("Load experts to set per-layer coefficients.")
        self._empty.setWordWrap(True)
        self._grid.addWidget(self._empty, 0, 0, 1, 4)
        self._layers: list[str] = []
        self._pending: dict[str, float] = {}  # overrides for layers not shown yet (a restore)

    def set_layers(self, names: list[str]) -> None:
        if names == self._layers:
            return
        keep = {**self._pending, **self.overrides()}
        self._pending = {}
        for chk, sl, spin, lab in self._rows.values():
            for w in (chk, sl, spin, lab):
                self._grid.removeWidget(w)
                w.deleteLater()
        self._rows = {}
        self._layers = list(names)
        self._empty.setVisible(not names)
        for i, name in enumerate(names, start=1):
            chk = QCheckBox(name)
            chk.setToolTip(f"Override the coefficient of layer '{name}' (unticked: the method decides)")
            sl = QSlider(Qt.Orientation.Horizontal)
            sl.setRange(0, int(COEF_MAX * SLIDER_STEPS))
            sl.setValue(SLIDER_STEPS)
            spin = QDoubleSpinBox()
            spin.setRange(0.0, COEF_MAX)
            spin.setDecimals(3)
            spin.setSingleStep(0.05)
            spin.setValue(1.0)
            auto = QLabel("")
            auto.setMinimumWidth(auto.fontMetrics().horizontalAdvance("used 0.000 "))
            auto.setToolTip("Coefficient the last merge used for this layer")
            sl.setEnabled(False)
            spin.setEnabled(False)
            sl.valueChanged.connect(lambda v, s=spin: s.setValue(v / SLIDER_STEPS))
            spin.valueChanged.connect(lambda v, s=sl: (s.blockSignals(True), s.setValue(round(v * SLIDER_STEPS)),
                                                        s.blockSignals(False), self.changed.emit()))
            chk.toggled.connect(lambda on, a=sl, b=spin: (a.setEnabled(on), b.setEnabled(on), self.changed.emit()))
            self._grid.addWidget(chk, i, 0)
            self._grid.addWidget(sl, i, 1)
            self._grid.addWidget(spin, i, 2)
            self._grid.addWidget(auto, i, 3)
            self._rows[name] = (chk, sl, spin, auto)
        self._grid.setColumnStretch(1, 1)
        self.set_overrides({k: v for k, v in keep.items() if k in self._rows})

    @property
    def layers(self) -> list[str]:
        return list(self._layers)

    def overrides(self) -> dict[str, float]:
        """Ticked layers' values (and those of a restored recipe whose layers are not
        shown yet, so they are not lost before the experts load)."""
        shown = {n: float(spin.value()) for n, (chk, _, spin, _) in self._rows.items() if chk.isChecked()}
        return {**self._pending, **shown}

    def set_overrides(self, values: dict[str, float] | None) -> None:
        self._pending = {k: float(v) for k, v in (values or {}).items() if k not in self._rows}
        for name, (chk, _, spin, _) in self._rows.items():
            if values and name in values:
                spin.setValue(float(values[name]))
                chk.setChecked(True)
            else:
                chk.setChecked(False)

    def set_used(self, used: dict[str, float]) -> None:
        """Show the coefficients a merge used; un-overridden sliders move to them."""
        for name, (chk, sl, spin, lab) in self._rows.items():
            if name in used:
                lab.setText(f"used {used[name]:.3f}")
                if not chk.isChecked():
                    spin.blockSignals(True)
                    spin.setValue(min(max(float(used[name]), 0.0), COEF_MAX))
                    spin.blockSignals(False)
                    sl.blockSignals(True)
                    sl.setValue(round(spin.value() * SLIDER_STEPS))
                    sl.blockSignals(False)
            else:
                lab.setText("")


class MergePanel(QWidget):
    """The merge form and its run controls. GUI thread; the merge itself runs in a worker.

    Emits ``changed`` on any edit (the window re-validates), ``merge_requested`` and
    ``cancel_requested``.
    """

    changed = Signal()
    merge_requested = Signal()
    cancel_requested = Signal()
    save_requested = Signal()
    calibration_chosen = Signal(object)  # a features file, or None to clear
    calibration_compute_requested = Signal()

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.methods: dict[str, Any] = {}
        self._building = False

        self.method_combo = QComboBox()
        self.method_combo.addItem("Loading merge methods…", None)
        self.method_combo.setEnabled(False)
        self.method_info = QLabel()
        self.method_info.setWordWrap(True)
        self.method_info.setOpenExternalLinks(True)
        self.method_info.setTextFormat(Qt.TextFormat.RichText)
        self.form = ParamFormPanel()

        self.device_combo = QComboBox()
        self.device_combo.addItem("auto (CUDA if available)", "auto")
        self.device_combo.addItem("CPU", "cpu")
        self.dtype_combo = QComboBox()
        for d in DTYPES:
            self.dtype_combo.addItem(d, d)
        self.out_dtype_combo = QComboBox()
        self.out_dtype_combo.addItem("same as experts", "auto")
        for d in DTYPES:
            self.out_dtype_combo.addItem(d, d)
        self.seed_spin = QSpinBox()
        self.seed_spin.setRange(0, 2**31 - 1)
        self.seed_spin.setToolTip("Random seed for randomized methods (same seed, same result)")
        self.allow_nonfinite_check = QCheckBox("Allow NaN/Inf in inputs")
        self.allow_nonfinite_check.setToolTip(
            "Experts holding NaN or Inf block the merge, since the damage spreads to every "
            "merged weight. Tick to merge anyway (the report records a warning).")
        run_box = QGroupBox("Run on")
        rf = QFormLayout(run_box)
        rf.addRow("Device", self.device_combo)
        rf.addRow("Compute dtype", self.dtype_combo)
        rf.addRow("Output dtype", self.out_dtype_combo)
        rf.addRow("Seed", self.seed_spin)
        rf.addRow("", self.allow_nonfinite_check)

        method_box = QGroupBox("Method")
        mb = QVBoxLayout(method_box)
        mb.addWidget(self.method_combo)
        mb.addWidget(self.method_info)
        mb.addWidget(self.form)

        self.calibration_label = QLabel()
        self.calibration_label.setWordWrap(True)
        self.calibration_choose = QPushButton("Choose…")
        self.calibration_choose.setToolTip("Use a calibration file (made by Compute… or `pivotmerge calibrate`)")
        self.calibration_compute = QPushButton("Compute…")
        self.calibration_compute.setToolTip("Make a calibration file from images of each expert's domain")
        self.calibration_compute.clicked.connect(self.calibration_compute_requested)
        self.calibration_clear = QPushButton("Clear")
        self.calibration_choose.clicked.connect(self._choose_calibration)
        self.calibration_clear.clicked.connect(lambda: self.calibration_chosen.emit(None))
        cal_box = QGroupBox("Calibration features (optional)")
        cal_box.setToolTip("Unlabelled projector inputs from each expert's domain (a calibration "
                           "file): data-driven ALM, automatic pivot by alignment, RegMean")
        cl = QVBoxLayout(cal_box)
        cl.addWidget(self.calibration_label)
        crow = QHBoxLayout()
        crow.addStretch(1)
        for b in (self.calibration_compute, self.calibration_choose, self.calibration_clear):
            crow.addWidget(b)
        cl.addLayout(crow)
        self.show_calibration("none", "", False)

        self.coefficients = LayerCoefficientsPanel()
        coef_box = QGroupBox("Per-layer coefficients")
        cb = QVBoxLayout(coef_box)
        cb.addWidget(self.coefficients)

        self.validation_label = QLabel("Add experts to start.")
        self.validation_label.setWordWrap(True)
        self.validation_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        self.merge_button = QPushButton("Merge")
        self.merge_button.setEnabled(False)
        self.merge_button.setDefault(True)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.save_button = QPushButton("Save…")  # short: four buttons share a 300 px row
        self.save_button.setToolTip("Save the merged projector with its recipe and model card (Ctrl+S)")
        self.save_button.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setRange(0, 1000)
        self.progress.setValue(0)
        self.progress.setTextVisible(False)
        self.stage_label = QLabel("")
        self.stage_label.setWordWrap(True)
        buttons = QHBoxLayout()
        buttons.addWidget(self.merge_button, 2)
        buttons.addWidget(self.cancel_button, 1)
        buttons.addWidget(self.save_button, 2)

        inner = QWidget()
        il = QVBoxLayout(inner)
        il.setContentsMargins(0, 0, 0, 0)
        il.addWidget(method_box)
        il.addWidget(run_box)
        il.addWidget(cal_box)
        il.addWidget(coef_box)
        il.addStretch(1)
        scroll = QScrollArea()
        scroll.setWidget(inner)
        scroll.setWidgetResizable(True)
        scroll.setFrameShape(QScrollArea.Shape.NoFrame)
        scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)

        self.setMinimumWidth(300)  # 1024 px windows: list + views + form
        layout = QVBoxLayout(self)
        layout.setContentsMargins(4, 4, 4, 4)
        layout.addWidget(QLabel("<b>Merge</b>"))
        layout.addWidget(scroll, 1)
        layout.addWidget(self.validation_label)
        layout.addLayout(buttons)
        layout.addWidget(self.progress)
        layout.addWidget(self.stage_label)

        self.method_combo.currentIndexChanged.connect(self._method_changed)
        self.form.changed.connect(self._emit_changed)
        self.coefficients.changed.connect(self._emit_changed)
        for combo in (self.device_combo, self.dtype_combo, self.out_dtype_combo):
            combo.currentIndexChanged.connect(self._emit_changed)
        self.seed_spin.valueChanged.connect(self._emit_changed)
        self.allow_nonfinite_check.toggled.connect(self._emit_changed)
        self.merge_button.clicked.connect(self.merge_requested.emit)
        self.cancel_button.clicked.connect(self.cancel_requested.emit)
        self.save_button.clicked.connect(self.save_requested.emit)

    def _emit_changed(self, *args: object) -> None:
        if not self._building:
            self.changed.emit()

    # ------------------------------------------------------------------ population
    def set_methods(self, methods: list[Any], default: str = "pivotmerge") -> None:
        self._building = True
        self.methods = {m.name: m for m in methods}
        self.method_combo.clear()
        for m in methods:
            self.method_combo.addItem(m.pretty_name, m.name)
            self.method_combo.setItemData(self.method_combo.count() - 1, m.description,
                                          Qt.ItemDataRole.ToolTipRole)
        self.method_combo.setEnabled(True)
        i = self.method_combo.findData(default)
        self._building = False
        self.method_combo.setCurrentIndex(max(i, 0))
        self._method_changed()

    def set_devices(self, devices: list[Any]) -> None:
        current = self.device_combo.currentData()
        self._building = True
        self.device_combo.clear()
        self.device_combo.addItem("auto (CUDA if available)", "auto")
        for d in devices:
            self.device_combo.addItem(d.label, d.name)
        i = self.device_combo.findData(current)
        self.device_combo.setCurrentIndex(max(i, 0))
        self._building = False

    def _method_changed(self, *args: object) -> None:
        name = self.method_combo.currentData()
        m = self.methods.get(name)
        if m is None:
            return
        needs = []
        if m.needs_base:
            needs.append("needs the base (shared init)")
        elif getattr(m, "uses_base", False):
            needs.append("uses the base when given")
        if m.needs_calibration:
            needs.append("needs calibration features")
        extra = f"<br><i>{'; '.join(needs)}</i>" if needs else ""
        self.method_info.setText(f"{m.description} <a href='{m.reference_url}'>reference</a>{extra}")
        self.form.set_method(m)
        self._emit_changed()

    @property
    def method(self) -> Any:
        return self.methods.get(self.method_combo.currentData())

    def method_name(self) -> str | None:
        return self.method_combo.currentData()

    def set_method_name(self, name: str) -> bool:
        i = self.method_combo.findData(name)
        if i < 0:
            return False
        self.method_combo.setCurrentIndex(i)
        return True

    def show_calibration(self, label: str, tooltip: str, clearable: bool) -> None:
        """Show the calibration the session holds (a file, features in memory, or none)."""
        self.calibration_label.setText(label)
        self.calibration_label.setToolTip(tooltip)
        self.calibration_clear.setEnabled(clearable)

    def _choose_calibration(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Calibration features", "",
                                           "safetensors (*.safetensors);;All files (*)")
        if f:
            self.calibration_chosen.emit(f)

    def settings(self) -> dict[str, Any]:
        """The run settings as recipe fields."""
        return {
            "dtype": self.dtype_combo.currentData(),
            "out_dtype": self.out_dtype_combo.currentData(),
            "device": self.device_combo.currentData() or "auto",
            "random_seed": int(self.seed_spin.value()),
        }

    def apply_settings(self, dtype: str, out_dtype: str, device: str, seed: int) -> None:
        self._building = True
        for combo, v in ((self.dtype_combo, dtype), (self.out_dtype_combo, out_dtype),
                         (self.device_combo, device)):
            i = combo.findData(v)
            if i < 0 and combo is self.device_combo:
                combo.addItem(v, v)
                i = combo.count() - 1
            combo.setCurrentIndex(max(i, 0))
        self.seed_spin.setValue(int(seed))
        self._building = False

    # ------------------------------------------------------------------ state display
    def set_validation(self, ok: bool, text: str) -> None:
        color = "#1b5e20" if ok else "#b71c1c"
        self.validation_label.setText(f"<span style='color:{color}'>{'✔' if ok else '✖'} {text}</span>")
        self.validation_label.setToolTip(text)
        self.merge_button.setEnabled(ok)
        self.merge_button.setToolTip("" if ok else text)

    def set_pending(self, text: str) -> None:
        self.validation_label.setText(f"<span style='color:#555'>… {text}</span>")
        self.merge_button.setEnabled(False)
        self.merge_button.setToolTip(text)

    def set_running(self, running: bool) -> None:
        self.cancel_button.setEnabled(running)
        for w in (self.method_combo, self.form, self.device_combo, self.dtype_combo,
                  self.out_dtype_combo, self.seed_spin, self.coefficients):
            w.setEnabled(not running)
        if running:
            self.merge_button.setEnabled(False)
            self.save_button.setEnabled(False)
            self.progress.setValue(0)

    def show_progress(self, fraction: float, text: str) -> None:
        self.progress.setValue(int(max(0.0, min(1.0, fraction)) * 1000))
        self.stage_label.setText(text)
