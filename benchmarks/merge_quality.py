"""Merge quality: every method with the same validation search, whole-world seeds,
scarce and missing calibration, PivotMerge's stages ablated in both modes.

    python benchmarks/merge_quality.py [--world demo|large|large-unequal] [--seeds N] [--jobs J]
        [--regimes full,img16,tok16,missing] [--methods a,b] [--json OUT] [--quick]
        [--experts-per-domain K] [--no-retrieval] [--ablation-regimes data-free,tok16]

Protocol (issue 12):

- **Worlds and seeds.** Seed s is a whole world of its own: encoder, language model,
  data, every projector (shared-init experts, different-init experts, the joint one) and
  the calibration subset, all from s (``kit.world_root(s)``; seed 0 of the demo world is
  the shipped artifacts, other seeds are built once into the user cache, about 6-7 min
  each on one core). ``--world large`` uses the larger benchmark world
  (``kit.world_root(s, preset="large")``).
- **Scores.** Each merged projector is scored on held-out **test** images of every domain:
  greedy-caption token accuracy, mean over domains (main score); retrieval accuracy and
  caption NLL beside it.
- **One validation search for every method.** Each configuration's searched parameter
  (``Param.search`` where a method declares one, e.g. RegMean's alpha, PivotMerge's
  ridge; otherwise its ``is_scale`` parameter times 0.25..3) is tried at 7 values on the
  **validation** split; the best value's test score is the row's score. The default
  settings' test score is shown beside it. Test scores are never used to choose anything.
- **Groups.** Data-free methods (no calibration) and data-driven methods (RegMean,
  RegMean++, the layer-wise distillation baseline, PivotMerge with calibration) are
  compared within their group. Data-driven rows are repeated per calibration regime:
  ``full`` (64 images per domain, all 16 patch tokens each), ``img16`` (16 images per
  domain), ``tok16`` (16 tokens per domain in all), ``missing`` (``full``, but domain
  ``seed mod D`` has no calibration data).
- **Scenarios.** ``shared``: experts from one init, which is the base; ``different``: each
  expert from its own init, methods that need a base get the experts' mean (``[ref=mean]``).
- **Ablations.** PivotMerge with each stage flipped from its default, in both modes, at the
  value PivotMerge's own search chose on that seed (one stage changed, nothing else).
- **Many experts** (``--experts-per-domain K``): K experts per domain, each trained on its own
  1/K shard of the domain's data (``kit.split_expert_set``); each gets its shard of the
  domain's calibration draw, so a regime's per-domain total is unchanged.
- **Statistics.** Mean ± std over seeds; PivotMerge's paired difference (same seed) to the
  best other row of its group and to each other row, with a 95 % Student-t interval; the
  ratio to the jointly trained projector.

``--jobs J`` runs seeds in parallel processes; ``--from-json F`` re-prints a saved run.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quality_report import MAIN, Row, compact, comparison_lines, table

from pivotmerge_gui.core.calibration import Calibration
from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.evaluation import CaptionSet, EvalResult, evaluate
from pivotmerge_gui.core.methods import list_methods
from pivotmerge_gui.core.methods.base import MergeMethod
from pivotmerge_gui.core.pipeline import jsonable, merge_projectors
from pivotmerge_gui.core.projector import Projector, mean_projector
from pivotmerge_gui.demo import kit

SCALE_FACTORS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)
SCALE_FACTORS_QUICK = (0.5, 1.0, 2.0)
REGIMES = {
    "full": "64 images per domain, all patch tokens",
    "img16": "16 images per domain, all patch tokens",
    "tok16": "16 tokens per domain",
    "missing": "64 images per domain; one domain (seed mod D) without data",
}
# PivotMerge's stage toggles: each ablation row flips one from the method's default
PIVOT_STAGES: tuple[tuple[str, str], ...] = (
    ("align_hidden_units", "hidden-unit alignment"),
    ("sdf", "SDF"),
    ("filter_conflicts", "conflict filtering"),
    ("residuals", "residuals"),
)
DATA_SEARCH = "alm_ridge"  # PivotMerge's searched parameter in data mode


@dataclass
class Config:
    """One row: a method with fixed settings, its searched parameter and grid."""

    label: str
    method: str
    params: dict[str, Any]
    group: str  # data-free | data-driven
    search: tuple[str, list[Any]] | None
    ref: str = "none"  # none | base | mean
    extra: dict[str, Any] = field(default_factory=dict)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def param(cls: type[MergeMethod], name: str):
    return next((p for p in cls.params if p.name == name), None)


def search_of(cls: type[MergeMethod], factors: Sequence[float], name: str | None = None,
              quick: bool = False) -> tuple[str, list[Any]] | None:
    """The parameter a validation search tries, and its values (7; 3 with --quick)."""
    p = param(cls, name) if name else next((q for q in cls.params if q.search), None)
    if p is not None and p.search:
        vals = list(p.search)
        return p.name, (vals[:: max(1, len(vals) // 3)][:3] if quick else vals)
    p = next((q for q in cls.params if q.is_scale), None)
    if p is None:
        return None
    vals: list[Any] = []
    for f in factors:
        v = float(p.default) * f
        if p.min is not None:
            v = max(v, float(p.min))
        if p.max is not None:
            v = min(v, float(p.max))
        if round(v, 4) not in vals:
            vals.append(round(v, 4))
    return p.name, vals


def stage_ablations(cls: type[MergeMethod], mode: str) -> list[tuple[str, dict[str, Any]]]:
    defaults = {p.name: p.default for p in cls.params}
    out = []
    for name, pretty in PIVOT_STAGES:
        if isinstance(defaults.get(name), bool):
            on = defaults[name]
            out.append((f"{'no' if on else 'with'} {pretty}", {name: not on}))
    if mode == "data-free":
        out.append(("ALM off", {"alm": "off"}))
    else:
        out.append(("ALM one coefficient per layer (data-lambda)", {"alm": "data-lambda"}))
        out.append(("plain ridge refit (no alignment, no SDF)", {"align_hidden_units": False, "sdf": False}))
    return out


def configs(methods: list[type[MergeMethod]], scenario: str, factors: Sequence[float],
            quick: bool) -> list[Config]:
    out: list[Config] = []
    for cls in methods:
        ref = "mean" if (cls.needs_base and scenario == "different") else (
            "base" if (cls.needs_base or cls.uses_base) and scenario == "shared" else "none")
        tag = " [ref=mean]" if ref == "mean" else ""
        if cls.name != "pivotmerge":
            group = "data-driven" if cls.needs_calibration else "data-free"
            out.append(Config(f"{cls.name}{tag}", cls.name, {}, group, search_of(cls, factors, quick=quick), ref))
            continue
        pm_ref = "base" if scenario == "shared" else "none"
        out.append(Config("pivotmerge (data-free)", "pivotmerge", {}, "data-free",
                          search_of(cls, factors, "scale", quick), pm_ref))
        for what, p in stage_ablations(cls, "data-free"):
            out.append(Config(f"pivotmerge (data-free): {what}", "pivotmerge", p, "data-free",
                              search_of(cls, factors, "scale", quick), pm_ref, {"ablation": True}))
        out.append(Config("pivotmerge (data)", "pivotmerge", {"alm": "data"}, "data-driven",
                          search_of(cls, factors, DATA_SEARCH, quick), pm_ref))
        for what, p in stage_ablations(cls, "data"):
            s = search_of(cls, factors, DATA_SEARCH, quick)
            out.append(Config(f"pivotmerge (data): {what}", "pivotmerge", {"alm": "data", **p}, "data-driven",
                              s, pm_ref, {"ablation": True}))
    return out


def make_calibration(world: kit.DemoWorld, regime: str, seed: int,
                     experts_of: dict[str, list[str]] | None = None) -> Calibration:
    """Unlabelled train-split features per domain, subset drawn from ``seed``. With
    ``experts_of`` (domain -> its experts, several per domain) each expert gets its own
    shard of its domain's draw, so a domain's total stays the regime's."""
    feats = world.features("train")
    g = torch.Generator().manual_seed(10_000 + seed)
    out: list[torch.Tensor | None] = []
    for d in world.domains:
        f = feats[d]  # [N, tokens, width]
        n_img = 16 if regime in ("img16", "tok16") else 64
        x = f[torch.randperm(f.shape[0], generator=g)[:n_img]]
        if regime == "tok16":  # one random patch token from each of 16 images
            x = x[torch.arange(n_img), torch.randint(0, x.shape[1], (n_img,), generator=g)]
        out.append(x.reshape(-1, x.shape[-1]).float().contiguous())
    if regime == "missing":
        out[seed % len(out)] = None
    if experts_of is None:
        return Calibration(features=out, domains=list(world.domains))
    feats_k: list[torch.Tensor | None] = []
    doms_k: list[str] = []
    for d, x in zip(world.domains, out):
        k = len(experts_of[d])
        for j in range(k):
            feats_k.append(None if x is None else x[j * len(x) // k:(j + 1) * len(x) // k].contiguous())
            doms_k.append(d)
    return Calibration(features=feats_k, domains=doms_k)


def summary_of(res: EvalResult) -> dict[str, Any]:
    d = res.to_dict()
    return {"mean": d["mean"], "per_domain": d["per_domain"], "samples": d["samples"]}


class SeedRun:
    """Every row of one world seed."""

    def __init__(self, args: argparse.Namespace, seed: int, methods: list[type[MergeMethod]]) -> None:
        self.args, self.seed, self.methods = args, seed, methods
        t = time.time()
        root = (args.artifacts if (seed == 0 and args.artifacts is not None)
                else kit.world_root(seed, **({} if args.world == "demo" else {"preset": args.world})))
        self.world = kit.load_world(root)
        self.paths = kit.expert_set(self.world.manifest["seed"], root=root)
        self.experts_of: dict[str, list[str]] | None = None  # None: one expert per domain, named by it
        if args.experts_per_domain > 1:  # many experts: each domain's data split between k
            split = kit.split_expert_set(args.experts_per_domain, root)
            self.paths = {**self.paths, "shared": split["shared"], "different": split["different"]}
            self.experts_of = {d: [n for n, dd in split["domain_of"].items() if dd == d] for d in self.world.domains}
        log(f"seed {seed}: world {root} ready in {time.time() - t:.0f} s")
        n_val, n_test = (32, 64) if args.quick else (args.val_n, args.test_n)
        self.val = self.world.caption_sets("val", n_val)
        self.test = self.world.caption_sets("test", n_test)
        self.factors = SCALE_FACTORS_QUICK if args.quick else SCALE_FACTORS

    def eval(self, proj: Projector, sets: dict[str, CaptionSet], full: bool) -> EvalResult:
        parts: tuple[str, ...] = ("generate",)
        if full:
            parts = ("nll", "generate") if self.args.no_retrieval else ("nll", "generate", "retrieval")
        return evaluate(self.world.backend, proj, sets, parts=parts)

    def run(self, scenarios: list[str], regimes: list[str]) -> dict[str, dict[str, dict[str, Row]]]:
        out: dict[str, dict[str, dict[str, Row]]] = {}
        for scenario in scenarios:
            out[scenario] = self.scenario(scenario, regimes)
        return out

    def scenario(self, scenario: str, regimes: list[str]) -> dict[str, dict[str, Row]]:
        names = (list(self.world.domains) if self.experts_of is None
                 else [n for d in self.world.domains for n in self.experts_of[d]])
        experts = [kit.load_projector_file(self.paths[scenario][d]) for d in names]
        base = kit.load_projector_file(self.paths["base"]["shared"]) if scenario == "shared" else None
        refs = {"none": None, "base": base, "mean": mean_projector(experts)}
        tables: dict[str, dict[str, Row]] = {"reference": {}}
        tag = f"[{scenario} seed {self.seed}]"

        def put(tbl: str, row: Row, rec: dict[str, Any]) -> None:
            tables.setdefault(tbl, {}).setdefault(row.label, row).per_seed.append({"seed": self.seed, **rec})

        refs_rows = [(f"expert: {d}", "expert", e) for d, e in zip(names, experts)]
        refs_rows.append(("joint (all domains, upper bound)", "joint", kit.load_projector_file(self.paths["joint"])))
        if base is not None:
            refs_rows.append(("base (shared init, untrained)", "base", base))
        for label, kind, proj in refs_rows:
            put("reference", Row(label, kind, group="reference"), {"test": summary_of(self.eval(proj, self.test, True))})

        cfgs = configs(self.methods, scenario, self.factors, self.args.quick)
        for regime in ["data-free", *regimes]:
            cal = None if regime == "data-free" else make_calibration(self.world, regime, self.seed, self.experts_of)
            group = "data-free" if regime == "data-free" else "data-driven"
            chosen_main: dict[str, Any] = {}  # PivotMerge's validation choice in this group
            ablate = self.args.ablation_regimes is None or regime in self.args.ablation_regimes
            for c in (c for c in cfgs if c.group == group and (ablate or not c.extra.get("ablation"))):
                t = time.time()

                def do(extra: dict[str, Any], c: Config = c, cal: Calibration | None = cal):
                    return merge_projectors(experts, c.method, {**c.params, **extra}, base=refs[c.ref],
                                            calibration=cal, seed=self.seed, names=names)
                row = Row(c.label, "merge", c.method, group, c.search[0] if c.search else "")
                try:
                    rec = self.tune(do, c, chosen_main)
                except PivotMergeError as exc:
                    put(regime, row, {"error": str(exc)})
                    log(f"  {tag} {regime} {c.label}: n/a ({exc})")
                    continue
                rec["seconds"] = round(time.time() - t, 2)
                put(regime, row, rec)
                log(f"  {tag} {regime} {c.label}: test {MAIN} {rec['test']['mean'][MAIN]:.3f} "
                    f"(chosen {rec.get('chosen')}, default {rec['default_test']['mean'][MAIN]:.3f})")
        return tables

    def tune(self, do: Any, c: Config, chosen_main: dict[str, Any]) -> dict[str, Any]:
        """The validation search of one row; test scores of the chosen and default settings.
        An ablation row is not searched: it flips one stage of PivotMerge's row at the value
        that row's search chose (``chosen_main``), everything else identical."""
        default = do({})
        rec: dict[str, Any] = {"params": c.params, "default_test": summary_of(self.eval(default.projector, self.test, False))}
        chosen = default
        if c.extra.get("ablation"):
            if c.search is not None and c.search[0] in chosen_main:
                fixed = {c.search[0]: chosen_main[c.search[0]]}
                chosen = do(fixed)
                rec["fixed"] = fixed
        elif c.search is not None:
            name, values = c.search
            best: tuple[float, Any, Any] | None = None
            val_scores = {}
            for v in values:
                r = do({name: v})
                s = self.eval(r.projector, self.val, False).score(MAIN)
                val_scores[str(v)] = round(s, 5)
                if best is None or s > best[0] + 1e-12:
                    best = (s, v, r)
            assert best is not None
            chosen = best[2]
            rec.update(chosen=best[1], val_scores=val_scores)
            if c.method == "pivotmerge":
                chosen_main[name] = best[1]
        rec["test"] = summary_of(self.eval(chosen.projector, self.test, True))
        if c.method == "pivotmerge" and not c.extra.get("ablation"):
            rec["report"] = jsonable(chosen.report)
        return rec


def merge_rows(results: dict, part: dict) -> None:
    """Add one seed's tables (``part``) to ``results`` (scenario -> table -> label -> Row)."""
    for scenario, tables in part.items():
        for tname, rows in tables.items():
            dst = results.setdefault(scenario, {}).setdefault(tname, {})
            for label, r in rows.items():
                row = r if isinstance(r, Row) else Row(**r)
                if label in dst:
                    dst[label].per_seed.extend(row.per_seed)
                else:
                    dst[label] = Row(row.label, row.kind, row.method, row.group, row.tuned_param, list(row.per_seed))


def run_parallel(argv: list[str], seeds: list[int], jobs: int, results: dict) -> None:
    """One worker process per seed (at most ``jobs`` at once), combined in seed order."""
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        outs = {s: Path(tmp) / f"seed{s}.json" for s in seeds}
        pending, running = list(seeds), []
        while pending or running:
            while pending and len(running) < jobs:
                s = pending.pop(0)
                cmd = [sys.executable, __file__, *argv, "--only-seed", str(s), "--rows-out", str(outs[s])]
                running.append((s, subprocess.Popen(cmd)))
            s, proc = running.pop(0)
            if proc.wait() != 0:
                raise SystemExit(f"worker for seed {s} failed with exit code {proc.returncode}")
        for s in seeds:
            merge_rows(results, json.loads(outs[s].read_text()))


def render(results: dict, domains: list[str], seeds: list[int], world: str, per_domain: int = 1) -> list[str]:
    many = f", {per_domain} experts per domain (each on its own shard of the domain's data)" if per_domain > 1 else ""
    out = [(f"# Merge quality, {world} world{many} ({len(seeds)} whole-world seed(s): {seeds}; main score: test "
           f"{MAIN}, mean over domains; cells: mean ± std over seeds; every row's searched "
           "parameter chosen on validation)"), ""]
    for scenario, tables in results.items():
        regimes = [t for t in tables if t not in ("reference", "data-free")]
        out += [f"## Summary: {scenario} init (test {MAIN}, mean ± std over seeds)", "", compact(tables, regimes), ""]
    for scenario, tables in results.items():
        out += [f"## Scenario: {scenario} init", ""]
        joint = next((r for r in tables.get("reference", {}).values() if r.kind == "joint"), None)
        for tname, rows in tables.items():
            title = ("Experts and references" if tname == "reference" else
                     "Data-free methods" if tname == "data-free" else
                     f"Data-driven methods, calibration `{tname}` ({REGIMES.get(tname, tname)})")
            out += [f"### {title}", "", table(rows, domains), ""]
            if tname == "reference":
                continue
            pm_label = "pivotmerge (data-free)" if tname == "data-free" else "pivotmerge (data)"
            pm = rows.get(pm_label)
            others = [r for r in rows.values() if r.method != "pivotmerge"]
            out += comparison_lines(pm, others, joint, f"PivotMerge vs the other {tname} rows")
            abl = [r for lab, r in rows.items() if lab.startswith(pm_label + ":")]
            if abl:
                out += comparison_lines(pm, abl, None, "Each stage (PivotMerge minus the ablated row)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    ap.add_argument("--world", default="demo", help="demo (48 -> 64 -> 64, 4 domains) or large")
    ap.add_argument("--seeds", type=int, default=5, help="whole-world seeds 0..N-1 (0 = shipped demo world)")
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--quick", action="store_true", help="1 seed, 3-point searches, 32/64 images")
    ap.add_argument("--methods", default="", help="comma-separated subset of methods (default: all)")
    ap.add_argument("--scenarios", default="shared,different")
    ap.add_argument("--regimes", default=",".join(REGIMES), help=f"calibration regimes: {', '.join(REGIMES)}")
    ap.add_argument("--val-n", type=int, default=64, help="validation images per domain (searches)")
    ap.add_argument("--test-n", type=int, default=128, help="test images per domain")
    ap.add_argument("--artifacts", type=Path, default=None, help="seed 0's world folder (default: shipped)")
    ap.add_argument("--jobs", type=int, default=1, help="seeds in this many parallel processes")
    ap.add_argument("--no-retrieval", action="store_true",
                    help="test scores without retrieval accuracy (8 captions scored per image: the costliest part)")
    ap.add_argument("--ablation-regimes", type=lambda v: [r for r in v.split(",") if r], default=None,
                    help="PivotMerge's stage ablations only in these groups (data-free and/or regimes; default: all)")
    ap.add_argument("--experts-per-domain", type=int, default=1,
                    help="many experts: K per domain, each trained on 1/K of its domain's data (default 1)")
    ap.add_argument("--only-seed", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--rows-out", type=Path, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per process")
    ap.add_argument("--from-json", type=Path, nargs="+", default=None,
                    help="print the tables of saved --json run(s) (several: seeds combined; with --json, saved)")
    args = ap.parse_args(argv)
    if args.from_json:
        results: dict = {}
        docs = [json.loads(p.read_text()) for p in args.from_json]
        seeds_all: list[int] = []
        for doc in docs:  # runs of different seeds (same world and protocol) combine
            merge_rows(results, {sc: {t: {r["label"]: r for r in rows} for t, rows in tables.items()}
                                 for sc, tables in doc["scenarios"].items()})
            seeds_all += [s for s in doc["seeds"] if s not in seeds_all]
        print("\n".join(render(results, docs[0]["domains"], seeds_all, docs[0].get("world", "demo"),
                               docs[0].get("experts_per_domain", 1))))
        for doc in docs:
            print(f"_elapsed {doc['elapsed_s']:.0f} s; command: {doc['command']}_")
        if args.json:  # the combined run, in the same format
            combined = {**docs[0], "seeds": seeds_all, "elapsed_s": sum(d["elapsed_s"] for d in docs),
                        "command": " ; ".join(d["command"] for d in docs),
                        "scenarios": {sc: {t: [r.__dict__ for r in rows.values()] for t, rows in tables.items()}
                                      for sc, tables in results.items()}}
            args.json.write_text(json.dumps(jsonable(combined), indent=1))
        return 0
    torch.set_num_threads(args.threads)
    t0 = time.time()
    seeds = [args.first_seed] if args.quick else list(range(args.first_seed, args.first_seed + args.seeds))
    wanted = [m for m in args.methods.split(",") if m]
    methods = [m for m in list_methods() if not wanted or m.name in wanted]
    methods = [m for m in methods if m.name != "pivotmerge"] + [m for m in methods if m.name == "pivotmerge"]
    scenarios = [s for s in args.scenarios.split(",") if s]
    regimes = [r for r in args.regimes.split(",") if r]
    bad = [r for r in regimes if r not in REGIMES]
    if bad:
        ap.error(f"unknown regime(s) {bad}; choose from {list(REGIMES)}")

    results: dict = {}
    if args.only_seed is not None:  # worker of --jobs: one seed, raw rows to a file
        part = SeedRun(args, args.only_seed, methods).run(scenarios, regimes)
        args.rows_out.write_text(json.dumps(jsonable(
            {sc: {t: {lab: r.__dict__ for lab, r in rows.items()} for t, rows in tables.items()}
             for sc, tables in part.items()})))
        return 0
    if args.jobs > 1 and len(seeds) > 1:
        run_parallel(argv if argv is not None else sys.argv[1:], seeds, args.jobs, results)
    else:
        for seed in seeds:
            merge_rows(results, SeedRun(args, seed, methods).run(scenarios, regimes))
    # the domains of the world(s) the rows were scored on
    domains = list(next(iter(next(iter(results.values()))["reference"].values())).per_seed[0]["test"]["per_domain"])
    elapsed = time.time() - t0
    lines = render(results, domains, seeds, args.world, args.experts_per_domain)
    lines.append(f"_elapsed {elapsed:.0f} s, torch threads {args.threads}_")
    print("\n".join(lines))
    if args.json:
        doc = {
            "command": " ".join(["python", "benchmarks/merge_quality.py", *(argv if argv is not None else sys.argv[1:])]),
            "world": args.world, "experts_per_domain": args.experts_per_domain, "seeds": seeds,
            "domains": domains, "main_metric": MAIN,
            "regimes": {r: REGIMES[r] for r in regimes}, "scale_factors": list(SCALE_FACTORS),
            "elapsed_s": round(elapsed, 1),
            "scenarios": {sc: {t: [r.__dict__ for r in rows.values()] for t, rows in tables.items()}
                          for sc, tables in results.items()},
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(jsonable(doc), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
