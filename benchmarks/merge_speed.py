"""Merge speed and memory on several input families, every method, against mergekit TIES.

Families (``--family``, comma-separated, default ``shared-small``; ``all`` = every one):

- ``shared-small``: 4 experts shaped like LLaVA-1.5-7B's projector (Linear 1024->4096, GELU,
  Linear 4096->4096, bf16 ``mm_projector.bin``) sharing an init (saved as the base) and
  differing by low-rank-plus-noise updates like stage-1 alignment produces;
- ``shared-large``: the same shapes, updates as large as the init (full-rank, same norm);
- ``different-inits``: each expert from its own random init (base-optional methods run
  without a base; TIES and mergekit get expert 0's init as the base);
- ``llava-next``: LLaVA-NeXT's projector (1024->4096->4096 + ``model.image_newline``;
  ``--vision-width 1152`` for SigLIP) with large updates;
- ``qwen2-vl``: Qwen2-VL's merger in ``model.safetensors`` (``visual.merger.ln_q`` [1280],
  ``mlp.0`` 5120->5120, ``mlp.2`` 5120->3584) with large updates.

Every run is its own process, timed from the parent (start to exit, so imports count) with
that process's own peak RSS (``wait4``). Our rows run the whole user path (read with the
real readers, plan, merge, save projector + recipe + card). When mergekit is importable
(here, or in ``--mergekit-python``, default: ``$MERGEKIT_PYTHON`` or ``/tmp/parity/bin/python``)
its TIES runs on the same files through ``mergekit-pytorch`` (its raw PyTorch merge, fp32
compute like ours, same density), and the table gives our time and RSS as a ratio of it.
Figures are medians over ``--runs`` runs; the rows run interleaved, in an order that
rotates from round to round (with 3 runs of mergekit, PivotMerge and TIES each row follows
each other row once: a process right after mergekit's runs measurably slower).

    python benchmarks/merge_speed.py [--family all] [--methods pivotmerge,ties] [--runs 3] [--seed 0] [--json OUT]

Goal on a 2-core CPU: PivotMerge <= 0.5x mergekit TIES wall time and <= 0.6x its peak RSS;
our TIES <= 0.25x its wall time.

Scale test (issue 6): 16 experts of an 8192-wide projector on a 24 GB machine, merging three
times in one process to show that memory is released between merges:

    python benchmarks/merge_speed.py --experts 16 --width 8192 --repeat 3 --methods pivotmerge,ties
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

D_IN, D_HID, D_OUT = 1024, 4096, 4096
FAMILIES = ("shared-small", "shared-large", "different-inits", "llava-next", "qwen2-vl")
TIES_DENSITY = 0.2  # our TIES default; mergekit gets the same


def _llava_init(g, d_in: int, width: int) -> dict:
    import torch

    return {
        "model.mm_projector.0.weight": torch.randn(width, d_in, generator=g) / d_in**0.5,
        "model.mm_projector.0.bias": torch.zeros(width),
        "model.mm_projector.2.weight": torch.randn(width, width, generator=g) / width**0.5,
        "model.mm_projector.2.bias": torch.zeros(width),
    }


def _qwen2_vl_init(g) -> dict:
    import torch

    return {
        "visual.merger.ln_q.weight": torch.ones(1280),
        "visual.merger.ln_q.bias": torch.zeros(1280),
        "visual.merger.mlp.0.weight": torch.randn(5120, 5120, generator=g) / 5120**0.5,
        "visual.merger.mlp.0.bias": torch.zeros(5120),
        "visual.merger.mlp.2.weight": torch.randn(3584, 5120, generator=g) / 5120**0.5,
        "visual.merger.mlp.2.bias": torch.zeros(3584),
    }


def _update(g, w, large: bool):
    """Stage-1-like update of one tensor: low rank plus noise; ``large``: as large as the
    init (Frobenius norm of a 1/sqrt(fan_in) init), full rank."""
    import torch

    if w.dim() == 2:
        r = 64
        upd = (torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)) / (r * w.shape[1]) ** 0.5
        upd += (1.0 if large else 0.02) * torch.randn(w.shape, generator=g) / w.shape[1] ** 0.5
        return upd
    return (0.5 if large else 0.05) * torch.randn(w.shape, generator=g)


def make_inputs(root: Path, n_experts: int, seed: int = 0, width: int = D_HID, family: str = "shared-small",
                vision_width: int = D_IN) -> dict:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(seed)
    qwen = family == "qwen2-vl"
    fname = "model.safetensors" if qwen else "mm_projector.bin"

    def save(sd: dict, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        sd = {k: v.bfloat16().contiguous() for k, v in sd.items()}
        if qwen:
            save_file(sd, str(path), metadata={"format": "pt"})
        else:
            torch.save(sd, path)

    def init() -> dict:
        sd = _qwen2_vl_init(g) if qwen else _llava_init(g, vision_width, width)
        if family == "llava-next":
            sd["model.image_newline"] = torch.randn(width, generator=g) / width**0.5
        return sd

    base = init()
    save(base, root / "init" / fname)
    large = family not in ("shared-small", "different-inits")
    paths = []
    for k in range(n_experts):
        start = base if family != "different-inits" or k == 0 else init()
        sd = {key: w + _update(g, w, large) for key, w in start.items()}
        save(sd, root / f"expert_{k}" / fname)
        paths.append(str(root / f"expert_{k}" / fname))
    d_in = 5120 if qwen else vision_width
    # calibration features for RegMean / data-driven ALM: 512 visual tokens per domain
    cal = {f"expert_{k}": torch.randn(512 * (4 if qwen else 1), 1280 if qwen else d_in, generator=g)
           for k in range(n_experts)}
    save_file(cal, str(root / "calibration.safetensors"), metadata={"format": "pt"})
    return {"experts": paths, "base": str(root / "init" / fname), "calibration": str(root / "calibration.safetensors"),
            "family": family, "base_optional_without_base": family == "different-inits"}


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
    if cls.needs_base or (cls.uses_base and not inputs.get("base_optional_without_base")):
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
        "method_timings": {k: round(v, 3) for k, v in (result.report["method_report"] or {}).get("timings", {}).items()},
        **({"merge_s_each": [round(t, 3) for t in merge_times], "rss_mb_after_each": rss_after} if repeat > 1 else {}),
    }


MERGEKIT_SCRIPT = """
import sys
from mergekit.scripts.merge_raw_pytorch import main
sys.argv = ["mergekit-pytorch", *sys.argv[1:]]
main()
"""


def mergekit_python(explicit: str | None) -> str | None:
    """An interpreter that imports mergekit (this one first), or None."""
    candidates = [explicit] if explicit else [sys.executable, os.environ.get("MERGEKIT_PYTHON"), "/tmp/parity/bin/python"]
    for py in candidates:
        if py and Path(py).exists():
            ok = subprocess.run([py, "-c", "import mergekit.scripts.merge_raw_pytorch"], capture_output=True, check=False)
            if ok.returncode == 0:
                return py
    return None


def mergekit_config(inputs: dict, path: Path) -> None:
    """mergekit TIES on the same files: fp32 compute, bf16 output, our TIES defaults."""
    import yaml

    doc = {
        "merge_method": "ties",
        "base_model": inputs["base"],
        "models": [{"model": p, "parameters": {"weight": 1.0, "density": TIES_DENSITY}} for p in inputs["experts"]],
        "dtype": "float32",
        "out_dtype": "bfloat16",
    }
    path.write_text(yaml.safe_dump(doc))


def timed(cmd: list[str], env: dict) -> tuple[float, float, float, int, str, str]:
    """(wall s, CPU s (user + sys), peak RSS MB, exit code, stdout, stderr) of one child
    process (its own rusage from ``wait4``: on a shared machine CPU time is steadier than
    wall time)."""
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        cpu = usage.ru_utime + usage.ru_stime
        return wall, cpu, usage.ru_maxrss / 1024, proc.returncode, out.read(), err.read()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--methods", help="comma-separated registry names (default: all)")
    ap.add_argument("--family", default="shared-small", help=f"comma-separated, or 'all': {', '.join(FAMILIES)}")
    ap.add_argument("--runs", type=int, default=1, help="runs per row; the median is reported")
    ap.add_argument("--mergekit-python", help="interpreter with mergekit (default: this one, $MERGEKIT_PYTHON, /tmp/parity)")
    ap.add_argument("--no-mergekit", action="store_true", help="skip the mergekit TIES rows")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--experts", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0, help="seed of the generated experts (inits and updates)")
    ap.add_argument("--width", type=int, default=D_HID, help="LLaVA hidden and output width (LLaVA-1.5-7B: 4096)")
    ap.add_argument("--vision-width", type=int, default=D_IN, help="LLaVA input width (CLIP-L: 1024, SigLIP: 1152)")
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
        import gc

        gc.freeze()  # the child exits as the `pivotmerge` command does (cli.main.entry)
        return 0

    from pivotmerge_gui.core.methods import list_methods

    names = args.methods.split(",") if args.methods else [m.name for m in list_methods()]
    families = list(FAMILIES) if args.family == "all" else args.family.split(",")
    mk_py = None if args.no_mergekit else mergekit_python(args.mergekit_python)
    if mk_py is None and not args.no_mergekit:
        print("mergekit is not importable here (see --mergekit-python): no mergekit rows", file=sys.stderr)
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    rows = []
    for family in families:
        with tempfile.TemporaryDirectory() as tmp:
            root = Path(tmp)
            t = time.perf_counter()
            inputs = make_inputs(root / "inputs", args.experts, seed=args.seed, width=args.width, family=family,
                                 vision_width=args.vision_width)
            print(f"[{family}] built {args.experts} bf16 experts in {time.perf_counter() - t:.1f} s", file=sys.stderr)
            (root / "inputs.json").write_text(json.dumps(inputs))
            # rounds interleave the rows so that a load change on the machine hits every row
            # alike, and rotate their order (round r starts at row r): a process that follows
            # a long heavy one (mergekit: 13 s on both cores, 1.8 GB) runs measurably slower
            # (PivotMerge on different inits: 6.3-6.6 s alone, 6.8-7.8 s right after
            # mergekit), so every row follows each other row in turn
            if mk_py is not None:
                mergekit_config(inputs, root / "mergekit.yml")
            todo = (["mergekit-ties"] if mk_py is not None else []) + names
            runs: dict[str, list] = {n: [] for n in todo}
            failed: dict[str, str] = {}
            for r in range(args.runs):
                for name in todo[r % len(todo):] + todo[:r % len(todo)]:
                    if name in failed:
                        continue
                    if name == "mergekit-ties":
                        cmd = [str(mk_py), "-c", MERGEKIT_SCRIPT, str(root / "mergekit.yml"), str(root / "mk_out" / str(r))]
                    else:
                        cmd = [sys.executable, __file__, "--device", args.device, "--repeat", str(args.repeat),
                               "--threads", str(args.threads), "--child", name, str(root / "inputs.json"),
                               str(root / "out" / name / str(r))]
                    wall, cpu, rss, rc, out, err = timed(cmd, env)
                    if rc != 0:
                        print(f"[{family}] {name}: FAILED\n{err[-2000:]}", file=sys.stderr)
                        failed[name] = err.strip().splitlines()[-1] if err.strip() else "failed"
                        continue
                    row = {} if name == "mergekit-ties" else json.loads(out.strip().splitlines()[-1])
                    row.update(process_s=round(wall, 3), process_cpu_s=round(cpu, 3), process_peak_rss_mb=round(rss, 1))
                    runs[name].append(row)
                    print(f"[{family}] run {r + 1}: {name:<16} {wall:7.2f} s  {cpu:7.2f} CPU s  {rss:7.0f} MB",
                          file=sys.stderr)
            mk = None
            for name in todo:
                if name in failed:
                    rows.append({"family": family, "method": name, "error": failed[name]})
                    continue
                rs = runs[name]
                med = dict(rs[len(rs) // 2])
                for key in ("load_s", "merge_s", "save_s", "end_to_end_s", "process_s", "process_cpu_s",
                            "process_peak_rss_mb", "peak_rss_mb"):
                    if key in med:
                        med[key] = round(statistics.median(x[key] for x in rs), 3)
                med.update(family=family, method=name, runs_s=[x["process_s"] for x in rs],
                           runs_cpu_s=[x["process_cpu_s"] for x in rs])
                if name == "mergekit-ties":
                    mk = med
                elif mk is not None:
                    med["time_vs_mergekit_ties"] = round(med["process_s"] / mk["process_s"], 3)
                    med["cpu_vs_mergekit_ties"] = round(med["process_cpu_s"] / mk["process_cpu_s"], 3)
                    med["rss_vs_mergekit_ties"] = round(med["process_peak_rss_mb"] / mk["process_peak_rss_mb"], 3)
                rows.append(med)
    import platform

    import torch

    meta = {"threads": args.threads or "default", "experts": args.experts, "seed": args.seed, "families": families, "runs": args.runs,
            "width": args.width, "vision_width": args.vision_width, "repeat": args.repeat, "torch": torch.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine(), "device": args.device, "mergekit": bool(mk_py)}
    print(f"{args.experts} bf16 experts, device {args.device}, threads {args.threads or 'default'}, torch {torch.__version__}, "
          f"{os.cpu_count()} CPUs, median of {args.runs} run(s); times are whole processes (start to exit)")
    print("| family | method | load s | merge s | save s | process s | CPU s | peak RSS MB "
          "| x mergekit TIES time | x CPU | x RSS |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        if "error" in r:
            print(f"| {r['family']} | {r['method']} | failed: {r['error']} | | | | | | | | |")
        elif r["method"] == "mergekit-ties":
            print(f"| {r['family']} | mergekit TIES | | | | {r['process_s']:.2f} | {r['process_cpu_s']:.2f} | "
                  f"{r['process_peak_rss_mb']:.0f} | 1 | 1 | 1 |")
        else:
            rt = (f"{r['time_vs_mergekit_ties']:.2f} | {r['cpu_vs_mergekit_ties']:.2f} | {r['rss_vs_mergekit_ties']:.2f}"
                  if "time_vs_mergekit_ties" in r else "- | - | -")
            print(f"| {r['family']} | {r['method']} | {r['load_s']:.2f} | {r['merge_s']:.2f} | {r['save_s']:.2f} | "
                  f"{r['process_s']:.2f} | {r['process_cpu_s']:.2f} | {r['process_peak_rss_mb']:.0f} | {rt} |")
            if "rss_mb_after_each" in r:
                print(f"|   (repeats: merge s {r['merge_s_each']}, RSS MB after each {r['rss_mb_after_each']}) "
                      "| | | | | | | | | | |")
    if args.json:
        args.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=2))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
