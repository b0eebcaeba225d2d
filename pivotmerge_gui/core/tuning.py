"""Auto-tune: evolutionary search of per-layer merge coefficients on calibration pairs.

This is the search EvoGM and mergekit-evolve run for LLM merges, sized for projectors:
CMA-ES (Hansen's ``cma`` package, box bounds by its boundary transformation; the search
space has one dimension per projector layer) maximises a fitness over the per-layer
coefficients ``c_l`` of a merge, ``theta_l = ref_l + c_l * tau_l``.

Fitness is an alignment score on the *validation* pairs: by default the negative caption
NLL per token, averaged over domains without weights (smooth, so the ES gets a useful
signal from every sample; ``metric="token_accuracy"`` uses greedy captions instead). The
tuned setting is then scored on a held-out split that the search never saw, next to the
untuned setting, which answers "does it generalise?".

Cost: the pipeline applies layer coefficients as ``ref + c * (merged - ref)`` and
PivotMerge's own user coefficients compose ``ref + c * tau*`` with ``tau*`` independent
of ``c``, so every candidate is an affine combination of two merges (all coefficients 0
and all 1). :class:`MergeObjective` checks this on the method's default setting and falls
back to one full merge per candidate for a method where it does not hold. The method's
``is_scale`` parameter is therefore not a separate search dimension: every method's
scale multiplies the same update that the per-layer coefficients multiply (for PivotMerge
a user coefficient replaces ``scale * lambda``), so the coefficients subsume it; the
result's coefficients are the final ones, written into ``Recipe.layer_coefficients``
with the method's parameters unchanged.

Seeded and deterministic: the same inputs and seed give the same result.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from .calibration import Calibration
from .errors import PivotMergeError
from .evaluation.backend import CaptionBackend, CaptionSet
from .evaluation.metrics import evaluate, prepare
from .progress import CancelToken, ProgressEvent, rescaled
from .projector import Projector

METRICS = ("nll", "token_accuracy")


# --------------------------------------------------------------------------- results
@dataclass
class TuneSetting:
    """A point of the search: final per-layer coefficients (+ the method's parameters)."""

    layer_coefficients: dict[str, float]
    parameters: dict[str, Any] = field(default_factory=dict)

    def recipe_update(self) -> dict[str, Any]:
        """Fields to write into a :class:`~pivotmerge_gui.core.recipe.Recipe`."""
        return {"layer_coefficients": dict(self.layer_coefficients), "parameters": dict(self.parameters)}


@dataclass
class GenerationRecord:
    generation: int
    best_fitness: float  # best so far (validation)
    generation_best: float
    generation_mean: float
    sigma: float
    evaluations: int
    best: TuneSetting


@dataclass
class TuneResult:
    """The best setting found, how it scores on validation and on the held-out split."""

    best: TuneSetting
    best_fitness: float
    initial: TuneSetting
    initial_fitness: float
    history: list[GenerationRecord]
    evaluations: int
    elapsed_s: float
    metric: str
    holdout_fitness: float | None = None
    holdout_initial_fitness: float | None = None
    mode: str = ""  # "affine" (two merges) or "full merges"

    @property
    def generalises(self) -> bool | None:
        """Whether the tuned setting also beats the untuned one on the held-out split."""
        if self.holdout_fitness is None or self.holdout_initial_fitness is None:
            return None
        return self.holdout_fitness > self.holdout_initial_fitness

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["generalises"] = self.generalises
        return d


# --------------------------------------------------------------------------- CMA-ES
def _cma_strategy(x0: np.ndarray, sigma0: float, population: int,
                  bounds: tuple[float, float] | None, seed: int) -> Any:
    """A ``cma.CMAEvolutionStrategy`` that samples from its own seeded generator (never
    numpy's global one, so other code cannot change its draws) and writes no log files."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # cma warns on import when matplotlib is absent
        import cma

    rng = np.random.default_rng(seed)
    options = {
        "popsize": population,
        "bounds": [bounds[0], bounds[1]] if bounds is not None else [None, None],
        "seed": np.nan,  # do not reseed numpy's global generator
        "randn": lambda *shape: rng.standard_normal(shape),
        "verbose": -9,
        "verb_log": 0,
        "verb_disp": 0,
        "tolfun": 0, "tolx": 0, "tolfunhist": 0, "tolflatfitness": 0,  # run every generation
    }
    return cma.CMAEvolutionStrategy(list(x0), float(sigma0), options)


def evolve(
    fitness: Callable[[np.ndarray], float],
    x0: Sequence[float],
    *,
    sigma0: float = 0.25,
    generations: int = 10,
    population: int = 8,
    bounds: tuple[float, float] | None = (0.0, 2.0),
    seed: int = 0,
    cancel: CancelToken | None = None,
    decode: Callable[[np.ndarray], TuneSetting] | None = None,
) -> Generator[ProgressEvent, None, tuple[np.ndarray, float, float, list[GenerationRecord], int]]:
    """Maximise ``fitness`` from ``x0`` with CMA-ES (the ``cma`` package), within
    ``bounds`` (every evaluated point lies inside them). ``x0`` is evaluated first, so the
    result is never worse than the start. The cancel token is checked before every
    evaluation. Yields one "generation" event per generation with the
    :class:`GenerationRecord` as payload. Returns ``(best_x, best_f, f(x0), history,
    evaluations)``. The same ``seed`` gives the same search."""
    cancel = cancel or CancelToken()
    decode = decode or (lambda x: TuneSetting({str(i): float(v) for i, v in enumerate(x)}))
    start = np.asarray(x0, dtype=np.float64).reshape(-1)
    if start.size < 1:
        raise ValueError("CMA-ES needs at least one dimension")
    if population < 2:
        raise ValueError("population must be at least 2")
    if bounds is not None:
        start = np.clip(start, bounds[0], bounds[1])
    es = _cma_strategy(start, sigma0, population, bounds, seed)
    cancel.raise_if_cancelled()
    f0 = float(fitness(start))
    best_x, best_f, evals = start.copy(), f0, 1
    history: list[GenerationRecord] = []
    for g in range(1, generations + 1):
        xs = [np.asarray(x, dtype=np.float64) for x in es.ask()]
        fs = []
        for x in xs:
            cancel.raise_if_cancelled()
            f = float(fitness(x))
            if not math.isfinite(f):
                f = -math.inf
            fs.append(f)
            evals += 1
            if f > best_f:
                best_x, best_f = x.copy(), f
        es.tell(xs, [-f if math.isfinite(f) else 1e30 for f in fs])  # cma minimises
        finite = [f for f in fs if math.isfinite(f)]
        rec = GenerationRecord(g, best_f, max(fs), float(np.mean(finite)) if finite else -math.inf,
                               float(es.sigma), evals, decode(best_x))
        history.append(rec)
        yield ProgressEvent("generation", g / generations,
                            f"generation {g}/{generations}: best {best_f:.4f}", rec)
    return best_x, best_f, f0, history, evals


# --------------------------------------------------------------------------- merges
class MergeObjective:
    """Fitness of a merge's per-layer coefficients on caption sets.

    Built from the experts and the method setting; ``projector(coeffs)`` gives the merged
    projector for a coefficient vector (affine fast path when valid, see the module
    docstring), ``score(coeffs, sets)`` its alignment fitness (higher is better).
    """

    def __init__(
        self,
        experts: Sequence[Projector],
        method: str,
        params: Mapping[str, Any] | None = None,
        *,
        backend: CaptionBackend,
        base: Projector | None = None,
        weights: Sequence[float] | None = None,
        calibration: Calibration | None = None,
        names: Sequence[str] | None = None,
        metric: str = "nll",
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        from .pipeline import merge_projectors

        if metric not in METRICS:
            raise PivotMergeError(f"unknown auto-tune metric '{metric}'; use one of {', '.join(METRICS)}")
        self.experts, self.method, self.params = list(experts), method, dict(params or {})
        self.backend, self.metric = backend, metric
        self.layers = list(self.experts[0].layer_names)
        self._kw: dict[str, Any] = {"base": base, "weights": weights, "calibration": calibration,
                                    "names": names, "seed": seed, "device": device}
        self._merge = merge_projectors
        default = merge_projectors(self.experts, method, self.params, **self._kw)
        self.default_projector = default.projector
        lam = (default.report.get("method_report") or {}).get("lambdas") or {}
        self.x0 = np.array([float(lam.get(n, 1.0)) for n in self.layers])
        zero = merge_projectors(self.experts, method, self.params, layer_coefficients=dict.fromkeys(self.layers, 0.0),
                                **self._kw).projector
        one = merge_projectors(self.experts, method, self.params, layer_coefficients=dict.fromkeys(self.layers, 1.0),
                               **self._kw).projector
        self._ref = {k: v.float() for k, v in zero.state().items()}
        self._tau = {k: v.float() - self._ref[k] for k, v in one.state().items()}
        self._template = zero
        # affine check: the default merge must be ref + x0 * tau
        self.affine = True
        rebuilt = self.projector(self.x0).state()
        err = max(float((rebuilt[k].float() - v.float()).abs().max()) for k, v in self.default_projector.state().items())
        scale = max(float(v.float().abs().max()) for v in self.default_projector.state().values()) or 1.0
        self.affine = err <= 1e-4 * scale
        self.mode = "affine" if self.affine else "full merges"

    def setting(self, x: np.ndarray) -> TuneSetting:
        return TuneSetting({n: round(float(v), 6) for n, v in zip(self.layers, x)}, dict(self.params))

    def projector(self, x: np.ndarray) -> Projector:
        coeffs = {n: float(v) for n, v in zip(self.layers, x)}
        if not self.affine:
            return self._merge(self.experts, self.method, self.params, layer_coefficients=coeffs, **self._kw).projector
        state = {}
        for k, ref in self._ref.items():
            c = coeffs[k.rsplit(".", 1)[0]]
            state[k] = (ref + c * self._tau[k]).to(self._template.state()[k].dtype)
        return self._template.with_state(state, source=f"auto-tune ({self.method})", sha256="")

    def score_projector(self, proj: Projector, sets: Mapping[str, CaptionSet],
                        cancel: CancelToken | None = None) -> float:
        if self.metric == "nll":
            vals = []
            for s in sets.values():
                assert s.features is not None
                nll, count = self.backend.caption_nll(proj, s.features, s.captions, cancel)
                vals.append(float(nll.sum() / count.sum().clamp_min(1)))
            return -sum(vals) / len(vals)
        return evaluate(self.backend, proj, sets, parts=("generate",), cancel=cancel).score("token_accuracy")

    def score(self, x: np.ndarray, sets: Mapping[str, CaptionSet], cancel: CancelToken | None = None) -> float:
        return self.score_projector(self.projector(x), sets, cancel)


def autotune(
    experts: Sequence[Projector],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    backend: CaptionBackend,
    val_sets: Mapping[str, CaptionSet],
    test_sets: Mapping[str, CaptionSet] | None = None,
    base: Projector | None = None,
    weights: Sequence[float] | None = None,
    calibration: Calibration | None = None,
    names: Sequence[str] | None = None,
    metric: str = "nll",
    generations: int = 10,
    population: int = 8,
    sigma0: float = 0.25,
    bounds: tuple[float, float] = (0.0, 2.0),
    seed: int = 0,
    device: str = "cpu",
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, TuneResult]:
    """Tune the per-layer coefficients of ``method`` on ``val_sets``; score the best and
    the untuned setting on ``test_sets``. Progress payloads are
    :class:`GenerationRecord` per generation; the final "done" event carries the
    :class:`TuneResult` (also the return value). Cancel raises
    :class:`~pivotmerge_gui.core.errors.Cancelled` (the last record has the best so far)."""
    cancel = cancel or CancelToken()
    t0 = time.perf_counter()
    if not val_sets:
        raise PivotMergeError("auto-tune needs calibration pairs (a validation split)")
    yield ProgressEvent("prepare", 0.0, f"merging with {method} (coefficients 0, 1 and default)")
    obj = MergeObjective(experts, method, params, backend=backend, base=base, weights=weights,
                         calibration=calibration, names=names, metric=metric, seed=seed, device=device)
    val = prepare(backend, val_sets)
    cancel.raise_if_cancelled()
    gen = evolve(lambda x: obj.score(x, val, cancel), obj.x0, sigma0=sigma0, generations=generations,
                 population=population, bounds=bounds, seed=seed, cancel=cancel, decode=obj.setting)
    best_x, best_f, f0, history, evals = yield from rescaled(gen, 0.02, 0.92, cancel)
    hold = hold0 = None
    if test_sets:
        yield ProgressEvent("holdout", 0.95, "scoring the tuned and the untuned setting on the held-out split")
        test = prepare(backend, test_sets)
        hold = obj.score(best_x, test, cancel)
        hold0 = obj.score(obj.x0, test, cancel)
    result = TuneResult(obj.setting(best_x), best_f, obj.setting(obj.x0), f0, history, evals,
                        time.perf_counter() - t0, metric, hold, hold0, obj.mode)
    yield ProgressEvent("done", 1.0, f"best {best_f:.4f} (start {f0:.4f}) after {evals} evaluations", result)
    return result


def tuned_projector(result: TuneResult, experts: Sequence[Projector], method: str, **kw: Any) -> Projector:
    """The merged projector of a tuned setting, through the ordinary pipeline."""
    from .pipeline import merge_projectors

    return merge_projectors(list(experts), method, result.best.parameters,
                            layer_coefficients=result.best.layer_coefficients, **kw).projector
