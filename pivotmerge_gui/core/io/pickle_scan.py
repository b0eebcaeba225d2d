"""Check a pickle checkpoint's structure against its file before torch materialises a byte.

``torch.load(weights_only=True)`` never runs code from a file, but it trusts the sizes the
pickle claims: a 3 KB file holding a stride-0 view of shape ``[100000, 100000]`` loads as a
harmless-looking tensor that becomes 40 GB once copied, a zip storage record whose element
count over-claims its record is memory-mapped past its end (the zip headers after it load
as weights: a silent misread), and a legacy (pre-1.6, non-zip) file allocates whatever
element count its pickle names before reading a byte of data.

:func:`scan_pickle` walks the pickle first with an unpickler that imports nothing (every
global resolves to an inert stand-in) and checks, for every storage and tensor:

- zip: the storage's record exists, is stored uncompressed, lies inside the file, and holds
  at least ``numel x itemsize`` bytes; legacy: each storage's element count fits in the
  file and equals the count written before its data;
- every tensor view: non-negative offset, sizes and strides, at most :data:`MAX_DIMS`
  dimensions, every element inside its storage, and no more elements than its storage holds
  (a stride-0 or overlapping view that would expand on copy is refused).

Anything wrong is a :class:`CheckpointError` naming the file, the tensor (or storage) and
the claim. What the scan does not understand it leaves to ``torch.load``, which still
refuses unsafe globals; :func:`view_problem` is also applied to the tensors torch returns,
right before they are copied. Globals the pickle references are recorded so a refusal can
name them (:attr:`PickleScan.globals`).
"""

from __future__ import annotations

import io
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import CheckpointError

MAX_DIMS = 64
MAX_PICKLE_BYTES = 256 * 2**20  # data.pkl of a zip checkpoint (real ones are kilobytes)
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER

# legacy storage class name -> bytes per element (torch.<Name>; UntypedStorage is bytes)
_ITEMSIZE = {
    "DoubleStorage": 8, "FloatStorage": 4, "HalfStorage": 2, "BFloat16Storage": 2,
    "LongStorage": 8, "IntStorage": 4, "ShortStorage": 2, "CharStorage": 1, "ByteStorage": 1,
    "BoolStorage": 1, "ComplexDoubleStorage": 16, "ComplexFloatStorage": 8, "QInt8Storage": 1,
    "QUInt8Storage": 1, "QInt32Storage": 4, "QUInt4x2Storage": 1, "QUInt2x4Storage": 1,
    "UntypedStorage": 1,
}


@dataclass(frozen=True)
class _StorageType:
    name: str
    itemsize: int


@dataclass
class _Storage:
    key: str
    type: _StorageType
    numel: int


@dataclass
class _TensorRef:
    storage: _Storage
    offset: Any
    size: Any
    stride: Any
    problem: str | None = None


@dataclass
class PickleScan:
    """What the scan saw: format, storages, tensor views and the globals referenced."""

    format: str  # "zip" | "legacy" | "unknown"
    storages: int = 0
    tensors: int = 0
    globals: list[str] = field(default_factory=list)


class _Inert:
    """Stand-in for any global the scan does not model: accepts every pickle operation."""

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_index(v: Any) -> bool:
    """A non-negative int that fits torch's int64 sizes, strides and offsets."""
    return _is_int(v) and 0 <= v < 2**63


def view_problem(numel_storage: int, offset: Any, size: Any, stride: Any) -> str | None:
    """Why a view ``(offset, size, stride)`` of a storage of ``numel_storage`` elements is
    unsafe to copy, or ``None`` when it is fine."""
    if not _is_index(offset):
        return f"invalid storage offset {_short(offset)}"
    if not isinstance(size, (tuple, list)) or not isinstance(stride, (tuple, list)):
        return "sizes and strides must be sequences"
    if len(size) > MAX_DIMS:
        return f"{len(size)} dimensions (at most {MAX_DIMS} allowed)"
    if len(size) != len(stride):
        return f"{len(size)} sizes but {len(stride)} strides"
    if not all(_is_index(s) for s in size):
        return f"invalid sizes {_short(list(size))}"
    if not all(_is_index(s) for s in stride):
        return f"invalid strides {_short(list(stride))}"
    if any(s == 0 for s in size):
        return None
    last = offset + sum((s - 1) * st for s, st in zip(size, stride))
    if last >= numel_storage:
        return (f"the view (offset {offset}, sizes {_short(list(size))}, strides {_short(list(stride))}) "
                f"reaches element {_short(last)} of a storage of {numel_storage} elements")
    numel = 1
    for s in size:
        numel *= s
        if numel > numel_storage:
            break
    if numel > numel_storage:
        total = 1
        for s in size:
            total *= s
        return (f"a stride-0 or overlapping view of {_short(total)} elements over a storage of "
                f"{numel_storage} elements (sizes {_short(list(size))}, strides {_short(list(stride))}); "
                "copying it would need far more memory than the file holds")
    return None


def _short(v: Any, limit: int = 120) -> str:
    if isinstance(v, (list, tuple)):
        text = "[" + ", ".join(_short(x, limit) for x in v[: MAX_DIMS + 1]) + "]"
    elif _is_int(v) and v.bit_length() > 64:
        text = f"<{v.bit_length()}-bit integer>"
    else:
        text = v if isinstance(v, str) else repr(v)
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


class _Scanner(pickle.Unpickler):
    """Unpickles with inert stand-ins; storages go through ``on_storage``."""

    def __init__(self, file: Any, on_storage: Callable[[tuple], Any], seen_globals: list[str]) -> None:
        super().__init__(file)
        self._on_storage = on_storage
        self._globals = seen_globals
        self.tensors: list[_TensorRef] = []

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and pid and pid[0] in ("storage", b"storage"):
            return self._on_storage(pid)
        return _Inert()

    def find_class(self, module: str, name: str) -> Any:
        full = f"{module}.{name}"
        if full not in self._globals and len(self._globals) < 1000:
            self._globals.append(full)
        if full in ("torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor"):
            return self._tensor
        if full in ("torch._utils._rebuild_parameter", "torch._utils._rebuild_parameter_with_state"):
            return lambda data, *rest: data
        if full == "torch._tensor._rebuild_from_type_v2":
            return lambda func, new_type, args, state: func(*args) if callable(func) else _Inert()
        if full == "collections.OrderedDict":
            return OrderedDict
        if full == "torch.Size":
            return lambda *args: tuple(*args)
        if module in ("torch", "torch.storage") and name in _ITEMSIZE:
            return _StorageType(name, _ITEMSIZE[name])
        return type(name if name.isidentifier() else "Global", (_Inert,), {})

    def _tensor(self, storage: Any, offset: Any = 0, size: Any = (), stride: Any = (), *rest: Any) -> Any:
        if not isinstance(storage, _Storage):
            return _Inert()
        ref = _TensorRef(storage, offset, size, stride)
        ref.problem = view_problem(storage.numel, offset, size, stride)
        self.tensors.append(ref)
        return ref


class _Bounded(io.RawIOBase):
    """A read-only view of ``[start, end)`` of a file: reads never ask for more than is left
    (a pickle claiming a 2**60-byte string cannot make the reader allocate it), and no
    ``peek``, so the unpickler consumes exactly what it parses and :meth:`tell` is exact."""

    def __init__(self, fh: Any, start: int, end: int) -> None:
        self._fh, self._pos, self._end = fh, start, end

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        left = self._end - self._pos
        n = left if n is None or n < 0 else min(n, left)
        if n <= 0:
            return b""
        self._fh.seek(self._pos)
        data = self._fh.read(n)
        self._pos += len(data)
        return data

    def readinto(self, buf: Any) -> int:
        data = self.read(len(buf))
        buf[: len(data)] = data
        return len(data)

    def tell(self) -> int:
        return self._pos


def scan_pickle(path: Path) -> PickleScan:
    """Check the structure of the pickle checkpoint ``path`` (see the module docstring).

    Raises :class:`CheckpointError` for a structural lie; returns what was seen otherwise
    (format ``"unknown"`` when the scan could not follow the file; ``torch.load`` judges)."""
    p = str(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            if fh.read(4) == b"PK\x03\x04":
                return _scan_zip(path, p, size)
            return _scan_legacy(fh, p, size)
    except OSError as exc:
        raise CheckpointError(p, f"cannot read file: {exc.strerror or exc}") from exc


def _unpickle(scanner: _Scanner) -> Any:
    try:
        return scanner.load()
    except CheckpointError:
        raise
    except Exception:  # noqa: BLE001 - a pickle the scan cannot follow: torch.load reports it  # malformed pickle: torch.load reports it in its words
        return None


def _named_problem(result: Any, tensors: list[_TensorRef], p: str) -> None:
    """Raise for the first unsafe view, naming its key when the result's dicts reach it."""
    bad = [t for t in tensors if t.problem]
    if not bad:
        return
    names: dict[int, str] = {}
    stack: list[tuple[Any, str, int]] = [(result, "", 0)]
    while stack:  # iterative walk of dicts/lists, 4 levels deep
        node, prefix, depth = stack.pop()
        if isinstance(node, _TensorRef):
            names.setdefault(id(node), prefix)
        elif depth < 4 and isinstance(node, dict):
            stack.extend((v, f"{prefix}.{k}" if prefix else str(k), depth + 1) for k, v in list(node.items())[:100000])
        elif depth < 4 and isinstance(node, (list, tuple)):
            stack.extend((v, f"{prefix}[{i}]", depth + 1) for i, v in enumerate(node[:100000]))
    first = bad[0]
    name = names.get(id(first))
    what = f"tensor '{_short(name)}'" if name else f"a tensor on storage '{_short(first.storage.key)}'"
    raise CheckpointError(p, f"refused: {what}: {first.problem}")


def _on_storage(p: str, check: Callable[[_StorageType, str, int, tuple], _Storage]) -> Callable[[tuple], Any]:
    """persistent_load for storage ids: well-formed claims go to ``check``; ids torch could
    not use either become inert (torch.load then fails on them in its own words)."""

    def on_storage(pid: tuple) -> Any:
        stype, key, numel = pid[1:3] + (pid[4],) if len(pid) > 4 else (None, None, None)
        if not isinstance(stype, _StorageType) or not isinstance(key, str) or not _is_int(numel):
            return _Inert()
        if numel < 0:
            raise CheckpointError(p, f"refused: storage '{_short(key)}' claims {numel} elements")
        return check(stype, key, numel, pid)

    return on_storage


def _scan_zip(path: Path, p: str, size: int) -> PickleScan:
    scan = PickleScan("zip")
    try:
        zf = zipfile.ZipFile(path)
    except Exception as exc:  # noqa: BLE001 - zipfile raises many types for damaged archives
        raise CheckpointError(p, f"truncated or corrupt checkpoint (zip archive: {_short(str(exc))})") from None
    with zf, open(path, "rb") as raw:
        infos = {i.filename: i for i in zf.infolist()}
        if not infos:
            raise CheckpointError(p, "truncated or corrupt checkpoint (empty zip archive)")
        prefix = zf.infolist()[0].filename.split("/")[0]
        pkl = infos.get(f"{prefix}/data.pkl")
        if pkl is None:
            raise CheckpointError(p, "not a torch checkpoint: a zip archive without data.pkl")
        if pkl.file_size > MAX_PICKLE_BYTES or (pkl.compress_type == zipfile.ZIP_STORED and pkl.compress_size > size):
            raise CheckpointError(p, f"refused: data.pkl claims {pkl.file_size} bytes")
        try:
            with zf.open(pkl) as fh:
                data = fh.read(MAX_PICKLE_BYTES + 1)
        except Exception as exc:  # noqa: BLE001 - zipfile raises many types for damaged archives
            raise CheckpointError(p, f"truncated or corrupt checkpoint (data.pkl: {_short(str(exc))})") from None
        storages: dict[str, _Storage] = {}

        def check(stype: _StorageType, key: str, numel: int, pid: tuple) -> _Storage:
            if key in storages:  # torch keeps the first storage of a key
                return storages[key]
            name = f"{prefix}/data/{key}"
            info = infos.get(name)
            if info is None:
                raise CheckpointError(p, f"truncated or corrupt checkpoint (storage record '{_short(name)}' is missing)")
            if info.compress_type != zipfile.ZIP_STORED:
                raise CheckpointError(p, f"refused: storage record '{_short(name)}' is compressed; torch reads tensors "
                                         "from uncompressed records only (it would read compressed bytes as weights)")
            start = _record_data_offset(raw, info, p)
            if start + info.file_size > size or info.compress_size != info.file_size:
                raise CheckpointError(p, f"truncated or corrupt checkpoint (storage record '{_short(name)}' runs past "
                                         f"the end of the {size}-byte file)")
            need = numel * stype.itemsize
            if need > info.file_size:
                raise CheckpointError(
                    p, f"refused: storage '{_short(key)}' claims {numel} elements of {stype.itemsize} bytes "
                       f"({need} bytes) but its record holds {info.file_size} bytes; reading it would "
                       "take the bytes after the record as weights")
            storages[key] = _Storage(key, stype, numel)
            return storages[key]

        scanner = _Scanner(io.BytesIO(data), _on_storage(p, check), scan.globals)
        result = _unpickle(scanner)
    scan.storages, scan.tensors = len(storages), len(scanner.tensors)
    _named_problem(result, scanner.tensors, p)
    return scan


def _record_data_offset(raw: Any, info: zipfile.ZipInfo, p: str) -> int:
    """Where a record's bytes start: after its local header (name and extra field)."""
    raw.seek(info.header_offset)
    head = raw.read(30)
    if len(head) != 30 or head[:4] != b"PK\x03\x04":
        raise CheckpointError(p, f"truncated or corrupt checkpoint (bad local header of '{_short(info.filename)}')")
    name_len, extra_len = struct.unpack("<HH", head[26:30])
    return info.header_offset + 30 + name_len + extra_len


def _scan_legacy(fh: Any, p: str, size: int) -> PickleScan:
    """Legacy (non-zip) layout: magic, protocol, sys info, the pickle, storage keys, then
    per storage an int64 element count and its bytes."""
    scan = PickleScan("unknown")
    stream = _Bounded(fh, 0, size)
    plain: list[str] = []
    try:
        header = [_Scanner(stream, lambda pid: _Inert(), plain).load() for _ in range(3)]
    except Exception:  # noqa: BLE001 - a pickle the scan cannot follow: torch.load reports it
        return scan  # not a legacy torch file: torch.load says what it is
    if header[0] != LEGACY_MAGIC or plain:
        return scan
    scan.format = "legacy"
    roots: dict[str, _Storage] = {}
    views: dict[str, _Storage] = {}

    def check(stype: _StorageType, key: str, numel: int, pid: tuple) -> _Storage:
        if numel * stype.itemsize > size:
            raise CheckpointError(
                p, f"refused: storage '{_short(key)}' claims {numel} elements of {stype.itemsize} bytes, "
                   f"more than the whole {size}-byte file")
        storage = roots.setdefault(key, _Storage(key, stype, numel))
        view = pid[5] if len(pid) > 5 else None
        if isinstance(view, tuple) and len(view) == 3:
            vkey, voff, vsize = view
            if not (_is_int(voff) and _is_int(vsize) and 0 <= voff and 0 <= vsize and voff + vsize <= storage.numel):
                raise CheckpointError(p, f"refused: storage view '{_short(vkey)}' lies outside storage '{_short(key)}'")
            return views.setdefault(str(vkey), _Storage(str(vkey), stype, vsize))
        return storage

    scanner = _Scanner(stream, _on_storage(p, check), scan.globals)
    result = _unpickle(scanner)
    if result is None:
        return scan
    try:
        keys = _Scanner(stream, lambda pid: _Inert(), plain).load()
    except Exception:  # noqa: BLE001 - a pickle the scan cannot follow: torch.load reports it
        keys = None
    if not isinstance(keys, list) or plain:
        raise CheckpointError(p, "truncated or corrupt checkpoint (legacy storage list unreadable)")
    offset = stream.tell()
    for key in keys:
        st = roots.get(key) if isinstance(key, str) else None
        if st is None:
            raise CheckpointError(p, f"truncated or corrupt checkpoint (storage list names unknown storage {_short(key)})")
        fh.seek(offset)
        head = fh.read(8)
        if len(head) != 8:
            raise CheckpointError(p, f"truncated or corrupt checkpoint (file ends before storage '{_short(key)}')")
        (count,) = struct.unpack("<q", head)
        if count != st.numel:
            raise CheckpointError(p, f"refused: storage '{_short(key)}' claims {st.numel} elements but its data "
                                     f"says {count}")
        offset += 8 + count * st.type.itemsize
        if offset > size:
            raise CheckpointError(p, f"truncated or corrupt checkpoint (storage '{_short(key)}' runs past the end "
                                     f"of the {size}-byte file)")
    scan.storages, scan.tensors = len(roots), len(scanner.tensors)
    _named_problem(result, scanner.tensors, p)
    return scan


# globals of ordinary checkpoints: never the reason a pickle is refused
_ORDINARY = {
    "torch._utils._rebuild_tensor_v2", "torch._utils._rebuild_tensor", "torch._utils._rebuild_parameter",
    "torch._utils._rebuild_parameter_with_state", "torch._tensor._rebuild_from_type_v2", "collections.OrderedDict",
    "torch.Size", "torch.device", "torch.nn.parameter.Parameter", "torch.Tensor",
    *(f"torch.{n}" for n in _ITEMSIZE), *(f"torch.storage.{n}" for n in _ITEMSIZE),
}
_TORCH_BOILERPLATE = ("Weights only load failed", "Check the documentation", "In PyTorch 2.6")


def refusal_reason(torch_message: str, seen_globals: list[str], limit: int = 500) -> str:
    """What ``torch.load(weights_only=True)`` refused, in a few words: torch's own sentence
    without its boilerplate, else the unusual globals the scan saw. Never empty; long texts
    are cut with an explicit count, never silently."""
    parts: list[str] = []
    for para in re.split(r"\n\s*\n", torch_message or ""):
        text = " ".join(para.split())
        if "WeightsUnpickler error:" in text:
            text = text.split("WeightsUnpickler error:", 1)[1].strip()
        elif text.startswith(_TORCH_BOILERPLATE):
            continue
        text = re.split(r" Please (?:use|file|check) ", text, maxsplit=1)[0].strip()
        if text:
            parts.append(text)
    reason = "; ".join(parts)
    unusual = [g for g in seen_globals if g not in _ORDINARY]
    if not reason and unusual:
        reason = "it references " + ", ".join(unusual[:5]) + (f" and {len(unusual) - 5} more" if len(unusual) > 5 else "")
    if not reason:
        reason = "an object torch will not rebuild without running code"
    return _short(reason, limit)
