"""Non-projector tensors of an adapter file: found, carried through a merge, written back.

An *adapter file* holds a projector and maybe a few more trained tensors, which the tool
that reads it back expects in the same file:

- LLaVA stage 1 with ``--mm_use_im_start_end`` saves ``model.embed_tokens.weight`` (the
  whole ``[vocab + new tokens, hidden]`` input embedding) in ``mm_projector.bin``, and
  ``initialize_vision_tokenizer`` (``llava/model/llava_arch.py``) reads its last
  ``num_new_tokens`` rows from that file (a KeyError if it is missing);
- LLaVA-NeXT's trainer saves ``vision_resampler.*`` next to ``mm_projector.*``
  (``keys_to_match = ["mm_projector", "vision_resampler"]``) and ``initialize_vision_modules``
  loads them into the resampler;
- anything else a training script put beside the projector.

A file is an adapter when its other tensors do not look like a model (no transformer
blocks, language model, vision tower or LM head outside the known adapter modules, and at
most :data:`MAX_EXTRAS` of them); in a full model file the rest *is* the model and is not
carried (writing a full model is the full-model export's job). Sharded checkpoints are
full models.

A merge carries each extra key into the output: where the experts hold identical values
it is passed through; where they differ (the experts trained it) the rows that differ
(first dimension; elements of a 1-D tensor) are replaced by the plain mean over the experts
in float32, cast back to the tensor's dtype, and equal rows are kept bit for bit. For
``embed_tokens`` this averages the rows of the tokens the experts trained (LLaVA's new
``<im_start>``/``<im_end>`` rows) and keeps the vocabulary that stayed put.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..errors import IncompatibleExperts

MAX_EXTRAS = 64
# modules an adapter file may hold besides the projector (LLaVA / LLaVA-NeXT trainers)
ADAPTER_MODULES = re.compile(r"(^|\.)(vision_resampler|embed_tokens|embed_in)(\.|$)")
# what a full model holds and an adapter does not
MODEL_PARTS = re.compile(
    r"(^|\.)(layers|layer|h|blocks|block|resblocks)\.\d+\."
    r"|(^|\.)(lm_head|vision_tower|vision_model|language_model|text_model|visual\.blocks|encoder|decoder)\."
)


def adapter_extras(all_keys: Iterable[str], projector_keys: Iterable[str]) -> list[str]:
    """The keys of ``all_keys`` (one file's tensors) to carry besides ``projector_keys``:
    every other key when the file is an adapter, none when it is a full model."""
    proj = set(projector_keys)
    rest = sorted(k for k in all_keys if k not in proj)
    if len(rest) > MAX_EXTRAS:
        return []
    if any(MODEL_PARTS.search(k) and not ADAPTER_MODULES.search(k) for k in rest):
        return []
    return rest


def _sig(t: torch.Tensor) -> tuple[tuple[int, ...], torch.dtype]:
    return tuple(t.shape), t.dtype


def check_extras(experts: Sequence[Any], names: Sequence[str]) -> list[str]:
    """Raise :class:`IncompatibleExperts` when an extra key has different shapes or dtypes
    across the experts that hold it; return warnings for keys only some experts hold."""
    holders: dict[str, list[int]] = {}
    for i, p in enumerate(experts):
        for key in getattr(p, "extras", {}):
            holders.setdefault(key, []).append(i)
    warnings = []
    for key, idx in holders.items():
        ref = experts[idx[0]].extras[key]
        for i in idx[1:]:
            t = experts[i].extras[key]
            if _sig(t) != _sig(ref):
                raise IncompatibleExperts(
                    names[i], key, tuple(t.shape), names[idx[0]], tuple(ref.shape),
                    f"a non-projector tensor of the adapter files; dtypes {_dtype(t)} vs {_dtype(ref)}",
                )
        if len(idx) < len(experts):
            have = ", ".join(names[i] for i in idx)
            warnings.append(
                f"non-projector tensor '{key}' is in {len(idx)} of {len(experts)} experts ({have}); "
                "the output carries the merge of those"
            )
    return warnings


def merge_extras(experts: Sequence[Any], names: Sequence[str]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The extras of the merged output and one report entry per key (see module docstring).
    Tensors are read on the CPU; the experts' own tensors are never modified."""
    holders: dict[str, list[torch.Tensor]] = {}
    for p in experts:
        for key, t in getattr(p, "extras", {}).items():
            holders.setdefault(key, []).append(t)
    out: dict[str, torch.Tensor] = {}
    report: list[dict] = []
    for key in sorted(holders):
        ts = [t.detach().to("cpu") for t in holders[key]]
        merged, rows, differ = merge_rows(ts)
        out[key] = merged
        entry: dict[str, Any] = {
            "key": key, "shape": list(merged.shape), "dtype": _dtype(merged), "experts": len(ts),
        }
        if differ == 0:
            entry["action"] = "passed through (identical in the experts)"
        elif not merged.is_floating_point():
            entry["action"] = f"taken from the first expert ({differ} of {rows} rows differ; not floating-point)"
        else:
            entry["action"] = f"merged: {differ} of {rows} rows differ and are averaged, the rest kept"
        entry["rows_differing"] = differ
        report.append(entry)
    return out, report


def merge_rows(ts: Sequence[torch.Tensor]) -> tuple[torch.Tensor, int, int]:
    """(merged tensor, number of rows, number of rows that differ): rows equal in every
    tensor are kept bit for bit, the others become the float32 mean cast back."""
    first = ts[0]
    rows2d = [t.reshape(t.shape[0], -1) if t.dim() > 0 else t.reshape(1, 1) for t in ts]
    n_rows = rows2d[0].shape[0]
    differ = torch.zeros(n_rows, dtype=torch.bool)
    for r in rows2d[1:]:
        if r.shape[1]:  # NaN != NaN: a NaN row counts as differing and its mean stays NaN
            differ |= (r != rows2d[0]).any(dim=1)
    count = int(differ.sum())
    if count == 0 or len(ts) == 1:
        return first.clone().contiguous(), n_rows, count
    if not first.is_floating_point():
        return first.clone().contiguous(), n_rows, count
    out = rows2d[0].clone()
    idx = differ.nonzero().squeeze(1)
    mean = torch.stack([r.index_select(0, idx).float() for r in rows2d]).mean(0)
    out[idx] = mean.to(first.dtype)
    return out.reshape(first.shape).contiguous(), n_rows, count


def describe_extras(extras: Mapping[str, torch.Tensor]) -> list[str]:
    """One line per extra tensor, for the CLI, the app and the model card."""
    return [f"{k} {list(t.shape)} {_dtype(t)}" for k, t in sorted(extras.items())]


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")
