"""Make a calibration file from images: the one driver behind ``pivotmerge calibrate``, the
app's Calibration dialog and the demo's calibration file.

An :class:`ImageSource` is one domain's images: a folder (image files, recursive, sorted by
relative path), a ``.jsonl`` file (one ``{"image": path, ...}`` object per line, paths
relative to the file's folder; the test bench's pair files are of this kind, captions are
ignored), or generated images (the demo's, with their generator's seed, split and index as
provenance). :func:`calibration_job` encodes each domain's images in batches with a
:class:`~.encoders.FeatureEncoder`, keeps a seeded random subset of tokens per image
(default :data:`DEFAULT_TOKENS_PER_IMAGE`) or all of them, and writes the file with
:func:`.store.write` once everything is encoded (atomic: a cancelled or failed run writes
nothing). A bad or missing image is skipped, named and counted, never fatal; Pillow's
decompression-bomb limit stays in force (an image over it is skipped).
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import PivotMergeError
from ..progress import CancelToken, ProgressEvent, ProgressGen, drain
from .encoders import FeatureEncoder

#: Tokens kept per image by default. Neighbouring patch tokens of one image are strongly
#: correlated, so a few dozen random tokens from each of many images describe a domain's
#: feature distribution better than every token of a few images, and the file stays small
#: (LLaVA-1.5: 576 tokens x 1024 floats per image; 64 of them are 256 KiB per image).
DEFAULT_TOKENS_PER_IMAGE = 64
MAX_IMAGE_BYTES = 256 * 2**20


class CalibrationInputError(PivotMergeError):
    """An image source or sampling setting that cannot be used."""


class ImageSkipped(Exception):
    """One image that cannot be used (the reason is the message)."""


@dataclass
class ImageItem:
    """One image of a source: ``label`` names it in messages; ``record`` is its provenance
    entry (``path`` + ``sha256`` after loading, or generator fields); ``load`` returns a
    Pillow image or a ``[3, H, W]`` tensor, raising :class:`ImageSkipped`."""

    label: str
    record: dict[str, Any]
    load: Callable[[], Any]


@dataclass
class ImageSource:
    """One domain's images (see the module docstring)."""

    name: str
    root: str
    items: list[ImageItem]
    skipped: list[tuple[str, str]] = field(default_factory=list)  # found bad while listing


@dataclass
class DomainSummary:
    images: int = 0
    tokens: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (image, reason)


@dataclass
class CalibrationSummary:
    path: Path
    sha256: str
    in_features: int
    domains: dict[str, DomainSummary]
    elapsed_s: float = 0.0

    def lines(self) -> list[str]:
        out = []
        for name, d in self.domains.items():
            line = f"{name}: {d.images} images, {d.tokens:,} tokens"
            if d.skipped:
                line += f", {len(d.skipped)} skipped"
            out.append(line)
        return out


# --------------------------------------------------------------------------- images
def _file_loader(path: Path, record: dict[str, Any]) -> Callable[[], Any]:
    def load() -> Any:
        from PIL import Image

        try:
            size = path.stat().st_size
        except FileNotFoundError:
            raise ImageSkipped("file not found") from None
        except OSError as e:
            raise ImageSkipped(f"cannot read: {e.strerror or e}") from None
        if size > MAX_IMAGE_BYTES:
            raise ImageSkipped(f"file is {size / 2**20:.0f} MiB, over the {MAX_IMAGE_BYTES // 2**20} MiB limit")
        try:
            data = path.read_bytes()
        except OSError as e:
            raise ImageSkipped(f"cannot read: {e.strerror or e}") from None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(io.BytesIO(data)) as im:
                    im.load()
                    picture = im.convert("RGB")
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
            raise ImageSkipped(f"over Pillow's decompression-bomb limit ({e})") from None
        except (OSError, ValueError, SyntaxError) as e:  # UnidentifiedImageError is an OSError
            raise ImageSkipped(f"not a readable image ({e.__class__.__name__})") from None
        record["sha256"] = hashlib.sha256(data).hexdigest()
        return picture

    return load


def folder_source(name: str, folder: Path) -> ImageSource:
    from ..evaluation.pairs import IMAGE_SUFFIXES

    files = sorted((p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(folder).as_posix())
    items = []
    for p in files:
        rel = p.relative_to(folder).as_posix()
        rec = {"path": rel}
        items.append(ImageItem(rel, rec, _file_loader(p, rec)))
    return ImageSource(name, str(folder), items)


def jsonl_source(name: str, path: Path) -> ImageSource:
    """Images named by the ``image`` field of each line (captions and domains ignored);
    a line without one is skipped and counted."""
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise CalibrationInputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise CalibrationInputError(f"{path}: cannot read: {e.strerror or e}") from None
    items, skipped = [], []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name}:{no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            skipped.append((where, f"not valid JSON ({e.msg})"))
            continue
        image = obj.get("image") if isinstance(obj, dict) else None
        if not isinstance(image, str) or not image:
            skipped.append((where, "no 'image' path"))
            continue
        p = Path(image).expanduser()
        p = p if p.is_absolute() else path.parent / p
        try:
            rel = p.resolve().relative_to(path.parent.resolve()).as_posix()
        except ValueError:
            rel = str(p)
        rec = {"path": rel}
        items.append(ImageItem(rel, rec, _file_loader(p, rec)))
    return ImageSource(name, str(path), items, skipped)


def parse_source(spec: str) -> ImageSource:
    """``NAME=DIR`` or ``NAME=FILE.jsonl`` (typed error naming what is wrong)."""
    from ..errors import CheckpointError
    from .store import check_domain_name

    name, sep, where = spec.partition("=")
    if not sep or not name.strip() or not where.strip():
        raise CalibrationInputError(f"image source {spec!r}: expected NAME=FOLDER or NAME=FILE.jsonl")
    try:
        check_domain_name(name.strip(), "image source")
    except CheckpointError as e:
        raise CalibrationInputError(e.problem) from None
    return source_from_path(name.strip(), Path(where).expanduser())


def source_from_path(name: str, path: Path) -> ImageSource:
    if path.is_dir():
        src = folder_source(name, path)
    elif path.is_file():
        if path.suffix.lower() != ".jsonl":
            raise CalibrationInputError(f"{path}: expected a folder of images or a .jsonl file")
        src = jsonl_source(name, path)
    else:
        raise CalibrationInputError(f"{path}: no such folder or file (images for domain {name!r})")
    if not src.items:
        raise CalibrationInputError(f"{path}: no images for domain {name!r}"
                                    + (f" ({len(src.skipped)} lines skipped)" if src.skipped else ""))
    return src


# --------------------------------------------------------------------------- sampling
def _seed_for(seed: int, domain: str, index: int) -> int:
    digest = hashlib.sha256(f"pivotmerge-calibration/{seed}/{domain}/{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def sample_tokens(feats: torch.Tensor, n: int | None, group: int, seed: int) -> torch.Tensor:
    """``n`` rows of ``feats`` (whole groups of ``group`` consecutive rows), seeded; all
    rows when ``n`` is None or not smaller. Rows keep their order."""
    groups = feats.shape[0] // group
    if n is None or groups * group <= n:
        return feats[: groups * group] if group > 1 else feats
    k = max(1, n // group)
    g = torch.Generator().manual_seed(int(seed))
    idx = torch.randperm(groups, generator=g)[:k].sort().values
    rows = (idx[:, None] * group + torch.arange(group)[None]).reshape(-1)
    return feats[rows]


# --------------------------------------------------------------------------- driver
def check_sampling(tokens_per_image: int | None, all_tokens: bool, max_images: int | None,
                   batch_size: int) -> int | None:
    if all_tokens and tokens_per_image is not None:
        raise CalibrationInputError("give either a number of tokens per image or all tokens, not both")
    if tokens_per_image is not None and tokens_per_image < 1:
        raise CalibrationInputError(f"tokens per image must be at least 1, got {tokens_per_image}")
    if max_images is not None and max_images < 1:
        raise CalibrationInputError(f"max images must be at least 1, got {max_images}")
    if batch_size < 1:
        raise CalibrationInputError(f"batch size must be at least 1, got {batch_size}")
    return None if all_tokens else (tokens_per_image or DEFAULT_TOKENS_PER_IMAGE)


def calibration_job(
    encoder: FeatureEncoder,
    sources: Sequence[ImageSource],
    out: str | Path,
    *,
    tokens_per_image: int | None = None,
    all_tokens: bool = False,
    max_images: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    device: str | torch.device | None = None,
    overwrite: bool = False,
    protected: Iterable[Path] = (),
    cancel: CancelToken | None = None,
) -> ProgressGen:
    """Generator form of :func:`compute_calibration` (for the app's workers); its value
    is the :class:`CalibrationSummary`."""
    from ..io.atomic import check_writable
    from . import store

    t0 = time.perf_counter()
    n_keep = check_sampling(tokens_per_image, all_tokens, max_images, batch_size)
    names = [s.name for s in sources]
    if not sources:
        raise CalibrationInputError("no image sources: give at least one NAME=FOLDER")
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise CalibrationInputError(f"domain {dup[0]!r} is given twice")
    out = Path(out)
    protected = list(protected)
    check_writable(out, protected, overwrite)  # refuse before any work
    if device is not None and hasattr(encoder, "to"):
        encoder.to(device)  # type: ignore[attr-defined]
    group = int(getattr(encoder, "token_group", 1) or 1)
    planned = [min(len(s.items), max_images) if max_images else len(s.items) for s in sources]
    total = max(1, sum(planned))
    done = 0
    tensors: dict[str, torch.Tensor] = {}
    images_prov: dict[str, list[dict[str, Any]]] = {}
    summary: dict[str, DomainSummary] = {}
    for src in sources:
        dom = DomainSummary(skipped=list(src.skipped))
        summary[src.name] = dom
        rows: list[torch.Tensor] = []
        records: list[dict[str, Any]] = []
        pending = iter(src.items)
        exhausted = False
        while not exhausted and (max_images is None or dom.images < max_images):
            want = batch_size if max_images is None else min(batch_size, max_images - dom.images)
            batch, recs = [], []
            while len(batch) < want:
                item = next(pending, None)
                if item is None:
                    exhausted = True
                    break
                if cancel is not None:
                    cancel.raise_if_cancelled()
                try:
                    batch.append(item.load())
                    recs.append(dict(item.record))
                except ImageSkipped as e:
                    dom.skipped.append((item.label, str(e)))
            if not batch:
                break
            if cancel is not None:
                cancel.raise_if_cancelled()
            feats = encoder.encode(batch)
            if len(feats) != len(batch):
                raise PivotMergeError(f"the encoder returned {len(feats)} feature sets for {len(batch)} images")
            for f in feats:
                if f.dim() != 2 or f.shape[1] != encoder.in_features:
                    raise PivotMergeError(f"the encoder returned features of shape {list(f.shape)}; "
                                          f"expected [tokens, {encoder.in_features}]")
                k = dom.images
                kept = sample_tokens(f.detach().float().cpu(), n_keep, group, _seed_for(seed, src.name, k))
                rows.append(kept)
                dom.tokens += int(kept.shape[0])
                dom.images += 1
            records.extend(recs)
            done += len(batch)
            yield ProgressEvent("encode", min(0.98, done / total),
                                f"{src.name}: {dom.images} images encoded"
                                + (f", {len(dom.skipped)} skipped" if dom.skipped else ""))
        if not rows or dom.tokens == 0:
            first = "; ".join(f"{a}: {b}" for a, b in dom.skipped[:3])
            raise CalibrationInputError(f"{src.root}: no usable images for domain {src.name!r}"
                                        + (f" ({len(dom.skipped)} skipped: {first})" if dom.skipped else ""))
        tensors[src.name] = torch.cat(rows)
        images_prov[src.name] = records
    if cancel is not None:
        cancel.raise_if_cancelled()
    yield ProgressEvent("write", 0.99, f"writing {out.name}")
    prov = encoder.provenance()
    provenance = store.default_provenance(
        encoder=prov.get("encoder"), features=prov.get("features"), images=images_prov,
        sampling={"tokens_per_image": n_keep, "all_tokens": n_keep is None, "seed": int(seed),
                  "max_images": max_images, "token_group": group},
        sources={s.name: s.root for s in sources},
        skipped={n: [{"image": a, "reason": b} for a, b in d.skipped] for n, d in summary.items() if d.skipped},
    )
    digest = store.write(out, tensors, provenance, overwrite=overwrite, protected=protected)
    result = CalibrationSummary(out, digest, int(encoder.in_features), summary, time.perf_counter() - t0)
    yield ProgressEvent("done", 1.0, f"wrote {out.name}")
    return result


def compute_calibration(
    encoder: FeatureEncoder,
    sources: Sequence[ImageSource],
    out: str | Path,
    *,
    progress: Callable[[ProgressEvent], Any] | None = None,
    cancel: CancelToken | None = None,
    **options: Any,
) -> CalibrationSummary:
    """Encode every source's images and write the calibration file ``out``; returns the
    :class:`CalibrationSummary` (sha256, per-domain images used, skipped with reasons,
    tokens). ``options`` are :func:`calibration_job`'s: ``tokens_per_image`` (default
    :data:`DEFAULT_TOKENS_PER_IMAGE`) or ``all_tokens``, ``max_images`` (per domain),
    ``seed``, ``batch_size``, ``device``, ``overwrite``, ``protected``. Raises
    :class:`~..errors.Cancelled` (nothing written) when ``cancel`` is set."""
    return drain(calibration_job(encoder, sources, out, cancel=cancel, **options), progress, cancel)
