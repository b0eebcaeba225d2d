"""The main window: layout, menus and wiring between the session model, panels and jobs.

State lives in :class:`pivotmerge_gui.session.SessionModel` (Qt-free); this window renders
it, forwards the user's edits to it and runs background jobs (:mod:`.jobs`, work functions
in :mod:`.tasks`) whose outcomes it hands back. torch and the core engine are imported by
the first job, after the window is up.
"""

from __future__ import annotations

import gc
import logging
import time
from pathlib import Path
from typing import Any

from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtGui import QCloseEvent, QDragEnterEvent, QDropEvent
from PySide6.QtWidgets import QFileDialog, QMainWindow, QMessageBox, QTabWidget

from pivotmerge_gui import __version__
from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.session import ExpertEntry, SessionModel

from . import tasks
from .analysis_flow import AnalysisFlowMixin
from .dialogs import HubDialog
from .errors import ErrorDialog, describe_exception
from .item_models import ExpertListModel, paths_from_mime
from .jobs import Jobs
from .layout import add_panel_toggles, build_splitter, place_window
from .layout import restore_layout as restore_layout_state
from .menus import build_menus
from .merge_flow import MergeFlowMixin
from .panels.autotune import AutoTunePanel
from .panels.inspect import LayersPanel, SimilarityPanel, SpectraPanel
from .panels.merge import MergePanel
from .panels.model_list import ModelListPanel
from .panels.report import ReportPanel
from .panels.testbench import TestBenchPanel
from .session_extras import restore_extras, save_extras
from .settings import AppSettings, data_dir, session_file
from .views import ViewRegistry
from .workbench import Workbench
from .workers import GeneratorWorker, stop_all

log = logging.getLogger("pivotmerge_gui.gui")
MAX_PARALLEL_LOADS = 2


class MainWindow(MergeFlowMixin, AnalysisFlowMixin, QMainWindow):
    """PivotMerge Studio's main window (GUI thread)."""

    idle_reached = Signal()  # loading, analysis and validation have all settled
    merge_finished = Signal(object)
    initial_method: str | None = None
    quiet_errors = False  # unattended runs: errors go to the status bar and log only

    def __init__(self, settings: AppSettings | None = None, *, start_core: bool = True,
                 restore_layout: bool = True) -> None:
        super().__init__()
        self.setWindowTitle(f"PivotMerge Studio {__version__}")
        self.setAcceptDrops(True)
        self.settings = settings or AppSettings()
        self.session = SessionModel()
        self.experts = ExpertListModel(self.session.experts, self)
        self.errors_shown: list[str] = []
        self.last_saved: list[Path] = []
        self.autosave_enabled = True

        self.list_panel = ModelListPanel(self.experts, self.settings)
        self.layers_panel = LayersPanel()
        self.spectra_panel = SpectraPanel(self.settings)
        self.similarity_panel = SimilarityPanel()
        self.report_panel = ReportPanel()
        self.bench_panel = TestBenchPanel()
        self.autotune_panel = AutoTunePanel(methods=[])  # methods arrive with the engine
        self.merge_panel = MergePanel()
        self.tabs = QTabWidget()
        build_menus(self)
        self.views = ViewRegistry(self.tabs, self.view_menu)
        self.views.register("layers", "Layers", self.layers_panel)
        self.views.register("spectra", "Spectra", self.spectra_panel)
        self.views.register("similarity", "Similarity", self.similarity_panel)
        self.views.register("report", "Merge report", self.report_panel)
        self.views.register("bench", "Test bench", self.bench_panel, scroll=True)
        self.views.register("autotune", "Auto-tune", self.autotune_panel, scroll=True)

        self.splitter = build_splitter(self.list_panel, self.tabs, self.merge_panel)
        self.setCentralWidget(self.splitter)
        add_panel_toggles(self)

        self.jobs = Jobs(on_idle=self._check_idle)
        self.jobs.extra_busy += [self.bench_panel.is_busy, self.autotune_panel.is_busy]
        self.engine_job = self.jobs.slot("engine", finished=self._engine_loaded, stopped=self._engine_stopped,
                                         failed=lambda exc, tb: self.show_error("The merge engine failed to load", exc, tb))
        self.loads = self.jobs.queue("load", MAX_PARALLEL_LOADS)
        self.demo_job = self.jobs.slot("demo", failed=lambda exc, tb: self.show_error("Cannot open the demo experts", exc, tb))
        self.analysis_job = self.jobs.slot(
            "analysis", supersede=True, finished=self._analysis_finished, failed=self._analysis_failed,
            progressed=lambda ev: self.statusBar().showMessage(f"Analysing: {ev.message or ev.stage}", 3000))
        self.validation_job = self.jobs.slot("validate", supersede=True)
        self.merge_job = self.jobs.slot(
            "merge", finished=self._merge_done, stopped=self._merge_stopped,
            progressed=lambda ev: self.merge_panel.show_progress(ev.fraction, f"{ev.stage}: {ev.message}"),
            failed=self._merge_failed,
            cancelled=lambda: self.merge_panel.show_progress(0.0, "Merge cancelled; nothing was written."))
        self.save_job = self.jobs.slot(
            "save", finished=self._saved,
            failed=lambda exc, tb: self.show_error("Cannot save the merged projector", exc, tb))

        self._timers: list[QTimer] = []
        self._analysis_timer = self._timer(250, self._start_analysis)
        self._validate_timer = self._timer(150, self.validate_now)
        self._autosave_timer = self._timer(1000, self.autosave_session)  # a killed app loses nothing
        self._wire()
        self.workbench = Workbench(self)  # merge history, A/B, Merge & test, sweeps

        place_window(self)  # fits the screen; the last session's layout when it still does
        if restore_layout:
            restore_layout_state(self, self.settings.geometry(), self.settings.value("window/splitter"))
        self.statusBar().showMessage("Drop projector checkpoints (files or folders) onto the window to start.")
        self._show_readiness()
        if start_core:
            QTimer.singleShot(0, self.start_core)

    def _timer(self, ms: int, slot: Any) -> QTimer:
        t = QTimer(self, singleShot=True, interval=ms)
        t.timeout.connect(slot)
        self._timers.append(t)
        return t

    def _wire(self) -> None:
        s, lp, mp = self.session, self.list_panel, self.merge_panel
        s.load_requested.connect(self._queue_load)
        s.inputs_changed.connect(self._inputs_changed)
        s.base_changed.connect(lambda: lp.set_base(s.base))
        s.result_changed.connect(self._result_changed)
        s.calibration_changed.connect(self._calibration_changed)
        s.setup_replaced.connect(self._setup_replaced)
        s.message.connect(lambda text: self.statusBar().showMessage(text, 5000))
        lp.paths_added.connect(self.add_paths)
        lp.remove_requested.connect(self.remove_experts)
        lp.hub_requested.connect(self.add_from_hub)
        lp.base_chosen.connect(self.set_base)
        lp.base_cleared.connect(lambda: self.set_base(None))
        mp.changed.connect(self._form_changed)
        mp.calibration_chosen.connect(self.session.set_calibration_path)
        mp.calibration_compute_requested.connect(self.compute_calibration)
        mp.merge_requested.connect(self.start_merge)
        mp.cancel_requested.connect(self.cancel_merge)
        mp.save_requested.connect(self.save_merged)
        self.bench_panel.alignment_scores_ready.connect(self._alignment_scores_ready)
        self.bench_panel.busy_changed.connect(lambda busy: None if busy else self._check_idle())
        self.autotune_panel.busy_changed.connect(lambda busy: None if busy else self._check_idle())
        self.autotune_panel.apply_requested.connect(self._apply_tuned)
        mp.changed.connect(self._sync_autotune_method)

    # ------------------------------------------------------------------ state shortcuts
    @property
    def core_ready(self) -> bool:
        return self.session.core_ready

    @property
    def methods(self) -> list[Any]:
        return self.session.methods

    @property
    def base_entry(self) -> ExpertEntry | None:
        return self.session.base

    @property
    def merge_result(self) -> Any:
        return self.session.merge_result

    @property
    def plan(self) -> Any:
        return self.session.plan

    @property
    def analysis(self) -> Any:
        return self.session.analysis

    @property
    def merge_worker(self) -> GeneratorWorker | None:
        return self.merge_job.worker

    @property
    def merge_reason(self) -> str:
        """The validation text shown under the form (for tests and screenshots)."""
        return self.merge_panel.validation_label.toolTip() or self.merge_panel.merge_button.toolTip()

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

    # ------------------------------------------------------------------ engine start-up
    def start_core(self) -> None:
        """Import the engine (torch, methods, devices) on a worker thread. Loads and the demo
        wait for it: running those imports on several threads at once can hand a thread a
        half-initialised module (seen: pydantic under shiboken's import hook)."""
        if self.engine_job.busy or self.core_ready:
            return
        self.statusBar().showMessage("Loading the merge engine…")
        self.loads.hold(True)
        self.engine_job.start(tasks.engine)

    def _engine_stopped(self) -> None:
        self.loads.hold(False)
        pending, self._pending_demos = self._pending_demos, ()
        for scenario, with_base in pending:
            self.open_demo(scenario, with_base)

    _pending_demos: tuple[tuple[str, bool], ...] = ()

    def _engine_loaded(self, result: tuple[list[Any], list[Any]]) -> None:
        methods, devices = result
        # The engine's imports created most of the objects this process will ever hold; moving
        # them out of the collector's reach keeps full collections (which pause whichever
        # thread triggers them, the GUI's included) short.
        gc.freeze()
        default = self.initial_method or str(self.settings.value("merge/method", "pivotmerge"))
        self.merge_panel.set_methods(methods, default=default)
        self.merge_panel.set_devices(devices)
        self.autotune_panel.set_methods(methods)
        self._pull_form()
        self.session.set_engine(methods)  # a recipe that waited applies now
        self._sync_side_panels()
        self.statusBar().showMessage(f"Merge engine ready: {len(methods)} methods.", 5000)
        self._schedule_validation()

    # ------------------------------------------------------------------ experts
    def add_paths(self, paths: list[str] | tuple[str, ...]) -> list[ExpertEntry]:
        """Add experts from files, folders or Hub ids; each loads in the background."""
        added = self.session.add_paths(paths)
        for e in added:
            self.settings.add_recent(e.spec)
        return added

    def add_spec(self, spec: str, name: str | None = None, weight: float = 1.0) -> ExpertEntry:
        self.settings.add_recent(spec)
        return self.session.add_spec(spec, name, weight)

    def open_demo(self, scenario: str = "shared", with_base: bool = True) -> GeneratorWorker | None:
        """Add the built-in demo experts (and their base) of a scenario, with the demo's
        calibration file, unless another calibration is in use (after the engine's imports:
        returns None and opens later while those run)."""
        if self.engine_job.busy:
            self._pending_demos = (*self._pending_demos, (scenario, with_base))
            return None

        def done(result: tuple[list[str], list[str], str | None, Any]) -> None:
            paths, names, base, calibration = result
            s = self.session
            known = s.experts.specs()
            for p, n in zip(paths, names):
                if p not in known:
                    self.add_spec(p, name=n)
            if with_base and base is not None:
                s.set_base(base)
            if s.calibration_path is None and s.memory_calibration is None:
                s.set_calibration_path(calibration, label=f"demo calibration: {tasks.DEMO_CALIBRATION_IMAGES} "
                                                          "unlabelled training images per domain")

        return self.demo_job.start(tasks.demo(scenario), finished=done)

    def add_from_hub(self) -> None:
        dlg = HubDialog(self)
        if dlg.exec() == HubDialog.DialogCode.Accepted and dlg.projector is not None:
            self.session.add_loaded(dlg.spec, dlg.projector)
            self.settings.add_recent(dlg.spec)

    def remove_experts(self, rows: list[int]) -> None:
        """Remove experts (Remove, Delete); asks first when that discards the merged result."""
        s = self.session
        names = [s.experts.entry(r).name for r in rows if 0 <= r < len(s.experts)]
        if (s.merge_result is not None and any(s.experts.entry(r).ready for r in rows if 0 <= r < len(s.experts))
                and not self.confirm("Discard the merged result?",
                                     f"Removing {', '.join(names)} discards the merged result, which was made "
                                     "from it. Remove anyway? (Edit > Undo brings the expert back, not the merge.)")):
            return
        if s.remove_rows(rows):
            self.action_undo_remove.setEnabled(True)
            self.statusBar().showMessage(f"Removed {', '.join(names)}. Ctrl+Z brings it back.", 8000)

    def undo_remove(self) -> None:
        back = self.session.undo_remove()
        self.action_undo_remove.setEnabled(bool(self.session.removed_stack))
        if back:
            self.statusBar().showMessage(f"Restored {', '.join(e.name for e in back)}.", 5000)

    def confirm(self, title: str, text: str) -> bool:
        """Ask a yes/no question (tests replace this)."""
        return QMessageBox.question(self, title, text) == QMessageBox.StandardButton.Yes

    def set_base(self, spec: str | None) -> None:
        self.session.set_base(spec)

    def _queue_load(self, uid: int, spec: str, target: str) -> None:
        s = self.session
        self.loads.submit(
            uid, tasks.load(spec),
            progressed=lambda ev: s.load_progress(uid, target, f"{ev.message or ev.stage} ({ev.fraction:.0%})"),
            finished=lambda res: self._load_finished(uid, target, res),
            failed=lambda exc, tb: self._load_failed(uid, target, exc, tb))

    def _load_finished(self, uid: int, target: str, result: tuple[Any, dict[str, Any]]) -> None:
        projector, desc = result
        self.session.load_finished(uid, target, projector, desc)
        log.info("loaded %s (%s, %s)", projector.source, desc.get("family"), desc.get("shapes"))

    def _load_failed(self, uid: int, target: str, exc: BaseException, tb: str) -> None:
        short, details = describe_exception(exc, tb)
        log.warning("cannot load %s: %s", uid, short)
        self.session.load_failed(uid, target, short, "" if isinstance(exc, PivotMergeError) else details)

    def _inputs_changed(self) -> None:
        ready = self.session.experts.ready_entries()
        if ready:
            self.merge_panel.coefficients.set_layers(list(ready[0].projector.layer_names))
        self._analysis_dirty = True
        self._analysis_timer.start()
        self._schedule_validation()
        self._sync_side_panels()
        self._schedule_autosave()
        self._show_calibration()  # which experts have calibration data may have changed
        self.statusBar().showMessage(self.session.status_text())

    # ------------------------------------------------------------------ the form <-> session
    def _pull_form(self) -> None:
        """Copy the merge form's values into the session."""
        mp = self.merge_panel
        self.session.update_setup(mp.method_name(), mp.form.values(), mp.coefficients.overrides(),
                                  mp.settings(), mp.allow_nonfinite_check.isChecked())
        label = self.session.pivot_label()
        if label is not None:
            mp.form.set_external("pivot", label)

    def _form_changed(self) -> None:
        if self._pushing:
            return
        self._pull_form()
        self._schedule_validation()
        self._schedule_autosave()

    def _setup_replaced(self) -> None:
        """A recipe replaced the setup: show it in the form (the form's own change signals
        must not write half-applied values back meanwhile)."""
        s, mp = self.session, self.merge_panel
        method, params, coefficients, st = s.method_name, dict(s.params), dict(s.layer_coefficients), dict(s.settings)
        self._pushing = True
        try:
            if method is not None:
                mp.set_method_name(method)
            mp.form.set_values(params)
            mp.apply_settings(st["dtype"], st["out_dtype"], st["device"], st["random_seed"])
            mp.coefficients.set_overrides(coefficients)
        finally:
            self._pushing = False
        self._form_changed()

    _pushing = False

    def _show_calibration(self) -> None:
        s = self.session
        label, tip = s.calibration_label()
        missing = s.uncovered_experts() if label != "none" else []
        if missing:
            label += (f"\n⚠ No calibration data for {', '.join(missing)}: data-driven merges fit "
                      "it on the other domains' images instead. Test that domain before you rely on the merge.")
        self.merge_panel.show_calibration(label, tip, label != "none")

    def compute_calibration(self) -> None:
        """The Calibration dialog: images per expert domain -> a calibration file, which
        then becomes the session's (mapped to the experts by name)."""
        from .calibration_dialog import CalibrationDialog

        names = [e.name for e in self.session.experts.entries]
        if not names:
            self.statusBar().showMessage("Add experts first: calibration is made per expert domain.", 8000)
            return
        out = data_dir() / "calibration" / f"calibration-{time.strftime('%Y%m%d-%H%M%S')}.safetensors"
        current = self.session.calibration.file  # its encoder is the likely one again
        enc = (current.provenance.get("encoder") or {}) if current is not None else {}
        encoder = "demo" if enc.get("kind") == "demo" else str(enc.get("spec") or "")
        dlg = CalibrationDialog(dict.fromkeys(names), encoder=encoder, output=out, parent=self)
        dlg.calibration_written.connect(
            lambda path, mapping: self.session.set_calibration_path(path, mapping))
        dlg.open()
        self._calibration_dialog = dlg

    def _calibration_changed(self) -> None:
        self._show_calibration()
        self._sync_side_panels()
        self._schedule_validation()
        self._schedule_autosave()

    def current_recipe(self) -> Any:
        """The recipe the GUI describes right now (raises RecipeError on a bad setup)."""
        self._pull_form()
        return self.session.recipe()

    def apply_recipe(self, recipe: Any, base_dir: Path | None = None) -> None:
        """Replace the setup with a recipe's (experts load in the background)."""
        if not self.session.apply_recipe(recipe, base_dir):
            self.show_message("Unknown method", f"The recipe's method '{recipe.merge_method}' is not available.")

    # ------------------------------------------------------------------ session files
    def _schedule_autosave(self) -> None:
        if self.autosave_enabled:
            self._autosave_timer.start()

    def autosave_session(self) -> None:
        """Write the setup as a recipe to the session file (a few hundred bytes, atomic)."""
        if self.autosave_enabled:
            self._pull_form()
            if self.session.autosave(session_file()):
                save_extras(session_file(), self.bench_panel)

    def restore_session(self) -> bool:
        """Reopen the autosaved session, if any (experts load in the background)."""
        recipe = self.session.restore(session_file())
        if recipe is None:
            return False
        lost = self.session.not_applied + restore_extras(session_file(), self.bench_panel)
        self.statusBar().showMessage(f"Restored the last session ({len(recipe.models)} experts).", 8000)
        if lost:  # everything that could not come back, in one message
            self.show_message("Part of the last session was not restored", "Not restored: " + "; ".join(lost))
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
            return self.current_recipe().save(path)
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

    # ------------------------------------------------------------------ test bench / auto-tune
    def _sync_side_panels(self) -> None:
        """Hand the loaded experts (and the merged result) to the test bench and auto-tune."""
        s = self.session
        ready = s.experts.ready_entries()
        experts = {e.name: e.projector for e in ready}
        if not self.bench_panel.is_busy():
            new = set(experts) - set(self.bench_panel.experts)
            self.bench_panel.set_experts(experts, s.base_projector())
            self.bench_panel.set_merged(s.merge_result.projector if s.merge_result is not None else None,
                                        self.workbench.merged_name())
            lst = self.bench_panel.projector_list  # experts that just loaded start ticked
            for i in range(lst.count()):
                if lst.item(i).data(Qt.ItemDataRole.UserRole) in new:
                    lst.item(i).setCheckState(Qt.CheckState.Checked)
        if not self.autotune_panel.is_busy():
            try:
                calibration = s.calibration_for(ready)
            except PivotMergeError:
                calibration = None
            self.autotune_panel.set_experts(experts, s.base_projector(), calibration)
            self._sync_autotune_method()

    def _sync_autotune_method(self) -> None:
        method = self.merge_panel.method
        if method is not None and not self.autotune_panel.is_busy():
            self.autotune_panel.set_method(method.name, self.merge_panel.form.values())

    def _alignment_scores_ready(self, scores: Any, calibration: Any) -> None:
        """Calibration features from the test bench pairs feed data-driven methods."""
        by_name = {e.name: e.uid for e in self.session.experts.ready_entries()}
        uids = [by_name.get(n) for n in getattr(scores, "names", [])]
        self.session.set_memory_calibration(
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
        self._form_changed()

    # ------------------------------------------------------------------ errors
    def show_error(self, title: str, exc: BaseException, tb: str | None = None) -> None:
        short, details = describe_exception(exc, tb)
        typed = isinstance(exc, PivotMergeError)
        log.warning("%s: %s", title, short if typed else details)
        self.show_message(title, short, "" if typed else details)

    def show_message(self, title: str, short: str, details: str = "") -> None:
        self.errors_shown.append(short)
        self.statusBar().showMessage(f"{title}: {short}", 15000)
        if not self.quiet_errors:
            ErrorDialog(title, short, details, self).open()

    # ------------------------------------------------------------------ idle / shutdown
    def is_idle(self) -> bool:
        """True when no job is pending or running (loads, analysis, validation, merge, ...)."""
        return (self.core_ready and not self.jobs.busy() and not self._pending_demos
                and not self._analysis_dirty and not any(t.isActive() for t in self._timers
                                                         if t is not self._autosave_timer))

    def _check_idle(self) -> None:
        if self.is_idle():
            self.idle_reached.emit()

    def closeEvent(self, event: QCloseEvent) -> None:
        self.settings.save_window(self.saveGeometry(), self.saveState())
        self.settings.set_value("window/splitter", self.splitter.saveState())
        self.settings.sync()
        if self.autosave_enabled and self._autosave_timer.isActive():
            self.autosave_session()
        for t in self._timers:
            t.stop()
        stop_all(5000)
        self.jobs.detach_all()  # a finished worker's queued signals must not reach this window
        super().closeEvent(event)
