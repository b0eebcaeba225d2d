"""Bytes a full-model export writes, against the size of the model.

Builds a synthetic HF-Llava-style sharded safetensors model in a temp folder (default
3 GB in 4 shards: bf16 "language model" tensors of zeros, the LLaVA-1.5-7B-shaped projector
``multi_modal_projector.linear_{1,2}`` (1024 -> 4096 -> 4096, bf16, ~42 MB) in the last
shard, an index with ``total_size``, a config and tokenizer files), two projector-only
experts of the same shape, merges them (``linear``), and exports the merge into the model
(``pivotmerge_gui.core.io.export.export_model``) twice: with hard links (the default) and
with ``link=False`` (every unchanged file copied). For each it prints

- the model's size and the bytes the export wrote (its own count of new file bytes, and
  ``write_bytes`` / ``wchar`` deltas of ``/proc/self/io`` where Linux provides them),
- the ratio written / model size, the wall time,
- how many shards of OUT are hard links of the model's (same inode) and how many shards
  were rewritten,

and checks that the model's files are unchanged (sha256 of the rewritten shard's source,
size and inode of all). Usage::

    python benchmarks/export_bytes.py --size-gb 3 --shards 4 [--json export_bytes.json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

from sharded_read import PROJECTOR  # LLaVA-1.5-7B's projector shapes (benchmarks/ is on sys.path)


def build(folder: Path, size_gb: float, shards: int) -> int:
    import torch
    from safetensors.torch import save_file

    folder.mkdir(parents=True)
    per_shard = int(size_gb * 1024**3 / shards)
    cols = 8192
    rows = 4096  # bf16 [4096, 8192] tensors of 64 MB
    weight_map: dict[str, str] = {}
    total = 0
    n = 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        sd = {}
        size = 0
        if s == shards - 1:
            g = torch.Generator().manual_seed(0)
            for key, shape in PROJECTOR.items():
                sd[key] = (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)
                size += sd[key].numel() * 2
        while size + rows * cols * 2 <= per_shard:
            sd[f"model.language_model.layers.{n}.mlp.weight"] = torch.zeros(rows, cols, dtype=torch.bfloat16)
            size += rows * cols * 2
            n += 1
        save_file(sd, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(sd, name))
        total += size
        del sd
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    (folder / "config.json").write_text(json.dumps({"architectures": ["LlavaForConditionalGeneration"]}))
    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"vocab": {}}}))
    (folder / "tokenizer_config.json").write_text("{}")
    return total


def experts(root: Path, n: int = 2) -> list[str]:
    import torch
    from safetensors.torch import save_file

    out = []
    for i in range(n):
        g = torch.Generator().manual_seed(10 + i)
        sd = {k: (torch.randn(*s, generator=g) * 0.02).to(torch.bfloat16) for k, s in PROJECTOR.items()}
        p = root / f"expert{i}" / "model.safetensors"
        p.parent.mkdir(parents=True)
        save_file(sd, str(p))
        out.append(str(p))
    return out


def proc_io() -> dict[str, int]:
    try:
        lines = Path("/proc/self/io").read_text().splitlines()
    except OSError:
        return {}
    return {k: int(v) for k, v in (line.split(": ") for line in lines)}


def folder_state(folder: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_size) for p in folder.iterdir() if p.is_file()}


def run(size_gb: float, shards: int, keep: bool) -> dict:
    from pivotmerge_gui.core import pipeline
    from pivotmerge_gui.core.io.export import export_model, open_model
    from pivotmerge_gui.core.recipe import Recipe

    root = Path(tempfile.mkdtemp(prefix="pm-export-"))
    try:
        t0 = time.perf_counter()
        model = root / "model"
        build(model, size_gb, shards)
        build_s = time.perf_counter() - t0
        model_bytes = sum(p.stat().st_size for p in model.iterdir())
        files = experts(root)
        result = pipeline.run(pipeline.plan(Recipe(merge_method="linear", models=[{"model": f} for f in files])))
        before = folder_state(model)
        last = max(p for p in model.iterdir() if p.suffix == ".safetensors")
        last_sha = hashlib.sha256(last.read_bytes()).hexdigest()
        rows = []
        for link in (True, False):
            out = root / ("out-linked" if link else "out-copied")
            target = open_model(str(model))
            io0 = proc_io()
            t = time.perf_counter()
            rep = export_model(result, target, out, link=link)
            elapsed = time.perf_counter() - t
            io1 = proc_io()
            shard_names = [n for n in before if n.endswith(".safetensors")]
            linked = sum((out / n).stat().st_ino == before[n][0] for n in shard_names)
            rows.append({
                "mode": "hard links" if link else "copies",
                "model_bytes": model_bytes,
                "bytes_written": rep.bytes_written,
                "ratio": rep.bytes_written / model_bytes,
                "proc_write_bytes": io1.get("write_bytes", 0) - io0.get("write_bytes", 0) if io0 else None,
                "proc_wchar": io1.get("wchar", 0) - io0.get("wchar", 0) if io0 else None,
                "seconds": elapsed,
                "shards": len(shard_names),
                "shards_hard_linked": linked,
                "shards_rewritten": len(rep.rewritten),
            })
            shutil.rmtree(out)
        assert folder_state(model) == before, "the model's files changed"
        assert hashlib.sha256(last.read_bytes()).hexdigest() == last_sha, "the model's projector shard changed"
        return {"size_gb": size_gb, "build_s": build_s, "rows": rows, "tmp": str(root) if keep else None}
    finally:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size-gb", type=float, default=3.0)
    ap.add_argument("--shards", type=int, default=4)
    ap.add_argument("--keep", action="store_true", help="keep the temp folder")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args(argv)
    res = run(args.size_gb, args.shards, args.keep)
    gib = 1024**3
    print(f"synthetic model: {res['rows'][0]['model_bytes'] / gib:.2f} GiB in {args.shards} shards "
          f"(built in {res['build_s']:.1f} s)")
    print(f"{'mode':<11} {'written':>11} {'of model':>9} {'/proc write_bytes':>18} {'wchar':>11} "
          f"{'time':>8} {'linked':>7} {'rewritten':>9}")
    for r in res["rows"]:
        wb = f"{r['proc_write_bytes'] / 2**20:,.1f} MiB" if r["proc_write_bytes"] is not None else "n/a"
        wc = f"{r['proc_wchar'] / 2**20:,.1f} MiB" if r["proc_wchar"] is not None else "n/a"
        print(f"{r['mode']:<11} {r['bytes_written'] / 2**20:>7,.1f} MiB {r['ratio']:>8.2%} {wb:>18} {wc:>11} "
              f"{r['seconds']:>6.2f} s {r['shards_hard_linked']:>3}/{r['shards']:<3} {r['shards_rewritten']:>9}")
    print("the model's files: unchanged (inode, size; sha256 of the projector shard)")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    sys.exit(main())
