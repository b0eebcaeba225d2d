"""Merge speed and memory: 4 experts shaped like LLaVA-1.5-7B's projector, every method.

Each expert is a bf16 ``mm_projector.bin`` (Linear 1024->4096, GELU, Linear 4096->4096) with
LLaVA's keys; experts share an init (saved as the base) and differ by low-rank-plus-noise
updates like stage-1 alignment produces. Every method runs end to end in its own process
(load with the real readers, plan, merge, save projector + recipe + card), so the peak RSS
of each row is that method's alone.

    python benchmarks/merge_speed.py [--json OUT] [--methods a,b] [--device cpu|cuda] [--experts 4]

Targets on a 2-core CPU machine: PivotMerge end to end < 5 s and < 1.2 GB peak RSS.

Scale test (issue 6): 16 experts of an 8192-wide projector on a 24 GB machine, merging three
times in one process to show that memory is released between merges:

    python benchmarks/merge_speed.py --experts 16 --width 8192 --repeat 3 --methods pivotmerge,ties
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_IN, D_HID, D_OUT = 1024, 4096, 4096


def make_inputs(root: Path, n_experts: int, seed: int = 0, width: int = D_HID) -> dict:
    import torch

    D_HID = D_OUT = width

    g = torch.Generator().manual_seed(seed)

    def init():
        return {
            "model.mm_projector.0.weight": torch.randn(D_HID, D_IN, generator=g) / D_IN**0.5,
            "model.mm_projector.0.bias": torch.zeros(D_HID),
            "model.mm_projector.2.weight": torch.randn(D_OUT, D_HID, generator=g) / D_HID**0.5,
            "model.mm_projector.2.bias": torch.zeros(D_OUT),
        }

    base = init()
    paths = {}
    (root / "init").mkdir(parents=True, exist_ok=True)
    torch.save({k: v.bfloat16() for k, v in base.items()}, root / "init" / "mm_projector.bin")
    for k in range(n_experts):
        sd = {}
        for key, w in base.items():
            if w.dim() == 2:
                r = 64
                upd = (torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)) / (r * w.shape[1]) ** 0.5
                upd += 0.02 * torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
            else:
                upd = 0.05 * torch.randn(w.shape, generator=g)
            sd[key] = (w + upd).bfloat16()
        d = root / f"expert_{k}"
        d.mkdir(exist_ok=True)
        torch.save(sd, d / "mm_projector.bin")
        paths[k] = str(d / "mm_projector.bin")
    # calibration features for RegMean / data-driven ALM: 512 visual tokens per domain
    from safetensors.torch import save_file

    cal = {f"expert_{k}": torch.randn(512, D_IN, generator=g) for k in range(n_experts)}
    save_file(cal, str(root / "calibration.safetensors"), metadata={"format": "pt"})
    return {"experts": [paths[k] for k in range(n_experts)], "base": str(root / "init" / "mm_projector.bin"),
            "calibration": str(root / "calibration.safetensors")}


def _rss_mb() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def run_one(method: str, inputs: dict, out_dir: Path, device: str, repeat: int = 1) -> dict:
    """Runs in the child process: the whole user path, timed."""
    t0 = time.perf_counter()
    from pivotmerge_gui.core import pipeline
    from pivotmerge_gui.core.methods import get_method
    from pivotmerge_gui.core.recipe import Recipe

    cls = get_method(method)
    doc = {
        "merge_method": method,
        "models": [{"model": p} for p in inputs["experts"]],
        "device": device,
    }
    if cls.needs_base or cls.uses_base:
        doc["base_model"] = inputs["base"]
    if cls.needs_calibration:
        doc["calibration"] = inputs["calibration"]
    recipe = Recipe.from_dict(doc)
    t_import = time.perf_counter() - t0
    t1 = time.perf_counter()
    plan = pipeline.plan(recipe)
    t_load = time.perf_counter() - t1
    rss_after = []
    merge_times = []
    for _ in range(repeat):
        t2 = time.perf_counter()
        result = pipeline.run(plan, release_inputs=repeat == 1)  # as the CLI does
        if plan.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        merge_times.append(time.perf_counter() - t2)
        if repeat > 1:
            del result
            rss_after.append(round(_rss_mb(), 1))
            result = None
    if result is None:
        result = pipeline.run(plan)
    t_merge = merge_times[0]
    t3 = time.perf_counter()
    pipeline.save_result(result, out_dir, overwrite=True)
    t_save = time.perf_counter() - t3
    return {
        "method": method,
        "device": str(plan.device),
        "import_s": round(t_import, 3),
        "load_s": round(t_load, 3),
        "merge_s": round(t_merge, 3),
        "save_s": round(t_save, 3),
        "end_to_end_s": round(time.perf_counter() - t0, 3),
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "estimated_peak_gib": round(plan.estimated_peak_bytes / 2**30, 2),
        **({"merge_s_each": [round(t, 3) for t in merge_times], "rss_mb_after_each": rss_after} if repeat > 1 else {}),
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--methods", help="comma-separated registry names (default: all)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--width", type=int, default=D_HID, help="hidden and output width (LLaVA-1.5-7B: 4096)")
    ap.add_argument("--repeat", type=int, default=1, help="merges per process (memory must not grow)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "INPUTS_JSON", "OUT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        method, inputs_json, out = args.child
        print(json.dumps(run_one(method, json.loads(Path(inputs_json).read_text()), Path(out), args.device, args.repeat)))
        return 0

    from pivotmerge_gui.core.methods import list_methods

    names = args.methods.split(",") if args.methods else [m.name for m in list_methods()]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t = time.perf_counter()
        inputs = make_inputs(root / "inputs", args.experts, width=args.width)
        print(f"built {args.experts} bf16 experts {D_IN}->{args.width}->{args.width} in {time.perf_counter() - t:.1f} s", file=sys.stderr)
        (root / "inputs.json").write_text(json.dumps(inputs))
        for name in names:
            proc = subprocess.run(
                [sys.executable, __file__, "--device", args.device, "--repeat", str(args.repeat), "--threads", str(args.threads), "--child", name, str(root / "inputs.json"), str(root / "out" / name)],
                capture_output=True, text=True, check=False, env={**os.environ, "PYTHONWARNINGS": "ignore"},
            )
            if proc.returncode != 0:
                print(f"{name}: FAILED\n{proc.stderr[-2000:]}", file=sys.stderr)
                rows.append({"method": name, "error": proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "failed"})
                continue
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"{name:<16} {row['end_to_end_s']:7.2f} s  {row['peak_rss_mb']:7.0f} MB", file=sys.stderr)
    import platform

    import torch

    meta = {"threads": args.threads or "default", "experts": args.experts, "shape": f"{D_IN}->{args.width}->{args.width} bf16", "repeat": args.repeat, "torch": torch.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine(), "device": args.device}
    print(f"{args.experts} experts {D_IN}->{args.width}->{args.width} bf16, device {args.device}, threads {args.threads or 'default'}, torch {torch.__version__}, {os.cpu_count()} CPUs")
    print("| method | load s | merge s | save s | end to end s | peak RSS MB |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['method']} | failed: {r['error']} | | | | |")
        else:
            print(f"| {r['method']} | {r['load_s']:.2f} | {r['merge_s']:.2f} | {r['save_s']:.2f} | {r['end_to_end_s']:.2f} | {r['peak_rss_mb']:.0f} |")
            if "rss_mb_after_each" in r:
                print(f"|   (repeats: merge s {r['merge_s_each']}, RSS MB after each {r['rss_mb_after_each']}) | | | | | |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
