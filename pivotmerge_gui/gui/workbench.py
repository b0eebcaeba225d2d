"""The workbench loop of the main window: merge history, A/B, "Merge & test" and sweeps.

:class:`Workbench` is installed by the window with one line. It owns the Qt-free
:class:`~pivotmerge_gui.session.history.MergeHistory`, registers the History and Sweep
views, adds "Merge & test" beside Merge, and wires:

- every finished merge (and every sweep cell the user opens) into the history; the
  result shown in the views, the test bench's "merged" column and Save is the history's
  current entry; the other results are extra test-bench columns;
- bench runs back into the history (mean scores, captions for the A/B view);
- the sweep job (:func:`pivotmerge_gui.core.sweep.run_sweep` on the window's job
  registry, so idle checks and shutdown cover it), scored on the test bench's pairs and
  back end.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from PySide6.QtCore import QEvent, QObject
from PySide6.QtWidgets import QLayout, QPushButton, QWidget

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.session.history import DEFAULT_CAP, HistoryEntry, MergeHistory

from .panels.history import HistoryPanel
from .panels.sweep import SweepPanel
from .workers import GeneratorWorker, WorkContext

log = logging.getLogger("pivotmerge_gui.gui")
NO_PAIRS = ("The test bench has no image-caption pairs: add them there first (Demo samples or Add pairs…); "
            "results are scored on them.")


def _layout_holding(layout: QLayout, widget: QWidget) -> QLayout | None:
    if layout.indexOf(widget) >= 0:
        return layout
    for i in range(layout.count()):
        child = layout.itemAt(i).layout()
        if child is not None:
            found = _layout_holding(child, widget)
            if found is not None:
                return found
    return None


class _MirrorEnabled(QObject):
    """Keeps a button enabled exactly when another one is (Merge & test follows Merge)."""

    def __init__(self, source: QWidget, target: QWidget) -> None:
        super().__init__(source)
        self.target = target
        source.installEventFilter(self)
        target.setEnabled(source.isEnabled())

    def eventFilter(self, obj: QObject, event: QEvent) -> bool:
        if event.type() == QEvent.Type.EnabledChange:
            self.target.setEnabled(obj.isEnabled())  # type: ignore[attr-defined]
            self.target.setToolTip(obj.toolTip())  # type: ignore[attr-defined]
        return False


class Workbench(QObject):
    """History, A/B, Merge & test and sweeps for a main window (GUI thread)."""

    def __init__(self, window: Any, cap: int = DEFAULT_CAP) -> None:
        super().__init__(window)
        self.w = window
        self.history = MergeHistory(cap)
        self.history_panel = HistoryPanel(self.history)
        self.sweep_panel = SweepPanel()
        window.views.register("history", "History", self.history_panel)
        window.views.register("sweep", "Sweep", self.sweep_panel)
        self.test_after_merge = False
        self.last_sweep: Any = None
        self.sweep_job = window.jobs.slot(
            "sweep", progressed=self._sweep_progress, finished=self._sweep_done, stopped=self._sweep_stopped,
            failed=lambda exc, tb: self._sweep_failed(exc, tb),
            cancelled=lambda: self.sweep_panel.show_status(
                f"Sweep cancelled: the {len(self.sweep_panel.cells)} finished cell(s) stay; click one to open it."))

        mp = window.merge_panel
        self.merge_test_button = QPushButton("Merge && test")
        self.merge_test_button.setToolTip("Merge, then run the test bench on the new result")
        row = _layout_holding(mp.layout(), mp.merge_button) if mp.layout() is not None else None
        if row is not None:
            row.insertWidget(row.indexOf(mp.merge_button) + 1, self.merge_test_button, 2)
        self._mirror = _MirrorEnabled(mp.merge_button, self.merge_test_button)
        self.merge_test_button.clicked.connect(self.merge_and_test)
        mp.merge_requested.connect(lambda: setattr(self, "test_after_merge", False))
        mp.changed.connect(self.refresh_sweep_choices)
        window.merge_finished.connect(self._merged)
        window.session.result_changed.connect(self._result_changed)
        window.session.inputs_changed.connect(self.refresh_sweep_choices)

        hp = self.history_panel
        hp.show_requested.connect(self.show_entry)
        hp.save_requested.connect(self.save_entry)
        hp.test_requested.connect(self.test_entries)
        hp.message.connect(lambda text: window.statusBar().showMessage(text, 8000))
        self.history.changed.connect(self._sync_bench)
        self.history.changed.connect(self._sync_spectra)
        self._spectra: dict[int, dict[str, dict[str, Any]]] = {}  # uid -> source -> layer -> Curve
        self.spectra_job = window.jobs.slot("history-spectra", supersede=True)
        self._spectra_key: set[tuple[str, str, str, int]] = set()
        bench = window.bench_panel
        bench.bench_finished.connect(self._bench_finished)
        bench.busy_changed.connect(lambda busy: None if busy else self._sync_bench())

        sp = self.sweep_panel
        sp.run_requested.connect(self.start_sweep)
        sp.cancel_requested.connect(self.sweep_job.cancel)
        sp.cell_opened.connect(self.open_cell)
        sp.save_best_requested.connect(self.save_cell)
        sp.export_requested.connect(self._export_dialog)

    # ------------------------------------------------------------------ names for the views
    def merged_name(self) -> str:
        """The test bench's name for the session's result: its history name."""
        e = self.history.for_result(self.w.session.merge_result)
        return e.name if e is not None else "Merged"

    def _result_changed(self) -> None:
        e = self.history.for_result(self.w.session.merge_result)
        uid = e.uid if e is not None else None
        if uid != self.history.current:
            self.history.select(uid)
        else:
            self._sync_spectra()  # the shown result is "merged" in the analysis, not a dotted curve

    def _sync_bench(self) -> None:
        bench = self.w.bench_panel
        if bench.is_busy():
            return
        current = self.w.session.merge_result
        bench.set_results({e.name: e.result.projector for e in self.history.entries if e.result is not current})
        if current is not None:
            bench.set_merged(current.projector, self.merged_name())

    # ------------------------------------------------------------------ spectra of pinned results
    def _sync_spectra(self) -> None:
        """Pinned results (other than the shown one, the analysis' "merged") get dotted curves
        in the Spectra view; their singular values are computed once, in a worker."""
        current = self.w.session.merge_result
        shown = [e for e in self.history.entries if e.pinned and e.result is not current]
        self._spectra = {uid: v for uid, v in self._spectra.items() if self.history.find(uid) is not None}
        todo = [(e.uid, e.result.projector) for e in shown if e.uid not in self._spectra]
        if not todo:
            self._show_spectra(shown)
            return
        base = self.w.session.base_projector()

        def job(ctx: WorkContext) -> dict[int, dict[str, dict[str, Any]]]:
            from pivotmerge_gui.core.analysis import singular_values

            from .panels.analysis_view import Curve

            def curve(t: Any) -> Curve:
                sv = singular_values(t)
                return Curve(sv.values, float(sv.total_energy), bool(sv.complete))

            out: dict[int, dict[str, dict[str, Any]]] = {}
            for uid, proj in todo:
                per: dict[str, dict[str, Any]] = {"weights": {}, "task vectors": {}}
                state = proj.state()
                ref = base.state() if base is not None and base.layer_names == proj.layer_names else None
                for layer in proj.layers:
                    key = f"{layer.name}.weight"
                    if key not in state or state[key].dim() != 2:
                        continue
                    ctx.raise_if_cancelled()
                    per["weights"][layer.name] = curve(state[key])
                    if ref is not None and ref[key].shape == state[key].shape:
                        per["task vectors"][layer.name] = curve(state[key].float() - ref[key].float())
                out[uid] = per
            return out

        def done(found: dict[int, dict[str, dict[str, Any]]]) -> None:
            self._spectra.update(found)
            cur = self.w.session.merge_result
            self._show_spectra([e for e in self.history.entries if e.pinned and e.result is not cur])

        self.spectra_job.start(job, finished=done)

    def _show_spectra(self, entries: list[HistoryEntry]) -> None:
        extra: dict[str, dict[str, dict[str, Any]]] = {}
        for e in entries:
            for source, layers in self._spectra.get(e.uid, {}).items():
                for layer, c in layers.items():
                    extra.setdefault(source, {}).setdefault(layer, {})[e.name] = c
        key = {(src, layer, name, id(c)) for src, ls in extra.items() for layer, cs in ls.items() for name, c in cs.items()}
        if key != self._spectra_key:  # (curves hold arrays: compare by identity, not by value)
            self._spectra_key = key
            self.w.spectra_panel.set_extra(extra)

    # ------------------------------------------------------------------ history
    def add_result(self, result: Any, name: str | None = None, origin: str = "merge") -> HistoryEntry:
        entry = self.history.add(result, name, origin=origin, inputs=self.w.session.current_inputs())
        return entry

    def _merged(self, result: Any) -> None:
        self.add_result(result)
        self._sync_bench()
        if self.test_after_merge:
            self.test_after_merge = False
            self.run_bench([self.merged_name()])

    def show_entry(self, uid: int) -> None:
        """Make a history result the session's result (views, bench's merged column, Save)."""
        try:
            entry = self.history.get(uid)
        except PivotMergeError as exc:
            self.w.statusBar().showMessage(str(exc), 8000)
            return
        self.history.select(uid)
        if self.w.session.merge_result is not entry.result:
            self.w.session.set_result(entry.result, entry.inputs or None)
        self._sync_bench()
        self.w.statusBar().showMessage(f"Showing '{entry.name}' in the views and the test bench.", 5000)

    def save_entry(self, uid: int) -> None:
        self.show_entry(uid)
        if self.w.merge_result is self.history.get(uid).result:
            self.w.save_merged()

    # ------------------------------------------------------------------ Merge & test
    def merge_and_test(self) -> None:
        if not self.w.bench_panel.pairs:
            self.w.statusBar().showMessage(NO_PAIRS, 10000)
            self.w.views.show("bench")
            return
        self.w.start_merge()
        self.test_after_merge = self.w.merge_job.busy

    def run_bench(self, names: list[str]) -> GeneratorWorker | None:
        """Tick ``names`` (and keep the experts ticked) on the test bench and run it."""
        bench = self.w.bench_panel
        if bench.is_busy():
            self.w.statusBar().showMessage("The test bench is busy; run it again when it is done.", 8000)
            return None
        if not bench.pairs:
            self.w.statusBar().showMessage(NO_PAIRS, 10000)
            return None
        from PySide6.QtCore import Qt

        lst = bench.projector_list
        for i in range(lst.count()):
            it = lst.item(i)
            if it.data(Qt.ItemDataRole.UserRole) in names:
                it.setCheckState(Qt.CheckState.Checked)
        self.w.views.show("bench")
        return bench.run()

    def test_entries(self, uids: list[int]) -> GeneratorWorker | None:
        self._sync_bench()
        return self.run_bench([self.history.get(u).name for u in uids if self.history.find(u) is not None])

    def _bench_finished(self, result: Any) -> None:
        by_name = {e.name: e for e in self.history.entries}
        for name in result.projectors:
            e = by_name.get(name)
            if e is None:
                continue
            ev = result.metrics[name]
            scores = {d: float(m.token_accuracy) for d, m in ev.per_domain.items() if m.token_accuracy is not None}
            if ev.mean.token_accuracy is not None:
                scores["mean"] = float(ev.mean.token_accuracy)
            self.history_panel.captions[name] = [(r.reference, r.caption) for r in result.results[name]]
            self.history.set_scores(e.uid, scores, "token accuracy")

    # ------------------------------------------------------------------ sweeps
    def refresh_sweep_choices(self) -> None:
        method = self.w.merge_panel.method
        ready = self.w.session.experts.ready_entries()
        layers = list(ready[0].projector.layer_names) if ready else []
        self.sweep_panel.set_choices(list(method.params) if method is not None else [], layers)

    def start_sweep(self) -> GeneratorWorker | None:
        """Build the sweep from the form around the current setup and run it (worker)."""
        from pivotmerge_gui.core.sweep import SweepSpec

        sp, s, bench = self.sweep_panel, self.w.session, self.w.bench_panel
        if self.sweep_job.busy:
            return None
        r = s.readiness()
        if r.state != "check":
            sp.show_status(r.message, error=True)
            return None
        if not bench.pairs:
            sp.show_status(NO_PAIRS, error=True)
            return None
        if bench.is_busy():
            sp.show_status("The test bench is running; start the sweep when it is done.", error=True)
            return None
        try:
            spec = SweepSpec.from_dict(sp.document(self.w.current_recipe()), "sweep")
        except PivotMergeError as exc:
            sp.show_status(str(exc).removeprefix("sweep: "), error=True)
            return None
        loaded, calibration, problem = s.plan_inputs()
        if problem is not None:
            sp.show_status(problem, error=True)
            return None
        pairs = list(bench.pairs)
        get_backend = bench._get_backend  # loaded once, kept by the bench

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.evaluation.layer_scores import caption_sets_from_pairs
            from pivotmerge_gui.core.sweep import run_sweep

            backend = get_backend()
            sets = caption_sets_from_pairs(backend, pairs)
            return (yield from run_sweep(spec, backend=backend, sets=sets, loaded=loaded,
                                         calibration=calibration, cancel=ctx.cancel))

        sp.start_grid(spec)
        sp.set_running(True)
        n = spec.shape[0] * spec.shape[1]
        sp.show_status(f"Running {n} merge(s), each scored on {len(pairs)} pairs…")
        return self.sweep_job.start(job)

    def sweep_document(self) -> dict[str, Any]:
        """The form's sweep around the current setup, scored like the test bench (its back
        end and pairs), as a ``pivotmerge sweep`` document. Raises PivotMergeError."""
        from pivotmerge_gui.core.sweep import SweepSpec

        bench = self.w.bench_panel
        doc = self.sweep_panel.document(self.w.current_recipe())
        sources = bench.pair_sources
        if len(sources) != 1:
            raise PivotMergeError("the test bench's pairs must come from one source (the demo samples, or one "
                                  "folder or .jsonl) to be named in the document")
        src = sources[0]
        pairs = f"demo:{src['demo']}:{src['n']}" if "demo" in src else str(src["pairs"])
        doc["score"].update(backend=bench.backend_spec, pairs=pairs)
        SweepSpec.from_dict(doc, "sweep")  # the values are checked before anything is written
        return doc

    def export_sweep(self, path: str | Path) -> Path:
        import yaml

        from pivotmerge_gui.core.io.atomic import atomic_write_text

        text = yaml.safe_dump(self.sweep_document(), sort_keys=False, allow_unicode=True)
        return atomic_write_text(Path(path), text, overwrite=True)

    def _export_dialog(self) -> None:
        from PySide6.QtWidgets import QFileDialog

        start = str(Path(self.w.settings.last_dir()) / "sweep.yml")
        f, _ = QFileDialog.getSaveFileName(self.sweep_panel, "Save the sweep", start, "Sweeps (*.yml *.yaml)")
        if not f:
            return
        try:
            self.export_sweep(f)
        except (PivotMergeError, OSError) as exc:
            self.sweep_panel.show_status(f"Not saved: {exc}", error=True)
            return
        self.sweep_panel.show_status(f"Saved {f}: run it with `pivotmerge sweep {Path(f).name}`.")

    def _sweep_progress(self, ev: Any) -> None:
        if ev.stage == "cell":
            self.sweep_panel.add_cell(ev.payload, ev.fraction)
        self.sweep_panel.show_status(ev.message)

    def _sweep_done(self, result: Any) -> None:
        self.last_sweep = result
        b = result.best()
        self.sweep_panel.show_status(f"{len(result.cells)} cells in {result.elapsed_s:.1f} s"
                                     + (f"; best: {b.label} = {b.score:.4f}. Click a cell to open it."
                                        if b is not None else "; no cell could be scored."))

    def _sweep_failed(self, exc: BaseException, tb: str) -> None:
        from .errors import describe_exception

        short, details = describe_exception(exc, tb)
        if not isinstance(exc, PivotMergeError):
            log.error("sweep crashed: %s", details)
        self.sweep_panel.show_status(f"The sweep stopped: {short}", error=True)

    def _sweep_stopped(self) -> None:
        self.sweep_panel.set_running(False)

    def open_cell(self, cell: Any) -> HistoryEntry | GeneratorWorker | None:
        """A sweep cell's merge joins the history and is shown (merged again when the sweep
        did not keep it in memory)."""
        if cell.error:
            self.sweep_panel.show_status(f"This cell has no merge: {cell.error}", error=True)
            return None
        name = f"sweep: {cell.label}"
        if cell.result is not None:
            entry = self.add_result(cell.result, name, origin="sweep")
            self.show_entry(entry.uid)
            self.w.views.show("history")
            return entry
        if self.sweep_job.busy:
            self.sweep_panel.show_status("Wait for the sweep to end (or cancel it) to open this cell.", error=True)
            return None
        loaded, calibration, _problem = self.w.session.plan_inputs()
        recipe = cell.recipe

        def job(ctx: WorkContext) -> Any:
            from pivotmerge_gui.core.pipeline import plan, run

            return run(plan(recipe, loaded=loaded, calibration=calibration, cancel=ctx.cancel), ctx.cancel)

        def done(result: Any) -> None:
            cell.result = result
            self.open_cell(cell)

        self.sweep_panel.show_status(f"Merging {cell.label} again (the sweep kept only the best in memory)…")
        return self.sweep_job.start(job, finished=done)

    def save_cell(self, cell: Any) -> None:
        opened = self.open_cell(cell)
        if isinstance(opened, HistoryEntry):
            self.save_entry(opened.uid)
