"""Typed errors of the core. Each carries the data a front end needs to say what went wrong.

Front ends (CLI, GUI) catch :class:`PivotMergeError` and show ``str(err)``: a one-line,
actionable message that names the file/expert/tensor involved. Anything else is a bug.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


class PivotMergeError(Exception):
    """Base of every user-facing error."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class CheckpointError(PivotMergeError):
    """A checkpoint (file, folder, shard set or Hub id) cannot be read."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)
        self.problem = problem


class UnsafeCheckpointError(CheckpointError):
    """A pickle checkpoint needs arbitrary code execution to load; it is refused."""


class UnknownLayoutError(CheckpointError):
    """No known projector family matches the tensors of a checkpoint."""

    def __init__(self, path: str, tensors: Sequence[str], patterns: Sequence[str]) -> None:
        shown = ", ".join(list(tensors)[:12]) + (" ..." if len(tensors) > 12 else "")
        super().__init__(
            path,
            f"no known projector layout found among {len(tensors)} tensors [{shown}]; "
            f"patterns tried: {', '.join(patterns)}",
        )
        self.tensors = list(tensors)
        self.patterns = list(patterns)


class HubError(CheckpointError):
    """A Hub id cannot be resolved (offline without cache, missing repo/revision/file)."""


class IncompatibleExperts(PivotMergeError):
    """Experts (or base) do not share one architecture."""

    def __init__(
        self,
        expert: str,
        tensor: str,
        shape: Any,
        reference: str,
        reference_shape: Any,
        detail: str = "",
    ) -> None:
        if shape == "missing":
            msg = f"expert '{expert}' is incompatible with '{reference}': it has no tensor '{tensor}' (shape {_fmt(reference_shape)} in '{reference}')"
        elif reference_shape == "missing":
            msg = f"expert '{expert}' is incompatible with '{reference}': its tensor '{tensor}' (shape {_fmt(shape)}) is not in '{reference}'"
        else:
            msg = (
                f"expert '{expert}' is incompatible with '{reference}': tensor '{tensor}' "
                f"has shape {_fmt(shape)} but {_fmt(reference_shape)} was expected"
            )
        if detail:
            msg += f" ({detail})"
        super().__init__(msg)
        self.expert = expert
        self.tensor = tensor
        self.shape = shape
        self.reference = reference
        self.reference_shape = reference_shape


class RecipeError(PivotMergeError):
    """A recipe document is malformed (unknown key, wrong type, bad value)."""

    def __init__(self, message: str, source: str | None = None) -> None:
        super().__init__(f"{source}: {message}" if source else message)
        self.source = source


class MethodError(PivotMergeError):
    """A merge method cannot run with the given setup."""


class UnknownMethodError(MethodError):
    def __init__(self, name: str, known: Sequence[str]) -> None:
        super().__init__(f"unknown merge method '{name}'; known methods: {', '.join(known)}")
        self.name = name


class ParameterError(MethodError):
    """A method parameter has a wrong type, is out of range or is unknown."""

    def __init__(self, method: str, parameter: str, problem: str) -> None:
        super().__init__(f"method '{method}', parameter '{parameter}': {problem}")
        self.method = method
        self.parameter = parameter


class NeedsBaseError(MethodError):
    def __init__(self, method: str) -> None:
        super().__init__(
            f"method '{method}' computes task vectors and needs the shared init checkpoint: "
            "set base_model in the recipe (or the Base slot in the app), or pick a base-free "
            "method (linear, regmean, regmean_pp, prodistill, pivotmerge)"
        )
        self.method = method


class NeedsCalibrationError(MethodError):
    def __init__(self, method: str) -> None:
        super().__init__(
            f"method '{method}' needs calibration features (visual features per expert "
            "domain); provide calibration data or pick another method"
        )
        self.method = method


class DeviceError(PivotMergeError):
    """The requested device does not exist or has too little memory."""


class ResourceError(PivotMergeError):
    """Not enough memory on the chosen device for the planned merge."""

    def __init__(self, device: str, needed: int, available: int, detail: str = "") -> None:
        msg = (
            f"{device}: the merge needs about {needed / 2**30:.1f} GiB but only "
            f"{available / 2**30:.1f} GiB is available"
        )
        if detail:
            msg += f"; {detail}"
        super().__init__(msg)
        self.device = device
        self.needed = needed
        self.available = available


class DeviceOutOfMemory(PivotMergeError):
    """The device ran out of memory during a merge; a CPU retry is offered."""

    def __init__(self, device: str) -> None:
        super().__init__(
            f"{device} ran out of memory during the merge; nothing was written. Retry on the "
            "CPU (CLI: --device cpu, or --cpu-fallback to do it automatically)"
        )
        self.device = device


class CastOverflow(PivotMergeError):
    """Casting a finite tensor to the output dtype would turn values into Inf."""

    def __init__(self, tensor: str, largest: float, dtype: str, dtype_max: float) -> None:
        super().__init__(
            f"tensor '{tensor}': its largest absolute value {largest:.6g} exceeds the {dtype} "
            f"maximum {dtype_max:.6g}, so the {dtype} output would hold Inf; nothing was written "
            "(pick a wider output dtype such as float32 or bfloat16)"
        )
        self.tensor = tensor
        self.largest = largest
        self.dtype = dtype
        self.dtype_max = dtype_max


class OutputError(PivotMergeError):
    """An output cannot be written (would overwrite an input or an earlier output)."""

    def __init__(self, path: str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")
        self.path = str(path)


class OutputLocked(OutputError):
    """Another save into the same output folder is running (its lock file is held)."""

    def __init__(self, path: str, pid: int | None, lock: str) -> None:
        holder = f"process {pid}" if pid else "another process"
        super().__init__(
            path,
            f"{holder} is saving into this folder (lock file {lock}); wait for it to finish "
            "or pick another output folder",
        )
        self.pid = pid
        self.lock = lock


class ExportMismatch(PivotMergeError):
    """A full-model export target does not take the merged projector (family or shapes)."""

    def __init__(self, model: str, problem: str) -> None:
        super().__init__(f"{model}: {problem}")
        self.model = str(model)
        self.problem = problem


class BackendMismatch(PivotMergeError):
    """A projector does not fit the evaluation back end's encoder or language model."""

    def __init__(self, backend: str, projector: str, problem: str) -> None:
        super().__init__(f"{projector}: {problem}")
        self.backend = backend
        self.projector = projector
        self.problem = problem


class Cancelled(PivotMergeError):
    """Work was cancelled through a :class:`~pivotmerge_gui.core.progress.CancelToken`."""

    def __init__(self, message: str = "cancelled by the user") -> None:
        super().__init__(message)


def _fmt(shape: Any) -> str:
    if isinstance(shape, str):  # "missing", "-"
        return shape
    try:
        return "[" + ", ".join(str(int(s)) for s in shape) + "]"
    except (TypeError, ValueError):
        return str(shape)
