"""Item models: thin Qt adapters over plain Python data (napari ``_BaseEventedItemModel`` style).

The data (the session's :class:`ExpertList`, analysis rows) are plain Python objects that
tests and the rest of the app use without Qt; the models only translate them to roles and
mirror their change events. No tensor math
happens here: every number shown was computed by the core on a worker thread.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from PySide6.QtCore import (
    QAbstractTableModel,
    QMimeData,
    QModelIndex,
    QPersistentModelIndex,
    Qt,
    Signal,
)
from PySide6.QtGui import QBrush, QColor

from pivotmerge_gui.session.experts import ExpertEntry, ExpertList

#: MIME type of rows dragged inside the expert list (their uids, comma-separated)
EXPERT_ROWS_MIME = "application/x-pivotmerge-expert-rows"

Index = QModelIndex | QPersistentModelIndex


def human_size(n: int | None) -> str:
    if n is None:
        return ""
    units = ["B", "KiB", "MiB", "GiB", "TiB"]
    x = float(n)
    for u in units:
        if x < 1024 or u == units[-1]:
            return f"{x:.0f} {u}" if u == "B" else f"{x:.1f} {u}"
        x /= 1024
    return str(n)


def paths_from_mime(mime: QMimeData) -> list[str]:
    """Local file paths carried by a drag (``text/uri-list``)."""
    if not mime.hasUrls():
        return []
    return [u.toLocalFile() for u in mime.urls() if u.isLocalFile() and u.toLocalFile()]


class ExpertListModel(QAbstractTableModel):
    """Table adapter over ``list[ExpertEntry]``. Lives on and is used from the GUI thread.

    Columns: pivot (check), name (editable), weight (editable), family, shapes, dtype,
    size, hash, status. Accepts ``text/uri-list`` drops and re-emits them as
    ``paths_dropped``; any change to the list emits ``experts_changed``.
    """

    COLUMNS = ("Pivot", "Name", "Weight", "Family", "Shapes", "Dtype", "Size", "Hash", "Status")
    PIVOT, NAME, WEIGHT, FAMILY, SHAPES, DTYPE, SIZE, HASH, STATUS = range(9)

    paths_dropped = Signal(list)
    experts_changed = Signal()

    def __init__(self, experts: ExpertList | None = None, parent: Any = None) -> None:
        super().__init__(parent)
        self.list = experts if experts is not None else ExpertList()
        root = QModelIndex()
        L = self.list
        L.inserting.connect(lambda r: self.beginInsertRows(root, r, r))
        L.inserted.connect(lambda r: self.endInsertRows())
        L.removing.connect(lambda r: self.beginRemoveRows(root, r, r))
        L.removed.connect(lambda r: self.endRemoveRows())
        L.moving.connect(lambda r, p: self.beginMoveRows(root, r, r, root, p))
        L.moved.connect(lambda r, p: self.endMoveRows())
        L.resetting.connect(self.beginResetModel)
        L.reset.connect(self.endResetModel)
        L.row_changed.connect(lambda r, keys: self.dataChanged.emit(self.index(r, 0),
                                                                    self.index(r, len(self.COLUMNS) - 1)))
        L.pivot_changed.connect(self._pivot_changed)
        L.changed.connect(self.experts_changed.emit)

    def _pivot_changed(self) -> None:
        if len(self.list):
            self.dataChanged.emit(self.index(0, self.PIVOT), self.index(len(self.list) - 1, self.PIVOT))

    # ------------------------------------------------------------------ the list (session model)
    # Thin pass-throughs so views and tests can use the model where they hold one.
    @property
    def entries(self) -> list[ExpertEntry]:
        return self.list.entries

    @property
    def _entries(self) -> list[ExpertEntry]:
        return self.list._entries

    @property
    def pivot_uid(self) -> int | None:
        return self.list.pivot_uid

    def entry(self, row: int) -> ExpertEntry:
        return self.list.entry(row)

    def row_of(self, uid: int | None) -> int:
        return self.list.row_of(uid)

    def find(self, uid: int) -> ExpertEntry | None:
        return self.list.find(uid)

    def ready_entries(self) -> list[ExpertEntry]:
        return self.list.ready_entries()

    def pivot_index(self) -> int | None:
        return self.list.pivot_index()

    def add(self, entry: ExpertEntry) -> int:
        return self.list.add(entry)

    def remove_rows(self, rows: Sequence[int]) -> list[ExpertEntry]:
        return self.list.remove_rows(rows)

    def clear(self) -> None:
        self.list.clear()

    def move(self, row: int, delta: int) -> int:
        return self.list.move(row, delta)

    def move_rows_to(self, rows: Sequence[int], dest: int) -> list[int]:
        return self.list.move_rows_to(rows, dest)

    def set_pivot(self, uid: int | None) -> None:
        self.list.set_pivot(uid)

    def update_entry(self, uid: int, **changes: Any) -> None:
        self.list.update_entry(uid, **changes)

    # ------------------------------------------------------------------ Qt model API
    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._entries)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self.COLUMNS)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if role == Qt.ItemDataRole.DisplayRole:
            if orientation == Qt.Orientation.Horizontal and 0 <= section < len(self.COLUMNS):
                return self.COLUMNS[section]
            if orientation == Qt.Orientation.Vertical:
                return str(section + 1)
        if role == Qt.ItemDataRole.ToolTipRole and orientation == Qt.Orientation.Horizontal:
            tips = {self.PIVOT: "The pivot expert: the frame of reference PivotMerge aligns to "
                                "(unchecked everywhere = chosen automatically)",
                    self.WEIGHT: "Per-expert weight used by the merge"}
            return tips.get(section)
        return None

    def flags(self, index: Index) -> Qt.ItemFlag:
        base = Qt.ItemFlag.ItemIsDropEnabled
        if not index.isValid():
            return base
        f = base | Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable | Qt.ItemFlag.ItemIsDragEnabled
        col = index.column()
        if col in (self.NAME, self.WEIGHT):
            f |= Qt.ItemFlag.ItemIsEditable
        if col == self.PIVOT:
            f |= Qt.ItemFlag.ItemIsUserCheckable
        return f

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not (0 <= index.row() < len(self._entries)):
            return None
        e = self._entries[index.row()]
        col = index.column()
        if role in (Qt.ItemDataRole.DisplayRole, Qt.ItemDataRole.EditRole):
            if col == self.NAME:
                return e.name
            if col == self.WEIGHT:
                return e.weight if role == Qt.ItemDataRole.EditRole else f"{e.weight:g}"
            if col == self.FAMILY:
                return e.family
            if col == self.SHAPES:
                return e.shapes
            if col == self.DTYPE:
                return e.dtype
            if col == self.SIZE:
                return human_size(e.size_bytes)
            if col == self.HASH:
                return e.short_hash
            if col == self.STATUS:
                return {"loading": "loading…", "ready": "ready", "error": "⚠ error"}.get(e.status, e.status)
            return None
        if role == Qt.ItemDataRole.CheckStateRole and col == self.PIVOT:
            return Qt.CheckState.Checked if e.uid == self.pivot_uid else Qt.CheckState.Unchecked
        if role == Qt.ItemDataRole.ToolTipRole:
            if e.status == "error":
                return e.message
            if col == self.NAME:
                return e.spec
            return e.message or None
        if role == Qt.ItemDataRole.ForegroundRole and e.status == "error":
            return QBrush(QColor(178, 34, 34))
        if role == Qt.ItemDataRole.TextAlignmentRole and col in (self.WEIGHT, self.SIZE):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        return None

    def setData(self, index: Index, value: Any, role: int = Qt.ItemDataRole.EditRole) -> bool:
        if not index.isValid() or not (0 <= index.row() < len(self._entries)):
            return False
        e = self._entries[index.row()]
        col = index.column()
        if col == self.PIVOT and role == Qt.ItemDataRole.CheckStateRole:
            checked = Qt.CheckState(value) == Qt.CheckState.Checked if not isinstance(value, bool) else value
            self.set_pivot(e.uid if checked else None)
            return True
        if role != Qt.ItemDataRole.EditRole:
            return False
        if col == self.NAME:
            return self.list.set_name(index.row(), value)
        if col == self.WEIGHT:
            return self.list.set_weight(index.row(), value)
        return False

    # ------------------------------------------------------------------ drag and drop
    # Files and folders dropped from outside become ``paths_dropped``; rows dragged inside
    # the list carry their uids (EXPERT_ROWS_MIME) and are moved, never copied or removed.
    def supportedDropActions(self) -> Qt.DropAction:
        return Qt.DropAction.CopyAction | Qt.DropAction.MoveAction

    def supportedDragActions(self) -> Qt.DropAction:
        return Qt.DropAction.MoveAction

    def mimeTypes(self) -> list[str]:
        return ["text/uri-list", EXPERT_ROWS_MIME]

    def mimeData(self, indexes: Sequence[Index]) -> QMimeData:
        rows = sorted({i.row() for i in indexes if i.isValid() and 0 <= i.row() < len(self._entries)})
        mime = QMimeData()
        mime.setData(EXPERT_ROWS_MIME, ",".join(str(self._entries[r].uid) for r in rows).encode("ascii"))
        return mime

    def dragged_rows(self, data: QMimeData) -> list[int]:
        """Rows of this list named by an internal drag (uids no longer here are skipped)."""
        if not data.hasFormat(EXPERT_ROWS_MIME):
            return []
        raw = bytes(data.data(EXPERT_ROWS_MIME).data()).decode("ascii", "replace")
        rows = []
        for part in raw.split(","):
            if part.strip().isdigit():
                r = self.row_of(int(part))
                if r >= 0:
                    rows.append(r)
        return rows

    def canDropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int,
                        parent: Index) -> bool:
        return bool(paths_from_mime(data)) or bool(self.dragged_rows(data))

    def dropMimeData(self, data: QMimeData, action: Qt.DropAction, row: int, column: int,
                     parent: Index) -> bool:
        moved = self.dragged_rows(data)
        if moved:
            dest = row if row >= 0 else (parent.row() if parent.isValid() else len(self._entries))
            self.move_rows_to(moved, dest)
            return True
        paths = paths_from_mime(data)
        if not paths:
            return False
        self.paths_dropped.emit(paths)
        return True


# ----------------------------------------------------------------------------- layer table
class LayerTableModel(QAbstractTableModel):
    """Read-only table adapter over ``list[dict]`` rows (``Analysis.layer_table()``).

    Lives on the GUI thread. Numeric cells also expose ``BAR_ROLE``: the value scaled to
    [0, 1] within its column, which the colour-bar delegate draws so uneven layers stand out.
    """

    BAR_ROLE = int(Qt.ItemDataRole.UserRole) + 1

    def __init__(self, parent: Any = None) -> None:
        super().__init__(parent)
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = []
        self._ranges: dict[str, tuple[float, float]] = {}
        self.tooltips: dict[str, str] = {}

    def set_rows(self, rows: Sequence[dict[str, Any]], tooltips: dict[str, str] | None = None) -> None:
        self.beginResetModel()
        self._rows = [dict(r) for r in rows]
        cols: list[str] = []
        for r in self._rows:
            cols += [k for k in r if k not in cols]
        self._columns = cols
        self.tooltips = dict(tooltips or {})
        self._ranges = {}
        for c in cols:
            vals = [float(r[c]) for r in self._rows if _is_number(r.get(c))]
            vals = [v for v in vals if math.isfinite(v)]
            if vals and len(vals) == sum(1 for r in self._rows if c in r):
                self._ranges[c] = (min(vals), max(vals))
        self.endResetModel()

    @property
    def columns(self) -> list[str]:
        return list(self._columns)

    @property
    def rows(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self._rows]

    def rowCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._rows)

    def columnCount(self, parent: Index = QModelIndex()) -> int:  # noqa: B008
        return 0 if parent.isValid() else len(self._columns)

    def headerData(self, section: int, orientation: Qt.Orientation,
                   role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if orientation == Qt.Orientation.Horizontal and 0 <= section < len(self._columns):
            name = self._columns[section]
            if role == Qt.ItemDataRole.DisplayRole:
                return name.replace("_", " ")
            if role == Qt.ItemDataRole.ToolTipRole:
                return self.tooltips.get(name)
        if orientation == Qt.Orientation.Vertical and role == Qt.ItemDataRole.DisplayRole:
            return str(section + 1)
        return None

    def flags(self, index: Index) -> Qt.ItemFlag:
        if not index.isValid():
            return Qt.ItemFlag.NoItemFlags
        return Qt.ItemFlag.ItemIsEnabled | Qt.ItemFlag.ItemIsSelectable

    def data(self, index: Index, role: int = Qt.ItemDataRole.DisplayRole) -> Any:
        if not index.isValid() or not (0 <= index.row() < len(self._rows)) \
                or not (0 <= index.column() < len(self._columns)):
            return None
        col = self._columns[index.column()]
        value = self._rows[index.row()].get(col)
        if role == Qt.ItemDataRole.DisplayRole:
            return format_value(value)
        if role == Qt.ItemDataRole.ToolTipRole:
            return f"{col}: {value}"
        if role == Qt.ItemDataRole.TextAlignmentRole and _is_number(value):
            return int(Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter)
        if role == self.BAR_ROLE and col in self._ranges and _is_number(value):
            lo, hi = self._ranges[col]
            v = float(value)
            if not math.isfinite(v):
                return None
            lo = min(lo, 0.0)
            return 0.0 if hi <= lo else (v - lo) / (hi - lo)
        return None


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def format_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        a = abs(value)
        if a == 0:
            return "0"
        if a >= 1e4 or a < 1e-3:
            return f"{value:.3e}"
        return f"{value:.4g}"
    if isinstance(value, (tuple, list)):
        return "×".join(str(v) for v in value) if all(isinstance(v, int) for v in value) else ", ".join(format_value(v) for v in value)
    return str(value)

