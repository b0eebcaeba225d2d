"""Before Qt starts: find the X11 system libraries Qt's xcb platform plugin needs.

Without one of them (``libxcb-cursor0`` is the usual one on a bare X server or a minimal
Debian/Ubuntu image) Qt aborts with "Could not load the Qt platform plugin xcb" and a core
dump. This check loads each library the plugin links to (as the dynamic loader would) and,
when some are missing, names the Debian/Ubuntu packages to install. No Qt import, no cost
when another platform (offscreen, wayland, a non-Linux system) is used.
"""

from __future__ import annotations

import ctypes
import os
import sys
from collections.abc import Callable, Mapping

# the xcb plugin's own dependencies (ldd of PySide6's libqxcb.so / libQt6XcbQpa.so.6), by
# soname -> Debian/Ubuntu package
XCB_LIBRARIES: dict[str, str] = {
    "libxcb.so.1": "libxcb1",
    "libX11-xcb.so.1": "libx11-xcb1",
    "libxcb-cursor.so.0": "libxcb-cursor0",
    "libxcb-icccm.so.4": "libxcb-icccm4",
    "libxcb-image.so.0": "libxcb-image0",
    "libxcb-keysyms.so.1": "libxcb-keysyms1",
    "libxcb-randr.so.0": "libxcb-randr0",
    "libxcb-render.so.0": "libxcb-render0",
    "libxcb-render-util.so.0": "libxcb-render-util0",
    "libxcb-shape.so.0": "libxcb-shape0",
    "libxcb-shm.so.0": "libxcb-shm0",
    "libxcb-sync.so.1": "libxcb-sync1",
    "libxcb-util.so.1": "libxcb-util1",
    "libxcb-xfixes.so.0": "libxcb-xfixes0",
    "libxcb-xkb.so.1": "libxcb-xkb1",
    "libxkbcommon.so.0": "libxkbcommon0",
    "libxkbcommon-x11.so.0": "libxkbcommon-x11-0",
    "libfontconfig.so.1": "libfontconfig1",
    "libGL.so.1": "libgl1",
    "libEGL.so.1": "libegl1",
    "libdbus-1.so.3": "libdbus-1-3",
}


def uses_xcb(env: Mapping[str, str] | None = None, platform: str | None = None) -> bool:
    """Whether Qt will pick its xcb (X11) plugin: Linux, ``QT_QPA_PLATFORM`` unset or xcb,
    an X display, and no Wayland session that Qt would prefer."""
    env = os.environ if env is None else env
    if not (platform or sys.platform).startswith("linux"):
        return False
    qpa = env.get("QT_QPA_PLATFORM", "").split(";")[0].split(":")[0].strip()
    if qpa and qpa != "xcb":
        return False
    if not env.get("DISPLAY"):
        return False
    return qpa == "xcb" or not env.get("WAYLAND_DISPLAY")


def _loadable(soname: str) -> bool:
    try:
        ctypes.CDLL(soname)
    except OSError:
        return False
    return True


def missing_xcb_libraries(loadable: Callable[[str], bool] | None = None) -> dict[str, str]:
    """The xcb plugin's libraries that cannot be loaded: soname -> package."""
    can_load = loadable or _loadable
    return {so: pkg for so, pkg in XCB_LIBRARIES.items() if not can_load(so)}


def xcb_problem(env: Mapping[str, str] | None = None, platform: str | None = None,
                loadable: Callable[[str], bool] | None = None) -> str | None:
    """The message to print instead of Qt's abort, or None when Qt can start."""
    if not uses_xcb(env, platform):
        return None
    missing = missing_xcb_libraries(loadable)
    if not missing:
        return None
    packages = " ".join(dict.fromkeys(missing.values()))
    what = (f"the system libraries {', '.join(missing)} that Qt needs are missing" if len(missing) > 1
            else f"the system library {next(iter(missing))} that Qt needs is missing")
    return (f"cannot open the X display: {what}. "
            f"On Debian/Ubuntu install them with: sudo apt-get install {packages} "
            "(without a display, QT_QPA_PLATFORM=offscreen runs the app for screenshots)")
