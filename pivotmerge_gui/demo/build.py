"""Rebuild the demo world: ``python -m pivotmerge_gui.demo.build [--out DIR] [--tiny] [--seed N] [--preset P]``.

``--preset`` picks the world (:mod:`.presets`): ``demo`` (default, the shipped one) or a
larger benchmark-only world (``large``, ``large-unequal``; ``--out`` required), whose
manifest records ``"preset"``.

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
(``torch.set_num_threads`` is fixed per preset: 1 for the demo, 2 for the large worlds);
the manifest records both.
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

from ..core.evaluation.backend import CaptionBackend, CaptionSet
from ..core.io.hashing import sha256_file
from .data import Tokenizer, generate_all, vocabulary
from .presets import PRESETS, get
from .train import (
    encode,
    save_expert_set,
    train_encoder,
    train_experts,
    train_lm,
)

FORMAT = "pivotmerge-demo-world"
FORMAT_VERSION = 1


def _save_safetensors(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    state = {k: v.detach().float().contiguous() for k, v in module.state_dict().items()}
    # one metadata key only: safetensors writes metadata from a hash map, so with several
    # keys their order (and the file's sha256) would change from run to run
    save_file(state, str(path), metadata={"format": "pt"})
    path.chmod(0o644)  # safetensors creates files private to the user; these ship


def build(out: Path, *, tiny: bool = False, seed: int = 0, data_seed: int = 0,
          log: Callable[[str], None] | None = None, preset: str = "demo") -> dict[str, Any]:
    """Train the whole world of ``preset`` (see :mod:`.presets`) and write it to ``out``;
    returns the manifest."""
    pre = get(preset)
    threads = torch.get_num_threads()
    torch.set_num_threads(pre.threads)
    try:
        return _build(out, tiny=tiny, seed=seed, data_seed=data_seed, log=log, preset=preset)
    finally:
        torch.set_num_threads(threads)


def _build(out: Path, *, tiny: bool, seed: int, data_seed: int,
           log: Callable[[str], None] | None, preset: str) -> dict[str, Any]:
    from dataclasses import replace

    t_start = time.time()
    out.mkdir(parents=True, exist_ok=True)
    pre = get(preset)
    domains = list(pre.domains)
    tok = Tokenizer(vocabulary(domains))
    wcfg = replace(pre.world, vocab_size=len(tok))
    tcfg = pre.tiny if tiny else pre.train
    sizes = pre.tiny_sizes if tiny else pre.split_sizes
    train = generate_all("train", sizes["train"], data_seed, domains)
    timings: dict[str, float] = {}

    t = time.time()
    enc = train_encoder(wcfg, tcfg, train, tok, seed, log)
    timings["encoder_s"] = time.time() - t
    t = time.time()
    lm = train_lm(wcfg, tcfg, train, tok, seed, log)
    timings["lm_s"] = time.time() - t
    feats = {d: encode(enc, train[d].images) for d in domains}
    caps = {d: train[d].captions for d in domains}
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
        # the shipped demo's manifest has no "preset" key (it predates presets)
        **({} if preset == "demo" else {"preset": preset}),
        "tiny": tiny,
        "seed": seed,
        "data_seed": data_seed,
        "split_sizes": dict(sizes),
        "domains": domains,
        "vocabulary": tok.words,
        "world_config": wcfg.to_dict(),
        "train_config": tcfg.to_dict(),
        **tables,
        "files": {p.relative_to(out).as_posix(): sha256_file(p) for p in files},
        "torch_version": torch.__version__,
        "threads": pre.threads,
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    # specialisation check on the validation split, projectors through the real loader
    from .backend import DemoBackend

    backend = DemoBackend(enc, lm, tok)
    val = generate_all("val", sizes["val"], data_seed, domains)
    sets = {d: CaptionSet(x.images, list(x.captions), backend.encode_images(x.images)) for d, x in val.items()}
    experts = {sc: {d: out / rel for d, rel in tables["experts"][sc].items()} for sc in ("shared", "different")}
    manifest["validation_token_accuracy"] = specialisation_matrix_of(backend, sets, experts, out / tables["joint"])
    manifest["timings"]["total_s"] = round(time.time() - t_start, 2)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


def specialisation_matrix_of(backend: CaptionBackend, sets: dict[str, CaptionSet],
                             experts: dict[str, dict[str, Path]], joint: Path) -> dict[str, Any]:
    """Token accuracy (greedy captions) of every expert file (``{scenario: {domain: path}}``)
    and of the joint projector on every set, each loaded by the project's real loader."""
    from ..core.evaluation.metrics import evaluate
    from ..core.io import load_projector

    def scores(path: Path) -> dict[str, float]:
        res = evaluate(backend, load_projector(str(path)), sets, parts=("generate",))
        return {d: round(m.token_accuracy or 0.0, 4) for d, m in res.per_domain.items()}

    out: dict[str, Any] = {sc: {dom: scores(p) for dom, p in table.items()} for sc, table in experts.items()}
    out["joint"] = scores(joint)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m pivotmerge_gui.demo.build", description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=None, help="output folder (default: the shipped artifacts folder)")
    ap.add_argument("--tiny", action="store_true", help="a few training steps on a few examples (seconds)")
    ap.add_argument("--seed", type=int, default=0, help="training seed (encoder, LM, projectors)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the generated data")
    ap.add_argument("--preset", choices=list(PRESETS), default="demo",
                    help="which world: the shipped 'demo' or a larger benchmark world (see demo/presets.py)")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.out is None and args.preset != "demo":
        ap.error("--out is required for a preset other than 'demo' (the shipped artifacts are the demo world)")
    out = args.out or Path(__file__).resolve().parent / "artifacts"  # = kit.artifacts_dir()
    log = None if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    manifest = build(out, tiny=args.tiny, seed=args.seed, data_seed=args.data_seed, log=log, preset=args.preset)
    if not args.quiet:
        acc = manifest["validation_token_accuracy"]
        doms = manifest["domains"]
        print(f"wrote {out} in {manifest['timings']['total_s']} s")
        for scenario in ("shared", "different"):
            print(f"{scenario}: validation token accuracy (rows: expert, cols: {', '.join(doms)})")
            for dom in doms:
                print(f"  {dom:8s} " + " ".join(f"{acc[scenario][dom][d]:.3f}" for d in doms))
        print("  joint    " + " ".join(f"{acc['joint'][d]:.3f}" for d in doms))
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
