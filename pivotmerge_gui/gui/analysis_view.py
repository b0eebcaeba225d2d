"""Plain-data view of the core's ``Analysis`` for the inspect panels.

The panels never touch tensors: this module turns an ``Analysis`` (computed on a worker
thread by ``core.analysis.iter_analysis``) into lists of dicts and numpy arrays once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class AnalysisView:
    layer_rows: list[dict[str, Any]]
    column_help: dict[str, str] = field(default_factory=dict)
    summary: str = ""
    spectra: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # layer -> curve -> σ
    spectra_of_task_vectors: bool = False
    shared_rank: dict[str, int] = field(default_factory=dict)
    similarity: dict[str, dict[str, np.ndarray]] = field(default_factory=dict)  # layer -> kind -> K×K
    similarity_kinds: list[str] = field(default_factory=list)
    similarity_names: list[str] = field(default_factory=list)


def view_of(analysis: Any) -> AnalysisView:
    if isinstance(analysis, AnalysisView):
        return analysis
    raise TypeError(f"cannot show analysis of type {type(analysis).__name__}")
