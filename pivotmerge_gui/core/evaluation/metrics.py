"""Alignment metrics of a projector on image-caption pairs, per domain and averaged.

Definitions (the same for every back end):

- ``nll``: caption negative log-likelihood per token (teacher forced, end-of-sequence
  token included), total NLL of the domain divided by its total token count. Lower is
  better.
- ``exact_match``: the greedy caption equals the reference (whitespace-normalised).
- ``token_accuracy``: for each pair, the fraction of reference words (plus one
  end-of-caption marker) that the greedy caption has at the same position; averaged over
  pairs. The end marker rewards stopping at the right place; extra words after it do not
  count against other words but do cost that marker.
- ``retrieval_accuracy``: image-to-text retrieval among candidate captions *of the same
  domain* (the true caption plus ``n_candidates - 1`` other distinct captions of that
  domain, drawn deterministically): the fraction of images whose true caption has the
  highest total log-likelihood.

The mean over domains is unweighted (each domain counts once, whatever its size), which is
what "keeps every expert's alignment" means.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch

from ..progress import CancelToken
from ..projector import Projector
from .backend import CaptionBackend, CaptionSet

METRICS: tuple[str, ...] = ("nll", "exact_match", "token_accuracy", "retrieval_accuracy")
#: metric families that can be switched on or off in :func:`evaluate` (cost differs)
PARTS: tuple[str, ...] = ("nll", "generate", "retrieval")
HIGHER_IS_BETTER = {"nll": False, "exact_match": True, "token_accuracy": True, "retrieval_accuracy": True}


@dataclass
class DomainMetrics:
    """Metrics of one domain (``None`` where that metric was not computed)."""

    nll: float | None = None
    exact_match: float | None = None
    token_accuracy: float | None = None
    retrieval_accuracy: float | None = None
    n: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalResult:
    """Per-domain metrics and their unweighted mean over domains."""

    per_domain: dict[str, DomainMetrics]
    mean: DomainMetrics
    samples: dict[str, list[str]] = field(default_factory=dict)  # a few greedy captions per domain

    def score(self, metric: str = "token_accuracy", domain: str | None = None) -> float:
        """One number: ``metric`` of ``domain`` (or the mean over domains)."""
        if metric not in METRICS:
            raise KeyError(f"unknown metric '{metric}'; known: {', '.join(METRICS)}")
        m = self.mean if domain is None else self.per_domain[domain]
        value = getattr(m, metric)
        if value is None:
            raise KeyError(f"metric '{metric}' was not computed in this evaluation")
        return float(value)

    def to_dict(self) -> dict[str, Any]:
        return {
            "per_domain": {d: m.to_dict() for d, m in self.per_domain.items()},
            "mean": self.mean.to_dict(),
            "samples": {d: list(s) for d, s in self.samples.items()},
        }


# ---------------------------------------------------------------------- pure metrics
def normalize_caption(text: str) -> list[str]:
    return text.split()


def token_accuracy(generated: str, reference: str) -> float:
    """Fraction of reference words (+ end marker) matched position by position."""
    gen = normalize_caption(generated) + ["</s>"]
    ref = normalize_caption(reference) + ["</s>"]
    hits = sum(1 for g, r in zip(gen, ref) if g == r)
    return hits / len(ref)


def exact_match(generated: str, reference: str) -> bool:
    return normalize_caption(generated) == normalize_caption(reference)


def retrieval_candidates(captions: Sequence[str], n_candidates: int = 8, seed: int = 0
                         ) -> tuple[list[list[str]], list[int]]:
    """For each caption: ``n_candidates`` distinct captions of the same set, the true one
    included at a deterministic position. Returns (candidates per image, true index).

    When the set has fewer distinct captions than ``n_candidates``, every image gets all
    of them (so the chance level is ``1 / min(n_candidates, distinct)``).
    """
    pool = sorted(set(captions))
    c = max(1, min(n_candidates, len(pool)))
    digest = hashlib.sha256(("\n".join(captions) + f"|{seed}|{c}").encode()).digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & ((1 << 63) - 1))
    cands: list[list[str]] = []
    truth: list[int] = []
    index = {cap: i for i, cap in enumerate(pool)}
    for cap in captions:
        others = [i for i in torch.randperm(len(pool), generator=g).tolist() if i != index[cap]][: c - 1]
        pos = int(torch.randint(0, c, (1,), generator=g))
        chosen = [pool[i] for i in others]
        chosen.insert(pos, cap)
        cands.append(chosen)
        truth.append(pos)
    return cands, truth


def _mean(values: Iterable[float | None]) -> float | None:
    vals = [v for v in values]
    if not vals or any(v is None for v in vals):
        return None
    return float(sum(v for v in vals if v is not None) / len(vals))


def mean_metrics(per_domain: Mapping[str, DomainMetrics]) -> DomainMetrics:
    """Unweighted mean over domains (a metric missing in any domain stays ``None``)."""
    out = DomainMetrics(n=sum(m.n for m in per_domain.values()))
    for f in fields(DomainMetrics):
        if f.name != "n":
            setattr(out, f.name, _mean(getattr(m, f.name) for m in per_domain.values()))
    return out


# ---------------------------------------------------------------------- evaluation
def prepare(backend: CaptionBackend, sets: Mapping[str, CaptionSet]) -> dict[str, CaptionSet]:
    """Encode every set's images once (features are reused by every :func:`evaluate`)."""
    out = {}
    for dom, s in sets.items():
        feats = s.features if s.features is not None else backend.encode_images(s.images)
        if len(feats) != len(s.captions):
            raise ValueError(f"domain '{dom}': {len(feats)} images but {len(s.captions)} captions")
        out[dom] = CaptionSet(s.images, list(s.captions), feats)
    return out


def evaluate(
    backend: CaptionBackend,
    projector: Projector,
    sets: Mapping[str, CaptionSet],
    *,
    parts: Sequence[str] = PARTS,
    max_new_tokens: int | None = None,
    n_candidates: int = 8,
    seed: int = 0,
    n_samples: int = 3,
    cancel: CancelToken | None = None,
) -> EvalResult:
    """All metrics of ``projector`` on every domain of ``sets`` and their mean.

    ``parts`` selects what to compute (``nll``, ``generate``: exact match and token
    accuracy, ``retrieval``); metrics not computed are ``None``. ``max_new_tokens``
    defaults to the longest reference caption + 2 words.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"unknown evaluation part(s) {unknown}; known: {', '.join(PARTS)}")
    cancel = cancel or CancelToken()
    sets = prepare(backend, sets)
    per_domain: dict[str, DomainMetrics] = {}
    samples: dict[str, list[str]] = {}
    for dom, s in sets.items():
        cancel.raise_if_cancelled()
        assert s.features is not None
        m = DomainMetrics(n=len(s))
        if len(s) == 0:
            per_domain[dom] = m
            continue
        if "nll" in parts:
            nll, count = backend.caption_nll(projector, s.features, s.captions, cancel)
            m.nll = float(nll.sum() / count.sum().clamp_min(1))
        if "generate" in parts:
            limit = max_new_tokens or (max(len(normalize_caption(c)) for c in s.captions) + 2)
            gen = backend.generate(projector, s.features, limit, cancel)
            m.exact_match = sum(exact_match(g, r) for g, r in zip(gen, s.captions)) / len(s)
            m.token_accuracy = sum(token_accuracy(g, r) for g, r in zip(gen, s.captions)) / len(s)
            samples[dom] = gen[:n_samples]
        if "retrieval" in parts:
            cands, truth = retrieval_candidates(s.captions, n_candidates, seed)
            scores = backend.retrieval_scores(projector, s.features, cands, cancel)
            best = scores.argmax(dim=1)
            m.retrieval_accuracy = float((best == torch.tensor(truth)).float().mean())
        if m.nll is not None and not math.isfinite(m.nll):
            m.nll = float("inf")
        per_domain[dom] = m
    return EvalResult(per_domain, mean_metrics(per_domain), samples)
