"""PivotMerge: post-alignment merging of multimodal projectors (this project's reading).

Only the abstract of "PivotMerge: Bridging Heterogeneous Multimodal Pre-training via
Post-Alignment Model Merging" (arXiv 2604.22823) is public. It names two problems
(cross-domain parameter interference; uneven layer-wise alignment contribution) and two
components; everything concrete here is the project's documented reading, specified with
its rationale and measurements in ``docs/PIVOTMERGE.md``. Every stage is a toggle:

1. :mod:`.pivot` - pick a pivot expert and align every expert's hidden units to it;
   task vectors are measured from the shared init, else from the aligned experts' mean.
2. :mod:`.sdf` - Shared-space Decomposition and Filtering: shared-subspace coordinates
   (optionally sign-filtered) plus per-domain residuals, per 2-D weight.
3. :mod:`.alm` - Alignment-guided Layer-wise Merging: one coefficient or refit per layer,
   data-free or fitted on calibration features.

:mod:`.settings` holds the parameters, :mod:`.report` the typed report, :mod:`.method`
the registered method. With every stage off the method is the weight average.
"""

from ...linalg import shared_subspace
from .method import PivotMerge
from .sdf import TaskStack, elect_and_merge, overlap_normalised_sum

__all__ = ["PivotMerge", "TaskStack", "elect_and_merge", "overlap_normalised_sum", "shared_subspace"]
