"""PivotMerge: post-alignment merging of multimodal projectors (this project's reading).

Only the abstract of "PivotMerge: Bridging Heterogeneous Multimodal Pre-training via
Post-Alignment Model Merging" (arXiv 2604.22823) is public. It names two problems
(cross-domain parameter interference; layer-wise alignment contribution disparity) and two
components (Shared-space Decomposition and Filtering, SDF; Alignment-guided Layer-wise
Merging, ALM). Everything concrete below is the project's documented reading
(``shared/design/PIVOTMERGE.md``), every stage a toggle so ablations can be measured:

1. **Pivot** (user choice or automatic) and **hidden-unit alignment** of every expert to
   the pivot (:mod:`..alignment`, exactly function preserving). Reference point: the
   shared init (``base``) when given, else the mean of the pivot-aligned experts.
2. **SDF** per 2-D weight: shared subspace ``U_s``/``V_s`` = top-r eigenvectors of
   ``sum_k tau_k tau_k^T`` and ``sum_k tau_k^T tau_k`` (exact Gram + eigh for small layers,
   randomized subspace iteration for large ones; never a full SVD of the concatenation),
   r = smallest rank holding ``shared_energy`` of the trace (max over the two sides),
   capped by ``max_rank``. Coordinates ``C_k = U_s^T tau_k V_s`` are filtered TIES-style
   (optional magnitude trim, sign election by total mass, drop disagreeing entries,
   disjoint mean). Residuals ``R_k = tau_k - U_s C_k V_s^T`` keep their top
   ``residual_rank`` directions; they are combined by an *overlap-normalised sum*
   ``Q_U^{-1/2} (sum_k P_k) Q_V^{-1/2}`` (``Q_U = sum_k U_k U_k^T`` with eigenvalues below 1
   left alone), so identical residuals are averaged and mutually orthogonal (complementary)
   ones are summed. 1-D tensors: sign-elected disjoint mean when filtering is on, else the
   weighted mean.
3. **ALM** (Alignment-guided Layer-wise Merging). Data-free: ``theta_l = ref_l + lambda_l *
   tau*_l`` with ``lambda_l = 1 + e_l (rho_l - 1)``, ``rho_l`` = expert-typical update norm /
   merged update norm (clipped to [1, K]: only what cancellation removed is restored) and
   ``e_l`` the layer's shared-energy fraction (energy of the task vectors inside the shared
   subspace; without SDF the energy of the sign-agreeing entries). Without a shared init
   the task vectors are measured from the experts' mean and sum to zero by construction:
   there is no interference to undo, so data-free ALM keeps lambda = 1.

   **Data-driven ALM** (``alm="data"``, and ``"auto"`` when calibration features are given)
   is the project's reading of "alignment-guided layer-wise merging", extended because one
   coefficient per layer measured too weak (demo world, test token accuracy: 0.414 shared
   init / 0.387 different inits, against RegMean's 0.640 / 0.568). It is a progressive,
   closed-form refit of every linear layer, in forward order, on the pivot-aligned experts:

   - inputs ``H_k``: expert k's own-domain calibration features propagated through the
     MERGED earlier layers (as the merged projector will really see them; RegMean uses
     each expert's own earlier layers instead, so errors of earlier merged layers are never
     compensated);
   - targets ``T_k``: expert k's own pre-activation output of layer l on the same features
     propagated through ITS OWN earlier layers; for the last layer this is the expert's
     projector output ``f_k(x)``, so the final solve directly minimises the end-to-end
     objective ``sum_k w_k E_{x in D_k} ||f_merged(x) - f_k(x)||^2`` given the merged
     hidden layer. Hidden-layer targets are meaningful across experts only because every
     expert was first aligned to the pivot (hidden unit i is the same feature in every
     expert): this is what makes the fit work with different inits, where RegMean averages
     unrelated units;
   - per layer ``[W b] = argmin sum_k (w_k / n_k) ||[H_k 1] [W b]^T - T_k||^2
     + mu ||[W b] - [W b]_prior||^2`` with the prior = the data-free (SDF + data-free ALM)
     merge and ``mu = alm_ridge * trace(G) / N``, ``G = sum_k (w_k/n_k) [H_k 1]^T [H_k 1]``
     (weights of mean 1), N = calibration tokens of all domains: the pull towards the prior
     is measured against one average token's energy, so it weighs more when there are few
     tokens per unknown (the classical ridge scaling; a pull relative to ``trace(G)/d``
     instead was measured to over-fit badly with few tokens, see below). Solved by Cholesky
     in fp64 (fp32 above 2048 unknowns), in the dual (token) form when there are fewer
     calibration tokens than inputs: a 1024->4096->4096 projector with 4 x 256 tokens solves
     1024 x 1024 systems. Directions the calibration
     features never excite keep the prior's values; ``alm_ridge -> inf`` is the data-free
     merge. A solve that would raise the residual (numerical failure) keeps the prior.
   - norm layers (LayerNorm/RMSNorm), 1-D vectors outside the forward, and layers with a
     user coefficient keep the data-free merge (the fit of later layers sees them).
   - ``scale`` multiplies the fitted update ``W_fit - ref`` (so it stays linear in the
     update); the report lists per layer the fit residual before/after, mu and the number
     of calibration tokens, plus the end-to-end objective at lambda = 1, at the data-free
     prior and after the fit.

   Measured on the demo world's validation split (3 seeds, mean token accuracy over the
   domains; test in brackets): data-driven ALM 0.744 (0.750) shared init and 0.740 (0.738)
   different inits, vs RegMean 0.633 (0.640) / 0.574 (0.568), the one-coefficient fit
   0.406 (0.414) / 0.379 (0.387) and the data-free merge 0.409 (0.415) / 0.276 (0.275); so
   ``auto`` with calibration means this mode. ``alm_ridge`` (validation, mean of the two
   scenarios) at 256 tokens per domain is flat from 0.03 to 0.3 (0.742-0.742) and falls
   above (1: 0.736, 3: 0.715); with few tokens (8 / 16 per domain: 32 / 64 tokens for 49-65
   unknowns per output, the regime of a 4096-wide layer fitted on a few hundred tokens)
   0.3 is best or within 0.003 of it (8: 0.600 vs 0.583 at 0.1; 16: 0.629 vs 0.632 at
   0.1), so 0.3 is the default (the former ``trace(G)/d`` scaling, at its best values for
   256 tokens, fell to 0.38-0.53 there). 1024 instead of 256 tokens per domain gained
   +0.006 on validation (former scaling), within the seed spread, at 4x the cost:
   ``alm_tokens`` stays 256. Refitting only the last layer (the first keeps the data-free
   merge) scored 0.750 / 0.728 on validation against 0.744 / 0.740 for every layer: no
   better on the mean, so every linear layer is refitted.

   ``alm="data-lambda"`` keeps the former one-coefficient-per-layer fit for ablations:
   Levenberg-Marquardt on the lambdas (forward-mode derivatives, lambdas in [0, 4], every
   accepted step lowers the objective). ``scale`` multiplies every lambda; user
   ``layer_coefficients`` replace a layer's final coefficient.

Defaults were chosen on the demo world's *validation* split (quality benchmark): conflict
filtering is off by default because it lowered token accuracy there in both scenarios
(shared init 0.48 -> 0.41, different inits 0.30 -> 0.27 with the other defaults); the
toggle stays for ablations and other data.

With every stage off (no alignment, no SDF, no filtering, ALM off, scale 1) the method is
the weight average (reference + mean of the task vectors); ``scale`` then gives Task
Arithmetic with the mean task vector.
"""

from __future__ import annotations

import math
import time
from collections.abc import Generator, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from ..alignment import AlignmentInfo, align_to_pivot, identity_info
from ..errors import MethodError, ParameterError
from ..progress import ProgressEvent
from ..projector import Projector, mean_projector
from .base import MergeJob, MergeMethod, MergeOutput, Param, register
from .regmean import solve_normal_equations

EXACT_GRAM_LIMIT = 1024  # Gram + eigh when the larger side is at most this
OVERSAMPLE = 16
POWER_ITERS = 1
LAMBDA_MAX = 4.0  # upper bound of a data-driven layer coefficient (alm="data-lambda")
ALM_RIDGE_DEFAULT = 0.3  # alm="data": ridge towards the data-free merge (validation-chosen)
ALM_TOKENS_DEFAULT = 256
FIT_FP64_LIMIT = 2048  # Gram solves in fp64 up to this size, fp32 (ridge-conditioned) above
_FIXED_SEED = 20260422  # sketches are seed-independent: same inputs -> same merge


# =============================================================================== helpers
def _gen(salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(_FIXED_SEED + salt)


def _randn(shape: Sequence[int], salt: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Gaussian test matrix drawn on the CPU (same numbers on every device)."""
    return torch.randn(*shape, generator=_gen(salt)).to(device=device, dtype=dtype)


def _bf16_fast(device: torch.device) -> bool:
    from ..alignment import _bf16_is_fast

    return _bf16_is_fast(device.type)


def elect_and_merge(
    stack: torch.Tensor, weights: torch.Tensor, *, filter_conflicts: bool, trim_density: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Merge ``stack`` [K, ...] of updates entry-wise.

    ``filter_conflicts``: sign election by total (weighted) mass, entries that disagree are
    dropped, the agreeing ones averaged (weighted disjoint mean). Where the mass is zero up to
    rounding (e.g. updates measured from the experts' own mean sum to zero) the majority
    sign is used instead, and an exact tie drops the entry (no update). Without filtering:
    weighted mean. ``trim_density`` < 1 first keeps only the largest-magnitude fraction of
    each stack[k] (TIES trim).

    Returns (merged, stats) with ``conflict_fraction`` (share of nonzero entries dropped as
    conflicting), ``trimmed_fraction`` and ``agree_energy`` (share of the update energy in
    entries that agree with the elected sign)."""
    k = stack.shape[0]
    w = weights.to(stack.dtype).view(k, *([1] * (stack.dim() - 1)))
    stats: dict[str, float] = {"conflict_fraction": 0.0, "trimmed_fraction": 0.0}
    if trim_density < 1.0:
        from .common import trim_top_k

        before = (stack != 0).sum()
        stack = trim_top_k(stack, trim_density)
        after = (stack != 0).sum()
        stats["trimmed_fraction"] = float(1.0 - after / before.clamp(min=1))
    ws = stack * w
    mass = ws.sum(0)
    scale = ws.abs().sum(0)
    count = (torch.sign(stack) * w).sum(0)
    degenerate = mass.abs() <= 1e-5 * scale
    sign = torch.where(degenerate, torch.sign(count), torch.sign(mass))
    nonzero = stack != 0
    agree = nonzero & (torch.sign(stack) == sign.unsqueeze(0))
    energy = stack.pow(2).sum()
    stats["agree_energy"] = float((stack.pow(2) * agree).sum() / energy) if energy > 0 else 1.0
    n_nonzero = nonzero.sum()
    stats["conflict_fraction"] = (
        float((nonzero & ~agree).sum() / n_nonzero) if n_nonzero > 0 else 0.0
    )
    if not filter_conflicts:
        return ws.sum(0) / w.sum(), stats
    wa = w * agree
    merged = (ws * agree).sum(0) / wa.sum(0).clamp(min=1e-12)
    return merged, stats


@contextmanager
def _lapack_threads(big: bool = False) -> Iterator[None]:
    """Run small CPU LAPACK calls (QR of 4096 x 272, eigh of 272 x 272) on one thread.

    Multi-threaded LAPACK on such thin problems spends its time in thread start-up and
    spin-waits; on a busy 2-core machine a 20 ms QR took 150 ms of CPU and several seconds
    of wall time. The thread count is restored afterwards (process-wide setting; only
    speed, never results, can be affected for other threads meanwhile)."""
    n = torch.get_num_threads()
    if big or n == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def _eigh_desc(g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with _lapack_threads(g.shape[0] > 2048 or g.device.type != "cpu"):
        vals, vecs = torch.linalg.eigh((g + g.transpose(-1, -2)) / 2)
    return vals.flip(0).clamp(min=0.0), vecs.flip(1)


def _orth(y: torch.Tensor) -> torch.Tensor:
    with _lapack_threads(y.device.type != "cpu"):
        return torch.linalg.qr(y.float(), mode="reduced")[0]


def _sketch_side(
    t: torch.Tensor, p: int, salt: int, power_iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-p eigenpairs of A = sum_k tau_k tau_k^T (``t`` = taus [K, m, n], possibly a bf16
    copy or a transposed view) by randomized subspace iteration on M = [tau_1 ... tau_K]
    (Halko et al. 2011). Returns (eigenvalues desc, eigenvectors [m, p]); the big products
    run in ``t``'s dtype, QR and the small eigenproblem in fp32/fp64."""
    k, _m, n = t.shape
    omega = _randn((k, n, p), salt, t.device, t.dtype)
    # explicit (batched) matmuls: einsum would copy the transposed 4096x4096 stacks
    q = _orth(torch.matmul(t, omega).float().sum(0))
    for _ in range(power_iters):
        z = torch.matmul(t.transpose(1, 2), q.to(t.dtype))  # [K, n, p]
        q = _orth(torch.matmul(t, z).float().sum(0))
    b = torch.matmul(q.t().to(t.dtype), t).float()  # [K, p, n]
    h = torch.matmul(b, b.transpose(1, 2)).sum(0)
    vals, w = _eigh_desc(h.double())
    return vals.float(), q @ w.float()


def _rank_for(vals: torch.Tensor, total: float, energy: float) -> int:
    if total <= 0:
        return 0
    cum = torch.cumsum(vals, 0) / total
    hit = (cum >= energy - 1e-9).nonzero()
    return int(hit[0]) + 1 if hit.numel() else int(vals.numel())


def shared_subspace(
    taus: torch.Tensor, energy: float, max_rank: int, *, salt: int = 0, total: float | None = None
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Shared bases of the updates ``taus`` [K, m, n] (fp32).

    U_s: top-r eigenvectors of ``sum tau tau^T``; V_s: of ``sum tau^T tau``; r = the
    smallest rank whose eigenvalues hold ``energy`` of the trace on either side (the larger
    of the two), capped by ``max_rank`` (0 = no cap). Small layers use the exact Gram
    matrices; large ones randomized subspace iteration with ``max_rank + 16`` columns
    (bf16 products where they are fast; the subspace is approximate, everything computed
    from it afterwards is exact). ``taus`` may be a bf16 copy; ``total`` is then the exact
    fp32 energy sum_k ||tau_k||^2."""
    k, m, n = taus.shape
    if total is None:
        total = float(torch.linalg.vector_norm(taus.float())) ** 2
    cap = min(m, n) if max_rank <= 0 else min(max_rank, m, n)
    info: dict[str, Any] = {"method": "exact-gram"}
    if total == 0.0:
        z = taus.new_zeros
        return z(m, 0), z(n, 0), {"method": "zero", "rank": 0, "rank_u": 0, "rank_v": 0,
                                  "energy_u": 1.0, "energy_v": 1.0, "spectrum": []}
    if max(m, n) <= EXACT_GRAM_LIMIT:
        t = taus.float()
        a = torch.matmul(t, t.transpose(1, 2)).sum(0)
        b = torch.matmul(t.transpose(1, 2), t).sum(0)
        va, ua = _eigh_desc(a)
        vb, ub = _eigh_desc(b)
    else:
        big = m * n * k >= 2**22
        mm_dtype = torch.bfloat16 if big and _bf16_fast(taus.device) else torch.float32
        p = min(cap + OVERSAMPLE, min(m, n)) if max_rank > 0 else min(256, min(m, n))
        t = taus.to(mm_dtype)
        while True:
            va, ua = _sketch_side(t, p, salt * 2, POWER_ITERS)
            vb, ub = _sketch_side(t.transpose(1, 2), p, salt * 2 + 1, POWER_ITERS)
            reached = _rank_for(va, total, energy) < p - OVERSAMPLE // 2 or p >= min(m, n)
            if max_rank > 0 or reached:
                break
            p = min(2 * p, min(m, n))
        info = {"method": f"randomized-{str(mm_dtype).replace('torch.', '')}", "sketch": p}
    r_u = min(_rank_for(va, total, energy), cap)
    r_v = min(_rank_for(vb, total, energy), cap)
    r = max(1, max(r_u, r_v))
    r = min(r, cap, ua.shape[1], ub.shape[1])
    info.update(
        rank=r, rank_u=r_u, rank_v=r_v,
        energy_u=float(va[:r].sum() / total), energy_v=float(vb[:r].sum() / total),
        spectrum=[float(v / total) for v in va[: min(64, va.numel())]],
    )
    return ua[:, :r].contiguous(), ub[:, :r].contiguous(), info


class TaskStack:
    """Task vectors ``tau_k = theta_k - ref`` of one 2-D weight without an fp32 stack.

    Big layers (4096x4096, 4 experts: a 268 MB fp32 stack) keep only ``low``, a copy in the
    sketch dtype (bf16 where fast), for the randomized range finder; every exact product
    uses the experts' own fp32 tensors, ``tau_k @ x = theta_k @ x - ref @ x``."""

    def __init__(self, thetas: Sequence[torch.Tensor], ref: torch.Tensor, low_dtype: torch.dtype) -> None:
        self.thetas = [t.float() for t in thetas]
        self.ref = ref.float()
        k = len(self.thetas)
        m, n = self.ref.shape
        self.shape = (k, m, n)
        self.low = torch.empty((k, m, n), dtype=low_dtype, device=self.ref.device)
        norm2 = []
        for i, th in enumerate(self.thetas):
            d = th - self.ref
            norm2.append(float(torch.linalg.vector_norm(d)) ** 2)
            self.low[i].copy_(d)
            del d
        self.norm2 = torch.tensor(norm2, dtype=torch.float64)
        self.total = float(self.norm2.sum())

    def tau(self, i: int) -> torch.Tensor:
        return self.thetas[i] - self.ref

    def mul(self, i: int, x: torch.Tensor) -> torch.Tensor:  # tau_i @ x
        return self.thetas[i] @ x - self.ref @ x

    def tmul(self, i: int, y: torch.Tensor) -> torch.Tensor:  # tau_i^T @ y
        yt = y.t()  # (y^T theta)^T reads theta row-major: ~2x faster than theta^T @ y on CPU
        return (yt @ self.thetas[i] - yt @ self.ref).t()

    def coords(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """C_k = U^T tau_k V for every k, [K, r, r] (fp32)."""
        rv = u.t() @ self.ref @ v
        return torch.stack([(u.t() @ th) @ v - rv for th in self.thetas])


def _residual_lowrank(
    ts: TaskStack, i: int, u: torch.Tensor, c: torch.Tensor, v: torch.Tensor, rank: int, salt: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-``rank`` SVD factors of R = tau_i - U C V^T without forming R (randomized, fp32)."""
    _, m, n = ts.shape
    rank = min(rank, m, n)

    def r_mul(x: torch.Tensor) -> torch.Tensor:  # R @ x
        return ts.mul(i, x) - u @ (c @ (v.t() @ x))

    def rt_mul(y: torch.Tensor) -> torch.Tensor:  # R^T @ y
        return ts.tmul(i, y) - v @ (c.t() @ (u.t() @ y))

    if max(m, n) <= EXACT_GRAM_LIMIT // 2:
        res = ts.tau(i) - u @ c @ v.t()
        with _lapack_threads(res.device.type != "cpu"):
            uu, ss, vh = torch.linalg.svd(res, full_matrices=False)
        return uu[:, :rank], ss[:rank], vh[:rank].t()
    p = min(rank + 8, m, n)
    q = _orth(r_mul(_randn((n, p), salt, ts.ref.device, torch.float32)))
    q = _orth(r_mul(rt_mul(q)))
    bt = rt_mul(q)  # [n, p] = (Q^T R)^T
    with _lapack_threads(bt.device.type != "cpu"):
        ub, s, vh = torch.linalg.svd(bt.t(), full_matrices=False)
    return (q @ ub)[:, :rank], s[:rank], vh[:rank].t()


def overlap_normalised_sum(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Combine low-rank pieces P_k = U_k diag(s_k) V_k^T into one update.

    Returns ``Q_U^{-1/2} (sum_k P_k) Q_V^{-1/2}`` with ``Q_U = sum_k U_k U_k^T`` whose
    eigenvalues are floored at 1 (likewise Q_V). Identical pieces come out averaged,
    mutually orthogonal pieces summed; nearly-equal pieces are averaged along their common
    directions and their small differences kept unscaled (no blow-up, unlike a polar
    factor of a near-singular stack)."""
    ucat = torch.cat([f[0] for f in factors], 1)
    scat = torch.cat([f[1] for f in factors], 0)
    vcat = torch.cat([f[2] for f in factors], 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        with _lapack_threads(x.device.type != "cpu"):
            a, s, bh = torch.linalg.svd(x, full_matrices=False)
        g = s / s.pow(2).clamp(min=1.0).sqrt()
        return (a * g) @ bh

    return (normalise(ucat) * scat) @ normalise(vcat).t()


# =============================================================================== method
_ALM_CHOICES = ("auto", "data", "data-lambda", "data-free", "off")


@register
class PivotMerge(MergeMethod):
    name = "pivotmerge"
    workspace_stacks = 0.5  # big layers keep task vectors implicit (sketches), measured 16 x 8192-wide
    pretty_name = "PivotMerge"
    reference_url = "https://arxiv.org/abs/2604.22823"
    description = (
        "Post-alignment merging of projectors: pick a pivot expert, align every expert's "
        "hidden units to it, split the task vectors into a shared subspace (filtered for "
        "sign conflicts) plus per-domain residuals (SDF), then rescale each layer (ALM: "
        "fitted on calibration features when given, else data-free). Only the paper's "
        "abstract is public: this is the project's documented reading of it "
        "(see PIVOTMERGE.md), every stage a toggle."
    )
    uses_base = True
    uses_calibration = True
    handles_layer_coefficients = True
    params = (
        Param("pivot", int, -1, "Pivot expert index (0-based); -1 = automatic: with calibration "
              "data the expert whose outputs best match every domain's expert on its own "
              "domain, else the medoid (largest mean cosine similarity after alignment).",
              min=-1, max=1024),
        Param("align_hidden_units", bool, True, "Permute each expert's hidden units to match the "
              "pivot (weight matching; exactly function preserving). Needed when experts come "
              "from different random inits; a no-op (identity) when they share one."),
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
              choices=_ALM_CHOICES),
        Param("alm_ridge", float, ALM_RIDGE_DEFAULT, "Data-driven ALM: strength of the pull "
              "towards the data-free merge, relative to one average calibration token's energy "
              "(mu = alm_ridge * trace(Gram) / tokens; 0 = plain least squares, large = the "
              "data-free merge). "
              "Default chosen on the demo world's validation split.", min=0.0, max=1e12,
              advanced=True),
        Param("alm_tokens", int, ALM_TOKENS_DEFAULT, "Calibration tokens per domain used by "
              "data-driven ALM and by the automatic pivot (evenly spaced subsample).", min=8,
              max=100000, advanced=True),
        Param("scale", float, 1.0, "Global multiplier on every layer coefficient.", min=0.0,
              max=4.0, is_scale=True),
    )

    # --------------------------------------------------------------------- merge
    def merge(self, job: MergeJob) -> Generator[ProgressEvent, None, MergeOutput]:
        t_start = time.perf_counter()
        prm = {**self.defaults(), **job.params}
        experts = job.experts
        k_exp = len(experts)
        names = list(job.expert_names or [e.source or f"expert {i}" for i, e in enumerate(experts)])
        weights = torch.tensor(job.expert_weights, dtype=torch.float32, device=job.device)
        if (weights < 0).any() or float(weights.sum()) <= 0:
            raise ParameterError(self.name, "weight", "expert weights must be >= 0 with a positive sum")
        weights = weights * (k_exp / weights.sum())  # mean 1: weights are relative
        cal = job.calibration
        alm_mode = prm["alm"]
        if alm_mode == "auto":
            alm_mode = "data" if cal is not None else "data-free"
        if alm_mode in ("data", "data-lambda") and cal is None:
            raise MethodError(f"pivotmerge: alm='{alm_mode}' needs calibration features; set alm to "
                              "'data-free' or provide calibration data")
        if cal is not None and len(cal.features) != k_exp:
            raise MethodError(f"pivotmerge: calibration has {len(cal.features)} domains but there "
                              f"are {k_exp} experts (one feature set per expert's domain)")
        timings: dict[str, float] = {}
        report: dict[str, Any] = {
            "stages": {
                "align_hidden_units": prm["align_hidden_units"], "sdf": prm["sdf"],
                "filter_conflicts": prm["filter_conflicts"], "residuals": prm["residuals"] and prm["sdf"],
                "alm": alm_mode,
            },
            "warnings": [],
        }
        cal_x, cal_y = self._calibration_batches(job, prm["alm_tokens"]) if cal is not None else (None, None)

        # ------------------------------------------------------------- 1. pivot + align
        t0 = time.perf_counter()
        job.cancel.raise_if_cancelled()
        yield ProgressEvent("pivot", 0.0, "PivotMerge: choosing the pivot")
        aligned = list(experts)
        infos: list[AlignmentInfo] = [identity_info(e) for e in experts]
        pivot = int(prm["pivot"])
        pivot_scores: list[float] | None = None
        if pivot >= k_exp:
            raise ParameterError(self.name, "pivot", f"{pivot} is not an expert index (0..{k_exp - 1})")
        has_pairs = bool(experts[0].hidden_pairs())
        do_align = bool(prm["align_hidden_units"]) and has_pairs
        aligned_done = False
        if pivot >= 0:
            chosen_by = "user"
        elif cal_x is not None:
            chosen_by = "calibration: best mean alignment score over all domains"
            pivot_scores = self._calibration_scores(experts, cal_x, cal_y)
            pivot = int(torch.tensor(pivot_scores).argmax())
        else:
            chosen_by = "medoid: largest mean cosine similarity" + (" after alignment" if do_align else "")
            if do_align:
                # provisional frame: expert 0; re-aligned to the medoid only if that changes it
                for ev in self._align(job, experts, 0, aligned, infos, 0.02, 0.15):
                    yield ev
            pivot_scores = self._medoid_scores(aligned)
            pivot = int(torch.tensor(pivot_scores).argmax())
            if do_align and (pivot == 0 or all(inf.is_identity for inf in infos)):
                aligned_done = True  # every expert already sits in the pivot's frame
                infos[pivot] = identity_info(experts[pivot])
            else:
                aligned = list(experts)
                infos = [identity_info(e) for e in experts]
        report["pivot"] = {"index": pivot, "name": names[pivot], "chosen_by": chosen_by,
                           "scores": [round(s, 6) for s in pivot_scores] if pivot_scores else None}
        yield ProgressEvent("pivot", 0.16, f"PivotMerge: pivot = {names[pivot]} ({chosen_by})")
        if do_align and not aligned_done:
            for ev in self._align(job, experts, pivot, aligned, infos, 0.16, 0.3):
                yield ev
        report["alignment"] = [
            {"expert": names[i], "aligned": do_align, **infos[i].to_dict()}
            for i in range(k_exp)
        ]
        timings["pivot_and_alignment_s"] = time.perf_counter() - t0

        # ------------------------------------------------------------- reference
        job.cancel.raise_if_cancelled()
        if job.base is not None:
            ref = job.base
            report["reference"] = "base (shared init)"
            moved = [names[i] for i in range(k_exp) if not infos[i].is_identity]
            if moved:
                report["warnings"].append(
                    "experts " + ", ".join(moved) + " needed a hidden-unit permutation to match the "
                    "pivot: they may not share the base's init, so their task vectors relative to "
                    "the base can be meaningless; consider merging without a base")
        else:
            ref = mean_projector(aligned).to(job.device, job.dtype)
            report["reference"] = "mean of the pivot-aligned experts (no shared init given)"
        yield ProgressEvent("reference", 0.31, f"PivotMerge: reference = {report['reference']}")

        # ------------------------------------------------------------- 2. SDF per tensor
        t0 = time.perf_counter()
        ref_state = ref.state()
        states = [a.state() for a in aligned]
        keys = list(ref_state)
        tau_star: dict[str, torch.Tensor] = {}
        layer_reports: list[dict[str, Any]] = []
        layer_energy: dict[str, list[tuple[float, float]]] = {}  # layer -> [(energy, weight)]
        typical_sq: dict[str, float] = {}
        merged_sq: dict[str, float] = {}
        for ti, key in enumerate(keys):
            job.cancel.raise_if_cancelled()
            lname = key.rsplit(".", 1)[0]
            yield ProgressEvent("sdf", 0.32 + 0.5 * ti / len(keys), f"PivotMerge: merging {key}")
            r0 = ref_state[key].to(job.dtype)
            entry: dict[str, Any] = {"tensor": key, "shape": list(r0.shape)}
            if r0.dim() == 2 and prm["sdf"] and min(r0.shape) > 1:
                big = r0.numel() * k_exp >= 2**22 and max(r0.shape) > EXACT_GRAM_LIMIT
                low = torch.bfloat16 if big and _bf16_fast(r0.device) else torch.float32
                ts = TaskStack([st_[key] for st_ in states], r0, low)
                tnorm2 = ts.norm2.to(weights.device, torch.float32)
                merged, st = self._sdf_tensor(ts, weights, prm, ti)
                del ts
                entry.update(st)
                e = st["shared_energy"]
            else:
                # one fp32 stack filled in place (no per-expert temporaries)
                t32 = torch.empty((k_exp, *r0.shape), dtype=torch.float32, device=r0.device)
                for i, st_ in enumerate(states):
                    torch.sub(st_[key].float(), r0.float(), out=t32[i])
                tnorm2 = torch.linalg.vector_norm(t32.flatten(1), dim=1) ** 2
                merged, st = elect_and_merge(t32, weights, filter_conflicts=prm["filter_conflicts"],
                                             trim_density=prm["trim_density"] if r0.dim() == 2 else 1.0)
                entry.update(mode="entry-wise", conflict_fraction=round(st["conflict_fraction"], 6),
                             conflicts_dropped=bool(prm["filter_conflicts"]),
                             trimmed_fraction=round(st["trimmed_fraction"], 6))
                e = st["agree_energy"]
                del t32
            typical_sq[lname] = typical_sq.get(lname, 0.0) + float((tnorm2 * weights).sum() / k_exp)
            entry["energy"] = float(tnorm2.sum())
            layer_energy.setdefault(lname, []).append((e, float(tnorm2.sum())))
            merged_sq[lname] = merged_sq.get(lname, 0.0) + float(merged.pow(2).sum())
            tau_star[key] = merged.to(job.dtype)
            layer_reports.append(entry)
            del merged
        timings["sdf_s"] = time.perf_counter() - t0
        yield ProgressEvent("sdf", 0.82, "PivotMerge: shared-space merge done")

        # ------------------------------------------------------------- 3. ALM
        t0 = time.perf_counter()
        job.cancel.raise_if_cancelled()
        layer_names = [l.name for l in ref.layers]
        forward_layers = {op.split(":")[1] for op in ref.ops if ":" in op and op.split(":")[0] in
                          ("linear", "layernorm", "rmsnorm")}
        user = dict(job.layer_coefficients or {})
        unknown = [n for n in user if n not in layer_names]
        if unknown:
            raise ParameterError(self.name, "layer_coefficients",
                                 f"unknown layer '{unknown[0]}'; layers are {', '.join(layer_names)}")
        shared_frac: dict[str, float] = {}
        for lname, parts in layer_energy.items():
            tot = sum(w for _, w in parts)
            shared_frac[lname] = sum(e * w for e, w in parts) / tot if tot > 0 else 1.0
        lam: dict[str, float] = {}
        alm_info: dict[str, Any] = {"mode": alm_mode}
        mean_reference = job.base is None
        if alm_mode in ("data-free", "data") and mean_reference:
            alm_info["note"] = ("no shared init: task vectors measured from the experts' mean sum to "
                                "zero by construction, so their norm loss is not interference and "
                                "the data-free rescale keeps lambda = 1")
        for lname in layer_names:
            typ, mer = math.sqrt(typical_sq.get(lname, 0.0)), math.sqrt(merged_sq.get(lname, 0.0))
            if (alm_mode == "off" or mer == 0.0
                    or (alm_mode in ("data-free", "data") and mean_reference)):
                lam[lname] = 1.0
            else:  # data-free value; also the data-driven starting report
                rho = min(max(typ / mer, 1.0), float(k_exp))
                lam[lname] = 1.0 + shared_frac.get(lname, 1.0) * (rho - 1.0)
        fitted_layers: set[str] = set()
        if alm_mode == "data-lambda":
            # a layer whose merged update vanished (e.g. 1-D tensors averaged around their own
            # mean) has no direction to scale: fitting it would only chase rounding noise
            free = [n for n in layer_names if n in forward_layers and n not in user
                    and merged_sq.get(n, 0.0) > 1e-10 * max(typical_sq.get(n, 0.0), 1e-30)]
            fixed = {n: float(user[n]) if n in user else 1.0 for n in layer_names}
            for ev, res in self._fit_lambdas(job, ref, tau_star, free, fixed, cal_x, cal_y, weights):
                if ev is not None:
                    yield ev
                else:
                    fitted, alm_info_fit = res
            for n in layer_names:
                lam[n] = fitted.get(n, 1.0) if n in free else 1.0
            alm_info.update(alm_info_fit)
            alm_info["domains"] = list(cal.domains) if cal is not None and cal.domains else None
        elif alm_mode == "data":
            prior = {n: float(user[n]) if n in user else lam[n] for n in layer_names}
            for ev, res in self._fit_layers(job, ref, aligned, tau_star, prior, set(user), cal_x,
                                            weights, float(prm["alm_ridge"])):
                if ev is not None:
                    yield ev
                else:
                    updates, alm_info_fit = res
            for key, upd in updates.items():  # fitted update replaces lambda * tau*
                tau_star[key] = upd.to(job.dtype)
                fitted_layers.add(key.rsplit(".", 1)[0])
            for n in fitted_layers:
                lam[n] = 1.0
            alm_info.update(alm_info_fit)
            alm_info["domains"] = list(cal.domains) if cal is not None and cal.domains else None
        coeff: dict[str, float] = {}
        for n in layer_names:
            coeff[n] = float(user[n]) if n in user else float(prm["scale"]) * lam[n]
        timings["alm_s"] = time.perf_counter() - t0

        # ------------------------------------------------------------- compose
        job.cancel.raise_if_cancelled()
        yield ProgressEvent("compose", 0.97, "PivotMerge: composing theta = ref + lambda * tau*")
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            lname = key.rsplit(".", 1)[0]
            t = tau_star.pop(key)  # composed in place: no second copy of every tensor
            out[key] = t.mul_(coeff[lname]).add_(ref_state[key].to(t.dtype)).to(job.dtype)

        per_layer = []
        for n in layer_names:
            per_layer.append({
                "layer": n,
                "lambda": round(lam[n], 6),
                "coefficient": round(coeff[n], 6),
                "source": "user" if n in user else (
                    "alm-data-fit" if n in fitted_layers else
                    ("alm-" + alm_mode if alm_mode not in ("off", "data") else
                     ("alm-data-free-prior" if alm_mode == "data" else "scale"))),
                "fitted": n in fitted_layers,
                "shared_energy_fraction": round(shared_frac.get(n, 1.0), 6),
                "typical_update_norm": round(math.sqrt(typical_sq.get(n, 0.0)), 6),
                "merged_update_norm": round(math.sqrt(merged_sq.get(n, 0.0)), 6),
            })
        report["tensors"] = layer_reports
        report["layers"] = per_layer
        report["lambdas"] = {n: round(coeff[n], 6) for n in layer_names}
        report["alm"] = alm_info
        timings["total_s"] = time.perf_counter() - t_start
        report["timings"] = {k: round(v, 4) for k, v in timings.items()}
        yield ProgressEvent("compose", 1.0, "PivotMerge: done")
        return MergeOutput(out, report)

    # --------------------------------------------------------------------- pieces
    def _align(
        self, job: MergeJob, experts: list[Projector], pivot: int, aligned: list[Projector],
        infos: list[AlignmentInfo], f0: float, f1: float,
    ) -> Generator[ProgressEvent, None, None]:
        """Align every expert to ``experts[pivot]`` in place of ``aligned``/``infos``."""
        names = job.expert_names or [e.source or f"expert {i}" for i, e in enumerate(experts)]
        cache: dict = {}
        for i, e in enumerate(experts):
            job.cancel.raise_if_cancelled()
            yield ProgressEvent("align", f0 + (f1 - f0) * i / len(experts),
                                f"PivotMerge: aligning hidden units of {names[i]} to {names[pivot]}")
            if i == pivot:
                aligned[i], infos[i] = e, identity_info(e)
            else:
                aligned[i], infos[i] = align_to_pivot(e, experts[pivot], cache=cache)

    @staticmethod
    def _medoid_scores(aligned: list[Projector]) -> list[float]:
        """Mean cosine similarity of each expert's flattened weights to the others."""
        k = len(aligned)
        if k == 1:
            return [1.0]
        states = [a.state() for a in aligned]
        gram = torch.zeros(k, k, dtype=torch.float64)
        for key in states[0]:
            flat = torch.stack([s[key].float().flatten() for s in states])
            gram += (flat @ flat.t()).double().cpu()
        d = gram.diag().sqrt().clamp(min=1e-30)
        cos = gram / d[:, None] / d[None, :]
        return [float((cos[i].sum() - 1.0) / (k - 1)) for i in range(k)]

    @staticmethod
    def _calibration_batches(job: MergeJob, max_tokens: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Evenly spaced subsample of each domain's features and the expert's own outputs."""
        xs, ys = [], []
        assert job.calibration is not None
        group = 1  # families that merge n consecutive tokens (Qwen2-VL) keep whole groups
        for op in job.experts[0].ops:
            if op.startswith("merge_tokens:"):
                group *= int(op.split(":")[1])
        for k, feats in enumerate(job.calibration.features):
            x = feats.to(job.device, job.dtype)
            n = x.shape[0] // group
            if n > max(1, max_tokens // group):
                m = max(1, max_tokens // group)
                idx = torch.linspace(0, n - 1, m).round().long().to(x.device)
                x = x[: n * group].reshape(n, group, *x.shape[1:])[idx].reshape(m * group, *x.shape[1:])
            with torch.no_grad():
                ys.append(job.experts[k].forward(x))
            xs.append(x)
        return xs, ys

    @staticmethod
    def _calibration_scores(experts: list[Projector], xs: list[torch.Tensor], ys: list[torch.Tensor]) -> list[float]:
        """Alignment score of expert i = mean over domains j of the cosine similarity between
        its outputs and domain j's own expert's outputs on domain j's features."""
        scores = []
        with torch.no_grad():
            for e in experts:
                per = []
                for x, y in zip(xs, ys):
                    out = e.forward(x).float().reshape(-1, y.shape[-1])
                    per.append(float(torch.nn.functional.cosine_similarity(
                        out, y.float().reshape(-1, y.shape[-1]), dim=-1).mean()))
                scores.append(sum(per) / len(per))
        return scores

    def _sdf_tensor(
        self, ts: TaskStack, weights: torch.Tensor, prm: dict[str, Any], salt: int
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """SDF of one 2-D weight: shared subspace, filtered coordinates, merged residuals."""
        k, m, n = ts.shape
        total = ts.total
        u, v, sub = shared_subspace(ts.low, prm["shared_energy"], prm["max_rank"], salt=salt, total=total)
        ts.low = ts.low.new_empty(0)  # the sketch copy is no longer needed: free it now
        r = u.shape[1]
        c = ts.coords(u, v) if r > 0 else torch.zeros(k, 0, 0, device=ts.ref.device)
        shared_e = float(c.pow(2).sum()) / total if total > 0 else 1.0
        c_star, st = elect_and_merge(c, weights, filter_conflicts=prm["filter_conflicts"],
                                     trim_density=prm["trim_density"])
        merged = u @ c_star @ v.t() if r > 0 else torch.zeros(m, n, device=ts.ref.device)
        info: dict[str, Any] = {
            "mode": "sdf", "subspace": sub["method"], "rank": r, "rank_u": sub["rank_u"],
            "rank_v": sub["rank_v"],
            "conflict_fraction": round(st["conflict_fraction"], 6),
            "conflicts_dropped": bool(prm["filter_conflicts"]),
            "trimmed_fraction": round(st["trimmed_fraction"], 6),
        }
        if prm["residuals"] and prm["residual_weight"] > 0 and r < min(m, n):
            factors = []
            kept = 0.0
            for i in range(k):
                uu, ss, vv = _residual_lowrank(ts, i, u, c[i], v, prm["residual_rank"], salt * 131 + i)
                kept += float(ss.pow(2).sum())
                factors.append((uu, ss * weights[i], vv))
            res = overlap_normalised_sum(factors)
            merged = merged + prm["residual_weight"] * res
            info["residual_rank"] = int(factors[0][1].numel())
            info["residual_energy_kept"] = round(kept / total, 6) if total > 0 else 0.0
        else:
            info["residual_rank"] = 0
        info["shared_energy"] = min(shared_e, 1.0)
        return merged, info

    def _fit_layers(
        self, job: MergeJob, ref: Projector, aligned: list[Projector], tau_star: dict[str, torch.Tensor],
        prior_coeff: dict[str, float], fixed: set[str], xs: list[torch.Tensor], weights: torch.Tensor,
        ridge: float,
    ) -> Generator[tuple[ProgressEvent | None, Any], None, None]:
        """Data-driven ALM: progressive, alignment-guided ridge refit of every linear layer.

        Starts from the data-free merge ``P = ref + prior_coeff * tau*`` (every layer). For
        each linear layer l in forward order that the user did not fix:
        inputs ``H_k`` = expert k's own-domain calibration features run through the MERGED
        layers before l (already refitted); targets ``T_k`` = pivot-aligned expert k's own
        pre-activation output of layer l on the same features run through ITS OWN earlier
        layers (for the last layer: f_k(x)). Solve
        ``min_W,b sum_k (w_k / n_k) ||H_k W^T + b - T_k||^2 + mu ||[W b] - [P_W P_b]||^2``
        in closed form, ``mu = ridge * trace(G) / (d_in + 1)`` with ``G`` the weighted Gram of
        ``[H_k 1]``. Yields progress events, then ``(None, (updates, info))`` where
        ``updates`` maps "layer.role" -> fitted value - ref (fp32)."""
        dev = job.device
        ref32 = ref.to(dev, torch.float32)
        ref_state = ref32.state()
        cur = {}
        for key, r in ref_state.items():
            ln = key.rsplit(".", 1)[0]
            cur[key] = r + prior_coeff[ln] * tau_star[key].to(dev, torch.float32)
        experts32 = [a.to(dev, torch.float32) for a in aligned]
        xs = [x.to(dev, torch.float32) for x in xs]
        wk = [float(w) for w in weights]
        order = [op.split(":")[1] for op in ref.ops if op.startswith("linear:")]
        targets_layers = [n for n in dict.fromkeys(order)
                          if n not in fixed and ref32.layer(n).weight.dim() == 2]
        # expert k's own pre-activations of every fitted layer on its own domain
        own_inputs, own_out = [], []
        with torch.no_grad():
            for e, x in zip(experts32, xs):
                y, inp = e.forward_with_inputs(x, capture=True)
                own_out.append(y)
                own_inputs.append(inp)

        def objective(state: dict[str, torch.Tensor]) -> float:
            m = ref32.with_state(state)
            tot = 0.0
            with torch.no_grad():
                for k, (y, x) in enumerate(zip(own_out, xs)):
                    d = m.forward(x) - y
                    tot += wk[k] * float(d.double().pow(2).sum()) / x.shape[0]
            return tot

        at1 = {k: ref_state[k] + tau_star[k].to(dev, torch.float32) for k in ref_state}
        info: dict[str, Any] = {
            "objective_at_1": objective(at1), "objective_prior": objective(cur),
            "alm_ridge": ridge, "tokens_per_domain": [int(x.shape[0]) for x in xs],
            "targets": "each expert's own layer output on its own domain (own earlier layers); "
                       "inputs through the merged earlier layers",
            "layers": [],
        }
        updates: dict[str, torch.Tensor] = {}
        n_lay = max(1, len(targets_layers))
        for li, name in enumerate(targets_layers):
            job.cancel.raise_if_cancelled()
            yield ProgressEvent("alm", 0.83 + 0.13 * li / n_lay,
                                f"PivotMerge: refitting layer {name} on calibration features"), None
            layer = ref32.layer(name)
            has_bias = layer.bias is not None
            wkey, bkey = f"{name}.weight", f"{name}.bias"
            merged = ref32.with_state(cur)
            rows_h, rows_r = [], []
            n_tok = 0
            with torch.no_grad():
                for k, (e, x) in enumerate(zip(experts32, xs)):
                    h = merged.forward_with_inputs(x, capture=True)[1][name]
                    h = h.reshape(-1, h.shape[-1])
                    el = e.layer(name)
                    own = own_inputs[k][name]
                    t = torch.nn.functional.linear(own, el.weight, el.bias).reshape(-1, el.weight.shape[0])
                    pw = cur[wkey]
                    pred = h @ pw.t() + (cur[bkey] if has_bias else 0.0)
                    c = math.sqrt(wk[k] / h.shape[0])
                    if has_bias:
                        h = torch.cat([h, h.new_ones(h.shape[0], 1)], 1)
                    rows_h.append(h * c)
                    rows_r.append((t - pred) * c)
                    n_tok += int(h.shape[0])
            a = torch.cat(rows_h, 0)
            r = torch.cat(rows_r, 0)
            n, d = a.shape
            fdt = torch.float64 if min(n, d) <= FIT_FP64_LIMIT else torch.float32
            a_, r_ = a.to(fdt), r.to(fdt)
            before = float(r_.pow(2).sum())
            gram_trace = float(a_.pow(2).sum())
            mu = ridge * gram_trace / n
            with _lapack_threads(min(n, d) > 1024 or dev.type != "cpu"):
                if n < d:  # dual form: (A^T A + mu I)^-1 A^T R = A^T (A A^T + mu I)^-1 R
                    lhs = a_ @ a_.t()
                    lhs.diagonal().add_(mu)
                    delta_t = a_.t() @ solve_normal_equations(lhs, r_)
                else:
                    lhs = a_.t() @ a_
                    lhs.diagonal().add_(mu)
                    delta_t = solve_normal_equations(lhs, a_.t() @ r_)
            after_r = r_ - a_ @ delta_t
            after = float(after_r.pow(2).sum())
            if not math.isfinite(after) or after > before:  # never worse than the prior
                delta_t = torch.zeros_like(delta_t)
                after = before
            delta = delta_t.t().to(torch.float32)  # [d_out, d_in (+1)]
            cur[wkey] = cur[wkey] + delta[:, : layer.weight.shape[1]]
            if has_bias:
                cur[bkey] = cur[bkey] + delta[:, -1]
            info["layers"].append({
                "layer": name, "tokens": n_tok, "mu": mu, "alm_ridge": ridge,
                "residual_before": before, "residual_after": after,
                "relative_residual_after": after / before if before > 0 else 0.0,
                "solve": ("dual " if n < d else "primal ") + str(fdt).replace("torch.", ""),
            })
            for key in ([wkey, bkey] if has_bias else [wkey]):
                updates[key] = cur[key] - ref_state[key]
        info["objective"] = objective(cur)
        info["iterations"] = len(targets_layers)
        yield None, (updates, info)

    def _fit_lambdas(
        self, job: MergeJob, ref: Projector, tau_star: dict[str, torch.Tensor], free: list[str],
        fixed: dict[str, float], xs: list[torch.Tensor], ys: list[torch.Tensor], weights: torch.Tensor,
    ) -> Generator[tuple[ProgressEvent | None, Any], None, None]:
        """Levenberg-Marquardt on the free per-layer lambdas (forward-mode Jacobian).

        Objective: sum_k w_k mean_{x in D_k} ||f(x) - f_k(x)||^2, starting from lambda = 1;
        only steps that lower it are accepted; lambdas are kept in [0, LAMBDA_MAX]."""
        # fitted in fp32 whatever the compute dtype (a few scalars; bf16 steps would stall)
        ref_state = {k: v.detach().float() for k, v in ref.state().items()}
        tau = {k: v.detach().float() for k, v in tau_star.items()}
        xs = [x.float() for x in xs]
        ys = [y.float() for y in ys]
        n_free = len(free)
        idx = {n: i for i, n in enumerate(free)}

        def forward(lam: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
            st = {}
            for key, r in ref_state.items():
                ln = key.rsplit(".", 1)[0]
                c = lam[idx[ln]] if ln in idx else fixed[ln]
                st[key] = r + c * tau[key]
            return ref.with_state(st).forward(x)

        def objective(lam: torch.Tensor) -> float:
            tot = 0.0
            with torch.no_grad():
                for k, (x, y) in enumerate(zip(xs, ys)):
                    d = (forward(lam, x) - y).float()
                    tot += float(weights[k]) * float(d.pow(2).sum()) / x.shape[0]
            return tot

        lam = torch.ones(n_free, dtype=torch.float32, device=job.device)
        start = objective(lam)
        if n_free == 0:
            yield None, ({}, {"objective_at_1": start, "objective": start, "iterations": 0})
            return
        cur = start
        mu = 1e-3
        iters = 0
        from torch.func import jvp

        for it in range(12):
            job.cancel.raise_if_cancelled()
            yield ProgressEvent("alm", 0.83 + 0.13 * it / 12,
                                f"PivotMerge: fitting layer coefficients (objective {cur:.4g})"), None
            jtj = torch.zeros(n_free, n_free, dtype=torch.float64)
            jtr = torch.zeros(n_free, dtype=torch.float64)
            for k, (x, y) in enumerate(zip(xs, ys)):
                wk = float(weights[k]) / x.shape[0]
                cols = []
                res = None
                for j in range(n_free):
                    e = torch.zeros_like(lam)
                    e[j] = 1.0
                    out, tan = jvp(lambda l, x=x: forward(l, x), (lam,), (e,))
                    if res is None:
                        res = (out - y).double().flatten()
                    cols.append(tan.double().flatten())
                jac = torch.stack(cols, 1).cpu()
                res = res.cpu()
                jtj += wk * jac.t() @ jac
                jtr += wk * jac.t() @ res
            improved = False
            damp = jtj.diag().clamp(min=1e-9 * float(jtj.diag().max().clamp(min=1e-30)))
            for _ in range(8):
                a = jtj + mu * torch.diag(damp)
                step = torch.linalg.solve(a, -jtr)
                # coefficients stay in [0, LAMBDA_MAX]: a negative or huge lambda only fits
                # the calibration features, it does not merge experts
                cand = (lam + step.to(lam.dtype).to(lam.device)).clamp(0.0, LAMBDA_MAX)
                val = objective(cand)
                if val < cur:
                    lam, mu, improved = cand, max(mu / 10, 1e-9), True
                    rel = (cur - val) / max(cur, 1e-30)
                    cur = val
                    break
                mu *= 10
            iters = it + 1
            if not improved or rel < 1e-6:
                break
        fitted = {n: float(lam[i]) for n, i in idx.items()}
        yield None, (fitted, {"objective_at_1": start, "objective": cur, "iterations": iters,
                              "tokens_per_domain": [int(x.shape[0]) for x in xs]})
