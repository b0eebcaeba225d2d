"""Read projectors from files, folders, shard sets and Hub ids, safely and lazily.

Safety: pickles load only with ``torch.load(weights_only=True)`` (never ``False``; a file
that needs code execution raises :class:`UnsafeCheckpointError`); safetensors headers are
validated by :mod:`.safetensors_header` before any library parses them.

Laziness: the projector is found from key *names* (headers, shard index) first, then only
its tensors are read: ``safe_open(...).get_tensor`` per tensor, and only the shards that
hold them, so bytes read scale with the projector, not with the model
(``benchmarks/sharded_read.py`` measures it). Pickles are memory-mapped (zip format), so
the language model inside a full ``pytorch_model.bin`` is never paged in.

sha256: the hash of the file bytes when the projector is read from one file that holds
nothing else (``mm_projector.bin``, a projector-only ``model.safetensors``); otherwise
(shards, a full-model file) the hash of the projector tensors in a stable order, see
:func:`.hashing.tensor_digest`. ``projector.metadata["sha256_of"]`` says which (``file`` or
``tensors``).
"""

from __future__ import annotations

import os
import pickle
import warnings
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, UnknownLayoutError, UnsafeCheckpointError
from ..progress import CancelToken, ProgressEvent
from ..projector import Projector, all_finite, parse_op
from .discovery import (
    AmbiguousCheckpoint,
    Choice,
    NoCheckpoint,
    choose_checkpoint,
    parse_hub_id,
    read_index,
)
from .extras import adapter_extras
from .families import FamilySpec, build_projector, layout, pretty_family, projector_keys
from .hashing import raw_digest, sha256_file, tensor_digest
from .pickle_scan import refusal_reason, scan_pickle, view_problem
from .safetensors_header import DTYPES, SafetensorsHeader, is_safetensors, read_header

ProgressFn = Callable[[ProgressEvent], None]

# Containers a training script may wrap the state dict in (MiniGPT-4 saves {"model": ...},
# Lightning {"state_dict": ...}, DeepSpeed {"module": ...}).
CONTAINER_KEYS = ("model", "state_dict", "module")


# --------------------------------------------------------------------------- info
@dataclass
class CheckpointInfo:
    """What ``pivotmerge inspect`` and the GUI's model list show (headers only where the
    format allows). ``layers``: (canonical name, kind, {role: (shape, dtype)})."""

    spec: str
    family: str
    pretty_family: str
    files: tuple[str, ...]
    layers: list[tuple[str, str, dict[str, tuple[tuple[int, ...], str]]]]
    dtype: str
    num_params: int
    nbytes: int
    sha256: str
    sha256_of: str = "file"
    ops: tuple[str, ...] = ()
    in_features: int | None = None
    out_features: int | None = None
    warnings: list[str] = field(default_factory=list)
    # non-projector tensors of an adapter file, carried into merges: (key, shape, dtype)
    extras: list[tuple[str, tuple[int, ...], str]] = field(default_factory=list)

    @property
    def sha256_short(self) -> str:
        return self.sha256[:12]

    def to_dict(self) -> dict[str, Any]:
        return {
            "spec": self.spec,
            "family": self.family,
            "pretty_family": self.pretty_family,
            "files": list(self.files),
            "layers": [
                {"name": n, "kind": k, "tensors": {r: {"shape": list(s), "dtype": d} for r, (s, d) in t.items()}}
                for n, k, t in self.layers
            ],
            "ops": list(self.ops),
            "in_features": self.in_features,
            "out_features": self.out_features,
            "dtype": self.dtype,
            "num_params": self.num_params,
            "nbytes": self.nbytes,
            "sha256": self.sha256,
            "sha256_short": self.sha256_short,
            "sha256_of": self.sha256_of,
            "warnings": list(self.warnings),
            "extras": [{"key": k, "shape": list(s), "dtype": d} for k, s, d in self.extras],
        }


# --------------------------------------------------------------------------- resolving
@dataclass
class _Plan:
    spec: str
    kind: str  # "safetensors" | "pickle"
    base: Path  # folder the file names are relative to
    files: list[str]  # safetensors: files of the key space; pickle: one file (or shards)
    weight_map: dict[str, str] | None = None
    index: str | None = None


def _report(progress: ProgressFn | None, fraction: float, message: str, payload: Any = None) -> None:
    if progress is not None:
        progress(ProgressEvent("load", max(0.0, min(1.0, fraction)), message, payload))


def _plan_local(path: Path, spec: str) -> _Plan:
    if path.is_dir():
        try:
            names = [p.name for p in path.iterdir() if p.is_file()]
        except OSError as exc:
            raise CheckpointError(str(path), f"cannot list folder: {exc.strerror or exc}") from exc
        try:
            choice = choose_checkpoint(names)
        except NoCheckpoint:
            raise CheckpointError(
                str(path),
                "folder holds no checkpoint file (looked for *.safetensors, a shard index, "
                "mm_projector.bin, pytorch_model.bin, *.pt, *.pth, *.ckpt)",
            ) from None
        except AmbiguousCheckpoint as exc:
            raise CheckpointError(
                str(path), f"several checkpoint files ({', '.join(exc.candidates)}); pass the one to read"
            ) from None
        return _plan_choice(path, choice, spec)
    if not path.exists():
        if path.is_symlink():
            raise CheckpointError(str(path), "broken or looping symbolic link (its target cannot be reached)")
        raise CheckpointError(str(path), "no such file or folder")
    if not path.is_file():
        raise CheckpointError(str(path), "not a regular file")
    name = path.name.lower()
    if name.endswith(".index.json"):
        return _plan_choice(path.parent, Choice("index", (path.name,)), spec)
    if name.endswith(".safetensors") or is_safetensors(path):
        return _Plan(spec, "safetensors", path.parent, [path.name])
    return _Plan(spec, "pickle", path.parent, [path.name])


def _plan_choice(base: Path, choice: Choice, spec: str) -> _Plan:
    if choice.kind == "index":
        index_path = base / choice.files[0]
        weight_map = read_index(index_path)
        shards = sorted(set(weight_map.values()))
        kind = "safetensors" if all(s.lower().endswith(".safetensors") for s in shards) else "pickle"
        return _Plan(spec, kind, base, shards, weight_map, choice.files[0])
    return _Plan(spec, choice.kind, base, list(choice.files))


def _resolve(spec: str | os.PathLike[str], progress: ProgressFn | None, cancel: CancelToken | None) -> _Plan:
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists() or os.path.lexists(path):
        return _plan_local(path, text)
    hub = parse_hub_id(text) if isinstance(spec, str) else None
    if hub is None:
        raise CheckpointError(text, "no such file or folder")
    from .hub import resolve_hub

    local = resolve_hub(hub[0], hub[1], hub[2], progress=progress, cancel=cancel, spec=text)
    plan = _plan_local(local, text)
    return plan


# --------------------------------------------------------------------------- pickle
def _torch_load(path: Path) -> Any:
    p = str(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CheckpointError(p, f"cannot read file: {exc.strerror or exc}") from exc
    if size == 0:
        raise CheckpointError(p, "file is empty (0 bytes)")
    scan = scan_pickle(path)  # sizes, offsets and strides checked before torch reads a byte
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if not _utf8_path(p):
                # torch's C++ reader needs a UTF-8 path; a file object works (no mmap)
                with open(path, "rb") as fh:
                    return torch.load(fh, map_location="cpu", weights_only=True)
            # zip checkpoints are memory-mapped: tensors we do not touch are never read.
            # Old (pre-1.6) non-zip files cannot be mapped and are read whole.
            return torch.load(p, map_location="cpu", weights_only=True, mmap=scan.format == "zip")
    except pickle.UnpicklingError as exc:
        detail = str(exc)
        if "Weights only load failed" not in detail and "WeightsUnpickler" not in detail:
            reason = _short(detail.strip().splitlines()[0] if detail.strip() else type(exc).__name__)
            raise CheckpointError(p, f"corrupt pickle checkpoint ({reason})") from exc
        raise UnsafeCheckpointError(
            p,
            "refused: this pickle checkpoint needs to run code to load "
            f"({refusal_reason(detail, scan.globals)}). PivotMerge only loads pickles with weights_only=True and "
            "never executes code from a checkpoint. If you trust its author, convert it to "
            "safetensors in a separate, sandboxed environment",
        ) from exc
    except MemoryError as exc:
        raise CheckpointError(p, "not enough memory to read this checkpoint") from exc
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError, OSError,
            AssertionError, OverflowError, RecursionError) as exc:
        msg = _short(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        if isinstance(exc, EOFError) or "central directory" in msg or "truncat" in msg.lower():
            raise CheckpointError(p, f"truncated or corrupt checkpoint ({msg or 'unexpected end of file'})") from exc
        raise CheckpointError(
            p, f"not a readable torch checkpoint: corrupt, or not a checkpoint at all ({type(exc).__name__}: {msg})"
        ) from exc
    except Exception as exc:  # weights_only torch.load runs no code: any other failure
        # (struct.error, zipfile errors, ...) means the bytes are damaged
        msg = _short(str(exc).strip().splitlines()[0]) if str(exc).strip() else type(exc).__name__
        raise CheckpointError(p, f"truncated or corrupt checkpoint ({type(exc).__name__}: {msg})") from exc


def _short(text: str, limit: int = 300) -> str:
    return text if len(text) <= limit else text[:limit] + f"... ({len(text) - limit} more characters)"


def _copy_tensor(t: torch.Tensor, path: str, key: str) -> torch.Tensor:
    """A private copy of a loaded tensor, refused when the copy would be larger than its
    storage (a stride-0 or overlapping view: the scan normally stops those first)."""
    problem = view_problem(t.untyped_storage().nbytes() // max(1, t.element_size()), t.storage_offset(),
                           tuple(t.shape), tuple(t.stride()))
    if problem:
        raise CheckpointError(path, f"refused: tensor '{key}': {problem}")
    return t.clone()


def _tensor_dicts(obj: Any, path: str) -> list[tuple[str | None, dict[str, torch.Tensor]]]:
    """(container key, flat tensors) candidates of an unpickled object, top level first."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(path, f"holds a {type(obj).__name__}, not a dict of tensors")
    out: list[tuple[str | None, dict[str, torch.Tensor]]] = []
    top = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if top:
        out.append((None, top))
    nested = [k for k in CONTAINER_KEYS if isinstance(obj.get(k), Mapping)]
    nested += [str(k) for k, v in obj.items() if isinstance(v, Mapping) and k not in CONTAINER_KEYS]
    for k in nested:
        inner = {str(kk): vv for kk, vv in obj[k].items() if isinstance(vv, torch.Tensor)}
        if inner:
            out.append((k, inner))
    return out


# --------------------------------------------------------------------------- core read
@dataclass
class _Read:
    tensors: dict[str, torch.Tensor]
    files: tuple[str, ...]
    sha256: str
    sha256_of: str
    container: str | None = None
    extras: dict[str, torch.Tensor] = field(default_factory=dict)


def _safetensors_space(plan: _Plan) -> tuple[dict[str, tuple[str, Any]], dict[str, SafetensorsHeader], list[str]]:
    """key -> (file name, TensorEntry) of the projector, headers read, projector keys."""
    headers: dict[str, SafetensorsHeader] = {}

    def header(name: str) -> SafetensorsHeader:
        if name not in headers:
            fp = plan.base / name
            if not fp.exists():
                where = f"shard index '{plan.index}'" if plan.index else "checkpoint"
                raise CheckpointError(str(fp), f"missing: the {where} lists this shard but the file does not exist")
            headers[name] = read_header(fp)
        return headers[name]

    if plan.weight_map is not None:
        source = str(plan.base / (plan.index or ""))
        _, _, keys = projector_keys(plan.weight_map.keys(), source)
        space: dict[str, tuple[str, Any]] = {}
        for key in keys:
            shard = plan.weight_map[key]
            h = header(shard)
            if key not in h.tensors:
                raise CheckpointError(
                    str(plan.base / shard), f"shard index says it holds '{key}' but its header has no such tensor"
                )
            space[key] = (shard, h.tensors[key])
        return space, headers, keys
    everything: dict[str, tuple[str, Any]] = {}
    for name in plan.files:
        h = header(name)
        for key, entry in h.tensors.items():
            if key in everything:
                raise CheckpointError(str(plan.base / name), f"tensor '{key}' also appears in '{everything[key][0]}'")
            everything[key] = (name, entry)
    source = str(plan.base / plan.files[0]) if len(plan.files) == 1 else str(plan.base)
    _, _, keys = projector_keys(everything.keys(), source)
    return {k: everything[k] for k in [*keys, *adapter_extras(everything, keys)]}, headers, keys


def _read_safetensors(plan: _Plan, progress: ProgressFn | None, cancel: CancelToken | None) -> _Read:
    from safetensors import safe_open

    space, headers, keys = _safetensors_space(plan)
    for key in space:
        name, entry = space[key]
        if entry.torch_dtype is None:
            raise CheckpointError(str(plan.base / name), f"tensor '{key}' has dtype {entry.dtype}, which torch cannot load")
    by_file: dict[str, list[str]] = {}
    for key in space:
        by_file.setdefault(space[key][0], []).append(key)
    tensors: dict[str, torch.Tensor] = {}
    total = max(1, sum(space[k][1].nbytes for k in space))
    done = 0
    for name, fkeys in by_file.items():
        fp = plan.base / name
        try:
            if not _utf8_path(str(fp)):
                # safetensors (Rust) needs a UTF-8 path: read the validated ranges ourselves
                with open(fp, "rb") as raw:
                    for key in fkeys:
                        if cancel is not None:
                            cancel.raise_if_cancelled()
                        tensors[key] = _read_range(raw, space[key][1])
                        done += space[key][1].nbytes
                        _report(progress, done / total, f"read {key}")
                continue
            with safe_open(str(fp), framework="pt", device="cpu") as fh:
                for key in fkeys:
                    if cancel is not None:
                        cancel.raise_if_cancelled()
                    # get_tensor returns a view of the file's memory map: copy it, so the
                    # projector does not change (or pin the file) if the file is rewritten
                    tensors[key] = fh.get_tensor(key).clone()
                    done += space[key][1].nbytes
                    _report(progress, done / total, f"read {key}")
        except CheckpointError:
            raise
        except Exception as exc:  # safetensors raises its own SafetensorError/OSError types
            if type(exc).__name__ == "Cancelled":
                raise
            raise CheckpointError(str(fp), f"cannot read tensors: {exc}") from exc
    files = tuple(str(plan.base / n) for n in by_file)
    extras = {k: tensors.pop(k) for k in space if k not in keys}
    if plan.weight_map is None and len(plan.files) == 1 and set(space) == set(headers[plan.files[0]].tensors):
        return _Read(tensors, files, sha256_file(plan.base / plan.files[0]), "file", extras=extras)
    return _Read(tensors, files, tensor_digest(tensors), "tensors", extras=extras)


def _read_pickle(plan: _Plan, progress: ProgressFn | None, cancel: CancelToken | None) -> _Read:
    if plan.weight_map is not None:
        source = str(plan.base / (plan.index or ""))
        _, _, keys = projector_keys(plan.weight_map.keys(), source)
        shards = sorted({plan.weight_map[k] for k in keys})
        tensors: dict[str, torch.Tensor] = {}
        for i, shard in enumerate(shards):
            if cancel is not None:
                cancel.raise_if_cancelled()
            fp = plan.base / shard
            if not fp.exists():
                raise CheckpointError(str(fp), f"missing: the shard index '{plan.index}' lists this shard but the file does not exist")
            found = _tensor_dicts(_torch_load(fp), str(fp))
            flat = found[0][1] if found else {}
            for k in keys:
                if plan.weight_map[k] == shard:
                    if k not in flat:
                        raise CheckpointError(str(fp), f"shard index says it holds '{k}' but the shard has no such tensor")
                    tensors[k] = _copy_tensor(flat[k], str(fp), k)
            _report(progress, (i + 1) / len(shards), f"read {shard}")
        return _Read(tensors, tuple(str(plan.base / s) for s in shards), tensor_digest(tensors), "tensors")
    fp = plan.base / plan.files[0]
    _report(progress, 0.0, f"open {fp.name}")
    obj = _torch_load(fp)
    if cancel is not None:
        cancel.raise_if_cancelled()
    candidates = _tensor_dicts(obj, str(fp))
    if not candidates:
        raise CheckpointError(str(fp), "holds no tensors")
    last: UnknownLayoutError | None = None
    for container, flat in candidates:
        try:
            _, _, keys = projector_keys(flat.keys(), str(fp))
        except UnknownLayoutError as exc:
            last = exc
            continue
        # clone: detach the few projector tensors from the memory map of the whole file
        tensors = {k: _copy_tensor(flat[k], str(fp), k) for k in keys}
        extras = {k: _copy_tensor(flat[k], str(fp), k) for k in adapter_extras(flat, keys)}
        _report(progress, 1.0, f"read {len(tensors)} tensors")
        return _Read(tensors, (str(fp),), sha256_file(fp), "file", container, extras)
    all_keys = [f"{c}.{k}" if c else k for c, flat in candidates for k in flat]
    assert last is not None
    raise UnknownLayoutError(str(fp), all_keys, last.patterns)


def _utf8_path(p: str) -> bool:
    try:
        p.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _read_range(fh: Any, entry: Any) -> torch.Tensor:
    """One tensor from its validated byte range (little-endian, C order)."""
    fh.seek(entry.start)
    data = fh.read(entry.nbytes)
    if len(data) != entry.nbytes:
        raise CheckpointError(getattr(fh, "name", "?"), f"truncated inside tensor '{entry.name}'")
    if not data:
        return torch.empty(entry.shape, dtype=entry.torch_dtype)
    return torch.frombuffer(bytearray(data), dtype=entry.torch_dtype).reshape(entry.shape)


def _finite_warnings(projector: Projector) -> list[str]:
    bad = [
        f"{l.keys.get(r, l.name + '.' + r)}"
        for l in projector.layers
        for r, t in l.tensors.items()
        if not all_finite(t)
    ]
    return bad


def load_projector(
    spec: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> Projector:
    """Read the projector of a file, folder, shard set or Hub id (``org/name[@rev][:file]``).

    Raises :class:`CheckpointError` (and subclasses :class:`UnsafeCheckpointError`,
    :class:`UnknownLayoutError`, :class:`HubError`) with the file and the problem.
    NaN/Inf weights do not fail the read: ``metadata["warnings"]`` (newline-separated) and
    ``metadata["nonfinite_tensors"]`` (comma-separated keys) record them.
    """
    text = os.fspath(spec)
    plan = _resolve(spec, progress, cancel)
    read = _read_safetensors(plan, progress, cancel) if plan.kind == "safetensors" else _read_pickle(plan, progress, cancel)
    path = read.files[0] if len(read.files) == 1 else str(plan.base)
    projector = build_projector(read.tensors, path=path, source=text, files=read.files, sha256=read.sha256)
    projector.metadata["sha256_of"] = read.sha256_of
    projector.extras = read.extras
    if read.container:
        projector.metadata["container_key"] = read.container
    bad = _finite_warnings(projector)
    projector.metadata["finite_checked"] = "1"
    if bad:
        projector.metadata["nonfinite_tensors"] = ",".join(bad)
        projector.metadata["warnings"] = "\n".join(f"tensor '{k}' contains NaN or Inf values" for k in bad)
    _report(progress, 1.0, f"loaded {projector.family} from {text}")
    return projector


def inspect_checkpoint(spec: str | os.PathLike[str]) -> CheckpointInfo:
    """Family, layers, shapes, dtypes and sizes; safetensors are read from headers only
    (plus the projector's own bytes for the hash). Pickles are memory-mapped and read."""
    text = os.fspath(spec)
    plan = _resolve(spec, None, None)
    if plan.kind != "safetensors":
        p = load_projector(spec)
        layers = [
            (l.name, l.kind, {r: (tuple(t.shape), _dtype_name(t.dtype)) for r, t in l.tensors.items()})
            for l in p.layers
        ]
        return CheckpointInfo(
            spec=text, family=p.family, pretty_family=pretty_family(p), files=p.files, layers=layers,
            dtype=_dtype_name(p.dtype), num_params=p.num_params, nbytes=p.nbytes, sha256=p.sha256,
            sha256_of=p.metadata.get("sha256_of", "file"), ops=p.ops, in_features=p.in_features,
            out_features=p.out_features,
            warnings=p.metadata["warnings"].split("\n") if p.metadata.get("warnings") else [],
            extras=[(k, tuple(t.shape), _dtype_name(t.dtype)) for k, t in sorted(p.extras.items())],
        )
    space, headers, keys = _safetensors_space(plan)
    shapes = {k: space[k][1].shape for k in keys}
    lay = layout(keys, shapes, str(plan.base))
    spec_: FamilySpec = lay["family"]
    family = f"{spec_.name}-{lay['variant']}" if lay["variant"] else spec_.name
    layers = []
    for name, kind, ks in lay["layers"]:
        layers.append((name, kind, {r: (shapes[k], _st_dtype_name(space[k][1].dtype)) for r, k in ks.items()}))
    files = tuple(sorted({str(plan.base / space[k][0]) for k in keys}))
    if plan.weight_map is None and len(plan.files) == 1 and set(space) == set(headers[plan.files[0]].tensors):
        sha, sha_of = sha256_file(plan.base / plan.files[0]), "file"
    else:
        sha, sha_of = raw_digest(plan.base, space, keys), "tensors"
    dtypes = Counter(space[k][1].dtype for k in keys)
    float_dtypes = Counter({d: c for d, c in dtypes.items() if d.startswith(("F", "BF"))}) or dtypes
    ins, outs = _features(lay, shapes)
    numel = sum(_numel(shapes[k]) for k in keys)
    return CheckpointInfo(
        spec=text, family=family, pretty_family=pretty_family(family), files=files, layers=layers,
        dtype=_st_dtype_name(float_dtypes.most_common(1)[0][0]), num_params=numel,
        nbytes=sum(space[k][1].nbytes for k in keys), sha256=sha, sha256_of=sha_of, ops=lay["ops"],
        in_features=ins, out_features=outs,
        extras=[(k, space[k][1].shape, _st_dtype_name(space[k][1].dtype)) for k in sorted(set(space) - set(keys))],
    )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _features(lay: dict, shapes: Mapping[str, tuple[int, ...]]) -> tuple[int | None, int | None]:
    by_name = {n: (k, ks) for n, k, ks in lay["layers"]}
    first: int | None = None
    last: int | None = None
    merge = 1
    for op in map(parse_op, lay["ops"]):
        if op.head == "merge_tokens":
            merge *= int(op.arg)
            continue
        if not op.applies_layer:
            continue
        kind, ks = by_name[op.layer]
        w = shapes[ks["weight"]]
        if first is None:
            first = (w[1] if kind == "linear" else w[0]) // merge
        if kind == "linear":
            last = w[0]
    return first, last


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _st_dtype_name(st: str) -> str:
    t = DTYPES[st][1]
    return _dtype_name(t) if t is not None else st.lower()
