"""Checkpoint reading and writing: families as data, safe readers, Hub resolver, atomic writers.

Public API (used by the pipeline, the CLI and the GUI)::

    load_projector(spec, *, progress=None, cancel=None) -> Projector
    inspect_checkpoint(spec) -> CheckpointInfo
    detect_family(keys) -> (FamilySpec, prefix)
    sha256_file(path) -> str
    write_projector(projector, out_dir, *, fmt="auto", dtype=None, metadata=None,
                    protected=(), overwrite=False) -> Path
    atomic_write(path, write_fn, *, protected=(), overwrite=False) -> Path
"""

from .atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text, check_writable
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
from .hub import resolve_hub
from .readers import (
    CheckpointInfo,
    inspect_checkpoint,
    load_projector,
    parse_hub_id,
    sha256_file,
    tensor_digest,
)
from .writers import FORMATS, hf_llava_state, output_filename, write_projector

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
    "family_of",
    "hf_llava_state",
    "inspect_checkpoint",
    "load_projector",
    "output_filename",
    "parse_hub_id",
    "pretty_family",
    "resolve_hub",
    "sha256_file",
    "tensor_digest",
    "write_projector",
]
