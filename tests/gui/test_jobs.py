"""Job slots: a superseded job's results never arrive, a busy slot refuses, idle is reported
once everything stopped, and detached jobs deliver nothing."""

from __future__ import annotations

import threading

from pivotmerge_gui.gui.jobs import Jobs


def _blocking(release: threading.Event, value: object):  # type: ignore[no-untyped-def]
    def job(ctx):  # type: ignore[no-untyped-def]
        release.wait(10)
        return value

    return job


def test_superseded_job_results_are_dropped(qtbot):
    got: list[object] = []
    idle: list[bool] = []
    jobs = Jobs(on_idle=lambda: idle.append(not jobs.busy()))
    slot = jobs.slot("analysis", supersede=True, finished=got.append)
    first, second = threading.Event(), threading.Event()
    w1 = slot.start(_blocking(first, "old"))
    w2 = slot.start(_blocking(second, "new"))
    assert w1 is not None and w2 is not None and w1.token.cancelled and slot.worker is w2
    first.set()
    qtbot.waitUntil(lambda: w1.done, timeout=5000)
    second.set()
    qtbot.waitUntil(lambda: not slot.busy, timeout=5000)
    assert got == ["new"]
    assert idle and idle[-1] is True and not jobs.busy()


def test_a_busy_slot_refuses_a_second_job(qtbot):
    jobs = Jobs()
    slot = jobs.slot("merge")
    release = threading.Event()
    assert slot.start(_blocking(release, 1)) is not None
    assert slot.start(_blocking(release, 2)) is None
    assert jobs.busy()
    release.set()
    qtbot.waitUntil(lambda: not jobs.busy(), timeout=5000)


def test_queue_runs_at_most_n_in_order_and_dropped_jobs_deliver_nothing(qtbot):
    jobs = Jobs()
    queue = jobs.queue("load", max_parallel=2)
    order: list[int] = []
    gates = [threading.Event() for _ in range(3)]
    queue.hold(True)
    for k in range(3):
        queue.submit(k, _blocking(gates[k], k), finished=order.append)
    assert not queue.running  # held
    queue.hold(False)
    assert sorted(queue.running) == [0, 1]
    gates[1].set()
    qtbot.waitUntil(lambda: 2 in queue.running, timeout=5000)
    gates[0].set()
    gates[2].set()
    qtbot.waitUntil(lambda: not queue.busy, timeout=5000)
    assert sorted(order) == [0, 1, 2] and order[0] == 1

    slot = jobs.slot("validate", finished=order.append)
    release = threading.Event()
    w = slot.start(_blocking(release, "late"))
    slot.cancel(drop=True)
    assert not slot.busy
    release.set()
    qtbot.waitUntil(lambda: w.done, timeout=5000)
    assert "late" not in order


def test_detach_all_disconnects_running_jobs(qtbot):
    got: list[object] = []
    jobs = Jobs()
    slot = jobs.slot("save", finished=got.append)
    release = threading.Event()
    w = slot.start(_blocking(release, "x"))
    jobs.detach_all()
    release.set()
    qtbot.waitUntil(lambda: not w.is_running, timeout=5000)
    qtbot.wait(50)
    assert got == [] and not jobs.busy()
