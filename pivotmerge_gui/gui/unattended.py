"""``pivotmerge-gui ... --merge --save DIR``: merge with the app's current settings, save
through the Save dialog's own code path (:meth:`MergeFlowMixin.save_to`), print what was
written and exit. Lets a script (or a test) check that what the app saves is what it
merged: ``pivotmerge merge DIR/recipe.yml OTHER`` must give the same tensors."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any


def arm_merge_and_save(app: Any, window: Any, folder: Path, timeout: float, overwrite: bool = False) -> None:
    """Poll until the window is idle, merge, save to ``folder``, then exit the app with 0
    (saved), 1 (the merge or save failed: the reason is printed) or 2 (nothing to merge)."""
    from PySide6.QtCore import QTimer

    started = time.perf_counter()
    state = {"phase": "wait"}

    def finish(code: int, text: str) -> None:
        print(text, file=sys.stdout if code == 0 else sys.stderr)
        # background jobs the result started (analysis) stop before the app does
        window.close()  # stops timers and workers, detaches their signals
        app.exit(code)

    def tick() -> None:
        elapsed = time.perf_counter() - started
        if elapsed > timeout:
            return finish(1, f"pivotmerge-gui: gave up after {timeout:.0f} s ({state['phase']})")
        idle = window.is_idle() and window.core_ready and bool(window.experts.entries)
        phase = state["phase"]
        if phase == "wait" and idle:
            if window.merge_panel.merge_button.isEnabled():
                state["phase"] = "merging"
                window.start_merge()
            elif elapsed > 20:
                return finish(2, f"pivotmerge-gui: cannot merge: {window.merge_reason}")
        elif phase == "merging" and not window.merge_job.busy:
            if window.merge_result is None:
                why = window.errors_shown[-1] if window.errors_shown else "the merge did not finish"
                return finish(1, f"pivotmerge-gui: merge failed: {why}")
            state["phase"] = "saving"
            window.last_saved = []
            if window.save_to(folder, overwrite=overwrite) is None:
                return finish(1, "pivotmerge-gui: the save could not start")
        elif phase == "saving" and not window.save_job.busy:
            if not window.last_saved:
                why = window.errors_shown[-1] if window.errors_shown else "nothing was written"
                return finish(1, f"pivotmerge-gui: save failed: {why}")
            return finish(0, "saved: " + ", ".join(str(p) for p in window.last_saved))
        QTimer.singleShot(200, tick)

    QTimer.singleShot(500, tick)
