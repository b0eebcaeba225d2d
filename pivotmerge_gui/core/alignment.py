"""Hidden-unit permutation alignment of an expert projector to a pivot (weight matching).

Why: projectors trained from different random inits compute (nearly) the same function
with their hidden units in a different order, and ``Linear -> act -> Linear`` is invariant
to permuting them; before any element-wise merge each expert is brought into the pivot's
frame. How: Git Re-Basin "weight matching" (Ainsworth et al. 2022), one linear assignment
per ``linear -> act -> linear`` pair (chains solved pair by pair with a few sweeps), with
cheap optimality certificates that skip the solver or the fp32 similarity where they can.
Exactly function preserving; the returned projector keeps the expert's dtype.
:func:`shares_coordinates` is the cheap test callers run first when the user gave a shared
init (base): experts fine-tuned from it are already in its frame, so the search is skipped.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .assignment import max_weight_matching
from .linalg import bf16_is_fast
from .projector import Projector, check_compatible

# bf16 inputs rounded to nearest (unit roundoff 2^-9), products accumulated in fp32 and
# the result rounded to bf16: |S_bf16 - S| <= ~3 * 2^-9 * ||a|| ||b||. Use 2^-6 for margin.
_BF16_REL_ERROR = 2.0**-6
_BF16_MIN_MACS = 2**28  # below this the fp32 product is already fast
# above this the fp32 similarity costs more than a merge's other steps on a CPU (LLaVA-1.5's
# 4096 units: 86 G multiply-adds); there the assignment may be solved on the bf16 one
_BF16_ASSIGN_MIN_MACS = 2**33
SHARED_FRAME_SAMPLE = 128  # hidden units per pair checked by shares_coordinates


@dataclass
class PairAlignment:
    """The permutation of one ``in_layer -> act -> out_layer`` pair.

    ``permutation[i]`` is the expert's hidden unit placed at position ``i`` (matched to the
    pivot's unit ``i``). Similarities are the mean cosine similarity of the matched units'
    feature vectors ``[W_in row | b_in | W_out column]`` before (identity) and after."""

    in_layer: str
    out_layer: str
    permutation: list[int]
    is_identity: bool
    fraction_moved: float
    similarity_before: float
    similarity_after: float
    solver: str  # "certificate-identity" | "certificate-bf16" | "certificate-fp32" | "assignment" | "assignment-bf16"

    def to_dict(self, include_permutation: bool = True) -> dict[str, Any]:
        d = {
            "in_layer": self.in_layer,
            "out_layer": self.out_layer,
            "hidden_units": len(self.permutation),
            "is_identity": self.is_identity,
            "fraction_moved": round(self.fraction_moved, 6),
            "similarity_before": round(self.similarity_before, 6),
            "similarity_after": round(self.similarity_after, 6),
            "solver": self.solver,
        }
        if include_permutation:
            d["permutation"] = list(self.permutation)
        return d


@dataclass
class AlignmentInfo:
    """Result of aligning one expert to the pivot: one :class:`PairAlignment` per pair."""

    pairs: list[PairAlignment] = field(default_factory=list)
    sweeps: int = 0
    elapsed_s: float = 0.0

    @property
    def is_identity(self) -> bool:
        return all(p.is_identity for p in self.pairs)

    @property
    def fraction_moved(self) -> float:
        total = sum(len(p.permutation) for p in self.pairs)
        if total == 0:
            return 0.0
        return sum(p.fraction_moved * len(p.permutation) for p in self.pairs) / total

    @property
    def similarity_before(self) -> float:
        return float(np.mean([p.similarity_before for p in self.pairs])) if self.pairs else 1.0

    @property
    def similarity_after(self) -> float:
        return float(np.mean([p.similarity_after for p in self.pairs])) if self.pairs else 1.0

    def to_dict(self, max_permutation_len: int = 64) -> dict[str, Any]:
        """JSON-able summary; identity permutations and those longer than
        ``max_permutation_len`` are left out (a 4096-entry list helps nobody in a report; the
        object keeps them)."""
        return {
            "is_identity": self.is_identity,
            "fraction_moved": round(self.fraction_moved, 6),
            "similarity_before": round(self.similarity_before, 6),
            "similarity_after": round(self.similarity_after, 6),
            "sweeps": self.sweeps,
            "pairs": [
                p.to_dict(include_permutation=not p.is_identity and len(p.permutation) <= max_permutation_len)
                for p in self.pairs
            ],
        }


def identity_info(projector: Projector, solver: str = "pivot") -> AlignmentInfo:
    """The info of an expert that is its own pivot (or was not aligned: ``solver`` says why)."""
    pairs = []
    for a, b in projector.hidden_pairs():
        n = int(projector.layer(a).weight.shape[0])
        pairs.append(PairAlignment(a, b, list(range(n)), True, 0.0, 1.0, 1.0, solver))
    return AlignmentInfo(pairs=pairs)


def shares_coordinates(expert: Projector, reference: Projector, *, sample: int = SHARED_FRAME_SAMPLE) -> bool:
    """Cheap test that ``expert``'s hidden units already sit in ``reference``'s frame.

    For ``sample`` evenly spaced hidden units i of every ``linear -> act -> linear`` pair,
    the weight-matching similarity S[i, j] (see :func:`_solve_pair`) of the reference's
    unit i must be largest at the expert's unit i, strictly, over all j. Costs ``sample / n``
    of one similarity matrix. Units outside the sample are not examined, so this is a test,
    not a proof: callers use it where the user declared a shared init (the base), whose
    fine-tuned experts keep its coordinates however far they moved; there, when it passes,
    every unit's own match is (with overwhelming probability) itself and the full search
    would return the identity."""
    check_compatible([reference, expert], ["reference", expert.source or "expert"])
    for a, b in reference.hidden_pairs():
        p_in, p_out = _features(reference, a, b)
        e_in, e_out = _features(expert, a, b)
        n = p_in.shape[0]
        idx = torch.linspace(0, n - 1, min(sample, n), device=p_in.device).round().long().unique()
        s = _similarity(p_in[idx], p_out[idx], e_in, e_out, torch.float32)  # [sample, n]
        rows = torch.arange(idx.numel(), device=s.device)
        own = s[rows, idx].clone()
        s[rows, idx] = float("-inf")
        if not bool((own > s.max(dim=1).values).all()):
            return False
    return True


# --------------------------------------------------------------------------- helpers
def _features(projector: Projector, in_name: str, out_name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hidden unit: in-side features [W_in row | b_in] and out-side features W_out column."""
    lin = projector.layer(in_name)
    lout = projector.layer(out_name)
    w_in = lin.weight.float()
    parts = [w_in]
    if lin.bias is not None:
        parts.append(lin.bias.float().unsqueeze(1))
    f_in = torch.cat(parts, dim=1)
    f_out = lout.weight.float().t()  # [hidden, out]
    return f_in, f_out


def _col_dots(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(0)`` of two row-major matrices, in blocks of 256 rows: no full-size
    temporary (6x faster at 4096 x 4096; ``vector_norm(dim=0)`` is ~30x slower on CPU)."""
    acc = torch.zeros(a.shape[1], dtype=torch.promote_types(a.dtype, b.dtype), device=a.device)
    for r0 in range(0, a.shape[0], 256):
        acc += (a[r0:r0 + 256] * b[r0:r0 + 256]).sum(0)
    return acc


def _sq_norms(f_in: torch.Tensor, f_out: torch.Tensor | None) -> torch.Tensor:
    """Squared norm of every unit's features ``[f_in row | f_out row]`` (fp32). Row norms of
    a row-major matrix with ``vector_norm`` (20x faster than ``pow(2).sum(1)``); ``f_out``
    is usually a transposed view of a row-major weight, whose row norms are column sums of
    that weight (:func:`_col_dots`)."""
    vn = torch.linalg.vector_norm

    def sq(f: torch.Tensor) -> torch.Tensor:
        return vn(f, dim=1) ** 2 if f.stride(1) == 1 else _col_dots(f.t(), f.t())

    return sq(f_in) if f_out is None else sq(f_in) + sq(f_out)


def _similarity(
    p_in: torch.Tensor, p_out: torch.Tensor | None, e_in: torch.Tensor, e_out: torch.Tensor | None,
    dtype: torch.dtype, memo: dict | None = None, fp32: bool = True,
) -> torch.Tensor:
    """S = P_in E_in^T (+ P_out E_out^T), returned in fp32 (``fp32=False``: a half-dtype S
    stays in it; its values are exact in fp32 and every consumer promotes them, without an
    fp32 copy of the whole matrix). In a half dtype the two sides are joined into one
    feature matrix per projector first: one product accumulated in fp32 and rounded once
    (half the error of two rounded products and their rounded sum; the same speed).
    ``memo``: a dict kept per pivot pair, holding the pivot's joined matrix for the next
    expert."""
    if dtype == torch.float32 or p_out is None or e_out is None:
        s = p_in.to(dtype) @ e_in.to(dtype).t()
        if p_out is not None and e_out is not None:
            s = s + p_out.to(dtype) @ e_out.to(dtype).t()
        return s.float()

    def joined_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """[a | b]^T: features x units (b, the out-weights' columns, is a transposed view
        of a row-major weight, so this layout copies it without a strided transpose)."""
        out = torch.empty((a.shape[1] + b.shape[1], a.shape[0]), dtype=dtype, device=a.device)
        out[: a.shape[1]] = a.t()
        out[a.shape[1]:] = b.t()
        return out

    key = ("joined", dtype)
    p_joined = memo.get(key) if memo is not None else None
    if p_joined is None:
        p_joined = joined_t(p_in, p_out)
        if memo is not None:
            memo[key] = p_joined
    s = p_joined.t() @ joined_t(e_in, e_out)
    return s.float() if fp32 else s


def _certified_argmax(s: torch.Tensor, tol: torch.Tensor | None) -> torch.Tensor | None:
    """The row-argmax permutation when it is provably optimal, else None.

    If the row-wise best columns are all distinct, that permutation maximises every term of
    the objective, hence the sum. With ``tol`` (per-entry error bound of an approximate
    ``s``) each best entry must beat the runner-up of its row by more than twice the bound."""
    n = s.shape[0]
    if n == 1:
        return torch.zeros(1, dtype=torch.long)
    top = torch.topk(s, 2, dim=1)
    best = top.indices[:, 0]
    if torch.unique(best).numel() != n:
        return None
    if tol is not None:
        margin = top.values[:, 0].float() - top.values[:, 1].float()
        if not bool((margin > 2.0 * tol).all()):
            return None
    elif not bool((top.values[:, 0] > top.values[:, 1]).all()):
        return None  # ties: let the solver decide deterministically
    return best.cpu()


def _bf16_may_certify(
    p_in: torch.Tensor, p_out: torch.Tensor | None, e_in: torch.Tensor, e_out: torch.Tensor | None,
    tol: torch.Tensor,
) -> bool:
    """Whether the bf16 certificate has a chance: on :data:`SHARED_FRAME_SAMPLE` evenly
    spaced rows of the fp32 similarity (1/32 of it at 4096 units) every best column must
    be distinct and beat its runner-up by more than twice the bf16 error bound. Where it
    does not (experts from different inits), the bf16 matrix would be computed for nothing
    and is skipped; the result never depends on this (only the exact fp32 answer or a
    certified one is ever returned)."""
    n = p_in.shape[0]
    idx = torch.linspace(0, n - 1, min(SHARED_FRAME_SAMPLE, n), device=p_in.device).round().long().unique()
    s = _similarity(p_in[idx], p_out[idx] if p_out is not None else None, e_in, e_out, torch.float32)
    top = torch.topk(s, 2, dim=1)
    if torch.unique(top.indices[:, 0]).numel() != idx.numel():
        return False
    return bool((top.values[:, 0] - top.values[:, 1] > 2.0 * tol[idx]).all())


def _solve_pair(
    p_in: torch.Tensor, p_out: torch.Tensor | None, e_in: torch.Tensor, e_out: torch.Tensor | None,
    precision: str = "auto", memo: dict | None = None,
) -> tuple[torch.Tensor, str, float, float]:
    """Permutation maximising sum_i S[i, perm[i]] (rows: pivot units, columns: expert units).

    S[i, j] = <[W_in[i] | b_in[i]], [W_in'[j] | b_in'[j]]> + <W_out[:, i], W_out'[:, j]>.
    Where bf16 products are fast and the matrix is big, a bf16 S is tried first and
    accepted only with a certificate: if every row's best column beats every other one by
    more than the bf16 error bound and the row-best columns form a permutation, that
    permutation is provably the exact fp32 optimum (every term is at its row maximum).
    Otherwise the assignment is solved (:func:`.assignment.max_weight_matching`: exact,
    sparse and certified on big layers) on the fp32 S, or, with ``precision="auto"`` on a
    CPU with fast bf16 and a layer whose fp32 S costs over :data:`_BF16_ASSIGN_MIN_MACS`
    multiply-adds (4096 units: 86 G, ~1.3 s on 2 cores), on the bf16 S: the optimum of the
    bf16 similarities, whose fp32 score is within 2 * sum_i tol_i of the fp32 optimum
    (``tol``: the bf16 error bound), the same matching except between near-tied units.
    ``precision="float32"`` always solves the fp32 problem. ``memo``: a dict kept per pivot
    pair across experts (the pivot side's norms and joined bf16 features).

    Also returns the mean cosine similarity of matched units before (identity) and after,
    read off the similarity matrix that was computed anyway (bf16-accurate on the fast path,
    enough for a report)."""
    if precision not in ("auto", "float32"):
        raise ValueError(f"unknown alignment precision {precision!r}")
    n = p_in.shape[0]
    d = p_in.shape[1] + (p_out.shape[1] if p_out is not None else 0)
    memo = {} if memo is None else memo
    pn = memo.get("norms")
    if pn is None:
        pn = memo["norms"] = _sq_norms(p_in, p_out).sqrt()
    en = _sq_norms(e_in, e_out).sqrt()

    def stats(s: torch.Tensor, perm: torch.Tensor) -> tuple[float, float]:
        ar = torch.arange(n, device=s.device)
        idx = perm.to(s.device)
        before = (s[ar, ar] / (pn * en).clamp_min(1e-12)).mean()
        after = (s[ar, idx] / (pn * en[idx]).clamp_min(1e-12)).mean()
        return float(before), float(after)

    tol = _BF16_REL_ERROR * pn * en.max()  # per row: rel * ||a_i|| * max_j ||b_j||
    fast16 = n * n * d >= _BF16_MIN_MACS and bf16_is_fast(p_in.device.type)
    approx = (precision == "auto" and fast16 and p_in.device.type == "cpu"
              and n * n * d >= _BF16_ASSIGN_MIN_MACS)
    s16 = None
    # the sampled gate only saves a bf16 matrix that would be computed for nothing; with
    # ``approx`` it is computed anyway (0.02 s for the certificate, 0.05 s for the gate)
    if fast16 and (approx or _bf16_may_certify(p_in, p_out, e_in, e_out, tol)):
        s16 = _similarity(p_in, p_out, e_in, e_out, torch.bfloat16, memo, fp32=False)
        perm = _certified_argmax(s16, tol)
        if perm is not None:
            return (perm, "certificate-bf16", *stats(s16, perm))
        if not approx:
            s16 = None
    if approx:
        s = s16 if s16 is not None else _similarity(p_in, p_out, e_in, e_out, torch.bfloat16, memo, fp32=False)
    else:
        s = _similarity(p_in, p_out, e_in, e_out, torch.float32)
        perm = _certified_argmax(s, None)
        if perm is not None:
            return (perm, "certificate-fp32", *stats(s, perm))
    perm, _how = max_weight_matching(s)
    return (perm, "assignment-bf16" if approx else "assignment", *stats(s, perm))


def permute_hidden(projector: Projector, pair: tuple[str, str], perm: torch.Tensor) -> Projector:
    """Apply ``perm`` to the hidden units of ``pair``: rows (and bias) of the in-layer and
    columns of the out-layer. Exactly function preserving. Returns a new projector."""
    in_name, out_name = pair
    state = dict(projector.state())
    idx = perm.to(projector.layer(in_name).weight.device)
    state[f"{in_name}.weight"] = state[f"{in_name}.weight"][idx]
    if f"{in_name}.bias" in state:
        state[f"{in_name}.bias"] = state[f"{in_name}.bias"][idx]
    w_out = state[f"{out_name}.weight"]  # columns: a gather is ~1.5x faster than [:, idx]
    state[f"{out_name}.weight"] = torch.gather(w_out, 1, idx.unsqueeze(0).expand(w_out.shape[0], -1))
    return projector.with_state(state)


def _unit_products(
    wp: torch.Tensor, we: torch.Tensor, wpo: torch.Tensor, weo: torch.Tensor,
    bp: torch.Tensor | None, be: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per hidden unit (rows of the in-weights, columns of the out-weights): the feature
    product <f_p, f_e> and both squared norms (fp32)."""
    vn = torch.linalg.vector_norm
    diag = (wp * we).sum(1) + _col_dots(wpo, weo)
    pn2 = vn(wp, dim=1) ** 2 + _col_dots(wpo, wpo)
    en2 = vn(we, dim=1) ** 2 + _col_dots(weo, weo)
    if bp is not None and be is not None:
        bp, be = bp.float(), be.float()
        diag = diag + bp * be
        pn2 = pn2 + bp * bp
        en2 = en2 + be * be
    return diag, pn2, en2


def _identity_hopeless(pivot: Projector, expert: Projector, a: str, b: str) -> bool:
    """True when :data:`SHARED_FRAME_SAMPLE` evenly spaced units already show that the
    identity certificate cannot pass (experts from other inits), for 1/32 of its cost at
    4096 units: the certificate's gate needs every unit's own similarity to beat
    ``||f_p[i]|| * max_{j != i} ||f_e[j] - f_p[j]||``, and the maximum over the sample is a
    lower bound of that over all units, so a sampled unit failing against it fails the
    gate (sound: the caller then solves the matching)."""
    lp_in, lp_out = pivot.layer(a), pivot.layer(b)
    le_in, le_out = expert.layer(a), expert.layer(b)
    n = int(lp_in.weight.shape[0])
    if n <= 2 * SHARED_FRAME_SAMPLE:
        return False
    idx = torch.linspace(0, n - 1, SHARED_FRAME_SAMPLE, device=lp_in.weight.device).round().long()
    diag, pn2, en2 = _unit_products(
        lp_in.weight[idx].float(), le_in.weight[idx].float(), lp_out.weight[:, idx].float(),
        le_out.weight[:, idx].float(), None if lp_in.bias is None else lp_in.bias[idx],
        None if le_in.bias is None else le_in.bias[idx])
    dn = (en2 + pn2 - 2.0 * diag).clamp(min=0.0).sqrt()  # a lower bound suffices here
    return _gate_fails(diag, pn2.sqrt(), dn)


def _gate_fails(diag: torch.Tensor, pn: torch.Tensor, dn: torch.Tensor) -> bool:
    """Whether some unit's own similarity ``diag[i]`` does not beat
    ``pn[i] * max_{j != i} dn[j]`` (the identity certificate's gate, see
    :func:`_identity_certified`)."""
    if dn.numel() < 2:
        return False
    top2 = torch.topk(dn, 2)
    dn_other = torch.where(torch.arange(dn.numel(), device=dn.device) == top2.indices[0],
                           top2.values[1], top2.values[0])
    return bool((diag <= pn * dn_other).any())


def _identity_certified(
    expert: Projector, pivot: Projector, pair: tuple[str, str], cache: dict | None
) -> tuple[bool, float]:
    """Cheap proof that the identity is the optimal matching of ``pair``.

    With d_j = f_e[j] - f_p[j] (expert minus pivot features of unit j):
    S[i, j] = <f_p[i], f_e[j]> = G[i, j] + <f_p[i], d_j> <= G[i, j] + ||f_p[i]|| ||d_j||, where
    G is the pivot's own feature Gram matrix. If every S[i, i] beats that bound for all
    j != i, each row's maximum sits on the diagonal and the identity is optimal. G depends
    on the pivot only, so it is computed once per pivot (``cache``) instead of one full
    similarity matrix per expert: experts that share an init cost O(units x features).
    Returns (certified, mean cosine of unit i with unit i)."""
    a, b = pair
    lp_in, lp_out = pivot.layer(a), pivot.layer(b)
    le_in, le_out = expert.layer(a), expert.layer(b)
    if _identity_hopeless(pivot, expert, a, b):
        return False, float("nan")
    wp, we = lp_in.weight.float(), le_in.weight.float()
    wpo, weo = lp_out.weight.float(), le_out.weight.float()  # [out, hidden]: unit = column
    diag, pn2, en2 = _unit_products(wp, we, wpo, weo, lp_in.bias, le_in.bias)
    # ||e - p||^2 from the norms (no difference matrices); the added term covers the fp32
    # cancellation error, so dn is an upper bound and the certificate stays sound
    dn2 = (en2 + pn2 - 2.0 * diag).clamp(min=0.0) + 1e-6 * (en2 + pn2)
    pn, dn = pn2.sqrt(), dn2.sqrt()
    cos = float((diag / (pn * en2.sqrt()).clamp_min(1e-12)).mean())
    # Gate before the Gram matrix (86 G multiply-adds at LLaVA-1.5 size): the bound below
    # needs diag[i] > G[i, j] + pn[i] * dn[j] for every j != i. Where some unit's own
    # similarity does not even beat pn[i] * max_{j != i} dn[j], the certificate can only
    # pass through unusually negative Gram entries, so skip it (always sound: the caller
    # then solves the matching). Experts far from the pivot take this exit; shared-init
    # experts close to it do not.
    if _gate_fails(diag, pn, dn):
        return False, cos
    key = (id(lp_in.weight), id(lp_out.weight), a, b)
    gram = cache.get(key) if cache is not None else None
    if gram is None:
        f_in, f_out = _features(pivot, a, b)
        n, d = f_in.shape[0], f_in.shape[1] + f_out.shape[1]
        fast = n * n * d >= _BF16_MIN_MACS and bf16_is_fast(f_in.device.type)
        dt = torch.bfloat16 if fast else torch.float32
        g = _similarity(f_in, f_out, f_in, f_out, dt)
        rel = _BF16_REL_ERROR if fast else 2.0**-12
        gram = (g, rel)
        if cache is not None:
            cache[key] = gram
    g, rel = gram
    # g + rel * pn pn^T + pn dn^T in one pass (pn_i factors out of both outer products)
    bound = torch.addr(g, pn, rel * pn + dn)
    bound.fill_diagonal_(float("-inf"))
    ok = bool((diag > bound.max(dim=1).values).all())
    return ok, cos


# --------------------------------------------------------------------------- public
def align_to_pivot(
    expert: Projector, pivot: Projector, *, max_sweeps: int = 5, cache: dict | None = None,
    precision: str = "auto",
) -> tuple[Projector, AlignmentInfo]:
    """Permute ``expert``'s hidden units to match ``pivot`` (weight matching).

    Returns the aligned expert (same dtype/device, exactly the same function) and an
    :class:`AlignmentInfo`. Raises :class:`IncompatibleExperts` if the architectures differ.
    ``cache``: a dict shared by calls with the same pivot (keeps the pivot's feature Gram
    for the cheap identity certificate). ``precision``: "auto" or "float32", see
    :func:`_solve_pair` (only big layers on a CPU with fast bf16 can differ).
    """
    check_compatible([pivot, expert], ["pivot", expert.source or "expert"])
    t0 = time.perf_counter()
    pairs = pivot.hidden_pairs()
    if not pairs:
        return expert, AlignmentInfo(elapsed_s=time.perf_counter() - t0)
    n_units = [int(pivot.layer(a).weight.shape[0]) for a, _ in pairs]
    # Shared init: prove the identity optimal for every pair at once (a fixed point of the
    # coordinate descent below) without a similarity matrix per expert.
    certs = [_identity_certified(expert, pivot, pair, cache) for pair in pairs]
    if all(ok for ok, _ in certs):
        infos = [PairAlignment(a, b, list(range(n)), True, 0.0, cos, cos, "certificate-identity")
                 for (a, b), n, (_, cos) in zip(pairs, n_units, certs)]
        return expert, AlignmentInfo(pairs=infos, sweeps=0, elapsed_s=time.perf_counter() - t0)
    perms: list[torch.Tensor] = [torch.arange(n) for n in n_units]
    solvers: list[str] = ["identity"] * len(pairs)
    # A pair's out-layer is itself the in-layer of the next pair in a chain: its rows are
    # then still in the expert's order until that pair is solved; its column features are
    # only used once those rows are aligned (or it is the last layer).
    next_pair_of: dict[str, int] = {a: i for i, (a, _) in enumerate(pairs)}
    prev_pair_of: dict[str, int] = {b: i for i, (_, b) in enumerate(pairs)}
    solved = [False] * len(pairs)

    def current(i: int) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """Features of pair i for pivot and for the expert under the other pairs' perms."""
        a, b = pairs[i]
        p_in, p_out = _features(pivot, a, b)
        e_in, e_out = _features(expert, a, b)
        # columns of the in-layer follow the previous pair's permutation (if any)
        j = prev_pair_of.get(a)
        if j is not None:
            cols = perms[j].to(e_in.device)
            w = e_in[:, : e_in.shape[1] - (1 if expert.layer(a).bias is not None else 0)]
            e_in = torch.cat([w[:, cols], e_in[:, w.shape[1]:]], dim=1)
        # rows of the out-layer follow the next pair's permutation (if any)
        k = next_pair_of.get(b)
        if k is not None:
            if not solved[k]:
                return p_in, None, e_in, None
            e_out = e_out[:, perms[k].to(e_out.device)]
        return p_in, p_out, e_in, e_out

    sweeps = 0
    sims: list[tuple[float, float]] = [(1.0, 1.0)] * len(pairs)
    for sweeps in range(1, max_sweeps + 1):
        changed = False
        for i in range(len(pairs)):
            p_in, p_out, e_in, e_out = current(i)
            memo = cache.setdefault(("pivot", id(pivot.layer(pairs[i][0]).weight), pairs[i], p_out is None),
                                    {}) if cache is not None else None
            perm, solver, before, after = _solve_pair(p_in, p_out, e_in, e_out, precision, memo)
            if not torch.equal(perm, perms[i]):
                changed = True
            perms[i] = perm
            solvers[i] = solver
            sims[i] = (before, after)
            solved[i] = True
        if not changed or len(pairs) == 1:
            break

    aligned = expert
    infos: list[PairAlignment] = []
    for i, pair in enumerate(pairs):
        moved = float((perms[i] != torch.arange(n_units[i])).float().mean())
        infos.append(
            PairAlignment(pair[0], pair[1], [int(v) for v in perms[i].tolist()], moved == 0.0,
                          moved, sims[i][0], sims[i][1], solvers[i])
        )
    for i, pair in enumerate(pairs):
        if not infos[i].is_identity:
            aligned = permute_hidden(aligned, pair, perms[i])
    return aligned, AlignmentInfo(pairs=infos, sweeps=sweeps, elapsed_s=time.perf_counter() - t0)


def align_all(
    experts: list[Projector], pivot_index: int
) -> tuple[list[Projector], list[AlignmentInfo]]:
    """Align every expert to ``experts[pivot_index]``; the pivot itself is returned as is."""
    if not 0 <= pivot_index < len(experts):
        raise ValueError(f"pivot index {pivot_index} is out of range for {len(experts)} experts")
    pivot = experts[pivot_index]
    cache: dict = {}
    out: list[Projector] = []
    infos: list[AlignmentInfo] = []
    for k, e in enumerate(experts):
        if k == pivot_index:
            out.append(e)
            infos.append(identity_info(e))
        else:
            a, info = align_to_pivot(e, pivot, cache=cache)
            out.append(a)
            infos.append(info)
    return out, infos
