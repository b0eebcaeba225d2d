"""Parameter sweeps: one or two merge settings varied over a grid, each cell merged and scored.

This is the X/Y plot of SuperMerger (the AUTOMATIC1111 extension by hako-mikan, which sweeps
merge ratios against each other and renders a picture per cell), with the picture replaced
by a number: every cell's merge is scored on caption pairs by the same evaluation as the
test bench (:func:`~pivotmerge_gui.core.evaluation.evaluate`), so the grid is a heat map
whose best cell is a recipe ready to save.

An axis varies one of: a parameter of the recipe's method (validated against its
:class:`~pivotmerge_gui.core.methods.base.Param` type and range before any work), the
method itself (``method``: parameters the other method does not know are dropped), or a
per-layer coefficient (``layer_coefficients.NAME``). The sweep document (YAML)::

    recipe: recipe.yml            # a path (relative to this file) or an inline recipe
    x: {param: scale, values: [0.5, 1.0, 1.5]}
    y: {param: method, values: [task_arithmetic, ties]}      # optional
    score: {backend: demo, pairs: "demo:val:4", metric: token_accuracy}

The core receives the back end and the caption sets (``score`` is resolved by the front
end: the demo model lives above the core). Grids are bounded (:data:`MAX_CELLS`); cells
run in order, each with the cancel token checked between steps; a cell whose merge is
refused (a typed error, e.g. a method that needs a base) records the reason and the sweep
goes on.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .bounded import read_text_document, yaml_document
from .errors import Cancelled, PivotMergeError, RecipeError
from .progress import CancelToken, ProgressEvent
from .recipe import Recipe

MAX_CELLS = 400
MAX_VALUES = 100  # per axis
MAX_LAYER_COEFFICIENT = 100.0  # as pipeline.plan checks
KEEP_BYTES = 512 * 2**20  # keep every cell's merged projector while they fit, else the best only
LAYER_PREFIX = "layer_coefficients."
# metric name in the document -> (evaluation part, EvalResult metric, higher is better)
SCORE_METRICS: dict[str, tuple[str, str, bool]] = {
    "token_accuracy": ("generate", "token_accuracy", True),
    "nll": ("nll", "nll", False),
    "retrieval": ("retrieval", "retrieval_accuracy", True),
}

MAX_SWEEP_CHARS = 1_000_000  # a sweep document, like a recipe



class SweepError(RecipeError):
    """A sweep document is malformed, too large, or varies something that cannot vary."""


@dataclass(frozen=True)
class Axis:
    param: str  # a method parameter, "method", or "layer_coefficients.NAME"
    values: tuple[Any, ...]

    @property
    def label(self) -> str:
        return self.param


@dataclass(frozen=True)
class ScoreSpec:
    backend: str = "demo"  # demo | llava:PATH_OR_ID
    pairs: str = "demo:val:4"  # a folder / .jsonl of pairs, or demo:SPLIT:N
    metric: str = "token_accuracy"

    @property
    def higher_is_better(self) -> bool:
        return SCORE_METRICS[self.metric][2]


@dataclass
class SweepSpec:
    recipe: Recipe
    x: Axis
    y: Axis | None = None
    score: ScoreSpec = field(default_factory=ScoreSpec)
    base_dir: Path | None = None  # where the recipe's relative paths start
    source: str | None = None

    @property
    def shape(self) -> tuple[int, int]:
        """(rows = y values, columns = x values)."""
        return (len(self.y.values) if self.y else 1, len(self.x.values))

    def cells(self) -> list[tuple[int, int, dict[str, Any]]]:
        """(row, column, overrides) of every cell, row by row."""
        out = []
        for iy, yv in enumerate(self.y.values if self.y else [None]):
            for ix, xv in enumerate(self.x.values):
                over = {self.x.param: xv}
                if self.y is not None:
                    over[self.y.param] = yv
                out.append((iy, ix, over))
        return out

    def cell_recipe(self, overrides: Mapping[str, Any]) -> Recipe:
        return apply_overrides(self.recipe, overrides, self.source)

    def validate(self) -> None:
        """Every cell's recipe, checked against the methods' parameter types and ranges."""
        for _iy, _ix, over in self.cells():
            self.cell_recipe(over)

    # ------------------------------------------------------------------ documents
    @classmethod
    def from_dict(cls, data: Any, source: str | None = None, base_dir: Path | None = None) -> SweepSpec:
        if not isinstance(data, dict):
            raise SweepError("a sweep must be a mapping with recipe, x, optional y and score", source)
        unknown = sorted(set(data) - {"recipe", "x", "y", "score"})
        if unknown:
            raise SweepError(f"unknown key '{unknown[0]}'; a sweep has recipe, x, y and score", source)
        if "recipe" not in data or "x" not in data:
            raise SweepError(f"missing key '{'recipe' if 'recipe' not in data else 'x'}'", source)
        rec = data["recipe"]
        recipe_dir = base_dir
        if isinstance(rec, str):
            path = Path(rec).expanduser()
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            recipe = Recipe.load(path)
            recipe_dir = path.resolve().parent
        elif isinstance(rec, dict):
            recipe = Recipe.from_dict(rec, f"{source}: recipe" if source else "recipe")
        else:
            raise SweepError("'recipe' must be a recipe file's path or an inline recipe", source)
        x = _axis(data["x"], "x", source)
        y = _axis(data["y"], "y", source) if data.get("y") is not None else None
        if y is not None and y.param == x.param:
            raise SweepError(f"x and y both vary '{x.param}'", source)
        spec = cls(recipe, x, y, _score(data.get("score"), source), recipe_dir, source)
        n = spec.shape[0] * spec.shape[1]
        if n > MAX_CELLS:
            raise SweepError(f"{n} cells ({spec.shape[1]} x {spec.shape[0]}) is more than the {MAX_CELLS} a sweep "
                             "may have: use fewer values", source)
        spec.validate()
        return spec

    @classmethod
    def from_yaml(cls, text: str, source: str | None = None, base_dir: Path | None = None) -> SweepSpec:
        data = yaml_document(text, source, SweepError, "sweep", MAX_SWEEP_CHARS)
        return cls.from_dict(data, source, base_dir)

    @classmethod
    def load(cls, path: str | Path) -> SweepSpec:
        p = Path(path)
        text = read_text_document(p, SweepError, "the sweep")
        return cls.from_yaml(text, str(p), p.resolve().parent)

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"recipe": self.recipe.to_dict(),
                             "x": {"param": self.x.param, "values": list(self.x.values)}}
        if self.y is not None:
            d["y"] = {"param": self.y.param, "values": list(self.y.values)}
        d["score"] = {"backend": self.score.backend, "pairs": self.score.pairs, "metric": self.score.metric}
        return d


def _axis(data: Any, key: str, source: str | None) -> Axis:
    if not isinstance(data, dict) or set(data) != {"param", "values"}:
        raise SweepError(f"'{key}' must be {{param: NAME, values: [...]}}", source)
    param, values = data["param"], data["values"]
    if not isinstance(param, str) or not param:
        raise SweepError(f"'{key}.param' must be a parameter name", source)
    if param.startswith(LAYER_PREFIX) and not param[len(LAYER_PREFIX):]:
        raise SweepError(f"'{key}.param': name the layer after '{LAYER_PREFIX}'", source)
    if not isinstance(values, list) or not values:
        raise SweepError(f"'{key}.values' must be a non-empty list", source)
    if len(values) > MAX_VALUES:
        raise SweepError(f"'{key}.values' has {len(values)} values; at most {MAX_VALUES}", source)
    if any(isinstance(v, (dict, list)) or v is None for v in values):
        raise SweepError(f"'{key}.values' must be plain numbers, booleans or names", source)
    if len({repr(v) for v in values}) != len(values):
        raise SweepError(f"'{key}.values' lists a value twice", source)
    return Axis(param, tuple(values))


def _score(data: Any, source: str | None) -> ScoreSpec:
    if data is None:
        return ScoreSpec()
    if not isinstance(data, dict) or not set(data) <= {"backend", "pairs", "metric"}:
        raise SweepError("'score' must be {backend: demo | llava:PATH, pairs: PATH or demo:SPLIT:N, "
                         "metric: token_accuracy | nll | retrieval}", source)
    spec = ScoreSpec(**{k: v for k, v in data.items()})
    for k in ("backend", "pairs", "metric"):
        if not isinstance(getattr(spec, k), str) or not getattr(spec, k):
            raise SweepError(f"'score.{k}' must be a non-empty string", source)
    if spec.metric not in SCORE_METRICS:
        raise SweepError(f"'score.metric': unknown metric '{spec.metric}'; use one of "
                         f"{', '.join(SCORE_METRICS)}", source)
    return spec


def apply_overrides(recipe: Recipe, overrides: Mapping[str, Any], source: str | None = None) -> Recipe:
    """``recipe`` with a cell's values; raises typed errors for values its method refuses."""
    from .methods.base import get_method

    data = recipe.model_dump()
    method_name = overrides.get("method", data["merge_method"])
    if not isinstance(method_name, str):
        raise SweepError(f"'method' values are method names, got {method_name!r}", source)
    method = get_method(method_name)
    known = {p.name for p in method.params}
    params = dict(data["parameters"])
    if "method" in overrides:
        params = {k: v for k, v in params.items() if k in known}
    coeffs = dict(data.get("layer_coefficients") or {})
    for name, value in overrides.items():
        if name == "method":
            continue
        if name.startswith(LAYER_PREFIX):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or abs(value) > MAX_LAYER_COEFFICIENT:
                raise SweepError(f"'{name}' = {value!r}: a layer coefficient is a finite number within "
                                 f"+-{MAX_LAYER_COEFFICIENT:g}", source)
            coeffs[name[len(LAYER_PREFIX):]] = float(value)
        elif name not in known:
            raise SweepError(f"method '{method.name}' has no parameter '{name}'; its parameters: "
                             f"{', '.join(sorted(known)) or '(none)'}", source)
        else:
            params[name] = value
    method.validate_params(params)  # types and ranges (ParameterError names the value)
    data.update(merge_method=method.name, parameters=params, layer_coefficients=coeffs or None)
    return Recipe.from_dict(data, source)


# --------------------------------------------------------------------------- results
@dataclass
class SweepCell:
    row: int
    col: int
    overrides: dict[str, Any]
    recipe: Recipe
    score: float | None = None
    error: str | None = None
    elapsed_s: float = 0.0
    result: Any = None  # the MergeResult while kept (see KEEP_BYTES)

    @property
    def label(self) -> str:
        return ", ".join(f"{axis_label(k)}={_fmt(v)}" for k, v in self.overrides.items())

    def to_dict(self) -> dict[str, Any]:
        return {"row": self.row, "col": self.col, "values": dict(self.overrides), "score": self.score,
                "error": self.error, "elapsed_s": round(self.elapsed_s, 4)}


def axis_label(param: str) -> str:
    """``layer_coefficients.NAME`` -> ``layer NAME``; others unchanged."""
    return f"layer {param[len(LAYER_PREFIX):]}" if param.startswith(LAYER_PREFIX) else param


def _fmt(v: Any) -> str:
    return f"{v:g}" if isinstance(v, float) else str(v)


@dataclass
class SweepResult:
    spec: SweepSpec
    cells: list[SweepCell]
    elapsed_s: float = 0.0
    kept: str = "all"  # "all": every cell's merge is in memory; "best": only the best's

    def grid(self) -> list[list[float | None]]:
        """Scores as rows (y values) x columns (x values); None where a cell has none."""
        rows, cols = self.spec.shape
        out: list[list[float | None]] = [[None] * cols for _ in range(rows)]
        for c in self.cells:
            out[c.row][c.col] = c.score
        return out

    def best(self) -> SweepCell | None:
        return best_cell(self.cells, self.spec.score.higher_is_better)

    def to_dict(self) -> dict[str, Any]:
        best = self.best()
        return {"spec": self.spec.to_dict(), "metric": self.spec.score.metric,
                "higher_is_better": self.spec.score.higher_is_better, "grid": self.grid(),
                "cells": [c.to_dict() for c in self.cells],
                "best": best.to_dict() | {"recipe": best.recipe.to_dict()} if best is not None else None,
                "elapsed_s": round(self.elapsed_s, 3)}


def best_cell(cells: Sequence[SweepCell], higher_is_better: bool = True) -> SweepCell | None:
    scored = [c for c in cells if c.score is not None and math.isfinite(c.score)]
    if not scored:
        return None
    return (max if higher_is_better else min)(scored, key=lambda c: c.score)  # type: ignore[arg-type,return-value]


# --------------------------------------------------------------------------- run
def run_sweep(
    spec: SweepSpec,
    *,
    backend: Any,
    sets: Mapping[str, Any],
    loaded: Mapping[str, Any] | None = None,
    calibration: Any = None,
    device: str | None = None,
    keep_bytes: int = KEEP_BYTES,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, SweepResult]:
    """Merge and score every cell. Yields a "cell" event per finished cell (payload: the
    :class:`SweepCell`); cancel raises :class:`~.errors.Cancelled` between steps (cells
    already reported stay valid). ``loaded``: projectors by spec (the app's, already in
    memory); the recipe's other inputs are loaded once, before the first cell."""
    from . import pipeline
    from .evaluation import evaluate, prepare

    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    cells = spec.cells()
    yield ProgressEvent("prepare", 0.0, "loading the experts and encoding the pairs")
    first = pipeline.plan(spec.recipe, base_dir=spec.base_dir, loaded=loaded, calibration=calibration,
                          device=device, cancel=cancel)
    pool = dict(loaded or {})
    pool.update({m.model: p for m, p in zip(first.recipe.models, first.experts)})
    if first.recipe.base_model is not None and first.base is not None:
        pool[first.recipe.base_model] = first.base
    calibration = first.calibration
    absolute = SweepSpec(first.recipe, spec.x, spec.y, spec.score, None, spec.source)
    part, key, higher = SCORE_METRICS[spec.score.metric]
    prepared = prepare(backend, sets)
    per_cell = first.experts[0].nbytes
    kept = "all" if per_cell * len(cells) <= keep_bytes else "best"
    done: list[SweepCell] = []
    best: SweepCell | None = None
    for k, (iy, ix, over) in enumerate(cells):
        cancel.raise_if_cancelled()
        t = time.perf_counter()
        cell = SweepCell(iy, ix, dict(over), absolute.cell_recipe(over))
        try:
            p = pipeline.plan(cell.recipe, loaded=pool, calibration=calibration, device=device, cancel=cancel)
            result = pipeline.run(p, cancel)
            ev = evaluate(backend, result.projector, prepared, parts=(part,), cancel=cancel)
            cell.score = ev.score(key)
            cell.result = result
        except Cancelled:
            raise
        except PivotMergeError as exc:
            cell.error = str(exc)
        cell.elapsed_s = time.perf_counter() - t
        if kept == "best" and cell.result is not None:
            new_best = best_cell([c for c in (best, cell) if c is not None], higher)
            if best is not None and new_best is cell:
                best.result = None
            if new_best is not cell:
                cell.result = None
            best = new_best
        done.append(cell)
        shown = f"{cell.score:.4f}" if cell.score is not None else f"failed: {cell.error}"
        yield ProgressEvent("cell", (k + 1) / len(cells), f"cell {k + 1}/{len(cells)} ({cell.label}): {shown}", cell)
    result = SweepResult(spec, done, time.perf_counter() - t0, kept)
    b = result.best()
    yield ProgressEvent("done", 1.0, f"{len(done)} cells in {result.elapsed_s:.1f} s"
                        + (f"; best {b.label}: {b.score:.4f}" if b is not None else "; no cell scored"), result)
    return result
