"""Merge quality on the demo world: every method, PivotMerge and its ablations, both scenarios.

    python benchmarks/merge_quality.py [--json OUT] [--seeds N] [--quick] [--methods a,b]

What it measures (see ``pivotmerge_gui/demo`` and ``pivotmerge_gui/core/evaluation``):

- Four expert projectors (LLaVA ``mlp2x_gelu``, stage-1 trained on one domain each) are
  merged into one; the merge is scored on the held-out **test** split of every domain.
  Main score: greedy-caption **token accuracy**, mean over the four domains (each domain
  counts once). Retrieval accuracy (true caption vs 7 same-domain distractors, by caption
  likelihood) and caption NLL per token are shown beside it.
- Scenarios: ``shared`` (all experts from one init, as LLaVA's script does; the init is the
  ``base``) and ``different`` (each expert from its own random init: there is no common
  base). Methods that need a base get the **mean of the experts** as their reference in
  the different-init scenario; those rows are labelled ``[ref=mean]``. Note that task
  vectors measured from the experts' own mean sum to zero, so every method whose merged
  update is a scaled sum/mean of the task vectors (Task Arithmetic, Iso-C, SSAM...)
  returns exactly the weight average there; only non-linear combinations (TIES' sign
  election, DARE, TSV-M, KnOTS, ...) differ from it.
- Rows: each expert alone, the jointly trained projector (upper bound), every method of the
  registry at its reference defaults, and "tuned" (its ``is_scale`` parameter swept on the
  **validation** split, reported on test), PivotMerge with each stage switched off in turn,
  and PivotMerge with data-driven ALM on calibration features (unlabelled visual features,
  64 training images per domain). Methods that use calibration (RegMean) always get it.
- Sizes: sweeps score 64 validation images per domain, rows are scored on the first 128
  of the 256 test images per domain (``--val-n``/``--test-n``); ``--quick``: 32/64, one
  seed, 3-point sweeps.
- Seeds: seed 0 is the shipped artifacts; seeds 1.. are independent trainings of every
  projector on the same frozen encoder/LM/data, trained on first use into the user cache
  (``platformdirs.user_cache_dir("pivotmerge-gui")/demo-experts``, about a minute per seed
  on 2 cores). Cells show mean +- standard deviation over seeds.

It prints one markdown table per scenario (plus the best merge and PivotMerge's rank) and
writes everything (per seed, per domain, the chosen scale, every merge's report with
PivotMerge's per-layer details) as JSON with ``--json``; ``--from-json`` re-prints the
tables of a saved run. ``--jobs 3`` runs the seeds in parallel processes (a full run took
about 10 minutes wall on a busy 2-core machine that way).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from pivotmerge_gui.core.calibration import Calibration, calibration_from_features
from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.evaluation import (
    CaptionSet,
    EvalResult,
    evaluate,
)
from pivotmerge_gui.core.methods import list_methods
from pivotmerge_gui.core.methods.base import MergeMethod
from pivotmerge_gui.core.pipeline import jsonable, merge_projectors
from pivotmerge_gui.core.projector import Projector, mean_projector
from pivotmerge_gui.demo import kit

MAIN = "token_accuracy"
SCALE_FACTORS_FULL = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SCALE_FACTORS_QUICK = (0.5, 1.0, 2.0)
# PivotMerge's stage toggles: each ablation row flips one of them from the method's
# current default ("no X" when X is on by default, "with X" when it is off by default)
PIVOT_STAGES: tuple[tuple[str, str], ...] = (
    ("align_hidden_units", "hidden-unit alignment"),
    ("sdf", "SDF"),
    ("filter_conflicts", "conflict filtering"),
    ("residuals", "residuals"),
)


def pivot_ablations(cls: type[MergeMethod]) -> list[tuple[str, dict[str, Any]]]:
    defaults = {p.name: p.default for p in cls.params}
    out = []
    for name, pretty in PIVOT_STAGES:
        if isinstance(defaults.get(name), bool):
            on = defaults[name]
            out.append((f"{'no' if on else 'with'} {pretty}", {name: not on}))
    if "alm" in defaults and defaults["alm"] != "off":
        out.append(("ALM off", {"alm": "off"}))
    return out


@dataclass
class Row:
    label: str
    kind: str  # expert | joint | base | merge
    method: str = ""
    variant: str = ""  # default | tuned | ablation | calibrated
    per_seed: list[dict[str, Any]] = field(default_factory=list)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def scale_param(cls: type[MergeMethod]):
    return next((p for p in cls.params if p.is_scale), None)


def sweep_values(cls: type[MergeMethod], factors: Sequence[float]) -> list[float]:
    p = scale_param(cls)
    if p is None:
        return []
    vals = []
    for f in factors:
        v = float(p.default) * f
        if p.min is not None:
            v = max(v, float(p.min))
        if p.max is not None:
            v = min(v, float(p.max))
        v = round(v, 4)
        if v not in vals:
            vals.append(v)
    return vals


def run_eval(world: kit.DemoWorld, proj: Projector, sets: dict[str, CaptionSet], full: bool) -> EvalResult:
    parts = ("nll", "generate", "retrieval") if full else ("generate",)
    return evaluate(world.backend, proj, sets, parts=parts)


def summary_of(res: EvalResult) -> dict[str, Any]:
    d = res.to_dict()
    return {"mean": d["mean"], "per_domain": d["per_domain"], "samples": d["samples"]}


def merge(experts: list[Projector], names: list[str], method: str, params: dict[str, Any], *,
          base: Projector | None, calibration: Calibration | None, seed: int):
    return merge_projectors(experts, method, params, base=base, calibration=calibration,
                            seed=seed, names=names)


def bench_scenario(world: kit.DemoWorld, scenario: str, seed: int, paths: dict[str, Any],
                   val: dict[str, CaptionSet], test: dict[str, CaptionSet], cal: Calibration,
                   methods: list[type[MergeMethod]], factors: Sequence[float],
                   rows: dict[str, Row]) -> None:
    names = list(world.domains)
    experts = [kit.load_projector_file(paths[scenario][d]) for d in names]
    base = kit.load_projector_file(paths["base"]["shared"]) if scenario == "shared" else None
    mean_ref = mean_projector(experts)

    def record(label: str, kind: str, proj: Projector, method: str = "", variant: str = "",
               extra: dict[str, Any] | None = None) -> EvalResult:
        res = run_eval(world, proj, test, full=True)
        row = rows.setdefault(label, Row(label, kind, method, variant))
        row.per_seed.append({"seed": seed, "test": summary_of(res), **(extra or {})})
        log(f"  [{scenario} seed {seed}] {label}: {MAIN} {res.score(MAIN):.3f}")
        return res

    for d, e in zip(names, experts):
        record(f"expert: {d}", "expert", e)
    record("joint (all domains, upper bound)", "joint", kit.load_projector_file(paths["joint"]))
    if base is not None:
        record("base (shared init, untrained)", "base", base)

    for cls in methods:
        needs_ref = cls.needs_base and base is None
        ref = mean_ref if needs_ref else (base if (cls.needs_base or cls.uses_base) else None)
        cal_for = cal if cls.needs_calibration else None
        tag = " [ref=mean]" if needs_ref else ""

        def do(params: dict[str, Any], calibration: Calibration | None = cal_for,
               method: str = cls.name, ref: Projector | None = ref):
            return merge(experts, names, method, params, base=ref, calibration=calibration, seed=seed)

        label = f"{cls.name}{tag}"
        try:
            t = time.time()
            res = do({})
            record(f"{label} (default)", "merge", res.projector, cls.name, "default",
                   {"params": {}, "merge_s": round(time.time() - t, 3), "report": jsonable(res.report)})
        except PivotMergeError as exc:
            rows.setdefault(f"{label} (default)", Row(f"{label} (default)", "merge", cls.name, "default")
                            ).per_seed.append({"seed": seed, "error": str(exc)})
            log(f"  [{scenario} seed {seed}] {label}: n/a ({exc})")
            continue
        sp = scale_param(cls)
        if sp is not None:
            best = None
            for v in sweep_values(cls, factors):
                r = do({sp.name: v})
                score = run_eval(world, r.projector, val, full=False).score(MAIN)
                if best is None or score > best[0] + 1e-12:
                    best = (score, v, r)
            assert best is not None
            record(f"{label} (tuned {sp.name})", "merge", best[2].projector, cls.name, "tuned",
                   {"params": {sp.name: best[1]}, "val_score": best[0]})
        if cls.name == "pivotmerge":
            for what, params in pivot_ablations(cls):
                r = do(params)
                record(f"pivotmerge: {what}", "merge", r.projector, cls.name, "ablation",
                       {"params": params, "report": jsonable(r.report)})
            r = do({"alm": "data"}, cal)
            record("pivotmerge: ALM data-driven (calibration)", "merge", r.projector, cls.name,
                   "calibrated", {"params": {"alm": "data"}, "report": jsonable(r.report)})


def _stat(values: list[float]) -> tuple[float, float]:
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float], digits: int = 3) -> str:
    m, s = _stat(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(values) > 1 else f"{m:.{digits}f}"


def table(rows: dict[str, Row], domains: list[str]) -> str:
    head = ["projector", *domains, f"mean {MAIN}", "mean retrieval", "mean NLL", "chosen scale"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        ok = [s for s in row.per_seed if "test" in s]
        if not ok:
            err = row.per_seed[0].get("error", "") if row.per_seed else ""
            lines.append(f"| {row.label} | " + " | ".join(["n/a"] * (len(head) - 2)) + f" | {err[:60]} |")
            continue
        cells = [fmt([s["test"]["per_domain"][d][MAIN] for s in ok]) for d in domains]
        cells.append("**" + fmt([s["test"]["mean"][MAIN] for s in ok]) + "**")
        cells.append(fmt([s["test"]["mean"]["retrieval_accuracy"] for s in ok]))
        cells.append(fmt([s["test"]["mean"]["nll"] for s in ok]))
        scales = sorted({json.dumps(s.get("params", {})) for s in ok if row.variant == "tuned"})
        cells.append(", ".join(json.loads(x).popitem()[1].__repr__() for x in scales) if scales else "")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_seed(world: kit.DemoWorld, args: argparse.Namespace, seed: int, scenarios: list[str],
             val: dict[str, CaptionSet], test: dict[str, CaptionSet], cal: Calibration,
             methods: list[type[MergeMethod]], factors: Sequence[float],
             results: dict[str, dict[str, Row]]) -> None:
    t = time.time()
    paths = kit.expert_set(seed, root=args.artifacts)
    log(f"seed {seed}: experts ready in {time.time() - t:.1f} s ({paths['root']})")
    for scenario in scenarios:
        bench_scenario(world, scenario, seed, paths, val, test, cal, methods, factors, results[scenario])


def run_parallel(argv: list[str], seeds: list[int], jobs: int, scenarios: list[str],
                 results: dict[str, dict[str, Row]]) -> None:
    """One worker process per seed (at most ``jobs`` at once); rows combined in seed order."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outs = {s: Path(tmp) / f"seed{s}.json" for s in seeds}
        pending = list(seeds)
        running: list[tuple[int, subprocess.Popen[bytes]]] = []
        while pending or running:
            while pending and len(running) < jobs:
                s = pending.pop(0)
                cmd = [sys.executable, __file__, *argv, "--only-seed", str(s), "--rows-out", str(outs[s])]
                running.append((s, subprocess.Popen(cmd)))
            s, proc = running.pop(0)
            if proc.wait() != 0:
                raise SystemExit(f"worker for seed {s} failed with exit code {proc.returncode}")
        for s in seeds:
            for scenario, rows in json.loads(outs[s].read_text()).items():
                if scenario not in results:
                    continue
                for r in rows:
                    row = results[scenario].setdefault(r["label"], Row(r["label"], r["kind"], r["method"], r["variant"]))
                    row.per_seed.extend(r["per_seed"])


def summary(rows: dict[str, Row]) -> str:
    """One line: the best merge by mean test score, and where PivotMerge's rows stand."""
    scored = []
    for row in rows.values():
        ok = [s["test"]["mean"][MAIN] for s in row.per_seed if "test" in s]
        if row.kind == "merge" and ok:
            scored.append((*_stat(ok), row.label))
    if not scored:
        return ""
    scored.sort(reverse=True)
    best = scored[0]
    parts = [f"best merge: {best[2]} {best[0]:.3f} ± {best[1]:.3f}"]
    pm = [(i + 1, m, sd, label) for i, (m, sd, label) in enumerate(scored) if label.startswith("pivotmerge")]
    if pm:
        rank, m, sd, label = min(pm)
        parts.append(f"best PivotMerge row: {label} {m:.3f} ± {sd:.3f} (rank {rank} of {len(scored)} merge rows)")
    return "; ".join(parts)


def render(results: dict[str, dict[str, Row]], domains: list[str], seeds: list[int]) -> list[str]:
    title = (f"# Merge quality on the demo world ({len(seeds)} seed(s): {seeds}; "
             f"main score: test {MAIN}, mean over domains; cells: mean ± std over seeds)")
    out_lines = [title, ""]
    for scenario, rows in results.items():
        out_lines += [f"## Scenario: {scenario} init", "", table(rows, domains), "", summary(rows), ""]
    return out_lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--seeds", type=int, default=3, help="independent expert trainings (seed 0 = shipped)")
    ap.add_argument("--quick", action="store_true", help="1 seed, 3-point sweeps, 64 test images per domain")
    ap.add_argument("--methods", default="", help="comma-separated subset of methods (default: all)")
    ap.add_argument("--scenarios", default="shared,different")
    ap.add_argument("--val-n", type=int, default=64, help="validation images per domain (sweeps)")
    ap.add_argument("--test-n", type=int, default=128, help="test images per domain (of 256)")
    ap.add_argument("--artifacts", type=Path, default=None, help="demo world folder (default: shipped)")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run seeds in this many parallel processes (results are identical)")
    ap.add_argument("--only-seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 is fastest on a busy 2-core box)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the tables of an earlier run's --json output and exit")
    args = ap.parse_args(argv)
    if args.from_json is not None:
        doc = json.loads(args.from_json.read_text())
        results = {sc: {r["label"]: Row(r["label"], r["kind"], r["method"], r["variant"], r["per_seed"])
                        for r in rows} for sc, rows in doc["scenarios"].items()}
        first = next(r for rows in results.values() for r in rows.values() if r.per_seed)
        domains = list(first.per_seed[0]["test"]["per_domain"])
        print("\n".join(render(results, domains, doc["seeds"])))
        print(f"_elapsed {doc['elapsed_s']:.0f} s; command: {doc['command']}_")
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()

    world = kit.load_world(args.artifacts)
    seeds = [0] if args.quick else list(range(args.seeds))
    factors = SCALE_FACTORS_QUICK if args.quick else SCALE_FACTORS_FULL
    n_val, n_test = (32, 64) if args.quick else (args.val_n, args.test_n)
    val = world.caption_sets("val", n_val)
    test = world.caption_sets("test", n_test)
    cal = calibration_from_features(world.features("train"), world.domains, max_tokens=64 * 16, seed=0)
    wanted = [m for m in args.methods.split(",") if m]
    methods = [m for m in list_methods() if not wanted or m.name in wanted]
    if not wanted or "pivotmerge" in wanted:  # PivotMerge rows last, next to their ablations
        methods = [m for m in methods if m.name != "pivotmerge"] + [m for m in methods if m.name == "pivotmerge"]
    scenarios = [s for s in args.scenarios.split(",") if s]

    results: dict[str, dict[str, Row]] = {s: {} for s in scenarios}
    if args.only_seed is not None:  # worker of --jobs: one seed, raw rows to a file
        run_seed(world, args, args.only_seed, scenarios, val, test, cal, methods, factors, results)
        args.rows_out.write_text(json.dumps(jsonable(
            {s: [row.__dict__ for row in results[s].values()] for s in scenarios})))
        return 0
    if args.jobs > 1 and len(seeds) > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], seeds, args.jobs, scenarios, results)
    else:
        for seed in seeds:
            run_seed(world, args, seed, scenarios, val, test, cal, methods, factors, results)

    elapsed = time.time() - t0
    out_lines = render(results, world.domains, seeds)
    out_lines.append(f"_elapsed {elapsed:.0f} s, torch threads {args.threads}_")
    print("\n".join(out_lines))
    if args.json:
        doc = {
            "command": " ".join(["python", "benchmarks/merge_quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "seeds": seeds,
            "main_metric": MAIN,
            "scale_factors": list(factors),
            "sizes": {"val": n_val, "test": n_test},
            "elapsed_s": round(elapsed, 1),
            "manifest_files": world.manifest["files"],
            "scenarios": {s: [row.__dict__ for row in results[s].values()] for s in scenarios},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(jsonable(doc), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
