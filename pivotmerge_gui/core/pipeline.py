"""Plan, then execute: the one merge pipeline behind the GUI, the CLI and the benchmarks.

``plan(recipe)`` loads and validates everything (files, families, shapes, method, parameters,
device, layer names) and raises typed errors before any work starts, so a front end can
disable its Merge button with the reason. ``execute(plan, cancel)`` is a generator of
:class:`ProgressEvent`; the GUI worker and the CLI progress line consume the same generator.
A cancelled merge raises :class:`Cancelled` and has written nothing (writing is a separate,
explicit ``save_result`` step).
"""

from __future__ import annotations

import gc
import math
import os
import time
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .calibration import Calibration, calibration_device, load_calibration
from .calibration.features import calibration_summary
from .devices import dtype_name, host_memory_available, parse_dtype, resolve_device
from .errors import (
    CheckpointError,
    DeviceOutOfMemory,
    MethodError,
    RecipeError,
    ResourceError,
)
from .io.discovery import display_name
from .io.extras import check_extras, merge_extras
from .methods.base import MergeJob, MergeMethod, get_method
from .output import (
    CALIBRATION_FILE,
    OUTPUT_FILES,
    cast_state,
    check_output_dir,
    input_files,
    output_recipe,
    save_result,
)
from .progress import CancelToken, ProgressEvent, drain, rescaled
from .projector import Projector, all_finite, check_compatible, mean_projector, nonfinite_tensors
from .recipe import Recipe


def available_memory(device: torch.device) -> int | None:
    """Bytes the merge may still use on ``device`` (None when unknown); on the host the
    least of available memory, the ``ulimit -v`` headroom and the cgroup's (see devices)."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return host_memory_available()


def estimate_peak_bytes(
    experts: Sequence[Projector], base: Projector | None, dtype: torch.dtype, method: type[MergeMethod]
) -> int:
    """A deliberately pessimistic estimate of the merge's peak memory on its device.

    Counted: the experts (and base) in the compute dtype, one output copy, the method's
    declared extra model-sized copies (``extra_model_copies``) and its declared scratch space
    (``workspace_stacks`` stacks of the largest tensor across all experts: task vectors,
    masks) plus two square Gram matrices of the widest dimension. Inputs already resident on
    the CPU are counted for CPU merges because they stay loaded (``benchmarks/merge_speed.py``
    compares the estimate with the measured peak).
    """
    c = torch.finfo(dtype).bits // 8
    k = len(experts) + (1 if base is not None else 0)
    params = experts[0].num_params
    largest = max(t.numel() for t in experts[0].state().values())
    widest = max(max(t.shape) for t in experts[0].state().values())
    compute = (k + 1 + method.extra_model_copies * len(experts)) * params * c
    workspace = method.workspace_stacks * len(experts) * largest * c + 2 * widest * widest * c
    return int(compute + workspace)


@dataclass
class Plan:
    recipe: Recipe
    method: type[MergeMethod]
    params: dict[str, Any]
    experts: list[Projector]
    names: list[str]
    base: Projector | None
    weights: list[float]
    device: torch.device
    dtype: torch.dtype
    out_dtype: torch.dtype
    calibration: Calibration | None = None
    warnings: list[str] = field(default_factory=list)
    estimated_peak_bytes: int = 0
    allow_nonfinite: bool = False


@dataclass
class MergeResult:
    projector: Projector  # merged, output dtype, on CPU
    report: dict[str, Any]
    recipe: Recipe
    input_hashes: dict[str, str]
    elapsed_s: float
    names: list[str] = field(default_factory=list)
    protected: list[Path] = field(default_factory=list)  # input files, never overwritten
    calibration: Calibration | None = None  # the features the merge used (saved with it)


# --------------------------------------------------------------------------- plan
def resolve_spec(spec: str, base_dir: Path | None) -> str:
    """Relative local paths are relative to the recipe's folder; Hub ids pass unchanged."""
    p = Path(spec).expanduser()
    if not p.is_absolute() and base_dir is not None and (base_dir / p).exists():
        return str((base_dir / p).resolve())
    if p.exists():
        return str(p.resolve())
    return spec


def plan(
    recipe: Recipe,
    *,
    base_dir: Path | None = None,
    loaded: Mapping[str, Projector] | None = None,
    calibration: Calibration | None = None,
    device: str | None = None,
    cancel: CancelToken | None = None,
    allow_low_memory: bool = False,
    allow_nonfinite: bool = False,
) -> Plan:
    """Validate a recipe completely and load its inputs. Raises typed errors only."""
    from .io import load_projector

    loaded = dict(loaded or {})
    recipe = _absolute_paths(recipe, base_dir, loaded)
    method = get_method(recipe.merge_method)
    params = method.validate_params(recipe.parameters)
    dev = resolve_device(device or recipe.device)
    dtype = parse_dtype(recipe.dtype)

    def load(spec: str) -> Projector:
        if cancel is not None:
            cancel.raise_if_cancelled()
        if spec in loaded:
            return loaded[spec]
        return load_projector(spec, cancel=cancel)

    experts = [load(m.model) for m in recipe.models]
    for proj in experts:
        _check_float(proj)
    names = recipe.display_names()
    if len(set(names)) != len(names):  # keep names unique for reports and errors
        names = [f"{n} ({i + 1})" for i, n in enumerate(names)]
    check_compatible(experts, names)
    extras_warnings = check_extras(experts, names)  # adapter tensors besides the projector
    base = None
    if recipe.base_model is not None:
        base = load(recipe.base_model)
        _check_float(base)
        check_compatible([experts[0], base], [names[0], f"base {display_name(recipe.base_model)}"])
    method.check_job(base is not None, calibration is not None or recipe.calibration is not None)

    if calibration is None and recipe.calibration is not None:
        ref = recipe.calibration
        if len(set(recipe.display_names())) != len(names):
            raise RecipeError("two experts have the same name: give each a unique models[].name so "
                              "that calibration domains can be mapped to experts by name")
        calibration = load_calibration(Path(ref.file), names, experts[0].in_features,
                                       ref.domains, ref.sha256)
    uncovered: list[str] = []
    if calibration is not None:
        _check_calibration(calibration, names, experts[0].in_features)
        uncovered = [names[k] for k in calibration.missing]

    layer_names = experts[0].layer_names
    for name, value in (recipe.layer_coefficients or {}).items():
        if name not in layer_names:
            raise RecipeError(
                f"layer_coefficients: unknown layer '{name}'; layers are {', '.join(layer_names)}"
            )
        if not math.isfinite(value) or abs(value) > 100:
            raise RecipeError(f"layer_coefficients: '{name}' = {value} is not a sane coefficient")

    warnings = list(extras_warnings)
    if uncovered:
        warnings.append(
            "no calibration data for " + ", ".join(uncovered) + ": data-driven steps fit that "
            "expert on the other domains' features pooled (its own outputs as targets); measure "
            "its domain before relying on the merge")
    for proj, name in zip([*experts, *([base] if base else [])], [*names, "base"]):
        if proj.metadata.get("finite_checked"):  # the reader already screened it
            bad = [b for b in proj.metadata.get("nonfinite_tensors", "").split(",") if b]
        else:
            bad = nonfinite_tensors(proj)
        if bad and not allow_nonfinite:
            raise MethodError(
                f"{name} ({proj.source}): tensor(s) {', '.join(bad)} contain NaN or Inf; "
                "merging them would spread the damage to every output weight (allow it "
                "explicitly if intended: --allow-nonfinite)"
            )
        if name != "base" and not any(bool(t.any()) for t in proj.state().values() if t.dim() >= 2):
            raise MethodError(
                f"{name} ({proj.source}): every weight is zero (an empty or untrained checkpoint); "
                "it has nothing to merge: replace it with the trained projector"
            )
        if bad:
            warnings.append(f"{name}: NaN/Inf in {', '.join(bad)} (allowed by the user)")
        warnings.extend(f"{name}: {w}" for w in proj.metadata.get("warnings", "").split("\n") if w)

    peak = estimate_peak_bytes(experts, base, dtype, method)
    if dev.type == "cpu":
        peak += sum(p.nbytes for p in [*experts, *([base] if base else [])])
    avail = available_memory(dev)
    if avail is not None and not allow_low_memory:
        if peak > avail:
            raise ResourceError(
                str(dev), peak, avail,
                "free memory, merge fewer experts at once, use a smaller compute dtype, or "
                "pick another device" + (" (the CPU)" if dev.type == "cuda" else ""),
            )
        if peak > 0.8 * avail:
            warnings.append(
                f"the merge needs about {peak / 2**30:.1f} GiB of the {avail / 2**30:.1f} GiB "
                f"available on {dev}; other programs may be pushed into swap"
            )

    dtypes = {p.dtype for p in experts}
    if len(dtypes) > 1:
        listed = ", ".join(f"{n}: {dtype_name(p.dtype)}" for n, p in zip(names, experts))
        warnings.append(f"experts have mixed dtypes ({listed}); all are merged in {dtype_name(dtype)}")
    if recipe.out_dtype == "auto":
        # the experts' dtype; with mixed dtypes the widest one, so nothing is lost (fp16
        # and bf16 hold different values: together they need float32)
        widest = max(torch.finfo(d).bits for d in dtypes)
        candidates = [d for d in dtypes if torch.finfo(d).bits == widest]
        out_dtype = candidates[0] if len(candidates) == 1 else torch.float32
    else:
        out_dtype = parse_dtype(recipe.out_dtype)
    return Plan(
        recipe=recipe,
        method=method,
        params=params,
        experts=experts,
        names=names,
        base=base,
        weights=recipe.weights,
        device=dev,
        dtype=dtype,
        out_dtype=out_dtype,
        calibration=calibration,
        warnings=warnings,
        estimated_peak_bytes=peak,
        allow_nonfinite=allow_nonfinite,
    )


def _check_calibration(cal: Calibration, names: list[str], in_features: int) -> None:
    """One feature set (or None) per expert, each [N, in_features] and finite."""
    if len(cal.features) != len(names):
        raise RecipeError(
            f"calibration has features for {len(cal.features)} domains but the recipe lists "
            f"{len(names)} experts")
    if not cal.covered:
        raise RecipeError("the calibration holds no features for any expert")
    for k, f in enumerate(cal.features):
        if f is not None and (f.dim() != 2 or f.shape[1] != in_features):
            raise RecipeError(
                f"calibration features for {names[k]} have shape {list(f.shape)}; the projector "
                f"takes [N, {in_features}]")


def _check_float(proj: Projector) -> None:
    """Integer, bool and complex tensors are not projector weights a merge can average (a
    complex one would lose its imaginary part): refused, naming the file and the tensor."""
    for layer in proj.layers:
        for role, t in layer.tensors.items():
            if not t.is_floating_point():
                kind = "complex" if t.is_complex() else "not floating-point"
                raise CheckpointError(
                    str(proj.files[0]) if proj.files else proj.source,
                    f"tensor '{layer.keys.get(role, f'{layer.name}.{role}')}' is {dtype_name(t.dtype)} "
                    f"({kind}); only floating-point projector weights can be merged",
                )


# --------------------------------------------------------------------------- execute
def execute(
    plan: Plan, cancel: CancelToken | None = None, *, release_inputs: bool = False
) -> Generator[ProgressEvent, None, MergeResult]:
    """Run a planned merge; yields progress and returns (and emits as payload) the result."""
    cancel = cancel or CancelToken()
    try:
        return (yield from _execute(plan, cancel, release_inputs))
    except torch.cuda.OutOfMemoryError:
        raise DeviceOutOfMemory(str(plan.device)) from None
    finally:
        # release what the merge held (repeated merges must not grow the process); one-shot
        # callers (release_inputs: the CLI, benchmarks) exit next and skip the 0.1 s pass
        if not release_inputs:
            gc.collect()
        if plan.device.type == "cuda":
            torch.cuda.empty_cache()


def _execute(
    plan: Plan, cancel: CancelToken, release_inputs: bool
) -> Generator[ProgressEvent, None, MergeResult]:
    t0 = time.perf_counter()
    yield ProgressEvent("prepare", 0.0, f"moving {len(plan.experts)} experts to {plan.device}")
    # what the result needs from the inputs, taken before they may be released
    template = plan.experts[0].to("meta")  # structure, keys and dtypes only
    input_hashes = {n: e.sha256 for n, e in zip(plan.names, plan.experts)}
    if plan.base is not None:
        input_hashes["base"] = plan.base.sha256
    protected = input_files(plan)
    extras, extras_report = merge_extras(plan.experts, plan.names)
    # a method that takes the experts in their stored dtype gets them so (it needs the base,
    # which still comes in the compute dtype, as does everything the pipeline computes here)
    stored = plan.method.takes_stored_dtype and plan.base is not None
    sources, base_src = list(plan.experts), plan.base
    if release_inputs:
        # one-shot callers (CLI, benchmarks) need not keep the stored-dtype copies beside the
        # compute-dtype ones (for bf16 inputs a third of the inputs' memory): each is let go
        # as soon as its copy exists, so no more than one is ever held beside the copies
        plan.experts, plan.base = [], None
    experts = []
    while sources:
        experts.append(sources.pop(0).to(plan.device, None if stored else plan.dtype))
    base = base_src.to(plan.device, plan.dtype) if base_src is not None else None
    del base_src
    calibration = None
    if plan.calibration is not None:
        calibration = calibration_device(plan.calibration, plan.device, plan.dtype)
    cancel.raise_if_cancelled()
    job = MergeJob(
        experts=experts,
        base=base,
        weights=list(plan.weights),
        params=dict(plan.params),
        layer_coefficients=dict(plan.recipe.layer_coefficients or {}) or None,
        seed=plan.recipe.random_seed,
        device=plan.device,
        dtype=plan.dtype,
        calibration=calibration,
        cancel=cancel,
        expert_names=list(plan.names),
        owns_experts=True,  # the list above is built here, and only its keys are read after
    )
    method = plan.method()
    output = yield from rescaled(method.merge(job), 0.05, 0.90, cancel)
    cancel.raise_if_cancelled()

    state = dict(output.state)
    applied: dict[str, float] = {}
    if job.layer_coefficients and not plan.method.handles_layer_coefficients:
        ref = base if base is not None else mean_projector(experts)
        ref_state = ref.state()
        for layer in experts[0].layers:
            c = job.layer_coefficients.get(layer.name)
            if c is None:
                continue
            applied[layer.name] = c
            for role in layer.tensors:
                key = f"{layer.name}.{role}"
                r = ref_state[key].to(state[key].dtype)
                state[key] = r + c * (state[key] - r)
    yield ProgressEvent("finalize", 0.93, "checking and converting the merged tensors")
    missing = [k for k in experts[0].state() if k not in state]
    if missing:  # a method bug, not a user error: fail loudly
        raise RuntimeError(f"method {plan.method.name} returned no tensor for {missing}")
    bad = [k for k, t in state.items() if not all_finite(t)]
    if bad and not plan.allow_nonfinite:
        raise MethodError(
            f"the {plan.method.pretty_name} merge produced NaN/Inf in {', '.join(bad)}; "
            "try a smaller scale or the float64 compute dtype"
        )
    out_state = cast_state({k: state[k] for k in template.state()}, plan.out_dtype)
    merged = template.with_state(
        out_state,
        source=f"merged ({plan.method.name})",
        sha256="",
        files=(),
        metadata={"merge_method": plan.method.name},
        extras=extras,
    )
    elapsed = time.perf_counter() - t0
    report = {
        "method": plan.method.name,
        "method_pretty": plan.method.pretty_name,
        "reference_url": plan.method.reference_url,
        "parameters": dict(plan.params),
        "experts": list(plan.names),
        "weights": list(plan.weights),
        "base": plan.recipe.base_model,
        "device": str(plan.device),
        "compute_dtype": dtype_name(plan.dtype),
        "out_dtype": dtype_name(plan.out_dtype),
        "seed": plan.recipe.random_seed,
        "layer_coefficients_applied": applied or None,
        "warnings": list(plan.warnings),
        "estimated_peak_gib": round(plan.estimated_peak_bytes / 2**30, 3),
        "method_report": jsonable(output.report),
        "extras": extras_report,
        "elapsed_s": round(elapsed, 4),
    }
    if plan.calibration is not None:
        report["calibration"] = calibration_summary(plan.calibration, plan.names)
    result = MergeResult(merged, report, plan.recipe, input_hashes, elapsed, list(plan.names), protected,
                         plan.calibration)
    yield ProgressEvent("done", 1.0, f"merged in {elapsed:.2f} s", result)
    return result


def run(plan_: Plan, cancel: CancelToken | None = None, *, release_inputs: bool = False) -> MergeResult:
    """Drain :func:`execute` (for callers that need no progress)."""
    return drain(execute(plan_, cancel, release_inputs=release_inputs))


def merge_projectors(
    experts: Sequence[Projector],
    method: str,
    params: Mapping[str, Any] | None = None,
    *,
    base: Projector | None = None,
    weights: Sequence[float] | None = None,
    layer_coefficients: Mapping[str, float] | None = None,
    calibration: Calibration | None = None,
    seed: int = 0,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    out_dtype: torch.dtype | None = None,
    names: Sequence[str] | None = None,
    cancel: CancelToken | None = None,
) -> MergeResult:
    """Merge in-memory projectors with the same validation and semantics as a recipe."""
    names = list(names) if names is not None else [e.source or f"expert_{i}" for i, e in enumerate(experts)]
    keys = [f"mem:{i}:{n}" for i, n in enumerate(names)]
    loaded: dict[str, Projector] = dict(zip(keys, experts))
    if base is not None:
        loaded["mem:base"] = base
    recipe = Recipe(
        merge_method=method,
        base_model="mem:base" if base is not None else None,
        models=[
            {"model": k, "name": n, "parameters": {"weight": w}}
            for k, n, w in zip(keys, names, weights if weights is not None else [1.0] * len(keys))
        ],
        parameters=dict(params or {}),
        layer_coefficients=dict(layer_coefficients) if layer_coefficients else None,
        dtype=dtype_name(dtype),
        out_dtype=dtype_name(out_dtype) if out_dtype is not None else "auto",
        device=device,
        random_seed=seed,
    )
    p = plan(recipe, loaded=loaded, calibration=calibration, cancel=cancel)
    return run(p, cancel)


def _absolute_paths(recipe: Recipe, base_dir: Path | None, loaded: Mapping[str, Projector]) -> Recipe:
    """The recipe with local paths made absolute (relative ones are relative to the recipe's
    folder), so the copy written beside an output runs from anywhere."""
    data = recipe.model_dump()
    for m in data["models"]:
        if m["model"] not in loaded:
            m["model"] = resolve_spec(m["model"], base_dir)
    if data.get("base_model") and data["base_model"] not in loaded:
        data["base_model"] = resolve_spec(data["base_model"], base_dir)
    if data.get("calibration"):
        data["calibration"]["file"] = resolve_spec(data["calibration"]["file"], base_dir)
    for spec in [m["model"] for m in data["models"]] + [data.get("base_model") or ""]:
        try:
            spec.encode("utf-8")
        except UnicodeEncodeError:  # a name with bytes that are not UTF-8 (surrogate-escaped)
            raise RecipeError(f"path {os.fsencode(spec)!r} is not valid UTF-8 (a folder or file name in another "
                              "encoding): rename it, or move the recipe and checkpoints to a UTF-8 path") from None
    return Recipe.from_dict(data)


def jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu().tolist()
    if isinstance(obj, float):
        return round(obj, 6) if math.isfinite(obj) else None
    if isinstance(obj, (str, int, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return jsonable(obj.item())
    return str(obj)


__all__ = ["CALIBRATION_FILE", "OUTPUT_FILES", "MergeResult", "Plan", "cast_state", "check_output_dir",
           "execute", "merge_projectors", "output_recipe", "plan", "run", "save_result"]
