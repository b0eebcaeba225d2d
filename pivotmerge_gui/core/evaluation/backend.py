"""The captioning back-end interface that every alignment metric goes through.

A back end wraps a frozen vision encoder and a frozen language model; the projector under
test is the only thing that changes between calls. The metrics in
:mod:`pivotmerge_gui.core.evaluation.metrics` need just three operations, so the same
evaluation runs on the built-in demo model (``pivotmerge_gui.demo.backend``) and on real
LLaVA models through transformers (a later back end), without the metrics knowing which.

Visual features are computed once per image set (:meth:`CaptionBackend.encode_images`)
and reused for every projector, because comparing many merges on the same data is the
common case (benchmarks, coefficient sweeps, the GUI's compare view).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..progress import CancelToken
from ..projector import Projector


@dataclass
class CaptionSet:
    """Image-caption pairs of one domain.

    ``images`` is whatever the back end's :meth:`~CaptionBackend.encode_images` accepts
    (a tensor for the demo, PIL images for a transformers back end). ``features`` caches
    the encoded images (filled by :func:`~pivotmerge_gui.core.evaluation.metrics.prepare`).
    """

    images: Any
    captions: list[str]
    features: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.captions)


def batches(n: int, size: int, cancel: CancelToken | None = None) -> Iterator[slice]:
    """Slices of ``size`` items covering ``range(n)``; ``cancel`` is checked before each
    (every back end's captioning loop: a cancel stops between batches)."""
    for start in range(0, n, size):
        if cancel is not None:
            cancel.raise_if_cancelled()
        yield slice(start, start + size)


def check_pairs(features: torch.Tensor, captions: Sequence[str]) -> None:
    """``features[i]`` belongs to ``captions[i]``: the counts must agree."""
    if len(features) != len(captions):
        raise ValueError(f"{len(features)} images but {len(captions)} captions")


class CaptionBackend(ABC):
    """Frozen encoder + frozen LM around a swappable projector (Qt-free, no printing)."""

    #: human-readable name shown in reports
    name: str = "backend"

    @abstractmethod
    def encode_images(self, images: Any) -> torch.Tensor:
        """Visual features the projector consumes: ``[N, tokens, in_features]`` (fp32, CPU)."""

    @abstractmethod
    def caption_nll(
        self,
        projector: Projector,
        features: torch.Tensor,
        captions: Sequence[str],
        cancel: CancelToken | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Negative log-likelihood of each caption given its image, teacher forced.

        Returns ``(nll_sum [N], n_tokens [N])``: the summed NLL over the caption's tokens
        (including the end-of-sequence token) and how many tokens that sum covers.
        ``features[i]`` belongs to ``captions[i]``.
        """

    @abstractmethod
    def generate(
        self,
        projector: Projector,
        features: torch.Tensor,
        max_new_tokens: int,
        cancel: CancelToken | None = None,
    ) -> list[str]:
        """Greedy captions (decoded text, without special tokens) for each image."""

    def retrieval_scores(
        self,
        projector: Projector,
        features: torch.Tensor,
        candidates: Sequence[Sequence[str]],
        cancel: CancelToken | None = None,
    ) -> torch.Tensor:
        """Log-likelihood of every candidate caption of every image: ``[N, C]``.

        Default: one :meth:`caption_nll` call over the flattened (image, candidate) pairs;
        the score is the caption's total log-probability (higher is better). Back ends
        with an expensive LM may override this with a batched or cached version.
        """
        n = len(candidates)
        if n == 0:
            return torch.zeros(0, 0)
        c = len(candidates[0])
        if any(len(cs) != c for cs in candidates):
            raise ValueError("every image needs the same number of retrieval candidates")
        rep = features.repeat_interleave(c, dim=0)
        flat = [cap for cs in candidates for cap in cs]
        nll, _ = self.caption_nll(projector, rep, flat, cancel)
        return (-nll).view(n, c)
