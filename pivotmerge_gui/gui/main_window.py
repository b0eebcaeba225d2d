"""The main window: expert list, inspect views, merge panel, and the workers behind them.

Everything here runs on the GUI thread. Loading, analysis, validation (``pipeline.plan``),
merging (``pipeline.execute``) and saving run in :class:`GeneratorWorker` threads; this
class only starts them, shows their progress and routes their results. torch and the core
engine are imported by the first worker, after the window is up.
"""

from __future__ import annotations

import gc
import logging
import warnings
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

from PySide6.QtCore import QByteArray, Qt, QTimer, QUrl, Signal
from PySide6.QtGui import (
    QAction,
    QCloseEvent,
    QDesktopServices,
    QDragEnterEvent,
    QDropEvent,
    QKeySequence,
)
from PySide6.QtWidgets import (
    QFileDialog,
    QMainWindow,
    QMessageBox,
    QScrollArea,
    QSplitter,
    QTabWidget,
    QWidget,
)

from pivotmerge_gui import __version__
from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.progress import ProgressEvent

from .autotune_panel import AutoTunePanel
from .dialogs import HubDialog, SaveDialog
from .errors import ErrorDialog, describe_exception
from .models import ExpertEntry, ExpertListModel, expand_paths, paths_from_mime
from .panels.inspect import LayersPanel, SimilarityPanel, SpectraPanel
from .panels.merge import MergePanel
from .panels.model_list import ModelListPanel
from .panels.report import ReportPanel
from .settings import AppSettings, log_dir, session_file
from .testbench_panel import TestBenchPanel
from .workers import GeneratorWorker, WorkContext, stop_all

log = logging.getLogger("pivotmerge_gui.gui")
MAX_PARALLEL_LOADS = 2


def _display_name(spec: str) -> str:
    p = Path(spec)
    if p.name in ("mm_projector.bin", "model.safetensors", "pytorch_model.bin") and p.parent.name:
        return p.parent.name
    if p.suffix in (".bin", ".safetensors", ".pt", ".pth", ".ckpt"):
        return p.stem
    return p.name or spec


# --------------------------------------------------------------------------- worker jobs
# These functions run on worker threads; they are the only place the GUI touches the core
# engine's heavy modules (which import torch).
def _core_job(ctx: WorkContext) -> tuple[list[Any], list[Any]]:
    from pivotmerge_gui.core import pipeline  # noqa: F401 - warm the import off the GUI thread
    from pivotmerge_gui.core.devices import available_devices
    from pivotmerge_gui.core.methods.base import list_methods

    return list_methods(), available_devices()


def _load_job(spec: str) -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> tuple[Any, dict[str, Any]]:
        from pivotmerge_gui.core.io import load_projector, pretty_family

        from .models import describe_projector

        projector = load_projector(spec, progress=ctx.emit, cancel=ctx.cancel)
        desc = describe_projector(projector)
        desc["family"] = pretty_family(projector)
        return projector, desc

    return job


DEMO_CALIBRATION_IMAGES = 64  # unlabelled training images per domain, as in the benchmark


def _demo_job(scenario: str) -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> tuple[list[str], list[str], str | None, Any]:
        from pivotmerge_gui.demo import kit

        paths = [str(p) for p in kit.expert_paths(scenario)]
        base = kit.base_path(scenario)
        # the demo ships its own unlabelled visual features per domain, so PivotMerge's
        # data-driven ALM and RegMean work out of the box (expert order = domain order)
        calibration = kit.calibration(scenario, split="train", n=DEMO_CALIBRATION_IMAGES)
        return paths, list(kit.expert_names()), str(base) if base is not None else None, calibration

    return job


class MainWindow(QMainWindow):
    """PivotMerge Studio's main window (GUI thread)."""

    idle_reached = Signal()  # loading, analysis and validation have all settled
    merge_finished = Signal(object)

    def __init__(self, settings: AppSettings | None = None, *, start_core: bool = True,
                 restore_layout: bool = True) -> None:
        super().__init__()
        self.setWindowTitle(f"PivotMerge Studio {__version__}")
        self.setAcceptDrops(True)
        self.settings = settings or AppSettings()

        self.experts = ExpertListModel(self)
        self.list_panel = ModelListPanel(self.experts, self.settings)
        self.layers_panel = LayersPanel()
        self.spectra_panel = SpectraPanel(self.settings)
        self.similarity_panel = SimilarityPanel()
        self.report_panel = ReportPanel()
        self.bench_panel = TestBenchPanel()
        # Auto-tune lists the merge methods when built (imports torch): it joins after start-up.
        self.autotune_panel: AutoTunePanel | None = None
        self.tabs = QTabWidget()
        self.tabs.addTab(self.layers_panel, "Layers")
        self.tabs.addTab(self.spectra_panel, "Spectra")
        self.tabs.addTab(self.similarity_panel, "Similarity")
        self.tabs.addTab(self.report_panel, "Merge report")
        self.tabs.addTab(_scrolled(self.bench_panel), "Test bench")
        self.merge_panel = MergePanel()

        self.splitter = QSplitter(Qt.Orientation.Horizontal)
        self.splitter.addWidget(self.list_panel)
        self.splitter.addWidget(self.tabs)
        self.splitter.addWidget(self.merge_panel)
        self.splitter.setStretchFactor(0, 3)
        self.splitter.setStretchFactor(1, 4)
        self.splitter.setStretchFactor(2, 2)
        self.splitter.setSizes([600, 640, 440])
        self.setCentralWidget(self.splitter)
        self._build_menus()

        # state
        self.base_entry: ExpertEntry | None = None
        self.core_ready = False
        self.methods: list[Any] = []
        self.analysis: Any = None
        self.merge_result: Any = None
        self.plan: Any = None
        self._plan_key: str | None = None
        self._validation_key: str | None = None
        self._pending_recipe: tuple[Any, Path | None] | None = None
        self._pending_demos: list[tuple[str, bool]] = []
        self._load_queue: deque[tuple[int, str, str]] = deque()
        self._loads: dict[int, GeneratorWorker] = {}
        self._analysis_worker: GeneratorWorker | None = None
        self._analysis_generation = 0
        self._analysis_dirty = False
        self._validation_worker: GeneratorWorker | None = None
        self.merge_worker: GeneratorWorker | None = None
        self._save_worker: GeneratorWorker | None = None
        self._core_worker: GeneratorWorker | None = None
        self._errors_shown: list[str] = []
        self.last_saved: list[Path] = []

        self._analysis_timer = QTimer(self, singleShot=True, interval=250)
        self._analysis_timer.timeout.connect(self._start_analysis)
        self._validate_timer = QTimer(self, singleShot=True, interval=150)
        self._validate_timer.timeout.connect(self.validate_now)
        # the session is autosaved shortly after every change, so a killed app loses nothing
        self._autosave_timer = QTimer(self, singleShot=True, interval=1000)
        self._autosave_timer.timeout.connect(self.autosave_session)
        self.autosave_enabled = True

        self.list_panel.paths_added.connect(self.add_paths)
        self.list_panel.hub_requested.connect(self.add_from_hub)
        self.list_panel.base_chosen.connect(self.set_base)
        self.list_panel.base_cleared.connect(lambda: self.set_base(None))
        self.experts.experts_changed.connect(self._experts_changed)
        self.experts.experts_changed.connect(self._schedule_autosave)
        self.merge_panel.changed.connect(self._schedule_validation)
        self.merge_panel.changed.connect(self._schedule_autosave)
        self.merge_panel.merge_requested.connect(self.start_merge)
        self.merge_panel.cancel_requested.connect(self.cancel_merge)
        self.merge_panel.save_requested.connect(self.save_merged)
        self.bench_panel.alignment_scores_ready.connect(self._alignment_scores_ready)
        self.bench_panel.busy_changed.connect(lambda busy: None if busy else self._check_idle())
        self.merge_panel.changed.connect(self._sync_autotune_method)

        self.resize(1680, 960)
        geo = self.settings.geometry() if restore_layout else None
        if geo is not None:
            self.restoreGeometry(geo)
        split = self.settings.value("window/splitter") if restore_layout else None
        if isinstance(split, QByteArray):
            self.splitter.restoreState(split)
        self.statusBar().showMessage("Drop projector checkpoints (files or folders) onto the window to start.")
        self._validate_ui_only()
        if start_core:
            QTimer.singleShot(0, self.start_core)

    # ------------------------------------------------------------------ menus
    def _build_menus(self) -> None:
        m = self.menuBar().addMenu("&File")
        self.action_add = m.addAction("&Add experts…", self.list_panel._add_files)
        self.action_add.setShortcut(QKeySequence.StandardKey.Open)
        m.addAction("Add &folder…", self.list_panel._add_folder)
        m.addAction("Add from &Hub…", self.add_from_hub)
        demo = m.addMenu("Open &demo experts")
        demo.addAction("Shared init (with base)", lambda: self.open_demo("shared"))
        demo.addAction("Different inits", lambda: self.open_demo("different"))
        m.addSeparator()
        m.addAction("Open &recipe…", self.open_recipe_dialog)
        self.action_save_recipe = m.addAction("Save re&cipe…", self.save_recipe_dialog)
        self.action_save_merged = m.addAction("&Save merged…", self.save_merged)
        self.action_save_merged.setShortcut(QKeySequence.StandardKey.Save)
        self.action_save_merged.setEnabled(False)
        m.addSeparator()
        quit_action = m.addAction("&Quit", self.close)
        quit_action.setShortcut(QKeySequence.StandardKey.Quit)
        v = self.menuBar().addMenu("&View")
        for i, name in enumerate(("Layers", "Spectra", "Similarity", "Merge report", "Test bench", "Auto-tune")):
            a = QAction(name, self)
            a.setShortcut(QKeySequence(f"Ctrl+{i + 1}"))
            a.triggered.connect(lambda _=False, i=i: self.tabs.setCurrentIndex(i))
            v.addAction(a)
        h = self.menuBar().addMenu("&Help")
        h.addAction("Open &log folder", lambda: QDesktopServices.openUrl(QUrl.fromLocalFile(str(log_dir()))))
        h.addAction("&About", self._about)

    def _about(self) -> None:
        QMessageBox.about(self, "PivotMerge Studio",
                          f"PivotMerge Studio {__version__}<br>Merge the cross-modal projectors of "
                          "multimodal LLMs: PivotMerge and baselines.<br>Log folder: "
                          f"{log_dir()}")

    # ------------------------------------------------------------------ drops on the window
    def dragEnterEvent(self, event: QDragEnterEvent) -> None:
        if paths_from_mime(event.mimeData()):
            event.acceptProposedAction()

    def dragMoveEvent(self, event) -> None:  # type: ignore[no-untyped-def]
        if paths_from_mime(event.mimeData()):
            event.acceptProposedAction()

    def dropEvent(self, event: QDropEvent) -> None:
        paths = paths_from_mime(event.mimeData())
        if paths:
            event.acceptProposedAction()
            self.add_paths(paths)

    # ------------------------------------------------------------------ core start-up
    def start_core(self) -> None:
        """Import the engine (torch, methods, devices) on a worker thread."""
        if self._core_worker is not None or self.core_ready:
            return
        self.statusBar().showMessage("Loading the merge engine…")
        w = GeneratorWorker(_core_job, name="core-loader")
        w.finished.connect(self._core_loaded)
        w.failed.connect(lambda exc, tb: self.show_error("The merge engine failed to load", exc, tb))
        w.stopped.connect(self._core_stopped)
        self._core_worker = w.start()

    def _core_stopped(self) -> None:
        """The engine's imports are done (or failed): start what waited for them. Loads and
        the demo import torch & co. too; running those imports on several threads at once
        can hand a thread a half-initialised module (seen: pydantic under shiboken's import
        hook), so they wait for the engine's import thread."""
        self._core_worker = None
        pending, self._pending_demos = self._pending_demos, []
        for scenario, with_base in pending:
            self.open_demo(scenario, with_base)
        self._pump_loads()

    def _core_loaded(self, result: tuple[list[Any], list[Any]]) -> None:
        methods, devices = result
        # The engine's imports created most of the objects this process will ever hold; moving
        # them out of the collector's reach keeps full collections (which pause whichever
        # thread triggers them, the GUI's included) short. Measured: 120-200 ms -> a few ms.
        gc.freeze()
        self.methods = methods
        self.core_ready = True
        self._core_worker = None
        default = self.initial_method or str(self.settings.value("merge/method", "pivotmerge"))
        self.merge_panel.set_methods(methods, default=default)
        self.merge_panel.set_devices(devices)
        self.autotune_panel = AutoTunePanel()
        self.autotune_panel.busy_changed.connect(lambda busy: None if busy else self._check_idle())
        self.autotune_panel.apply_requested.connect(self._apply_tuned)
        self.tabs.addTab(_scrolled(self.autotune_panel), "Auto-tune")
        self._sync_side_panels()
        self.statusBar().showMessage(f"Merge engine ready: {len(methods)} methods.", 5000)
        if self._pending_recipe is not None:
            recipe, base_dir = self._pending_recipe
            self._pending_recipe = None
            self.apply_recipe(recipe, base_dir)
        self._schedule_validation()
        self._check_idle()

    # ------------------------------------------------------------------ adding experts
    def add_paths(self, paths: list[str] | tuple[str, ...]) -> list[ExpertEntry]:
        """Add experts from files, folders or Hub ids; each loads in the background."""
        added = []
        known = {e.spec for e in self.experts.entries}
        for spec in expand_paths(paths) if paths else []:
            p = Path(spec)
            if p.exists():
                spec = str(p.resolve())
            if spec in known:
                self.statusBar().showMessage(f"{spec} is already in the list", 5000)
                continue
            known.add(spec)
            added.append(self.add_spec(spec))
        return added

    def add_spec(self, spec: str, name: str | None = None, weight: float = 1.0) -> ExpertEntry:
        entry = ExpertEntry(spec=spec, name=name or _display_name(spec), weight=weight)
        self.experts.add(entry)
        self.settings.add_recent(spec)
        self._queue_load(entry.uid, spec, "expert")
        return entry

    def add_loaded(self, spec: str, projector: Any) -> ExpertEntry:
        """Add an expert that is already loaded (Add from Hub)."""
        from .models import describe_projector

        entry = ExpertEntry(spec=spec, name=_display_name(spec.split(":")[0].split("@")[0]),
                            status="ready", projector=projector, **describe_projector(projector))
        self.experts.add(entry)
        self.settings.add_recent(spec)
        return entry

    def open_demo(self, scenario: str = "shared", with_base: bool = True) -> GeneratorWorker | None:
        """Add the built-in demo experts (and their base) of a scenario; the kit is located
        on a worker because it imports torch (after the engine's imports: returns None and
        opens later while those run)."""
        if self._core_worker is not None:
            self._pending_demos.append((scenario, with_base))
            return None
        def done(result: tuple[list[str], list[str], str | None, Any]) -> None:
            paths, names, base, calibration = result
            known = {e.spec for e in self.experts.entries}
            fresh = not known
            for p, n in zip(paths, names):
                if str(Path(p).resolve()) not in known:
                    self.add_spec(str(Path(p).resolve()), name=n)
            if with_base and base is not None:
                self.set_base(base)
            if fresh and self.merge_panel.calibration_path is None and self.merge_panel.calibration_object is None:
                by_spec = {e.spec: e.uid for e in self.experts.entries}
                uids = [by_spec.get(str(Path(p).resolve())) for p in paths]
                self.set_memory_calibration(
                    calibration, f"demo features: {DEMO_CALIBRATION_IMAGES} unlabelled training "
                                 "images per domain (in memory)",
                    None if None in uids else uids)

        w = GeneratorWorker(_demo_job(scenario), name="demo")
        w.finished.connect(done)
        w.failed.connect(lambda exc, tb: self.show_error("Cannot open the demo experts", exc, tb))
        self._demo_worker = w
        w.stopped.connect(lambda: setattr(self, "_demo_worker", None))
        return w.start()

    _demo_worker: GeneratorWorker | None = None

    def add_from_hub(self) -> None:
        dlg = HubDialog(self)
        if dlg.exec() == HubDialog.DialogCode.Accepted and dlg.projector is not None:
            self.add_loaded(dlg.spec, dlg.projector)

    def set_base(self, spec: str | None) -> None:
        if spec is None:
            self.base_entry = None
            self.list_panel.set_base(None)
        else:
            p = Path(spec)
            spec = str(p.resolve()) if p.exists() else spec
            self.base_entry = ExpertEntry(spec=spec, name=_display_name(spec))
            self.list_panel.set_base(self.base_entry)
            self._queue_load(self.base_entry.uid, spec, "base")
        self._experts_changed()
        self._schedule_autosave()

    def _queue_load(self, uid: int, spec: str, target: str) -> None:
        self._load_queue.append((uid, spec, target))
        self._pump_loads()

    def _pump_loads(self) -> None:
        if self._core_worker is not None:
            return  # the engine is importing; see _core_stopped
        while self._load_queue and len(self._loads) < MAX_PARALLEL_LOADS:
            uid, spec, target = self._load_queue.popleft()
            w = GeneratorWorker(_load_job(spec), name=f"load-{uid}")
            w.progressed.connect(lambda ev, uid=uid, t=target: self._load_progressed(uid, t, ev))
            w.finished.connect(lambda res, uid=uid, t=target: self._load_finished(uid, t, res))
            w.failed.connect(lambda exc, tb, uid=uid, t=target: self._load_failed(uid, t, exc, tb))
            w.stopped.connect(lambda uid=uid: self._load_stopped(uid))
            self._loads[uid] = w.start()

    def _target_entry(self, uid: int, target: str) -> ExpertEntry | None:
        if target == "base":
            return self.base_entry if self.base_entry is not None and self.base_entry.uid == uid else None
        return self.experts.find(uid)

    def _load_progressed(self, uid: int, target: str, ev: ProgressEvent) -> None:
        entry = self._target_entry(uid, target)
        if entry is None:
            return
        msg = f"{ev.message or ev.stage} ({ev.fraction:.0%})"
        if target == "base":
            entry.message = msg
        else:
            self.experts.update_entry(uid, message=msg)

    def _load_finished(self, uid: int, target: str, result: tuple[Any, dict[str, Any]]) -> None:
        entry = self._target_entry(uid, target)
        if entry is None:
            return
        projector, desc = result
        warn = projector.metadata.get("warnings", "") if hasattr(projector, "metadata") else ""
        self._update_loaded(entry, target, status="ready", projector=projector, message=warn,
                            details="", **desc)
        log.info("loaded %s (%s, %s)", entry.spec, desc.get("family"), desc.get("shapes"))

    def _load_failed(self, uid: int, target: str, exc: BaseException, tb: str) -> None:
        entry = self._target_entry(uid, target)
        if entry is None:
            return
        short, details = describe_exception(exc, tb)
        log.warning("cannot load %s: %s", entry.spec, short)
        self._update_loaded(entry, target, status="error", projector=None, message=short,
                            details="" if isinstance(exc, PivotMergeError) else details)

    def _update_loaded(self, entry: ExpertEntry, target: str, **changes: Any) -> None:
        """Apply a load's outcome to the base slot or to an expert row."""
        if target == "base":
            for k, v in changes.items():
                setattr(entry, k, v)
            self.list_panel.set_base(entry)
            self._experts_changed()
        else:
            self.experts.update_entry(entry.uid, **changes)

    def _load_stopped(self, uid: int) -> None:
        self._loads.pop(uid, None)
        self._pump_loads()
        self._check_idle()

    # ------------------------------------------------------------------ reactions
    def _experts_changed(self) -> None:
        # the merged result belongs to the list it was made from
        if self.merge_result is not None and self._result_inputs != self._current_inputs():
            self.set_merge_result(None)
        ready = self.experts.ready_entries()
        if ready:
            self.merge_panel.coefficients.set_layers(list(ready[0].projector.layer_names))
        self._analysis_dirty = True
        self._analysis_timer.start()
        self._schedule_validation()
        self._sync_side_panels()
        n = len(self.experts.entries)
        bad = sum(e.status == "error" for e in self.experts.entries)
        loading = sum(e.status == "loading" for e in self.experts.entries)
        self.statusBar().showMessage(f"{n} expert(s): {n - bad - loading} ready, {loading} loading, {bad} flagged")

    def _current_inputs(self) -> tuple[Any, ...]:
        base = self.base_entry.spec if self.base_entry is not None else None
        return (tuple(e.spec for e in self.experts.ready_entries()), base)

    _result_inputs: tuple[Any, ...] = ()

    # ------------------------------------------------------------------ analysis
    def _start_analysis(self) -> None:
        if self._analysis_worker is not None:
            self._analysis_worker.cancel()
        ready = self.experts.ready_entries()
        self._analysis_generation += 1
        gen = self._analysis_generation
        self._analysis_dirty = False
        if not ready:
            self._set_analysis(None)
            self._check_idle()
            return
        experts = [e.projector for e in ready]
        names = [e.name for e in ready]
        base = self.base_entry.projector if self.base_entry is not None and self.base_entry.ready else None
        merged = self.merge_result.projector if self.merge_result is not None else None

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.analysis import iter_analysis

            return iter_analysis(experts, base=base, names=names, merged=merged, cancel=ctx.cancel)

        w = GeneratorWorker(job, name="analysis")
        w.progressed.connect(lambda ev: self.statusBar().showMessage(f"Analysing: {ev.message or ev.stage}", 3000)
                             if gen == self._analysis_generation else None)
        w.finished.connect(lambda a, gen=gen: self._analysis_finished(gen, a))
        w.failed.connect(lambda exc, tb, gen=gen: self._analysis_failed(gen, exc, tb))
        w.stopped.connect(lambda gen=gen: self._analysis_stopped(gen))
        self._analysis_worker = w.start()

    def _analysis_finished(self, gen: int, analysis: Any) -> None:
        if gen != self._analysis_generation:
            return
        self._set_analysis(analysis)
        gc.freeze()  # long-lived results leave the collector's generations (see _core_loaded)
        self.statusBar().showMessage("Analysis updated.", 3000)

    def _analysis_failed(self, gen: int, exc: BaseException, tb: str) -> None:
        if gen != self._analysis_generation:
            return
        short, details = describe_exception(exc, tb)
        log.warning("analysis failed: %s", details)
        self.statusBar().showMessage(f"Analysis failed: {short}")
        self._set_analysis(None, problem=short)

    def _analysis_stopped(self, gen: int) -> None:
        if gen == self._analysis_generation:
            self._analysis_worker = None
        self._check_idle()

    def _set_analysis(self, analysis: Any, problem: str = "") -> None:
        self.analysis = analysis
        for panel in (self.layers_panel, self.spectra_panel, self.similarity_panel):
            panel.set_analysis(analysis, problem)

    # ------------------------------------------------------------------ recipe
    def current_recipe(self) -> Any:
        """The recipe the GUI describes right now (raises RecipeError on a bad setup)."""
        from pivotmerge_gui.core.recipe import Recipe

        method = self.merge_panel.method
        if method is None:
            raise PivotMergeError("the merge engine is still loading")
        params = self.merge_panel.form.values()
        pivot = self.experts.pivot_index()
        if "pivot" in {p.name for p in method.params}:
            if pivot is not None:
                params["pivot"] = pivot_param_value(method, pivot)
                self.merge_panel.form.set_external("pivot", f"{self.experts.entry(pivot).name} (ticked)")
            else:
                self.merge_panel.form.set_external("pivot", "automatic (or tick one in the list)")
        data = {
            "merge_method": method.name,
            "base_model": self.base_entry.spec if self.base_entry is not None else None,
            "models": [{"model": e.spec, "name": e.name, "parameters": {"weight": e.weight}}
                       for e in self.experts.entries],
            "parameters": params,
            "layer_coefficients": self.merge_panel.coefficients.overrides() or None,
            **self.merge_panel.settings(),
        }
        return Recipe.from_dict(data, "current setup")

    def apply_recipe(self, recipe: Any, base_dir: Path | None = None) -> None:
        """Replace the setup with a recipe's (experts load in the background)."""
        if not self.core_ready:
            self._pending_recipe = (recipe, base_dir)
            return
        from pivotmerge_gui.core.pipeline import resolve_spec

        self.experts.clear()
        self.set_merge_result(None)
        for m in recipe.models:
            self.add_spec(resolve_spec(m.model, base_dir), name=m.name, weight=m.parameters.weight)
        self.set_base(resolve_spec(recipe.base_model, base_dir) if recipe.base_model else None)
        if not self.merge_panel.set_method_name(recipe.merge_method):
            self.show_message("Unknown method", f"The recipe's method '{recipe.merge_method}' is not available.")
        params = dict(recipe.parameters)
        method = self.merge_panel.method
        if method is not None and "pivot" in params and isinstance(params["pivot"], int) and params["pivot"] >= 0:
            entries = self.experts.entries
            if params["pivot"] < len(entries):
                self.experts.set_pivot(entries[params["pivot"]].uid)
        self.merge_panel.form.set_values(params)
        self.merge_panel.apply_settings(recipe.dtype, recipe.out_dtype, recipe.device, recipe.random_seed)
        self.merge_panel.set_calibration(resolve_spec(recipe.calibration, base_dir) if recipe.calibration else None)
        self.merge_panel.coefficients.set_overrides(dict(recipe.layer_coefficients or {}))
        self._schedule_validation()

    initial_method: str | None = None

    # ------------------------------------------------------------------ session
    def _schedule_autosave(self) -> None:
        if self.autosave_enabled:
            self._autosave_timer.start()

    def autosave_session(self) -> None:
        """Write the current setup (experts, base, method, settings) as a recipe to the
        session file, atomically; an empty list removes it. Runs on the GUI thread: the
        document is a few hundred bytes."""
        if not self.autosave_enabled or not self.core_ready:
            return
        path = session_file()
        if not self.experts.entries:
            path.unlink(missing_ok=True)
            return
        try:
            from pivotmerge_gui.core.io.atomic import atomic_write_text

            text = self.current_recipe().to_yaml()
            atomic_write_text(path, text, overwrite=True)
        except (PivotMergeError, OSError) as exc:  # never disturb the user over an autosave
            log.warning("session autosave skipped: %s", exc)

    def restore_session(self) -> bool:
        """Reopen the autosaved session, if any (experts load in the background)."""
        from pivotmerge_gui.core.recipe import Recipe

        path = session_file()
        if not path.is_file():
            return False
        try:
            recipe = Recipe.load(path)
        except PivotMergeError as exc:
            log.warning("autosaved session unreadable, set aside: %s", exc)
            path.replace(path.with_suffix(".bad.yml"))
            return False
        self.apply_recipe(recipe)
        self.statusBar().showMessage(f"Restored the last session ({len(recipe.models)} experts).", 8000)
        return True

    def open_recipe(self, path: str | Path) -> None:
        from pivotmerge_gui.core.recipe import Recipe

        try:
            recipe = Recipe.load(path)
        except PivotMergeError as exc:
            self.show_error("Cannot open the recipe", exc)
            return
        self.apply_recipe(recipe, Path(path).resolve().parent)
        self.statusBar().showMessage(f"Opened recipe {path}", 5000)

    def open_recipe_dialog(self) -> None:
        f, _ = QFileDialog.getOpenFileName(self, "Open recipe", self.settings.last_dir(),
                                           "Recipes (*.yml *.yaml);;All files (*)")
        if f:
            self.settings.set_last_dir(f)
            self.open_recipe(f)

    def save_recipe(self, path: str | Path) -> Path | None:
        try:
            recipe = self.current_recipe()
            return recipe.save(path)
        except PivotMergeError as exc:
            self.show_error("Cannot save the recipe", exc)
            return None

    def save_recipe_dialog(self) -> None:
        f, _ = QFileDialog.getSaveFileName(self, "Save recipe", str(Path(self.settings.last_dir()) / "recipe.yml"),
                                           "Recipes (*.yml *.yaml)")
        if f:
            self.settings.set_last_dir(f)
            if self.save_recipe(f) is not None:
                self.statusBar().showMessage(f"Recipe saved to {f}", 5000)

    # ------------------------------------------------------------------ validation
    def _schedule_validation(self) -> None:
        if self._validate_ui_only():
            self._validate_timer.start()

    def _validate_ui_only(self) -> bool:
        """Checks that need no engine. Returns True when a full plan() check should follow."""
        entries = self.experts.entries
        mp = self.merge_panel
        if self.merge_worker is not None:
            return False
        if not entries:
            mp.set_validation(False, "Add at least two experts: drop projector files or folders on the list.")
            return False
        loading = [e for e in entries if e.status == "loading"]
        if loading:
            mp.set_pending(f"Waiting for {len(loading)} expert(s) to load…")
            return False
        bad = [e for e in entries if e.status == "error"]
        if bad:
            mp.set_validation(False, f"Remove or replace the flagged expert '{bad[0].name}': {bad[0].message}")
            return False
        if len(entries) < 2:
            mp.set_validation(False, "Add at least one more expert: a merge needs two or more.")
            return False
        if self.base_entry is not None and self.base_entry.status == "loading":
            mp.set_pending("Waiting for the base checkpoint to load…")
            return False
        if self.base_entry is not None and self.base_entry.status == "error":
            mp.set_validation(False, f"The base checkpoint cannot be used: {self.base_entry.message}")
            return False
        if not self.core_ready:
            mp.set_pending("Loading the merge engine…")
            return False
        mp.set_pending("Checking the setup…")
        return True

    def validate_now(self) -> None:
        """Run ``pipeline.plan`` on the current recipe in a worker; the result enables Merge."""
        if not self._validate_ui_only():
            self._check_idle()
            return
        try:
            recipe = self.current_recipe()
        except PivotMergeError as exc:
            self.plan, self._plan_key = None, None
            self.merge_panel.set_validation(False, str(exc))
            return
        key = self._setup_key(recipe)
        if key == self._plan_key and self.plan is not None:
            self._show_plan_ok(self.plan)
            return
        if key == self._validation_key and self._validation_worker is not None:
            return
        if self._validation_worker is not None:
            self._validation_worker.cancel()
        loaded = {e.spec: e.projector for e in self.experts.entries if e.ready}
        if self.base_entry is not None and self.base_entry.ready:
            loaded[self.base_entry.spec] = self.base_entry.projector
        calibration, problem = self._calibration_for_plan()
        if problem is not None:
            method = self.merge_panel.method
            if method is not None and (method.needs_calibration or method.uses_calibration):
                self.plan, self._plan_key = None, None
                self.merge_panel.set_validation(False, problem)
                return
            # otherwise this method does not use calibration features: plan without them
        allow_nonfinite = self.merge_panel.allow_nonfinite_check.isChecked()
        self._validation_key = key

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.pipeline import plan

            return plan(recipe, loaded=loaded, calibration=calibration, cancel=ctx.cancel,
                        allow_nonfinite=allow_nonfinite)

        w = GeneratorWorker(job, name="validate")
        w.finished.connect(lambda p, key=key: self._validated(key, p, None, ""))
        w.failed.connect(lambda exc, tb, key=key: self._validated(key, None, exc, tb))
        w.stopped.connect(lambda w=w: self._validation_stopped(w))
        self._validation_worker = w.start()

    _calibration_uids: list[int] | None = None
    _calibration_view: tuple[Any, tuple[int, ...], Any] | None = None

    def set_memory_calibration(self, calibration: Any, label: str, uids: list[int] | None) -> None:
        """Hold calibration features in memory. ``uids``: the experts (list entries) whose
        domains ``calibration.features`` belong to, in that order, so the features follow
        their experts when the list is reordered or shrunk; None = by position."""
        self._calibration_uids = list(uids) if uids is not None else None
        self._calibration_view = None
        self.merge_panel.set_calibration_object(calibration, label)

    def _memory_calibration(self, entries: list[ExpertEntry] | None = None) -> Any:
        """Calibration features held in memory (demo, test bench) for ``entries`` (default:
        the whole expert list) in their current order, unless a file is set.

        Feature sets follow their experts (by entry uid) through reordering and removal.
        Raises PivotMergeError when an expert has no feature set (added after the features
        were computed)."""
        cal = self.merge_panel.calibration_object if self.merge_panel.calibration_path is None else None
        if cal is None or self._calibration_uids is None:
            return cal
        entries = self.experts.entries if entries is None else entries
        order = tuple(e.uid for e in entries)
        if order == tuple(self._calibration_uids):
            return cal
        view = self._calibration_view
        if view is not None and view[0] is cal and view[1] == order:
            return view[2]  # same object for the same order: validation results stay cached
        pos = {u: i for i, u in enumerate(self._calibration_uids)}
        missing = [e.name for e in entries if e.uid not in pos]
        if missing:
            raise PivotMergeError(
                "the calibration features in memory have no set for " + ", ".join(missing)
                + " (added after they were computed): compute alignment scores again in the "
                "Test bench, choose a calibration file, or clear them")
        from pivotmerge_gui.core.methods.base import Calibration

        idx = [pos[u] for u in order]
        doms = list(cal.domains)
        mapped = Calibration([cal.features[i] for i in idx],
                             [doms[i] for i in idx] if len(doms) == len(cal.features) else [])
        self._calibration_view = (cal, order, mapped)
        return mapped

    def _calibration_for_plan(self) -> tuple[Any, str | None]:
        """(in-memory calibration to plan with, or None; why it cannot be used, or None)."""
        try:
            return self._memory_calibration(), None
        except PivotMergeError as exc:
            return None, str(exc)

    def _setup_key(self, recipe: Any) -> str:
        """Identity of a setup: the recipe text plus any in-memory calibration (the same
        object for the same expert order, see ``_memory_calibration``)."""
        cal, problem = self._calibration_for_plan()
        tag = (f"calibration object {id(cal)}" if cal is not None
               else f"calibration unusable: {problem}" if problem is not None else "no calibration")
        return (recipe.to_yaml() + f"\n# {tag}"
                + f"\n# allow non-finite {self.merge_panel.allow_nonfinite_check.isChecked()}")

    def _validated(self, key: str, plan: Any, exc: BaseException | None, tb: str) -> None:
        if key != self._validation_key:
            return  # the setup changed meanwhile; a newer check is on its way
        if plan is not None:
            self.plan, self._plan_key = plan, key
            self._show_plan_ok(plan)
        else:
            self.plan, self._plan_key = None, None
            assert exc is not None
            short, details = describe_exception(exc, tb)
            if not isinstance(exc, PivotMergeError):
                log.error("validation crashed: %s", details)
            self.merge_panel.set_validation(False, short)

    def _validation_stopped(self, w: GeneratorWorker) -> None:
        if self._validation_worker is w:
            self._validation_worker = None
        self._check_idle()

    def _show_plan_ok(self, plan: Any) -> None:
        text = f"Ready: {plan.method.pretty_name} of {len(plan.experts)} experts on {plan.device}."
        if plan.warnings:
            text += " Warnings: " + "; ".join(plan.warnings)
        self.merge_panel.set_validation(True, text)

    @property
    def merge_reason(self) -> str:
        """The validation text shown under the form (for tests and screenshots)."""
        return self.merge_panel.validation_label.toolTip() or self.merge_panel.merge_button.toolTip()

    # ------------------------------------------------------------------ merge
    def start_merge(self) -> None:
        if self.merge_worker is not None or self.plan is None:
            return
        try:
            key = self._setup_key(self.current_recipe())
        except PivotMergeError as exc:
            self.merge_panel.set_validation(False, str(exc))
            return
        if key != self._plan_key:
            self.validate_now()
            return
        plan = self.plan
        self.settings.set_value("merge/method", plan.method.name)

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.pipeline import execute

            return execute(plan, ctx.cancel)

        self.merge_panel.set_running(True)
        self.merge_panel.show_progress(0.0, "Starting…")
        w = GeneratorWorker(job, name="merge")
        w.progressed.connect(lambda ev: self.merge_panel.show_progress(ev.fraction, f"{ev.stage}: {ev.message}"))
        w.finished.connect(self._merge_done)
        w.failed.connect(self._merge_failed)
        w.cancelled.connect(self._merge_cancelled)
        w.stopped.connect(self._merge_stopped)
        self._merge_inputs = self._current_inputs()
        self.merge_worker = w.start()
        log.info("merge started: %s", plan.method.name)

    _merge_inputs: tuple[Any, ...] = ()

    def cancel_merge(self) -> None:
        if self.merge_worker is not None:
            self.merge_worker.cancel()
            self.merge_panel.stage_label.setText("Cancelling…")

    def _merge_done(self, result: Any) -> None:
        gc.freeze()  # see _core_loaded
        self._result_inputs = self._merge_inputs
        self.merge_panel.show_progress(1.0, f"Done in {result.elapsed_s:.2f} s. Save it, or inspect the "
                                            "'Merged' curves in the views.")
        self.set_merge_result(result)
        self.tabs.setCurrentWidget(self.report_panel)
        self.merge_finished.emit(result)

    def _merge_failed(self, exc: BaseException, tb: str) -> None:
        self.merge_panel.show_progress(0.0, "Merge failed.")
        self.show_error("The merge failed", exc, tb)

    def _merge_cancelled(self) -> None:
        self.merge_panel.show_progress(0.0, "Merge cancelled; nothing was written.")

    def _merge_stopped(self) -> None:
        self.merge_worker = None
        self.merge_panel.set_running(False)
        self.merge_panel.save_button.setEnabled(self.merge_result is not None)
        self.validate_now()  # the cached plan re-enables Merge at once
        self._check_idle()

    def set_merge_result(self, result: Any) -> None:
        self.merge_result = result
        self.report_panel.set_report(result.report if result is not None else None)
        self.merge_panel.save_button.setEnabled(result is not None and self.merge_worker is None)
        self.action_save_merged.setEnabled(result is not None)
        if result is not None:
            self.merge_panel.coefficients.set_used(layer_lambdas(result.report))
        else:
            self.merge_panel.coefficients.set_used({})
        self._sync_side_panels()
        self._analysis_timer.start()

    # ------------------------------------------------------------------ test bench / auto-tune
    def _sync_side_panels(self) -> None:
        """Hand the loaded experts (and the merged result) to the test bench and auto-tune."""
        experts = {e.name: e.projector for e in self.experts.ready_entries()}
        base = self.base_entry.projector if self.base_entry is not None and self.base_entry.ready else None
        if not self.bench_panel.is_busy():
            new = set(experts) - set(self.bench_panel.experts)
            self.bench_panel.set_experts(experts, base)
            self.bench_panel.set_merged(self.merge_result.projector if self.merge_result is not None else None)
            # experts that just finished loading start ticked, like the first ones
            lst = self.bench_panel.projector_list
            for i in range(lst.count()):
                item = lst.item(i)
                if item.data(Qt.ItemDataRole.UserRole) in new:
                    item.setCheckState(Qt.CheckState.Checked)
        if self.autotune_panel is not None and not self.autotune_panel.is_busy():
            try:
                calibration = self._memory_calibration(self.experts.ready_entries())
            except PivotMergeError:
                calibration = None
            self.autotune_panel.set_experts(experts, base, calibration)
            self._sync_autotune_method()

    def _sync_autotune_method(self) -> None:
        method = self.merge_panel.method
        if method is not None and self.autotune_panel is not None and not self.autotune_panel.is_busy():
            self.autotune_panel.set_method(method.name, self.merge_panel.form.values())

    def _alignment_scores_ready(self, scores: Any, calibration: Any) -> None:
        """Calibration features from the test bench pairs feed data-driven methods."""
        by_name = {e.name: e.uid for e in self.experts.ready_entries()}
        uids = [by_name.get(n) for n in getattr(scores, "names", [])]
        self.set_memory_calibration(
            calibration, "from the test bench pairs (in memory)",
            uids if uids and None not in uids and len(uids) == len(calibration.features) else None)
        self.layers_panel.set_layer_scores(scores)
        self.statusBar().showMessage("Calibration features from the test bench are set for the merge.", 8000)

    def _apply_tuned(self, setting: Any) -> None:
        """Auto-tune's best per-layer coefficients become slider overrides (and the recipe's)."""
        self.merge_panel.coefficients.set_overrides(dict(setting.layer_coefficients))
        if setting.parameters:
            self.merge_panel.form.set_values(dict(setting.parameters))
        self.statusBar().showMessage("Auto-tuned coefficients applied to the merge form.", 8000)
        self._schedule_validation()

    # ------------------------------------------------------------------ save
    def save_merged(self) -> None:
        if self.merge_result is None:
            return
        start = str(Path(self.settings.last_dir()) / "merged-projector")
        dlg = SaveDialog(str(self.settings.value("save/folder", start)), self.merge_result.projector.family, self)
        if dlg.exec() != SaveDialog.DialogCode.Accepted:
            return
        folder, fmt, dtype, overwrite = dlg.values()
        self.settings.set_value("save/folder", str(folder))
        self.save_to(folder, fmt, dtype, overwrite)

    def save_to(self, folder: Path, fmt: str = "auto", dtype: str = "auto", overwrite: bool = False) -> GeneratorWorker | None:
        """Write projector + recipe.yml + README.md through ``pipeline.save_result`` (worker)."""
        result = self.merge_result
        if result is None or self._save_worker is not None:
            return None

        def job(ctx: WorkContext) -> list[Path]:
            from pivotmerge_gui.core.devices import parse_dtype
            from pivotmerge_gui.core.pipeline import save_result

            return save_result(result, folder, fmt=None if fmt == "auto" else fmt,
                               dtype=None if dtype == "auto" else parse_dtype(dtype), overwrite=overwrite)

        w = GeneratorWorker(job, name="save")
        w.finished.connect(self._saved)
        w.failed.connect(lambda exc, tb: self.show_error("Cannot save the merged projector", exc, tb))
        w.stopped.connect(lambda: setattr(self, "_save_worker", None))
        self.statusBar().showMessage(f"Saving to {folder}…")
        self._save_worker = w.start()
        return w

    def _saved(self, paths: list[Path]) -> None:
        self.last_saved = list(paths)
        self.statusBar().showMessage("Saved: " + ", ".join(str(p) for p in paths), 15000)
        log.info("saved %s", paths)


    # ------------------------------------------------------------------ errors
    def show_error(self, title: str, exc: BaseException, tb: str | None = None) -> None:
        short, details = describe_exception(exc, tb)
        log.warning("%s: %s", title, details if not isinstance(exc, PivotMergeError) else short)
        self.show_message(title, short, details if not isinstance(exc, PivotMergeError) else "")

    def show_message(self, title: str, short: str, details: str = "") -> None:
        self._errors_shown.append(short)
        self.statusBar().showMessage(f"{title}: {short}", 15000)
        if getattr(self, "quiet_errors", False):
            return
        ErrorDialog(title, short, details, self).open()

    # ------------------------------------------------------------------ idle / shutdown
    def is_idle(self) -> bool:
        """True when no load, analysis, validation or merge is pending or running."""
        return (self.core_ready and not self._loads and not self._load_queue and self._demo_worker is None
                and not self._pending_demos
                and self._analysis_worker is None and not self._analysis_dirty
                and not self._analysis_timer.isActive() and self._validation_worker is None
                and not self._validate_timer.isActive() and self.merge_worker is None
                and not self.bench_panel.is_busy()
                and not (self.autotune_panel is not None and self.autotune_panel.is_busy())
                and self._save_worker is None)

    def _check_idle(self) -> None:
        if self.is_idle():
            self.idle_reached.emit()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.settings.save_window(self.saveGeometry(), self.saveState())
        self.settings.set_value("window/splitter", self.splitter.saveState())
        self.settings.sync()
        if self.autosave_enabled and self._autosave_timer.isActive():
            self._autosave_timer.stop()
            self.autosave_session()
        stop_all(5000)
        self._disconnect_workers()
        super().closeEvent(event)

    def _disconnect_workers(self) -> None:
        """Drop this window's connections to its workers: a finished worker's queued
        signals must not reach a window that is being destroyed."""
        workers = [self._core_worker, self._analysis_worker, self._validation_worker, self.merge_worker,
                   self._save_worker, getattr(self, "_demo_worker", None), *self._loads.values()]
        for timer in (self._analysis_timer, self._validate_timer, self._autosave_timer):
            timer.stop()
        for w in workers:
            if w is None:
                continue
            for sig in (w.progressed, w.finished, w.failed, w.cancelled, w.stopped):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        sig.disconnect()
                    except (RuntimeError, TypeError):
                        pass


def _scrolled(panel: QWidget) -> QScrollArea:
    """A tab page that scrolls instead of imposing its minimum width on the window."""
    area = QScrollArea()
    area.setWidget(panel)
    area.setWidgetResizable(True)
    area.setFrameShape(QScrollArea.Shape.NoFrame)
    return area


def pivot_param_value(method: Any, index: int) -> Any:
    """The value of a method's ``pivot`` parameter for the expert at ``index``."""
    p = next(p for p in method.params if p.name == "pivot")
    if p.type is str:
        return str(index)
    return int(index)


def layer_lambdas(report: dict[str, Any]) -> dict[str, float]:
    """Per-layer coefficients a merge used: the method's own (PivotMerge's ALM reports
    ``lambdas``/``layers[].coefficient``), else those the pipeline applied."""
    out: dict[str, float] = {}
    mrep = report.get("method_report") or {}
    if isinstance(mrep, dict):
        layers = mrep.get("layers")
        rows = layers if isinstance(layers, list) else (
            [{"layer": k, **v} for k, v in layers.items() if isinstance(v, dict)] if isinstance(layers, dict) else [])
        for row in rows:
            if isinstance(row, dict) and "layer" in row:
                for key in ("coefficient", "lambda"):
                    if isinstance(row.get(key), (int, float)):
                        out[str(row["layer"])] = float(row[key])
                        break
        lam = mrep.get("lambdas")
        if isinstance(lam, dict):
            out.update({str(k): float(v) for k, v in lam.items() if isinstance(v, (int, float))})
    applied = report.get("layer_coefficients_applied") or {}
    out.update({str(k): float(v) for k, v in applied.items()})
    return out
