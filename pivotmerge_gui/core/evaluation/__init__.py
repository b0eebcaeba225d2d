"""Alignment evaluation of projectors: back-end interface and metrics.

Qt-free. Back ends implement :class:`CaptionBackend`; the demo one lives in
``pivotmerge_gui.demo.backend`` (core never imports the demo).
"""

from .backend import CaptionBackend, CaptionSet
from .metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    PARTS,
    DomainMetrics,
    EvalResult,
    evaluate,
    exact_match,
    mean_metrics,
    prepare,
    retrieval_candidates,
    token_accuracy,
)

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "PARTS",
    "CaptionBackend",
    "CaptionSet",
    "DomainMetrics",
    "EvalResult",
    "evaluate",
    "exact_match",
    "mean_metrics",
    "prepare",
    "retrieval_candidates",
    "token_accuracy",
]
