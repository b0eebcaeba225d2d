"""Full-model export: the merged projector spliced into a complete model folder.

``open_model(MODEL)`` reads what a splice needs and nothing more: the file listing, the
shard index(es) and the headers of the shards holding projector tensors (pickle shards are
memory-mapped). Each *weight group* of the folder (a shard index with its shards, or one
loose weight file) that holds a projector is matched against the merged projector
(:func:`check_fit`): the same family and forward, or LLaVA's original ``mm_projector.{0,2}``
against transformers' ``multi_modal_projector.linear_{1,2}`` (the map the hf-llava writer
uses); every tensor's shape must agree. Mismatches are :class:`ExportMismatch` before any
work. ``export_model`` then writes OUT through :func:`.atomic.atomic_folder` (temp sibling
folder, lock, one rename; ``replace=True``: nothing of an earlier OUT survives):

- a shard holding projector tensors is a *new* file: a safetensors shard is copied and only
  the projector's byte ranges are overwritten in the copy (shapes and dtypes are the
  model's own, so header, offsets, index ``total_size`` and ``weight_map`` stay exactly
  right); a pickle shard is loaded (``weights_only``, memory-mapped) and saved anew;
- the projector tensors are cast to the model's dtype per tensor (overflow is a typed
  :class:`CastOverflow`), under the model's own keys;
- other weight files are hard-linked when on the same file system (else copied) and stay
  byte-identical; every other file (config, tokenizer, processor, index) is copied, so
  editing OUT's config can never reach MODEL. A file is only ever opened for writing when
  it was created by this export and has one link (checked);
- ``README.md`` is PivotMerge's card (``base_model`` + the lmms-eval / vLLM commands),
  ``recipe.yml`` the recipe with ``into:``.

From a Hub id only what the folder needs is fetched (top-level files; one weight format,
safetensors preferred; no other formats, no README), with progress, respecting
``HF_HUB_OFFLINE`` (see :mod:`.hub`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import torch

from ..errors import CheckpointError, ExportMismatch, HubError, OutputError, UnknownLayoutError
from ..progress import CancelToken, ProgressEvent
from ..projector import Projector, parse_op
from .discovery import parse_hub_id, read_index
from .families import family_of, layout, projector_keys
from .hub import hub_offline
from .safetensors_header import read_header

ProgressFn = Callable[[ProgressEvent], None]
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")
LINKED_SUFFIXES = (".safetensors", *PICKLE_WEIGHTS, ".gguf")  # big weights: hard-linked
FOREIGN_WEIGHTS = (".h5", ".msgpack", ".onnx", ".onnx_data", ".gguf", ".ot", ".tflite", ".mlmodel")
LOOSE_PICKLES = ("pytorch_model.bin", "mm_projector.bin")
CARD, RECIPE = "README.md", "recipe.yml"
CHUNK = 64 << 20


@dataclass
class WeightGroup:
    """One shard index with its shards, or one loose weight file, that holds a projector."""

    kind: str  # "safetensors" | "pickle"
    index: str | None
    files: tuple[str, ...]  # every weight file of the group
    key_file: dict[str, str]  # projector key -> file holding it
    layout: dict[str, Any]
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    @property
    def family(self) -> str:
        return self.layout["family"].name


@dataclass
class ModelTarget:
    """A model folder ready to take a projector (see :func:`open_model`)."""

    spec: str
    root: Path
    files: list[str]  # posix paths relative to root: everything OUT gets
    groups: list[WeightGroup]
    config: dict[str, Any] = field(default_factory=dict)
    hub: tuple[str, str | None] | None = None
    pending: list[str] = field(default_factory=list)  # Hub files not fetched yet

    @property
    def base_model(self) -> str | None:
        """The Hub id for the card's ``base_model``: the id given, or the repo of a folder
        in the Hub cache (``models--org--name/snapshots/<commit>``); None otherwise."""
        if self.hub:
            return self.hub[0]
        parts = self.root.parts
        if len(parts) > 2 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
            repo = parts[-3].removeprefix("models--").replace("--", "/", 1)
            return repo if parse_hub_id(repo) else None
        return None

    @property
    def architecture(self) -> str:
        arch = self.config.get("architectures") or [""]
        return str(arch[0]) if isinstance(arch, list) and arch else ""


@dataclass
class ExportReport:
    out: Path
    rewritten: list[str]
    linked: list[str]
    copied: list[str]
    bytes_written: int
    model_bytes: int
    elapsed_s: float
    notes: list[str] = field(default_factory=list)


def _emit(progress: ProgressFn | None, stage: str, fraction: float, message: str, payload: Any = None) -> None:
    if progress is not None:
        progress(ProgressEvent(stage, max(0.0, min(1.0, fraction)), message, payload))


# --------------------------------------------------------------------------- resolving
def _local_listing(root: Path) -> list[str]:
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel = Path(dirpath).relative_to(root)
        out.extend(str(PurePosixPath(*rel.parts, f)) for f in sorted(filenames) if not f.startswith("."))
    return out


def _needed_on_hub(names: Iterable[str]) -> list[str]:
    """The Hub files an exported folder needs: top level, one weight format, no card."""
    top = [n for n in names if "/" not in n and not n.startswith(".") and n != CARD]
    top = [n for n in top if not n.lower().endswith(FOREIGN_WEIGHTS)]
    if any(n.lower().endswith(".safetensors") for n in top):
        top = [n for n in top if not n.lower().endswith(PICKLE_WEIGHTS) and not n.lower().endswith(".bin.index.json")]
    return sorted(top)


def _is_weight_entry(name: str) -> bool:
    low = name.lower()
    return low.endswith((".safetensors", ".index.json")) or low in LOOSE_PICKLES


def open_model(
    spec: str | os.PathLike[str],
    *,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ModelTarget:
    """Resolve MODEL (a local folder or ``org/name[@revision]``) and find its projector.

    From the Hub only the index files and the weight files holding the projector are
    fetched here; the rest waits for :func:`export_model`. Typed errors only."""
    text = os.fspath(spec)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise CheckpointError(text, "a full-model export needs the model's folder (or Hub id), not a file")
        root = path.resolve()
        files = _local_listing(root)
        target = ModelTarget(text, root, files, [])
    else:
        hub = parse_hub_id(text)
        if hub is None or hub[2] is not None:
            raise CheckpointError(text, "no such folder, and not a Hub id (org/name[@revision])")
        target = _open_hub(text, hub[0], hub[1], progress, cancel)
    _find_groups(target, progress, cancel)
    config = target.root / "config.json"
    if config.is_file():
        try:
            target.config = json.loads(config.read_text(encoding="utf-8"))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            raise CheckpointError(str(config), f"not a readable config.json ({exc})") from None
    return target


def _open_hub(text: str, repo: str, revision: str | None, progress: ProgressFn | None,
              cancel: CancelToken | None) -> ModelTarget:
    from .hub import _list_files

    names = _needed_on_hub(_list_files(repo, revision, text))
    if not names:
        raise HubError(text, f"{repo} holds no model files")
    target = ModelTarget(text, Path(), names, [], hub=(repo, revision), pending=list(names))
    first = "config.json" if "config.json" in names else names[0]
    _fetch(target, [first], progress, cancel)
    return target


def _fetch(target: ModelTarget, names: Sequence[str], progress: ProgressFn | None,
           cancel: CancelToken | None, lo: float = 0.0, hi: float = 0.2) -> None:
    """Download ``names`` of a Hub target (no-op for local folders and fetched files)."""
    if target.hub is None:
        return
    from .hub import _download

    todo = [n for n in names if n in target.pending]
    for i, name in enumerate(todo):
        if cancel is not None:
            cancel.raise_if_cancelled()
        a = lo + (hi - lo) * i / len(todo)
        local = _download(target.hub[0], name, target.hub[1], target.spec, progress, a, a + (hi - lo) / len(todo))
        root = local
        for _ in PurePosixPath(name).parts:
            root = root.parent
        if target.root == Path():
            target.root = root
        elif root != target.root:
            raise HubError(target.spec, f"'{name}' was fetched outside the repo's snapshot folder ({local})")
        target.pending.remove(name)


def _find_groups(target: ModelTarget, progress: ProgressFn | None, cancel: CancelToken | None) -> None:
    top = [n for n in target.files if "/" not in n]
    indexes = [n for n in top if n.lower().endswith((".safetensors.index.json", ".bin.index.json"))]
    _fetch(target, indexes, progress, cancel)
    indexed: set[str] = set()
    candidates: list[tuple[str, str | None, dict[str, str] | None, list[str]]] = []
    for idx in indexes:
        wm = read_index(target.root / idx)
        shards = sorted(set(wm.values()))
        missing = [s for s in shards if s not in target.files]
        if missing and target.hub is not None and hub_offline():  # not cached: fetching says so
            target.files += missing
            target.pending += missing
        elif missing:
            raise CheckpointError(str(target.root / idx), f"lists shards that the model does not have: {', '.join(missing[:5])}")
        indexed.update(shards)
        kind = "safetensors" if idx.lower().endswith(".safetensors.index.json") else "pickle"
        candidates.append((kind, idx, wm, shards))
    for n in top:
        if n in indexed or not _is_weight_entry(n) or n.lower().endswith(".index.json"):
            continue
        candidates.append(("safetensors" if n.lower().endswith(".safetensors") else "pickle", None, None, [n]))
    for kind, idx, wm, files in candidates:
        group = _group(target, kind, idx, wm, files, progress, cancel)
        if group is not None:
            target.groups.append(group)
    if not target.groups:
        weights = [n for n in top if n.lower().endswith((".safetensors", *PICKLE_WEIGHTS))]
        raise ExportMismatch(
            target.spec, f"holds no projector of a known family (weight files: {', '.join(weights[:8]) or 'none'})"
        )


def _group(target: ModelTarget, kind: str, idx: str | None, wm: dict[str, str] | None, files: list[str],
           progress: ProgressFn | None, cancel: CancelToken | None) -> WeightGroup | None:
    where = str(target.root / (idx or files[0]))
    if wm is not None:
        try:
            _, _, keys = projector_keys(wm.keys(), where)
        except UnknownLayoutError:
            return None
        key_file = {k: wm[k] for k in keys}
        _fetch(target, sorted(set(key_file.values())), progress, cancel)
    else:
        _fetch(target, files, progress, cancel)
        key_file = {}
    shapes: dict[str, tuple[int, ...]] = {}
    dtypes: dict[str, torch.dtype] = {}
    for name in sorted(set(key_file.values())) if wm is not None else files:
        entries = _entries(target.root / name, kind)
        if wm is None:
            try:
                _, _, keys = projector_keys(entries.keys(), where)
            except UnknownLayoutError:
                return None
            key_file = dict.fromkeys(keys, name)
        for k in (k for k, f in key_file.items() if f == name):
            if k not in entries:
                raise CheckpointError(str(target.root / name), f"the index says it holds '{k}' but it does not")
            shapes[k], dtype = entries[k]
            if dtype is None or not dtype.is_floating_point:
                raise ExportMismatch(target.spec, f"projector tensor '{k}' is {dtype}, not a float")
            dtypes[k] = dtype
    lay = layout(key_file.keys(), shapes, where)
    return WeightGroup(kind, idx, tuple(files), key_file, lay, shapes, dtypes)


def _entries(path: Path, kind: str) -> dict[str, tuple[tuple[int, ...], torch.dtype | None]]:
    """key -> (shape, dtype) of a weight file (safetensors: its header only)."""
    if kind == "safetensors":
        return {k: (e.shape, e.torch_dtype) for k, e in read_header(path).tensors.items()}
    return {k: (tuple(t.shape), t.dtype) for k, t in _pickle_tensors(path)[1].items()}


def _pickle_tensors(path: Path) -> tuple[Any, dict[str, torch.Tensor], str | None]:
    """(object, flat tensors, container key) of a pickle weight file (memory-mapped,
    ``weights_only``)."""
    from .readers import _tensor_dicts, _torch_load

    obj = _torch_load(path)
    found = _tensor_dicts(obj, str(path))
    if not found:
        raise CheckpointError(str(path), "holds no tensors")
    container, flat = found[0]
    return obj, flat, container


# --------------------------------------------------------------------------- fitting
_HF_CHAIN = [("linear", "linear_1"), ("gelu", ""), ("linear", "linear_2")]


def _hf_chain(ops: Iterable[str], mapping: dict[str, str]) -> list[tuple[str, str]]:
    return [(o.head, mapping.get(o.layer, o.layer) if o.head == "linear" else "")
            for o in map(parse_op, ops) if o.head in ("linear", "gelu", "gelu_tanh")]


def check_fit(projector: Projector, target: ModelTarget) -> dict[str, dict[str, tuple[str, str]]]:
    """For each weight group: model key -> (merged layer, role). :class:`ExportMismatch`
    when the family, the forward or a shape does not fit MODEL."""
    try:
        mine = family_of(projector)
    except KeyError:
        raise ExportMismatch(target.spec, f"the merged projector's family '{projector.family}' is unknown") from None
    src = {(layer.name, role): tuple(t.shape) for layer in projector.layers for role, t in layer.tensors.items()}
    plans = {}
    for group in target.groups:
        theirs = group.layout["family"]
        dst = {(name, role): key for name, _kind, keys in group.layout["layers"] for role, key in keys.items()}
        what = f"MODEL's projector ({theirs.pretty}, {group.index or group.files[0]})"
        if mine.name == theirs.name:
            rename = {name: name for name, _ in src}
            if tuple(projector.ops) != tuple(group.layout["ops"]):
                raise ExportMismatch(target.spec, f"the merged {mine.pretty} projector's forward "
                                     f"{list(projector.ops)} differs from {what}: {list(group.layout['ops'])}")
        elif mine.hf_llava_map and theirs.hf_llava_map:
            mp, mt = dict(mine.hf_llava_map), dict(theirs.hf_llava_map)
            inverse = {v: k for k, v in mt.items()}
            rename = {name: inverse.get(mp.get(name, ""), "") for name, _ in src}
            ok = all(rename.values()) and _hf_chain(projector.ops, mp) == _HF_CHAIN == _hf_chain(group.layout["ops"], mt)
            if not ok:
                raise ExportMismatch(target.spec, f"the merged {mine.pretty} projector ({projector.family}) has no "
                                     f"exact counterpart in {what}: only Linear-GELU-Linear maps across layouts")
        else:
            raise ExportMismatch(target.spec, f"the merged projector is a {mine.pretty} projector ({projector.family}) "
                                 f"but {what} is another family; merge experts of MODEL's own family")
        mapped = {(rename[n], r): (n, r) for n, r in src}
        if set(mapped) != set(dst):
            extra = sorted(f"{n}.{r}" for n, r in set(mapped) - set(dst))
            missing = sorted(dst[k] for k in set(dst) - set(mapped))
            raise ExportMismatch(target.spec, f"the merged projector's tensors do not match {what}: "
                                 f"missing in MODEL {extra or '-'}, not in the merge {missing or '-'}")
        for k, key in dst.items():
            have, want = src[mapped[k]], group.shapes[key]
            if tuple(have) != tuple(want):
                raise ExportMismatch(target.spec, f"tensor '{key}' of MODEL has shape {list(want)} but the merged "
                                     f"projector's {mapped[k][0]}.{mapped[k][1]} has {list(have)}")
        plans[group.index or group.files[0]] = {dst[k]: mapped[k] for k in dst}
    return plans


# --------------------------------------------------------------------------- paths
def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def check_out_dir(target: ModelTarget, out_dir: str | os.PathLike[str], *, overwrite: bool = False) -> Path:
    """Refuse an OUT that is MODEL, lies inside it or holds it, or an existing OUT that is
    not an earlier PivotMerge output (it is replaced as a whole)."""
    given = Path(out_dir).expanduser()
    out = given.resolve()
    roots = {target.root.resolve()}
    roots.update((target.root / f).resolve().parent for f in target.files if (target.root / f).is_symlink())
    for root in roots:
        if _inside(out, root):
            raise OutputError(str(given), f"is the model folder or inside it ({target.spec}); the model is never written")
        if _inside(root, out):
            raise OutputError(str(given), f"holds the model folder ({target.spec}); pick an output folder outside it")
    if out.exists() and not out.is_dir():
        raise OutputError(str(given), "is a file; expected a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise OutputError(str(given), "already exists; allow overwriting (CLI: --overwrite) or pick another output folder")
        card = out / CARD
        ours = (out / RECIPE).is_file() and card.is_file() and "pivotmerge-studio" in card.read_text(errors="replace")[:4000]
        if not ours:
            raise OutputError(str(given), "holds files that are not an earlier PivotMerge output; a full-model "
                              "export replaces the whole folder, so pick an empty or new folder")
    return out


# --------------------------------------------------------------------------- writing
def _open_own(path: Path) -> Any:
    """Open a file this export created for in-place writing; never one with other links."""
    fh = open(path, "r+b")  # noqa: SIM115 - returned to the caller's with-block
    if os.fstat(fh.fileno()).st_nlink != 1:
        fh.close()
        raise OutputError(str(path), "refusing to write a file that shares its data with another (a hard link)")
    return fh


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def _copy_stream(src: Path, dst: Path, cancel: CancelToken | None, tick: Callable[[int], None]) -> None:
    with open(src, "rb") as fi, open(dst, "xb") as fo:
        while chunk := fi.read(CHUNK):
            if cancel is not None:
                cancel.raise_if_cancelled()
            fo.write(chunk)
            tick(len(chunk))


def _cast(tensors: dict[str, torch.Tensor], dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:
    from ..output import cast_state

    return {k: cast_state({k: t}, dtypes[k])[k] for k, t in tensors.items()}


def _write_group(target: ModelTarget, group: WeightGroup, values: dict[str, torch.Tensor], tmp: Path,
                 cancel: CancelToken | None, tick: Callable[[int], None]) -> list[str]:
    rewritten = []
    for name in sorted(set(group.key_file.values())):
        keys = [k for k, f in group.key_file.items() if f == name]
        src, dst = target.root / name, tmp / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if group.kind == "safetensors":
            header = read_header(src)
            _copy_stream(src, dst, cancel, tick)
            with _open_own(dst) as fh:
                for k in keys:
                    data, entry = _tensor_bytes(values[k]), header.tensors[k]
                    if len(data) != entry.nbytes:
                        raise OutputError(str(dst), f"'{k}' would take {len(data)} bytes, not {entry.nbytes}")
                    fh.seek(entry.start)
                    fh.write(data)
            if read_header(dst).tensors != header.tensors:
                raise OutputError(str(dst), "the rewritten shard's header differs from the model's")
        else:
            obj, _flat, container = _pickle_tensors(src)
            holder = obj[container] if container is not None else obj
            for k in keys:
                holder[k] = values[k].clone()
            torch.save(obj, dst)
            tick(dst.stat().st_size)
        rewritten.append(name)
    return rewritten


def _carry(src: Path, dst: Path, link: bool) -> bool:
    """Put ``src`` at ``dst``: a hard link for weight files when allowed, else a copy.
    Returns whether it was linked."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    if link and src.name.lower().endswith(LINKED_SUFFIXES):
        try:
            os.link(src, dst)  # follows a Hub snapshot's symlink to its blob
            return True
        except OSError:
            pass
    shutil.copyfile(src, dst)
    return False


def export_model(
    result: Any,
    target: ModelTarget | str,
    out_dir: str | os.PathLike[str],
    *,
    overwrite: bool = False,
    link: bool = True,
    progress: ProgressFn | None = None,
    cancel: CancelToken | None = None,
) -> ExportReport:
    """Write MODEL with the merged projector of ``result`` (a
    :class:`~pivotmerge_gui.core.pipeline.MergeResult`) into ``out_dir``, all or nothing."""
    from ..card import model_card
    from .atomic import atomic_folder, atomic_write_bytes, atomic_write_text

    t0 = time.perf_counter()
    if not isinstance(target, ModelTarget):
        target = open_model(target, progress=progress, cancel=cancel)
    projector: Projector = result.projector
    plans = check_fit(projector, target)
    out = check_out_dir(target, out_dir, overwrite=overwrite)
    _fetch(target, list(target.pending), progress, cancel, 0.2, 0.5)
    state = {(layer.name, role): t for layer in projector.layers for role, t in layer.tensors.items()}
    groups = {g.index or g.files[0]: g for g in target.groups}
    values = {name: _cast({k: state[src] for k, src in plan.items()}, groups[name].dtypes) for name, plan in plans.items()}
    written_files = {f for g in target.groups for f in g.key_file.values()}
    carried = [f for f in target.files if f not in written_files and f not in (CARD, RECIPE)]
    model_bytes = sum((target.root / f).stat().st_size for f in target.files)
    total = max(1, sum((target.root / f).stat().st_size for f in written_files))
    done = [0]

    def tick(n: int) -> None:
        done[0] += n
        _emit(progress, "export", 0.5 + 0.45 * done[0] / total, f"writing the projector shards ({done[0] >> 20} MiB)")

    # only inputs that lie in OUT matter: a file outside it is never written, moved or removed
    protected = [p for p in result.protected if _inside(Path(p).resolve(), out)] + [target.root]
    names = sorted({f for f in [*written_files, *carried] if "/" not in f} | {CARD, RECIPE})  # top-level files
    linked, copied, rewritten = [], [], []
    usage = usage_text(target, str(out))
    from ..output import CALIBRATION_FILE, output_recipe

    recipe, cal_bytes = output_recipe(result, result.recipe.output_format)
    recipe = recipe.model_copy(update={"into": target.spec})
    if cal_bytes is not None:
        names.append(CALIBRATION_FILE)
    notes = []
    if getattr(projector, "extras", None):
        notes.append(f"non-projector tensors of the merge ({', '.join(sorted(projector.extras))}) were not spliced")
    with atomic_folder(out, names=names, protected=protected, overwrite=overwrite, cancel=cancel, replace=True) as tmp:
        for name, group in groups.items():
            if name in values:
                rewritten += _write_group(target, group, values[name], tmp, cancel, tick)
        for f in carried:  # after the rewrites: a linked file is never opened for writing
            if cancel is not None:
                cancel.raise_if_cancelled()
            (linked if _carry(target.root / f, tmp / f, link) else copied).append(f)
        if cal_bytes is not None:  # the in-memory features the recipe names
            atomic_write_bytes(tmp / CALIBRATION_FILE, cal_bytes)
        atomic_write_text(tmp / RECIPE, recipe.to_yaml())
        card = model_card(result, recipe, ", ".join(rewritten), base_model=target.base_model, usage=usage)
        atomic_write_text(tmp / CARD, card)
    written = sum((out / f).stat().st_size for f in {*rewritten, *copied, *names} - set(linked))
    _emit(progress, "done", 1.0, f"exported into {out}")
    return ExportReport(out, rewritten, linked, copied, written, model_bytes, time.perf_counter() - t0, notes=notes)


# --------------------------------------------------------------------------- card, upload
_LMMS = {
    "LlavaForConditionalGeneration": "llava_hf",
    "LlavaNextForConditionalGeneration": "llava_hf",
    "Qwen2VLForConditionalGeneration": "qwen2_vl",
    "Qwen2_5_VLForConditionalGeneration": "qwen2_5_vl",
    "InternVLChatModel": "internvl2",
}


def usage_text(target: ModelTarget, where: str) -> str:
    """The card's "Use the merged model" section for the exported folder ``where``."""
    arch = target.architecture
    original_llava = arch.startswith("Llava") and arch.endswith("ForCausalLM")
    if original_llava:
        evaluate = f"--model llava --model_args pretrained={where}"
        serve = ("Serve it with [SGLang](https://github.com/sgl-project/sglang) (vLLM reads LLaVA only in "
                 f"the transformers layout):\n\n```bash\npython -m sglang.launch_server --model-path {where}\n```")
    else:
        evaluate = (f"--model {_LMMS[arch]} --model_args pretrained={where}" if arch in _LMMS
                    else f"--model vllm --model_args model={where}")
        trust = " --trust-remote-code" if target.config.get("auto_map") else ""
        serve = ("Serve it with [vLLM](https://docs.vllm.ai) (OpenAI-compatible API):\n\n"
                 f"```bash\nvllm serve {where}{trust}\n```")
    own = (f"\n\nCaption metrics with PivotMerge:\n\n```bash\npivotmerge evaluate --backend llava:{where} "
           "--pairs PAIRS\n```" if arch == "LlavaForConditionalGeneration" else "")
    return f"""## Use the merged model

A complete model folder: `{target.spec}` with the merged projector spliced in (its other
weights are unchanged). Evaluate it with [lmms-eval](https://github.com/EvolvingLMMs-Lab/lmms-eval):

```bash
python -m lmms_eval {evaluate} --tasks mme --batch_size 1
```

{serve}{own}

The unchanged weight files may be hard links to the model's own: save a fine-tuned model
into a new folder, not over this one.
"""


def push_to_hub(out_dir: str | os.PathLike[str], repo_id: str, *, private: bool = True) -> str:
    """Upload the folder to ``repo_id`` (created private unless ``private=False``)."""
    check_push_target(repo_id)
    import huggingface_hub

    try:
        huggingface_hub.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(out_dir), repo_type="model",
                                             commit_message="Upload a PivotMerge Studio merge")
    except Exception as exc:  # network / HTTP errors of several libraries
        raise HubError(repo_id, f"cannot upload: {type(exc).__name__}: {exc}") from exc
    return str(getattr(info, "commit_url", None) or f"https://huggingface.co/{repo_id}")


def check_push_target(repo_id: str) -> None:
    """Refuse an upload up front: a malformed ``ORG/NAME`` or ``HF_HUB_OFFLINE`` set."""
    hub = parse_hub_id(repo_id)
    if hub is None or hub[1] is not None or hub[2] is not None:
        raise HubError(repo_id, "--push-to-hub takes a repository id ORG/NAME")
    if hub_offline():
        raise HubError(repo_id, "HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it to push")
