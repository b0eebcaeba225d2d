"""Which file of a folder (local or a Hub repo) holds the projector.

Shared by the local folder reader and the Hub resolver so both pick the same file for the
same listing. Preference follows what transformers and LLaVA write: a safetensors shard
index, a single ``model.safetensors``, other safetensors, LLaVA's ``mm_projector.bin``,
then pickle indexes and files. Safetensors wins over pickle when both exist (it needs no
unpickling and lets us read only the projector's bytes).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
CHECKPOINT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


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
    if "model.safetensors.index.json" in lower:
        return Choice("index", (lower["model.safetensors.index.json"],))
    if "model.safetensors" in lower:
        return Choice("safetensors", (lower["model.safetensors"],))
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
    if "mm_projector.bin" in lower:
        return Choice("pickle", (lower["mm_projector.bin"],))
    if "pytorch_model.bin.index.json" in lower:
        return Choice("index", (lower["pytorch_model.bin.index.json"],))
    if "pytorch_model.bin" in lower:
        return Choice("pickle", (lower["pytorch_model.bin"],))
    pk = [n for n in top if n.lower().endswith(PICKLE_SUFFIXES)]
    if len(pk) == 1:
        return Choice("pickle", (pk[0],))
    if pk:
        raise AmbiguousCheckpoint(pk)
    raise NoCheckpoint()
