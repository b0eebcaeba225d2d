"""Background work: drive a core generator on a QThread and report through signals.

The core exposes long work as generators of ``ProgressEvent`` (napari/superqt
``GeneratorWorker`` style). :class:`GeneratorWorker` runs such a generator (or a plain
function) on its own ``QThread``; between two yields it checks its ``CancelToken`` and
stops, so cancellation latency is the time between two yields of the core. Progress
signals are throttled so that a chatty generator cannot flood the GUI event loop.

Signals (all delivered on the GUI thread, queued):
``progressed(ProgressEvent)``, ``finished(result)``, ``failed(exception, traceback)``,
``cancelled()``. Exactly one of ``finished``/``failed``/``cancelled`` is emitted, then
``stopped()`` once the thread is done.
"""

from __future__ import annotations

import inspect
import logging
import os
import sys
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

from PySide6.QtCore import QObject, QThread, Signal, Slot

from pivotmerge_gui.core.errors import Cancelled
from pivotmerge_gui.core.progress import CancelToken, ProgressEvent, drain

log = logging.getLogger("pivotmerge_gui.gui.workers")

# Workers that are still running are kept alive here (Qt owns nothing on the Python side).
_RUNNING: set[GeneratorWorker] = set()


class WorkContext:
    """Handed to the work function (runs on the worker thread): cancellation and progress."""

    def __init__(self, worker: GeneratorWorker) -> None:
        self._worker = worker
        self.cancel: CancelToken = worker.token

    def emit(self, event: ProgressEvent) -> None:
        """Report progress from inside a plain function (callback style)."""
        self._worker._report(event)

    def raise_if_cancelled(self) -> None:
        self.cancel.raise_if_cancelled()


#: Niceness added to worker threads (Linux: per-thread). The GUI thread keeps the normal
#: priority, so on a busy machine the scheduler serves the event loop first; torch's
#: intra-op threads, created by the first worker that computes, inherit the lower priority.
WORKER_NICENESS = 5


def lower_thread_priority(increment: int = WORKER_NICENESS) -> bool:
    """Raise the calling thread's nice value (unprivileged; only ever lowers priority)."""
    if increment <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        tid = threading.get_native_id()
        os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + increment))
        return True
    except (OSError, AttributeError):
        return False


class _Runner(QThread):
    """The worker thread: ``run`` executes the work function there."""

    def __init__(self, worker: GeneratorWorker) -> None:
        super().__init__()
        self._worker = worker

    def run(self) -> None:
        lower_thread_priority()
        self._worker._run()


class GeneratorWorker(QObject):
    """Runs ``fn(ctx)`` on a dedicated worker thread.

    The worker object itself lives on the GUI thread and is controlled from there; only
    ``_run`` executes on the worker thread. Because the object (the sender) lives on the GUI
    thread, every signal emitted from the worker thread is queued to the GUI thread, also
    for receivers without a thread of their own (lambdas).
    ``fn`` may return a generator of ``ProgressEvent`` (its return value becomes the
    result) or a plain value.
    """

    progressed = Signal(object)
    finished = Signal(object)
    failed = Signal(object, str)
    cancelled = Signal()
    stopped = Signal()

    def __init__(self, fn: Callable[[WorkContext], Any], *, name: str = "worker",
                 min_interval_s: float = 0.03) -> None:
        super().__init__()
        self.fn = fn
        self.name = name
        self.token = CancelToken()
        self.min_interval_s = min_interval_s
        self._last_emit = 0.0
        self._thread: _Runner | None = None
        self.done = False
        self.outcome: str | None = None  # "finished" | "failed" | "cancelled"

    # ------------------------------------------------------------ GUI thread API
    def start(self) -> GeneratorWorker:
        thread = _Runner(self)
        thread.setObjectName(self.name)
        self._thread = thread
        thread.finished.connect(self._on_thread_finished)
        _RUNNING.add(self)
        thread.start()
        return self

    def cancel(self) -> None:
        """Ask the work to stop at its next check; ``cancelled`` follows."""
        self.token.cancel()

    @property
    def is_running(self) -> bool:
        return self._thread is not None and not self.done

    def wait(self, timeout_ms: int = 10_000) -> bool:
        """Block until the thread has ended (shutdown and tests only)."""
        if self._thread is None:
            return True
        return self._thread.wait(timeout_ms)

    @Slot()
    def _on_thread_finished(self) -> None:
        if self.done:
            return
        self.done = True
        _RUNNING.discard(self)
        self.stopped.emit()

    # ------------------------------------------------------------ worker thread
    def _report_any(self, event: object) -> None:
        if isinstance(event, ProgressEvent):
            self._report(event)

    def _report(self, event: ProgressEvent) -> None:
        now = time.perf_counter()
        if event.payload is not None or event.fraction >= 1.0 or now - self._last_emit >= self.min_interval_s:
            self._last_emit = now
            self.progressed.emit(event)

    def _run(self) -> None:
        ctx = WorkContext(self)
        try:
            result = self.fn(ctx)
            if inspect.isgenerator(result):
                result = drain(result, self._report_any, cancel=self.token)
            if self.token.cancelled:
                raise Cancelled()
        except Cancelled:
            self.outcome = "cancelled"
            self.cancelled.emit()
        except BaseException as exc:  # noqa: BLE001 - every error must reach the user
            tb = traceback.format_exc()
            log.info("worker %s failed: %s", self.name, tb)
            self.outcome = "failed"
            self.failed.emit(exc, tb)
        else:
            self.outcome = "finished"
            self.finished.emit(result)


def running_workers() -> list[GeneratorWorker]:
    return list(_RUNNING)


def stop_all(timeout_ms: int = 5000) -> None:
    """Cancel every running worker and wait for the threads (application shutdown)."""
    for w in list(_RUNNING):
        w.cancel()
    for w in list(_RUNNING):
        w.wait(timeout_ms)
