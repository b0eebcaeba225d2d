"""Synthetic checkpoints with the real key layout of every family, plus torch references.

Each :class:`Case` builds a reference ``nn.Module`` (transformers' own module where its
constructor is light, else the same ``nn`` layers the upstream code uses), the original
checkpoint dict with the real key prefix (plus unrelated tensors where the real file has
them) and the file it is saved as.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn


class SimpleResBlock(nn.Module):
    """LLaVA-NeXT ``llava/model/multimodal_projector/builder.py`` SimpleResBlock."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.pre_norm = nn.LayerNorm(channels)
        self.proj = nn.Sequential(nn.Linear(channels, channels), nn.GELU(), nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pre_norm(x)
        return x + self.proj(x)


def llava_mlp(d_in: int, d_out: int, depth: int, res: int = 0) -> nn.Sequential:
    """LLaVA's builder for ``mlp{depth}x_gelu`` / ``mlp{depth}x_res{res}x_gelu``."""
    mods: list[nn.Module] = [nn.Linear(d_in, d_out)]
    for _ in range(1, depth):
        mods += [nn.GELU(), nn.Linear(d_out, d_out)]
    mods += [SimpleResBlock(d_out) for _ in range(res)]
    return nn.Sequential(*mods)


class HFProjector(nn.Module):
    """transformers' Llava / InternVL projector layout (layer_norm optional)."""

    def __init__(self, d_in: int, d_out: int, layer_norm: bool = False) -> None:
        super().__init__()
        if layer_norm:
            self.layer_norm = nn.LayerNorm(d_in)
        self.linear_1 = nn.Linear(d_in, d_out)
        self.act = nn.GELU()
        self.linear_2 = nn.Linear(d_out, d_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "layer_norm"):
            x = self.layer_norm(x)
        return self.linear_2(self.act(self.linear_1(x)))


def _randomize(module: nn.Module, seed: int) -> nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            # norm scales around 1 like trained ones; everything else small and random
            offset = 1.0 if p.dim() == 1 and name.endswith("weight") else 0.0
            p.copy_(torch.randn(p.shape, generator=g) * 0.3 + offset)
    return module


@dataclass
class Case:
    """One family's synthetic checkpoint."""

    id: str
    family: str
    filename: str
    make_module: Callable[[], nn.Module]
    prefix: str  # original key prefix of the projector module's state dict
    d_in: int
    tokens: int = 8
    container: str | None = None
    extra: dict[str, str] | None = None  # extra bare keys -> kind ("vector" params outside the module)
    other_tensors: tuple[str, ...] = ()  # unrelated tensors in the same file

    def build(self, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor]]:
        torch.manual_seed(seed)
        module = _randomize(self.make_module(), seed).eval()
        state = {self.prefix + k: v.detach().clone().to(dtype) for k, v in module.state_dict().items()}
        g = torch.Generator().manual_seed(seed + 100)
        for key in self.extra or {}:
            state[key] = torch.randn(module_width(module), generator=g).to(dtype)
        for key in self.other_tensors:
            state[key] = torch.randn(4, 4, generator=g).to(dtype)
        return module, state

    def save(self, folder: Path, seed: int = 0, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, dict[str, torch.Tensor], Path]:
        module, state = self.build(seed, dtype)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / self.filename
        if self.filename.endswith(".safetensors"):
            save_file(state, str(path), metadata={"format": "pt"})
        elif self.container:
            torch.save({self.container: state, "optimizer": {"lr": 1e-3}, "epoch": 3}, path)
        else:
            torch.save(state, path)
        return module, state, path

    def projector_keys(self, state: dict[str, torch.Tensor]) -> set[str]:
        return {k for k in state if k not in self.other_tensors}


def module_width(module: nn.Module) -> int:
    last = [m for m in module.modules() if isinstance(m, nn.Linear)][-1]
    return last.out_features


def _qwen2() -> nn.Module:
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    return PatchMerger(dim=24, context_dim=8, spatial_merge_size=2)


def _qwen25() -> nn.Module:
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLPatchMerger

    return Qwen2_5_VLPatchMerger(dim=24, context_dim=8, spatial_merge_size=2)


class _Idefics(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(64, 24, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


def _internvl() -> nn.Module:
    # InternVL modeling_internvl_chat.py: mlp1 = Sequential(LayerNorm, Linear, GELU, Linear)
    return nn.Sequential(nn.LayerNorm(32), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 24))


LM = ("language_model.model.embed_tokens.weight", "language_model.lm_head.weight")

CASES: list[Case] = [
    Case("llava-linear", "llava-linear", "mm_projector.bin", lambda: nn.Linear(16, 24), "model.mm_projector.", 16),
    Case("llava-mlp2x", "llava-mlp2x_gelu", "mm_projector.bin", lambda: llava_mlp(16, 24, 2), "model.mm_projector.", 16),
    Case("llava-mlp3x", "llava-mlp3x_gelu", "mm_projector.bin", lambda: llava_mlp(16, 24, 3), "model.mm_projector.", 16),
    Case(
        "llava-next-res", "llava-next-mlp2x_res2x_gelu", "mm_projector.bin", lambda: llava_mlp(16, 24, 2, res=2),
        "model.mm_projector.", 16, extra={"model.image_newline": "vector"},
    ),
    Case(
        "llava-next-mlp", "llava-next-mlp2x_gelu", "mm_projector.bin", lambda: llava_mlp(16, 24, 2),
        "model.mm_projector.", 16, extra={"model.image_newline": "vector"},
    ),
    Case("hf-llava-file", "hf-llava", "model.safetensors", lambda: HFProjector(16, 24), "multi_modal_projector.", 16, other_tensors=LM),
    Case("hf-llava-new", "hf-llava", "model.safetensors", lambda: HFProjector(16, 24), "model.multi_modal_projector.", 16),
    Case(
        "hf-llava-next", "hf-llava-next", "model.safetensors", lambda: HFProjector(16, 24), "multi_modal_projector.", 16,
        extra={"image_newline": "vector"}, other_tensors=LM,
    ),
    Case("qwen2-vl", "qwen2-vl", "model.safetensors", _qwen2, "visual.merger.", 8, other_tensors=("visual.blocks.0.mlp.fc1.weight",)),
    Case("qwen2.5-vl", "qwen2.5-vl", "model.safetensors", _qwen25, "visual.merger.", 8),
    Case("internvl", "internvl", "model.safetensors", _internvl, "mlp1.", 32, other_tensors=("vision_model.embeddings.class_embedding",)),
    Case("internvl-hf", "internvl-hf", "model.safetensors", lambda: HFProjector(32, 24, layer_norm=True), "model.multi_modal_projector.", 32),
    Case("minigpt4", "minigpt4", "prerained_minigpt4.pth", lambda: nn.Linear(16, 24), "llama_proj.", 16, container="model"),
    Case("blip2", "blip2", "model.safetensors", lambda: nn.Linear(16, 24), "language_projection.", 16, other_tensors=("query_tokens",)),
    Case("idefics3", "idefics3", "model.safetensors", _Idefics, "model.connector.modality_projection.", 64),
    Case("paligemma", "paligemma", "model.safetensors", lambda: nn.Linear(16, 24), "multi_modal_projector.linear.", 16),
]

CASE_BY_ID = {c.id: c for c in CASES}
