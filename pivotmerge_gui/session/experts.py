"""The expert list: plain entries (one per input checkpoint) in an evented list.

Rows are identified by a ``uid`` that survives reordering, so state attached to an expert
(calibration features, a pivot tick) follows it. Fine-grained events (inserting/inserted,
removing/removed, moving/moved, resetting/reset, row_changed) let a Qt item model mirror
the list without owning it; ``changed`` fires once after every edit."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .events import Event

_uids = itertools.count(1)


@dataclass
class ExpertEntry:
    """One input of the merge, as the user sees it."""

    spec: str  # path or Hub id, exactly as it goes into the recipe
    name: str
    weight: float = 1.0
    status: str = "loading"  # loading | ready | error
    message: str = ""  # short status / error reason (tooltip)
    details: str = ""  # long text for the details pane (traceback for bugs)
    family: str = ""
    shapes: str = ""
    dtype: str = ""
    size_bytes: int | None = None
    short_hash: str = ""
    projector: Any = None  # core Projector once loaded
    uid: int = field(default_factory=lambda: next(_uids))

    @property
    def ready(self) -> bool:
        return self.status == "ready" and self.projector is not None


def describe_projector(projector: Any) -> dict[str, Any]:
    """Row fields of a loaded projector (reads attributes only; no math)."""
    linear = [l for l in projector.layers if l.kind == "linear"]
    if linear:
        dims = [int(linear[0].weight.shape[1])] + [int(l.weight.shape[0]) for l in linear]
        shapes = " → ".join(str(d) for d in dims)
    else:
        shapes = ", ".join(f"{k}{list(s)}" for k, s in projector.signature())
    return {
        "family": projector.family,
        "shapes": shapes,
        "dtype": str(projector.dtype).removeprefix("torch."),
        "size_bytes": int(projector.nbytes),
        "short_hash": (projector.sha256 or "")[:10],
    }


class ExpertList:
    """Ordered experts with a pivot (by uid) and change events."""

    def __init__(self) -> None:
        self._entries: list[ExpertEntry] = []
        self.pivot_uid: int | None = None
        self.inserting, self.inserted = Event("inserting"), Event("inserted")
        self.removing, self.removed = Event("removing"), Event("removed")
        self.moving, self.moved = Event("moving"), Event("moved")
        self.resetting, self.reset = Event("resetting"), Event("reset")
        self.row_changed = Event("row_changed")  # (row, keys)
        self.pivot_changed = Event("pivot_changed")
        self.changed = Event("changed")

    # ------------------------------------------------------------------ queries
    @property
    def entries(self) -> list[ExpertEntry]:
        return list(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def entry(self, row: int) -> ExpertEntry:
        return self._entries[row]

    def row_of(self, uid: int | None) -> int:
        for i, e in enumerate(self._entries):
            if e.uid == uid:
                return i
        return -1

    def find(self, uid: int) -> ExpertEntry | None:
        r = self.row_of(uid)
        return self._entries[r] if r >= 0 else None

    def ready_entries(self) -> list[ExpertEntry]:
        return [e for e in self._entries if e.ready]

    def pivot_index(self) -> int | None:
        """Row of the pivot expert (= its index in the recipe); None = automatic."""
        r = self.row_of(self.pivot_uid) if self.pivot_uid is not None else -1
        return r if r >= 0 else None

    def specs(self) -> set[str]:
        return {e.spec for e in self._entries}

    # ------------------------------------------------------------------ edits
    def add(self, entry: ExpertEntry) -> int:
        row = len(self._entries)
        self.inserting.emit(row)
        self._entries.append(entry)
        self.inserted.emit(row)
        self.changed.emit()
        return row

    def insert(self, row: int, entry: ExpertEntry) -> int:
        """Put ``entry`` at ``row`` (clamped to the list); returns its row."""
        row = max(0, min(row, len(self._entries)))
        self.inserting.emit(row)
        self._entries.insert(row, entry)
        self.inserted.emit(row)
        self.changed.emit()
        return row

    def remove_rows(self, rows: Sequence[int]) -> list[ExpertEntry]:
        removed = []
        for r in sorted(set(rows), reverse=True):
            if 0 <= r < len(self._entries):
                self.removing.emit(r)
                removed.append(self._entries.pop(r))
                self.removed.emit(r)
        if any(e.uid == self.pivot_uid for e in removed):
            self.pivot_uid = None
        if removed:
            self.changed.emit()
        return removed

    def clear(self) -> None:
        self.resetting.emit()
        self._entries.clear()
        self.pivot_uid = None
        self.reset.emit()
        self.changed.emit()

    def move(self, row: int, delta: int) -> int:
        """Move one row up (-1) or down (+1); returns its new row."""
        new = row + delta
        if not (0 <= row < len(self._entries) and 0 <= new < len(self._entries)) or delta == 0:
            return row
        return self.move_rows_to([row], new + 1 if delta > 0 else new)[0]  # dest: "insert before"

    def move_rows_to(self, rows: Sequence[int], dest: int) -> list[int]:
        """Move ``rows`` (any set, kept in their order) to sit before row ``dest`` of the
        current list (``dest`` = row count: to the end). Returns their new rows.

        Done as single-row moves towards the front (``moving(r, p)`` with p < r), so a
        mirroring view keeps its selection and scroll position."""
        n = len(self._entries)
        moving = sorted({r for r in rows if 0 <= r < n})
        if not moving:
            return []
        dest = min(max(int(dest), 0), n)
        moving_set = set(moving)
        keep = [i for i in range(n) if i not in moving_set]
        order = [i for i in keep if i < dest] + moving + [i for i in keep if i >= dest]
        final = [self._entries[i].uid for i in order]
        changed = False
        for p, uid in enumerate(final):
            r = self.row_of(uid)
            if r == p:
                continue  # r > p otherwise: rows before p are already final
            self.moving.emit(r, p)
            self._entries.insert(p, self._entries.pop(r))
            self.moved.emit(r, p)
            changed = True
        if changed:
            self.changed.emit()
        first = order.index(moving[0])
        return list(range(first, first + len(moving)))

    def set_pivot(self, uid: int | None) -> None:
        self.pivot_uid = uid
        self.pivot_changed.emit()
        self.changed.emit()

    def update_entry(self, uid: int, **changes: Any) -> None:
        """Change fields of one entry; ``changed`` fires when the change matters to a merge
        (status, projector, name, weight)."""
        r = self.row_of(uid)
        if r < 0:
            return
        e = self._entries[r]
        for k, v in changes.items():
            setattr(e, k, v)
        self.row_changed.emit(r, tuple(changes))
        if changes.keys() & {"status", "projector", "name", "weight"}:
            self.changed.emit()

    def set_name(self, row: int, name: str) -> bool:
        name = str(name).strip()
        if not name or not 0 <= row < len(self._entries):
            return False
        self.update_entry(self._entries[row].uid, name=name)
        return True

    def set_weight(self, row: int, value: Any) -> bool:
        """A finite, non-negative weight; anything else is refused (returns False)."""
        try:
            w = float(value)
        except (TypeError, ValueError):
            return False
        if not math.isfinite(w) or w < 0 or not 0 <= row < len(self._entries):
            return False
        self.update_entry(self._entries[row].uid, weight=w)
        return True
