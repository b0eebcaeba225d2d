"""Parity with the reference implementations: mergekit and FusionBench on the same tensors.

Builds one LLaVA ``mlp2x_gelu`` projector (the base) and K experts = base + random updates,
merges them with our methods and with the references' own code (mergekit's tensor API,
FusionBench's merging functions) on the same tensors, in float64 and in float32, and
prints per method the largest difference relative to the reference's largest update
entry (max |ours - ref| / max |ref - base| over all tensors), with the convention
differences that remain explained under the table.

    python benchmarks/parity.py [--size 64,256,192] [--experts 3] [--seed 0] [--json OUT]

Installs nothing. The references come from the optional extra (in a separate venv, as
they pull their own dependencies): ``pip install -e .[parity]`` (mergekit >= 0.1.5,
fusion-bench >= 0.2.33). Rows whose reference is not importable are skipped; when
neither is, it says so and exits 0.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pivotmerge_gui.core.methods import Calibration
from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.core.projector import Layer, Projector

WEIGHTS = (0.5, 1.0, 1.75, 1.25, 0.75, 1.5)  # per-expert weights where the reference takes them
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Row:
    method: str  # the row's label
    ref: str  # the reference call
    ours: tuple[str, dict, list[float] | None]  # (registry name, params, expert weights)
    theirs: Callable[[torch.dtype], State]  # the reference's merged state in a dtype
    note: str  # the convention differences that remain
    needs_cal: bool = False


# ----------------------------------------------------------------------------- inputs
def make_world(size: tuple[int, int, int], k: int, seed: int) -> tuple[Projector, list[Projector], Calibration]:
    """Base, K experts (base + low-rank-plus-noise updates of different sizes) and 128
    calibration features per expert, all in float64 holding float32 values."""
    d_in, d_hid, d_out = size
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return torch.randn(*shape, generator=g, dtype=torch.float64) * scale

    def proj(state: State, source: str) -> Projector:
        st = {key: v.float().double() for key, v in state.items()}
        return Projector(
            family="llava-mlp2x_gelu",
            layers=[
                Layer("0", "linear", {"weight": st["0.weight"], "bias": st["0.bias"]},
                      {"weight": "model.mm_projector.0.weight", "bias": "model.mm_projector.0.bias"}),
                Layer("2", "linear", {"weight": st["2.weight"], "bias": st["2.bias"]},
                      {"weight": "model.mm_projector.2.weight", "bias": "model.mm_projector.2.bias"}),
            ],
            ops=("linear:0", "gelu", "linear:2"),
            source=source,
        )

    base_state = {"0.weight": rnd(d_hid, d_in, scale=d_in**-0.5), "0.bias": rnd(d_hid, scale=0.02),
                  "2.weight": rnd(d_out, d_hid, scale=d_hid**-0.5), "2.bias": rnd(d_out, scale=0.02)}
    experts = []
    for i in range(k):
        st = {}
        for key, w in base_state.items():
            if w.dim() == 2:
                r = 8
                upd = rnd(w.shape[0], r) @ rnd(r, w.shape[1]) * (0.05 * (1 + i) / (r * w.shape[1]) ** 0.5)
                upd = upd + rnd(*w.shape, scale=0.01 / w.shape[1] ** 0.5)
            else:
                upd = rnd(*w.shape, scale=0.02)
            st[key] = w + upd
        experts.append(proj(st, f"expert_{i}"))
    cal = Calibration([rnd(128, d_in).float().double() + 0.2 * i for i in range(k)])
    return proj(base_state, "base"), experts, cal


def ours(name: str, params: dict, base: Projector, experts: list[Projector], dtype: torch.dtype,
         weights: list[float] | None = None, cal: Calibration | None = None) -> State:
    res = merge_projectors([e.to(dtype=dtype) for e in experts], name, params,
                           base=base.to(dtype=dtype) if name not in ("linear", "regmean") else None,
                           weights=weights, calibration=cal, dtype=dtype, out_dtype=dtype)
    return res.projector.state()


# ----------------------------------------------------------------------------- mergekit
def mergekit_rows(base: Projector, experts: list[Projector], k: int) -> list[Row]:
    from mergekit.merge_methods.api import merge_tensors

    w = list(WEIGHTS[:k])
    ids = ["base"] + [f"e{i}" for i in range(k)]

    def mk(method: str, shared: dict, per_expert: dict) -> Callable[[torch.dtype], State]:
        def run(dtype: torch.dtype) -> State:
            out = {}
            b = base.to(dtype=dtype).state()
            ex = [e.to(dtype=dtype).state() for e in experts]
            params = dict(shared)
            for pname, vals in per_expert.items():
                params[pname] = {ids[i + 1]: v for i, v in enumerate(vals)}
            for key in b:
                tensors = [b[key]] + [e[key] for e in ex]
                if method == "linear":  # no base in mergekit's linear
                    out[key] = merge_tensors(tensors[1:], method, parameters=params, ids=ids[1:], dtype=dtype)
                else:
                    out[key] = merge_tensors(tensors, method, parameters=params, ids=ids, base_index=0, dtype=dtype)
            return out
        return run

    dens = 0.25  # a multiple of 1/4 of every tensor size below: int() and round() agree
    return [
        Row(method="linear", ref="mergekit linear (weights, normalize)", ours=("linear", {}, w),
             theirs=mk("linear", {"normalize": True}, {"weight": w}),
             note="same formula"),
        Row(method="task_arithmetic", ref="mergekit task_arithmetic (weights, lambda 0.7)",
             ours=("task_arithmetic", {"scaling": 0.7}, w),
             theirs=mk("task_arithmetic", {"lambda": 0.7}, {"weight": w}),
             note="same formula"),
        Row(method="ties (divide_by: weight)", ref="mergekit ties (weights, density 0.25)",
             ours=("ties", {"density": dens, "divide_by": "weight"}, w),
             theirs=mk("ties", {}, {"weight": w, "density": [dens] * k}),
             note="same formula; mergekit keeps int(density*n) entries (argsort), we keep "
                  "round(density*n) and every entry tied with the threshold; a sign whose "
                  "mass is 0 is + in mergekit, the majority of signs here"),
        Row(method="ties (default divide_by: count)", ref="mergekit ties (weights, density 0.25)",
             ours=("ties", {"density": dens}, w),
             theirs=mk("ties", {}, {"weight": w, "density": [dens] * k}),
             note="EXPECTED difference: with unequal weights our default divides by the count of "
                  "agreeing experts (TIES paper), mergekit by the sum of their weights: set "
                  "divide_by: weight"),
        Row(method="dare_ties (p = 0, density 1, merge: sum)", ref="mergekit dare_ties (density 1)",
             ours=("dare_ties", {"drop_rate": 0.0, "density": 1.0, "merge": "sum"}, w),
             theirs=mk("dare_ties", {}, {"weight": w, "density": [1.0] * k}),
             note="mergekit's dare_ties has normalize: false (our merge: sum) and no magnitude "
                  "trim (its density is DARE's keep rate); DARE masks come from different RNGs "
                  "and mergekit rescales to the L1 norm instead of by 1/(1-p), so only p = 0 "
                  "compares exactly"),
        Row(method="breadcrumbs", ref="mergekit breadcrumbs (density 0.75, gamma 0.0625)",
             ours=("breadcrumbs", {"density": 0.75, "gamma": 0.0625, "scaling": 1.0}, w),
             theirs=mk("breadcrumbs", {}, {"weight": w, "density": [0.75] * k, "gamma": [0.0625] * k}),
             note="same mask when density*n and gamma*n are integers (mergekit floors both, we "
                  "round); entries tied at a threshold are kept here"),
    ]


# ----------------------------------------------------------------------------- FusionBench
def _fb_task_vectors(base: State, experts: list[State]) -> list[State]:
    return [{key: e[key] - base[key] for key in base} for e in experts]


def fusionbench_rows(base: Projector, experts: list[Projector], k: int, cal: Calibration) -> list[Row]:
    from fusion_bench.method.isotropic_merging.iso_utils import iso_c, iso_cts
    from fusion_bench.method.knots.knots_utils import subspace_alignment
    from fusion_bench.method.regmean.regmean import merging_with_regmean_weights
    from fusion_bench.method.task_singular_vector.utils.TSVM_utils import (
        compute_and_sum_svd_mem_reduction,
    )
    from fusion_bench.method.ties_merging.ties_merging_utils import ties_merging

    def states(dtype: torch.dtype) -> tuple[State, list[State]]:
        return base.to(dtype=dtype).state(), [e.to(dtype=dtype).state() for e in experts]

    def add(b: State, merged: State, lam: float) -> State:
        return {key: b[key] + lam * merged[key] for key in b}

    def ties_fb(stack: torch.Tensor, density: float) -> torch.Tensor:
        # FusionBench keeps int(k n) + 1 entries (all >= the k-th largest); this k makes that
        # our round(density n), so that the row compares the formulas, not the count
        n = stack[0].numel()
        k = (max(1, round(density * n)) - 0.5) / n
        return ties_merging(stack.reshape(stack.shape[0], -1), reset_thresh=k, merge_func="mean").view(stack.shape[1:])

    def fb_ties(dtype):
        b, ex = states(dtype)
        tvs = _fb_task_vectors(b, ex)
        return add(b, {key: ties_fb(torch.stack([t[key] for t in tvs]), 0.2) for key in b}, 1.0)

    def fb_tsv(dtype):
        b, ex = states(dtype)
        return add(b, compute_and_sum_svd_mem_reduction(_fb_task_vectors(b, ex), accelerator="cpu"), 1.0)

    def fb_iso_c(dtype):
        b, ex = states(dtype)
        return add(b, iso_c(_fb_task_vectors(b, ex), accelerator="cpu"), 1.0)

    def fb_iso_cts(dtype):
        b, ex = states(dtype)
        return add(b, iso_cts(_fb_task_vectors(b, ex), 0.8, accelerator="cpu"), 1.0)

    def fb_knots(dtype):
        b, ex = states(dtype)
        tvs = _fb_task_vectors(b, ex)
        merged = {}
        for key in b:
            stack = torch.stack([t[key] for t in tvs])
            if stack.dim() != 3:
                merged[key] = ties_fb(stack, 0.2)
                continue
            u, s, vhs = subspace_alignment(list(stack), svd_dtype=torch.float64, eps=0.0)
            coeffs = torch.stack([s.unsqueeze(1) * vh for vh in vhs])
            merged[key] = u @ ties_fb(coeffs, 0.2)
        return add(b, merged, 0.6)

    def fb_regmean(dtype):
        _, ex = states(dtype)
        grams = []
        for e, x in zip(experts, cal.features):
            pe = e.to(dtype=dtype)
            _, inputs = pe.forward_with_inputs(x.to(dtype), capture=True)
            grams.append({name: xi.T @ xi / xi.shape[0] for name, xi in inputs.items()})
        params = {key: [e[key] for e in ex] for key in ex[0]}
        return merging_with_regmean_weights(params, grams, reduce_non_diagonal_ratio=0.6)

    return [
        Row(method="ties", ref="FusionBench ties_merging (k ~0.2, mean), per tensor", ours=("ties", {}, None),
             theirs=fb_ties,
             note="same formula; FusionBench flattens the whole model (the paper) where we trim "
                  "per tensor (called per tensor here); it keeps int(k*n) + 1 entries (>= the "
                  "k-th value) where we keep round(k*n), so it is called with k = (round(0.2 n) - "
                  "0.5) / n (with k = 0.2 the extra entry alone moves the merge by ~0.26 of the "
                  "largest update); a zero-mass sign takes the majority sign of the whole tensor "
                  "there, the majority of the entry's signs here"),
        Row(method="tsv_m", ref="FusionBench compute_and_sum_svd_mem_reduction", ours=("tsv_m", {}, None),
             theirs=fb_tsv, note="same formula; FusionBench takes float32 SVDs where our "
             "singular triplets and polar factors come from float64 Gram eigenproblems, so its "
             "float32 rounding dominates the fp32 column (our float32 is closer to float64)"),
        Row(method="iso_c", ref="FusionBench iso_c", ours=("iso_c", {}, None), theirs=fb_iso_c,
             note="same formula; we leave out directions whose singular value is numerically 0 "
                  "(none here); FusionBench gives them the mean too"),
        Row(method="iso_cts", ref="FusionBench iso_cts (common fraction 0.8)", ours=("iso_cts", {}, None),
             theirs=fb_iso_cts, note="same formula"),
        Row(method="knots", ref="FusionBench subspace_alignment (eps 0) + ties_merging",
             ours=("knots", {}, None), theirs=fb_knots,
             note="same formula; FusionBench's default eps drops directions with singular value "
                  "< 1e-4 (absolute; 0 here); our basis comes from a float64 eigh of the Gram "
                  "matrix; trim count and zero-mass signs as for ties"),
        Row(method="regmean", ref="FusionBench merging_with_regmean_weights (ratio 0.6)",
             ours=("regmean", {"alpha": 0.6}, None), theirs=fb_regmean, needs_cal=True,
             note="same formula; FusionBench averages each Gram over its samples (equal counts "
                  "here) and inverts explicitly, we solve (Cholesky, float64)"),
    ]


# ----------------------------------------------------------------------------- table
def measure(row: Row, base: Projector, experts: list[Projector], cal: Calibration) -> dict[str, Any]:
    """Differences relative to the reference's largest update entry: both sides in float64,
    both in float32, and our float32 against the reference's float64."""
    name, params, weights = row.ours
    out: dict[str, Any] = {"method": row.method, "reference": row.ref, "note": row.note}
    b = base.state()
    scale = 0.0
    got: dict[str, tuple[State, State]] = {}
    for dtype, tag in ((torch.float64, "fp64"), (torch.float32, "fp32")):
        mine = ours(name, params, base, experts, dtype, weights, cal if row.needs_cal else None)
        with contextlib.redirect_stdout(io.StringIO()):  # FusionBench prints per tensor
            ref = row.theirs(dtype)
        got[tag] = (mine, ref)
        if tag == "fp64":
            scale = max(float((ref[key] - b[key]).abs().max()) for key in b) or 1.0

    def rel(x: State, y: State) -> float:
        return max(float((x[key].double() - y[key].double()).abs().max()) for key in b) / scale

    out["rel_fp64"] = rel(*got["fp64"])
    out["rel_fp32"] = rel(*got["fp32"])
    out["rel_ours32_ref64"] = rel(got["fp32"][0], got["fp64"][1])
    return out


def print_table(rows: list[dict[str, Any]]) -> None:
    head = f"{'method':40s} {'reference':53s} {'fp64':>8s} {'fp32':>8s} {'32 v 64':>8s}  note"
    print(head)
    print("-" * len(head))
    for i, r in enumerate(rows, 1):
        print(f"{r['method']:40s} {r['reference']:53s} {r['rel_fp64']:8.1e} {r['rel_fp32']:8.1e} "
              f"{r['rel_ours32_ref64']:8.1e}  [{i}]")
    print("\nmax |ours - reference| / max |reference - base| over all tensors (float64 reference):\n"
          "fp64 and fp32: both sides computed in that dtype; 32 v 64: our float32 merge against "
          "the reference's float64 merge.")
    for i, r in enumerate(rows, 1):
        print(f"[{i}] {r['note']}")
    print("Not in mergekit or FusionBench (no reference to compare): cart, ssam, pivotmerge; "
          "dare_linear / dare_ties with p > 0 (random masks from different generators).")


def available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="64,256,192", help="d_in,d_hidden,d_out of the projector")
    ap.add_argument("--experts", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, help="also write the rows here")
    args = ap.parse_args(argv)
    size = tuple(int(x) for x in args.size.split(","))
    if len(size) != 3 or min(size) < 4 or any(s % 4 for s in size):
        ap.error("--size takes three multiples of 4, e.g. 64,256,192")
    if not 2 <= args.experts <= len(WEIGHTS):
        ap.error(f"--experts must be 2..{len(WEIGHTS)}")
    have_mk, have_fb = available("mergekit"), available("fusion_bench")
    if not (have_mk or have_fb):
        print("parity: neither mergekit nor fusion_bench is importable here; nothing to compare.\n"
              "Install them in a separate virtual environment (they pull their own dependencies):\n"
              "  python -m venv /tmp/parity && /tmp/parity/bin/pip install torch -e '.[parity]'\n"
              "then run: /tmp/parity/bin/python benchmarks/parity.py")
        return 0
    for mod, ok in (("mergekit", have_mk), ("fusion_bench", have_fb)):
        if not ok:
            print(f"parity: {mod} is not importable; its rows are skipped")
    base, experts, cal = make_world(size, args.experts, args.seed)
    rows = (mergekit_rows(base, experts, args.experts) if have_mk else []) + (
        fusionbench_rows(base, experts, args.experts, cal) if have_fb else [])
    results = [measure(r, base, experts, cal) for r in rows]
    versions = {m: _version(m) for m, ok in (("mergekit", have_mk), ("fusion-bench", have_fb)) if ok}
    print(f"parity on {args.experts} experts of a {size[0]}->{size[1]}->{size[2]} projector; "
          f"torch {torch.__version__}; " + ", ".join(f"{k} {v}" for k, v in versions.items()) + "\n")
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps({"versions": versions, "size": size, "rows": results}, indent=2))
    return 0


def _version(dist: str) -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return "?"


if __name__ == "__main__":
    sys.exit(main())
