"""``pivotmerge-gui``: start the desktop app.

``pivotmerge-gui [PATHS...] [--demo] [--screenshot PNG]``. The window is shown before torch
or the merge engine is imported (they load on a worker thread right after), so the app
starts fast. ``--screenshot`` waits until loading, analysis and validation have settled
(optionally after a merge with ``--merge``), saves a PNG of the main window and exits.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence
from pathlib import Path

T0 = time.perf_counter()

log = logging.getLogger("pivotmerge_gui.gui")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pivotmerge-gui", description="PivotMerge Studio desktop app")
    p.add_argument("paths", nargs="*", help="expert checkpoints (files, folders or Hub ids) to open")
    p.add_argument("--demo", action="store_true", help="open with the built-in demo experts")
    p.add_argument("--scenario", default="shared", help="demo scenario (with --demo): shared or different")
    p.add_argument("--base", help="base (shared init) checkpoint")
    p.add_argument("--recipe", help="open a recipe YAML")
    p.add_argument("--no-restore", action="store_true",
                   help="start empty instead of reopening the autosaved last session")
    p.add_argument("--screenshot", metavar="PNG", help="save a PNG of the window once idle, then exit")
    p.add_argument("--view", default="layers",
                   help="view shown (for --screenshot): layers, spectra, similarity, report, bench or autotune")
    p.add_argument("--merge", action="store_true", help="run the merge (before the screenshot, or before --save)")
    p.add_argument("--save", metavar="DIR", help="with --merge: save the merge into DIR as the Save dialog does, then exit")
    p.add_argument("--overwrite", action="store_true", help="with --save: replace an earlier output in DIR")
    p.add_argument("--bench", action="store_true", help="run the test bench before the screenshot")
    p.add_argument("--method", help="select this merge method at start")
    p.add_argument("--size", help="window size WxH (for --screenshot; default: the first window's size, "
                                   "which fits the screen)")
    p.add_argument("--timeout", type=float, default=180.0, help="--screenshot gives up after this many seconds")
    return p


def preload_before_qt() -> None:
    """Import pydantic (through the recipe module) before PySide6.

    Importing PySide6 replaces ``__import__`` with shiboken's hook, which reads the source
    of every module imported afterwards (``inspect.getsource`` -> ``hasattr(module,
    "__wrapped__")``). On pydantic, half-initialised in a worker thread, that attribute
    lookup runs pydantic's migration ``__getattr__``, which imports a module that is still
    initialising: the merge engine then failed to load with a circular-import error (seen
    on a first start in a fresh virtual environment). Loaded first, pydantic never passes
    through the hook. Cheap (no torch)."""
    import pivotmerge_gui.core.recipe  # noqa: F401  (imports pydantic and yaml)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from .qt_check import xcb_problem

    problem = xcb_problem()
    if problem is not None:  # Qt would abort with its own, less helpful message
        print(f"pivotmerge-gui: {problem}", file=sys.stderr)
        return 2
    preload_before_qt()

    from PySide6.QtWidgets import QApplication

    from .errors import ExceptionHookBridge, install_excepthooks
    from .main_window import MainWindow
    from .settings import setup_logging

    log_path, problems = start_logging(setup_logging)
    app = QApplication.instance() or QApplication(sys.argv[:1])
    app.setApplicationName("PivotMerge Studio")
    app.setOrganizationName("PivotMerge")
    app.setDesktopFileName("pivotmerge-studio")  # matches the installed .desktop entry
    _set_icon(app)
    settings, settings_problem = open_settings()
    problems += [settings_problem] if settings_problem else []
    problems += folder_problems()
    # screenshots use the default layout
    window = MainWindow(settings, restore_layout=not args.screenshot)
    if args.view not in window.views.views:
        print(f"pivotmerge-gui: unknown view '{args.view}'; views: {', '.join(window.views.views)}",
              file=sys.stderr)
        return 2
    window.autosave_enabled = not args.screenshot  # unattended screenshots leave the session alone
    if args.method:
        window.initial_method = args.method
    bridge = ExceptionHookBridge(window)
    bridge.exception_raised.connect(lambda short, details: window.show_message("Unexpected error", short, details))
    install_excepthooks(bridge)
    if args.save and not args.merge:
        print("pivotmerge-gui: --save needs --merge", file=sys.stderr)
        return 2
    if args.save:
        window.autosave_enabled = False
        window.quiet_errors = True
    if args.screenshot:
        from .layout import place_window

        if args.size:
            w, _, h = args.size.partition("x")
            place_window(window, (int(w), int(h)))
        window.quiet_errors = True  # a modal box would block the unattended run
    window.show()
    if problems:  # the app runs anyway; say what will not be kept, in the window and the log
        for text in problems:
            log.warning("%s", text)
            print(f"pivotmerge-gui: {text}", file=sys.stderr)
        window.statusBar().showMessage(" | ".join(problems), 0)
    log.info("window shown after %.3f s (torch imported: %s); log file %s",
             time.perf_counter() - T0, "torch" in sys.modules, log_path)

    def open_inputs() -> None:
        if args.demo:
            window.open_demo(args.scenario, with_base=args.base is None)
        if args.paths:
            window.add_paths(args.paths)
        if args.base:
            window.set_base(args.base)
        if args.recipe:
            window.open_recipe(args.recipe)
        if not (args.demo or args.paths or args.base or args.recipe or args.screenshot or args.save or args.no_restore):
            window.restore_session()

    from PySide6.QtCore import QTimer

    QTimer.singleShot(0, open_inputs)
    if args.save:
        from .unattended import arm_merge_and_save

        arm_merge_and_save(app, window, Path(args.save), args.timeout, args.overwrite)
    elif args.screenshot:
        _arm_screenshot(app, window, Path(args.screenshot), args.view, args.merge, args.timeout, args.bench,
                        expect_experts=bool(args.demo or args.paths or args.recipe))
    return app.exec()


def start_logging(setup) -> tuple[Path | None, list[str]]:  # type: ignore[no-untyped-def]
    """``setup()`` (the log file), or, when the log path cannot be used (a folder where the
    file should be, a file where the folder should be, no permission), the terminal."""
    try:
        return setup(), []
    except OSError as exc:
        from .settings import log_file

        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        logging.getLogger("pivotmerge_gui").addHandler(handler)
        logging.getLogger("pivotmerge_gui").setLevel(logging.INFO)
        return None, [f"cannot write the log file {log_file()} ({exc.strerror or exc}); logging to the terminal"]


def open_settings():  # type: ignore[no-untyped-def]
    """The persisted settings, or settings in a temporary folder (not kept) with the reason."""
    import tempfile

    from .settings import AppSettings, config_dir

    try:
        return AppSettings(), None
    except OSError as exc:
        temp = Path(tempfile.mkdtemp(prefix="pivotmerge-settings-"))
        return AppSettings(temp / "settings.ini"), (
            f"cannot use the settings folder {config_dir()} ({exc.strerror or exc}); "
            "settings and recent files will not be kept")


def folder_problems() -> list[str]:
    """The app's state (autosaved session) and data (calibration) folders: a file in the way
    or no write permission means autosave/saving there will fail; said once at start."""
    import os

    from .settings import data_dir, session_file

    out = []
    for what, folder in (("session autosave", session_file().parent), ("calibration files", data_dir())):
        existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
        if existing is not None and not existing.is_dir():
            out.append(f"{existing} is a file, not a folder: {what} cannot be saved")
        elif existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            out.append(f"no permission to write in {existing}: {what} cannot be saved")
    return out


def _set_icon(app) -> None:  # type: ignore[no-untyped-def]
    """The app icon from the bundled resources (a missing icon is not worth failing for)."""
    from PySide6.QtGui import QIcon

    from pivotmerge_gui.assets import ICON_SIZES, app_icon_path

    try:
        icon = QIcon()
        for size in ICON_SIZES:
            icon.addFile(str(app_icon_path(size)))
        app.setWindowIcon(icon)
    except (FileNotFoundError, ValueError) as exc:
        log.warning("app icon not found: %s", exc)


def _arm_screenshot(app, window, path: Path, view: str, merge: bool, timeout: float,  # type: ignore[no-untyped-def]
                    bench: bool = False, expect_experts: bool = True) -> None:
    """Poll until the window is idle (and merged / benched if asked), then grab it and quit."""
    from PySide6.QtCore import QTimer

    started = time.perf_counter()
    state = {"merged": not merge, "settle": 0, "merge_started": False, "benched": not bench}

    def tick() -> None:
        elapsed = time.perf_counter() - started
        # with inputs asked for, wait until they are listed; with none, an idle engine will do
        idle = window.is_idle() and window.core_ready and bool(window.experts.entries or not expect_experts)
        if idle and not state["merged"]:
            if not state["merge_started"] and window.merge_panel.merge_button.isEnabled():
                state["merge_started"] = True
                window.start_merge()
            elif state["merge_started"] and window.merge_result is not None:
                state["merged"] = True
            elif state["merge_started"] and window.merge_worker is None and window.merge_result is None:
                state["merged"] = True  # failed; capture the error state
            elif not window.merge_panel.merge_button.isEnabled() and window.is_idle() and elapsed > 20:
                state["merged"] = True  # cannot merge; capture the reason
        if idle and state["merged"] and not state["benched"]:
            state["benched"] = True
            window.bench_panel.load_demo_samples(window.bench_panel.split, window.bench_panel.n_spin.value())
            window.bench_panel.run()
            idle = False
        if idle and state["merged"]:
            state["settle"] += 1
        else:
            state["settle"] = 0
        if state["settle"] >= 3 or elapsed > timeout:
            window.views.show(view)
            app.processEvents()
            QTimer.singleShot(300, lambda: _grab(app, window, path, timed_out=elapsed > timeout))
            return
        QTimer.singleShot(200, tick)

    QTimer.singleShot(500, tick)


def _grab(app, window, path: Path, timed_out: bool) -> None:  # type: ignore[no-untyped-def]
    app.processEvents()
    path.parent.mkdir(parents=True, exist_ok=True)
    ok = window.grab().save(str(path))
    print(f"screenshot {'saved' if ok else 'FAILED'}: {path}" + (" (timed out before idle)" if timed_out else ""))
    app.exit(0 if ok and not timed_out else 1)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
