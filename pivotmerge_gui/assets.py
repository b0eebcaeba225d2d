"""Locate bundled resources (icons, the .desktop entry) wherever the app runs.

The files live in the top-level ``resources/`` folder of the source tree and are
installed as the data package ``pivotmerge_gui.resources``. Three layouts must work:

* an installed wheel: ``importlib.resources`` finds ``site-packages/pivotmerge_gui/resources``;
* an editable install: setuptools' editable finder maps the package to ``<repo>/resources``
  (and a plain source checkout on ``sys.path`` falls back to that folder directly);
* a PyInstaller bundle: the spec copies the folder to ``<_MEIPASS>/pivotmerge_gui/resources``.

Everything returns real :class:`pathlib.Path` objects because Qt (``QIcon``, ``QPixmap``)
wants file names, not ``Traversable`` objects. No Qt import here: the CLI may use it too.
"""

from __future__ import annotations

import sys
from functools import lru_cache
from importlib import resources
from pathlib import Path, PurePosixPath

__all__ = ["ICON_NAME", "ICON_SIZES", "app_icon_path", "resource_path", "resources_dir"]

#: Base name of the app icon files and of the ``Icon=`` key in the .desktop entry.
ICON_NAME = "pivotmerge-studio"

#: Edge lengths of the PNG renderings shipped next to the SVG master.
ICON_SIZES: tuple[int, ...] = (16, 24, 32, 48, 64, 128, 256)

_PACKAGE = "pivotmerge_gui.resources"


def _candidates() -> list[Path]:
    """Folders that may hold the resources, most specific layout first."""
    found: list[Path] = []
    bundle = getattr(sys, "_MEIPASS", None)
    if bundle:
        found.append(Path(bundle) / "pivotmerge_gui" / "resources")
    try:
        traversable = resources.files(_PACKAGE)
    except (ModuleNotFoundError, TypeError):
        traversable = None
    if isinstance(traversable, Path):
        # A regular package on disk (wheel or editable install) gives a real Path; a
        # zip import would give another Traversable that Qt could not open anyway.
        found.append(traversable)
    # Source checkout without an install: <repo>/pivotmerge_gui/assets.py -> <repo>/resources.
    found.append(Path(__file__).resolve().parent.parent / "resources")
    return found


@lru_cache(maxsize=1)
def resources_dir() -> Path:
    """The folder holding the bundled resources.

    Raises:
        FileNotFoundError: no layout has the folder (a broken install); the message lists
            every place that was searched.
    """
    candidates = _candidates()
    for path in candidates:
        if path.is_dir() and (path / f"{ICON_NAME}.desktop").is_file():
            return path
    searched = ", ".join(str(p) for p in candidates)
    raise FileNotFoundError(
        f"PivotMerge Studio resources not found (searched: {searched}); "
        "reinstall the package or run from a complete source checkout"
    )


def resource_path(name: str) -> Path:
    """Path of the bundled resource ``name`` (a ``/``-separated path inside resources/).

    Raises:
        ValueError: ``name`` is absolute or climbs out of the resources folder.
        FileNotFoundError: the resource does not exist; the message names the full path.
    """
    rel = PurePosixPath(name)
    if not name or rel.is_absolute() or ".." in rel.parts:
        raise ValueError(f"resource name must be a relative path inside resources/, got {name!r}")
    path = resources_dir().joinpath(*rel.parts)
    if not path.exists():
        raise FileNotFoundError(f"bundled resource {name!r} is missing: {path}")
    return path


def app_icon_path(size: int | None = None) -> Path:
    """Path of the application icon.

    Args:
        size: wanted edge length in pixels, or ``None`` for the scalable SVG master.
            A size picks the smallest shipped PNG at least that large (so Qt only ever
            scales down, which stays sharp), or the largest PNG for sizes beyond it.

    Raises:
        ValueError: ``size`` is not a positive integer.
        FileNotFoundError: the icon file is missing from the install.
    """
    if size is None:
        return resource_path(f"icons/{ICON_NAME}.svg")
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
        raise ValueError(f"icon size must be a positive number of pixels, got {size!r}")
    chosen = next((s for s in ICON_SIZES if s >= size), ICON_SIZES[-1])
    return resource_path(f"icons/{ICON_NAME}-{chosen}.png")
