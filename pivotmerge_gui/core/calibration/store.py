"""The calibration file: one safetensors file, one tensor per domain, with provenance.

Layout (format version 1)::

    tensors   <domain name> : [tokens, in_features] float   (what the projector consumes)
    metadata  "format": "pt"
              "pivotmerge_calibration": JSON {
                  "version": 1,
                  "domains": [names in order],
                  "encoder": {"spec", "revision", "sha256", "kind"},      # what made the features
                  "features": {"layer", "select", "description"},          # which encoder output
                  "images": {domain: [{"path", "sha256"}, ...]},           # relative paths
                  "sampling": {"tokens_per_image", "all_tokens", "seed", "max_images"},
                  "dtype": "float32", "tool": "pivotmerge-gui X.Y.Z", "created": ISO time}

Files of earlier releases (tensors ``expert_0``, ``expert_1``, ... in recipe order, domain
names in the ``domains`` metadata) are still read; they have no provenance.

This module owns reading, writing and validating the file and mapping its domains to
experts (by name, never by position unless the file is of the old positional kind).
Every problem is a :class:`~..errors.CheckpointError` naming the file, or a
:class:`~..errors.RecipeError` for a mapping that does not fit the experts.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError, RecipeError
from .features import Calibration

FORMAT_VERSION = 1
META_KEY = "pivotmerge_calibration"
MAX_DOMAIN_CHARS = 200
_LEGACY_KEY = re.compile(r"^expert_(\d+)$")


@dataclass
class CalibrationFile:
    """A calibration file read into memory (see the module docstring)."""

    path: Path
    sha256: str
    tensors: dict[str, torch.Tensor]  # domain -> [tokens, in_features], file order
    provenance: dict[str, Any] = field(default_factory=dict)
    positional: bool = False  # an old file: expert_k tensors in recipe order

    @property
    def domains(self) -> list[str]:
        return list(self.tensors)

    @property
    def in_features(self) -> int:
        return int(next(iter(self.tensors.values())).shape[1])

    def describe(self) -> str:
        """One line: domains with token counts, and what encoder made them."""
        parts = ", ".join(f"{d} ({t.shape[0]:,} tokens)" for d, t in self.tensors.items())
        enc = (self.provenance.get("encoder") or {}).get("spec")
        return f"{parts}" + (f"; encoder {enc}" if enc else "")

    def for_experts(self, expert_names: Sequence[str],
                    mapping: Mapping[str, str | None] | None = None) -> Calibration:
        """The features of each expert's domain, in expert order (None where the mapping
        says an expert has no calibration data)."""
        domains = resolve_domains(self, expert_names, mapping)
        feats = [self.tensors[d] if d is not None else None for d in domains]
        source = {"file": str(self.path), "sha256": self.sha256, "provenance": self.provenance,
                  "domains": dict(zip(expert_names, domains))}
        return Calibration(feats, [d if d is not None else "" for d in domains], source)


def default_provenance(**kw: Any) -> dict[str, Any]:
    """The provenance record with this tool's version and the time filled in."""
    from ... import __version__

    out: dict[str, Any] = {"encoder": {}, "features": {}, "images": {}, "sampling": {}}
    out.update({k: v for k, v in kw.items() if v is not None})
    out.setdefault("tool", f"pivotmerge-gui {__version__}")
    out.setdefault("created", _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat())
    return out


def check_domain_name(name: Any, where: str) -> str:
    if not isinstance(name, str) or not name.strip():
        raise CheckpointError(where, f"calibration domain names must be non-empty text, got {name!r}")
    if len(name) > MAX_DOMAIN_CHARS or any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise CheckpointError(where, f"calibration domain name {name[:40]!r} is too long or has "
                                     "control characters")
    return name


def encode(tensors: Mapping[str, torch.Tensor], provenance: Mapping[str, Any] | None = None,
           where: str = "calibration") -> bytes:
    """The bytes of a calibration file (validated as :func:`read` validates)."""
    from safetensors.torch import save as st_save

    if not tensors:
        raise CheckpointError(where, "a calibration file needs at least one domain")
    out: dict[str, torch.Tensor] = {}
    width = None
    for name, t in tensors.items():
        check_domain_name(name, where)
        _check_tensor(name, t, width, where)
        width = t.shape[1]
        out[name] = t.detach().to("cpu").contiguous()
    prov = dict(provenance or {})
    prov.update({"version": FORMAT_VERSION, "domains": list(out),
                 "dtype": str(next(iter(out.values())).dtype).replace("torch.", "")})
    meta = {"format": "pt", META_KEY: json.dumps(prov, sort_keys=True, default=str)}
    return st_save(out, metadata=meta)


def write(path: str | Path, tensors: Mapping[str, torch.Tensor],
          provenance: Mapping[str, Any] | None = None, *, overwrite: bool = False,
          protected: Iterable[Path] = ()) -> str:
    """Write a calibration file atomically; returns its sha256."""
    import hashlib

    from ..io.atomic import atomic_write_bytes

    data = encode(tensors, provenance, str(path))
    atomic_write_bytes(Path(path), data, overwrite=overwrite, protected=list(protected))
    return hashlib.sha256(data).hexdigest()


def read(path: str | Path, *, expect_sha256: str | None = None,
         in_features: int | None = None) -> CalibrationFile:
    """Read and validate a calibration file (new or old layout)."""
    from safetensors import SafetensorError, safe_open

    from ..bounded import NestingError, json_loads
    from ..io.hashing import sha256_file

    p = Path(path)
    where = str(p)
    if not p.is_file():
        raise CheckpointError(where, "calibration file not found" if not p.exists() else
                              "the calibration must be a file")
    digest = sha256_file(p)
    if expect_sha256 is not None and digest != expect_sha256.lower():
        raise CheckpointError(where, f"calibration file has sha256 {digest[:12]}… but the recipe "
                                     f"expects {expect_sha256[:12]}… (the file changed since the "
                                     "recipe was written)")
    try:
        with safe_open(where, framework="pt") as f:
            keys = list(f.keys())
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in keys}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(where, f"cannot read calibration features: {e}") from None
    if not tensors:
        raise CheckpointError(where, "the calibration file holds no tensors")
    prov: dict[str, Any] = {}
    if META_KEY in meta:
        try:
            prov = json_loads(meta[META_KEY])
        except (NestingError, ValueError) as e:
            raise CheckpointError(where, f"calibration provenance is not valid JSON ({e})") from None
        if not isinstance(prov, dict):
            raise CheckpointError(where, "calibration provenance must be a JSON object")
        if int(prov.get("version", 0) or 0) > FORMAT_VERSION:
            raise CheckpointError(where, f"calibration format version {prov.get('version')} is newer "
                                         f"than this release reads ({FORMAT_VERSION})")
        order = [d for d in prov.get("domains", []) if d in tensors] if isinstance(prov.get("domains"), list) else []
        tensors = {d: tensors[d] for d in [*order, *[k for k in keys if k not in order]]}
    positional = META_KEY not in meta and bool(keys) and all(_LEGACY_KEY.match(k) for k in keys)
    if positional:  # the old layout: expert_k in recipe order, names in "domains" metadata
        tensors = {k: tensors[k] for k in sorted(keys, key=lambda k: int(k.split("_")[1]))}
        idx = [int(k.split("_")[1]) for k in tensors]
        if idx != list(range(len(idx))):
            raise CheckpointError(where, f"calibration tensors {', '.join(tensors)} skip an index")
        try:
            names = json.loads(meta.get("domains", "[]"))
        except json.JSONDecodeError:
            names = []
        prov = {"legacy_domains": names} if isinstance(names, list) else {}
    width = in_features
    for name, t in tensors.items():
        check_domain_name(name, where)
        _check_tensor(name, t, width, where)
        width = t.shape[1]
    return CalibrationFile(p, digest, {k: t.float() for k, t in tensors.items()}, prov, positional)


def auto_map(expert_names: Sequence[str], domains: Sequence[str], positional: bool = False) -> dict[str, str | None]:
    """A first expert -> domain mapping for a file the user picked: equal names, then equal
    ignoring case and spaces; an old positional file (``expert_k``), or a file with as many
    domains as experts and no name in common, maps by position. The rest map to None (no
    data). The app shows the mapping; the recipe records it by name."""
    if len(domains) == len(expert_names) and (
            positional or not {n.lower() for n in expert_names} & {d.lower() for d in domains}):
        return dict(zip(expert_names, domains))

    def norm(s: str) -> str:
        return "".join(s.lower().split()).replace("-", "_")

    free = list(domains)
    out: dict[str, str | None] = {}
    for key in (lambda s: s, norm):
        for n in expert_names:
            if n in out:
                continue
            hit = next((d for d in free if key(d) == key(n)), None)
            if hit is not None:
                out[n] = hit
                free.remove(hit)
    return {n: out.get(n) for n in expert_names}


def resolve_domains(cal: CalibrationFile, expert_names: Sequence[str],
                    mapping: Mapping[str, str | None] | None) -> list[str | None]:
    """The file domain of each expert (None = no calibration data for it).

    ``mapping`` maps expert names to domain names (or None). Without a mapping, experts
    take the domain of the same name; an old positional file maps by position. Raises
    :class:`RecipeError` naming what does not fit."""
    where = str(cal.path)
    names = list(expert_names)
    if mapping is None:
        if cal.positional:
            if len(cal.tensors) != len(names):
                raise RecipeError(f"calibration file {where} has {len(cal.tensors)} feature sets "
                                  f"(expert_0..) but the recipe lists {len(names)} experts")
            return list(cal.tensors)
        unknown = [n for n in names if n not in cal.tensors]
        if unknown:
            raise RecipeError(
                f"calibration file {where} has no domain named {', '.join(map(repr, unknown))} "
                f"(its domains: {', '.join(cal.domains)}); map experts to domains with "
                "calibration.domains (an expert without data maps to null)")
        return names
    extra = [n for n in mapping if n not in names]
    if extra:
        raise RecipeError(f"calibration.domains names {', '.join(map(repr, extra))}, which is not "
                          f"an expert of the recipe ({', '.join(names)})")
    out: list[str | None] = []
    for n in names:
        if n not in mapping:
            raise RecipeError(f"calibration.domains has no entry for expert {n!r}: map it to a domain "
                              f"of {where} ({', '.join(cal.domains)}) or to null (no data)")
        d = mapping[n]
        if d is not None and d not in cal.tensors:
            raise RecipeError(f"calibration.domains maps expert {n!r} to {d!r}, which {where} does "
                              f"not hold (its domains: {', '.join(cal.domains)})")
        out.append(d)
    if all(d is None for d in out):
        raise RecipeError("calibration.domains maps every expert to null: there is no calibration data")
    return out


def from_calibration(cal: Calibration, names: Sequence[str]) -> tuple[dict[str, torch.Tensor], dict[str, str | None]]:
    """(tensors by domain, expert -> domain mapping) to write an in-memory calibration as a
    file: each expert's features under its domain name (its own name when it has none)."""
    tensors: dict[str, torch.Tensor] = {}
    mapping: dict[str, str | None] = {}
    for k, (name, feats) in enumerate(zip(names, cal.features)):
        if feats is None:
            mapping[name] = None
            continue
        dom = cal.domains[k] if k < len(cal.domains) and cal.domains[k] else name
        dom = dom if dom not in tensors or tensors[dom] is feats else f"{dom} ({name})"
        tensors[dom] = feats
        mapping[name] = dom
    return tensors, mapping


def _check_tensor(name: str, t: torch.Tensor, width: int | None, where: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 2 or not t.is_floating_point():
        raise CheckpointError(where, f"calibration tensor {name!r} has shape "
                                     f"{list(getattr(t, 'shape', []))} and dtype {getattr(t, 'dtype', None)}; "
                                     "expected a float [tokens, in_features] matrix")
    if t.shape[0] == 0:
        raise CheckpointError(where, f"calibration tensor {name!r} has no tokens")
    if width is not None and t.shape[1] != width:
        raise CheckpointError(where, f"calibration tensor {name!r} has width {t.shape[1]} but "
                                     f"{width} is expected (the projector's input width)")
    if not bool(torch.isfinite(t).all()):
        raise CheckpointError(where, f"calibration tensor {name!r} contains NaN or Inf")
    if not math.isfinite(float(t.float().abs().max())):
        raise CheckpointError(where, f"calibration tensor {name!r} overflows float32")
