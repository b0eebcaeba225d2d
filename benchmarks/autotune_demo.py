"""Auto-tune on the demo world: does tuning per-layer coefficients on validation pairs
generalise to the held-out test split?

    python benchmarks/autotune_demo.py [--val 64] [--test 256] [--generations 10] [--population 8]

For each method: fitness (-NLL per token, mean over domains) of the untuned and the tuned
setting on validation and test, and the test token accuracy of both (greedy captions).
Runs single-threaded (the demo model is tiny; intra-op threads only add contention).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from pivotmerge_gui.core.evaluation import evaluate
from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.core.progress import drain
from pivotmerge_gui.core.tuning import autotune
from pivotmerge_gui.demo import kit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--val", type=int, default=64)
    ap.add_argument("--test", type=int, default=256)
    ap.add_argument("--generations", type=int, default=10)
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--methods", default="task_arithmetic,ties,pivotmerge")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(1)
    world = kit.load_world()
    experts = kit.load_experts("shared")
    base = kit.load_projector_file(kit.base_path("shared"))
    cal = kit.calibration("shared")
    val, test = world.caption_sets("val", args.val), world.caption_sets("test", args.test)
    rows = []
    for method in args.methods.split(","):
        kw = {"base": base, "calibration": cal if method in ("pivotmerge", "regmean") else None}
        t0 = time.perf_counter()
        res = drain(autotune(list(experts.values()), method, backend=world.backend, val_sets=val, test_sets=test,
                             names=list(experts), generations=args.generations, population=args.population,
                             seed=args.seed, **kw))
        acc = {}
        for label, coeffs in (("untuned", None), ("tuned", res.best.layer_coefficients)):
            proj = merge_projectors(list(experts.values()), method, base=base, calibration=kw["calibration"],
                                    layer_coefficients=coeffs).projector
            acc[label] = evaluate(world.backend, proj, test, parts=("generate",)).score("token_accuracy")
        row = {
            "method": method, "mode": res.mode, "evaluations": res.evaluations,
            "seconds": round(time.perf_counter() - t0, 2),
            "untuned_coefficients": res.initial.layer_coefficients, "tuned_coefficients": res.best.layer_coefficients,
            "val_fitness": [round(res.initial_fitness, 4), round(res.best_fitness, 4)],
            "test_fitness": [round(res.holdout_initial_fitness, 4), round(res.holdout_fitness, 4)],
            "test_token_accuracy": [round(acc["untuned"], 4), round(acc["tuned"], 4)],
            "generalises": res.generalises,
        }
        rows.append(row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
