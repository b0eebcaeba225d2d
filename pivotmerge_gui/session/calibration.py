"""The session's calibration: a file (mapped to experts by uid) or features in memory.

A file is the normal case: it goes into the recipe as ``calibration: {file, sha256,
domains}`` with each expert's domain by name, so a saved recipe reproduces the merge. Its
mapping is kept by expert uid, so it follows renames and re-ordering; an expert added later
takes the domain of its name, else none (its domain is then protected, not fitted).
Features in memory (computed from the test bench) belong to experts by uid the same way;
an autosave writes them to a file first (:meth:`SessionCalibration.persist`), so they
survive a restart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pivotmerge_gui.core.errors import PivotMergeError

from .experts import ExpertEntry


@dataclass
class CalibrationFileRef:
    """A calibration file the session uses: its hash, domains and expert uid -> domain."""

    path: str
    sha256: str
    file_domains: list[str]
    positional: bool = False
    provenance: dict[str, Any] = field(default_factory=dict)
    domains: dict[int, str | None] = field(default_factory=dict)
    label: str = ""

    def mapping(self, entries: list[ExpertEntry]) -> dict[str, str | None]:
        return {e.name: self.domains.get(e.uid) for e in entries}


@dataclass
class MemoryCalibration:
    """Calibration features held in memory (the test bench's). ``uids``: the experts whose
    domains ``calibration.features`` belong to, in that order (None = by list position)."""

    calibration: Any
    label: str
    uids: tuple[int, ...] | None = None
    _view: tuple[tuple[int, ...], Any] | None = field(default=None, repr=False)

    def for_order(self, entries: list[ExpertEntry]) -> Any:
        """The feature sets for ``entries`` in their order, None for an expert without one
        (the same object for the same order, so validation results stay cached). Raises
        PivotMergeError when no listed expert has features."""
        cal = self.calibration
        if self.uids is None:
            return cal
        order = tuple(e.uid for e in entries)
        if order == self.uids:
            return cal
        if self._view is not None and self._view[0] == order:
            return self._view[1]
        pos = {u: i for i, u in enumerate(self.uids)}
        if not any(e.uid in pos for e in entries):
            raise PivotMergeError(
                "the calibration features in memory belong to none of the listed experts: "
                "compute them again (Compute… in the Calibration box) or choose a calibration file")
        mapped = cal.select([pos.get(u) for u in order])
        self._view = (order, mapped)
        return mapped


class SessionCalibration:
    """File or memory calibration of one session (see the module docstring)."""

    def __init__(self) -> None:
        self.file: CalibrationFileRef | None = None
        self.memory: MemoryCalibration | None = None
        self._persisted: tuple[int, str] | None = None  # (id of the memory features, file)

    # ------------------------------------------------------------------ set
    def use_file(self, path: str, entries: list[ExpertEntry], mapping: dict[str, str | None] | None = None,
                 sha256: str | None = None, label: str = "") -> CalibrationFileRef:
        """Read and validate ``path`` (raises PivotMergeError naming the problem) and map its
        domains to ``entries``: ``mapping`` by expert name, else automatically."""
        from pivotmerge_gui.core.calibration import store

        f = store.read(path, expect_sha256=sha256)
        names = [e.name for e in entries]
        if mapping is None:
            by_name = store.auto_map(names, f.domains, f.positional)
        else:
            store.resolve_domains(f, names, {n: mapping.get(n) for n in names})  # validates
            by_name = {n: mapping.get(n) for n in names}
        ref = CalibrationFileRef(str(Path(path)), f.sha256, f.domains, f.positional, f.provenance,
                                 {e.uid: by_name.get(e.name) for e in entries}, label)
        self.file, self.memory = ref, None
        return ref

    def use_memory(self, calibration: Any, label: str, uids: tuple[int, ...] | None) -> None:
        self.file, self.memory = None, MemoryCalibration(calibration, label, uids)

    def clear(self) -> None:
        self.file = self.memory = None

    def set_domain(self, uid: int, domain: str | None) -> None:
        if self.file is not None:
            if domain is not None and domain not in self.file.file_domains:
                raise PivotMergeError(f"the calibration file has no domain '{domain}'")
            self.file.domains[uid] = domain

    def experts_changed(self, entries: list[ExpertEntry]) -> None:
        """New experts take the file domain of their name (else none)."""
        if self.file is None:
            return
        from pivotmerge_gui.core.calibration import store

        new = [e for e in entries if e.uid not in self.file.domains]
        taken = {d for d in self.file.domains.values() if d is not None}
        free = [d for d in self.file.file_domains if d not in taken]
        guess = store.auto_map([e.name for e in new], free)
        for e in new:
            self.file.domains[e.uid] = guess.get(e.name)

    # ------------------------------------------------------------------ read
    def recipe_ref(self, entries: list[ExpertEntry]) -> dict[str, Any] | None:
        if self.file is None:
            return None
        return {"file": self.file.path, "sha256": self.file.sha256, "domains": self.file.mapping(entries)}

    def for_plan(self, entries: list[ExpertEntry]) -> Any:
        """In-memory features for ``entries`` in their order, or None (a file is used
        through the recipe, or there is none)."""
        return self.memory.for_order(entries) if self.memory is not None else None

    def uncovered(self, entries: list[ExpertEntry]) -> list[str]:
        """Experts with no calibration data (their domains are protected, not fitted)."""
        if self.file is not None:
            return [e.name for e in entries if self.file.domains.get(e.uid) is None]
        if self.memory is not None and self.memory.uids is not None:
            return [e.name for e in entries if e.uid not in self.memory.uids]
        return []

    def label(self, entries: list[ExpertEntry]) -> tuple[str, str]:
        """(short label, tooltip)."""
        if self.file is not None:
            f = self.file
            pairs = ", ".join(f"{e.name} ← {f.domains.get(e.uid) or 'none'}" for e in entries)
            enc = (f.provenance.get("encoder") or {}).get("spec")
            tip = f"{f.path}\nsha256 {f.sha256}\n{pairs}" + (f"\nencoder: {enc}" if enc else "")
            return (f.label or Path(f.path).name), tip
        if self.memory is not None:
            return self.memory.label, "Used for this session's merges; saved beside the output when you save"
        return "none", ""

    # ------------------------------------------------------------------ persist
    def persist(self, path: Path, entries: list[ExpertEntry]) -> dict[str, Any] | None:
        """The recipe reference to use in an autosave: the file, or the in-memory features
        written to ``path`` (once per set of features) and referenced from there."""
        if self.memory is None:
            return self.recipe_ref(entries)
        if self.memory.uids is None:
            return None
        from pivotmerge_gui.core.calibration import store

        cal = self.memory.calibration
        doms = [d or f"domain {k}" for k, d in enumerate(cal.domains)] if len(cal.domains) == len(cal.features) \
            else [f"domain {k}" for k in range(len(cal.features))]
        if self._persisted is None or self._persisted[0] != id(cal):
            tensors = {d: f for d, f in zip(doms, cal.features) if f is not None}
            sha = store.write(path, tensors, store.default_provenance(
                features={"description": self.memory.label}), overwrite=True)
            self._persisted = (id(cal), sha)
        names = {e.uid: e.name for e in entries}
        mapping: dict[str, str | None] = {names[u]: doms[i] for i, u in enumerate(self.memory.uids) if u in names}
        mapping.update({e.name: None for e in entries if e.name not in mapping})
        return {"file": str(path), "sha256": self._persisted[1], "domains": mapping}
