"""Time to caption the demo samples with every demo expert and a PivotMerge merge
(the test bench's work: teacher-forced NLL + greedy caption per pair and projector).

    python benchmarks/testbench_timing.py [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from pivotmerge_gui.core.evaluation.bench import run_bench
from pivotmerge_gui.core.evaluation.pairs import pairs_from_caption_sets
from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.core.progress import drain
from pivotmerge_gui.demo import kit


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch threads {torch.get_num_threads()}, load average {os.getloadavg()[0]:.1f}")
    world = kit.load_world()
    experts = kit.load_experts("shared")
    base = kit.load_projector_file(kit.base_path("shared"))
    t = time.perf_counter()
    merged = merge_projectors(list(experts.values()), "pivotmerge", base=base,
                              calibration=kit.calibration("shared"), names=list(experts)).projector
    print(f"PivotMerge merge: {time.perf_counter() - t:.2f} s")
    projs = {**experts, "PivotMerge": merged}
    for split, n in (("val", 4), ("val", None), ("test", None)):
        pairs = pairs_from_caption_sets(world.caption_sets(split, n))
        t = time.perf_counter()
        res = drain(run_bench(world.backend, projs, pairs))
        el = time.perf_counter() - t
        accs = ", ".join(f"{k} {res.metrics[k].mean.token_accuracy:.3f}" for k in projs)
        print(f"{split:4s} {len(pairs):5d} pairs x {len(projs)} projectors: {el:6.2f} s "
              f"({1000 * el / (len(pairs) * len(projs)):.2f} ms per pair and projector); token acc: {accs}")


if __name__ == "__main__":
    main()
