"""Vision encoders that turn images into exactly what a projector consumes.

A :class:`FeatureEncoder` maps images to one ``[tokens, in_features]`` tensor per image
and describes itself for the calibration file's provenance. :func:`load_encoder` builds
one from a transformers checkpoint (local folder or Hub id) **without the language
model**: only the vision tower is built (from ``config.vision_config``) and only its
tensors are read from the (possibly sharded) safetensors files, by key prefix, with
``safe_open``. Shards that hold no vision tensor are never opened.

What the features are, per family (read from transformers' ``modeling_*.py``):

- **Llava** (``model_type: llava``): the tower's hidden states at
  ``vision_feature_layer`` (a list of layers is concatenated on the feature axis), the
  CLS token dropped for ``vision_feature_select_strategy: default`` and kept for
  ``full``: the input of ``multi_modal_projector`` in ``LlavaModel.get_image_features``.
- **LlavaNext** (``llava_next``): the same features of the *base image* only (the whole
  image resized to the tower's input, the first of the anyres patches). The anyres crops
  are further projector inputs of the same kind (same tower, same resolution); they are
  left out because they multiply the encoder's cost by up to five for tokens of the same
  distribution.
- **Qwen2-VL / Qwen2.5-VL** (``qwen2_vl``, ``qwen2_5_vl``): the input of ``visual.merger``
  (the vision blocks' output, ``[patches, embed_dim]`` before ``ln_q``), captured by a
  forward pre-hook, with the image grid from the image processor. The merger joins every
  ``spatial_merge_size**2`` consecutive rows into one token, so sampling keeps whole
  groups (:attr:`FeatureEncoder.token_group`).
- **CLIP / SigLIP** vision models (``clip``, ``clip_vision_model``, ``siglip``,
  ``siglip_vision_model``): hidden states at ``feature_layer`` (default -2 with the CLS
  token dropped for CLIP, as LLaVA-1.5 uses ``openai/clip-vit-large-patch14-336``; -1,
  all tokens, for SigLIP, which has no CLS token, as LLaVA-OneVision).

Old and new transformers checkpoint layouts are both read: tower keys under
``vision_tower.`` / ``model.vision_tower.`` (Llava), ``visual.`` / ``model.visual.``
(Qwen), with or without the CLIP/SigLIP ``vision_model.`` level. Only safetensors
weights are read (a pickle would have to be loaded whole, language model included).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch

from ..errors import CheckpointError, PivotMergeError

LLAVA_TYPES = ("llava", "llava_next")
QWEN_TYPES = ("qwen2_vl", "qwen2_5_vl")
STANDALONE_TYPES = ("clip", "clip_vision_model", "siglip", "siglip_vision_model")
SELECT_STRATEGIES = ("default", "full")

_PREFIXES: dict[str, tuple[str, ...]] = {
    "llava": ("model.vision_tower.", "vision_tower."),
    "llava_next": ("model.vision_tower.", "vision_tower."),
    "qwen2_vl": ("model.visual.", "visual."),
    "qwen2_5_vl": ("model.visual.", "visual."),
    "clip": ("vision_model.",),
    "siglip": ("vision_model.",),
    "clip_vision_model": ("",),
    "siglip_vision_model": ("",),
}


@runtime_checkable
class FeatureEncoder(Protocol):
    """Images -> projector inputs. ``encode`` returns one ``[tokens, in_features]`` float
    tensor per image (token counts may differ between images, as Qwen2-VL's do)."""

    in_features: int
    #: rows the projector consumes together (Qwen2-VL merger: spatial_merge_size**2)
    token_group: int

    def encode(self, images: Sequence[Any]) -> list[torch.Tensor]: ...

    def provenance(self) -> dict[str, Any]:
        """``{"encoder": {spec, revision, sha256, kind}, "features": {layer, select,
        description}}`` for the calibration file."""
        ...


class EncoderError(CheckpointError):
    """A vision encoder that cannot be loaded (names the checkpoint and the problem)."""


# --------------------------------------------------------------------------- files
class _Weights:
    """The safetensors files of a checkpoint folder: key -> (file, header entry), read from
    the shard index when there is one (so unrelated shards are never opened)."""

    def __init__(self, folder: Path, spec: str) -> None:
        from ..io.discovery import read_index

        self.folder, self.spec = folder, spec
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            self.weight_map: dict[str, str] | None = read_index(index)
        elif single.is_file():
            self.weight_map = None
        else:
            others = sorted(p.name for p in folder.glob("*.safetensors"))
            if len(others) == 1:
                single = folder / others[0]
                self.weight_map = None
            elif (folder / "pytorch_model.bin").exists() or (folder / "pytorch_model.bin.index.json").exists():
                raise EncoderError(spec, "only pickle weights (pytorch_model.bin) found; calibration reads "
                                         "the vision tower from safetensors only (a pickle is loaded whole, "
                                         "language model included): convert it to safetensors")
            else:
                raise EncoderError(spec, "no model.safetensors or model.safetensors.index.json in this folder")
        self.single = single
        self._headers: dict[str, Any] = {}

    @property
    def keys(self) -> list[str]:
        if self.weight_map is not None:
            return list(self.weight_map)
        return list(self.header(self.single.name).tensors)

    def file_of(self, key: str) -> str:
        return self.weight_map[key] if self.weight_map is not None else self.single.name

    def header(self, name: str) -> Any:
        from ..io.safetensors_header import read_header

        if name not in self._headers:
            p = self.folder / name
            if not p.is_file():
                raise EncoderError(str(p), "missing: the shard index lists this shard but the file does not exist")
            self._headers[name] = read_header(p)
        return self._headers[name]

    def read(self, keys: Sequence[str]) -> tuple[dict[str, torch.Tensor], str]:
        """The tensors of ``keys`` only, and their :func:`tensor_digest`-style sha256."""
        import safetensors

        from ..io.hashing import raw_digest

        by_file: dict[str, list[str]] = {}
        space: dict[str, tuple[str, Any]] = {}
        for k in keys:
            name = self.file_of(k)
            entry = self.header(name).tensors.get(k)
            if entry is None:
                raise EncoderError(str(self.folder / name), f"the shard index says it holds '{k}' but it does not")
            by_file.setdefault(name, []).append(k)
            space[k] = (name, entry)
        out: dict[str, torch.Tensor] = {}
        for name, ks in by_file.items():
            try:
                with safetensors.safe_open(str(self.folder / name), framework="pt") as f:
                    for k in ks:
                        out[k] = f.get_tensor(k)
            except (OSError, ValueError, RuntimeError, safetensors.SafetensorError) as e:
                raise EncoderError(str(self.folder / name), f"cannot read vision tower tensors: {e}") from None
        return out, raw_digest(self.folder, space, keys)


def _resolve(spec: str, revision: str | None, progress: Any = None) -> tuple[Path, str | None]:
    """(local folder, revision) of a folder or Hub id; a Hub id fetches the config, image
    processor config and only the shards holding vision tensors."""
    p = Path(spec).expanduser()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise EncoderError(spec, "no config.json in this folder (expected a transformers model folder)")
        return p, revision
    if p.exists():
        raise EncoderError(spec, "expected a transformers model folder (with config.json) or a Hub id")
    from ..io.discovery import parse_hub_id

    parsed = parse_hub_id(spec)
    if parsed is None or parsed[2] is not None:
        raise EncoderError(spec, "no such folder, and not a Hub id (org/name[@revision])")
    repo, rev, _ = parsed
    rev = revision or rev
    from ..io.hub import _download, _list_files

    names = set(_list_files(repo, rev, spec))
    config = _download(repo, "config.json", rev, spec, progress, 0.0, 0.02)
    folder = config.parent
    for extra in ("preprocessor_config.json", "processor_config.json"):
        if extra in names:
            _download(repo, extra, rev, spec, progress, 0.02, 0.03)
    cfg = json.loads(config.read_text(encoding="utf-8"))
    prefixes = _PREFIXES.get(str(cfg.get("model_type")), ("",))
    if "model.safetensors.index.json" in names:
        from ..io.discovery import read_index

        wm = read_index(_download(repo, "model.safetensors.index.json", rev, spec, progress, 0.03, 0.05))
        shards = sorted({f for k, f in wm.items() if any(k.startswith(pre) for pre in prefixes)})
    elif "model.safetensors" in names:
        shards = ["model.safetensors"]
    else:
        raise EncoderError(spec, "the repository has no safetensors weights (model.safetensors[.index.json])")
    for i, shard in enumerate(shards):
        _download(repo, shard, rev, spec, progress, 0.05 + 0.95 * i / len(shards), 0.05 + 0.95 * (i + 1) / len(shards))
    return folder, folder.name if rev is None or len(rev) != 40 else rev


# --------------------------------------------------------------------------- key mapping
def _strip(key: str, inner: str = "vision_model.") -> str:
    return key.removeprefix(inner)


def tower_state(module: torch.nn.Module, weights: _Weights, prefixes: Sequence[str],
                spec: str) -> tuple[dict[str, torch.Tensor], str, str]:
    """Read the tensors of ``module`` (a vision tower) from ``weights``: (state dict,
    sha256 of the tensors read, prefix found). Handles the old/new key layouts."""
    available = set(weights.keys)
    wanted = list(module.state_dict())
    for pre in prefixes:
        mapping: dict[str, str] = {}
        for k in wanted:
            for cand in (pre + k, pre + "vision_model." + _strip(k), pre + _strip(k)):
                if cand in available:
                    mapping[k] = cand
                    break
        if len(mapping) > len(wanted) // 2:
            missing = [k for k in wanted if k not in mapping and not _optional(module, k)]
            if missing:
                raise EncoderError(spec, f"the vision tower's tensors {', '.join(missing[:5])} are not in the "
                                         f"checkpoint (looked under '{pre}')")
            tensors, digest = weights.read(sorted(mapping.values()))
            return {k: tensors[v] for k, v in mapping.items()}, digest, pre
    raise EncoderError(spec, f"no vision tower tensors found under {', '.join(repr(p) for p in prefixes)} "
                             f"({len(available)} tensors in the checkpoint)")


def _optional(module: torch.nn.Module, key: str) -> bool:
    """Buffers recomputed at construction (position ids) need not be in a checkpoint."""
    return key in dict(module.named_buffers())


def _build(cls_or_fn: Any, config: Any) -> torch.nn.Module:
    try:
        from transformers import initialization as init

        ctx = init.no_init_weights()
    except (ImportError, AttributeError):  # older transformers
        ctx = contextlib.nullcontext()
    with ctx:
        return cls_or_fn(config)


# --------------------------------------------------------------------------- encoder
class HFVisionEncoder:
    """A transformers vision tower (and image processor) as a :class:`FeatureEncoder`."""

    def __init__(self, tower: torch.nn.Module, processor: Any, *, kind: str, spec: str,
                 revision: str | None, sha256: str, layer: Any, select: str, in_features: int,
                 token_group: int = 1, device: str | torch.device | None = None,
                 dtype: torch.dtype = torch.float32) -> None:
        from ..devices import resolve_device

        self.tower = tower.eval()
        for p in self.tower.parameters():
            p.requires_grad_(False)
        self.processor = processor
        self.kind, self.spec, self.revision, self.sha256 = kind, spec, revision, sha256
        self.layer, self.select = layer, select
        self.in_features, self.token_group = int(in_features), int(token_group)
        self.dtype = dtype
        self.device = resolve_device(device)
        self.tower.to(device=self.device, dtype=dtype)

    def to(self, device: str | torch.device) -> HFVisionEncoder:
        from ..devices import resolve_device

        self.device = resolve_device(device)
        self.tower.to(self.device)
        return self

    def provenance(self) -> dict[str, Any]:
        if self.kind in QWEN_TYPES:
            desc = "input of visual.merger (vision blocks' output before ln_q), one row per patch"
        else:
            desc = (f"vision tower hidden states at layer {self.layer}, "
                    f"{'CLS dropped' if self.select == 'default' else 'all tokens'}"
                    + (", base image of the anyres grid" if self.kind == "llava_next" else ""))
        return {"encoder": {"spec": self.spec, "revision": self.revision, "sha256": self.sha256,
                            "kind": self.kind},
                "features": {"layer": self.layer, "select": self.select, "description": desc}}

    @torch.no_grad()
    def encode(self, images: Sequence[Any]) -> list[torch.Tensor]:
        images = list(images)
        if not images:
            return []
        batch = self.processor(images=images, return_tensors="pt")
        pixels = batch["pixel_values"]
        if self.kind in QWEN_TYPES:
            return self._encode_qwen(pixels, batch["image_grid_thw"])
        if pixels.dim() == 5:  # LlavaNext: [N, patches, 3, H, W]; patch 0 is the base image
            pixels = pixels[:, 0]
        hidden = self.tower(pixels.to(self.device, self.dtype), output_hidden_states=True).hidden_states
        layers = self.layer if isinstance(self.layer, (list, tuple)) else [self.layer]
        feats = [hidden[int(i)] for i in layers]
        if self.select == "default":
            feats = [f[:, 1:] for f in feats]
        out = torch.cat(feats, dim=-1).float().cpu()
        return list(out.unbind(0))

    def _encode_qwen(self, pixels: torch.Tensor, grid: torch.Tensor) -> list[torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = self.tower.merger.register_forward_pre_hook(lambda _m, args: captured.append(args[0].detach()))
        try:
            self.tower(pixels.to(self.device, self.dtype), grid_thw=grid.to(self.device))
        finally:
            hook.remove()
        sizes = grid.prod(-1).tolist()
        return [t.float().cpu() for t in torch.split(captured[0], sizes)]


def _config(folder: Path, spec: str) -> Any:
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(str(folder))
    except ImportError as e:
        raise PivotMergeError("calibrating with a transformers model needs transformers: "
                              "pip install 'pivotmerge-gui[llava]'") from e
    except (OSError, ValueError, KeyError) as e:
        raise EncoderError(spec, f"cannot read its config.json: {str(e).splitlines()[0] if str(e) else e}") from None


def _processor(folder: Path, spec: str) -> Any:
    from transformers import AutoImageProcessor

    try:
        return AutoImageProcessor.from_pretrained(str(folder))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise EncoderError(spec, "cannot load its image processor (preprocessor_config.json): "
                                 f"{str(e).splitlines()[0] if str(e) else e}") from None


def _tower(model_type: str, config: Any) -> tuple[torch.nn.Module, Any]:
    """(vision tower module, its config) for a checkpoint's config."""
    from transformers import AutoModel

    if model_type in LLAVA_TYPES:
        return _build(AutoModel.from_config, config.vision_config), config.vision_config
    if model_type == "qwen2_vl":
        from transformers.models.qwen2_vl.modeling_qwen2_vl import (
            Qwen2VisionTransformerPretrainedModel as Q,
        )

        return _build(Q._from_config, config.vision_config), config.vision_config
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
            Qwen2_5_VisionTransformerPretrainedModel as Q,
        )

        return _build(Q._from_config, config.vision_config), config.vision_config
    if model_type in ("clip", "clip_vision_model"):
        from transformers import CLIPVisionModel

        vc = config.vision_config if model_type == "clip" else config
        return _build(CLIPVisionModel, vc), vc
    from transformers import SiglipVisionModel

    vc = config.vision_config if model_type == "siglip" else config
    return _build(SiglipVisionModel, vc), vc


def load_encoder(spec: str, *, device: str | torch.device | None = "auto", revision: str | None = None,
                 feature_layer: int | list[int] | None = None, select: str | None = None,
                 dtype: torch.dtype = torch.float32, progress: Any = None) -> HFVisionEncoder:
    """The vision encoder of a transformers checkpoint (see the module docstring).

    ``feature_layer`` / ``select`` override the checkpoint's choice (Llava) or the default
    of a standalone CLIP / SigLIP tower; they are refused for Qwen2-VL (its merger input is
    fixed)."""
    if select is not None and select not in SELECT_STRATEGIES:
        raise EncoderError(spec, f"feature selection must be one of {', '.join(SELECT_STRATEGIES)}, got {select!r}")
    folder, rev = _resolve(spec, revision, progress)
    config = _config(folder, spec)
    model_type = str(getattr(config, "model_type", ""))
    known = (*LLAVA_TYPES, *QWEN_TYPES, *STANDALONE_TYPES)
    if model_type not in known:
        raise EncoderError(spec, f"model type '{model_type}' is not supported for calibration "
                                 f"(supported: {', '.join(known)})")
    if model_type in QWEN_TYPES and (feature_layer is not None or select is not None):
        raise EncoderError(spec, "Qwen2-VL features are the merger's input; feature layer and selection "
                                 "cannot be changed")
    weights = _Weights(folder, spec)
    tower, vc = _tower(model_type, config)
    state, digest, _ = tower_state(tower, weights, _PREFIXES[model_type], spec)
    missing, unexpected = tower.load_state_dict(state, strict=False)
    bad = [k for k in missing if not _optional(tower, k)]
    if bad or unexpected:
        raise EncoderError(spec, f"vision tower tensors do not fit its config: missing {bad[:5]}, unexpected {unexpected[:5]}")
    processor = _processor(folder, spec)
    group = 1
    if model_type in QWEN_TYPES:
        layer, sel, width = "merger input", "full", int(vc.embed_dim if model_type == "qwen2_vl" else vc.hidden_size)
        group = int(vc.spatial_merge_size) ** 2
    else:
        if model_type in LLAVA_TYPES:
            layer = config.vision_feature_layer if feature_layer is None else feature_layer
            sel = config.vision_feature_select_strategy if select is None else select
        else:
            siglip = model_type.startswith("siglip")
            layer = feature_layer if feature_layer is not None else (-1 if siglip else -2)
            sel = select if select is not None else ("full" if siglip else "default")
        layer = list(layer) if isinstance(layer, (list, tuple)) else int(layer)
        n_layers = 1 if isinstance(layer, int) else len(layer)
        width = int(vc.hidden_size) * n_layers
    return HFVisionEncoder(tower, processor, kind=model_type, spec=spec, revision=rev, sha256=digest,
                           layer=layer, select=sel, in_features=width, token_group=group, device=device,
                           dtype=dtype)
