"""Merge history: every merge of the session kept as a named result, without Qt.

An entry holds the :class:`~pivotmerge_gui.core.pipeline.MergeResult` (projector, report,
recipe), when it was made, where it came from (a merge, a sweep cell) and the bench scores
it got. Entries can be renamed, pinned and deleted; beyond :attr:`MergeHistory.cap`
unpinned entries are dropped oldest first, so a long session holds a bounded number of
merged projectors in memory. :func:`compare` lines two results up: report values side by
side (differences flagged) and a unified diff of their recipes (``difflib``).
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.io.discovery import display_name

from .events import Event
from .model import layer_lambdas

DEFAULT_CAP = 10
MAX_NAME = 80


class HistoryError(PivotMergeError):
    """A history edit that cannot be done (an empty or taken name, an unknown entry)."""


@dataclass
class HistoryEntry:
    uid: int
    name: str
    result: Any  # MergeResult
    created: float = field(default_factory=time.time)
    pinned: bool = False
    origin: str = "merge"  # "merge" or "sweep"
    inputs: tuple[Any, ...] = ()  # the session inputs it was made from
    scores: dict[str, float] = field(default_factory=dict)  # bench: domain (and "mean") -> score
    score_metric: str = ""

    @property
    def report(self) -> dict[str, Any]:
        return self.result.report

    @property
    def recipe_yaml(self) -> str:
        return self.result.recipe.to_yaml()

    @property
    def method(self) -> str:
        return str(self.report.get("method_pretty") or self.report.get("method") or "?")

    def key_parameters(self) -> str:
        return key_parameters(self.report)

    def time_text(self) -> str:
        return time.strftime("%H:%M:%S", time.localtime(self.created))

    def summary(self) -> str:
        """One line: method, key parameters, time (and the bench's mean score if run)."""
        parts = [self.method]
        kp = self.key_parameters()
        if kp:
            parts.append(kp)
        parts.append(self.time_text())
        if "mean" in self.scores:
            parts.append(f"bench {self.scores['mean']:.3f}")
        return " · ".join(parts)


def key_parameters(report: Mapping[str, Any], limit: int = 3) -> str:
    """The parameters that distinguish a merge: those that differ from the method's
    defaults (all of them for a method with few), and per-layer coefficients."""
    params = dict(report.get("parameters") or {})
    defaults: dict[str, Any] = {}
    try:
        from pivotmerge_gui.core.methods.base import get_method

        defaults = get_method(str(report.get("method"))).defaults()
    except (PivotMergeError, ImportError):
        pass
    shown = {k: v for k, v in params.items() if k not in defaults or defaults[k] != v}
    if not shown and params:
        shown = dict(list(params.items())[:1])  # at least the main parameter
    text = [f"{k} {_short(v)}" for k, v in list(shown.items())[:limit]]
    if len(shown) > limit:
        text.append(f"+{len(shown) - limit}")
    applied = report.get("layer_coefficients_applied") or {}
    if applied:
        text.append("layers " + ", ".join(f"{k}:{_short(v)}" for k, v in applied.items()))
    return ", ".join(text)


def _short(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


class MergeHistory:
    """The session's merge results, newest last (see the module docstring)."""

    def __init__(self, cap: int = DEFAULT_CAP) -> None:
        if cap < 1:
            raise ValueError("the history keeps at least one result")
        self.cap = cap
        self.entries: list[HistoryEntry] = []
        self.current: int | None = None  # uid of the result shown as the session's merge
        self._next = 1
        self.changed = Event("history_changed")
        self.dropped = Event("history_dropped")  # (entries dropped by the cap)

    # ------------------------------------------------------------------ lookup
    def __len__(self) -> int:
        return len(self.entries)

    def find(self, uid: int | None) -> HistoryEntry | None:
        return next((e for e in self.entries if e.uid == uid), None)

    def get(self, uid: int) -> HistoryEntry:
        e = self.find(uid)
        if e is None:
            raise HistoryError(f"no result #{uid} in the history (deleted?)")
        return e

    def for_result(self, result: Any) -> HistoryEntry | None:
        return next((e for e in self.entries if e.result is result), None)

    def names(self) -> list[str]:
        return [e.name for e in self.entries]

    def current_entry(self) -> HistoryEntry | None:
        return self.find(self.current)

    # ------------------------------------------------------------------ edits
    def add(self, result: Any, name: str | None = None, *, origin: str = "merge",
            inputs: tuple[Any, ...] = (), select: bool = True) -> HistoryEntry:
        """Keep ``result`` (the same result twice is kept once); drops unpinned entries
        beyond the cap, oldest first, never the new one."""
        known = self.for_result(result)
        if known is not None:
            if select:
                self.current = known.uid
                self.changed.emit()
            return known
        uid = self._next
        self._next += 1
        label = name or f"#{uid} {result.report.get('method_pretty') or result.report.get('method', 'merge')}"
        entry = HistoryEntry(uid, self._unique(label[:MAX_NAME]), result, origin=origin, inputs=tuple(inputs))
        self.entries.append(entry)
        if select:
            self.current = uid
        self._enforce_cap(keep=entry)
        self.changed.emit()
        return entry

    def _enforce_cap(self, keep: HistoryEntry) -> None:
        dropped = []
        while len(self.entries) > self.cap:
            victim = next((e for e in self.entries if not e.pinned and e is not keep), None)
            if victim is None:
                break  # everything else is pinned: pins win over the cap
            self.entries.remove(victim)
            dropped.append(victim)
            if self.current == victim.uid:
                self.current = keep.uid
        if dropped:
            self.dropped.emit(dropped)

    def _unique(self, name: str, skip: int | None = None) -> str:
        taken = {e.name for e in self.entries if e.uid != skip}
        out, k = name, 2
        while out in taken:
            out, k = f"{name} ({k})", k + 1
        return out

    def rename(self, uid: int, name: str) -> HistoryEntry:
        entry = self.get(uid)
        name = " ".join(str(name).split())
        if not name:
            raise HistoryError("a result needs a name")
        if len(name) > MAX_NAME:
            raise HistoryError(f"a name of {len(name)} characters is longer than the {MAX_NAME} allowed")
        if any(e.name == name and e.uid != uid for e in self.entries):
            raise HistoryError(f"another result is already called '{name}'")
        entry.name = name
        self.changed.emit()
        return entry

    def set_pinned(self, uid: int, pinned: bool = True) -> HistoryEntry:
        entry = self.get(uid)
        entry.pinned = bool(pinned)
        if not pinned:
            self._enforce_cap(keep=self.current_entry() or entry)
        self.changed.emit()
        return entry

    def delete(self, uid: int) -> HistoryEntry:
        entry = self.get(uid)
        self.entries.remove(entry)
        if self.current == uid:
            self.current = None
        self.changed.emit()
        return entry

    def select(self, uid: int | None) -> HistoryEntry | None:
        entry = self.get(uid) if uid is not None else None
        self.current = uid
        self.changed.emit()
        return entry

    def set_scores(self, uid: int, scores: Mapping[str, float], metric: str) -> None:
        entry = self.find(uid)
        if entry is not None:
            entry.scores, entry.score_metric = dict(scores), metric
            self.changed.emit()

    def clear(self) -> None:
        self.entries.clear()
        self.current = None
        self.changed.emit()


# --------------------------------------------------------------------------- A/B
@dataclass
class Comparison:
    a: HistoryEntry
    b: HistoryEntry
    rows: list[tuple[str, str, str]]  # (label, value of A, value of B)
    recipe_diff: str  # unified diff, A -> B ("" when the recipes are the same)

    def differing(self) -> list[str]:
        return [label for label, va, vb in self.rows if va != vb]


def report_values(entry: HistoryEntry) -> dict[str, str]:
    """Labelled values of a result's report (and its bench scores) for the A/B table."""
    r = entry.report
    out: dict[str, str] = {"Method": entry.method}
    for k, v in (r.get("parameters") or {}).items():
        out[f"Parameter: {k}"] = _short(v)
    for k, v in layer_lambdas(r).items():
        out[f"Layer {k} coefficient"] = f"{v:.4g}"
    out["Experts"] = ", ".join(str(n) for n in r.get("experts") or [])
    out["Weights"] = ", ".join(_short(w) for w in r.get("weights") or [])
    out["Base"] = display_name(str(r["base"])) if r.get("base") else "none"
    cal = r.get("calibration")
    out["Calibration"] = "yes" if cal else "none"
    out["Compute / output dtype"] = f"{r.get('compute_dtype', '?')} / {r.get('out_dtype', '?')}"
    out["Seed"] = str(r.get("seed", ""))
    out["Warnings"] = str(len(r.get("warnings") or []))
    out["Merge time"] = f"{float(r.get('elapsed_s') or 0.0):.2f} s"
    for dom, v in entry.scores.items():
        out[f"Bench {entry.score_metric or 'score'}: {dom}"] = f"{v:.3f}"
    return out


def compare(a: HistoryEntry, b: HistoryEntry) -> Comparison:
    va, vb = report_values(a), report_values(b)
    labels = list(va) + [k for k in vb if k not in va]
    rows = [(k, va.get(k, "—"), vb.get(k, "—")) for k in labels]
    diff = "".join(difflib.unified_diff(a.recipe_yaml.splitlines(keepends=True),
                                        b.recipe_yaml.splitlines(keepends=True),
                                        fromfile=f"A: {a.name}", tofile=f"B: {b.name}"))
    return Comparison(a, b, rows, diff)
