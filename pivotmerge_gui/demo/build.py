"""Rebuild the demo world: ``python -m pivotmerge_gui.demo.build [--out DIR] [--tiny] [--seed N]``.

Writes, into ``DIR`` (default: the package's ``demo/artifacts``):

- ``vision_encoder.safetensors``, ``language_model.safetensors`` (frozen halves)
- ``shared/base/mm_projector.bin``: the shared init every shared-scenario expert starts from
- ``shared/<domain>/mm_projector.bin``: one expert per domain, shared init
- ``different/<domain>/mm_projector.bin``: one expert per domain, each from its own init
- ``joint/mm_projector.bin``: one projector trained on all domains (the upper bound)
- ``manifest.json``: sha256 of every file, both configs, the vocabulary, seeds, timings
  and the experts' validation token accuracy on every domain (the specialisation check)

Projectors are LLaVA ``mm_projector.bin`` files (``torch.save`` of a flat dict with keys
``model.mm_projector.{0,2}.{weight,bias}``, fp32), so the demo goes through exactly the
loader real LLaVA checkpoints use. ``--tiny`` trains for a handful of steps on a few
examples (seconds; used by a test to keep this script honest).

Determinism: data come from numpy PCG64 streams; training uses seeded torch generators.
Bit-identical retraining is guaranteed for the same torch build and thread count
(``torch.set_num_threads`` is fixed to 1 here); the manifest records both.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..core.io.hashing import sha256_file
from .data import DOMAINS, SPLIT_SIZES, Tokenizer, generate_all
from .models import WorldConfig
from .train import (
    BUILD_THREADS,
    TINY,
    TrainConfig,
    encode,
    save_expert_set,
    train_encoder,
    train_experts,
    train_lm,
)

FORMAT = "pivotmerge-demo-world"
FORMAT_VERSION = 1
TINY_SIZES = {"train": 32, "val": 12, "test": 12}


def _save_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    # one metadata key only: safetensors writes metadata from a hash map, so with several
    # keys their order (and the file's sha256) would change from run to run
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates files private to the user; these ship


def build(out: Path, *, tiny: bool = False, seed: int = 0, data_seed: int = 0,
          log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train the whole world and write it to ``out``; returns the manifest."""
    threads = torch.get_num_threads()
    torch.set_num_threads(BUILD_THREADS)
    try:
        return _build(out, tiny=tiny, seed=seed, data_seed=data_seed, log=log)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, *, tiny: bool, seed: int, data_seed: int,
           log: Callable[[str], None] | None) -> dict[str, Any]:
    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer()
    wcfg = WorldConfig(vocab_size=len(tok))
    tcfg = TINY if tiny else TrainConfig()
    sizes = TINY_SIZES if tiny else SPLIT_SIZES
    train = generate_all("train", sizes["train"], data_seed)
    timings: dict[str, float] = {}

    t = time.time()
    enc = train_encoder(wcfg, tcfg, train, tok, seed, log)
    timings["encoder_s"] = time.time() - t
    t = time.time()
    lm = train_lm(wcfg, tcfg, train, tok, seed, log)
    timings["lm_s"] = time.time() - t
    feats = {d: encode(enc, train[d].images) for d in DOMAINS}
    caps = {d: train[d].captions for d in DOMAINS}
    t = time.time()
    es = train_experts(wcfg, tcfg, lm, feats, caps, tok, seed, log)
    timings["projectors_s"] = time.time() - t

    _save_safetensors(enc, out / "vision_encoder.safetensors")
    _save_safetensors(lm, out / "language_model.safetensors")
    tables = save_expert_set(es, out)
    files = sorted(p for p in out.rglob("*") if p.is_file() and p.name != "manifest.json")
    manifest: dict[str, Any] = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tiny": tiny,
        "seed": seed,
        "data_seed": data_seed,
        "split_sizes": dict(sizes),
        "domains": list(DOMAINS),
        "vocabulary": tok.words,
        "world_config": wcfg.to_dict(),
        "train_config": tcfg.to_dict(),
        **tables,
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
        "torch_version": torch.__version__,
        "threads": BUILD_THREADS,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    # specialisation check on the validation split, through the real loaders
    from .kit import specialisation_matrix

    manifest["validation_token_accuracy"] = specialisation_matrix(out, split="val")
    manifest["timings"]["total_s"] = round(time.time() - t_start, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pivotmerge_gui.demo.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped artifacts folder)")
    ap.add_argument("--tiny", action="store_true", help="a few training steps on a few examples (seconds)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (encoder, LM, projectors)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    from .kit import artifacts_dir

    out = args.out or artifacts_dir()
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    manifest = build(out, tiny=args.tiny, seed=args.seed, data_seed=args.data_seed, log=log)
    if not args.quiet:
        acc = manifest["validation_token_accuracy"]
        print(f"wrote {out} in {manifest['timings']['total_s']} s")
        for scenario in ("shared", "different"):
            print(f"{scenario}: validation token accuracy (rows: expert, cols: {', '.join(DOMAINS)})")
            for dom in DOMAINS:
                print(f"  {dom:8s} " + " ".join(f"{acc[scenario][dom][d]:.3f}" for d in DOMAINS))
        print("  joint    " + " ".join(f"{acc['joint'][d]:.3f}" for d in DOMAINS))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
