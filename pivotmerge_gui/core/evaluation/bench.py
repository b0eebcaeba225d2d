"""The test bench: captions and alignment scores of several projectors on the same pairs.

:func:`run_bench` is a generator (the GUI's worker and ``pivotmerge evaluate`` consume the
same one): it encodes the images once, then for every projector and every chunk of pairs
computes the teacher-forced caption NLL and the greedy caption, and yields a
:class:`~pivotmerge_gui.core.progress.ProgressEvent` whose payload is the chunk's
:class:`PairResult` list, so results fill in as they come. Per-domain metrics follow the
definitions of :mod:`pivotmerge_gui.core.evaluation.metrics` exactly (NLL per token = the
domain's total NLL over its total token count, unweighted mean over domains), so the bench
and :func:`~pivotmerge_gui.core.evaluation.metrics.evaluate` agree on the same data.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..progress import CancelToken, ProgressEvent
from ..projector import Projector
from .backend import CaptionBackend
from .metrics import (
    DomainMetrics,
    EvalResult,
    exact_match,
    mean_metrics,
    normalize_caption,
    retrieval_candidates,
    token_accuracy,
)
from .pairs import Pair, group_by_domain, images_for_backend


@dataclass
class PairResult:
    """One projector on one pair: its greedy caption and its alignment scores."""

    projector: str
    index: int  # index of the pair in the bench's pair list
    domain: str
    reference: str
    caption: str
    nll: float  # per token (teacher forced, end token included); lower is better
    nll_sum: float
    n_tokens: int
    token_accuracy: float
    exact_match: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class TokenUpdate:
    """A caption growing token by token (back ends that stream, e.g. LLaVA)."""

    projector: str
    index: int  # index of the pair in the bench's pair list
    text: str  # the caption so far


@dataclass
class BenchResult:
    """Every projector's per-pair results and per-domain metrics."""

    projectors: list[str]
    pairs: list[Pair]
    results: dict[str, list[PairResult]]
    metrics: dict[str, EvalResult]
    backend: str = ""
    timings_s: dict[str, float] = field(default_factory=dict)
    encode_s: float = 0.0
    elapsed_s: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "backend": self.backend,
            "pairs": [{"index": i, "name": p.name, "domain": p.domain, "reference": p.caption,
                       "image": str(p.path) if p.path is not None else None}
                      for i, p in enumerate(self.pairs)],
            "projectors": [
                {
                    "name": n,
                    "per_domain": {d: m.to_dict() for d, m in self.metrics[n].per_domain.items()},
                    "mean": self.metrics[n].mean.to_dict(),
                    "pairs": [r.to_dict() for r in self.results[n]],
                    "elapsed_s": round(self.timings_s.get(n, 0.0), 4),
                }
                for n in self.projectors
            ],
            "encode_s": round(self.encode_s, 4),
            "elapsed_s": round(self.elapsed_s, 4),
        }


def default_max_new_tokens(backend: CaptionBackend, captions: Sequence[str]) -> int:
    """The metrics' rule (longest reference in words + 2), times the back end's
    ``tokens_per_word`` (1 for the word-level demo; subword tokenizers need more)."""
    words = max((len(normalize_caption(c)) for c in captions), default=0) + 2
    return max(1, round(words * float(getattr(backend, "tokens_per_word", 1.0))))


def encode_pairs(backend: CaptionBackend, pairs: Sequence[Pair], batch: int = 64,
                 cancel: CancelToken | None = None) -> torch.Tensor:
    """Visual features of every pair (``[N, tokens, d]``), encoded once in chunks."""
    feats = []
    for i in range(0, len(pairs), batch):
        if cancel is not None:
            cancel.raise_if_cancelled()
        chunk = [p.image for p in pairs[i:i + batch]]
        feats.append(backend.encode_images(images_for_backend(backend, chunk)))
    if not feats:
        return torch.zeros(0)
    return torch.cat(feats)


def run_bench(
    backend: CaptionBackend,
    projectors: Mapping[str, Projector],
    pairs: Sequence[Pair],
    *,
    features: torch.Tensor | None = None,
    max_new_tokens: int | None = None,
    retrieval: bool = False,
    n_candidates: int = 8,
    seed: int = 0,
    batch: int = 16,
    cancel: CancelToken | None = None,
    on_token: Callable[[TokenUpdate], None] | None = None,
) -> Generator[ProgressEvent, None, BenchResult]:
    """Caption and score every pair with every projector (see the module docstring).

    ``features`` are the pairs' visual features if already encoded. ``max_new_tokens``
    defaults per domain to :func:`default_max_new_tokens`. ``retrieval`` adds the
    same-domain retrieval accuracy (``n_candidates`` NLL passes per image).
    Progress payloads: ``list[PairResult]`` per chunk; the last event ("done") carries the
    :class:`BenchResult`, which is also the generator's return value. ``on_token`` receives a
    :class:`TokenUpdate` per generated token from back ends that stream
    (``streams_tokens = True``); it is called on the thread running the generator.
    """
    cancel = cancel or CancelToken()
    t_start = time.perf_counter()
    pairs = list(pairs)
    names = list(projectors)
    if not pairs:
        raise ValueError("the bench needs at least one image-caption pair")
    if not names:
        raise ValueError("the bench needs at least one projector")
    yield ProgressEvent("encode", 0.0, f"encoding {len(pairs)} images with {backend.name}")
    t0 = time.perf_counter()
    feats = features if features is not None else encode_pairs(backend, pairs, cancel=cancel)
    encode_s = time.perf_counter() - t0
    if len(feats) != len(pairs):
        raise ValueError(f"{len(feats)} feature rows for {len(pairs)} pairs")
    groups = group_by_domain(pairs)
    chunks = [(dom, idx[i:i + batch]) for dom, idx in groups.items() for i in range(0, len(idx), batch)]
    limits = {dom: max_new_tokens or default_max_new_tokens(backend, [pairs[i].caption for i in idx])
              for dom, idx in groups.items()}
    steps = len(names) * (len(chunks) + (len(groups) if retrieval else 0))
    done = 0
    results: dict[str, list[PairResult]] = {}
    metrics: dict[str, EvalResult] = {}
    timings: dict[str, float] = {}
    for name in names:
        proj = projectors[name]
        t_proj = time.perf_counter()
        rows: list[PairResult | None] = [None] * len(pairs)
        for dom, idx in chunks:
            cancel.raise_if_cancelled()
            sel = torch.tensor(idx, dtype=torch.long)
            refs = [pairs[i].caption for i in idx]
            nll, count = backend.caption_nll(proj, feats[sel], refs, cancel)
            if on_token is not None and getattr(backend, "streams_tokens", False):
                def stream(i: int, text: str, name: str = name, idx: list[int] = idx) -> None:
                    on_token(TokenUpdate(name, idx[i], text))

                gen = backend.generate(proj, feats[sel], limits[dom], cancel, on_token=stream)  # type: ignore[call-arg]
            else:
                gen = backend.generate(proj, feats[sel], limits[dom], cancel)
            chunk_rows = []
            for j, i in enumerate(idx):
                n_tok = int(count[j])
                s = float(nll[j])
                r = PairResult(name, i, dom, refs[j], gen[j], s / max(n_tok, 1), s, n_tok,
                               token_accuracy(gen[j], refs[j]), exact_match(gen[j], refs[j]))
                rows[i] = r
                chunk_rows.append(r)
            done += 1
            yield ProgressEvent("caption", done / max(steps, 1),
                                f"{name}: {dom} ({len(idx)} pairs)", chunk_rows)
        per_domain: dict[str, DomainMetrics] = {}
        for dom, idx in groups.items():
            rs = [rows[i] for i in idx]
            assert all(r is not None for r in rs)
            tot = sum(r.nll_sum for r in rs if r is not None)
            cnt = sum(r.n_tokens for r in rs if r is not None)
            m = DomainMetrics(
                nll=tot / max(cnt, 1),
                exact_match=sum(r.exact_match for r in rs if r is not None) / len(rs),
                token_accuracy=sum(r.token_accuracy for r in rs if r is not None) / len(rs),
                n=len(rs),
            )
            if retrieval:
                cancel.raise_if_cancelled()
                caps = [pairs[i].caption for i in idx]
                cands, truth = retrieval_candidates(caps, n_candidates, seed)
                scores = backend.retrieval_scores(proj, feats[torch.tensor(idx)], cands, cancel)
                m.retrieval_accuracy = float((scores.argmax(dim=1) == torch.tensor(truth)).float().mean())
                done += 1
                yield ProgressEvent("retrieval", done / max(steps, 1), f"{name}: {dom} retrieval")
            per_domain[dom] = m
        results[name] = [r for r in rows if r is not None]
        metrics[name] = EvalResult(per_domain, mean_metrics(per_domain),
                                   {d: [rows[i].caption for i in idx[:3] if rows[i] is not None]  # type: ignore[union-attr]
                                    for d, idx in groups.items()})
        timings[name] = time.perf_counter() - t_proj
    result = BenchResult(names, pairs, results, metrics, backend.name, timings, encode_s,
                         time.perf_counter() - t_start)
    yield ProgressEvent("done", 1.0, f"{len(names)} projector(s) on {len(pairs)} pairs in "
                        f"{result.elapsed_s:.1f} s", result)
    return result
