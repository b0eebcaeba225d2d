"""GUI responsiveness: time to first window, and event-loop stalls during a big merge and a sweep.

    python benchmarks/gui_responsiveness.py [--experts 3] [--method pivotmerge] [--runs 3]

1. Time to first window: a fresh ``pivotmerge-gui`` process is started and reports when its
   main window has been shown and painted; measured from just before the process is
   spawned (interpreter start + imports + window). Target: under 2 s.
2. Longest event-loop stall while a LLaVA-1.5-7B-sized merge runs in the worker: experts are
   ``mlp2x_gelu`` projectors 1024 -> 4096 -> 4096 (21 M parameters each, as LLaVA-1.5-7B's
   ``mm_projector.bin``) saved to disk in LLaVA's key layout and opened by the app as a user
   would; a 5 ms ``QTimer`` heartbeat on the GUI thread records the gaps between ticks while
   the merge runs. Target: longest gap under 50 ms. Also reported: the gaps while the experts
   load and are analysed (background work too, but no target).
3. Longest event-loop stall while a sweep runs (Sweep view, demo world: 6 x 5 cells of Task
   Arithmetic's scale x the first layer's coefficient, each merged and scored on the test
   bench's demo pairs, 4 per domain). Target: under 50 ms, as for the merge. ``--skip-sweep``
   leaves it out; ``--only-sweep`` runs it alone.

Runs offscreen unless ``QT_QPA_PLATFORM`` is set (e.g. ``xcb`` under Xvfb).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

FIRST_WINDOW_CHILD = r"""
import sys, time
t_start = float(sys.argv[1])
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
app = QApplication([])
from pivotmerge_gui.gui.main_window import MainWindow
w = MainWindow()
w.show()
torch_at_show = "torch" in sys.modules  # the engine loads on a worker right after this
def shown():
    app.processEvents()
    print(json.dumps({"first_window_s": time.time() - t_start, "torch_imported": torch_at_show}), flush=True)
    app.quit()
import json
QTimer.singleShot(0, shown)
app.exec()
from pivotmerge_gui.gui.workers import stop_all
stop_all(30000)
"""


def time_to_first_window(runs: int) -> dict:
    times, torch_flags = [], []
    for _ in range(runs):
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-c", FIRST_WINDOW_CHILD, repr(t0)], check=False,
                              capture_output=True, text=True, timeout=180)
        line = [l for l in proc.stdout.splitlines() if l.startswith("{")]
        if proc.returncode != 0 or not line:
            raise RuntimeError(f"first-window child failed: {proc.stderr[-2000:]}")
        rec = json.loads(line[-1])
        times.append(rec["first_window_s"])
        torch_flags.append(rec["torch_imported"])
    return {"first_window_s_median": statistics.median(times), "first_window_s_all": times,
            "torch_imported_at_first_window": any(torch_flags)}


class GcPauses:
    """Records cyclic-GC pauses (which block every Python thread, the GUI's included)."""

    def __init__(self) -> None:
        import gc
        import threading

        self._gc, self._threading = gc, threading
        self.pauses: list[tuple[float, str]] = []
        self._t0 = 0.0
        self.active = False
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        elif self.active:
            self.pauses.append((time.perf_counter() - self._t0, self._threading.current_thread().name))

    def window(self) -> None:
        self.pauses, self.active = [], True

    def stats(self) -> dict:
        self.active = False
        longest = max(self.pauses, default=(0.0, ""))
        return {"gc_collections": len(self.pauses), "gc_longest_ms": round(1000 * longest[0], 1),
                "gc_longest_thread": longest[1]}


class Heartbeat:
    """Records the gaps between ticks of a GUI-thread timer (the event loop's stalls)."""

    def __init__(self, interval_ms: int = 5) -> None:
        from PySide6.QtCore import Qt, QTimer

        self.timer = QTimer()
        self.timer.setTimerType(Qt.TimerType.PreciseTimer)
        self.timer.setInterval(interval_ms)
        self.timer.timeout.connect(self._tick)
        self.gaps: list[float] = []
        self._last = None

    def _tick(self) -> None:
        now = time.perf_counter()
        if self._last is not None:
            self.gaps.append(now - self._last)
        self._last = now

    def start(self) -> None:
        self.gaps, self._last = [], time.perf_counter()
        self.timer.start()

    def stop(self) -> dict:
        self.timer.stop()
        g = sorted(self.gaps) or [0.0]
        return {"ticks": len(self.gaps), "max_stall_ms": round(1000 * g[-1], 1),
                "p99_gap_ms": round(1000 * g[int(0.99 * (len(g) - 1))], 1),
                "median_gap_ms": round(1000 * statistics.median(g), 2)}


def wait_until(app, cond, timeout: float) -> None:  # type: ignore[no-untyped-def]
    """Process ``app``'s events until ``cond()`` holds (TimeoutError after ``timeout`` s)."""
    t0 = time.perf_counter()
    while not cond():
        app.processEvents()
        time.sleep(0.001)
        if time.perf_counter() - t0 > timeout:
            raise TimeoutError("benchmark step timed out")


def merge_stalls(n_experts: int, method: str, d_in: int, d_hidden: int, d_out: int) -> dict:
    import torch
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from pivotmerge_gui.core.projector import Layer, Projector
    from pivotmerge_gui.gui.main_window import MainWindow
    from pivotmerge_gui.gui.workers import stop_all

    tmp = Path(tempfile.mkdtemp(prefix="pm-gui-bench-"))
    g = torch.Generator().manual_seed(0)
    base = {"0.weight": torch.randn(d_hidden, d_in, generator=g) * 0.02, "0.bias": torch.zeros(d_hidden),
            "2.weight": torch.randn(d_out, d_hidden, generator=g) * 0.02, "2.bias": torch.zeros(d_out)}
    paths = []
    for k in range(n_experts):
        state = {f"model.mm_projector.{n}": t + 0.01 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        p = tmp / f"expert{k}" / "mm_projector.bin"
        p.parent.mkdir(parents=True)
        torch.save(state, p)
        paths.append(str(p))
    torch.save({f"model.mm_projector.{n}": t for n, t in base.items()}, tmp / "base.bin")
    del Layer, Projector

    w = MainWindow()
    w.quiet_errors = True
    w.show()
    hb = Heartbeat()
    gcp = GcPauses()

    wait = functools.partial(wait_until, app)

    wait(lambda: w.core_ready, 120)
    # Baseline: the idle event loop under the machine's current load (nothing of ours runs)
    hb.start()
    t_idle = time.perf_counter()
    wait(lambda: time.perf_counter() - t_idle > 3.0, 10)
    idle_stats = hb.stop()
    hb.start()
    t_load = time.perf_counter()
    w.add_paths(paths)
    if w.merge_panel.method is not None and w.merge_panel.methods.get(method) is not None \
            and w.merge_panel.methods[method].needs_base:
        w.set_base(str(tmp / "base.bin"))
    wait(lambda: w.is_idle() and all(e.status != "loading" for e in w.experts.entries), 600)
    load_stats = hb.stop()
    load_stats["seconds"] = round(time.perf_counter() - t_load, 2)
    if not w.merge_panel.set_method_name(method):
        raise SystemExit(f"method '{method}' is not in the registry: {sorted(w.merge_panel.methods)}")
    wait(w.is_idle, 120)
    if not w.merge_panel.merge_button.isEnabled():
        raise SystemExit(f"cannot merge: {w.merge_reason}")
    done: list = []
    w.merge_finished.connect(done.append)
    hb.start()
    gcp.window()
    t0 = time.perf_counter()
    w.start_merge()
    wait(lambda: w.merge_worker is None, 600)
    merge_stats = hb.stop()
    merge_stats.update(gcp.stats())
    merge_stats["seconds"] = round(time.perf_counter() - t0, 2)
    merge_stats["ok"] = len(done) == 1

    # Cancel latency on the real merge: cancel mid-run, time until the worker has stopped
    wait(w.is_idle, 300)
    cancel_stats: dict = {}
    if w.merge_panel.merge_button.isEnabled():
        w.start_merge()
        t_start = time.perf_counter()
        wait(lambda: time.perf_counter() - t_start > min(2.0, 0.3 * merge_stats["seconds"]), 60)
        stage = w.merge_panel.stage_label.text()
        t_cancel = time.perf_counter()
        w.cancel_merge()
        wait(lambda: w.merge_worker is None, 120)
        cancel_stats = {"cancelled_during": stage, "latency_s": round(time.perf_counter() - t_cancel, 3),
                        "new_result_after_cancel": len(done) > 1}
    w.close()
    stop_all(60_000)
    return {"method": method, "experts": n_experts, "shape": f"{d_in}->{d_hidden}->{d_out}",
            "params_per_expert": d_hidden * d_in + d_hidden + d_out * d_hidden + d_out,
            "idle_baseline": idle_stats, "during_load_and_analysis": load_stats,
            "during_merge": merge_stats, "cancel": cancel_stats, "load_average": os.getloadavg()}


def sweep_stalls(x_values: str = "0.2, 0.4, 0.6, 0.8, 1.0, 1.4", y_values: str = "0.5, 0.75, 1.0, 1.25, 1.5",
                 pairs_per_domain: int = 4) -> dict:
    """Event-loop stalls while a sweep runs in the Sweep view: the demo's four experts and
    base, Task Arithmetic, ``scaling`` x ``layer 0 coefficient``, every cell merged and scored
    on the test bench's demo pairs (the same heartbeat as the merge case)."""
    from PySide6.QtWidgets import QApplication

    app = QApplication.instance() or QApplication([])
    from pivotmerge_gui.demo import kit
    from pivotmerge_gui.gui.main_window import MainWindow
    from pivotmerge_gui.gui.workers import stop_all

    w = MainWindow()
    w.quiet_errors = True
    w.show()
    hb = Heartbeat()

    wait = functools.partial(wait_until, app)

    wait(lambda: w.core_ready, 120)
    w.add_paths([str(p) for p in kit.expert_paths("shared")])
    w.set_base(str(kit.base_path("shared")))
    wait(w.is_idle, 300)
    w.merge_panel.set_method_name("task_arithmetic")
    w.bench_panel.load_demo_samples("val", pairs_per_domain)
    wait(w.is_idle, 120)
    sp = w.workbench.sweep_panel
    sp.set_axis("x", "scaling", x_values)
    sp.set_axis("y", "layer_coefficients.0", y_values)
    hb.start()
    t0 = time.perf_counter()
    if w.workbench.start_sweep() is None:
        raise SystemExit(f"the sweep did not start: {sp.status.text()}")
    wait(lambda: not w.workbench.sweep_job.busy, 900)
    stats = hb.stop()
    stats["seconds"] = round(time.perf_counter() - t0, 2)
    res = w.workbench.last_sweep
    stats["cells"] = len(res.cells) if res is not None else 0
    stats["pairs"] = len(w.bench_panel.pairs)
    w.close()
    stop_all(60_000)
    return stats


def sweep_line(sw: dict) -> str:
    return (f"longest stall while a sweep of {sw['cells']} cells ran ({sw['seconds']} s, {sw['pairs']} pairs "
            f"scored per cell): {sw['max_stall_ms']} ms (target < 50 ms)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--method", default="pivotmerge")
    ap.add_argument("--shape", default="1024,4096,4096", help="d_in,d_hidden,d_out")
    ap.add_argument("--skip-first-window", action="store_true")
    ap.add_argument("--skip-sweep", action="store_true", help="skip the stalls-during-a-sweep case (demo world)")
    ap.add_argument("--only-sweep", action="store_true", help="run only the stalls-during-a-sweep case")
    args = ap.parse_args()
    out: dict = {"platform": os.environ["QT_QPA_PLATFORM"], "cpus": os.cpu_count()}
    if args.only_sweep:
        out["sweep"] = sweep_stalls()
        out["load_average"] = os.getloadavg()
        print(json.dumps(out, indent=2))
        print(f"\n{sweep_line(out['sweep'])}; load average {out['load_average'][0]:.1f} on {os.cpu_count()} CPUs")
        return 0
    if not args.skip_first_window:
        out["first_window"] = time_to_first_window(args.runs)
        print(json.dumps(out["first_window"]), flush=True)
    d_in, d_hidden, d_out = (int(x) for x in args.shape.split(","))
    out["merge"] = merge_stalls(args.experts, args.method, d_in, d_hidden, d_out)
    if not args.skip_sweep:
        out["sweep"] = sweep_stalls()
    print(json.dumps(out, indent=2))
    fw = out.get("first_window", {}).get("first_window_s_median")
    stall = out["merge"]["during_merge"]["max_stall_ms"]
    idle = out["merge"]["idle_baseline"]["max_stall_ms"]
    print(f"\ntime to first window: {fw if fw is None else f'{fw:.2f} s'} (target < 2 s); "
          f"longest stall during the merge: {stall} ms (target < 50 ms); idle event loop on this "
          f"machine right now: longest gap {idle} ms, load average {os.getloadavg()[0]:.1f} "
          f"on {os.cpu_count()} CPUs; cancel latency "
          f"{out['merge']['cancel'].get('latency_s')} s (target < 1 s)")
    if "sweep" in out:
        print(sweep_line(out["sweep"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
