"""Validate a safetensors header ourselves before any library trusts it.

Checkpoints come from strangers: a header length larger than the file, malformed JSON,
offsets outside the data area or overlapping each other, or a dtype nobody knows must
become a :class:`CheckpointError` naming the file and the problem, never a crash, a huge
allocation or a silent misread. Only the header is read here (8 bytes + the JSON), so
inspecting a 15 GB shard costs a few kilobytes of I/O.
"""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..bounded import json_document
from ..errors import CheckpointError

# The safetensors reference implementation refuses headers above 100 MB; so do we.
MAX_HEADER_BYTES = 100_000_000
MAX_DIMS = 64  # more dimensions than any tensor (or torch) uses: refused

# dtype string -> (bytes per element, torch dtype or None when torch cannot hold it)
DTYPES: dict[str, tuple[float, torch.dtype | None]] = {
    "BOOL": (1, torch.bool),
    "U8": (1, torch.uint8),
    "I8": (1, torch.int8),
    "U16": (2, torch.uint16),
    "I16": (2, torch.int16),
    "F16": (2, torch.float16),
    "BF16": (2, torch.bfloat16),
    "U32": (4, torch.uint32),
    "I32": (4, torch.int32),
    "F32": (4, torch.float32),
    "U64": (8, torch.uint64),
    "I64": (8, torch.int64),
    "F64": (8, torch.float64),
    "C64": (8, torch.complex64),
    "F8_E4M3": (1, torch.float8_e4m3fn),
    "F8_E5M2": (1, torch.float8_e5m2),
    "F8_E4M3FNUZ": (1, getattr(torch, "float8_e4m3fnuz", None)),
    "F8_E5M2FNUZ": (1, getattr(torch, "float8_e5m2fnuz", None)),
    "F8_E8M0": (1, getattr(torch, "float8_e8m0fnu", None)),
    "F4": (0.5, None),
    "F6_E2M3": (0.75, None),
    "F6_E3M2": (0.75, None),
}

TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, (_, v) in DTYPES.items() if v is not None}


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file, as its header describes it."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return DTYPES[self.dtype][1]


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    header_len: int
    file_size: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str]


def read_header(path: str | os.PathLike[str]) -> SafetensorsHeader:
    """Read and validate the header of ``path``; raise :class:`CheckpointError` on any flaw."""
    p = str(path)
    try:
        size = os.path.getsize(p)
        with open(p, "rb") as fh:
            head = fh.read(8)
            if size == 0:
                raise CheckpointError(p, "file is empty (0 bytes)")
            if len(head) < 8:
                raise CheckpointError(p, f"truncated: {size} bytes, too short for a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n == 0 or n >= 2**63:
                raise CheckpointError(p, f"invalid safetensors header length {n}")
            if n > size - 8:
                raise CheckpointError(
                    p, f"safetensors header length {n} exceeds the file size ({size} bytes): truncated or not a safetensors file"
                )
            if n > MAX_HEADER_BYTES:
                raise CheckpointError(p, f"safetensors header of {n} bytes is larger than the {MAX_HEADER_BYTES} allowed")
            raw = fh.read(n)
    except OSError as exc:
        raise CheckpointError(p, f"cannot read file: {exc.strerror or exc}") from exc
    if len(raw) != n:
        raise CheckpointError(p, "truncated while reading the safetensors header")
    doc = json_document(raw, p, "safetensors header")
    if not isinstance(doc, dict):
        raise CheckpointError(p, "safetensors header is not a JSON object")
    meta = doc.pop("__metadata__", None) or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CheckpointError(p, "safetensors __metadata__ must map strings to strings")
    data_start = 8 + n
    data_size = size - data_start
    entries: dict[str, TensorEntry] = {}
    for name, info in doc.items():
        if not isinstance(info, dict):
            raise CheckpointError(p, f"tensor '{name}': header entry is not an object")
        dtype = info.get("dtype")
        shape = info.get("shape")
        offsets = info.get("data_offsets")
        if dtype not in DTYPES:
            raise CheckpointError(p, f"tensor '{name}': unknown dtype {dtype!r}")
        if (
            not isinstance(shape, list)
            or len(shape) > MAX_DIMS
            or not all(isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**63 for d in shape)
        ):
            raise CheckpointError(p, f"tensor '{name}': invalid shape {_shape_text(shape)}")
        if (
            not isinstance(offsets, list)
            or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)
        ):
            raise CheckpointError(p, f"tensor '{name}': invalid data_offsets {offsets!r}")
        begin, end = offsets
        if not 0 <= begin <= end <= data_size:
            raise CheckpointError(
                p, f"tensor '{name}': data_offsets [{begin}, {end}] out of range of the {data_size}-byte data area"
            )
        numel = 1
        for d in shape:
            numel *= d
        if numel >= 2**63:
            raise CheckpointError(p, f"tensor '{name}': shape {shape} has more elements than any file can hold")
        expected = numel * DTYPES[dtype][0]
        if expected != end - begin:
            raise CheckpointError(
                p, f"tensor '{name}': {dtype}{shape} needs {expected:g} bytes but data_offsets span {end - begin}"
            )
        entries[name] = TensorEntry(name, dtype, tuple(shape), data_start + begin, data_start + end)
    # sweep in start order, remembering the tensor that reaches furthest: any later
    # tensor starting before that end overlaps it (neighbour checks alone miss cases
    # like [0, 100], [0, 0], [50, 60])
    furthest: TensorEntry | None = None
    for e in sorted(entries.values(), key=lambda e: (e.start, e.end)):
        if not e.nbytes:
            continue
        if furthest is not None and e.start < furthest.end:
            raise CheckpointError(p, f"tensors '{furthest.name}' and '{e.name}' overlap in the data area")
        if furthest is None or e.end > furthest.end:
            furthest = e
    return SafetensorsHeader(p, n, size, entries, dict(meta))


def _shape_text(shape: object) -> str:
    """A shape for a message: huge integers by their size, long lists cut (with a count)."""
    if not isinstance(shape, list):
        return repr(shape)[:120]
    shown = [f"<{d.bit_length()}-bit integer>" if isinstance(d, int) and d.bit_length() > 64 else repr(d)[:40]
             for d in shape[:8]]
    return "[" + ", ".join(shown) + (f", ... ({len(shape) - 8} more)" if len(shape) > 8 else "") + "]"


def is_safetensors(path: str | os.PathLike[str]) -> bool:
    """Cheap sniff: an 8-byte little-endian length followed by '{' (used for odd suffixes)."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(9)
        size = Path(path).stat().st_size
    except OSError:
        return False
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"
