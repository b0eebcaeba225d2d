"""Projector families as data: key patterns, layer structure and forward program.

Every family a user can bring is one frozen :class:`FamilySpec` in :data:`FAMILIES`. A
family is described by

- an *anchor* regex (the text between the captured model prefix and the module name,
  e.g. ``mm_projector\\.``),
- its *modules* (:class:`ModuleSpec`): a name pattern, the parameter-holding parts of the
  module (:class:`PartSpec`: kind and roles) and the forward ops the module contributes,
- how modules are ordered: ``listed`` (the order of :attr:`FamilySpec.modules`) or
  ``indexed`` (an ``nn.Sequential`` whose integer indices order the modules; every missing
  index between two modules is a parameter-free module, the family's ``gap_op``).

Detection, the key regexes shown to users in :class:`UnknownLayoutError`, the canonical
layer names and the forward program are all derived from this table by the generic code
at the bottom of the module; adding a family means adding a row, not a code path.
Sources: LLaVA ``llava/model/multimodal_projector/builder.py``, transformers
``modeling_llava*.py``, ``modeling_qwen2_vl.py`` / ``modeling_qwen2_5_vl.py``,
``modeling_internvl.py``, InternVL ``modeling_internvl_chat.py`` (``mlp1``), MiniGPT-4
``minigpt4.py``, ``modeling_blip_2.py``, ``modeling_idefics3.py``, ``modeling_paligemma.py``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Literal

import torch

from ..errors import CheckpointError, UnknownLayoutError
from ..projector import Layer, LayerKind, Projector, parse_op

PREFIX = r"(?P<prefix>(?:.*\.)?)"


@dataclass(frozen=True)
class PartSpec:
    """One parameter-holding sub-layer of a module (``suffix`` "" = the module itself)."""

    suffix: str
    kind: LayerKind
    roles: tuple[str, ...] = ("weight", "bias")
    optional_roles: tuple[str, ...] = ()


@dataclass(frozen=True)
class ModuleSpec:
    """A module of a family.

    ``ops`` are templates: ``{m}`` is the module name (the layer name when the module has
    a single part with suffix ""), ``{merge}`` is the token merge factor (see
    :attr:`FamilySpec.merge_from`). ``bare`` modules are stored under a key without a role
    suffix and without the anchor (LLaVA-NeXT's ``model.image_newline``); their tensor is
    the ``weight`` role.
    """

    label: str
    pattern: str
    parts: tuple[PartSpec, ...]
    ops: tuple[str, ...]
    required: bool = True
    bare: bool = False
    layer_name: str | None = None  # name when the pattern is empty (LLaVA ``linear``)

    def key_regexes(self, anchor: str) -> list[str]:
        if self.bare:
            return [f"^{PREFIX}(?P<layer>{self.pattern})$"]
        out = []
        for part in self.parts:
            roles = "|".join(part.roles + part.optional_roles)
            layer = f"(?P<module>{self.pattern})" + (re.escape("." + part.suffix) if part.suffix else "")
            out.append(f"^{PREFIX}{anchor}(?P<layer>{layer})\\.(?P<role>{roles})$")
        return out


@dataclass(frozen=True)
class FamilySpec:
    """One projector family (see the module docstring)."""

    name: str
    pretty: str
    anchor: str
    modules: tuple[ModuleSpec, ...]
    order: Literal["listed", "indexed"] = "listed"
    gap_op: str = "gelu"
    requires_any: tuple[str, ...] = ()
    variants: tuple[tuple[str, str], ...] = ()
    default_filename: str = "model.safetensors"
    container_key: str | None = None
    merge_from: tuple[str, str] | None = None
    hf_llava_map: tuple[tuple[str, str], ...] = ()
    reference: str = ""

    @cached_property
    def patterns(self) -> tuple[str, ...]:
        return tuple(rx for m in self.modules for rx in m.key_regexes(self.anchor))

    @cached_property
    def _compiled(self) -> tuple[tuple[ModuleSpec, PartSpec | None, re.Pattern[str]], ...]:
        out: list[tuple[ModuleSpec, PartSpec | None, re.Pattern[str]]] = []
        for m in self.modules:
            rxs = m.key_regexes(self.anchor)
            if m.bare:
                out.append((m, None, re.compile(rxs[0])))
            else:
                out.extend((m, p, re.compile(rx)) for p, rx in zip(m.parts, rxs))
        return tuple(out)

    @property
    def is_llava(self) -> bool:
        return self.default_filename == "mm_projector.bin"


# --------------------------------------------------------------------------- the table
_LINEAR = PartSpec("", "linear")
_LINEAR_NOBIAS = PartSpec("", "linear", roles=("weight",))
_LN = PartSpec("", "layernorm")
_RMS = PartSpec("", "rmsnorm", roles=("weight",))
_VEC = PartSpec("", "vector", roles=("weight",))

_IMAGE_NEWLINE = ModuleSpec("image_newline", "image_newline", (_VEC,), (), bare=True)

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec(
        name="llava-linear",
        pretty="LLaVA (linear)",
        anchor=r"mm_projector",  # keys are <prefix>mm_projector.{weight,bias}
        modules=(ModuleSpec("linear", "", (_LINEAR,), ("linear:{m}",), layer_name="mm_projector"),),
        default_filename="mm_projector.bin",
        reference="https://github.com/haotian-liu/LLaVA",
    ),
    FamilySpec(
        name="llava",
        pretty="LLaVA",
        anchor=r"mm_projector\.",
        modules=(ModuleSpec("linear", r"\d+", (_LINEAR,), ("linear:{m}",)),),
        order="indexed",
        variants=(("", "mlp{linear}x_gelu"),),
        default_filename="mm_projector.bin",
        hf_llava_map=(("0", "linear_1"), ("2", "linear_2")),
        reference="https://github.com/haotian-liu/LLaVA",
    ),
    FamilySpec(
        name="llava-next",
        pretty="LLaVA-NeXT",
        anchor=r"mm_projector\.",
        modules=(
            ModuleSpec("linear", r"\d+", (_LINEAR,), ("linear:{m}",)),
            ModuleSpec(
                "resblock",
                r"\d+",
                (PartSpec("pre_norm", "layernorm"), PartSpec("proj.0", "linear"), PartSpec("proj.2", "linear")),
                ("layernorm:{m}.pre_norm", "push", "linear:{m}.proj.0", "gelu", "linear:{m}.proj.2", "add"),
                required=False,
            ),
            replace(_IMAGE_NEWLINE, required=False),
        ),
        order="indexed",
        requires_any=("resblock", "image_newline"),
        variants=(("resblock", "mlp{linear}x_res{resblock}x_gelu"), ("", "mlp{linear}x_gelu")),
        default_filename="mm_projector.bin",
        hf_llava_map=(("0", "linear_1"), ("2", "linear_2"), ("image_newline", "image_newline")),
        reference="https://github.com/LLaVA-VL/LLaVA-NeXT",
    ),
    FamilySpec(
        name="hf-llava",
        pretty="HF Llava",
        anchor=r"multi_modal_projector\.",
        modules=(
            ModuleSpec("linear_1", "linear_1", (_LINEAR,), ("linear:{m}", "gelu")),
            ModuleSpec("linear_2", "linear_2", (_LINEAR,), ("linear:{m}",)),
        ),
        hf_llava_map=(("linear_1", "linear_1"), ("linear_2", "linear_2")),
        reference="https://huggingface.co/docs/transformers/model_doc/llava",
    ),
    FamilySpec(
        name="hf-llava-next",
        pretty="HF LlavaNext / LlavaOnevision",
        anchor=r"multi_modal_projector\.",
        modules=(
            ModuleSpec("linear_1", "linear_1", (_LINEAR,), ("linear:{m}", "gelu")),
            ModuleSpec("linear_2", "linear_2", (_LINEAR,), ("linear:{m}",)),
            _IMAGE_NEWLINE,
        ),
        hf_llava_map=(("linear_1", "linear_1"), ("linear_2", "linear_2"), ("image_newline", "image_newline")),
        reference="https://huggingface.co/docs/transformers/model_doc/llava_next",
    ),
    FamilySpec(
        name="qwen2-vl",
        pretty="Qwen2-VL merger",
        anchor=r"visual\.merger\.",
        modules=(
            ModuleSpec("ln_q", "ln_q", (_LN,), ("layernorm:{m}:1e-06", "merge_tokens:{merge}")),
            ModuleSpec("mlp.0", r"mlp\.0", (_LINEAR,), ("linear:{m}", "gelu")),
            ModuleSpec("mlp.2", r"mlp\.2", (_LINEAR,), ("linear:{m}",)),
        ),
        merge_from=("mlp.0", "ln_q"),
        reference="https://huggingface.co/docs/transformers/model_doc/qwen2_vl",
    ),
    FamilySpec(
        name="qwen2.5-vl",
        pretty="Qwen2.5-VL merger",
        anchor=r"visual\.merger\.",
        modules=(
            ModuleSpec("ln_q", "ln_q", (_RMS,), ("rmsnorm:{m}:1e-06", "merge_tokens:{merge}")),
            ModuleSpec("mlp.0", r"mlp\.0", (_LINEAR,), ("linear:{m}", "gelu")),
            ModuleSpec("mlp.2", r"mlp\.2", (_LINEAR,), ("linear:{m}",)),
        ),
        merge_from=("mlp.0", "ln_q"),
        reference="https://huggingface.co/docs/transformers/model_doc/qwen2_5_vl",
    ),
    FamilySpec(
        name="internvl",
        pretty="InternVL (mlp1)",
        anchor=r"mlp1\.",
        modules=(
            ModuleSpec("0", "0", (_LN,), ("layernorm:{m}",)),
            ModuleSpec("1", "1", (_LINEAR,), ("linear:{m}", "gelu")),
            ModuleSpec("3", "3", (_LINEAR,), ("linear:{m}",)),
        ),
        reference="https://github.com/OpenGVLab/InternVL",
    ),
    FamilySpec(
        name="internvl-hf",
        pretty="InternVL (HF native)",
        anchor=r"multi_modal_projector\.",
        modules=(
            ModuleSpec("layer_norm", "layer_norm", (_LN,), ("layernorm:{m}",)),
            ModuleSpec("linear_1", "linear_1", (_LINEAR,), ("linear:{m}", "gelu")),
            ModuleSpec("linear_2", "linear_2", (_LINEAR,), ("linear:{m}",)),
        ),
        reference="https://huggingface.co/docs/transformers/model_doc/internvl",
    ),
    FamilySpec(
        name="minigpt4",
        pretty="MiniGPT-4",
        anchor="",
        modules=(ModuleSpec("llama_proj", "llama_proj", (_LINEAR,), ("linear:{m}",)),),
        default_filename="checkpoint.pth",
        container_key="model",
        reference="https://github.com/Vision-CAIR/MiniGPT-4",
    ),
    FamilySpec(
        name="blip2",
        pretty="BLIP-2",
        anchor="",
        modules=(ModuleSpec("language_projection", "language_projection", (_LINEAR,), ("linear:{m}",)),),
        reference="https://huggingface.co/docs/transformers/model_doc/blip-2",
    ),
    FamilySpec(
        name="idefics3",
        pretty="Idefics3 / SmolVLM connector",
        anchor=r"connector\.modality_projection\.",
        modules=(ModuleSpec("proj", "proj", (_LINEAR_NOBIAS,), ("linear:{m}",)),),
        reference="https://huggingface.co/docs/transformers/model_doc/idefics3",
    ),
    FamilySpec(
        name="paligemma",
        pretty="PaliGemma",
        anchor=r"multi_modal_projector\.",
        modules=(ModuleSpec("linear", "linear", (_LINEAR,), ("linear:{m}",)),),
        reference="https://huggingface.co/docs/transformers/model_doc/paligemma",
    ),
)

FAMILY_BY_NAME: dict[str, FamilySpec] = {f.name: f for f in FAMILIES}


def all_patterns() -> list[str]:
    """Every key regex of every family (shown in :class:`UnknownLayoutError`)."""
    return [f"{f.name}: {rx}" for f in FAMILIES for rx in f.patterns]


def family_of(projector: Projector) -> FamilySpec:
    """The spec a projector was read with (``projector.family`` may carry a variant)."""
    base = projector.metadata.get("family_spec") or projector.family
    if base in FAMILY_BY_NAME:
        return FAMILY_BY_NAME[base]
    for spec in sorted(FAMILIES, key=lambda f: -len(f.name)):
        if projector.family.startswith(spec.name + "-") or projector.family == spec.name:
            return spec
    raise KeyError(projector.family)


# --------------------------------------------------------------------------- matching
@dataclass
class _Match:
    """The keys of one family under one prefix: module -> part -> role -> key."""

    family: FamilySpec
    prefix: str
    modules: dict[str, tuple[ModuleSpec, dict[str, dict[str, str]]]] = field(default_factory=dict)
    keys: set[str] = field(default_factory=set)
    conflicts: set[str] = field(default_factory=set)


def _match_key(spec: FamilySpec, key: str) -> tuple[ModuleSpec, str, str, str, str] | None:
    """(module, module name, part suffix, role, prefix) when ``key`` belongs to ``spec``."""
    for module, part, rx in spec._compiled:
        m = rx.match(key)
        if m is None:
            continue
        if module.bare:
            return module, m["layer"], "", "weight", m["prefix"]
        assert part is not None
        return module, m["module"] or module.layer_name or module.label, part.suffix, m["role"], m["prefix"]
    return None


def _collect(spec: FamilySpec, keys: Iterable[str]) -> dict[str, _Match]:
    by_prefix: dict[str, _Match] = {}
    for key in keys:
        hit = _match_key(spec, key)
        if hit is None:
            continue
        module, mname, suffix, role, prefix = hit
        match = by_prefix.setdefault(prefix, _Match(spec, prefix))
        entry = match.modules.setdefault(mname, (module, {}))
        if entry[0] is not module:
            # e.g. "3.weight" (a Linear) and "3.pre_norm.weight" (a res block) at one index
            match.conflicts.add(mname)
        entry[1].setdefault(suffix, {})[role] = key
        match.keys.add(key)
    return by_prefix


def _complete(match: _Match) -> bool:
    """All required modules, parts and roles present; nothing inconsistent."""
    spec = match.family
    if match.conflicts:
        return False
    present = set()
    for module, parts in match.modules.values():
        for part in module.parts:
            roles = parts.get(part.suffix)
            if roles is None or any(r not in roles for r in part.roles):
                return False
        present.add(module.label)
    if any(m.required and m.label not in present for m in spec.modules):
        return False
    # e.g. LLaVA-NeXT needs a res block or an image_newline to differ from plain LLaVA
    return not spec.requires_any or bool(present.intersection(spec.requires_any))


def detect_family(keys: Iterable[str], path: str = "<keys>") -> tuple[FamilySpec, str]:
    """The family whose patterns account for the projector keys, and its captured prefix.

    Among complete matches (every required module and role present) the one whose key set
    is not strictly contained in another's wins (so HF InternVL's ``layer_norm`` +
    ``linear_{1,2}`` beats HF Llava's ``linear_{1,2}``, and LLaVA-NeXT with an
    ``image_newline`` beats plain LLaVA). Two disjoint winners are mixed families.
    """
    best = _detect(list(keys), path)
    return best.family, best.prefix


def _detect(keys: list[str], path: str) -> _Match:
    candidates: list[_Match] = []
    for spec in FAMILIES:
        for match in _collect(spec, keys).values():
            if _complete(match):
                candidates.append(match)
    if not candidates:
        raise UnknownLayoutError(path, keys, all_patterns())
    winners = [c for c in candidates if not any(c.keys < o.keys for o in candidates)]
    # identical key sets can only come from two rows describing the same keys; the first
    # row (table order) is the more specific by construction
    unique: list[_Match] = []
    for w in winners:
        if not any(u.keys == w.keys for u in unique):
            unique.append(w)
    if len(unique) > 1:
        described = "; ".join(
            f"{u.family.pretty} under prefix '{u.prefix}' ({len(u.keys)} tensors, e.g. {min(u.keys)})"
            for u in unique
        )
        raise CheckpointError(
            path,
            f"holds more than one projector ({described}); keep one projector per checkpoint "
            "or pass the file of the projector you mean",
        )
    return unique[0]


# --------------------------------------------------------------------------- building
def projector_keys(keys: Iterable[str], path: str = "<keys>") -> tuple[FamilySpec, str, list[str]]:
    """Family, prefix and the original keys of the projector among ``keys``."""
    match = _detect(list(keys), path)
    return match.family, match.prefix, sorted(match.keys)




def layout(keys: Iterable[str], shapes: Mapping[str, tuple[int, ...]], path: str = "<keys>") -> dict:
    """Structure of the projector among ``keys`` without tensors (used by ``inspect``).

    Returns ``{"family": spec, "prefix": str, "variant": str, "layers": [(name, kind,
    {role: key})], "ops": tuple}``. ``shapes`` maps keys to shapes; they are checked against
    the layer kinds (2-D for linear, 1-D for norms and vectors).
    """
    match = _detect(list(keys), path)
    spec = match.family

    def order(name: str) -> tuple[int, int, str]:
        module = match.modules[name][0]
        if spec.order == "indexed" and not module.bare:
            return (0, int(name), name)
        return (1 if module.bare else 0, spec.modules.index(module), name)

    names = sorted(match.modules, key=order)
    layers: list[tuple[str, LayerKind, dict[str, str]]] = []
    ops: list[str] = []
    counts: dict[str, int] = {}
    prev_index: int | None = None
    for mname in names:
        module, parts = match.modules[mname]
        counts[module.label] = counts.get(module.label, 0) + 1
        for part in module.parts:
            lname = mname if module.bare or not part.suffix else f"{mname}.{part.suffix}"
            roles = parts[part.suffix]
            ordered = {r: roles[r] for r in (*part.roles, *part.optional_roles) if r in roles}
            for role, key in ordered.items():
                shape = tuple(shapes.get(key, ()))
                want = 2 if (part.kind == "linear" and role == "weight") else 1
                if len(shape) != want:
                    raise CheckpointError(
                        path,
                        f"tensor '{key}' has shape {list(shape)} but a {part.kind} {role} of the "
                        f"{spec.pretty} layout must be {want}-D",
                    )
            layers.append((lname, part.kind, ordered))
        if module.bare:
            continue
        if spec.order == "indexed":
            idx = int(mname)
            if prev_index is None and idx != 0:
                raise CheckpointError(path, f"{spec.pretty} projector starts at module {idx}, expected 0")
            if prev_index is not None:
                ops.extend([spec.gap_op] * (idx - prev_index - 1))
            prev_index = idx
        ops.extend(op.replace("{m}", mname) for op in module.ops)
    if spec.merge_from is not None:
        lin, norm = spec.merge_from
        lin_in = shapes[next(k for n, _, ks in layers if n == lin for r, k in ks.items() if r == "weight")][1]
        norm_dim = shapes[next(k for n, _, ks in layers if n == norm for r, k in ks.items() if r == "weight")][0]
        if norm_dim <= 0 or lin_in % norm_dim:
            raise CheckpointError(
                path, f"'{lin}' takes {lin_in} inputs, not a multiple of the {norm_dim}-wide '{norm}'"
            )
        ops = [op.replace("{merge}", str(lin_in // norm_dim)) for op in ops]
    variant = ""
    for needs, template in spec.variants:
        if not needs or counts.get(needs):
            variant = template.format(**{m.label: counts.get(m.label, 0) for m in spec.modules})
            break
    _check_chain(layers, ops, shapes, path, spec)
    return {"family": spec, "prefix": match.prefix, "variant": variant, "layers": layers, "ops": tuple(ops)}


def _check_chain(layers, ops, shapes, path: str, spec: FamilySpec) -> None:
    """Consecutive layers of the forward must agree on widths (catches swapped tensors)."""
    by_name = {n: (k, ks) for n, k, ks in layers}
    width: int | None = None
    for op in map(parse_op, ops):
        if op.head == "merge_tokens":
            width = width * int(op.arg) if width is not None else None
            continue
        if not op.applies_layer:
            continue
        kind, ks = by_name[op.layer]
        wshape = shapes[ks["weight"]]
        d_in = wshape[1] if kind == "linear" else wshape[0]
        if width is not None and d_in != width:
            raise CheckpointError(
                path,
                f"{spec.pretty} layer '{ks['weight']}' expects {d_in} inputs but the previous "
                f"layer produces {width}",
            )
        width = wshape[0]
        if "bias" in ks and tuple(shapes[ks["bias"]]) != (wshape[0],):
            raise CheckpointError(
                path, f"bias '{ks['bias']}' has shape {list(shapes[ks['bias']])}, expected [{wshape[0]}]"
            )


def build_projector(
    tensors: Mapping[str, torch.Tensor],
    *,
    path: str = "<tensors>",
    source: str = "",
    files: tuple[str, ...] = (),
    sha256: str = "",
) -> Projector:
    """The canonical :class:`Projector` from original key -> tensor (extra keys ignored)."""
    lay = layout(tensors.keys(), {k: tuple(v.shape) for k, v in tensors.items()}, path)
    spec: FamilySpec = lay["family"]
    layers = [
        Layer(name, kind, {role: tensors[key] for role, key in keys.items()}, dict(keys))
        for name, kind, keys in lay["layers"]
    ]
    family = f"{spec.name}-{lay['variant']}" if lay["variant"] else spec.name
    metadata = {"family_spec": spec.name, "prefix": lay["prefix"]}
    if spec.container_key:
        metadata["container_key"] = spec.container_key
    return Projector(
        family=family,
        layers=layers,
        ops=lay["ops"],
        source=source,
        sha256=sha256,
        files=files,
        metadata=metadata,
    )


def pretty_family(projector_or_family: Projector | str) -> str:
    """Human name with the variant, e.g. ``LLaVA (mlp2x_gelu)``."""
    fam = projector_or_family.family if isinstance(projector_or_family, Projector) else projector_or_family
    for spec in sorted(FAMILIES, key=lambda f: -len(f.name)):
        if fam == spec.name:
            return spec.pretty
        if fam.startswith(spec.name + "-"):
            return f"{spec.pretty} ({fam[len(spec.name) + 1:]})"
    return fam
