"""Entry point of the PyInstaller bundle: one executable for the app and the CLI.

The bundle ships a single frozen interpreter (torch alone is hundreds of MB, so two
executables with their own copies would double the download). ``build.sh`` adds a
``pivotmerge`` symlink next to ``pivotmerge-studio``; the name the program was started
under picks what runs, exactly like the ``pivotmerge`` / ``pivotmerge-gui`` console
scripts of the wheel.
"""

from __future__ import annotations

import multiprocessing
import sys
from pathlib import Path

CLI_NAMES = {"pivotmerge", "pivotmerge.exe"}


def main() -> int:
    """Run the CLI when started as ``pivotmerge``, the desktop app otherwise."""
    multiprocessing.freeze_support()  # no-op unless a worker process is being spawned
    if Path(sys.argv[0]).name in CLI_NAMES:
        from pivotmerge_gui.cli.main import entry as run
    else:
        from pivotmerge_gui.gui.app import main as run
    return run(sys.argv[1:])


if __name__ == "__main__":
    raise SystemExit(main())
