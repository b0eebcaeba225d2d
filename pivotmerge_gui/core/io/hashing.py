"""sha256 of checkpoints: of a file's bytes, or of a projector's tensors in a stable order.

One home for the hashes the readers record, ``inspect`` shows and the demo's manifest
checks. :func:`tensor_digest` (from tensors) and :func:`raw_digest` (from the raw
safetensors bytes on disk) agree on the same tensors, so ``inspect`` and ``load`` report
the same hash without reading whole files. Torch is imported only by
:func:`tensor_digest`.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes (1 MiB chunks; never the whole file in memory)."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(_CHUNK):
                h.update(chunk)
    except OSError as exc:
        raise CheckpointError(str(path), f"cannot read file: {exc.strerror or exc}") from exc
    return h.hexdigest()


def _digest_update(h: Any, key: str, dtype: str, shape: Iterable[int], data: Any) -> None:
    h.update(key.encode("utf-8") + b"\0" + dtype.encode() + b"\0" + ",".join(map(str, shape)).encode() + b"\0")
    h.update(data)


def tensor_digest(tensors: Mapping[str, Any]) -> str:
    """sha256 over (key, safetensors dtype name, shape, little-endian C-order bytes) of each
    tensor, keys sorted. Equals :func:`raw_digest` of the same tensors in safetensors files."""
    import torch

    from .safetensors_header import TORCH_TO_ST

    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        name = TORCH_TO_ST.get(t.dtype, str(t.dtype))
        # a uint8 numpy view exposes the tensor's bytes to hashlib without a copy
        _digest_update(h, key, name, t.shape, t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def raw_digest(base: Path, space: Mapping[str, tuple[str, Any]], keys: Iterable[str]) -> str:
    """:func:`tensor_digest` computed from the raw bytes on disk (no tensor is built).

    ``space``: key -> (file name under ``base``, header entry with ``start``, ``nbytes``,
    ``dtype`` and ``shape``)."""
    h = hashlib.sha256()
    try:
        with contextlib.ExitStack() as stack:
            handles: dict[str, Any] = {}
            for key in sorted(keys):
                name, entry = space[key]
                if name not in handles:
                    handles[name] = stack.enter_context(open(base / name, "rb"))
                fh = handles[name]
                fh.seek(entry.start)
                data = fh.read(entry.nbytes)
                if len(data) != entry.nbytes:
                    raise CheckpointError(str(base / name), f"truncated inside tensor '{key}'")
                _digest_update(h, key, entry.dtype, entry.shape, data)
    except OSError as exc:
        raise CheckpointError(str(base), f"cannot read file: {exc.strerror or exc}") from exc
    return h.hexdigest()
