"""How many bytes does loading a projector from a big sharded checkpoint actually read?

Builds a synthetic HF-style sharded safetensors checkpoint (default ~3 GB: big
"language_model" tensors over several shards, the LLaVA-1.5-7B-shaped projector
``multi_modal_projector.linear_{1,2}`` (1024 -> 4096 -> 4096, bf16, ~42 MB) in one middle
shard), evicts it from the page cache (fsync + ``posix_fadvise(DONTNEED)``), then loads the
projector with ``pivotmerge_gui.core.io.load_projector`` in a fresh child process and
reports

- ``read_bytes`` (bytes the process caused to be fetched from storage, mmap page faults
  included) and ``rchar`` (bytes through read() syscalls) deltas from ``/proc/self/io``,
- page-cache residency of each shard after the load (``mincore``: what was touched,
  readahead included),
- wall time and peak RSS (``VmHWM``) of the child, and its RSS right before loading,

and the ratios of bytes read to the projector's bytes and to the checkpoint's bytes. With
``--naive`` it also measures a full load (every shard with ``safetensors.torch.load_file``,
each tensor materialized) for comparison. The checkpoint is deleted afterwards unless ``--keep``.

Linux only (``/proc/self/io``, ``mincore``). Usage::

    python benchmarks/sharded_read.py --size-gb 3 --json sharded_read.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import math
import mmap
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECTOR = {  # LLaVA-1.5-7B: CLIP ViT-L/14-336 (1024) -> Vicuna-7B (4096)
    "multi_modal_projector.linear_1.weight": (4096, 1024),
    "multi_modal_projector.linear_1.bias": (4096,),
    "multi_modal_projector.linear_2.weight": (4096, 4096),
    "multi_modal_projector.linear_2.bias": (4096,),
}


def build(folder: Path, size_gb: float, shards: int) -> dict:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    per_shard = int(size_gb * 1024**3 / shards)
    rows = 8192  # bf16 [8192, cols] tensors of ~128 MB
    cols = 8192
    tensor_bytes = rows * cols * 2
    weight_map: dict[str, str] = {}
    n = 0
    total = 0
    names = [f"model-{i + 1:05d}-of-{shards:05d}.safetensors" for i in range(shards)]
    proj_shard = names[shards // 2]
    for name in names:
        tensors = {}
        left = per_shard
        while left >= tensor_bytes // 4:
            c = min(cols, max(1, left // (rows * 2)))
            key = f"language_model.model.layers.{n}.mlp.weight"
            tensors[key] = torch.full((rows, c), float(n % 7) + 0.5, dtype=torch.bfloat16)
            left -= rows * c * 2
            n += 1
        if name == proj_shard:
            g = torch.Generator().manual_seed(0)
            for key, shape in PROJECTOR.items():
                tensors[key] = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in tensors})
        total += (folder / name).stat().st_size
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1)
    )
    return {"shards": names, "projector_shard": proj_shard, "checkpoint_bytes": total}


def evict(folder: Path) -> None:
    for p in folder.iterdir():
        fd = os.open(p, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def resident_bytes(path: Path) -> int:
    """Bytes of ``path`` in the page cache (mincore over a fresh mapping)."""
    size = path.stat().st_size
    if size == 0:
        return 0
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap failed")
        try:
            pages = (size + page - 1) // page
            vec = (ctypes.c_ubyte * pages)()
            if libc.mincore(ctypes.c_void_p(addr), size, vec) != 0:
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(1 for v in vec if v & 1) * page
        finally:
            libc.munmap(ctypes.c_void_p(addr), size)
    finally:
        os.close(fd)


CHILD = r"""
import json, os, sys, time
def io():
    d = {}
    for line in open("/proc/self/io"):
        k, v = line.split(":")
        d[k] = int(v)
    return d
def status(field):
    # VmHWM (peak RSS) is per address space, so it starts afresh at exec; ru_maxrss
    # would carry the parent's peak over fork+exec on Linux
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
mode, folder = sys.argv[1], sys.argv[2]
import torch
from pivotmerge_gui.core.io import load_projector
if mode == "naive":
    from safetensors.torch import load_file
rss_before = status("VmRSS")
a = io(); t = time.perf_counter()
if mode == "pivotmerge":
    p = load_projector(folder)
    nbytes, files = p.nbytes, list(p.files)
else:
    nbytes, files = 0, []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            # load_file returns views of a memory map: clone = what a full load costs
            st = {k: v.clone() for k, v in load_file(os.path.join(folder, name)).items()}
            nbytes += sum(v.numel() * v.element_size() for v in st.values())
            files.append(name)
            del st
wall = time.perf_counter() - t; b = io()
print(json.dumps({
    "wall_s": wall,
    "read_bytes": b["read_bytes"] - a["read_bytes"],
    "rchar": b["rchar"] - a["rchar"],
    "rss_before_load": rss_before,
    "peak_rss": status("VmHWM"),
    "loaded_bytes": nbytes,
    "files": files,
}))
"""


def measure(folder: Path, mode: str) -> dict:
    evict(folder)
    before = {p.name: resident_bytes(p) for p in sorted(folder.iterdir())}
    out = subprocess.run(
        [sys.executable, "-c", CHILD, mode, str(folder)], check=True, capture_output=True, text=True
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["resident_before"] = sum(before.values())
    result["resident_after"] = {p.name: resident_bytes(p) for p in sorted(folder.iterdir())}
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size-gb", type=float, default=3.0, help="checkpoint size (default 3)")
    ap.add_argument("--shards", type=int, default=4, help="number of shards (default 4)")
    ap.add_argument("--dir", type=Path, default=None, help="where to build it (default: a temp dir)")
    ap.add_argument("--naive", action="store_true", help="also measure a full load of every shard")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint")
    ap.add_argument("--json", type=Path, default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)

    root = Path(tempfile.mkdtemp(prefix="pm_sharded_", dir=args.dir))
    folder = root / "checkpoint"
    try:
        t = time.perf_counter()
        info = build(folder, args.size_gb, args.shards)
        build_s = time.perf_counter() - t
        projector_bytes = sum(2 * math.prod(shape) for shape in PROJECTOR.values())  # bf16
        results = {
            "size_gb": args.size_gb,
            "shards": args.shards,
            "checkpoint_bytes": info["checkpoint_bytes"],
            "projector_bytes": projector_bytes,
            "projector_shard": info["projector_shard"],
            "build_s": build_s,
            "pivotmerge": measure(folder, "pivotmerge"),
        }
        if args.naive:
            results["naive_full_load"] = measure(folder, "naive")
        for key in ("pivotmerge", "naive_full_load"):
            r = results.get(key)
            if r is None:
                continue
            r["read_over_projector"] = r["read_bytes"] / projector_bytes
            r["read_over_checkpoint"] = r["read_bytes"] / info["checkpoint_bytes"]
            r["resident_over_projector"] = sum(r["resident_after"].values()) / projector_bytes
        text = json.dumps(results, indent=2)
        if args.json:
            args.json.write_text(text)
        pm = results["pivotmerge"]
        mb = 1024**2
        print(f"checkpoint: {info['checkpoint_bytes'] / mb:.0f} MiB in {args.shards} shards; projector {projector_bytes / mb:.1f} MiB")
        print(
            f"load_projector: {pm['wall_s']:.3f} s, read_bytes {pm['read_bytes'] / mb:.1f} MiB "
            f"({pm['read_over_projector']:.2f}x projector, {pm['read_over_checkpoint']:.4f}x checkpoint), "
            f"rchar {pm['rchar'] / mb:.1f} MiB, page cache after {sum(pm['resident_after'].values()) / mb:.1f} MiB, "
            f"RSS {pm['rss_before_load'] / mb:.0f} -> peak {pm['peak_rss'] / mb:.0f} MiB"
        )
        if "naive_full_load" in results:
            nv = results["naive_full_load"]
            print(
                f"naive full load of every shard: {nv['wall_s']:.3f} s, read_bytes {nv['read_bytes'] / mb:.0f} MiB "
                f"({nv['read_over_checkpoint']:.2f}x checkpoint), peak RSS {nv['peak_rss'] / mb:.0f} MiB"
            )
        print(text if not args.json else f"results written to {args.json}")
    finally:
        if args.keep:
            print(f"kept {folder}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
