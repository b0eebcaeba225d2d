"""``pivotmerge sweep SWEEP.yml``: merge and score a grid of settings (see
:mod:`pivotmerge_gui.core.sweep` for the document), print the score table, save the best.

The ``score`` block is resolved here: ``backend`` as in ``pivotmerge evaluate`` (``demo`` or
``llava:PATH_OR_ID``), ``pairs`` a folder / ``.jsonl`` of image-caption pairs (relative to
the sweep file) or ``demo:SPLIT:N`` (N pairs per domain of the demo data's split).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ..core.errors import PivotMergeError
from .text import clean

MAX_DEMO_PAIRS = 256


def caption_sets(spec: Any, backend: Any) -> dict[str, Any]:
    """The caption sets of a sweep's ``score.pairs`` for ``backend`` (typed errors)."""
    from ..core.sweep import SweepError

    pairs = spec.score.pairs
    if pairs.startswith("demo:"):
        parts = pairs.split(":")
        if len(parts) != 3 or parts[1] not in ("val", "test") or not parts[2].isdigit() \
                or not 1 <= int(parts[2]) <= MAX_DEMO_PAIRS:
            raise SweepError(f"'score.pairs': '{pairs}' is not demo:SPLIT:N (SPLIT val or test, "
                             f"N 1..{MAX_DEMO_PAIRS})", spec.source)
        if spec.score.backend != "demo":
            raise SweepError("'score.pairs': the demo pairs need the demo back end", spec.source)
        from ..demo import kit

        return dict(kit.load_world().caption_sets(parts[1], int(parts[2])))
    from ..core.evaluation.layer_scores import caption_sets_from_pairs
    from ..core.evaluation.pairs import load_pairs

    path = Path(pairs).expanduser()
    if not path.is_absolute() and spec.source is not None:
        path = Path(spec.source).resolve().parent / path
    return caption_sets_from_pairs(backend, load_pairs(path))


def _table(result: Any) -> list[str]:
    spec = result.spec
    best = result.best()
    grid = result.grid()
    x_head = [clean(v, 14) for v in spec.x.values]
    ys = [clean(v, 18) for v in spec.y.values] if spec.y else [""]
    width = max(10, *(len(h) + 2 for h in x_head))
    first = max(len(spec.y.param) if spec.y else 0, *(len(y) for y in ys)) + 2
    arrow = "higher" if spec.score.higher_is_better else "lower"
    lines = [f"{spec.score.metric} ({arrow} is better), x = {clean(spec.x.param)}"
             + (f", y = {clean(spec.y.param)}" if spec.y else "")]
    lines.append((clean(spec.y.param) if spec.y else "").ljust(first) + "".join(h.rjust(width) for h in x_head))
    for iy, row in enumerate(grid):
        cells = []
        for ix, v in enumerate(row):
            mark = "*" if best is not None and (best.row, best.col) == (iy, ix) else " "
            cells.append(("-" if v is None else f"{v:.4f}{mark}").rjust(width))
        lines.append(ys[iy].ljust(first) + "".join(cells))
    for c in result.cells:
        if c.error:
            lines.append(f"cell {clean(c.label)}: {clean(c.error, 300)}")
    if best is not None:
        lines.append(f"best: {clean(best.label)} = {best.score:.4f} (* in the table)")
    else:
        lines.append("no cell was scored")
    return lines


def cmd_sweep(args: argparse.Namespace) -> int:
    from ..core.progress import CancelToken, drain
    from ..core.sweep import SweepSpec, run_sweep
    from .evaluate import _progress, make_backend

    spec = SweepSpec.load(args.sweep)
    out = Path(args.out) if args.out else None
    if out is not None and out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PivotMergeError(f"{out}: exists and is not an empty folder; the best result is saved into a new one")
    backend = make_backend(spec.score.backend, args.device)
    sets = caption_sets(spec, backend)
    result = drain(run_sweep(spec, backend=backend, sets=sets, device=args.device, cancel=CancelToken()),
                   _progress(args.quiet or args.json))
    saved: list[str] = []
    best = result.best()
    if out is not None and best is not None:
        from ..core.io.atomic import atomic_write_text
        from ..core.pipeline import save_result

        if best.result is None:  # not kept in memory: merge it again (seeded, same result)
            from ..core import pipeline

            best.result = pipeline.run(pipeline.plan(best.recipe, device=args.device))
        saved = [str(p) for p in save_result(best.result, out)]
        saved.append(str(atomic_write_text(out / "sweep.json", json.dumps(result.to_dict(), indent=2))))
    if args.json:
        print(json.dumps(result.to_dict() | {"saved": saved}, indent=2))
        return 0
    for line in _table(result):
        print(line)
    print(f"{len(result.cells)} cells in {result.elapsed_s:.1f} s")
    if saved:
        print("saved the best: " + ", ".join(clean(s) for s in saved))
    elif out is not None:
        print("nothing saved: no cell was scored", file=sys.stderr)
    return 0


def add_sweep_parser(subparsers: Any) -> argparse.ArgumentParser:
    s = subparsers.add_parser(
        "sweep", help="merge and score a grid of one or two settings; save the best",
        description="Vary one or two merge settings (a method parameter, the method, or "
                    "layer_coefficients.NAME) over a grid; merge and score every cell on image-caption "
                    "pairs; print the table and, with --out, save the best merge with its recipe.")
    s.add_argument("sweep", metavar="SWEEP.yml",
                   help="recipe: PATH or inline; x: {param, values}; y: optional; score: {backend, pairs, metric}")
    s.add_argument("--out", metavar="DIR", help="save the best cell's merge, recipe and sweep.json into DIR (new)")
    s.add_argument("--device", help="auto (default: the recipe's), cpu, cuda, cuda:N")
    s.add_argument("--json", action="store_true", help="the grid, every cell and the best as JSON")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    s.set_defaults(func=cmd_sweep)
    return s
