"""PivotMerge's typed report. ``to_dict()`` gives the JSON-able dict the pipeline stores as
``report["method_report"]`` and the GUI, CLI, tuning and benchmarks read (keys are a
contract: ``pivot``, ``alignment``, ``tensors``, ``layers`` rows with ``layer`` /
``lambda`` / ``coefficient`` / ``source``, ``lambdas``, ``alm``, ``timings``...)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from ...alignment import AlignmentInfo


@dataclass
class Stages:
    """Which stages ran (``alm`` is the resolved mode, never ``auto``)."""

    align_hidden_units: bool
    sdf: bool
    filter_conflicts: bool
    residuals: bool
    alm: str

    def to_dict(self) -> dict[str, Any]:
        return {"align_hidden_units": self.align_hidden_units, "sdf": self.sdf,
                "filter_conflicts": self.filter_conflicts, "residuals": self.residuals,
                "alm": self.alm}


@dataclass
class PivotChoice:
    index: int
    name: str
    chosen_by: str
    scores: list[float] | None = None  # medoid or calibration scores, one per expert

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "name": self.name, "chosen_by": self.chosen_by,
                "scores": [round(s, 6) for s in self.scores] if self.scores else None}


@dataclass
class ExpertAlignment:
    expert: str
    aligned: bool  # whether hidden-unit alignment ran at all
    info: AlignmentInfo

    def to_dict(self) -> dict[str, Any]:
        return {"expert": self.expert, "aligned": self.aligned, **self.info.to_dict()}


@dataclass
class TensorReport:
    """One tensor of the SDF stage: ``mode`` "sdf" (2-D, shared subspace) or "entry-wise"."""

    tensor: str
    shape: list[int]
    mode: str
    conflict_fraction: float
    conflicts_dropped: bool
    trimmed_fraction: float
    energy: float = 0.0  # sum_k ||tau_k||^2 of the tensor
    # "sdf" only
    subspace: str | None = None
    rank: int | None = None
    rank_u: int | None = None
    rank_v: int | None = None
    residual_rank: int | None = None
    residual_energy_kept: float | None = None
    shared_energy: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"tensor": self.tensor, "shape": list(self.shape), "mode": self.mode}
        if self.mode == "sdf":
            d.update(subspace=self.subspace, rank=self.rank, rank_u=self.rank_u, rank_v=self.rank_v)
        d.update(conflict_fraction=self.conflict_fraction, conflicts_dropped=self.conflicts_dropped,
                 trimmed_fraction=self.trimmed_fraction)
        if self.mode == "sdf":
            d["residual_rank"] = self.residual_rank
            if self.residual_energy_kept is not None:
                d["residual_energy_kept"] = self.residual_energy_kept
            d["shared_energy"] = self.shared_energy
        d["energy"] = self.energy
        return d


@dataclass
class LayerRow:
    """Final coefficient of one layer and where it came from."""

    layer: str
    lam: float  # ALM's lambda (before ``scale`` / user override)
    coefficient: float  # what multiplies the merged update
    source: str  # "user" | "alm-data-fit" | "alm-data-free" | "alm-data-lambda" | ...
    fitted: bool  # refitted by data-driven ALM
    shared_energy_fraction: float
    typical_update_norm: float
    merged_update_norm: float

    def to_dict(self) -> dict[str, Any]:
        return {
            "layer": self.layer, "lambda": round(self.lam, 6),
            "coefficient": round(self.coefficient, 6), "source": self.source,
            "fitted": self.fitted,
            "shared_energy_fraction": round(self.shared_energy_fraction, 6),
            "typical_update_norm": round(self.typical_update_norm, 6),
            "merged_update_norm": round(self.merged_update_norm, 6),
        }


@dataclass
class LayerFit:
    """Data-driven ALM: the ridge refit of one linear layer."""

    layer: str
    tokens: int
    mu: float
    alm_ridge: float
    residual_before: float
    residual_after: float
    solve: str  # "dual|primal float64|float32"

    def to_dict(self) -> dict[str, Any]:
        return {"layer": self.layer, "tokens": self.tokens, "mu": self.mu, "alm_ridge": self.alm_ridge,
                "residual_before": self.residual_before, "residual_after": self.residual_after,
                "relative_residual_after": (self.residual_after / self.residual_before
                                            if self.residual_before > 0 else 0.0),
                "solve": self.solve}


@dataclass
class AlmReport:
    """What ALM did; the fit fields are set by the data-driven modes only."""

    mode: str
    note: str | None = None
    objective_at_1: float | None = None  # calibration objective with every lambda = 1
    objective_prior: float | None = None  # ... at the data-free merge (alm="data")
    alm_ridge: float | None = None
    tokens_per_domain: list[int] | None = None
    targets: str | None = None
    layers: list[LayerFit] | None = None
    objective: float | None = None  # ... after the fit
    iterations: int | None = None
    domains: list[str] | None = None
    uncovered: list[str] | None = None  # experts whose domain had no features (pooled stand-in)

    @property
    def data_driven(self) -> bool:
        return self.mode in ("data", "data-lambda")

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"mode": self.mode}
        for key in ("note", "objective_at_1", "objective_prior", "alm_ridge", "tokens_per_domain",
                    "targets"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.layers is not None:
            d["layers"] = [f.to_dict() for f in self.layers]
        for key in ("objective", "iterations"):
            if getattr(self, key) is not None:
                d[key] = getattr(self, key)
        if self.data_driven:
            d["domains"] = self.domains
            if self.uncovered:
                d["uncovered"] = self.uncovered
        return d


@dataclass
class PivotMergeReport:
    stages: Stages
    pivot: PivotChoice | None = None
    alignment: list[ExpertAlignment] = field(default_factory=list)
    reference: str = ""
    tensors: list[TensorReport] = field(default_factory=list)
    layers: list[LayerRow] = field(default_factory=list)
    alm: AlmReport | None = None
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        assert self.pivot is not None and self.alm is not None
        return {
            "stages": self.stages.to_dict(),
            "warnings": list(self.warnings),
            "pivot": self.pivot.to_dict(),
            "alignment": [a.to_dict() for a in self.alignment],
            "reference": self.reference,
            "tensors": [t.to_dict() for t in self.tensors],
            "layers": [r.to_dict() for r in self.layers],
            "lambdas": {r.layer: round(r.coefficient, 6) for r in self.layers},
            "alm": self.alm.to_dict(),
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
        }
