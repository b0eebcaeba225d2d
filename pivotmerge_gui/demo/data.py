"""Procedural image-caption data for the demo world: four domains, fully deterministic.

The demo stands in for LLaVA's heterogeneous alignment sources (web photos, OCR data,
counting/VQA-style scenes, textures). Each domain has its own visual statistics and its
own caption template, but all captions share one small word-level vocabulary (colour
words appear in three domains), so experts trained on different domains really do
compete for the same projector output space.

Two more domains exist for the larger benchmark world only (preset ``large``, see
:mod:`.presets`): ``relation`` (two objects and where the first is relative to the
second: "the red square is left of the blue circle") and ``digits`` (three coloured
digit glyphs read as number words: "a red number reading two five one"). Their words
are appended after the demo's, so the demo's vocabulary and token ids do not change.

Images are float32 RGB tensors ``[3, 16, 16]`` in ``[0, 1]``. Everything is drawn with a
numpy ``PCG64`` generator seeded from ``(seed, domain, split)``, so the same arguments
give bit-identical data on every machine (no torch RNG involved).

Each example carries its ``caption`` and its ``content`` words: the words that depend on
the image (colour, shape, letters, count...). The language model is pre-trained on text
where these content words appear, in order, in the prefix slots that the projected image
tokens occupy later (see :mod:`pivotmerge_gui.demo.models`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

IMAGE_SIZE = 16
PATCH = 4
NUM_PATCHES = (IMAGE_SIZE // PATCH) ** 2  # 16 image tokens, like LLaVA's 576 in miniature

DOMAINS: tuple[str, ...] = ("shapes", "text", "count", "texture")
# Opt-in domains of the larger benchmark world (preset "large", see :mod:`.presets`):
# never part of the shipped demo, whose data, vocabulary and token ids stay as they are.
EXTRA_DOMAINS: tuple[str, ...] = ("relation", "digits")
ALL_DOMAINS: tuple[str, ...] = DOMAINS + EXTRA_DOMAINS

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.16, 0.16),
    "green": (0.16, 0.78, 0.24),
    "blue": (0.20, 0.31, 0.90),
    "yellow": (0.90, 0.86, 0.16),
    "purple": (0.59, 0.20, 0.78),
    "cyan": (0.16, 0.82, 0.82),
}
SHAPES = ("square", "circle", "triangle", "cross")
NUMBERS = ("one", "two", "three", "four", "five", "six")
PATTERNS: dict[str, tuple[str, ...]] = {
    "hstripes": ("horizontal", "stripes"),
    "vstripes": ("vertical", "stripes"),
    "dstripes": ("diagonal", "stripes"),
    "checks": ("checks",),
    "grid": ("grid",),
}

# A tiny 3x5 bitmap font (rows top to bottom, '#' = ink): the OCR-like domain renders
# three of these letters side by side.
FONT: dict[str, tuple[str, ...]] = {
    "A": (".#.", "#.#", "###", "#.#", "#.#"),
    "C": (".##", "#..", "#..", "#..", ".##"),
    "E": ("###", "#..", "##.", "#..", "###"),
    "F": ("###", "#..", "##.", "#..", "#.."),
    "H": ("#.#", "#.#", "###", "#.#", "#.#"),
    "J": ("..#", "..#", "..#", "#.#", ".#."),
    "L": ("#..", "#..", "#..", "#..", "###"),
    "O": ("###", "#.#", "#.#", "#.#", "###"),
    "P": ("##.", "#.#", "##.", "#..", "#.."),
    "T": ("###", ".#.", ".#.", ".#.", ".#."),
    "U": ("#.#", "#.#", "#.#", "#.#", "###"),
    "X": ("#.#", "#.#", ".#.", "#.#", "#.#"),
    "Z": ("###", "..#", ".#.", "#..", "###"),
}
LETTERS = tuple(FONT)

# Digit glyphs 1..6 in the same 3x5 style (the "digits" domain reads them as number words).
DIGIT_FONT: dict[str, tuple[str, ...]] = {
    "one": (".#.", "##.", ".#.", ".#.", "###"),
    "two": ("##.", "..#", ".#.", "#..", "###"),
    "three": ("##.", "..#", ".#.", "..#", "##."),
    "four": ("#.#", "#.#", "###", "..#", "..#"),
    "five": ("###", "#..", "##.", "..#", "##."),
    "six": (".##", "#..", "###", "#.#", "###"),
}
RELATIONS: dict[str, tuple[str, ...]] = {"left": ("left", "of"), "right": ("right", "of"),
                                          "above": ("above",), "below": ("below",)}

SPECIALS = ("<pad>", "<bos>", "<eos>", "<blank>", "<unk>")
_TEMPLATE_WORDS = ("a", "at", "the", "text", "reading", "there", "is", "are", "dot", "dots",
                   "texture", "of", "and", "top", "bottom", "left", "right")


# words only the extra domains use; appended after the demo's words (demo ids unchanged)
_EXTRA_WORDS: dict[str, tuple[str, ...]] = {"relation": ("above", "below"), "digits": ("number",)}


def vocabulary(domains: Sequence[str] = DOMAINS) -> list[str]:
    """The shared word list (specials first; order fixes token ids). Words of the extra
    domains come after the demo's, so every demo word keeps its id in a larger world."""
    words: list[str] = list(SPECIALS)
    extra = tuple(w for d in EXTRA_DOMAINS if d in domains for w in _EXTRA_WORDS[d])
    for group in (_TEMPLATE_WORDS, tuple(COLORS), SHAPES, LETTERS, NUMBERS,
                  tuple(w for ws in PATTERNS.values() for w in ws), extra):
        for w in group:
            if w not in words:
                words.append(w)
    return words


class Tokenizer:
    """Whitespace word tokenizer over :func:`vocabulary` (case-sensitive: letters are
    upper case so that the letter ``A`` and the article ``a`` are different tokens)."""

    def __init__(self, words: Sequence[str] | None = None) -> None:
        self.words = list(words) if words is not None else vocabulary()
        self.ids = {w: i for i, w in enumerate(self.words)}
        self.pad_id = self.ids["<pad>"]
        self.bos_id = self.ids["<bos>"]
        self.eos_id = self.ids["<eos>"]
        self.blank_id = self.ids["<blank>"]
        self.unk_id = self.ids["<unk>"]

    def __len__(self) -> int:
        return len(self.words)

    def encode(self, text: str) -> list[int]:
        return [self.ids.get(w, self.unk_id) for w in text.split()]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first ``<eos>``; padding and other specials are dropped."""
        out = []
        for i in ids:
            i = int(i)
            if i == self.eos_id:
                break
            w = self.words[i] if 0 <= i < len(self.words) else "<unk>"
            if w not in SPECIALS:
                out.append(w)
        return " ".join(out)


@dataclass
class DomainData:
    """One split of one domain: images [N, 3, 16, 16], captions and content words."""

    domain: str
    split: str
    images: torch.Tensor
    captions: list[str]
    content: list[list[str]]

    def __len__(self) -> int:
        return len(self.captions)

    def subset(self, n: int) -> DomainData:
        n = min(n, len(self))
        return DomainData(self.domain, self.split, self.images[:n], self.captions[:n], self.content[:n])


def _rng(seed: int, domain: str, split: str) -> np.random.Generator:
    digest = hashlib.sha256(f"pivotmerge-demo/{seed}/{domain}/{split}".encode()).digest()
    return np.random.Generator(np.random.PCG64(int.from_bytes(digest[:8], "little")))


def _rgb(name: str) -> np.ndarray:
    return np.asarray(COLORS[name], dtype=np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(0.0, 0.18)
    tint = rng.uniform(-0.04, 0.04, size=3)
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.float32)
    img[:] = np.clip(grey + tint, 0.0, 1.0)
    return img


def _shape_mask(shape: str, size: int) -> np.ndarray:
    yy, xx = np.mgrid[0:size, 0:size]
    c = (size - 1) / 2.0
    if shape == "square":
        return np.ones((size, size), dtype=bool)
    if shape == "circle":
        return (yy - c) ** 2 + (xx - c) ** 2 <= (size / 2.0) ** 2 + 0.3
    if shape == "triangle":  # apex up
        return np.abs(xx - c) <= (yy + 1) / 2.0
    if shape == "cross":
        half = max(1, size // 6)
        return (np.abs(yy - c) <= half) | (np.abs(xx - c) <= half)
    raise ValueError(shape)


def _make_shapes(rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    img = _background(rng)
    color = str(rng.choice(list(COLORS)))
    shape = str(rng.choice(SHAPES))
    vpos = str(rng.choice(("top", "bottom")))
    hpos = str(rng.choice(("left", "right")))
    size = int(rng.integers(5, 8))
    y0 = int(rng.integers(0, 8 - size + 1)) + (0 if vpos == "top" else 8)
    x0 = int(rng.integers(0, 8 - size + 1)) + (0 if hpos == "left" else 8)
    m = _shape_mask(shape, size)
    img[y0:y0 + size, x0:x0 + size][m] = _rgb(color)
    return img, f"a {color} {shape} at the {vpos} {hpos}", [color, shape, vpos, hpos]


def _draw_glyph(img: np.ndarray, glyph: Sequence[str], y: int, x: int, ink: np.ndarray) -> None:
    for r, row in enumerate(glyph):
        for c, px in enumerate(row):
            if px == "#":
                img[y + r, x + c] = ink


def _make_text(rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    img = _background(rng)
    ink = np.clip(rng.uniform(0.7, 1.0, size=3), 0, 1).astype(np.float32)
    letters = [str(rng.choice(LETTERS)) for _ in range(3)]
    # one letter per 4-pixel patch column (1 pixel of jitter), like text on a baseline
    jitter = int(rng.integers(0, 2))
    y = int(rng.integers(1, IMAGE_SIZE - 5))
    for i, ch in enumerate(letters):
        _draw_glyph(img, FONT[ch], y, PATCH * i + jitter, ink)
    return img, "text reading " + " ".join(letters), letters


def _make_count(rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    img = _background(rng)
    color = str(rng.choice(list(COLORS)))
    n = int(rng.integers(1, len(NUMBERS) + 1))
    # dots are 2x2 on a 7x7 lattice of cells (no touching), positions drawn without repeat
    cells = rng.choice(49, size=n, replace=False)
    for cell in cells:
        cy, cx = divmod(int(cell), 7)
        y, x = 1 + 2 * cy, 1 + 2 * cx
        img[y:y + 2, x:x + 2] = _rgb(color)
    num = NUMBERS[n - 1]
    caption = f"there is one {color} dot" if n == 1 else f"there are {num} {color} dots"
    return img, caption, [num, color]


def _make_texture(rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    pattern = str(rng.choice(list(PATTERNS)))
    period = int(rng.integers(2, 5))
    phase = int(rng.integers(0, period * 2))
    yy, xx = np.mgrid[0:IMAGE_SIZE, 0:IMAGE_SIZE]
    if pattern == "hstripes":
        on = ((yy + phase) // period) % 2 == 0
    elif pattern == "vstripes":
        on = ((xx + phase) // period) % 2 == 0
    elif pattern == "dstripes":
        on = ((xx + yy + phase) // period) % 2 == 0
    elif pattern == "checks":
        on = (((yy + phase) // period) + ((xx + phase) // period)) % 2 == 0
    else:  # grid: thin lines of c1 on c2
        on = ((yy + phase) % (period + 2) == 0) | ((xx + phase) % (period + 2) == 0)
    img = np.where(on[..., None], _rgb(c1), _rgb(c2)).astype(np.float32)
    words = list(PATTERNS[pattern])
    return img, f"a texture of {c1} and {c2} " + " ".join(words), [c1, c2, *words]


def _make_relation(rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    """Two objects and where the first is relative to the second: the caption needs both
    objects' colour and shape bound to their relative position (``shapes`` only ever
    places one object in a quadrant)."""
    img = _background(rng)
    c1, c2 = (str(c) for c in rng.choice(list(COLORS), size=2, replace=False))
    s1, s2 = (str(s) for s in rng.choice(SHAPES, size=2, replace=False))
    rel = str(rng.choice(list(RELATIONS)))
    size = 5
    # the first object on one side of the image, the second on the other; the other axis free
    near, far = int(rng.integers(0, 3)), int(rng.integers(8, 11))
    a, b = int(rng.integers(0, IMAGE_SIZE - size + 1)), int(rng.integers(0, IMAGE_SIZE - size + 1))
    first_lo = rel in ("left", "above")
    p1, p2 = (near, far) if first_lo else (far, near)
    horizontal = rel in ("left", "right")
    (y1, x1), (y2, x2) = ((a, p1), (b, p2)) if horizontal else ((p1, a), (p2, b))
    img[y1:y1 + size, x1:x1 + size][_shape_mask(s1, size)] = _rgb(c1)
    img[y2:y2 + size, x2:x2 + size][_shape_mask(s2, size)] = _rgb(c2)
    words = RELATIONS[rel]
    caption = f"the {c1} {s1} is {' '.join(words)} the {c2} {s2}"
    return img, caption, [c1, s1, rel, c2, s2]


def _make_digits(rng: np.random.Generator) -> tuple[np.ndarray, str, list[str]]:
    """Three coloured digit glyphs read as number words: the glyphs are new to every other
    domain (``text`` has letters only) and the words are shared with ``count``."""
    img = _background(rng)
    color = str(rng.choice(list(COLORS)))
    digits = [str(rng.choice(NUMBERS)) for _ in range(3)]
    jitter = int(rng.integers(0, 2))
    y = int(rng.integers(1, IMAGE_SIZE - 5))
    for i, num in enumerate(digits):
        _draw_glyph(img, DIGIT_FONT[num], y, PATCH * i + jitter + 2, _rgb(color))
    return img, f"a {color} number reading " + " ".join(digits), [color, *digits]


_MAKERS = {"shapes": _make_shapes, "text": _make_text, "count": _make_count, "texture": _make_texture,
           "relation": _make_relation, "digits": _make_digits}
SPLIT_SIZES = {"train": 1024, "val": 128, "test": 256}


def generate(domain: str, split: str, n: int | None = None, seed: int = 0,
             noise: float = 0.04) -> DomainData:
    """Draw ``n`` examples of ``domain`` for ``split`` (deterministic in all arguments).

    Different splits use independent streams, so val/test images never repeat train
    images (captions can repeat: the caption space of a domain is small by design).
    """
    if domain not in _MAKERS:
        raise ValueError(f"unknown demo domain '{domain}'; known: {', '.join(ALL_DOMAINS)}")
    n = SPLIT_SIZES[split] if n is None else int(n)
    rng = _rng(seed, domain, split)
    imgs, caps, content = [], [], []
    for _ in range(n):
        img, cap, words = _MAKERS[domain](rng)
        img = np.clip(img + rng.normal(0.0, noise, size=img.shape).astype(np.float32), 0.0, 1.0)
        imgs.append(img)
        caps.append(cap)
        content.append(words)
    arr = np.stack(imgs).transpose(0, 3, 1, 2).copy() if imgs else np.zeros((0, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
    return DomainData(domain, split, torch.from_numpy(arr.astype(np.float32)), caps, content)


def generate_all(split: str, n: int | None = None, seed: int = 0,
                 domains: Sequence[str] = DOMAINS) -> dict[str, DomainData]:
    """One split of every domain (default: the demo's :data:`DOMAINS`), in that order."""
    return {d: generate(d, split, n, seed) for d in domains}


def patchify(images: torch.Tensor) -> torch.Tensor:
    """[N, 3, H, W] -> [N, num_patches, 3*PATCH*PATCH] in row-major patch order."""
    n, c, h, w = images.shape
    p = PATCH
    x = images.reshape(n, c, h // p, p, w // p, p).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(n, (h // p) * (w // p), c * p * p)
