"""Errors presented once: a short actionable message, the traceback under "details".

Typed core errors (:class:`~pivotmerge_gui.core.errors.PivotMergeError`) are user mistakes:
their one-line message is enough. Anything else is a bug: the user gets the exception, the
traceback on demand and the path of the log file. ``install_excepthooks`` routes uncaught
exceptions of any thread (``sys.excepthook`` and ``threading.excepthook``) to the GUI thread
through a queued signal so worker errors reach the user instead of vanishing.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
import traceback
from types import TracebackType

from PySide6.QtCore import QObject, Signal
from PySide6.QtWidgets import QMessageBox, QWidget

from pivotmerge_gui.core.errors import PivotMergeError

from .settings import log_file

log = logging.getLogger("pivotmerge_gui.gui")


# The core's messages name the command line's flags and the recipe's keys (the CLI prints
# them as they are); in the app they name the control that does the same.
GUI_WORDS: tuple[tuple[str, str], ...] = (
    (r"\s*\(allow it explicitly if intended: --allow-nonfinite\)",
     " (if that is intended, tick 'Allow NaN/Inf in inputs' in the merge form)"),
    (r"allow overwriting \(CLI: --overwrite\)", "tick 'Replace an earlier output in this folder'"),
    (r"\s*\(CLI: --device cpu, or --cpu-fallback to do it automatically\)",
     ": choose Device 'cpu' in the merge form"),
    (r"export into a model with --into", "fill in 'Into model' in the Save dialog"),
    (r"--push-to-hub takes", "the Hub upload takes"),
    (r"\blayer_coefficients: ", "Per-layer coefficients: "),
    (r"method '([\w-]+)', parameter '(\w+)'", lambda m: f"{m.group(1)}: '{m.group(2).replace('_', ' ')}'"),
)


def gui_words(text: str) -> str:
    """A core message in the app's words (see :data:`GUI_WORDS`)."""
    for pattern, repl in GUI_WORDS:
        text = re.sub(pattern, repl, text)
    return text


def describe_exception(exc: BaseException, tb: str | None = None) -> tuple[str, str]:
    """(short message, details) for an exception, as shown to the user."""
    if tb is None:
        tb = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
    if isinstance(exc, PivotMergeError):
        return gui_words(str(exc)), tb
    short = (f"Unexpected error: {type(exc).__name__}: {exc}\n"
             f"This is a bug; the details are in the log file {log_file()}")
    return short, tb


class ErrorDialog(QMessageBox):
    """Modal message box with the traceback behind "Show Details...". GUI thread."""

    def __init__(self, title: str, message: str, details: str = "",
                 parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.setIcon(QMessageBox.Icon.Warning)
        self.setWindowTitle(title)
        self.setText(message)
        if details:
            self.setDetailedText(details)
        self.setStandardButtons(QMessageBox.StandardButton.Ok)


class ExceptionHookBridge(QObject):
    """Carries uncaught exceptions from any thread to the GUI thread.

    Created on the GUI thread; ``handle`` may be called from any thread and emits
    ``exception_raised`` which Qt queues to the GUI thread.
    """

    exception_raised = Signal(str, str)  # short message, details

    def handle(self, exc_type: type[BaseException], exc: BaseException,
               tb: TracebackType | None) -> None:
        text = "".join(traceback.format_exception(exc_type, exc, tb))
        log.error("uncaught exception:\n%s", text)
        short, details = describe_exception(exc, text)
        self.exception_raised.emit(short, details)


_bridge: ExceptionHookBridge | None = None


def install_excepthooks(bridge: ExceptionHookBridge) -> None:
    """Route uncaught exceptions of the GUI thread and of Python threads to ``bridge``."""
    global _bridge
    _bridge = bridge

    def _sys_hook(t: type[BaseException], e: BaseException, tb: TracebackType | None) -> None:
        if issubclass(t, KeyboardInterrupt):
            sys.__excepthook__(t, e, tb)
            return
        bridge.handle(t, e, tb)

    def _thread_hook(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is not None:
            bridge.handle(args.exc_type, args.exc_value, args.exc_traceback)

    sys.excepthook = _sys_hook
    threading.excepthook = _thread_hook
