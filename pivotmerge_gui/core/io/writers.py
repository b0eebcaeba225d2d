"""Write a projector as a drop-in file for the tool it came from (atomically).

Formats (``fmt``):

- ``auto``: the input family's own file and key layout. LLaVA / LLaVA-NeXT ->
  ``mm_projector.bin``, a flat ``torch.save`` dict with exactly the original keys, what
  LLaVA's ``--pretrain_mm_mlp_adapter`` and ``load_pretrained_model`` load; MiniGPT-4 ->
  ``checkpoint.pth`` holding ``{"model": {...}}`` as its ``ckpt`` loader expects; every other
  family -> ``model.safetensors`` with the original keys.
- ``llava-bin``: ``mm_projector.bin`` (LLaVA families; HF Llava projectors are mapped
  back to ``model.mm_projector.{0,2}``).
- ``safetensors``: the original keys in ``model.safetensors`` with
  ``{"format": "pt", **metadata}`` (older transformers refuse files without ``format``).
- ``hf-llava``: ``multi_modal_projector.linear_{1,2}.{weight,bias}`` (+ ``image_newline``
  for LLaVA-NeXT), loadable with ``strict=True`` into transformers' Llava projector.

Non-projector tensors of an adapter file (``projector.extras``: LLaVA's
``model.embed_tokens.weight``, LLaVA-NeXT's ``vision_resampler.*``, see :mod:`.extras`) are
written under their original keys, in their own dtype, beside the projector in ``auto``,
``llava-bin`` and ``safetensors``; ``hf-llava`` (transformers' projector, loaded with
``strict=True``) has no place for them and refuses a projector that carries any.

Tensors are written contiguous and cloned (a view of a larger storage would otherwise
save the whole storage with ``torch.save``, and safetensors refuses shared storage).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch

from ..errors import OutputError
from ..options import OUTPUT_FORMATS
from ..projector import Projector, parse_op
from .atomic import atomic_write
from .families import FAMILY_BY_NAME, FamilySpec, family_of

FORMATS = OUTPUT_FORMATS  # the names live in core.options (torch-free, shared with the app)
LLAVA_BIN = "mm_projector.bin"
SAFETENSORS = "model.safetensors"


def _spec(projector: Projector) -> FamilySpec | None:
    try:
        return family_of(projector)
    except KeyError:
        return None


def _prepare(t: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    t = t.detach().to("cpu")
    if dtype is not None and t.is_floating_point():
        t = t.to(dtype)
    return t.contiguous().clone()


def _keyed(projector: Projector, dtype: torch.dtype | None, rename: Mapping[str, str] | None = None) -> dict[str, torch.Tensor]:
    """Output key -> tensor; ``rename`` maps canonical "layer.role" to an output key."""
    out: dict[str, torch.Tensor] = {}
    for layer in projector.layers:
        for role, t in layer.tensors.items():
            canon = f"{layer.name}.{role}"
            key = rename[canon] if rename is not None else layer.keys.get(role, canon)
            if key in out:
                raise OutputError(key, "two tensors would be written under the same key")
            out[key] = _prepare(t, dtype)
    return out


def _with_extras(projector: Projector, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` plus the projector's extras under their original keys (own dtype)."""
    for key, t in projector.extras.items():
        if key in state:
            raise OutputError(key, "a carried non-projector tensor has the key of a projector tensor")
        state[key] = _prepare(t, None)
    return state


def hf_llava_state(projector: Projector, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    """The projector under transformers' Llava file keys (typed error if it has none)."""
    spec = _spec(projector)
    mapping = dict(spec.hf_llava_map) if spec is not None else {}
    if spec is None or not mapping:
        fam = spec.pretty if spec is not None else projector.family
        raise OutputError(
            SAFETENSORS,
            f"a {fam} projector has no HF Llava equivalent (HF Llava is Linear-GELU-Linear); "
            "use output format 'auto' or 'safetensors'",
        )
    rename: dict[str, str] = {}
    for layer in projector.layers:
        if layer.name not in mapping:
            raise OutputError(
                SAFETENSORS,
                f"layer '{layer.name}' of the {projector.family} projector has no HF Llava "
                "equivalent (HF Llava is exactly Linear-GELU-Linear); use output format 'auto' or 'safetensors'",
            )
        target = mapping[layer.name]
        for role in layer.tensors:
            rename[f"{layer.name}.{role}"] = (
                target if layer.kind == "vector" else f"multi_modal_projector.{target}.{role}"
            )
    linear_targets = {mapping[l.name] for l in projector.layers if l.kind == "linear"}
    chain = [(o.head, o.layer) for o in map(parse_op, projector.ops) if o.head in ("linear", "gelu", "gelu_tanh")]
    if linear_targets != {"linear_1", "linear_2"} or chain != [
        ("linear", _name_for(mapping, "linear_1")), ("gelu", ""), ("linear", _name_for(mapping, "linear_2"))
    ]:
        raise OutputError(
            SAFETENSORS,
            f"the {projector.family} projector is not Linear-GELU-Linear, so it has no HF Llava equivalent",
        )
    return _keyed(projector, dtype, rename)


def _name_for(mapping: Mapping[str, str], target: str) -> str:
    return next(k for k, v in mapping.items() if v == target)


def _llava_state(projector: Projector, dtype: torch.dtype | None) -> dict[str, torch.Tensor]:
    spec = _spec(projector)
    if spec is not None and spec.is_llava:
        return _keyed(projector, dtype)
    if spec is not None and spec.name in ("hf-llava", "hf-llava-next"):
        hf = hf_llava_state(projector, dtype)
        back = {"multi_modal_projector.linear_1.": "model.mm_projector.0.", "multi_modal_projector.linear_2.": "model.mm_projector.2."}
        out = {}
        for k, v in hf.items():
            new = "model.image_newline" if k == "image_newline" else next(back[p] + k[len(p):] for p in back if k.startswith(p))
            out[new] = v
        return out
    fam = spec.pretty if spec is not None else projector.family
    raise OutputError(LLAVA_BIN, f"a {fam} projector cannot be written as LLaVA's mm_projector.bin; use 'auto' or 'safetensors'")


# Both writers serialise in memory (a projector is megabytes) and write the bytes from Python:
# torch's and safetensors' own file writers report a full disk as RuntimeError /
# SafetensorError (torch without the errno), Python's write as OSError(ENOSPC), which the
# atomic save turns into one clear OutputError.
def _save_torch(obj: object) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        buf = io.BytesIO()
        torch.save(obj, buf)
        tmp.write_bytes(buf.getbuffer())

    return write


def _save_safetensors(tensors: dict[str, torch.Tensor], metadata: Mapping[str, str]) -> Callable[[Path], None]:
    from safetensors.torch import save

    meta = {"format": "pt", **{str(k): str(v) for k, v in metadata.items()}}
    meta["format"] = "pt"

    def write(tmp: Path) -> None:
        tmp.write_bytes(save(tensors, metadata=meta))

    return write


def output_filename(projector: Projector, fmt: str = "auto") -> str:
    """File name ``write_projector`` will use for ``fmt`` (the GUI shows it beforehand)."""
    if fmt not in FORMATS:
        raise OutputError(fmt, f"unknown output format; known: {', '.join(FORMATS)}")
    if fmt == "llava-bin":
        return LLAVA_BIN
    if fmt in ("safetensors", "hf-llava"):
        return SAFETENSORS
    spec = _spec(projector)
    return spec.default_filename if spec is not None else SAFETENSORS


def write_projector(
    projector: Projector,
    out_dir: str | os.PathLike[str],
    *,
    fmt: str = "auto",
    dtype: torch.dtype | None = None,
    metadata: Mapping[str, str] | None = None,
    protected: Iterable[str | os.PathLike[str]] = (),
    overwrite: bool = False,
) -> Path:
    """Write ``projector`` into ``out_dir`` in ``fmt`` (see module docstring); return the path.

    ``dtype`` casts floating tensors (None keeps each tensor's dtype). ``metadata``
    (strings) goes into safetensors headers; pickle formats carry only the tensors so the
    original loaders see exactly the keys they expect. ``protected`` paths (the inputs) are
    never overwritten; an existing output is replaced only with ``overwrite=True``.
    """
    name = output_filename(projector, fmt)
    target = Path(out_dir) / name
    spec = _spec(projector)
    meta = dict(metadata or {})
    if fmt == "llava-bin" or (fmt == "auto" and name == LLAVA_BIN):
        writer = _save_torch(_with_extras(projector, _llava_state(projector, dtype)))
    elif fmt == "hf-llava":
        if projector.extras:
            raise OutputError(
                name,
                f"the projector carries non-projector tensors ({', '.join(sorted(projector.extras))}) "
                "that transformers' projector file has no place for; use output format 'auto'",
            )
        writer = _save_safetensors(hf_llava_state(projector, dtype), meta)
    elif fmt == "auto" and spec is not None and spec.container_key:
        container = projector.metadata.get("container_key") or spec.container_key
        writer = _save_torch({container: _with_extras(projector, _keyed(projector, dtype))})
    else:
        writer = _save_safetensors(_with_extras(projector, _keyed(projector, dtype)), meta)
    return atomic_write(target, writer, protected=list(protected) + list(projector.files), overwrite=overwrite)


__all__ = ["FAMILY_BY_NAME", "FORMATS", "hf_llava_state", "output_filename", "write_projector"]
