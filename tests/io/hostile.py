"""Hand-built pickle checkpoints whose pickle lies about sizes, strides or storages.

``torch.save`` only writes honest files, so these write the zip (torch >= 1.6) and legacy
layouts directly: a ``data.pkl`` whose persistent ids name storages with any element count,
and tensors rebuilt by ``torch._utils._rebuild_tensor_v2`` with any offset, sizes and strides.
"""

from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path
from typing import Any

import torch


class Storage:
    """A storage as the pickle names it: record key, storage class and claimed elements."""

    def __init__(self, key: str, numel: int, cls: Any = torch.FloatStorage, view: tuple | None = None) -> None:
        self.key, self.numel, self.cls, self.view = key, numel, cls, view


class View:
    """A tensor rebuilt from ``storage`` with the given offset, sizes and strides."""

    def __init__(self, storage: Storage, offset: Any, size: Any, stride: Any) -> None:
        self.args = (storage, offset, size, stride)

    def __reduce__(self):
        storage, offset, size, stride = self.args
        return (torch._utils._rebuild_tensor_v2, (storage, offset, size, stride, False, collections.OrderedDict()))


class _Pickler(pickle.Pickler):
    def __init__(self, fh: Any, legacy: bool) -> None:
        super().__init__(fh, protocol=2)
        self.legacy = legacy

    def persistent_id(self, obj: Any) -> Any:
        if not isinstance(obj, Storage):
            return None
        if self.legacy:
            return ("storage", obj.cls, obj.key, "cpu", obj.numel, obj.view)
        return ("storage", obj.cls, obj.key, "cpu", obj.numel)


def _dumps(obj: Any, legacy: bool = False) -> bytes:
    buf = io.BytesIO()
    _Pickler(buf, legacy).dump(obj)
    return buf.getvalue()


def floats(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def zip_checkpoint(path: Path, state: Any, records: dict[str, bytes], compress: bool = False) -> Path:
    """A torch zip checkpoint: ``archive/data.pkl`` plus one record per storage key."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _dumps(state))
        z.writestr("archive/byteorder", "little")
        for key, data in records.items():
            z.writestr(f"archive/data/{key}", data, zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED)
        z.writestr("archive/version", "3\n")
    return path


def legacy_checkpoint(path: Path, state: Any, records: dict[str, tuple[int, bytes]]) -> Path:
    """A legacy (non-zip) checkpoint; ``records``: key -> (element count written, bytes)."""
    out = bytearray()
    out += pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
    out += pickle.dumps(1001, protocol=2)
    out += pickle.dumps({"protocol_version": 1001, "little_endian": True,
                         "type_sizes": {"short": 2, "int": 4, "long": 4}}, protocol=2)
    out += _dumps(state, legacy=True)
    out += pickle.dumps(list(records), protocol=2)
    for count, data in records.values():
        out += struct.pack("<q", count) + data
    path.write_bytes(bytes(out))
    return path
