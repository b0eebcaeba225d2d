"""The analysis flow of the main window: (re)start the background analysis when the inputs
or the merge result change, and keep the inspect views honest meanwhile.

A mixin of :class:`~pivotmerge_gui.gui.main_window.MainWindow`. While an analysis runs the
views say so (not "drop two or more experts"); the spectra say that the merged curve is
being computed; the analysis aligns to the pivot the merge picked (or the ticked one), so
the Layers header names the same pivot as the merge; curve colours belong to experts (by
uid), not to list positions.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

from . import tasks
from .errors import describe_exception
from .panels.inspect import PALETTE

log = logging.getLogger("pivotmerge_gui.gui")


class AnalysisFlowMixin:
    """Analysis start/finish for the main window (GUI thread)."""

    _analysis_dirty = False
    _colors_by_uid: dict[int, str] | None = None

    def _inspect_panels(self) -> tuple[Any, ...]:
        return (self.layers_panel, self.spectra_panel, self.similarity_panel)

    def expert_colors(self) -> dict[str, str]:
        """Curve colour per expert name: each expert keeps the colour it got when first seen
        (reordering the list does not repaint the curves)."""
        if self._colors_by_uid is None:
            self._colors_by_uid = {}
        out = {}
        for e in self.session.experts.entries:
            if e.uid not in self._colors_by_uid:
                used = set(self._colors_by_uid.values())
                free = [c for c in PALETTE if c not in used]
                self._colors_by_uid[e.uid] = free[0] if free else PALETTE[len(self._colors_by_uid) % len(PALETTE)]
            out[e.name] = self._colors_by_uid[e.uid]
        return out

    def analysis_pivot(self, ready: list[Any]) -> tuple[int, str]:
        """The expert the analysis aligns hidden units to, and why: the merge's pivot (when
        the result belongs to these experts), else the ticked pivot, else the first expert."""
        names = [e.name for e in ready]
        result = self.session.merge_result
        report = result.report if result is not None else {}
        picked = ((report.get("method_report") or {}).get("pivot") or {}) if isinstance(report, dict) else {}
        if isinstance(picked, dict) and picked.get("name") in names:
            return names.index(picked["name"]), "the merge's pivot"
        row = self.session.experts.pivot_index()
        if row is not None:
            entry = self.session.experts.entry(row)
            if entry in ready:
                return ready.index(entry), "the ticked pivot"
        return 0, "the first expert; the merge picks its own pivot"

    def _start_analysis(self) -> None:
        s = self.session
        self._analysis_dirty = False
        ready = s.experts.ready_entries()
        if not ready:
            self.analysis_job.cancel(drop=True)
            self._set_analysis(None)
            self._check_idle()
            return
        merged = s.merge_result.projector if s.merge_result is not None else None
        pivot, why = self.analysis_pivot(ready)
        self._analysis_frame = f"; reference expert {ready[pivot].name}: {why}" if len(ready) > 1 else ""
        for panel in self._inspect_panels():
            if panel.view is None:  # nothing shown yet: say what is happening, not "drop experts"
                panel.show_message(f"Analysing {len(ready)} expert(s)…")
        has_merged_curve = s.analysis is not None and getattr(s.analysis, "has_merged", False)
        self.spectra_panel.set_pending("Computing the merged curve…" if merged is not None and not has_merged_curve
                                       else "")
        self.analysis_job.start(tasks.analysis([e.projector for e in ready], s.base_projector(),
                                               [e.name for e in ready], merged, pivot))

    _analysis_frame = ""

    def _analysis_finished(self, analysis: Any) -> None:
        self._set_analysis(analysis)
        gc.freeze()  # long-lived results leave the collector's generations (see _engine_loaded)
        self.statusBar().showMessage("Analysis updated.", 3000)

    def _analysis_failed(self, exc: BaseException, tb: str) -> None:
        short, details = describe_exception(exc, tb)
        log.warning("analysis failed: %s", details)
        self.statusBar().showMessage(f"Analysis failed: {short}")
        self._set_analysis(None, problem=short)

    def _set_analysis(self, analysis: Any, problem: str = "") -> None:
        self.session.analysis = analysis
        self.spectra_panel.set_pending("")
        self.spectra_panel.colors = self.expert_colors()
        self.layers_panel.frame_note = self._analysis_frame if analysis is not None else ""
        for panel in self._inspect_panels():
            panel.set_analysis(analysis, problem)
        if analysis is None and not problem and self.session.experts.entries:
            waiting = sum(e.status == "loading" for e in self.session.experts.entries)
            text = (f"Loading {waiting} expert(s)…" if waiting else
                    "Every expert is flagged: fix or remove them to see this view.")
            for panel in self._inspect_panels():
                panel.show_message(text)
