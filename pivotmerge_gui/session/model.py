"""The session model: everything the app knows about the merge being set up, without Qt.

It owns the experts (by uid), the base, the pivot, weights, the method and its parameters,
run settings, calibration (a file, or features in memory that belong to experts by uid),
the latest merge result, readiness messages, recipe in/out and the autosaved session.
The window forwards the user's edits here and renders what the model says; background
jobs (load, plan, merge) are started by the window and report their outcome here.
torch is imported only by the methods that need the engine (never at start-up).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.io.discovery import display_name, expand_paths

from .calibration import CalibrationFileRef, MemoryCalibration, SessionCalibration
from .events import Event
from .experts import ExpertEntry, ExpertList, describe_projector

log = logging.getLogger("pivotmerge_gui.session")

DEFAULT_SETTINGS: dict[str, Any] = {"dtype": "float32", "out_dtype": "auto", "device": "auto",
                                    "random_seed": 0}


@dataclass(frozen=True)
class Readiness:
    """What the Merge button should say. ``check``: the setup is complete enough for the
    engine's full check (``pipeline.plan``); ``pending``: wait; ``blocked``: the user must act."""

    state: Literal["blocked", "pending", "check"]
    message: str


class SessionModel:
    """State of one PivotMerge Studio session (see the module docstring)."""

    def __init__(self) -> None:
        self.experts = ExpertList()
        self.base: ExpertEntry | None = None
        self.core_ready = False
        self.methods: list[Any] = []  # method classes of the core registry, once loaded
        self.merging = False  # a merge job is running (mirrored by whoever runs merges)
        # the merge setup
        self.method_name: str | None = None
        self.params: dict[str, Any] = {}
        self.layer_coefficients: dict[str, float] = {}
        self.settings: dict[str, Any] = dict(DEFAULT_SETTINGS)
        self.allow_nonfinite = False
        self.calibration = SessionCalibration()
        # results
        self.merge_result: Any = None
        self.result_inputs: tuple[Any, ...] = ()
        self.plan: Any = None
        self.plan_key: str | None = None
        self.analysis: Any = None
        self.pending_recipe: tuple[Any, Path | None] | None = None
        self.not_applied: list[str] = []  # set by apply_recipe
        self.removed_stack: list[tuple[list[tuple[int, ExpertEntry]], int | None]] = []  # undo of removals

        self.load_requested = Event("load_requested")  # (uid, spec, target: expert | base)
        self.base_changed = Event("base_changed")
        self.inputs_changed = Event("inputs_changed")  # experts or base changed
        self.setup_replaced = Event("setup_replaced")  # a recipe replaced method/params/settings
        self.calibration_changed = Event("calibration_changed")
        self.result_changed = Event("result_changed")
        self.message = Event("message")  # (text) for the status bar
        self.experts.changed.connect(self._inputs_changed)

    # ------------------------------------------------------------------ engine
    def set_engine(self, methods: list[Any]) -> None:
        """The core's method registry is loaded; a recipe that waited applies now."""
        self.methods, self.core_ready = list(methods), True
        if self.pending_recipe is not None:
            recipe, base_dir = self.pending_recipe
            self.pending_recipe = None
            self.apply_recipe(recipe, base_dir)

    def method(self) -> Any:
        return next((m for m in self.methods if m.name == self.method_name), None)

    # ------------------------------------------------------------------ experts and base
    def add_paths(self, paths: list[str] | tuple[str, ...]) -> list[ExpertEntry]:
        """Add experts from files, folders or Hub ids (each is then loaded by whoever
        listens to ``load_requested``); already listed ones are skipped with a message."""
        added = []
        known = self.experts.specs()
        for spec in expand_paths(paths) if paths else []:
            p = Path(spec)
            if p.exists():
                spec = str(p.resolve())
            if spec in known:
                self.message.emit(f"{spec} is already in the list")
                continue
            known.add(spec)
            added.append(self.add_spec(spec))
        return added

    def add_spec(self, spec: str, name: str | None = None, weight: float = 1.0) -> ExpertEntry:
        entry = ExpertEntry(spec=spec, name=name or display_name(spec), weight=weight)
        self.experts.add(entry)
        self.load_requested.emit(entry.uid, spec, "expert")
        return entry

    def add_loaded(self, spec: str, projector: Any) -> ExpertEntry:
        """Add an expert that is already loaded (Add from Hub)."""
        entry = ExpertEntry(spec=spec, name=display_name(spec), status="ready", projector=projector,
                            **describe_projector(projector))
        self.experts.add(entry)
        return entry

    def remove_rows(self, rows: list[int]) -> list[ExpertEntry]:
        """Remove experts by row; :meth:`undo_remove` brings the last removal back."""
        pivot = self.experts.pivot_uid
        kept = [(r, self.experts.entry(r)) for r in sorted(set(rows)) if 0 <= r < len(self.experts)]
        removed = self.experts.remove_rows([r for r, _ in kept])
        if removed:
            self.removed_stack.append((kept, pivot))
            del self.removed_stack[:-20]  # a bounded undo history
        return removed

    def undo_remove(self) -> list[ExpertEntry]:
        """Put the last removed experts back where they were (an expert that was still
        loading is requested again); returns them ([] when there is nothing to undo)."""
        if not self.removed_stack:
            return []
        kept, pivot = self.removed_stack.pop()
        for row, entry in kept:  # ascending rows: each lands where it was
            self.experts.insert(row, entry)
            if entry.status == "loading":
                self.load_requested.emit(entry.uid, entry.spec, "expert")
        if pivot is not None and self.experts.pivot_uid is None and self.experts.find(pivot) is not None:
            self.experts.set_pivot(pivot)
        return [e for _, e in kept]

    def set_base(self, spec: str | None) -> ExpertEntry | None:
        if spec is None:
            self.base = None
        else:
            p = Path(spec)
            spec = str(p.resolve()) if p.exists() else spec
            self.base = ExpertEntry(spec=spec, name=display_name(spec))
            self.load_requested.emit(self.base.uid, spec, "base")
        self.base_changed.emit()
        self._inputs_changed()
        return self.base

    def target_entry(self, uid: int, target: str) -> ExpertEntry | None:
        if target == "base":
            return self.base if self.base is not None and self.base.uid == uid else None
        return self.experts.find(uid)

    def load_progress(self, uid: int, target: str, message: str) -> None:
        entry = self.target_entry(uid, target)
        if entry is None:
            return
        if target == "base":
            entry.message = message
        else:
            self.experts.update_entry(uid, message=message)

    def load_finished(self, uid: int, target: str, projector: Any, desc: dict[str, Any]) -> None:
        warn = projector.metadata.get("warnings", "") if hasattr(projector, "metadata") else ""
        self._update_loaded(uid, target, status="ready", projector=projector, message=warn,
                            details="", **desc)

    def load_failed(self, uid: int, target: str, short: str, details: str) -> None:
        self._update_loaded(uid, target, status="error", projector=None, message=short, details=details)

    def _update_loaded(self, uid: int, target: str, **changes: Any) -> None:
        entry = self.target_entry(uid, target)
        if entry is None:
            return  # removed or replaced while it loaded
        if target == "base":
            for k, v in changes.items():
                setattr(entry, k, v)
            self.base_changed.emit()
            self._inputs_changed()
        else:
            self.experts.update_entry(uid, **changes)

    def current_inputs(self) -> tuple[Any, ...]:
        base = self.base.spec if self.base is not None else None
        return (tuple(e.spec for e in self.experts.ready_entries()), base)

    def base_projector(self) -> Any:
        return self.base.projector if self.base is not None and self.base.ready else None

    def status_text(self) -> str:
        entries = self.experts.entries
        n = len(entries)
        bad = sum(e.status == "error" for e in entries)
        loading = sum(e.status == "loading" for e in entries)
        return f"{n} expert(s): {n - bad - loading} ready, {loading} loading, {bad} flagged"

    def _inputs_changed(self) -> None:
        # the merged result belongs to the inputs it was made from
        if self.merge_result is not None and self.result_inputs != self.current_inputs():
            self.set_result(None)
        self.calibration.experts_changed(self.experts.entries)
        self.inputs_changed.emit()

    # ------------------------------------------------------------------ the merge setup
    def update_setup(self, method_name: str | None, params: dict[str, Any],
                     layer_coefficients: dict[str, float], settings: dict[str, Any],
                     allow_nonfinite: bool) -> None:
        """The form's current values (method, parameters, per-layer overrides, run settings)."""
        self.method_name = method_name
        self.params = dict(params)
        self.layer_coefficients = dict(layer_coefficients)
        self.settings = {**DEFAULT_SETTINGS, **{k: v for k, v in settings.items() if k in DEFAULT_SETTINGS}}
        self.allow_nonfinite = bool(allow_nonfinite)

    def pivot_label(self) -> str | None:
        """What the form shows for a method's ``pivot`` parameter (None: it has none)."""
        method = self.method()
        if method is None or "pivot" not in {p.name for p in method.params}:
            return None
        pivot = self.experts.pivot_index()
        if pivot is None:
            return "automatic (or tick one in the list)"
        return f"{self.experts.entry(pivot).name} (ticked)"

    def readiness(self) -> Readiness:
        """Checks that need no engine, in the order a user fixes them."""
        entries = self.experts.entries
        if self.merging:
            return Readiness("pending", "Merging…")
        if not entries:
            return Readiness("blocked", "Add at least two experts: drop projector files or folders on the list.")
        loading = [e for e in entries if e.status == "loading"]
        if loading:
            return Readiness("pending", f"Waiting for {len(loading)} expert(s) to load…")
        bad = [e for e in entries if e.status == "error"]
        if bad:
            return Readiness("blocked", f"Remove or replace the flagged expert '{bad[0].name}': {bad[0].message}")
        if len(entries) < 2:
            return Readiness("blocked", "Add at least one more expert: a merge needs two or more.")
        if self.base is not None and self.base.status == "loading":
            return Readiness("pending", "Waiting for the base checkpoint to load…")
        if self.base is not None and self.base.status == "error":
            return Readiness("blocked", f"The base checkpoint cannot be used: {self.base.message}")
        if not self.core_ready:
            return Readiness("pending", "Loading the merge engine…")
        return Readiness("check", "Checking the setup…")

    # ------------------------------------------------------------------ recipe in / out
    def recipe(self, calibration: dict[str, Any] | None | bool = True) -> Any:
        """The recipe the session describes right now (raises RecipeError on a bad setup).
        ``calibration``: True = the session's file reference, else this reference."""
        from pivotmerge_gui.core.recipe import Recipe

        method = self.method()
        if method is None:
            raise PivotMergeError("the merge engine is still loading" if not self.core_ready
                                  else f"unknown merge method '{self.method_name}'")
        params = dict(self.params)
        pivot = self.experts.pivot_index()
        if pivot is not None and "pivot" in {p.name for p in method.params}:
            params["pivot"] = pivot_param_value(method, pivot)
        data = {
            "merge_method": method.name,
            "base_model": self.base.spec if self.base is not None else None,
            "models": [{"model": e.spec, "name": e.name, "parameters": {"weight": e.weight}}
                       for e in self.experts.entries],
            "parameters": params,
            "layer_coefficients": self.layer_coefficients or None,
            "calibration": (self.calibration.recipe_ref(self.experts.entries) if calibration is True
                            else calibration),
            **self.settings,
        }
        return Recipe.from_dict(data, "current setup")

    def apply_recipe(self, recipe: Any, base_dir: Path | None = None) -> bool:
        """Replace the setup with a recipe's (experts are requested for loading). Before the
        engine is ready the recipe waits. Returns False when the recipe's method is unknown."""
        if not self.core_ready:
            self.pending_recipe = (recipe, base_dir)
            return True
        from pivotmerge_gui.core.pipeline import resolve_spec

        self.experts.clear()
        self.set_result(None)
        for m in recipe.models:
            self.add_spec(resolve_spec(m.model, base_dir), name=m.name, weight=m.parameters.weight)
        self.set_base(resolve_spec(recipe.base_model, base_dir) if recipe.base_model else None)
        known = any(m.name == recipe.merge_method for m in self.methods)
        params = dict(recipe.parameters)
        pivot = params.get("pivot")
        if isinstance(pivot, int) and not isinstance(pivot, bool) and 0 <= pivot < len(self.experts):
            self.experts.set_pivot(self.experts.entry(pivot).uid)
        self.method_name = recipe.merge_method if known else self.method_name
        self.params = params
        self.layer_coefficients = dict(recipe.layer_coefficients or {})
        self.settings = {"dtype": recipe.dtype, "out_dtype": recipe.out_dtype, "device": recipe.device,
                         "random_seed": recipe.random_seed}
        self.not_applied = []  # what of this recipe could not be applied, one phrase each
        if recipe.calibration is not None:
            ref = recipe.calibration
            try:
                self.set_calibration_file(resolve_spec(ref.file, base_dir), ref.domains, ref.sha256)
            except PivotMergeError as exc:
                self.clear_calibration()
                self.not_applied.append(f"the calibration: {exc}")
        else:
            self.clear_calibration()
        self.setup_replaced.emit()
        for what in self.not_applied:
            self.message.emit(f"Not restored from the recipe: {what}")
        if not known:
            self.message.emit(f"The recipe's method '{recipe.merge_method}' is not available.")
        return known

    # ------------------------------------------------------------------ calibration
    @property
    def calibration_path(self) -> str | None:
        return self.calibration.file.path if self.calibration.file is not None else None

    @property
    def memory_calibration(self) -> MemoryCalibration | None:
        return self.calibration.memory

    def set_calibration_file(self, path: str | None, mapping: dict[str, str | None] | None = None,
                             sha256: str | None = None, label: str = "") -> CalibrationFileRef | None:
        """Use a calibration file (goes into the recipe with its hash and each expert's
        domain); replaces in-memory features. Raises PivotMergeError for a bad file."""
        if path is None:
            self.clear_calibration()
            return None
        ref = self.calibration.use_file(path, self.experts.entries, mapping, sha256, label)
        self.calibration_changed.emit()
        return ref

    def set_calibration_path(self, path: str | None, mapping: dict[str, str | None] | None = None,
                             label: str = "") -> None:
        """:meth:`set_calibration_file` for a file the user just picked or made (None
        clears): a bad file is reported as a message, not raised."""
        try:
            self.set_calibration_file(path, mapping, label=label)
        except PivotMergeError as exc:
            self.message.emit(f"Calibration file not used: {exc}")

    def set_calibration_domain(self, uid: int, domain: str | None) -> None:
        self.calibration.set_domain(uid, domain)
        self.calibration_changed.emit()

    def set_memory_calibration(self, calibration: Any, label: str, uids: list[int] | None) -> None:
        """Hold calibration features in memory. ``uids``: the experts whose domains the
        feature sets belong to, in that order, so they follow their experts when the list is
        reordered or shrunk; None = by position."""
        self.calibration.use_memory(calibration, label, tuple(uids) if uids is not None else None)
        self.calibration_changed.emit()

    def clear_calibration(self) -> None:
        had = self.calibration.file is not None or self.calibration.memory is not None
        self.calibration.clear()
        if had:
            self.calibration_changed.emit()

    def calibration_label(self) -> tuple[str, str]:
        """(short label, tooltip) of the calibration in use."""
        return self.calibration.label(self.experts.entries)

    def uncovered_experts(self) -> list[str]:
        """Experts without calibration data while calibration is in use."""
        return self.calibration.uncovered(self.experts.entries)

    def calibration_for(self, entries: list[ExpertEntry] | None = None) -> Any:
        """In-memory features for ``entries`` (default: the whole list) in their order, or
        None (none held, or a file is set). Raises PivotMergeError when no expert has any."""
        return self.calibration.for_plan(self.experts.entries if entries is None else entries)

    def calibration_for_plan(self) -> tuple[Any, str | None]:
        """(in-memory calibration to plan with, or None; why it cannot be used, or None)."""
        try:
            return self.calibration_for(), None
        except PivotMergeError as exc:
            return None, str(exc)

    # ------------------------------------------------------------------ plan and result
    def setup_key(self, recipe: Any) -> str:
        """Identity of a setup: the recipe text plus the in-memory calibration in use (the
        same object for the same expert order) or why it cannot be used."""
        cal, problem = self.calibration_for_plan()
        tag = (f"calibration object {id(cal)}" if cal is not None
               else f"calibration unusable: {problem}" if problem is not None else "no calibration")
        return recipe.to_yaml() + f"\n# {tag}\n# allow non-finite {self.allow_nonfinite}"

    def plan_inputs(self) -> tuple[dict[str, Any], Any, str | None]:
        """(loaded projectors by spec, in-memory calibration, blocking problem or None)."""
        loaded = {e.spec: e.projector for e in self.experts.entries if e.ready}
        if self.base is not None and self.base.ready:
            loaded[self.base.spec] = self.base.projector
        calibration, problem = self.calibration_for_plan()
        method = self.method()
        if problem is not None and not (method is not None and (method.needs_calibration or method.uses_calibration)):
            problem = None  # this method does not use calibration features: plan without them
        return loaded, calibration, problem

    def set_plan(self, plan: Any, key: str | None) -> None:
        self.plan, self.plan_key = plan, key

    def set_result(self, result: Any, inputs: tuple[Any, ...] | None = None) -> None:
        self.merge_result = result
        self.result_inputs = inputs if inputs is not None else (self.current_inputs() if result is not None else ())
        self.result_changed.emit()

    def used_coefficients(self) -> dict[str, float]:
        return layer_lambdas(self.merge_result.report) if self.merge_result is not None else {}

    # ------------------------------------------------------------------ autosave
    def autosave(self, path: Path) -> bool:
        """Write the setup as a recipe to ``path`` atomically (an empty list removes it).
        Never raises for a bad setup or an unwritable file: returns False and logs."""
        if not self.core_ready:
            return False
        if not self.experts.entries:
            path.unlink(missing_ok=True)
            return True
        try:
            from pivotmerge_gui.core.io.atomic import atomic_write_text

            cal = self.calibration.persist(path.with_name(path.stem + "-calibration.safetensors"),
                                           self.experts.entries)
            atomic_write_text(path, self.recipe(cal).to_yaml(), overwrite=True)
            return True
        except (PivotMergeError, OSError) as exc:
            log.warning("session autosave skipped: %s", exc)
            return False

    def restore(self, path: Path) -> Any:
        """Reopen an autosaved session (experts are requested for loading); an unreadable
        file is set aside as ``*.bad.yml``. Returns the recipe or None."""
        from pivotmerge_gui.core.recipe import Recipe

        if not path.is_file():
            return None
        try:
            recipe = Recipe.load(path)
        except PivotMergeError as exc:
            log.warning("autosaved session unreadable, set aside: %s", exc)
            path.replace(path.with_suffix(".bad.yml"))
            return None
        self.apply_recipe(recipe)
        return recipe


def pivot_param_value(method: Any, index: int) -> Any:
    """The value of a method's ``pivot`` parameter for the expert at ``index``."""
    p = next(p for p in method.params if p.name == "pivot")
    return str(index) if p.type is str else int(index)


def layer_lambdas(report: dict[str, Any]) -> dict[str, float]:
    """Per-layer coefficients a merge used: the method's own (PivotMerge's ALM reports
    ``lambdas``/``layers[].coefficient``), else those the pipeline applied."""
    out: dict[str, float] = {}
    mrep = report.get("method_report") or {}
    if isinstance(mrep, dict):
        layers = mrep.get("layers")
        rows = layers if isinstance(layers, list) else (
            [{"layer": k, **v} for k, v in layers.items() if isinstance(v, dict)] if isinstance(layers, dict) else [])
        for row in rows:
            if isinstance(row, dict) and "layer" in row:
                for key in ("coefficient", "lambda"):
                    if isinstance(row.get(key), (int, float)):
                        out[str(row["layer"])] = float(row[key])
                        break
        lam = mrep.get("lambdas")
        if isinstance(lam, dict):
            out.update({str(k): float(v) for k, v in lam.items() if isinstance(v, (int, float))})
    applied = report.get("layer_coefficients_applied") or {}
    out.update({str(k): float(v) for k, v in applied.items()})
    return out
