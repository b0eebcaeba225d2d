"""Tiny random Llava / Qwen2-VL checkpoints on disk and image folders for the calibration
tests (built from configs, nothing downloaded), plus the reference: the projector's input
captured inside the full transformers model by a forward pre-hook."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from tests.evaluation.llava_tiny import IMAGE_TOKEN, tiny_image_processor, tiny_llava

QWEN_IMAGE_TOKEN = 120


def save_llava(folder: Path, layout: str = "saved") -> Path:
    """A tiny Llava folder (config, image processor, weights). ``layout``: ``saved`` (what
    this transformers writes: ``vision_tower.*``), ``old`` (Hub llava-hf files:
    ``vision_tower.vision_model.*``, ``language_model.model.*``) or ``new``
    (``model.vision_tower.*``, the in-memory names of transformers 5)."""
    from safetensors.torch import load_file, save_file

    model = tiny_llava()
    model.save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    if layout != "saved":
        path = folder / "model.safetensors"
        state = load_file(str(path))
        if layout == "old":
            state = {("vision_tower.vision_model." + k[len("vision_tower."):]) if k.startswith("vision_tower.") else k: v
                     for k, v in state.items()}
        else:
            state = {_new_key(k): v for k, v in state.items()}
        save_file(state, str(path), metadata={"format": "pt"})
    return folder


def _new_key(key: str) -> str:
    if key.startswith("language_model.lm_head."):
        return key[len("language_model."):]
    if key.startswith("language_model.model."):
        return "model.language_model." + key[len("language_model.model."):]
    return "model." + key


def split_shards(folder: Path, is_vision) -> tuple[Path, Path]:  # type: ignore[no-untyped-def]
    """Rewrite ``model.safetensors`` as two shards (vision tower / everything else) with an
    index; returns (vision shard, other shard)."""
    from safetensors.torch import load_file, save_file

    state = load_file(str(folder / "model.safetensors"))
    (folder / "model.safetensors").unlink()
    a, b = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file({k: v for k, v in state.items() if is_vision(k)}, str(folder / a), metadata={"format": "pt"})
    save_file({k: v for k, v in state.items() if not is_vision(k)}, str(folder / b), metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {k: a if is_vision(k) else b for k in state}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder / a, folder / b


# the language model of both tiny Qwen VL models (never read by calibration: only its shape matters)
QWEN_TEXT = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
             "num_key_value_heads": 2, "vocab_size": 128, "rope_scaling": {"type": "mrope", "mrope_section": [4, 2, 2]}}


def tiny_qwen2_vl(seed: int = 0):  # type: ignore[no-untyped-def]
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    cfg = Qwen2VLConfig(
        vision_config={"depth": 2, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "patch_size": 2,
                           "spatial_merge_size": 2, "temporal_patch_size": 2, "mlp_ratio": 2},
        text_config=QWEN_TEXT,
        image_token_id=QWEN_IMAGE_TOKEN, video_token_id=121, vision_start_token_id=122)
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()


def tiny_qwen2_5_vl(seed: int = 0):  # type: ignore[no-untyped-def]
    """Qwen2.5-VL: window attention reorders the patches before the merger (RMSNorm ln_q)."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    cfg = Qwen2_5_VLConfig(
        vision_config={"depth": 2, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "patch_size": 2,
                       "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 8,
                       "out_hidden_size": 32, "fullatt_block_indexes": [1]},
        text_config=QWEN_TEXT,
        image_token_id=QWEN_IMAGE_TOKEN, video_token_id=121, vision_start_token_id=122)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def tiny_qwen_processor():  # type: ignore[no-untyped-def]
    from transformers import Qwen2VLImageProcessor

    return Qwen2VLImageProcessor(patch_size=2, merge_size=2, temporal_patch_size=2,
                                 size={"shortest_edge": 64, "longest_edge": 256})


def save_qwen(folder: Path, version: str = "2"):  # type: ignore[no-untyped-def]
    model = tiny_qwen2_vl() if version == "2" else tiny_qwen2_5_vl()
    model.save_pretrained(folder)
    tiny_qwen_processor().save_pretrained(folder)
    return model


def write_images(folder: Path, sizes: list[tuple[int, int]], seed: int = 0, prefix: str = "im") -> list[Path]:
    """Random RGB PNGs of the given (height, width) sizes, named ``{prefix}{i}.png``."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    out = []
    for i, (h, w) in enumerate(sizes):
        p = folder / f"{prefix}{i}.png"
        Image.fromarray((rng.random((h, w, 3)) * 255).astype("uint8")).save(p)
        out.append(p)
    return out


def pil(paths: list[Path]) -> list:  # type: ignore[type-arg]
    from PIL import Image

    out = []
    for p in paths:
        with Image.open(p) as im:
            out.append(im.convert("RGB"))
    return out


@torch.no_grad()
def llava_projector_input(model, paths: list[Path]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``multi_modal_projector``'s input in a full forward of the Llava model, all images,
    as [images * tokens, d]."""
    captured: list[torch.Tensor] = []
    hook = model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    try:
        px = tiny_image_processor()(images=pil(paths), return_tensors="pt")["pixel_values"]
        ids = torch.tensor([[1] + [IMAGE_TOKEN] * 16 + [5]] * len(paths))
        model(input_ids=ids, pixel_values=px)
    finally:
        hook.remove()
    return captured[0].reshape(-1, captured[0].shape[-1])


@torch.no_grad()
def qwen_merger_input(model, paths: list[Path]) -> torch.Tensor:  # type: ignore[no-untyped-def]
    """``visual.merger``'s input in a full forward of the Qwen2-VL model: [patches, embed_dim]."""
    captured: list[torch.Tensor] = []
    hook = model.model.visual.merger.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    try:
        batch = tiny_qwen_processor()(images=pil(paths), return_tensors="pt")
        n = int((batch["image_grid_thw"].prod(-1) // 4).sum())
        ids = torch.tensor([[1] + [QWEN_IMAGE_TOKEN] * n + [5]])
        pos = torch.arange(ids.shape[1])[None, None].expand(3, 1, -1)  # text-only positions: the
        # vision path does not depend on them
        model(input_ids=ids, position_ids=pos, pixel_values=batch["pixel_values"],
              image_grid_thw=batch["image_grid_thw"])
    finally:
        hook.remove()
    return captured[0]
