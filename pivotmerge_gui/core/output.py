"""Saving a merge: the merged projector, the recipe that reproduces it, the model card
and (when the merge used features held in memory) the calibration file, written as one
all-or-nothing folder."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .calibration import Calibration
from .card import model_card
from .devices import dtype_name
from .errors import CastOverflow, OutputError
from .progress import CancelToken
from .projector import Projector, all_finite
from .recipe import CalibrationRef, Recipe

# ``plan``/``result`` arguments are pipeline.Plan / pipeline.MergeResult (not imported: the
# pipeline imports this module)


def cast_state(state: Mapping[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``state`` on the CPU in ``dtype`` (floating tensors only), contiguous. Raises
    :class:`~.errors.CastOverflow` naming the tensor if the cast turns a finite value into
    Inf (fp32 values above 65504 in float16); values that were NaN/Inf already pass, so
    inputs allowed with ``allow_nonfinite`` keep their behaviour."""
    out: dict[str, torch.Tensor] = {}
    for key, src in state.items():
        t = src.detach()
        cast = t.to("cpu", dtype).contiguous() if t.is_floating_point() else t.to("cpu").contiguous()
        if cast.is_floating_point() and not all_finite(cast):
            src_cpu = t.to("cpu")
            finite = torch.isfinite(src_cpu)
            if bool((torch.isinf(cast) & finite).any()):
                largest = float(src_cpu[finite].abs().max())
                raise CastOverflow(key, largest, dtype_name(dtype), float(torch.finfo(dtype).max))
        out[key] = cast
    return out



OUTPUT_FILES = ("recipe.yml", "README.md")


def input_files(plan: Any) -> list[Path]:
    """Every file an input was read from (experts, base, the calibration file): never to be
    overwritten."""
    files = [Path(f) for p in [*plan.experts, *([plan.base] if plan.base else [])] for f in p.files]
    if plan.recipe.calibration:
        files.append(Path(plan.recipe.calibration.file))
    return files


CALIBRATION_FILE = "calibration.safetensors"


def _output_names(projector: Projector, fmt: str, with_calibration: bool = False) -> list[str]:
    from .io import output_filename

    return [output_filename(projector, fmt), *OUTPUT_FILES, *([CALIBRATION_FILE] if with_calibration else [])]


def _writes_calibration(result: Any) -> bool:
    """The merge used in-memory features (no file the recipe can name): they are saved
    beside the output so that the recipe reproduces the merge."""
    return result.calibration is not None and result.recipe.calibration is None


def check_output_dir(plan: Any, out_dir: str | Path, *, fmt: str | None = None, overwrite: bool = False) -> list[Path]:
    """Before a merge: raise :class:`~.errors.OutputError` if :func:`save_result` would
    refuse ``out_dir`` (it holds an input, an input would be overwritten, an earlier output
    exists without ``overwrite``), so a long merge does not end in a refusal. Returns the
    planned paths."""
    from .io.atomic import check_folder

    names = _output_names(plan.experts[0], fmt or plan.recipe.output_format)
    _refuse_model_folder(out_dir)
    check_folder(out_dir, names, input_files(plan), overwrite)
    return [Path(out_dir) / n for n in names]


def _refuse_model_folder(out_dir: str | Path) -> None:
    """A projector-only save into a complete model folder (an earlier ``--into`` export)
    would sit beside the model's shards, and loaders would read the wrong weights."""
    folder = Path(out_dir)
    if folder.is_dir() and ((folder / "config.json").exists() or any(folder.glob("*.index.json"))):
        raise OutputError(str(folder), "holds a complete model (config.json or a shard index): save the "
                                       "projector into another folder, or export into a model with --into")


def save_result(
    result: Any,
    out_dir: str | Path,
    *,
    fmt: str | None = None,
    dtype: torch.dtype | None = None,
    overwrite: bool = False,
    cancel: CancelToken | None = None,
) -> list[Path]:
    """Write the merged projector, the recipe YAML and a model card into ``out_dir``.

    All or nothing for the whole folder (:func:`~.io.atomic.atomic_folder`): the files are
    written into a sibling temp folder that replaces ``out_dir`` in one rename, so a crash,
    a full disk, Ctrl-C or ``cancel`` before the swap leave an earlier output exactly as it
    was. Nothing is written over an input (the folder may not hold one), an earlier output
    is only replaced with ``overwrite=True``, and a second save into the same folder at the
    same time is refused (:class:`~.errors.OutputLocked`).
    """
    from .io import atomic as atomic_io
    from .io import write_projector

    fmt = fmt or result.recipe.output_format
    projector = result.projector
    if dtype is not None:  # checked before anything is written
        projector = projector.with_state(cast_state(projector.state(), dtype))
    recipe, cal_bytes = output_recipe(result, fmt)
    names = _output_names(projector, fmt, cal_bytes is not None)
    recipe_yaml = recipe.to_yaml()
    metadata = {
        "pivotmerge_recipe": recipe_yaml,
        "pivotmerge_inputs_sha256": json.dumps(result.input_hashes),
        "pivotmerge_method": result.report["method"],
    }
    _refuse_model_folder(out_dir)
    with atomic_io.atomic_folder(
        out_dir, names=names, protected=result.protected, overwrite=overwrite, cancel=cancel
    ) as tmp:
        proj_path = write_projector(projector, tmp, fmt=fmt, metadata=metadata, protected=result.protected)
        if cancel is not None:
            cancel.raise_if_cancelled()
        if cal_bytes is not None:
            atomic_io.atomic_write_bytes(tmp / CALIBRATION_FILE, cal_bytes, protected=result.protected)
        atomic_io.atomic_write_text(tmp / "recipe.yml", recipe_yaml, protected=result.protected)
        card = model_card(result, recipe, proj_path.name)
        atomic_io.atomic_write_text(tmp / "README.md", card, protected=result.protected)
    return [Path(out_dir) / n for n in names]


def output_recipe(result: Any, fmt: str) -> tuple[Recipe, bytes | None]:
    """The recipe written beside an output and, when the merge used in-memory features, the
    bytes of the :data:`CALIBRATION_FILE` it names (also used by the full-model export)."""
    recipe = _portable_recipe(result.recipe, fmt, result.calibration)
    if not _writes_calibration(result):
        return recipe, None
    from .calibration import store

    assert result.calibration is not None
    tensors, mapping = store.from_calibration(result.calibration, result.names)
    src = result.calibration.source or {}
    cal_bytes = store.encode(tensors, src.get("provenance") or store.default_provenance(
        features={"description": "features held in the app's memory when the merge ran"}))
    return recipe.model_copy(update={"calibration": CalibrationRef(
        file=CALIBRATION_FILE, sha256=hashlib.sha256(cal_bytes).hexdigest(), domains=mapping)}), cal_bytes


def _portable_recipe(recipe: Recipe, fmt: str, calibration: Calibration | None = None) -> Recipe:
    """The recipe written beside an output: its output format, and a calibration reference
    completed with the file's hash and the expert -> domain mapping the merge used."""
    update: dict[str, Any] = {"output_format": fmt}
    src = (calibration.source or {}) if calibration is not None else {}
    if recipe.calibration is not None and src.get("sha256"):
        update["calibration"] = recipe.calibration.model_copy(update={
            "sha256": src["sha256"], "domains": dict(src.get("domains") or {}) or recipe.calibration.domains})
    return recipe.model_copy(update=update)


