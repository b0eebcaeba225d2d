"""Merge-method interface, typed parameter metadata and the registry.

Every method module in this package defines a subclass of :class:`MergeMethod` decorated
with :func:`register`. The registry (``REGISTRY``/``get_method``/``list_methods``) imports
every module and subpackage of the package except the helpers in ``NOT_METHODS``, so a new
method needs no change anywhere else: the CLI, the GUI settings form and the benchmarks
are generated from the metadata (see CONTRIBUTING.md, "Adding a merge method").

A method's :meth:`MergeMethod.merge` is a generator: it yields
:class:`~pivotmerge_gui.core.progress.ProgressEvent` objects, checks ``job.cancel`` between
steps, and returns a :class:`MergeOutput` (``return`` value of the generator).
Most baselines are per-tensor and subclass :class:`TensorMergeMethod`.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
from collections.abc import Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..calibration import Calibration
from ..errors import NeedsBaseError, NeedsCalibrationError, ParameterError, UnknownMethodError
from ..progress import CancelToken, ProgressEvent
from ..projector import Projector


@dataclass(frozen=True)
class Param:
    """Typed parameter metadata: the GUI builds its form from this, the recipe validates by it."""

    name: str
    type: type  # float | int | bool | str
    default: Any
    help: str
    min: float | None = None
    max: float | None = None
    choices: tuple[Any, ...] | None = None
    is_scale: bool = False  # the method's main scale (swept in the tuned benchmark rows)
    advanced: bool = False
    # values a validation search tries for this parameter (benchmarks/merge_quality.py's
    # tuned rows; every method gets a grid of the same size): None = not searched, except
    # the ``is_scale`` parameter, whose grid is its default times fixed factors
    search: tuple[Any, ...] | None = None

    def validate(self, method: str, value: Any) -> Any:
        t = self.type
        if t is bool:
            if not isinstance(value, bool):
                raise ParameterError(method, self.name, f"expected true/false, got {value!r}")
        elif t is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise ParameterError(method, self.name, f"expected an integer, got {value!r}")
        elif t is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ParameterError(method, self.name, f"expected a number, got {value!r}")
            value = float(value)
            if not math.isfinite(value):
                raise ParameterError(method, self.name, f"{value} is not allowed (finite numbers only)")
        elif t is str and not isinstance(value, str):
            raise ParameterError(method, self.name, f"expected a string, got {value!r}")
        if self.choices is not None and value not in self.choices:
            raise ParameterError(method, self.name, f"{value!r} is not one of {list(self.choices)}")
        if self.min is not None and value < self.min:
            raise ParameterError(method, self.name, f"{value} is below the minimum {self.min}")
        if self.max is not None and value > self.max:
            raise ParameterError(method, self.name, f"{value} is above the maximum {self.max}")
        return value

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type.__name__,
            "default": self.default,
            "help": self.help,
            "min": self.min,
            "max": self.max,
            "choices": list(self.choices) if self.choices is not None else None,
            "is_scale": self.is_scale,
            "advanced": self.advanced,
        }


@dataclass
class MergeJob:
    """Everything a method needs. Experts are already aligned in device and compute dtype
    (in their stored dtype for a method with ``takes_stored_dtype``), checked compatible,
    in the recipe's order."""

    experts: list[Projector]
    base: Projector | None = None
    weights: list[float] | None = None  # per-expert weights (None = all 1.0)
    params: dict[str, Any] = field(default_factory=dict)  # validated, defaults filled in
    layer_coefficients: dict[str, float] | None = None  # per layer name, user overrides
    seed: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    dtype: torch.dtype = torch.float32
    calibration: Calibration | None = None
    cancel: CancelToken = field(default_factory=CancelToken)
    expert_names: list[str] | None = None
    #: the job's expert list and tensors are working copies made for this merge (the
    #: pipeline's): a method may replace entries with function-identical versions (e.g.
    #: hidden units permuted to a pivot) to free the originals' memory, or, once it has read
    #: their values for the last time, with structure-only (meta) versions: callers read
    #: only the keys afterwards
    owns_experts: bool = False

    @property
    def expert_weights(self) -> list[float]:
        return list(self.weights) if self.weights is not None else [1.0] * len(self.experts)

    def generator(self, salt: int = 0) -> torch.Generator:
        """A seeded generator on the job's device (same seed -> same result)."""
        g = torch.Generator(device=self.device)
        # modulo 2**64: torch's seed range; the same stream as before for every seed it accepted
        g.manual_seed((int(self.seed) * 1_000_003 + salt) % 2**64)
        return g


@dataclass
class MergeOutput:
    state: dict[str, torch.Tensor]  # canonical tensor name -> merged tensor (compute dtype)
    report: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable


class MergeMethod:
    name: ClassVar[str]
    pretty_name: ClassVar[str]
    reference_url: ClassVar[str]
    description: ClassVar[str]
    params: ClassVar[tuple[Param, ...]] = ()
    needs_base: ClassVar[bool] = False  # task-vector method: requires the shared init
    uses_base: ClassVar[bool] = False  # uses the base when given, works without
    needs_calibration: ClassVar[bool] = False
    uses_calibration: ClassVar[bool] = False
    randomized: ClassVar[bool] = False
    handles_layer_coefficients: ClassVar[bool] = False  # else the pipeline applies them
    #: peak scratch memory, in stacks of the largest tensor over all experts (compute dtype);
    #: used by the pipeline's memory estimate. Per-tensor task-vector methods hold the stack,
    #: its magnitudes and masks at once; methods that stream over experts need less.
    workspace_stacks: ClassVar[float] = 3.0
    #: model-sized copies per expert beyond the compute-dtype experts (e.g. aligned copies)
    extra_model_copies: ClassVar[float] = 0.0
    #: the method takes the experts in their stored dtype (the base still comes in the
    #: compute dtype) and gives the result it would give on compute-dtype experts; the
    #: pipeline then makes no model-sized compute-dtype copy of each expert (bf16 inputs
    #: with fp32 compute: 4 bytes per parameter and expert, and the time to write them)
    takes_stored_dtype: ClassVar[bool] = False

    # ------------------------------------------------------------------ params
    @classmethod
    def defaults(cls) -> dict[str, Any]:
        return {p.name: p.default for p in cls.params}

    @classmethod
    def validate_params(cls, given: Mapping[str, Any] | None) -> dict[str, Any]:
        given = dict(given or {})
        known = {p.name: p for p in cls.params}
        unknown = [k for k in given if k not in known]
        if unknown:
            raise ParameterError(
                cls.name, unknown[0], f"unknown parameter; known: {', '.join(known) or '(none)'}"
            )
        out = {}
        for p in cls.params:
            out[p.name] = p.validate(cls.name, given[p.name]) if p.name in given else p.default
        return out

    @classmethod
    def check_job(cls, has_base: bool, has_calibration: bool) -> None:
        if cls.needs_base and not has_base:
            raise NeedsBaseError(cls.name)
        if cls.needs_calibration and not has_calibration:
            raise NeedsCalibrationError(cls.name)

    @classmethod
    def describe(cls) -> dict[str, Any]:
        return {
            "name": cls.name,
            "pretty_name": cls.pretty_name,
            "reference_url": cls.reference_url,
            "description": cls.description,
            "needs_base": cls.needs_base,
            "uses_base": cls.uses_base,
            "needs_calibration": cls.needs_calibration,
            "uses_calibration": cls.uses_calibration,
            "randomized": cls.randomized,
            "parameters": [p.to_dict() for p in cls.params],
        }

    # ------------------------------------------------------------------ work
    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        raise NotImplementedError


class TensorMergeMethod(MergeMethod):
    """A method that merges each tensor independently.

    Subclasses implement :meth:`merge_tensor`. ``kind`` is the layer kind
    (``linear``/``layernorm``/``rmsnorm``/``vector``) and ``role`` is ``weight``/``bias``;
    ``base`` is the base tensor or None.
    """

    def merge_tensor(
        self,
        name: str,
        kind: str,
        role: str,
        tensors: Sequence[torch.Tensor],
        base: torch.Tensor | None,
        job: MergeJob,
        gen: torch.Generator,
    ) -> torch.Tensor:
        raise NotImplementedError

    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        ref = job.experts[0]
        names = list(ref.state())
        states = [e.state() for e in job.experts]
        base_state = job.base.state() if job.base is not None else None
        out: dict[str, torch.Tensor] = {}
        i = 0
        for layer in ref.layers:
            for role in layer.tensors:
                key = f"{layer.name}.{role}"
                job.cancel.raise_if_cancelled()
                yield ProgressEvent("merge", i / len(names), f"{self.pretty_name}: {key}")
                out[key] = self.merge_tensor(
                    key,
                    layer.kind,
                    role,
                    [s[key] for s in states],
                    base_state[key] if base_state is not None else None,
                    job,
                    job.generator(salt=i),
                )
                i += 1
        yield ProgressEvent("merge", 1.0, f"{self.pretty_name}: done")
        return MergeOutput(out, {})


# ---------------------------------------------------------------------- registry
REGISTRY: dict[str, type[MergeMethod]] = {}


def register(cls: type[MergeMethod]) -> type[MergeMethod]:
    if cls.name in REGISTRY and REGISTRY[cls.name] is not cls:
        raise ValueError(f"merge method '{cls.name}' registered twice")
    REGISTRY[cls.name] = cls
    return cls


#: modules of this package that hold shared helpers, not methods (never imported by
#: discovery); every other module or subpackage is imported and registers its methods
NOT_METHODS = frozenset({"base", "common", "consensus", "helpers"})
_loaded = False


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    pkg = importlib.import_module(__package__)  # the package's modules are the plug-ins

    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name not in NOT_METHODS and not info.name.startswith("_"):
            importlib.import_module(f"{pkg.__name__}.{info.name}")
    _loaded = True


def get_method(name: str) -> type[MergeMethod]:
    _load_all()
    if name not in REGISTRY:
        raise UnknownMethodError(name, sorted(REGISTRY))
    return REGISTRY[name]


def list_methods() -> list[type[MergeMethod]]:
    _load_all()
    return [REGISTRY[k] for k in REGISTRY]
