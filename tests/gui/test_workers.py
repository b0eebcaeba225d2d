"""GeneratorWorker: progress, finished, failed and cancelled signals, on the GUI thread."""

from __future__ import annotations

import threading
import time

import pytest

from pivotmerge_gui.core.errors import CheckpointError
from pivotmerge_gui.core.progress import ProgressEvent
from pivotmerge_gui.gui.workers import GeneratorWorker


def _collect(worker: GeneratorWorker) -> dict:
    got: dict = {"progress": [], "threads": set()}

    def on_progress(ev):
        got["progress"].append(ev)
        got["threads"].add(threading.current_thread() is threading.main_thread())

    worker.progressed.connect(on_progress)
    worker.finished.connect(lambda r: got.__setitem__("finished", r))
    worker.failed.connect(lambda e, tb: got.__setitem__("failed", (e, tb)))
    worker.cancelled.connect(lambda: got.__setitem__("cancelled", True))
    return got


def test_progress_and_finished_arrive_on_the_gui_thread(qtbot):
    worker_threads = []

    def job(ctx):
        worker_threads.append(threading.current_thread())
        for i in range(3):
            yield ProgressEvent("step", i / 3, f"step {i}")
        return "result"

    w = GeneratorWorker(job, min_interval_s=0.0)
    got = _collect(w)
    with qtbot.waitSignal(w.stopped, timeout=10_000):
        w.start()
    assert got["finished"] == "result"
    assert [e.message for e in got["progress"]] == ["step 0", "step 1", "step 2"]
    assert got["threads"] == {True}  # slots ran on the GUI thread (queued), not the worker
    assert worker_threads[0] is not threading.main_thread()
    assert w.outcome == "finished"


def test_plain_function_with_callback_progress(qtbot):
    def job(ctx):
        ctx.emit(ProgressEvent("load", 1.0, "read"))
        return 7

    w = GeneratorWorker(job)
    got = _collect(w)
    with qtbot.waitSignal(w.stopped, timeout=10_000):
        w.start()
    assert got["finished"] == 7
    assert got["progress"][0].message == "read"


def test_failed_carries_the_exception_and_traceback(qtbot):
    def job(ctx):
        yield ProgressEvent("load", 0.0, "")
        raise CheckpointError("/x.bin", "not a checkpoint")

    w = GeneratorWorker(job)
    got = _collect(w)
    with qtbot.waitSignal(w.stopped, timeout=10_000):
        w.start()
    exc, tb = got["failed"]
    assert isinstance(exc, CheckpointError) and "/x.bin" in str(exc)
    assert "CheckpointError" in tb
    assert "finished" not in got and w.outcome == "failed"


@pytest.mark.parametrize("latency_s", [0.01])
def test_cancel_stops_between_yields_within_a_second(qtbot, latency_s):
    steps = []

    def job(ctx):
        for i in range(100_000):
            steps.append(i)
            time.sleep(latency_s)
            yield ProgressEvent("merge", i / 100_000, "")
        return "never"

    w = GeneratorWorker(job)
    got = _collect(w)
    w.start()
    qtbot.waitUntil(lambda: len(steps) > 3, timeout=10_000)
    t0 = time.perf_counter()
    with qtbot.waitSignal(w.stopped, timeout=5_000):
        w.cancel()
    assert time.perf_counter() - t0 < 1.0
    assert got.get("cancelled") is True and "finished" not in got
    assert w.outcome == "cancelled"
