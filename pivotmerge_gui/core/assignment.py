"""Exact maximum-weight perfect matching of a dense square score matrix, fast when it is big.

Why: weight matching (:mod:`.alignment`) solves one linear assignment per hidden layer.
The dense solver (``scipy.optimize.linear_sum_assignment``, Jonker-Volgenant) takes ~2 s
on 4096 x 4096 and more than the rest of a merge on unrelated experts (different random
inits), where no row has an obvious match.

How (a standard sparsify-and-certify scheme): solve the assignment on a few candidate
entries per row (the row's top-k, the optimum uses almost only those) with
``scipy.sparse.csgraph.min_weight_full_bipartite_matching`` (LAPJVsp), then prove the
result optimal for the whole matrix with LP duality. The assignment polytope is integral,
so a matching is optimal iff dual potentials exist with every reduced cost >= 0 and the
matched ones 0. Potentials come from shortest paths in the sparse problem's residual
graph (Bellman-Ford, which terminates because an optimal matching leaves no negative
cycle); one dense pass then checks every entry. Entries that violate the check join the
candidates and the sparse problem is solved again (rarely more than three rounds; where far more entries violate it than there are
candidates, e.g. on low-rank or tie-ridden matrices, the dense solver takes over). The
answer is the dense optimum up to float rounding: its score is within ``n * tol`` of it,
``tol = CERT_RTOL * (max|S| + max|potential|)``; where the optimum is unique it is the
same matching as the dense solver's.
"""

from __future__ import annotations

import numpy as np
import torch

#: at or below this many rows the dense solver is fast (~50 ms at 1024) and is used as is
DENSE_LIMIT = 1024
#: candidates per row to start with (doubled if they hold no perfect matching)
START_CANDIDATES = 64
#: rounds of "add the violating entries, solve again" before the dense solver takes over
MAX_ROUNDS = 6
#: relative slack of the dual check (fp32 rounding of scores and potentials)
CERT_RTOL = 1e-6
_CHECK_ROWS = 1024  # rows per block of the dense check (bounds its temporaries)


def _dense(s: torch.Tensor) -> torch.Tensor:
    from scipy.optimize import linear_sum_assignment  # lazy: 0.3-0.7 s of import

    rows, cols = linear_sum_assignment(s.detach().float().cpu().numpy(), maximize=True)
    out = np.empty(s.shape[0], dtype=np.int64)
    out[rows] = cols
    return torch.from_numpy(out)


def _potentials(rows: np.ndarray, cols: np.ndarray, vals: np.ndarray, perm: np.ndarray,
                eps: float) -> np.ndarray:
    """Column potentials d (<= 0) with d[j] <= d[perm[i]] + S[i, perm[i]] - S[i, j] for every
    candidate (i, j): shortest paths from a source joined to every column, along the
    residual graph's row-to-column steps (column perm[i] -> row i -> column j). Vectorised
    Bellman-Ford over edges sorted by target column; ``eps``: improvements below it end the
    relaxation (float rounding cannot then cycle)."""
    n = perm.shape[0]
    matched_val = np.zeros(n)
    m = cols == perm[rows]
    matched_val[rows[m]] = vals[m]
    keep = ~m
    src, dst = perm[rows[keep]], cols[keep]
    w = matched_val[rows[keep]] - vals[keep]
    order = np.argsort(dst, kind="stable")
    src, dst, w = src[order], dst[order], w[order]
    d = np.zeros(n)
    if dst.size == 0:
        return d
    targets, starts = np.unique(dst, return_index=True)
    for _ in range(n + 1):
        best = np.minimum.reduceat(d[src] + w, starts)
        better = best < d[targets] - eps
        if not better.any():
            break
        d[targets[better]] = best[better]
    return d


def _violations(s: torch.Tensor, perm: torch.Tensor, d: torch.Tensor, tol: float,
                per_row: int) -> tuple[torch.Tensor, int]:
    """Entries (i, j) with S[i, j] + d[j] > S[i, perm[i]] + d[perm[i]] + tol, as linear
    indices i * n + j (CPU): the ``per_row`` worst of each row (adding every violator of a
    hard, e.g. low-rank, matrix would make the sparse problem dense), and how many there
    are in all."""
    n = s.shape[0]
    out, total = [], 0
    for r0 in range(0, n, _CHECK_ROWS):
        r1 = min(n, r0 + _CHECK_ROWS)
        ar = torch.arange(r0, r1, device=s.device)
        p = perm[r0:r1]
        shifted = s[r0:r1] + d.unsqueeze(0)
        rhs = s[ar, p] + d[p] + tol
        rows = (shifted.amax(dim=1) > rhs).nonzero().squeeze(1)  # two passes over the block
        if rows.numel() == 0:
            continue
        ex = shifted[rows].sub_(rhs[rows].unsqueeze(1))
        total += int((ex > 0).sum())
        top = torch.topk(ex, min(per_row, n), dim=1)
        keep = top.values > 0
        i = (rows + r0).unsqueeze(1).expand_as(top.indices)[keep]
        out.append(i * n + top.indices[keep])
    if not out:
        return torch.empty(0, dtype=torch.long), 0
    return torch.cat(out).cpu(), total


def _top_keys(s: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Linear indices i * n + j (CPU) of each row's (dim=1) or column's (dim=0) ``k`` largest."""
    n = s.shape[0]
    ar = torch.arange(n, device=s.device)
    idx = torch.topk(s, k, dim=dim).indices
    keys = ar.unsqueeze(1) * n + idx if dim == 1 else idx * n + ar.unsqueeze(0)
    return keys.reshape(-1).cpu()


def max_weight_matching(s: torch.Tensor) -> tuple[torch.Tensor, str]:
    """Permutation ``perm`` (CPU int64) maximising ``sum_i s[i, perm[i]]`` for a square
    ``s`` (any device), and how it was solved: "dense" (the dense solver) or
    "sparse-certified" (candidates + dual certificate, see the module docstring). NaN
    scores are not supported (the caller's similarities are finite)."""
    n = s.shape[0]
    if s.dim() != 2 or s.shape[1] != n:
        raise ValueError(f"max_weight_matching needs a square matrix, got {tuple(s.shape)}")
    if s.dtype not in (torch.bfloat16, torch.float16):  # half values are exact in fp32: every
        s = s.float()  # op below promotes them (no fp32 copy of the whole matrix)
    if n <= DENSE_LIMIT:
        return _dense(s), "dense"
    from scipy.sparse import csr_matrix  # lazy: only big layers get here
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    lo, hi = torch.aminmax(s)  # max |s| without an |s| copy (10x faster on CPU)
    scale = max(-float(lo), float(hi))
    if scale == 0.0 or not np.isfinite(scale):
        return _dense(s), "dense"
    k = min(START_CANDIDATES, n)
    # candidates: each row's k best and the diagonal (which makes a perfect matching exist)
    keys = torch.unique(torch.cat([_top_keys(s, k, 1), torch.arange(n) * (n + 1)])).numpy()
    flat = s.reshape(-1)
    vals = flat[torch.from_numpy(keys).to(s.device)].double().cpu().numpy()
    row_max = s.max(dim=1).values.double().cpu().numpy()
    by_columns = False
    for _ in range(MAX_ROUNDS):
        rows, cols = keys // n, keys % n
        # cost = row max - score + scale > 0: a per-row constant changes no matching's rank
        graph = csr_matrix((row_max[rows] - vals + scale, (rows, cols)), shape=(n, n))
        r, c = min_weight_full_bipartite_matching(graph)
        perm = np.empty(n, dtype=np.int64)
        perm[r] = c
        d = _potentials(rows, cols, vals, perm, eps=1e-12 * scale)
        tol = CERT_RTOL * (scale + float(np.abs(d).max()))
        perm_t = torch.from_numpy(perm)
        bad, total = _violations(s, perm_t.to(s.device), torch.from_numpy(d).float().to(s.device), tol, k)
        if bad.numel() == 0:
            return perm_t, "sparse-certified"
        if total > n * k:
            # far from enough candidates: rows alone can crowd onto a few strong columns
            # (column-biased scores); add each column's k best once, else (low-rank or
            # tie-ridden matrices) the dense solver is faster
            if by_columns:
                break
            by_columns = True
            bad = _top_keys(s, k, 0)
        # candidates satisfy the check by construction (up to eps << tol): only new entries
        # (binary search in the sorted keys: setdiff1d's hashing of all keys cost 0.07 s)
        new = np.unique(bad.numpy())
        ordered = np.sort(keys)
        at = np.minimum(np.searchsorted(ordered, new), ordered.size - 1)
        new = new[ordered[at] != new]
        keys = np.concatenate([keys, new])
        vals = np.concatenate([vals, flat[torch.from_numpy(new).to(s.device)].double().cpu().numpy()])
    return _dense(s), "dense"
