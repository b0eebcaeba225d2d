"""PivotMerge stage 2: Shared-space Decomposition and Filtering (SDF), tensor by tensor.

Why: task vectors of different domains interfere where they share directions and carry
complementary knowledge where they do not. Each 2-D update is split into coordinates in
the experts' shared subspace (:func:`...linalg.shared_subspace`), merged there with the
sign consensus of :mod:`..consensus` when conflict filtering is on, plus each expert's top
residual directions, combined by an overlap-normalised sum (identical residuals average,
orthogonal ones add). Other tensors are merged entry-wise the same way. Big layers never
hold an fp32 stack of task vectors where bf16 products are fast (:class:`TaskStack`).
"""

from __future__ import annotations

from collections.abc import Generator, Sequence
from dataclasses import dataclass, field

import torch

from ...linalg import (
    EXACT_GRAM_LIMIT,
    gaussian,
    lapack_threads,
    orth,
    product_dtype,
    shared_subspace_coords,
)
from ...progress import ProgressEvent
from ...projector import Projector
from ..base import MergeJob
from ..consensus import agreement, disjoint_merge, elect_sign, trim_top_k
from .report import TensorReport
from .settings import Settings


class TaskStack:
    """Task vectors ``tau_k = theta_k - ref`` of one 2-D weight.

    ``low`` is a copy of the stack in the sketch dtype for the randomized range finder. In
    fp32 (where bf16 products are not fast) it *is* the exact stack (``exact``), and exact
    products read it: one matrix per product instead of two. In bf16 (big layers, 4096x4096
    and 4 experts: half of a 268 MB fp32 stack) it serves the shared-subspace sketch and the
    residuals' range finder and is then dropped; exact products use the experts' own fp32
    tensors, ``tau_k @ x = theta_k @ x - ref @ x``."""

    def __init__(self, thetas: Sequence[torch.Tensor], ref: torch.Tensor, low_dtype: torch.dtype) -> None:
        self.thetas = [t.float() for t in thetas]
        self.ref = ref.float()
        k = len(self.thetas)
        m, n = self.ref.shape
        self.shape = (k, m, n)
        self.exact = low_dtype == torch.float32
        self.low = torch.empty((k, m, n), dtype=low_dtype, device=self.ref.device)
        norm2 = torch.zeros(k, dtype=torch.float64)
        # row blocks of 2^20 entries: no full fp32 difference beside a bf16 stack, and the
        # energies summed in float64 over blocks (an fp32 norm of 16 M entries is off by
        # ~4e-5 relative, a dot product of 1 M by ~1e-6)
        step = max(1, 2**20 // max(n, 1))
        for i, th in enumerate(self.thetas):
            for r0 in range(0, m, step):
                rows = slice(r0, min(m, r0 + step))
                if self.exact:
                    d = torch.sub(th[rows], self.ref[rows], out=self.low[i, rows])
                else:
                    d = th[rows] - self.ref[rows]
                    self.low[i, rows].copy_(d)
                flat = d.reshape(-1)
                norm2[i] += float(torch.dot(flat, flat))
                del d
        self.norm2 = norm2
        self.total = float(self.norm2.sum())

    def tau(self, i: int) -> torch.Tensor:
        return self.low[i] if self.exact else self.thetas[i] - self.ref

    def mul(self, i: int, x: torch.Tensor) -> torch.Tensor:  # tau_i @ x
        if self.exact:
            return self.low[i] @ x
        return self.thetas[i] @ x - self.ref @ x

    def tmul(self, i: int, y: torch.Tensor) -> torch.Tensor:  # tau_i^T @ y
        yt = y.t()  # (y^T theta)^T reads theta row-major: ~2x faster than theta^T @ y on CPU
        if self.exact:
            return (yt @ self.low[i]).t()
        return (yt @ self.thetas[i] - yt @ self.ref).t()

    def rows(self, q: torch.Tensor) -> torch.Tensor:
        """Q^T tau_k for every k, [K, p, n] fp32, exact (the sketch's Rayleigh-Ritz rows)."""
        if self.exact:
            return torch.matmul(q.t(), self.low)
        qt = q.t()
        rq = qt @ self.ref
        return torch.stack([qt @ th - rq for th in self.thetas])

    def coords(self, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """C_k = U^T tau_k V for every k, [K, r, r] (fp32)."""
        rv = u.t() @ self.ref @ v
        return torch.stack([(u.t() @ th) @ v - rv for th in self.thetas])


def residuals_lowrank(
    ts: TaskStack, u: torch.Tensor, c: torch.Tensor, v: torch.Tensor, rank: int, salt: int
) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Per expert i, top-``rank`` SVD factors of R_i = tau_i - U C_i V^T without forming R_i
    (randomized SVD with one subspace iteration, Halko et al. 2011, Alg. 4.4 + 5.1).

    The range finder's four products run for every expert at once on the stack ``ts.low``
    (batched: each product reads the stack once; bf16 where it is fast, else the exact fp32
    stack); the final projection B_i = Q_i^T R_i and its SVD are exact fp32 (as in
    :func:`...linalg.shared_subspace`, only the subspace is approximate). Small layers take an
    exact SVD of R_i."""
    k, m, n = ts.shape
    rank = min(rank, m, n)
    if max(m, n) <= EXACT_GRAM_LIMIT // 2:
        out = []
        for i in range(k):
            res = ts.tau(i) - u @ c[i] @ v.t()
            with lapack_threads(res.device.type != "cpu"):
                uu, ss, vh = torch.linalg.svd(res, full_matrices=False)
            out.append((uu[:, :rank], ss[:rank], vh[:rank].t()))
        return out
    low = ts.low
    dt = low.dtype
    ct = c.transpose(1, 2)

    def r_mul(x: torch.Tensor) -> torch.Tensor:  # R_i @ x_i for every i: [K, n, p] -> [K, m, p]
        return torch.matmul(low, x.to(dt)).float() - u @ (c @ (v.t() @ x))

    def rt_mul(y: torch.Tensor) -> torch.Tensor:  # R_i^T @ y_i: [K, m, p] -> [K, n, p]
        # (y^T tau)^T reads the stack row-major: faster than tau^T @ y on CPU
        return torch.matmul(y.transpose(1, 2).to(dt), low).transpose(1, 2).float() - v @ (ct @ (u.t() @ y))

    p = min(rank + 8, m, n)
    q = orth(r_mul(gaussian((k, n, p), salt, ts.ref.device, torch.float32)))
    q = orth(r_mul(rt_mul(q)))
    # (Q_i^T ref)^T for every i in one product: the reference is read once, not K times
    ref_t = None if ts.exact else (q.transpose(1, 2).reshape(k * p, m) @ ts.ref).reshape(k, p, n)
    out = []
    for i in range(k):
        tq = ts.tmul(i, q[i]) if ref_t is None else (q[i].t() @ ts.thetas[i] - ref_t[i]).t()
        bt = tq - v @ (c[i].t() @ (u.t() @ q[i]))  # [n, p] = (Q_i^T R_i)^T, exact
        with lapack_threads(bt.device.type != "cpu"):
            ub, s, vh = torch.linalg.svd(bt.t(), full_matrices=False)
        out.append(((q[i] @ ub)[:, :rank], s[:rank], vh[:rank].t()))
    return out


def overlap_normalised_sum(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> torch.Tensor:
    """Combine low-rank pieces P_k = U_k diag(s_k) V_k^T into one update.

    Returns ``Q_U^{-1/2} (sum_k P_k) Q_V^{-1/2}`` with ``Q_U = sum_k U_k U_k^T`` whose
    eigenvalues are floored at 1 (likewise Q_V). Identical pieces come out averaged,
    mutually orthogonal pieces summed; nearly-equal pieces are averaged along their common
    directions and their small differences kept unscaled (no blow-up, unlike a polar
    factor of a near-singular stack)."""
    left, right = overlap_normalised_factors(factors)
    return left @ right.t()


def overlap_normalised_factors(
    factors: Sequence[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`overlap_normalised_sum` as two thin factors (L [m, sum r_k], R [n, sum r_k],
    the sum is L R^T): callers add it into an update in place."""
    ucat = torch.cat([f[0] for f in factors], 1)
    scat = torch.cat([f[1] for f in factors], 0)
    vcat = torch.cat([f[2] for f in factors], 1)

    def normalise(x: torch.Tensor) -> torch.Tensor:
        with lapack_threads(x.device.type != "cpu"):
            a, s, bh = torch.linalg.svd(x, full_matrices=False)
        g = s / s.pow(2).clamp(min=1.0).sqrt()
        return (a * g) @ bh

    return normalise(ucat) * scat, normalise(vcat)


def elect_and_merge(
    stack: torch.Tensor, weights: torch.Tensor, *, filter_conflicts: bool, trim_density: float = 1.0
) -> tuple[torch.Tensor, dict[str, float]]:
    """Merge ``stack`` [K, ...] of updates entry-wise.

    ``filter_conflicts``: weighted sign consensus (:mod:`..consensus`: sign of the total
    mass, majority of signs where the mass is zero up to rounding, an exact tie drops the
    entry), then the weighted mean of the agreeing entries. Without filtering: weighted
    mean. ``trim_density`` < 1 first keeps only the largest-magnitude fraction of each
    stack[k] (TIES trim).

    Returns (merged, stats) with ``conflict_fraction`` (share of nonzero entries that
    disagree with the elected sign), ``trimmed_fraction`` and ``agree_energy`` (share of
    the update energy in entries that agree with it)."""
    stats: dict[str, float] = {"conflict_fraction": 0.0, "trimmed_fraction": 0.0}
    if trim_density < 1.0:
        before = (stack != 0).sum()
        stack = trim_top_k(stack, trim_density)
        after = (stack != 0).sum()
        stats["trimmed_fraction"] = float(1.0 - after / before.clamp(min=1))
    sign = elect_sign(stack, weights=weights)
    if filter_conflicts:
        merged, agree = disjoint_merge(stack, sign, weights)
    else:
        agree = agreement(stack, sign)
        w = weights.to(stack.dtype).view(stack.shape[0], *([1] * (stack.dim() - 1)))
        merged = (stack * w).sum(0) / w.sum()
    nonzero = stack != 0
    energy = stack.pow(2).sum()
    stats["agree_energy"] = float((stack.pow(2) * agree).sum() / energy) if energy > 0 else 1.0
    n_nonzero = nonzero.sum()
    stats["conflict_fraction"] = (
        float((nonzero & ~agree).sum() / n_nonzero) if n_nonzero > 0 else 0.0
    )
    return merged, stats


def sdf_tensor(
    ts: TaskStack, weights: torch.Tensor, s: Settings, salt: int, entry: TensorReport
) -> tuple[torch.Tensor, float]:
    """SDF of one 2-D weight: shared subspace, filtered coordinates, merged residuals.
    Fills ``entry``; returns (merged update, shared-energy fraction)."""
    k, m, n = ts.shape
    total = ts.total
    # the sketch's Rayleigh-Ritz step reads the exact rows, which give the coordinates too
    u, v, sub, c = shared_subspace_coords(ts.low, s.shared_energy, s.max_rank, salt=salt, total=total,
                                          rows=None if ts.exact else ts.rows)
    r = u.shape[1]
    want_residuals = s.residuals and s.residual_weight > 0 and r < min(m, n)
    if not ts.exact and not want_residuals:
        ts.low = ts.low.new_empty(0)  # the bf16 sketch copy is no longer needed: free it now
    if c is None:
        c = ts.coords(u, v) if r > 0 else torch.zeros(k, 0, 0, device=ts.ref.device)
    shared_e = float(c.pow(2).sum()) / total if total > 0 else 1.0
    c_star, st = elect_and_merge(c, weights, filter_conflicts=s.filter_conflicts,
                                 trim_density=s.trim_density)
    entry.subspace, entry.rank = sub["method"], r
    entry.rank_u, entry.rank_v = sub["rank_u"], sub["rank_v"]
    entry.conflict_fraction = round(st["conflict_fraction"], 6)
    entry.trimmed_fraction = round(st["trimmed_fraction"], 6)
    entry.residual_rank = 0
    extra = None  # the residuals' thin factors, added in place below (no m x n temporaries)
    if want_residuals:
        factors = []
        kept = 0.0
        for i, (uu, ss, vv) in enumerate(residuals_lowrank(ts, u, c, v, s.residual_rank, salt * 131)):
            kept += float(ss.pow(2).sum())
            factors.append((uu, ss * weights[i], vv))
        if not ts.exact:
            ts.low = ts.low.new_empty(0)
        extra = overlap_normalised_factors(factors)
        entry.residual_rank = int(factors[0][1].numel())
        entry.residual_energy_kept = round(kept / total, 6) if total > 0 else 0.0
    merged = u @ (c_star @ v.t()) if r > 0 else torch.zeros(m, n, device=ts.ref.device)
    if extra is not None:
        merged.addmm_(extra[0], extra[1].t(), alpha=s.residual_weight)
    entry.shared_energy = min(shared_e, 1.0)
    return merged, entry.shared_energy


@dataclass
class SdfResult:
    """Merged update per tensor, and per layer what data-free ALM needs."""

    tau_star: dict[str, torch.Tensor] = field(default_factory=dict)
    tensors: list[TensorReport] = field(default_factory=list)
    typical_sq: dict[str, float] = field(default_factory=dict)  # expert-typical ||tau||^2
    merged_sq: dict[str, float] = field(default_factory=dict)  # ||tau*||^2
    energy: dict[str, list[tuple[float, float]]] = field(default_factory=dict)  # (fraction, weight)

    def shared_fraction(self) -> dict[str, float]:
        """Per layer: energy-weighted shared (or sign-agreeing) fraction of the updates."""
        out = {}
        for lname, parts in self.energy.items():
            tot = sum(w for _, w in parts)
            out[lname] = sum(e * w for e, w in parts) / tot if tot > 0 else 1.0
        return out


def layer_of(key: str) -> str:
    """Layer name of a canonical tensor name ``"<layer>.<role>"``."""
    return key.rsplit(".", 1)[0]


def merge_task_vectors(
    job: MergeJob, ref: Projector, states: list[dict[str, torch.Tensor]], weights: torch.Tensor,
    s: Settings, *, release: bool = False,
) -> Generator[ProgressEvent, None, SdfResult]:
    """Stage 2 over every tensor (progress 0.32 to 0.82) of the pivot-aligned experts'
    ``states``. ``release``: drop each tensor from ``states`` once merged (the caller holds
    no other reference, so its memory goes back before the next tensor)."""
    ref_state = ref.state()
    keys = list(ref_state)
    k_exp = len(states)
    res = SdfResult()
    for ti, key in enumerate(keys):
        job.cancel.raise_if_cancelled()
        lname = layer_of(key)
        yield ProgressEvent("sdf", 0.32 + 0.5 * ti / len(keys), f"PivotMerge: merging {key}")
        r0 = ref_state[key].to(job.dtype)
        if r0.dim() == 2 and s.sdf and min(r0.shape) > 1:
            entry = TensorReport(key, list(r0.shape), "sdf", 0.0, bool(s.filter_conflicts), 0.0)
            big = r0.numel() * k_exp >= 2**22 and max(r0.shape) > EXACT_GRAM_LIMIT
            ts = TaskStack([st_[key] for st_ in states], r0, product_dtype(r0.device, big))
            tnorm2 = ts.norm2.to(weights.device, torch.float32)
            merged, e = sdf_tensor(ts, weights, s, ti, entry)
            del ts
        else:
            # one fp32 stack filled in place (no per-expert temporaries)
            t32 = torch.empty((k_exp, *r0.shape), dtype=torch.float32, device=r0.device)
            for i, st_ in enumerate(states):
                torch.sub(st_[key].float(), r0.float(), out=t32[i])
            tnorm2 = torch.linalg.vector_norm(t32.flatten(1), dim=1) ** 2
            merged, st = elect_and_merge(t32, weights, filter_conflicts=s.filter_conflicts,
                                         trim_density=s.trim_density if r0.dim() == 2 else 1.0)
            entry = TensorReport(key, list(r0.shape), "entry-wise",
                                 round(st["conflict_fraction"], 6), bool(s.filter_conflicts),
                                 round(st["trimmed_fraction"], 6))
            e = st["agree_energy"]
            del t32
        res.typical_sq[lname] = res.typical_sq.get(lname, 0.0) + float((tnorm2 * weights).sum() / k_exp)
        entry.energy = float(tnorm2.sum())
        res.energy.setdefault(lname, []).append((e, float(tnorm2.sum())))
        res.merged_sq[lname] = res.merged_sq.get(lname, 0.0) + float(merged.pow(2).sum())
        res.tau_star[key] = merged.to(job.dtype)
        res.tensors.append(entry)
        del merged
        if release:
            for st_ in states:
                del st_[key]
    yield ProgressEvent("sdf", 0.82, "PivotMerge: shared-space merge done")
    return res
