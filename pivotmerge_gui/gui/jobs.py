"""Job slots: one owner for start / supersede / cancel / idle / disconnect of background jobs.

Every kind of background work of the window (engine import, loads, analysis, validation,
merge, save, demo) is a :class:`JobSlot` in one :class:`Jobs` registry. A slot runs at
most one :class:`GeneratorWorker`; starting again either supersedes the running job
(cancelled, its late signals dropped) or is refused. Only the current job's signals reach
the callbacks. The registry answers "is anything running?" and detaches every job when the
window closes, so a finished worker's queued signals never reach a dying window.
"""

from __future__ import annotations

import warnings
from collections import deque
from collections.abc import Callable, Hashable
from typing import Any

from .workers import GeneratorWorker, WorkContext

Callback = Callable[..., Any] | None
_SIGNALS = ("progressed", "finished", "failed", "cancelled")


class JobSlot:
    """One kind of job (see the module docstring). Callbacks given to :meth:`start`
    override the slot's defaults for that job."""

    def __init__(self, registry: Jobs, name: str, *, supersede: bool = False, **callbacks: Callback) -> None:
        unknown = set(callbacks) - {*_SIGNALS, "stopped"}
        if unknown:
            raise TypeError(f"unknown job callbacks: {sorted(unknown)}")
        self.registry = registry
        self.name = name
        self.supersede = supersede
        self.callbacks = callbacks
        self.worker: GeneratorWorker | None = None
        self._all: set[GeneratorWorker] = set()

    @property
    def busy(self) -> bool:
        return self.worker is not None

    def start(self, fn: Callable[[WorkContext], Any], **callbacks: Callback) -> GeneratorWorker | None:
        """Run ``fn`` on a worker thread; None when a job runs and the slot does not supersede."""
        if self.worker is not None:
            if not self.supersede:
                return None
            self.worker.cancel()
        cbs = {**self.callbacks, **callbacks}
        w = GeneratorWorker(fn, name=self.name)
        for sig in _SIGNALS:
            cb = cbs.get(sig)
            if cb is not None:
                getattr(w, sig).connect(lambda *a, w=w, cb=cb: cb(*a) if self.worker is w else None)
        on_stopped = cbs.get("stopped")
        w.stopped.connect(lambda w=w, cb=on_stopped: self._stopped(w, cb))
        self.worker = w
        self._all.add(w)
        return w.start()

    def cancel(self, *, drop: bool = False) -> None:
        """Ask the running job to stop; ``drop``: also forget it at once (its late signals
        are ignored and the slot is free)."""
        if self.worker is not None:
            self.worker.cancel()
            if drop:
                self.worker = None

    def _stopped(self, w: GeneratorWorker, cb: Callback) -> None:
        self._all.discard(w)
        if self.worker is not w:
            return  # superseded: the current job reports for the slot
        self.worker = None
        if cb is not None:
            cb()
        self.registry.check_idle()

    def detach(self) -> None:
        """Cancel and disconnect every job of this slot (window shutdown)."""
        for w in list(self._all):
            w.cancel()
            for sig in (*_SIGNALS, "stopped"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    try:
                        getattr(w, sig).disconnect()
                    except (RuntimeError, TypeError):
                        pass
        self._all.clear()
        self.worker = None


class JobQueue:
    """Keyed jobs of one kind (loads) run at most ``max_parallel`` at a time, in order;
    :meth:`hold` keeps queued jobs waiting (while the engine imports)."""

    def __init__(self, registry: Jobs, name: str, max_parallel: int = 2) -> None:
        self.registry = registry
        self.name = name
        self.max_parallel = max_parallel
        self.held = False
        self._queue: deque[tuple[Hashable, Callable[[WorkContext], Any], dict[str, Callback]]] = deque()
        self.running: dict[Hashable, JobSlot] = {}

    @property
    def busy(self) -> bool:
        return bool(self._queue or self.running)

    def submit(self, key: Hashable, fn: Callable[[WorkContext], Any], **callbacks: Callback) -> None:
        self._queue.append((key, fn, callbacks))
        self.pump()

    def hold(self, held: bool) -> None:
        self.held = held
        if not held:
            self.pump()

    def pump(self) -> None:
        while not self.held and self._queue and len(self.running) < self.max_parallel:
            key, fn, callbacks = self._queue.popleft()
            user_stopped = callbacks.pop("stopped", None)
            slot = JobSlot(self.registry, f"{self.name}-{key}")
            self.running[key] = slot

            def stopped(key: Hashable = key, cb: Callback = user_stopped) -> None:
                self.running.pop(key, None)
                if cb is not None:
                    cb()
                self.pump()

            slot.start(fn, stopped=stopped, **callbacks)

    def detach(self) -> None:
        self._queue.clear()
        for slot in list(self.running.values()):
            slot.detach()
        self.running.clear()


class Jobs:
    """A window's job slots and queues: idle check and shutdown in one place.
    ``on_idle`` runs whenever a job stops and nothing else is running or queued."""

    def __init__(self, on_idle: Callable[[], Any] | None = None) -> None:
        self.on_idle = on_idle
        self.slots: dict[str, JobSlot] = {}
        self.queues: dict[str, JobQueue] = {}
        self.extra_busy: list[Callable[[], bool]] = []  # e.g. panels with their own workers

    def slot(self, name: str, *, supersede: bool = False, **callbacks: Callback) -> JobSlot:
        s = JobSlot(self, name, supersede=supersede, **callbacks)
        self.slots[name] = s
        return s

    def queue(self, name: str, max_parallel: int = 2) -> JobQueue:
        q = JobQueue(self, name, max_parallel)
        self.queues[name] = q
        return q

    def busy(self) -> bool:
        return (any(s.busy for s in self.slots.values()) or any(q.busy for q in self.queues.values())
                or any(f() for f in self.extra_busy))

    def check_idle(self) -> None:
        if self.on_idle is not None:
            self.on_idle()

    def detach_all(self) -> None:
        for s in self.slots.values():
            s.detach()
        for q in self.queues.values():
            q.detach()


class SingleJobPanel:
    """For panels that run one background job at a time through ``self.job`` (a
    :class:`JobSlot`): the worker, busy state and cancel, written once."""

    job: JobSlot

    @property
    def worker(self) -> GeneratorWorker | None:
        return self.job.worker

    def is_busy(self) -> bool:
        return self.job.busy

    def cancel(self) -> None:
        self.job.cancel()
