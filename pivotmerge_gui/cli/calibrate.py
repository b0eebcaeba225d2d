"""``pivotmerge calibrate``: a calibration file from your own images, headless.

Loads only the vision tower and image processor of ``--encoder`` (a transformers Llava /
LlavaNext / Qwen2-VL / Qwen2.5-VL folder or Hub id, a CLIP / SigLIP vision model, or
``demo`` for the built-in demo world's encoder), encodes each ``--images NAME=DIR_OR_JSONL``
domain and writes one safetensors file with provenance (see
:mod:`pivotmerge_gui.core.calibration.compute`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

#: the default of compute.DEFAULT_TOKENS_PER_IMAGE, repeated so that building the parser
#: imports no torch (tests/calibration/test_cli.py checks they agree)
HELP_DEFAULT_TOKENS = 64


def encoder_for(spec: str, device: str | None = None, *, revision: str | None = None,
                feature_layer: int | list[int] | None = None, select: str | None = None) -> Any:
    """``demo`` -> the demo world's encoder; anything else -> a transformers checkpoint's
    vision tower (:func:`pivotmerge_gui.core.calibration.encoders.load_encoder`)."""
    if spec.strip() == "demo":
        from ..demo.calibration import DemoEncoder
        from ..demo.kit import load_world

        return DemoEncoder(load_world())
    from ..core.calibration.encoders import load_encoder

    return load_encoder(spec.strip(), device=device or "auto", revision=revision, feature_layer=feature_layer,
                        select=select)


def cmd_calibrate(args: argparse.Namespace) -> int:
    from ..core.calibration.compute import check_sampling, compute_calibration, parse_source
    from ..core.errors import Cancelled
    from ..core.io.atomic import check_writable
    from ..core.progress import CancelToken
    from .evaluate import _progress
    from .text import clean

    check_sampling(args.tokens_per_image, args.all_tokens, args.max_images, args.batch_size)
    sources = [parse_source(s) for s in args.images]
    out = Path(args.output)
    check_writable(out, [Path(s.root) for s in sources], args.overwrite)  # before loading the encoder
    layer = args.feature_layer[0] if args.feature_layer and len(args.feature_layer) == 1 else args.feature_layer
    encoder = encoder_for(args.encoder, args.device, revision=args.revision, feature_layer=layer,
                           select=args.feature_select)
    cancel = CancelToken()
    try:
        summary = compute_calibration(
            encoder, sources, out, tokens_per_image=args.tokens_per_image, all_tokens=args.all_tokens,
            max_images=args.max_images, seed=args.seed, batch_size=args.batch_size,
            overwrite=args.overwrite, protected=[Path(s.root) for s in sources],
            progress=_progress(args.quiet), cancel=cancel)
    except KeyboardInterrupt:  # the file is written at the very end, atomically: nothing is there yet
        cancel.cancel()
        raise Cancelled("cancelled; nothing was written") from None
    if args.json:
        print(json.dumps({
            "output": str(summary.path), "sha256": summary.sha256, "in_features": summary.in_features,
            "domains": {n: {"images": d.images, "tokens": d.tokens,
                            "skipped": [{"image": a, "reason": b} for a, b in d.skipped]}
                        for n, d in summary.domains.items()},
        }, indent=2))
        return 0
    for name, d in summary.domains.items():
        print(f"{clean(name)}: {d.images} images, {d.tokens:,} tokens x {summary.in_features}"
              + (f", {len(d.skipped)} skipped" if d.skipped else ""))
        for image, reason in d.skipped[:20]:
            print(f"  skipped {clean(image, 200)}: {clean(reason, 200)}")
        if len(d.skipped) > 20:
            print(f"  ... and {len(d.skipped) - 20} more skipped")
    print(f"wrote {clean(summary.path)} (sha256 {summary.sha256})")
    return 0


def _layer(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"feature layer must be an integer, got {text!r}") from None


def add_calibrate_parser(sub: Any) -> None:
    s = sub.add_parser(
        "calibrate",
        help="compute calibration features (projector inputs per domain) from your images",
        description="Encode images with the vision tower of a model (its language model is never "
                    "loaded) and write a calibration file: one [tokens, in_features] tensor per domain, "
                    "with provenance (encoder, feature layer, image hashes, sampling).",
    )
    s.add_argument("--encoder", required=True, metavar="MODEL",
                   help="transformers Llava / LlavaNext / Qwen2-VL / Qwen2.5-VL folder or Hub id, a CLIP or "
                        "SigLIP vision model, or 'demo'")
    s.add_argument("--images", required=True, action="append", metavar="NAME=DIR_OR_JSONL",
                   help="one domain's images: a folder (recursive) or a .jsonl with an 'image' path per line; "
                        "repeat for each domain (NAME = the expert's name)")
    s.add_argument("-o", "--output", required=True, metavar="FILE", help="calibration file to write (.safetensors)")
    g = s.add_mutually_exclusive_group()
    g.add_argument("--tokens-per-image", type=int, metavar="N",
                   help=f"keep a seeded random subset of N tokens per image (default {HELP_DEFAULT_TOKENS}: "
                        "neighbouring patches are strongly correlated, so a few dozen tokens from many images "
                        "describe a domain better than all tokens of a few, and the file stays small)")
    g.add_argument("--all-tokens", action="store_true", help="keep every token of every image")
    s.add_argument("--max-images", type=int, metavar="N", help="use at most N images per domain")
    s.add_argument("--seed", type=int, default=0, help="seed of the token subsets (default 0)")
    s.add_argument("--device", help="auto (default), cpu, cuda, cuda:N")
    s.add_argument("--batch-size", type=int, default=8, metavar="N", help="images per forward (default 8)")
    s.add_argument("--revision", help="Hub revision of --encoder")
    s.add_argument("--feature-layer", type=_layer, nargs="+", metavar="L",
                   help="override the hidden layer(s) taken (Llava, CLIP, SigLIP; several are concatenated)")
    s.add_argument("--feature-select", choices=("default", "full"),
                   help="'default' drops the CLS token, 'full' keeps it (overrides the model's setting)")
    s.add_argument("--overwrite", action="store_true", help="replace an existing output file")
    s.add_argument("--json", action="store_true", help="machine-readable summary on stdout")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=cmd_calibrate)
