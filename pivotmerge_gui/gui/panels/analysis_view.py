"""Plain-data view of the core's ``Analysis`` for the inspect panels.

The panels never touch tensors: this module reads an ``Analysis`` (computed on a worker
thread by ``core.analysis.iter_analysis``) into lists of dicts and numpy arrays once, on the
GUI thread (attribute reads only, no computation beyond picking fields).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

SOURCES = ("weights", "task vectors")
SIMILARITY_KINDS = {"weights": "weights", "task_vectors": "task vectors"}


@dataclass(frozen=True)
class Curve:
    """One singular-value curve: the top values and the exact total energy ||W||_F^2."""

    values: np.ndarray
    total_energy: float
    complete: bool


@dataclass
class AnalysisView:
    layer_rows: list[dict[str, Any]]
    column_help: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    # source ("weights" | "task vectors") -> layer -> curve name -> Curve
    spectra: dict[str, dict[str, dict[str, Curve]]] = field(default_factory=dict)
    shared_rank: dict[str, int] = field(default_factory=dict)
    # layer -> kind ("weights" | "task vectors") -> K×K cosine matrix
    similarity: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)
    similarity_kinds: list[str] = field(default_factory=list)
    similarity_names: list[str] = field(default_factory=list)
    has_merged: bool = False

    @property
    def spectrum_layers(self) -> list[str]:
        seen: list[str] = []
        for per_layer in self.spectra.values():
            seen += [l for l in per_layer if l not in seen]
        return seen


def view_of(analysis: Any) -> AnalysisView:
    """Read a core ``Analysis`` into an :class:`AnalysisView`."""
    if isinstance(analysis, AnalysisView):
        return analysis
    spectra: dict[str, dict[str, dict[str, Curve]]] = {s: {} for s in SOURCES}
    for layer in analysis.layers:
        for source, src in (("weights", layer.spectra), ("task vectors", layer.task_spectra)):
            if src:
                spectra[source][layer.layer] = {
                    name: Curve(np.asarray(s.values, dtype=np.float64), float(s.total_energy), bool(s.complete))
                    for name, s in src.items()
                }
    similarity = {layer: {SIMILARITY_KINDS.get(k, k): np.asarray(m, dtype=np.float64) for k, m in kinds.items()}
                  for layer, kinds in analysis.similarity().items()}
    summary = analysis.summary()
    if analysis.notes:
        summary += ". " + " ".join(analysis.notes)
    return AnalysisView(
        layer_rows=analysis.layer_table(),
        column_help=analysis.column_help(),
        summary=summary,
        spectra={s: v for s, v in spectra.items() if v},
        shared_rank=analysis.shared_ranks(),
        similarity=similarity,
        similarity_kinds=list(dict.fromkeys(k for kinds in similarity.values() for k in kinds)),
        similarity_names=list(analysis.similarity_names),
        has_merged=bool(analysis.has_merged),
    )


DATA_HELP = ("from the test bench (data-driven): NLL per token on the expert's own domain with "
             "this layer reset to the reference, minus the expert's NLL; large = the layer carries "
             "the expert's alignment, ~0 = its update could be dropped, < 0 = it hurts")


def with_layer_scores(rows: list[dict[str, Any]], help_: dict[str, str],
                      scores: Any) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """Add the test bench's data-driven alignment scores (``LayerAlignmentScores``) to the
    layer table: the mean delta NLL over experts and each expert's share of its gain."""
    if scores is None:
        return rows, help_
    per_layer = scores.per_layer()
    shares = scores.share()
    out = []
    for row in rows:
        row = dict(row)
        layer = row.get("layer")
        if layer in per_layer:
            j = scores.layers.index(layer)
            row["data_delta_nll"] = float(per_layer[layer])
            for i, name in enumerate(scores.experts):
                row[f"data_share[{name}]"] = float(shares[i][j])
        out.append(row)
    help_ = dict(help_)
    help_["data_delta_nll"] = "mean over experts, " + DATA_HELP
    for name in scores.experts:
        help_[f"data_share[{name}]"] = f"{name}: delta / gain (share of the whole update's NLL gain), " + DATA_HELP
    return out, help_
