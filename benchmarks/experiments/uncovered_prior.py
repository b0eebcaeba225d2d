"""Validation-only experiment (issue 12, rejected): a missing domain's expert as the prior
of PivotMerge's data-driven refit.

Question: with one domain uncovered by calibration, does pulling the refit towards that
domain's expert (instead of the data-free merge) protect the domain without the cost of
the default stand-in targets (``alm_uncovered_weight`` = 2.5 on pooled covered inputs)?
Variants, each with PivotMerge's ``alm_ridge`` searched over its 7-value grid on the
**validation** split (64 images per domain), calibration regime ``missing`` of
``merge_quality.py``, both init scenarios, demo worlds 0..4:

- prior ``merge`` (the shipped code) with stand-in weight 2.5 (default) or 1.0;
- prior ``expert`` (the uncovered experts' mean replaces the data-free merge as the refit's
  prior) with stand-in weight 0, 1 or 2.5.

    python benchmarks/experiments/uncovered_prior.py 0,1,2,3,4

Prints per world and scenario the best validation mean token accuracy, the uncovered
domain's score there and the chosen ridge. Uses a wrapper around
``pivotmerge.alm.fit_layers``; nothing in the package changes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from merge_quality import make_calibration

from pivotmerge_gui.core.evaluation import evaluate
from pivotmerge_gui.core.methods.pivotmerge import alm
from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.demo import kit

RIDGES = (0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
VARIANTS = (("merge", 2.5), ("merge", 1.0), ("expert", 0.0), ("expert", 1.0), ("expert", 2.5))
MODE = {"prior": "merge"}
_fit_layers = alm.fit_layers


def fit_layers_with_prior(job, ref, aligned, tau_star, prior_coeff, fixed, xs, weights, ridge, report,
                          uncovered_weight=1.0):
    """``alm.fit_layers`` whose prior is the uncovered experts' mean when MODE says so."""
    missing = job.calibration.missing if job.calibration is not None else []
    if MODE["prior"] == "expert" and missing:
        cpu = torch.device("cpu")
        ref_state = ref.to(cpu, torch.float32).state()
        uncovered = [aligned[u].to(cpu, torch.float32).state() for u in missing]
        tau = dict(tau_star)
        for key, r in ref_state.items():
            if key in tau:
                own = sum(st[key] for st in uncovered) / len(uncovered)
                c = prior_coeff[alm.layer_of(key)] or 1.0
                tau[key] = (own - r) / c  # prior = ref + c * tau = the uncovered experts' mean
        tau_star = tau
    return (yield from _fit_layers(job, ref, aligned, tau_star, prior_coeff, fixed, xs, weights, ridge,
                                   report, uncovered_weight))


def main(seeds: list[int]) -> dict[str, list]:
    alm.fit_layers = fit_layers_with_prior
    torch.set_num_threads(1)
    out: dict[str, list] = {}
    for seed in seeds:
        root = kit.world_root(seed)
        world = kit.load_world(root)
        paths = kit.expert_set(world.manifest["seed"], root=root)
        names = list(world.domains)
        val = world.caption_sets("val", 64)
        cal = make_calibration(world, "missing", seed)
        uncovered = names[seed % len(names)]
        for scenario in ("shared", "different"):
            experts = [kit.load_projector_file(paths[scenario][d]) for d in names]
            base = kit.load_projector_file(paths["base"]["shared"]) if scenario == "shared" else None
            for prior, weight in VARIANTS:
                MODE["prior"] = prior
                best: tuple[float, float, float] | None = None
                for ridge in RIDGES:
                    res = merge_projectors(experts, "pivotmerge",
                                           {"alm": "data", "alm_ridge": ridge, "alm_uncovered_weight": weight},
                                           base=base, calibration=cal, seed=seed, names=names)
                    ev = evaluate(world.backend, res.projector, val, parts=("generate",))
                    score = ev.score("token_accuracy")
                    if best is None or score > best[0] + 1e-12:
                        best = (score, ev.score("token_accuracy", uncovered), ridge)
                assert best is not None
                out[f"{seed}/{scenario}/{prior}/{weight}"] = list(best)
                print(seed, scenario, prior, weight, "val mean {:.3f} uncovered {:.3f} ridge {}".format(*best), flush=True)
    return out


if __name__ == "__main__":
    result = main([int(a) for a in (sys.argv[1] if len(sys.argv) > 1 else "0,1,2,3,4").split(",")])
    print(json.dumps(result))
