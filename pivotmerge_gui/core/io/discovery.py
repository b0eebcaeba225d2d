"""Where checkpoints are: which file of a folder holds the projector, what a spec names.

Torch-free (the GUI imports it before torch loads). Shared by the local folder reader, the
Hub resolver, the recipe and the app's drop handling, so all of them pick the same file
for the same listing and give a spec the same short name. Preference follows what
transformers and LLaVA write: a safetensors shard index, a single ``model.safetensors``,
other safetensors, LLaVA's ``mm_projector.bin``, then pickle indexes and files.
Safetensors wins over pickle when both exist (no unpickling, only the projector's bytes).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from ..bounded import json_document
from ..errors import CheckpointError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)
# the weight files transformers and LLaVA write under fixed names (a folder's name names them)
SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
LLAVA_FILE = "mm_projector.bin"
PICKLE_FILE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
WEIGHT_FILES = (SAFETENSORS_FILE, LLAVA_FILE, PICKLE_FILE)
# any of these in a folder makes the folder one checkpoint (HF layout or LLaVA's)
CHECKPOINT_DIR_MARKERS = ("config.json", *WEIGHT_FILES, SAFETENSORS_INDEX, PICKLE_INDEX)


@dataclass(frozen=True)
class Choice:
    """What to read: ``files`` (names relative to the folder) of one ``kind``.

    ``kind`` is ``index`` (``files[0]`` is a shard index JSON), ``safetensors`` (one or
    more safetensors files read as one key space) or ``pickle`` (one torch.save file).
    """

    kind: str
    files: tuple[str, ...]


class NoCheckpoint(Exception):
    """No checkpoint file in a listing (callers turn this into a typed error)."""


class AmbiguousCheckpoint(Exception):
    """Several candidate files and no rule to pick one; ``candidates`` lists them."""

    def __init__(self, candidates: list[str]) -> None:
        super().__init__(", ".join(candidates))
        self.candidates = candidates


def choose_checkpoint(names: Iterable[str], *, allow_safetensors_set: bool = True) -> Choice:
    """Pick the checkpoint among ``names`` (top-level entries of a folder or repo).

    ``allow_safetensors_set``: several un-indexed safetensors files are read as one key
    space (cheap locally: headers only). Over the network that would mean downloading
    every file, so the Hub resolver asks the user for a filename instead.
    """
    top = sorted(n for n in names if "/" not in n.strip("/"))
    lower = {n.lower(): n for n in top}
    if SAFETENSORS_INDEX in lower:
        return Choice("index", (lower[SAFETENSORS_INDEX],))
    if SAFETENSORS_FILE in lower:
        return Choice("safetensors", (lower[SAFETENSORS_FILE],))
    st_index = [n for n in top if n.lower().endswith(".safetensors.index.json")]
    if len(st_index) == 1:
        return Choice("index", (st_index[0],))
    if len(st_index) > 1:
        raise AmbiguousCheckpoint(st_index)
    st = [n for n in top if n.lower().endswith(".safetensors")]
    if len(st) == 1 or (st and allow_safetensors_set):
        return Choice("safetensors", tuple(st))
    if st:
        raise AmbiguousCheckpoint(st)
    if LLAVA_FILE in lower:
        return Choice("pickle", (lower[LLAVA_FILE],))
    if PICKLE_INDEX in lower:
        return Choice("index", (lower[PICKLE_INDEX],))
    if PICKLE_FILE in lower:
        return Choice("pickle", (lower[PICKLE_FILE],))
    pk = [n for n in top if n.lower().endswith(PICKLE_SUFFIXES)]
    if len(pk) == 1:
        return Choice("pickle", (pk[0],))
    if pk:
        raise AmbiguousCheckpoint(pk)
    raise NoCheckpoint()


def read_index(index_path: Path) -> dict[str, str]:
    """``weight_map`` of a shard index JSON, validated (typed errors on any flaw)."""
    p = str(index_path)
    try:
        raw = index_path.read_bytes()
    except OSError as exc:
        raise CheckpointError(p, f"cannot read shard index: {exc.strerror or exc}") from exc
    if not raw.strip():
        raise CheckpointError(p, "shard index is empty")
    doc = json_document(raw, p, "shard index")
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in wm.items()):
        raise CheckpointError(p, "shard index has no 'weight_map' object mapping tensor names to shard files")
    for shard in set(wm.values()):
        if os.path.isabs(shard) or ".." in Path(shard).parts:
            raise CheckpointError(p, f"shard index names a file outside its folder: '{shard}'")
    return dict(wm)


# --------------------------------------------------------------------------- specs
_HUB_RE = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[^:@]+))?(?::(?P<file>[^@]+))?$")


def parse_hub_id(spec: str) -> tuple[str, str | None, str | None] | None:
    """``org/name[@revision][:filename]`` -> (repo, revision, filename); None if not one."""
    m = _HUB_RE.match(spec)
    if not m:
        return None
    name = m["repo"].split("/", 1)[1]
    if name.lower().endswith((*CHECKPOINT_SUFFIXES, ".json")):
        return None  # "dir/mm_projector.bin" is a missing local file, not a repo
    return m["repo"], m["rev"], m["file"]


def display_name(spec: str) -> str:
    """A short human name for a model spec (recipe, CLI tables, the app's expert list).

    Hub ids ``org/name[@rev][:file]`` give ``name``; a fixed-name weight file
    (``mm_projector.bin``, ``model.safetensors``, ``pytorch_model.bin``) its folder's name;
    another weight file its stem; anything else (a folder) its last component."""
    hub = parse_hub_id(spec)
    if hub is not None:
        return hub[0].split("/", 1)[1]
    p = Path(spec)
    if p.name.lower() in WEIGHT_FILES and p.parent.name:
        return p.parent.name
    if p.suffix.lower() in CHECKPOINT_SUFFIXES:
        return p.stem
    return p.name or spec


# --------------------------------------------------------------------------- dropped paths
def is_checkpoint_dir(path: str | os.PathLike[str]) -> bool:
    """Whether a folder is itself one checkpoint: it holds a fixed-name weight file, a shard
    index or a ``config.json`` (HF layout), or exactly one weight file and no sub-folder."""
    p = Path(path)
    try:
        names = {c.name for c in p.iterdir()} if p.is_dir() else set()
    except OSError:
        return False
    if {n.lower() for n in names} & set(CHECKPOINT_DIR_MARKERS):
        return True
    weights = [n for n in names if n.lower().endswith(CHECKPOINT_SUFFIXES)]
    return len(weights) == 1 and not any((p / n).is_dir() for n in names)


def expand_paths(paths: Iterable[str | os.PathLike[str]]) -> list[str]:
    """Turn dropped files/folders into checkpoint specs (order kept, duplicates dropped).

    A folder that is itself a checkpoint (:func:`is_checkpoint_dir`) stays one spec. A
    folder of experts expands into its checkpoint files and checkpoint sub-folders.
    Anything else is passed on unchanged, so the loader can flag it with the reason
    instead of the caller silently ignoring it."""
    out: list[str] = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir() and not is_checkpoint_dir(p):
            try:
                children = sorted(p.iterdir())
            except OSError:
                children = []
            found = [c for c in children
                     if (c.is_file() and c.suffix.lower() in CHECKPOINT_SUFFIXES)
                     or (c.is_dir() and is_checkpoint_dir(c))]
            out.extend(str(c) for c in found) if found else out.append(str(p))
        else:
            out.append(str(p))
    return list(dict.fromkeys(out))
