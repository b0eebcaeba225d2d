"""Run one panel on its own (the panels' ``demo()`` entry points for docs screenshots)."""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication, QWidget


def run_panel(app: QApplication, panel: QWidget, finished: Any, screenshot: str | None) -> int:
    """Show ``panel``, start its ``run()`` once the event loop is up and, with ``screenshot``,
    save a PNG of it and quit when ``finished`` (a signal) fires. Returns the exit code."""
    panel.show()
    if screenshot:
        def shoot() -> None:
            panel.grab().save(screenshot)
            app.quit()

        finished.connect(lambda _: QTimer.singleShot(300, shoot))
    QTimer.singleShot(200, panel.run)  # type: ignore[attr-defined]
    return app.exec()
