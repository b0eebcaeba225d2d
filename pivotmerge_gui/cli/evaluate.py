"""``pivotmerge evaluate``: captions and alignment metrics of projectors, without the app.

The same :func:`pivotmerge_gui.core.evaluation.bench.run_bench` generator as the GUI's test
bench: per-pair greedy captions and caption NLL, per-domain metrics and their unweighted
mean. ``--backend demo`` uses the built-in demo model (and, without projectors, its four
experts); ``--backend llava:PATH_OR_ID`` loads a transformers Llava model once and swaps
every projector into it.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from ..core.errors import PivotMergeError
from .text import clean


def _progress(quiet: bool):  # type: ignore[no-untyped-def]
    last = [0.0]

    def show(ev: Any) -> None:
        if quiet:
            return
        now = time.monotonic()
        if ev.stage != "done" and now - last[0] < 1.0:
            return
        last[0] = now
        sys.stderr.write(f"[{ev.fraction * 100:5.1f}%] {ev.stage}: {clean(ev.message)}\n")
        sys.stderr.flush()

    return show


def make_backend(spec: str, device: str | None = None) -> Any:
    """``demo`` or ``llava:PATH_OR_ID`` -> a CaptionBackend (typed error otherwise)."""
    if spec == "demo":
        from ..demo import kit

        return kit.load_world().backend
    if spec.startswith("llava:") and len(spec) > len("llava:"):
        from ..core.evaluation.llava_hf import LlavaHFBackend

        return LlavaHFBackend.from_pretrained(spec[len("llava:"):], device=device or "auto")
    raise PivotMergeError(f"unknown back end '{spec}'; use 'demo' or 'llava:PATH_OR_HUB_ID'")


def _limit_per_domain(pairs: list[Any], n: int | None) -> list[Any]:
    if n is None:
        return pairs
    seen: dict[str, int] = {}
    out = []
    for p in pairs:
        if seen.get(p.domain, 0) < n:
            seen[p.domain] = seen.get(p.domain, 0) + 1
            out.append(p)
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from ..core.evaluation.bench import run_bench
    from ..core.evaluation.pairs import load_pairs, pairs_from_caption_sets
    from ..core.io import load_projector
    from ..core.io.discovery import display_name
    from ..core.progress import CancelToken, drain

    if args.max_pairs is not None and args.max_pairs < 1:
        raise PivotMergeError(f"--max-pairs must be at least 1, got {args.max_pairs}")
    backend = make_backend(args.backend, args.device)
    if args.pairs:
        pairs = _limit_per_domain(load_pairs(args.pairs), args.max_pairs)
    elif args.backend == "demo":
        from ..demo import kit

        world = kit.load_world()
        n = args.max_pairs if args.max_pairs is not None else 16
        pairs = pairs_from_caption_sets(world.caption_sets(args.split, n))
    else:
        raise PivotMergeError("the LLaVA back end needs image-caption pairs: --pairs FOLDER_OR_JSONL")

    projectors: dict[str, Any] = {}
    if args.projectors:
        for spec in args.projectors:
            name = display_name(spec)
            if name in projectors:
                name = f"{name} ({len(projectors) + 1})"
            projectors[name] = load_projector(spec)
    elif args.backend == "demo":
        from ..demo import kit

        projectors = dict(kit.load_experts("shared"))
    elif args.backend.startswith("llava:"):  # the model's own projector (e.g. a full-model export)
        model = args.backend[len("llava:"):]
        projectors = {display_name(model): load_projector(model)}
    else:
        raise PivotMergeError("give at least one projector to evaluate (a file, folder or Hub id)")

    show = _progress(args.quiet or args.json)
    result = drain(run_bench(backend, projectors, pairs, retrieval=args.retrieval, cancel=CancelToken()), show)

    if args.json:
        print(json.dumps(result.to_dict(), indent=2))
        return 0
    cols = ["nll", "token_accuracy", "exact_match"] + (["retrieval_accuracy"] if args.retrieval else [])
    print(f"back end: {clean(result.backend)}   pairs: {len(result.pairs)}   time: {result.elapsed_s:.1f} s")
    for name in result.projectors:
        ev = result.metrics[name]
        print(f"\n{clean(name)}")
        print("  " + "domain".ljust(14) + "n".rjust(5) + "".join(c.rjust(20) for c in cols))
        rows = [(d, m) for d, m in ev.per_domain.items()] + [("mean", ev.mean)]
        for d, m in rows:
            vals = "".join(f"{getattr(m, c):20.4f}" if getattr(m, c) is not None else "-".rjust(20) for c in cols)
            print("  " + clean(d).ljust(14) + str(m.n).rjust(5) + vals)
        shown: set[str] = set()
        for r in result.results[name]:
            if r.domain in shown:
                continue
            shown.add(r.domain)
            print(clean(f"    [{r.domain}] reference: {r.reference}   (its NLL/token: {r.nll:.3f})"))
            print(clean(f"    [{r.domain}] caption  : {r.caption}"))
    return 0


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Register ``pivotmerge evaluate`` on the main parser's sub-commands."""
    s = subparsers.add_parser(
        "evaluate",
        help="captions and alignment metrics of projectors on image-caption pairs",
        description="Caption image-caption pairs with each projector and report per-pair captions, "
                    "caption NLL per token, token accuracy and exact match, per domain and averaged.",
    )
    s.add_argument("projectors", nargs="*", metavar="PROJECTOR",
                   help="projector files, folders or Hub ids (default with --backend demo: the demo experts; "
                        "with --backend llava:MODEL: MODEL's own projector)")
    s.add_argument("--backend", default="demo", metavar="demo|llava:PATH_OR_ID",
                   help="the frozen encoder+LM: the built-in demo model (default) or a transformers Llava")
    s.add_argument("--pairs", metavar="DIR_OR_JSONL",
                   help="images with .txt captions (sub-folder = domain) or a .jsonl of {image, caption, domain}")
    s.add_argument("--split", choices=["val", "test"], default="val", help="demo data split (without --pairs)")
    s.add_argument("--max-pairs", type=int, metavar="N",
                   help="at most N pairs per domain (default for the demo data: 16)")
    s.add_argument("--retrieval", action="store_true", help="also same-domain retrieval accuracy (slower)")
    s.add_argument("--device", help="auto (default), cpu, cuda, cuda:N (LLaVA back end)")
    s.add_argument("--json", action="store_true", help="per-pair captions and per-domain metrics as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=cmd_evaluate)
    return s
