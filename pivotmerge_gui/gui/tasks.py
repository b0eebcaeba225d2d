"""Work functions the window runs on worker threads (the only place it reaches the engine's
heavy modules, which import torch)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from .workers import WorkContext

DEMO_CALIBRATION_IMAGES = 64  # unlabelled training images per domain, as in the benchmark


def engine(ctx: WorkContext) -> tuple[list[Any], list[Any]]:
    """Import the merge engine; return its methods and devices."""
    from pivotmerge_gui.core import pipeline  # noqa: F401 - warm the import off the GUI thread
    from pivotmerge_gui.core.devices import available_devices
    from pivotmerge_gui.core.methods.base import list_methods

    return list_methods(), available_devices()


def load(spec: str) -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> tuple[Any, dict[str, Any]]:
        from pivotmerge_gui.core.io import load_projector, pretty_family
        from pivotmerge_gui.session import describe_projector

        projector = load_projector(spec, progress=ctx.emit, cancel=ctx.cancel)
        desc = describe_projector(projector)
        desc["family"] = pretty_family(projector)
        return projector, desc

    return job


def demo(scenario: str) -> Callable[[WorkContext], Any]:
    """The demo's expert paths, names, base and its calibration file (made once, by the
    same code as ``pivotmerge calibrate``), so data-driven methods work out of the box."""
    def job(ctx: WorkContext) -> tuple[list[str], list[str], str | None, Any]:
        from pivotmerge_gui.demo import kit

        paths = [str(Path(p).resolve()) for p in kit.expert_paths(scenario)]
        base = kit.base_path(scenario)
        calibration = kit.calibration_file(n=DEMO_CALIBRATION_IMAGES, split="train")
        return paths, list(kit.expert_names()), str(base) if base is not None else None, str(calibration)

    return job


def analysis(experts: list[Any], base: Any, names: list[str], merged: Any,
             pivot: int = 0) -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> Any:
        from pivotmerge_gui.core.analysis import iter_analysis

        return iter_analysis(experts, base=base, names=names, merged=merged, pivot=pivot, cancel=ctx.cancel)

    return job


def plan(recipe: Any, loaded: dict[str, Any], calibration: Any, allow_nonfinite: bool) -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> Any:
        from pivotmerge_gui.core.pipeline import plan as make_plan

        return make_plan(recipe, loaded=loaded, calibration=calibration, cancel=ctx.cancel,
                         allow_nonfinite=allow_nonfinite)

    return job


def merge(plan_: Any) -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> Any:
        from pivotmerge_gui.core.pipeline import execute

        return execute(plan_, ctx.cancel)

    return job


def save(result: Any, folder: Path, fmt: str, dtype: str, overwrite: bool,
         into: str = "") -> Callable[[WorkContext], Any]:
    def job(ctx: WorkContext) -> list[Path]:
        from pivotmerge_gui.core.devices import parse_dtype
        from pivotmerge_gui.core.pipeline import save_result

        if into:  # full-model export: the model's own layout and dtype
            from pivotmerge_gui.core.io.export import export_model

            rep = export_model(result, into, folder, overwrite=overwrite, progress=ctx.emit, cancel=ctx.cancel)
            return [rep.out / f for f in rep.rewritten]

        return save_result(result, folder, fmt=None if fmt == "auto" else fmt,
                           dtype=None if dtype == "auto" else parse_dtype(dtype), overwrite=overwrite)

    return job
