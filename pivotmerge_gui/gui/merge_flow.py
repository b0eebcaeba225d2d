"""The merge flow of the main window: readiness, validation (``pipeline.plan``), merge,
result and save.

A mixin of :class:`~pivotmerge_gui.gui.main_window.MainWindow` (it uses the window's
session model, merge panel and job slots); kept apart so the window module stays layout,
menus and wiring.
"""

from __future__ import annotations

import gc
import logging
from pathlib import Path
from typing import Any

from pivotmerge_gui.core.errors import PivotMergeError

from . import tasks
from .dialogs import SaveDialog, fresh_folder
from .errors import describe_exception, gui_words
from .workers import GeneratorWorker

log = logging.getLogger("pivotmerge_gui.gui")


class MergeFlowMixin:
    """Validation, merge and save for the main window (GUI thread)."""

    # ------------------------------------------------------------------ validation
    def _show_readiness(self) -> bool:
        """Show the engine-free checks; True when a full ``plan()`` check should follow."""
        self.session.merging = self.merge_job.busy
        r = self.session.readiness()
        if r.state == "blocked":
            self.merge_panel.set_validation(False, r.message)
        elif r.state == "pending" and not self.merge_job.busy:
            self.merge_panel.set_pending(r.message)
        return r.state == "check"

    def _schedule_validation(self) -> None:
        if not self.merge_job.busy and self.merge_panel.stage_label.text().startswith(("The last merge failed",
                                                                                      "Merge cancelled")):
            self.merge_panel.show_progress(0.0, "")  # that line was about the setup before this change
        if self._show_readiness():
            self.merge_panel.set_pending("Checking the setup…")
            self._validate_timer.start()

    def validate_now(self) -> None:
        """Run ``pipeline.plan`` on the current setup in a worker; the result enables Merge."""
        s = self.session
        if not self._show_readiness():
            self._check_idle()
            return
        try:
            recipe = self.current_recipe()
        except PivotMergeError as exc:
            s.set_plan(None, None)
            self.merge_panel.set_validation(False, gui_words(str(exc)))
            return
        key = s.setup_key(recipe)
        if key == s.plan_key and s.plan is not None:
            self.validation_job.cancel(drop=True)  # a check of another setup is moot
            self._show_plan_ok(s.plan)
            return
        if key == self._validation_key and self.validation_job.busy:
            return
        loaded, calibration, problem = s.plan_inputs()
        if problem is not None:
            self.validation_job.cancel(drop=True)
            s.set_plan(None, None)
            self.merge_panel.set_validation(False, problem)
            return
        self._validation_key = key
        self.merge_panel.set_pending("Checking the setup…")
        self.validation_job.start(tasks.plan(recipe, loaded, calibration, s.allow_nonfinite),
                                  finished=lambda p: self._validated(key, p, None, ""),
                                  failed=lambda exc, tb: self._validated(key, None, exc, tb))

    _validation_key: str | None = None

    def _validated(self, key: str, plan: Any, exc: BaseException | None, tb: str) -> None:
        if plan is not None:
            self.session.set_plan(plan, key)
            self._show_plan_ok(plan)
            return
        self.session.set_plan(None, None)
        assert exc is not None
        short, details = describe_exception(exc, tb)
        if not isinstance(exc, PivotMergeError):
            log.error("validation crashed: %s", details)
        self.merge_panel.set_validation(False, short)

    def _show_plan_ok(self, plan: Any) -> None:
        text = f"Ready: {plan.method.pretty_name} of {len(plan.experts)} experts on {plan.device}."
        if plan.warnings:
            text += " Warnings: " + "; ".join(plan.warnings)
        self.merge_panel.set_validation(True, text)

    # ------------------------------------------------------------------ merge
    def start_merge(self) -> None:
        s = self.session
        if self.merge_job.busy or s.plan is None:
            return
        try:
            key = s.setup_key(self.current_recipe())
        except PivotMergeError as exc:
            self.merge_panel.set_validation(False, gui_words(str(exc)))
            return
        if key != s.plan_key:
            self.validate_now()
            return
        plan = s.plan
        self.settings.set_value("merge/method", plan.method.name)
        self.merge_panel.set_running(True)
        self.merge_panel.show_progress(0.0, "Starting…")
        self._merge_inputs = s.current_inputs()
        self.merge_job.start(tasks.merge(plan))
        log.info("merge started: %s", plan.method.name)

    _merge_inputs: tuple[Any, ...] = ()

    def cancel_merge(self) -> None:
        if self.merge_job.busy:
            self.merge_job.cancel()
            self.merge_panel.stage_label.setText("Cancelling…")

    def _merge_done(self, result: Any) -> None:
        gc.freeze()  # see _engine_loaded
        self.merge_panel.show_progress(1.0, f"Done in {result.elapsed_s:.2f} s. Save it, or inspect the "
                                            "'Merged' curves in the views.")
        self.session.set_result(result, self._merge_inputs)
        self.views.show("report")
        self.merge_finished.emit(result)

    def _merge_failed(self, exc: BaseException, tb: str) -> None:
        self.merge_panel.show_progress(0.0, f"The last merge failed: {describe_exception(exc, tb)[0]}")
        self.show_error("The merge failed", exc, tb)

    def _merge_stopped(self) -> None:
        self.merge_panel.set_running(False)
        self.merge_panel.save_button.setEnabled(self.merge_result is not None)
        self.validate_now()  # the cached plan re-enables Merge at once

    def _result_changed(self) -> None:
        result = self.session.merge_result
        if result is None and not self.merge_job.busy and self.merge_panel.stage_label.text().startswith("Done"):
            self.merge_panel.show_progress(0.0, "The merged result was dropped: the experts changed. Merge again.")
        self.report_panel.set_report(result.report if result is not None else None)
        self.merge_panel.save_button.setEnabled(result is not None and not self.merge_job.busy)
        self.action_save_merged.setEnabled(result is not None)
        self.merge_panel.coefficients.set_used(self.session.used_coefficients())
        self._sync_side_panels()
        self._analysis_timer.start()

    # ------------------------------------------------------------------ save
    def save_merged(self) -> None:
        if self.merge_result is None:
            return
        start = str(Path(self.settings.last_dir()) / "merged-projector")
        folder = fresh_folder(str(self.settings.value("save/folder", start)))  # never an earlier output
        dlg = SaveDialog(str(folder), self.merge_result.projector.family, self)
        if dlg.exec() != SaveDialog.DialogCode.Accepted:
            return
        folder, fmt, dtype, overwrite = dlg.values()
        self.settings.set_value("save/folder", str(folder))
        self.save_to(folder, fmt, dtype, overwrite, into=dlg.into_model())

    def save_to(self, folder: Path, fmt: str = "auto", dtype: str = "auto",
                overwrite: bool = False, into: str = "", result: Any = None) -> GeneratorWorker | None:
        """Write projector + recipe.yml + README.md through ``pipeline.save_result`` (worker);
        with ``into`` (a model folder or Hub id) the complete model (full-model export).
        ``result``: a merge-history result (default: the session's)."""
        result = result if result is not None else self.merge_result
        if result is None:
            return None
        w = self.save_job.start(tasks.save(result, folder, fmt, dtype, overwrite, into))
        if w is not None:
            self.statusBar().showMessage(f"Saving to {folder}…")
        return w

    def _saved(self, paths: list[Path]) -> None:
        self.last_saved = list(paths)
        self.statusBar().showMessage("Saved: " + ", ".join(str(p) for p in paths), 15000)
        log.info("saved %s", paths)
