"""Where the app keeps its settings, recent files and log file (platformdirs paths).

QSettings is pointed at an INI file inside ``platformdirs.user_config_path`` so that the
location is the same on every platform and tests can isolate it through ``XDG_*``.
"""

from __future__ import annotations

import logging
import logging.handlers
from pathlib import Path

import platformdirs
from PySide6.QtCore import QByteArray, QSettings

APP_NAME = "PivotMergeStudio"
MAX_RECENT = 10


def config_dir() -> Path:
    return platformdirs.user_config_path(APP_NAME, appauthor=False)


def session_file() -> Path:
    """The autosaved session (the current setup as a recipe), restored after a crash or kill."""
    return platformdirs.user_state_path(APP_NAME, appauthor=False) / "session.yml"


def data_dir() -> Path:
    """Files the app makes for the user (calibration files computed in the app)."""
    return platformdirs.user_data_path(APP_NAME, appauthor=False)


def log_dir() -> Path:
    return platformdirs.user_log_path(APP_NAME, appauthor=False)


def log_file() -> Path:
    return log_dir() / "pivotmerge-gui.log"


def setup_logging(level: int = logging.INFO) -> Path:
    """Send the ``pivotmerge_gui`` loggers to a rotating file in the user log dir."""
    path = log_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("pivotmerge_gui")
    for h in list(logger.handlers):
        if getattr(h, "_pivotmerge_file", False):
            logger.removeHandler(h)
            h.close()
    handler = logging.handlers.RotatingFileHandler(path, maxBytes=2_000_000, backupCount=3,
                                                   encoding="utf-8")
    handler._pivotmerge_file = True  # type: ignore[attr-defined]
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(threadName)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(level)
    return path


class AppSettings:
    """Typed access to the persisted settings. Lives on (and is used from) the GUI thread."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path or (config_dir() / "settings.ini")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.qsettings = QSettings(str(self.path), QSettings.Format.IniFormat)

    # ---------------------------------------------------------------- recent files
    def recent_files(self) -> list[str]:
        value = self.qsettings.value("recent/files", [])
        if isinstance(value, str):  # QSettings returns a bare string for one-element lists
            value = [value]
        return [str(v) for v in (value or [])]

    def add_recent(self, spec: str) -> None:
        items = [spec] + [r for r in self.recent_files() if r != spec]
        self.qsettings.setValue("recent/files", items[:MAX_RECENT])
        self.qsettings.sync()

    def clear_recent(self) -> None:
        self.qsettings.remove("recent/files")
        self.qsettings.sync()

    # ---------------------------------------------------------------- generic values
    def value(self, key: str, default: object = None) -> object:
        return self.qsettings.value(key, default)

    def set_value(self, key: str, value: object) -> None:
        self.qsettings.setValue(key, value)

    def last_dir(self) -> str:
        return str(self.qsettings.value("paths/last_dir", str(Path.home())))

    def set_last_dir(self, path: str | Path) -> None:
        p = Path(path)
        self.qsettings.setValue("paths/last_dir", str(p if p.is_dir() else p.parent))

    # ---------------------------------------------------------------- window state
    def geometry(self) -> QByteArray | None:
        v = self.qsettings.value("window/geometry")
        return v if isinstance(v, QByteArray) else None

    def window_state(self) -> QByteArray | None:
        v = self.qsettings.value("window/state")
        return v if isinstance(v, QByteArray) else None

    def save_window(self, geometry: QByteArray, state: QByteArray) -> None:
        self.qsettings.setValue("window/geometry", geometry)
        self.qsettings.setValue("window/state", state)
        self.qsettings.sync()

    def sync(self) -> None:
        self.qsettings.sync()
