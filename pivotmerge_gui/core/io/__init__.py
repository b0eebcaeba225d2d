"""Checkpoint reading and writing: families as data, safe readers, Hub resolver, atomic writers.

Public API (used by the pipeline, the CLI and the GUI)::

    load_projector(spec, *, progress=None, cancel=None) -> Projector
    inspect_checkpoint(spec) -> CheckpointInfo
    detect_family(keys) -> (FamilySpec, prefix)
    sha256_file(path) -> str
    write_projector(projector, out_dir, *, fmt="auto", dtype=None, metadata=None,
                    protected=(), overwrite=False) -> Path
    atomic_write(path, write_fn, *, protected=(), overwrite=False) -> Path

The names are re-exported lazily (PEP 562): importing a torch-free submodule such as
:mod:`.discovery` does not import the readers, and with them torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# public name -> submodule that defines it
_EXPORTS: dict[str, str] = {
    "atomic_path": "atomic",
    "atomic_write": "atomic",
    "atomic_write_bytes": "atomic",
    "atomic_write_text": "atomic",
    "check_writable": "atomic",
    "FAMILIES": "families",
    "FAMILY_BY_NAME": "families",
    "FamilySpec": "families",
    "ModuleSpec": "families",
    "PartSpec": "families",
    "build_projector": "families",
    "detect_family": "families",
    "family_of": "families",
    "pretty_family": "families",
    "resolve_hub": "hub",
    "CheckpointInfo": "readers",
    "inspect_checkpoint": "readers",
    "load_projector": "readers",
    "parse_hub_id": "discovery",
    "display_name": "discovery",
    "expand_paths": "discovery",
    "is_checkpoint_dir": "discovery",
    "sha256_file": "hashing",
    "tensor_digest": "hashing",
    "FORMATS": "writers",
    "hf_llava_state": "writers",
    "output_filename": "writers",
    "write_projector": "writers",
}

__all__ = [
    "FAMILIES",
    "FAMILY_BY_NAME",
    "FORMATS",
    "CheckpointInfo",
    "FamilySpec",
    "ModuleSpec",
    "PartSpec",
    "atomic_path",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "build_projector",
    "check_writable",
    "detect_family",
    "display_name",
    "expand_paths",
    "family_of",
    "hf_llava_state",
    "inspect_checkpoint",
    "is_checkpoint_dir",
    "load_projector",
    "output_filename",
    "parse_hub_id",
    "pretty_family",
    "resolve_hub",
    "sha256_file",
    "tensor_digest",
    "write_projector",
]


_SUBMODULES = ("atomic", "discovery", "families", "hashing", "hub", "readers", "safetensors_header",
               "writers")


def __getattr__(name: str) -> Any:
    if name in _SUBMODULES:  # ``core.io.readers`` works as an attribute, as when it was eager
        return importlib.import_module(f".{name}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from .atomic import (
        atomic_path,
        atomic_write,
        atomic_write_bytes,
        atomic_write_text,
        check_writable,
    )
    from .discovery import display_name, expand_paths, is_checkpoint_dir, parse_hub_id
    from .families import (
        FAMILIES,
        FAMILY_BY_NAME,
        FamilySpec,
        ModuleSpec,
        PartSpec,
        build_projector,
        detect_family,
        family_of,
        pretty_family,
    )
    from .hashing import sha256_file, tensor_digest
    from .hub import resolve_hub
    from .readers import CheckpointInfo, inspect_checkpoint, load_projector
    from .writers import FORMATS, hf_llava_state, output_filename, write_projector
