"""What an autosaved session keeps beside its recipe: the test bench's pair sources (pair
files/folders, or the demo samples), in ``session-extras.json`` next to ``session.yml``."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("pivotmerge_gui.gui.session_extras")


def extras_file(session_path: Path) -> Path:
    return session_path.with_name(session_path.stem + "-extras.json")


def save_extras(session_path: Path, bench: Any) -> None:
    """Write the bench's pair sources atomically (never raises: an autosave must not)."""
    from pivotmerge_gui.core.io.atomic import atomic_write_text

    try:
        atomic_write_text(extras_file(session_path), json.dumps({"bench_pairs": bench.pair_sources}, indent=1),
                          overwrite=True)
    except OSError as exc:
        log.warning("session extras not saved: %s", exc)


def restore_extras(session_path: Path, bench: Any) -> list[str]:
    """Reload the bench's pairs; returns what could not be restored (one phrase each)."""
    from pivotmerge_gui.core.bounded import json_loads
    from pivotmerge_gui.core.errors import PivotMergeError

    path = extras_file(session_path)
    if not path.is_file():
        return []
    try:
        data = json_loads(path.read_text(encoding="utf-8"))
        sources = list(data.get("bench_pairs") or [])
    except (OSError, ValueError, AttributeError, TypeError) as exc:
        return [f"the test bench pairs ({path.name} unreadable: {exc})"]
    problems: list[str] = []
    for src in sources:
        if not isinstance(src, dict):
            continue
        if "demo" in src:
            try:
                bench.load_demo_samples(str(src["demo"]), int(src.get("n", 4)))
            except (PivotMergeError, ValueError, TypeError) as exc:
                problems.append(f"the demo test pairs ({exc})")
        elif "pairs" in src:
            if not Path(str(src["pairs"])).exists():
                problems.append(f"test pairs {src['pairs']} (no longer there)")
            elif not bench.add_pairs(str(src["pairs"])):
                problems.append(f"test pairs {src['pairs']} (unreadable now)")
    return problems
