"""Analysis of a set of expert projectors for the GUI's Layers/Spectra/Similarity views and
``pivotmerge analyze``: pure functions returning dataclasses and numpy arrays.

Per layer: spectra with effective and stable rank (experts, base, merged, task vectors),
norms, pairwise cosine similarity of weights and task vectors, the sign-conflict rate,
and the shared rank / shared energy / per-expert alignment score exactly as PivotMerge
would choose them (:func:`..linalg.shared_subspace`); ``COLUMN_HELP`` defines each column.
Why: these are the quantities that say whether, and where, experts can be merged. Experts
from different inits are first aligned to a pivot so element-wise similarities mean
something; without a base, task vectors are measured from the experts' mean (they then
sum to zero and conflict by construction, and the result says so).
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..alignment import align_to_pivot
from ..linalg import lapack_threads, product_dtype, range_finder, shared_subspace
from ..progress import CancelToken, ProgressEvent, drain
from ..projector import Projector, check_compatible

FULL_SPECTRUM_LIMIT = 1024
TOP_SINGULAR_VALUES = 256
POWER_ITERS = 4

__all__ = [
    "COLUMN_HELP",
    "Analysis",
    "LayerAnalysis",
    "Spectrum",
    "analyze",
    "effective_rank",
    "iter_analysis",
    "singular_values",
    "stable_rank",
]


# ============================================================================ spectra
@dataclass
class Spectrum:
    """Singular values (descending) of one matrix.

    ``complete`` is False when only the top values were computed; then ``total_energy``
    (= ||W||_F^2, exact) still allows exact stable rank and an estimated effective rank."""

    values: np.ndarray
    total_energy: float
    dim: int  # min(m, n): how many singular values exist
    complete: bool

    @property
    def stable_rank(self) -> float:
        smax = float(self.values[0]) if self.values.size else 0.0
        return self.total_energy / (smax * smax) if smax > 0 else 0.0

    @property
    def effective_rank(self) -> float:
        return effective_rank(self.values, total_energy=None if self.complete else self.total_energy,
                              dim=self.dim)


def effective_rank(
    singular_values: np.ndarray | Sequence[float], *, total_energy: float | None = None, dim: int | None = None
) -> float:
    """Roy & Vetterli's effective rank exp(-sum p_i log p_i), p_i = sigma_i / sum_j sigma_j.

    With ``total_energy`` (sum of all sigma^2) and ``dim`` for a truncated spectrum, the
    missing ``dim - len(values)`` values are taken equal, holding the remaining energy."""
    s = np.asarray(singular_values, dtype=np.float64)
    s = s[s > 0]
    if total_energy is not None and dim is not None and dim > s.size:
        rest = max(total_energy - float((s**2).sum()), 0.0)
        n_rest = dim - s.size
        if rest > 0:
            s = np.concatenate([s, np.full(n_rest, math.sqrt(rest / n_rest))])
    if s.size == 0:
        return 0.0
    p = s / s.sum()
    return float(np.exp(-(p * np.log(p)).sum()))


def stable_rank(w: torch.Tensor) -> float:
    """||W||_F^2 / sigma_max^2 (exact; sigma_max from the full spectrum)."""
    return singular_values(w, top=None).stable_rank


def singular_values(w: torch.Tensor, top: int | None = TOP_SINGULAR_VALUES) -> Spectrum:
    """Singular values of a 2-D tensor without a full SVD.

    Exact (eigenvalues of the fp64 Gram of the smaller side) when that side is at most
    ``FULL_SPECTRUM_LIMIT`` or ``top`` is None; else the top ``top`` values by randomized
    subspace iteration (``top/4`` oversampling, 4 power iterations; bf16 products where they
    are fast, fp32 QR and projection), much cheaper than a full ``eigvalsh`` of a wide Gram;
    accurate on decaying spectra (task vectors), a little low on flat ones. A truncated
    spectrum is flagged (``complete=False``) and its effective rank estimated by spreading
    the exactly known remaining energy evenly over the missing values."""
    a = w.detach().float()
    m, n = a.shape
    d = min(m, n)
    total = float(torch.linalg.vector_norm(a, dtype=torch.float64)) ** 2
    if top is None or d <= FULL_SPECTRUM_LIMIT or top >= d:
        # Gram of the smaller side: fp64 for small matrices; fp32 products for big ones (an
        # fp64 4096x1024 Gram costs ~1 s here; fp32 only blurs values below ~1e-4 sigma_max)
        big_product = m * n * d >= 2**30
        g = (a.t() @ a if n <= m else a @ a.t()) if big_product else None
        if g is None:
            a64 = a.double()
            g = a64.t() @ a64 if n <= m else a64 @ a64.t()
        with lapack_threads(d > 2048 or a.device.type != "cpu"):
            ev = torch.linalg.eigvalsh(g.double()).flip(0).clamp(min=0.0).sqrt()
        return Spectrum(ev.cpu().numpy(), total, d, True)
    p = min(top + max(16, top // 4), d)
    q = range_finder(a, p, POWER_ITERS, product_dtype(a.device, m * n * p >= 2**28))
    b = q.t() @ a  # fp32 projection: values exact up to the subspace
    with lapack_threads(a.device.type != "cpu"):
        s = torch.linalg.svdvals(b)[:top]
    return Spectrum(s.double().cpu().numpy(), total, d, False)


# ============================================================================ results
COLUMN_HELP: dict[str, str] = {
    "layer": "Layer name (as in the checkpoint's canonical layout).",
    "tensor": "The 2-D weight the spectral columns refer to.",
    "shape": "Weight shape (out x in).",
    "norm": "Mean Frobenius norm of the experts' weights.",
    "effective_rank": "Mean effective rank of the experts' weights (Roy & Vetterli entropy rank).",
    "stable_rank": "Mean stable rank ||W||_F^2 / sigma_max^2 of the experts' weights.",
    "task_norm": "Mean Frobenius norm of the task vectors (expert - reference).",
    "cos_weights": "Mean pairwise cosine similarity of the experts' weights.",
    "cos_tasks": "Mean pairwise cosine similarity of the task vectors.",
    "sign_conflict": "Share of coordinates where two experts' task vectors have opposite signs.",
    "shared_rank": "Rank r of the shared subspace PivotMerge would use for this layer.",
    "shared_energy": "Share of the task vectors' energy inside the shared subspace.",
    "alignment_min": "Lowest per-expert alignment score (share of an expert's update energy in "
                     "the shared subspace).",
    "merged_effective_rank": "Effective rank of the merged projector's weight.",
    "merged_stable_rank": "Stable rank of the merged projector's weight.",
}


@dataclass
class LayerAnalysis:
    """Everything measured for one layer. Per-expert arrays follow ``Analysis.names``."""

    layer: str
    tensor: str | None  # the 2-D weight, None for layers without one (norms, vectors)
    shape: tuple[int, ...]
    norms: np.ndarray  # [K] Frobenius norm of each expert's layer tensors
    task_norms: np.ndarray  # [K]
    cosine_weights: np.ndarray  # [K(+1), K(+1)] (+ merged when given)
    cosine_tasks: np.ndarray  # [K(+1), K(+1)]
    sign_conflict: float
    spectra: dict[str, Spectrum] = field(default_factory=dict)  # curve name -> spectrum
    task_spectra: dict[str, Spectrum] = field(default_factory=dict)
    effective_ranks: np.ndarray | None = None  # [K]
    stable_ranks: np.ndarray | None = None  # [K]
    shared_rank: int | None = None
    shared_energy: float | None = None
    alignment_scores: np.ndarray | None = None  # [K]
    merged_effective_rank: float | None = None
    merged_stable_rank: float | None = None

    def row(self, names: Sequence[str]) -> dict[str, Any]:
        k = len(names)

        def offdiag_mean(m: np.ndarray) -> float:
            sub = m[:k, :k]
            if k < 2:
                return float("nan")
            return float((sub.sum() - np.trace(sub)) / (k * (k - 1)))

        r: dict[str, Any] = {
            "layer": self.layer,
            "tensor": self.tensor or "",
            "shape": "x".join(str(s) for s in self.shape),
            "norm": float(self.norms.mean()),
            "effective_rank": float(self.effective_ranks.mean()) if self.effective_ranks is not None else None,
            "stable_rank": float(self.stable_ranks.mean()) if self.stable_ranks is not None else None,
            "task_norm": float(self.task_norms.mean()),
            "cos_weights": offdiag_mean(self.cosine_weights),
            "cos_tasks": offdiag_mean(self.cosine_tasks),
            "sign_conflict": self.sign_conflict,
            "shared_rank": self.shared_rank,
            "shared_energy": self.shared_energy,
            "alignment_min": float(self.alignment_scores.min()) if self.alignment_scores is not None else None,
        }
        if self.alignment_scores is not None:
            for n, s in zip(names, self.alignment_scores):
                r[f"alignment[{n}]"] = float(s)
        if self.merged_effective_rank is not None:
            r["merged_effective_rank"] = self.merged_effective_rank
            r["merged_stable_rank"] = self.merged_stable_rank
        return r

    def to_dict(self, names: Sequence[str]) -> dict[str, Any]:
        def spec(s: Spectrum) -> dict[str, Any]:
            return {"values": [float(v) for v in s.values], "complete": s.complete,
                    "total_energy": s.total_energy, "dim": s.dim,
                    "effective_rank": s.effective_rank, "stable_rank": s.stable_rank}

        return {
            **self.row(names),
            "shape": list(self.shape),
            "norms": self.norms.tolist(),
            "task_norms": self.task_norms.tolist(),
            "cosine_weights": self.cosine_weights.tolist(),
            "cosine_tasks": self.cosine_tasks.tolist(),
            "effective_ranks": self.effective_ranks.tolist() if self.effective_ranks is not None else None,
            "stable_ranks": self.stable_ranks.tolist() if self.stable_ranks is not None else None,
            "alignment_scores": self.alignment_scores.tolist() if self.alignment_scores is not None else None,
            "spectra": {k: spec(v) for k, v in self.spectra.items()},
            "task_spectra": {k: spec(v) for k, v in self.task_spectra.items()},
        }


@dataclass
class Analysis:
    """The analysis of K experts (plus optional base and merged projector)."""

    names: list[str]
    layers: list[LayerAnalysis]
    reference: str  # "base" | "mean of experts"
    aligned: bool
    pivot: int
    alignment: list[dict[str, Any]]  # per expert: is_identity, fraction_moved
    shared_energy_target: float
    has_merged: bool
    notes: list[str]
    elapsed_s: float

    @property
    def similarity_names(self) -> list[str]:
        return self.names + (["merged"] if self.has_merged else [])

    def layer_table(self) -> list[dict[str, Any]]:
        """One row per layer with the per-layer columns (see ``COLUMN_HELP``)."""
        return [l.row(self.names) for l in self.layers]

    @staticmethod
    def column_help() -> dict[str, str]:
        return dict(COLUMN_HELP)

    def summary(self) -> str:
        parts = [f"{len(self.names)} experts", f"task vectors relative to the {self.reference}"]
        if self.aligned:
            moved = [a["expert"] for a in self.alignment if not a["is_identity"]]
            parts.append("hidden units aligned to " + self.names[self.pivot] +
                         (f" ({', '.join(moved)} permuted)" if moved else " (all already aligned)"))
        return "; ".join(parts)

    def spectra(self, task_vectors: bool = False) -> dict[str, dict[str, np.ndarray]]:
        """layer -> curve name -> singular values (descending)."""
        out = {}
        for l in self.layers:
            src = l.task_spectra if task_vectors else l.spectra
            if src:
                out[l.layer] = {k: v.values for k, v in src.items()}
        return out

    def shared_ranks(self) -> dict[str, int]:
        return {l.layer: int(l.shared_rank) for l in self.layers if l.shared_rank is not None}

    def similarity(self) -> dict[str, dict[str, np.ndarray]]:
        """layer -> {"weights": KxK cosine, "task_vectors": KxK cosine}."""
        return {l.layer: {"weights": l.cosine_weights, "task_vectors": l.cosine_tasks} for l in self.layers}

    def to_dict(self) -> dict[str, Any]:
        return {
            "names": list(self.names),
            "similarity_names": self.similarity_names,
            "reference": self.reference,
            "aligned": self.aligned,
            "pivot": self.pivot,
            "alignment": self.alignment,
            "shared_energy_target": self.shared_energy_target,
            "has_merged": self.has_merged,
            "notes": list(self.notes),
            "summary": self.summary(),
            "elapsed_s": round(self.elapsed_s, 4),
            "columns": self.column_help(),
            "layers": [l.to_dict(self.names) for l in self.layers],
        }


# ============================================================================ compute
def _cosine_matrix(flat: torch.Tensor) -> np.ndarray:
    """Pairwise cosine similarity of the rows of ``flat`` [K, D] (fp64 accumulation)."""
    g = (flat.double() @ flat.double().t()).cpu()
    d = g.diag().clamp(min=0).sqrt()
    denom = d[:, None] * d[None, :]
    cos = torch.where(denom > 0, g / denom.clamp(min=1e-300), torch.zeros_like(g))
    return cos.numpy()


def _sign_conflict(taus: torch.Tensor) -> float:
    """Share of coordinates with both a positive and a negative entry across experts."""
    if taus.shape[0] < 2:
        return 0.0
    pos = (taus > 0).any(0)
    neg = (taus < 0).any(0)
    return float((pos & neg).float().mean())


def iter_analysis(
    experts: list[Projector],
    *,
    base: Projector | None = None,
    names: list[str] | None = None,
    merged: Projector | None = None,
    shared_energy: float = 0.9,
    max_rank: int = 256,
    align: bool = True,
    pivot: int = 0,
    cancel: CancelToken | None = None,
) -> Generator[ProgressEvent, None, Analysis]:
    """Analyse ``experts`` layer by layer, yielding progress; returns an :class:`Analysis`.

    ``align``: permute hidden units of every expert (and of ``merged``) to ``experts[pivot]``
    first (a no-op for experts that share an init). ``shared_energy``/``max_rank``: as in
    PivotMerge, to show the rank it would choose."""
    t0 = time.perf_counter()
    cancel = cancel or CancelToken()
    if not experts:
        raise ValueError("analysis needs at least one expert")
    if names is None:
        names = [e.source or f"expert {i}" for i, e in enumerate(experts)]
        if len(set(names)) != len(names):  # per-expert columns need unique names
            names = [f"{n} #{i}" for i, n in enumerate(names)]
    names = list(names)
    if len(names) != len(experts):
        raise ValueError(f"{len(names)} names for {len(experts)} experts")
    others = ([base] if base is not None else []) + ([merged] if merged is not None else [])
    check_compatible(list(experts) + others, names + (["base"] if base is not None else [])
                     + (["merged"] if merged is not None else []))
    if not 0 <= pivot < len(experts):
        raise ValueError(f"pivot {pivot} is out of range for {len(experts)} experts")
    k = len(experts)
    notes: list[str] = []
    alignment: list[dict[str, Any]] = []
    work = [e.to(dtype=torch.float32) for e in experts]
    merged_w = merged.to(dtype=torch.float32) if merged is not None else None
    do_align = align and bool(experts[0].hidden_pairs()) and k > 1
    if do_align:
        cache: dict = {}
        for i in range(k):
            cancel.raise_if_cancelled()
            yield ProgressEvent("align", 0.2 * i / k, f"aligning {names[i]} to {names[pivot]}")
            if i == pivot:
                alignment.append({"expert": names[i], "is_identity": True, "fraction_moved": 0.0})
                continue
            work[i], info = align_to_pivot(work[i], work[pivot], cache=cache)
            alignment.append({"expert": names[i], "is_identity": info.is_identity,
                              "fraction_moved": info.fraction_moved,
                              "similarity_before": info.similarity_before,
                              "similarity_after": info.similarity_after})
        if merged_w is not None:
            merged_w, _ = align_to_pivot(merged_w, work[pivot], cache=cache)
        moved = [a["expert"] for a in alignment if not a["is_identity"]]
        if moved:
            notes.append("hidden units of " + ", ".join(moved) + f" were permuted to match {names[pivot]} "
                         "(different inits): similarities are measured after this alignment")
    if base is not None:
        ref = base.to(dtype=torch.float32)
        reference = "base"
    else:
        ref_state = {key: torch.stack([w.state()[key] for w in work]).mean(0) for key in work[0].state()}
        ref = work[0].with_state(ref_state)
        reference = "mean of experts"
        if k > 1:
            notes.append("no base: task vectors are measured from the experts' mean, so they sum to "
                         "zero; their cosines lean negative and their signs conflict by construction")
    states = [w.state() for w in work]
    ref_s = ref.state()
    m_s = merged_w.state() if merged_w is not None else None
    layers_out: list[LayerAnalysis] = []
    n_layers = len(work[0].layers)
    for li, layer in enumerate(work[0].layers):
        cancel.raise_if_cancelled()
        yield ProgressEvent("analyze", 0.2 + 0.8 * li / n_layers, f"analysing layer {layer.name}")
        keys = [f"{layer.name}.{role}" for role in layer.tensors]
        flat = torch.stack([torch.cat([s[key].flatten() for key in keys]) for s in states])
        rflat = torch.cat([ref_s[key].flatten() for key in keys])
        tflat = flat - rflat
        if m_s is not None:
            mflat = torch.cat([m_s[key].flatten() for key in keys])
            cw = _cosine_matrix(torch.cat([flat, mflat[None]]))
            ct = _cosine_matrix(torch.cat([tflat, (mflat - rflat)[None]]))
        else:
            cw, ct = _cosine_matrix(flat), _cosine_matrix(tflat)
        la = LayerAnalysis(
            layer=layer.name, tensor=None, shape=tuple(layer.weight.shape) if "weight" in layer.tensors else (),
            norms=flat.norm(dim=1).double().cpu().numpy(), task_norms=tflat.norm(dim=1).double().cpu().numpy(),
            cosine_weights=cw, cosine_tasks=ct, sign_conflict=_sign_conflict(tflat),
        )
        del flat, tflat
        wkey = f"{layer.name}.weight"
        if "weight" in layer.tensors and layer.weight.dim() == 2:
            la.tensor = wkey
            for i in range(k):
                cancel.raise_if_cancelled()
                la.spectra[names[i]] = singular_values(states[i][wkey])
            if base is not None:
                la.spectra["base"] = singular_values(ref_s[wkey])
            if m_s is not None:
                sm = singular_values(m_s[wkey])
                la.spectra["merged"] = sm
                la.merged_effective_rank = sm.effective_rank
                la.merged_stable_rank = sm.stable_rank
            la.effective_ranks = np.array([la.spectra[n].effective_rank for n in names])
            la.stable_ranks = np.array([la.spectra[n].stable_rank for n in names])
            taus = torch.stack([s[wkey] - ref_s[wkey] for s in states])
            for i in range(k):
                cancel.raise_if_cancelled()
                if float(taus[i].abs().max()) > 0:
                    la.task_spectra[names[i]] = singular_values(taus[i])
            if m_s is not None:  # the merged projector's own update, on the same reference
                tau_m = m_s[wkey] - ref_s[wkey]
                if float(tau_m.abs().max()) > 0:
                    la.task_spectra["merged"] = singular_values(tau_m)
            yield ProgressEvent("analyze", 0.2 + 0.8 * (li + 0.7) / n_layers,
                                f"shared subspace of layer {layer.name}")
            u, v, info = shared_subspace(taus, shared_energy, max_rank, salt=li)
            if u.shape[1] > 0:
                c = torch.matmul(torch.matmul(u.t(), taus), v)
                per = c.pow(2).flatten(1).sum(1)
                tot = taus.pow(2).flatten(1).sum(1)
                la.alignment_scores = torch.where(tot > 0, per / tot.clamp(min=1e-30),
                                                  torch.ones_like(tot)).double().cpu().numpy()
                la.shared_energy = float(per.sum() / tot.sum())
                la.shared_rank = int(u.shape[1])
            else:  # all task vectors are zero
                la.alignment_scores = np.ones(k)
                la.shared_energy = 1.0
                la.shared_rank = 0
            del taus
        layers_out.append(la)
    yield ProgressEvent("analyze", 1.0, "analysis done")
    return Analysis(
        names=names, layers=layers_out, reference=reference, aligned=do_align, pivot=pivot,
        alignment=alignment, shared_energy_target=shared_energy, has_merged=merged is not None,
        notes=notes, elapsed_s=time.perf_counter() - t0,
    )


def analyze(experts: list[Projector], **kwargs: Any) -> Analysis:
    """Blocking :func:`iter_analysis`."""
    return drain(iter_analysis(experts, **kwargs))
