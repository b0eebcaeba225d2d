"""User image-caption pairs for the test bench, ``pivotmerge evaluate`` and calibration.

Two on-disk forms are read:

- a folder of images, each with a ``.txt`` side file holding its reference caption
  (``cat.png`` + ``cat.txt``). Images in sub-folders get the sub-folder's name as their
  domain (``pairs/ocr/receipt.png`` -> domain ``ocr``); images at the top level get the
  folder's own name;
- a ``.jsonl`` file, one object per line: ``{"image": path, "caption": text,
  "domain": optional}``; relative image paths are relative to the ``.jsonl`` file.

Image headers are checked with Pillow when the pairs are read, so a file that is not an
image, or one over the decompression-bomb pixel limit, is reported at load time as a
:class:`PairsError` naming it; pixels are decoded only when a pair's ``image`` is first used
(``evaluate --max-pairs 1`` on a folder of thousands decodes one image per domain). In-memory
images (the demo world's ``[3, H, W]`` tensors) become pairs through
:func:`pairs_from_caption_sets`.
"""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..bounded import NestingError, json_loads
from ..errors import PivotMergeError
from .backend import CaptionSet

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


class PairsError(PivotMergeError):
    """An image-caption pair source that cannot be used (names the file and the problem)."""

    def __init__(self, path: str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


class Pair:
    """One image with its reference caption.

    ``image`` is a Pillow RGB image (files) or a ``[3, H, W]`` float tensor in ``[0, 1]``
    (in-memory sets such as the demo's). ``path`` is the file it came from, if any. Pairs
    read from files are decoded on first use of ``image`` (then kept), so selecting a few
    pairs of a large folder decodes only those.
    """

    def __init__(self, caption: str, domain: str, image: Any = None, path: Path | None = None, name: str = "") -> None:
        self.caption = caption
        self.domain = domain
        self._image = image
        self.path = path
        self.name = name or (path.name if path is not None else "image")

    @property
    def image(self) -> Any:
        if self._image is None and self.path is not None:
            self._image = open_image(self.path)
        return self._image

    @image.setter
    def image(self, value: Any) -> None:
        self._image = value

    @property
    def decoded(self) -> bool:
        """Whether the image is in memory (in-memory pairs always are)."""
        return self._image is not None

    def __repr__(self) -> str:
        return f"Pair({self.caption!r}, {self.domain!r}, path={self.path!r}, name={self.name!r})"


def _require_pillow() -> Any:
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - Pillow is a dependency
        raise PivotMergeError("reading image files needs Pillow (pip install Pillow)") from e
    return Image


def max_image_pixels() -> int:
    """Pixels an image may have (Pillow's decompression-bomb threshold, about 89 million:
    an RGB copy of about 256 MiB); larger ones are refused instead of decoded."""
    return int(_require_pillow().MAX_IMAGE_PIXELS or 89_478_485)


def _opened(path: Path, decode: bool) -> Any:
    """Open ``path`` (header only unless ``decode``), refusing decompression bombs by their
    declared size before any pixel is decoded; typed errors name the file."""
    Image = _require_pillow()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                w, h = im.size
                if w * h > max_image_pixels():
                    raise PairsError(str(path), f"image of {w} x {h} pixels is over the {max_image_pixels():,}-pixel "
                                                "limit (a decompression bomb?); resize it first")
                if not decode:
                    return None
                im.load()
                return im.convert("RGB")
    except FileNotFoundError:
        raise PairsError(str(path), "image file not found") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise PairsError(str(path), f"image is over the {max_image_pixels():,}-pixel limit (a decompression "
                                    f"bomb?); resize it first ({e})") from None
    except (OSError, ValueError, SyntaxError, EOFError) as e:  # PIL.UnidentifiedImageError is an OSError
        raise PairsError(str(path), f"not a readable image ({e.__class__.__name__}: {e})") from None
    except MemoryError:
        raise PairsError(str(path), "not enough memory to decode this image") from None


def open_image(path: Path) -> Any:
    """Decode ``path`` fully into an RGB Pillow image (typed error when it is not one)."""
    return _opened(path, decode=True)


def probe_image(path: Path) -> None:
    """Check that ``path`` is an image of acceptable size from its header (no decoding)."""
    _opened(path, decode=False)


def _read_text(path: Path, what: str = "") -> str:
    """UTF-8 text of ``path``; PairsError naming ``what`` the file is (e.g. "caption file")."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise PairsError(str(path), f"{what + ' is ' if what else ''}not UTF-8 text") from None
    except OSError as e:
        raise PairsError(str(path), f"cannot read{' ' + what if what else ''}: {e.strerror or e}") from None


def _read_caption(path: Path) -> str:
    text = _read_text(path, "caption file").strip()
    if not text:
        raise PairsError(str(path), "caption file is empty")
    return " ".join(text.split())


def load_folder(folder: Path, *, max_pairs: int | None = None) -> list[Pair]:
    """Images with ``.txt`` side files, sub-folder = domain (see the module docstring)."""
    images = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise PairsError(str(folder), f"no images ({', '.join(IMAGE_SUFFIXES)}) in this folder")
    pairs: list[Pair] = []
    for img in images:
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        side = img.with_suffix(".txt")
        if not side.is_file():
            raise PairsError(str(img), f"no caption side file {side.name} next to this image")
        rel = img.relative_to(folder)
        domain = rel.parts[0] if len(rel.parts) > 1 else folder.name
        probe_image(img)  # a broken file or a bomb is reported now; pixels are decoded on use
        pairs.append(Pair(_read_caption(side), domain, None, img, rel.as_posix()))
    return pairs


def load_jsonl(path: Path, *, max_pairs: int | None = None) -> list[Pair]:
    """``{"image", "caption", "domain"?}`` per line; blank lines are skipped."""
    lines = _read_text(path).splitlines()
    pairs: list[Pair] = []
    default_domain = path.stem
    for no, line in enumerate(lines, 1):
        if max_pairs is not None and len(pairs) >= max_pairs:
            break
        if not line.strip():
            continue
        where = f"{path}:{no}"
        try:
            obj = json_loads(line)
        except NestingError as e:
            raise PairsError(where, f"JSON {e}") from None
        except json.JSONDecodeError as e:
            raise PairsError(where, f"not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict):
            raise PairsError(where, "each line must be a JSON object with 'image' and 'caption'")
        image, caption, domain = obj.get("image"), obj.get("caption"), obj.get("domain", default_domain)
        if not isinstance(image, str) or not image:
            raise PairsError(where, "missing 'image' (a path to an image file)")
        if not isinstance(caption, str) or not caption.strip():
            raise PairsError(where, "missing or empty 'caption'")
        if not isinstance(domain, str) or not domain:
            raise PairsError(where, "'domain' must be a non-empty string")
        img_path = Path(image).expanduser()
        if not img_path.is_absolute():
            img_path = path.parent / img_path
        try:
            probe_image(img_path)
        except PairsError as e:
            raise PairsError(where, f"image {img_path}: {e.problem}") from None
        pairs.append(Pair(" ".join(caption.split()), domain, None, img_path, Path(image).name))
    if not pairs:
        raise PairsError(str(path), "no image-caption pairs in this file")
    return pairs


def load_pairs(source: str | Path, *, max_pairs: int | None = None) -> list[Pair]:
    """Pairs from a folder or a ``.jsonl`` file (typed :class:`PairsError` otherwise)."""
    p = Path(source).expanduser()
    if max_pairs is not None and max_pairs < 1:
        raise PairsError(str(p), f"max_pairs must be at least 1, got {max_pairs}")
    if p.is_dir():
        return load_folder(p, max_pairs=max_pairs)
    if p.is_file():
        if p.suffix.lower() != ".jsonl":
            raise PairsError(str(p), "expected a folder of images with .txt captions or a .jsonl file")
        return load_jsonl(p, max_pairs=max_pairs)
    raise PairsError(str(p), "no such file or folder")


def pairs_from_caption_sets(sets: Mapping[str, CaptionSet], n_per_domain: int | None = None) -> list[Pair]:
    """In-memory caption sets (e.g. the demo world's) as pairs, domain by domain."""
    out: list[Pair] = []
    for dom, s in sets.items():
        n = len(s) if n_per_domain is None else min(n_per_domain, len(s))
        for i in range(n):
            out.append(Pair(s.captions[i], dom, s.images[i], None, f"{dom} #{i}"))
    return out


def group_by_domain(pairs: Sequence[Pair]) -> dict[str, list[int]]:
    """Indices of the pairs of each domain, domains in order of first appearance."""
    out: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        out.setdefault(p.domain, []).append(i)
    return out


def split_pairs(pairs: Sequence[Pair], test_fraction: float = 0.5, seed: int = 0
                ) -> tuple[list[Pair], list[Pair]]:
    """Deterministic per-domain split into (validation, held-out test) pairs, e.g. for
    auto-tune: every domain with at least two pairs contributes to both sides."""
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    g = torch.Generator().manual_seed(int(seed))
    val: list[Pair] = []
    test: list[Pair] = []
    for idx in group_by_domain(pairs).values():
        order = [idx[i] for i in torch.randperm(len(idx), generator=g).tolist()]
        n_test = min(max(1, round(len(idx) * test_fraction)), len(idx) - 1) if len(idx) > 1 else 0
        test.extend(pairs[i] for i in sorted(order[:n_test]))
        val.extend(pairs[i] for i in sorted(order[n_test:]))
    return val, test


# --------------------------------------------------------------------- image conversion
def pil_to_tensor(image: Any, size: int | None = None) -> torch.Tensor:
    """Pillow image -> ``[3, H, W]`` float tensor in ``[0, 1]`` (resized to ``size`` square)."""
    import numpy as np

    im = image.convert("RGB")
    if size is not None and im.size != (size, size):
        im = im.resize((size, size), resample=_require_pillow().Resampling.BILINEAR)
    arr = np.asarray(im, dtype=np.float32) / 255.0
    return torch.from_numpy(arr.transpose(2, 0, 1).copy())


def tensor_to_pil(image: torch.Tensor) -> Any:
    """``[3, H, W]`` tensor in ``[0, 1]`` -> Pillow RGB image."""
    Image = _require_pillow()
    arr = (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(arr, "RGB")


def backend_image_size(backend: Any) -> int | None:
    """Square input size of a tensor-image back end (``image_size`` attribute, or derived
    from a patch encoder's position table and patch width as the demo's); ``None`` if
    unknown."""
    size = getattr(backend, "image_size", None)
    if isinstance(size, int):
        return size
    enc = getattr(backend, "encoder", None)
    try:
        n_patches = int(enc.pos.shape[0])  # type: ignore[union-attr]
        patch_dim = int(enc.patch_embed.in_features)  # type: ignore[union-attr]
    except AttributeError:
        return None
    side, patch = math.isqrt(n_patches), math.isqrt(patch_dim // 3)
    return side * patch if side * side == n_patches and patch * patch * 3 == patch_dim else None


def images_for_backend(backend: Any, images: Sequence[Any]) -> Any:
    """The images in the form ``backend.encode_images`` takes.

    Back ends that declare ``accepts_pil = True`` (transformers) get Pillow images (demo
    tensors are converted); tensor back ends (the demo) get one ``[N, 3, S, S]`` tensor
    with Pillow images resized to the back end's input size.
    """
    if getattr(backend, "accepts_pil", False):
        return [tensor_to_pil(im) if isinstance(im, torch.Tensor) else im for im in images]
    size = backend_image_size(backend)
    out = []
    for im in images:
        if isinstance(im, torch.Tensor):
            t = im.float()
            if size is not None and tuple(t.shape[-2:]) != (size, size):
                t = torch.nn.functional.interpolate(t[None], size=(size, size), mode="bilinear",
                                                    align_corners=False)[0]
            out.append(t)
        else:
            out.append(pil_to_tensor(im, size))
    if not out:
        return torch.zeros(0, 3, size or 1, size or 1)
    return torch.stack(out)
