"""PivotMerge's parameters: the metadata the GUI/CLI/recipe read, and the typed settings
the method reads them through (built once per job, defaults filled in)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from ..base import Param

ALM_CHOICES = ("auto", "data", "data-lambda", "data-free", "off")
ALM_UNCOVERED_WEIGHT_DEFAULT = 2.5  # smallest of 1.5/2/2.5/3 keeping the uncovered domain >= data-free (val)
ALM_RIDGE_DEFAULT = 0.3  # alm="data": ridge towards the data-free merge (validation-chosen)
ALM_TOKENS_DEFAULT = 1024  # validation: above 256 on the demo (+0.006) and large (+0.014..+0.03) worlds

PARAMS = (
    Param("pivot", int, -1, "Pivot expert index (0-based); -1 = automatic: with calibration "
          "data the expert whose outputs best match every domain's expert on its own "
          "domain, else the medoid (largest mean cosine similarity after alignment).",
          min=-1, max=1024),
    Param("align_hidden_units", bool, True, "Permute each expert's hidden units to match the "
          "pivot (weight matching; exactly function preserving). Needed when experts come "
          "from different random inits; a no-op (identity) when they share one."),
    Param("align_precision", str, "auto", "Similarities the hidden-unit matching is solved on: "
          "'auto' = float32, except layers of over ~2048 units on a CPU with fast bfloat16, "
          "where the bf16 similarities are used (~2.4x faster; the same matching except "
          "between near-tied units); 'float32' = always float32 (the same matching on every "
          "machine up to float rounding).", choices=("auto", "float32"), advanced=True),
    Param("sdf", bool, True, "Shared-space Decomposition and Filtering: merge 2-D weights in "
          "the shared subspace of all task vectors plus per-domain residuals. Off: merge "
          "entry-wise."),
    Param("shared_energy", float, 0.9, "Fraction of the task vectors' energy the shared "
          "subspace must hold (chooses its rank r per layer).", min=0.05, max=1.0),
    Param("max_rank", int, 256, "Upper bound on the shared rank r per layer (0 = no cap; "
          "large layers then cost more).", min=0, max=65536, advanced=True),
    Param("filter_conflicts", bool, False, "Elect a sign per shared coordinate by total mass, "
          "drop the entries that disagree and average the rest (disjoint mean). Off: plain "
          "(weighted) mean of the coordinates. Off by default: on the demo world's validation "
          "split filtering lowered token accuracy in both scenarios (see PIVOTMERGE notes)."),
    Param("trim_density", float, 1.0, "Keep only this fraction of each expert's "
          "largest-magnitude coordinates before sign election (1.0 = no trim).",
          min=0.01, max=1.0, advanced=True),
    Param("residuals", bool, True, "Keep each domain's complementary knowledge outside the "
          "shared subspace (top residual directions)."),
    Param("residual_rank", int, 16, "Residual directions kept per expert and layer.",
          min=1, max=4096, advanced=True),
    Param("residual_weight", float, 1.0, "Weight of the merged residuals.", min=0.0, max=4.0),
    Param("alm", str, "auto", "Alignment-guided Layer-wise Merging: 'data' refits every "
          "linear layer in forward order by ridge least squares so the merged projector "
          "reproduces each expert's layer outputs on that expert's own calibration features "
          "(inputs propagated through the merged earlier layers), pulled towards the "
          "data-free merge; 'data-lambda' fits only one coefficient per layer on the "
          "calibration features; 'data-free' rescales each layer to restore the update "
          "magnitude lost to cancellation; 'auto' = data when calibration is given else "
          "data-free; 'off' = every coefficient is 1.",
          choices=ALM_CHOICES),
    Param("alm_ridge", float, ALM_RIDGE_DEFAULT, "Data-driven ALM: strength of the pull "
          "towards the data-free merge, relative to one average calibration token's energy "
          "(mu = alm_ridge * trace(Gram) / tokens; 0 = plain least squares, large = the "
          "data-free merge). "
          "Default chosen on the demo world's validation split.", min=0.0, max=1e12,
          advanced=True, search=(0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)),
    Param("alm_uncovered_weight", float, ALM_UNCOVERED_WEIGHT_DEFAULT, "Data-driven ALM: weight of an "
          "expert whose domain has no calibration features, relative to a covered domain's. It "
          "is fitted on the other domains' features pooled, with its own outputs as targets, so "
          "it competes with them on those inputs: larger keeps its domain, smaller keeps more "
          "of the covered domains' gain. Default chosen on the demo world's validation split "
          "(benchmarks/missing_domain.py).", min=0.0, max=100.0, advanced=True),
    Param("alm_tokens", int, ALM_TOKENS_DEFAULT, "Calibration tokens per domain used by "
          "data-driven ALM and by the automatic pivot (evenly spaced subsample).", min=8,
          max=100000, advanced=True),
    Param("scale", float, 1.0, "Global multiplier on every layer coefficient.", min=0.0,
          max=4.0, is_scale=True),
)


@dataclass(frozen=True)
class Settings:
    """One field per entry of :data:`PARAMS` (same names, same meaning)."""

    pivot: int
    align_hidden_units: bool
    align_precision: str
    sdf: bool
    shared_energy: float
    max_rank: int
    filter_conflicts: bool
    trim_density: float
    residuals: bool
    residual_rank: int
    residual_weight: float
    alm: str
    alm_ridge: float
    alm_uncovered_weight: float
    alm_tokens: int
    scale: float

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> Settings:
        """The job's (validated) parameters over the defaults."""
        values = {p.name: p.default for p in PARAMS}
        values.update(params)
        return cls(**{f.name: values[f.name] for f in fields(cls)})

    def alm_mode(self, has_calibration: bool) -> str:
        """The ALM mode actually run: ``auto`` resolved by whether calibration is given."""
        if self.alm == "auto":
            return "data" if has_calibration else "data-free"
        return self.alm


assert [f.name for f in fields(Settings)] == [p.name for p in PARAMS], "Settings must mirror PARAMS"
