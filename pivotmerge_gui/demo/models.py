"""The frozen halves of the demo MLLM: a tiny patch-token vision encoder and a tiny
decoder-only language model, plus LLaVA's ``mlp2x_gelu`` projector between them.

Widths differ on purpose (vision 48, language 64) so that any transposition bug in a
reader, writer or merge method shows up as a shape error instead of silently working.

How the pieces fit (LLaVA stage 1 in miniature)::

    image [3,16,16] -> patches [16, 48] -> VisionEncoder -> [16, 48]
                    -> projector (Linear 48->64, GELU, Linear 64->64) -> [16, 64]
    LM input = [16 projected image tokens] + embed(<bos> caption) ; loss on caption + <eos>

The LM is pre-trained on caption *text* only. Each training sequence puts the caption's
content words (colour, letters, count...) in order into a few of the 16 prefix slots and
fills the rest with ``<blank>``; the LM learns to write the caption from whatever its
prefix says. The projector's job in stage 1 is then to turn visual features into prefix
vectors the LM can read, which is exactly the cross-modal alignment LLaVA's projector
learns. The model classes use only plain torch so they load anywhere.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_PATCHES, PATCH

PROJECTOR_PREFIX = "model.mm_projector."
KV = tuple[torch.Tensor, torch.Tensor]  # one block's cached keys and values [B, heads, T, d/heads]


@dataclass(frozen=True)
class WorldConfig:
    """Architecture of the demo world (stored in the manifest)."""

    vision_width: int = 48
    vision_layers: int = 2
    vision_heads: int = 4
    lm_width: int = 64
    lm_layers: int = 2
    lm_heads: int = 4
    lm_ff: int = 128
    vocab_size: int = 0
    max_len: int = 32
    num_patches: int = NUM_PATCHES
    patch_dim: int = 3 * PATCH * PATCH

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


class Block(nn.Module):
    """Pre-norm transformer block (own implementation: deterministic, no fast-path
    switching between train and eval)."""

    def __init__(self, d: int, heads: int, ff: int, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.causal = causal
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.ff1 = nn.Linear(d, ff)
        self.ff2 = nn.Linear(ff, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.step(x)[0]

    def step(self, x: torch.Tensor, past: KV | None = None) -> tuple[torch.Tensor, KV]:
        """The block on ``x`` [B, t, d] after the cached keys/values ``past`` of the earlier
        positions (``None``: ``x`` starts the sequence); returns the output and the cache
        extended by ``x``'s positions (incremental decoding: one new token costs one
        position's work instead of the whole sequence's)."""
        b, t, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if past is not None:
            k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        att = (q @ k.transpose(-1, -2)) / math.sqrt(d // self.heads)
        if self.causal:
            total = k.shape[2]  # query i (absolute position total - t + i) sees keys 0..that position
            mask = torch.ones(t, total, dtype=torch.bool, device=x.device).triu(total - t + 1)
            att = att.masked_fill(mask, float("-inf"))
        att = att.softmax(-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = x + self.out(y)
        return x + self.ff2(F.gelu(self.ff1(self.ln2(x)))), (k, v)


class VisionEncoder(nn.Module):
    """Patch embedding + 2 bidirectional blocks -> one 48-d token per 4x4 patch."""

    def __init__(self, cfg: WorldConfig) -> None:
        super().__init__()
        d = cfg.vision_width
        self.patch_embed = nn.Linear(cfg.patch_dim, d)
        self.pos = nn.Parameter(torch.randn(cfg.num_patches, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, cfg.vision_heads, 2 * d, causal=False)
                                     for _ in range(cfg.vision_layers)])
        self.ln = nn.LayerNorm(d)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(patches) + self.pos
        for blk in self.blocks:
            x = blk(x)
        return self.ln(x)


class SlotHead(nn.Module):
    """Auxiliary head used only to pre-train the encoder: learned queries attend over the
    patch tokens and each query predicts one content word (slot k = k-th content word)."""

    def __init__(self, d: int, slots: int, vocab: int) -> None:
        super().__init__()
        self.queries = nn.Parameter(torch.randn(slots, d) * 0.1)
        self.key = nn.Linear(d, d)
        self.cls = nn.Sequential(nn.Linear(d, d), nn.GELU(), nn.Linear(d, vocab))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        att = torch.einsum("sd,ntd->nst", self.queries, self.key(tokens)) / math.sqrt(tokens.shape[-1])
        pooled = att.softmax(-1) @ tokens  # [N, slots, d]
        return self.cls(pooled)


class TinyLM(nn.Module):
    """Decoder-only LM over word tokens; takes input embeddings so that image tokens can
    be prefixed exactly like LLaVA does."""

    def __init__(self, cfg: WorldConfig) -> None:
        super().__init__()
        d = cfg.lm_width
        self.tok = nn.Embedding(cfg.vocab_size, d)
        self.pos = nn.Parameter(torch.randn(cfg.max_len, d) * 0.02)
        self.blocks = nn.ModuleList([Block(d, cfg.lm_heads, cfg.lm_ff, causal=True)
                                     for _ in range(cfg.lm_layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, cfg.vocab_size, bias=False)

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.tok(ids)

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.step(embeds)[0]

    def step(self, embeds: torch.Tensor, past: list[KV] | None = None) -> tuple[torch.Tensor, list[KV]]:
        """Logits of ``embeds``' positions following the cached ``past`` (from an earlier
        call), and the extended cache: ``forward`` for greedy decoding one token at a time."""
        start = 0 if past is None else int(past[0][0].shape[2])
        x = embeds + self.pos[start: start + embeds.shape[1]]
        cache: list[KV] = []
        for i, blk in enumerate(self.blocks):
            x, kv = blk.step(x, None if past is None else past[i])
            cache.append(kv)
        return self.head(self.ln(x)), cache


def make_projector(cfg: WorldConfig, seed: int) -> nn.Sequential:
    """LLaVA ``mlp2x_gelu`` with PyTorch's default Linear init drawn from ``seed``."""
    g = torch.random.fork_rng(devices=[])
    with g:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(cfg.vision_width, cfg.lm_width), nn.GELU(),
                             nn.Linear(cfg.lm_width, cfg.lm_width))


def projector_state_to_llava(module: nn.Module) -> dict[str, torch.Tensor]:
    """``nn.Sequential`` state -> LLaVA ``mm_projector.bin`` keys (fp32, contiguous)."""
    return {PROJECTOR_PREFIX + k: v.detach().float().contiguous().clone()
            for k, v in module.state_dict().items()}


def caption_batch(tokenizer_ids: list[list[int]], bos: int, eos: int, pad: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (inputs [N, L+1] = <bos> w..., targets [N, L+1] = w... <eos>, pad=-100)."""
    n = len(tokenizer_ids)
    longest = max((len(t) for t in tokenizer_ids), default=0) + 1
    inputs = torch.full((n, longest), pad, dtype=torch.long)
    targets = torch.full((n, longest), -100, dtype=torch.long)
    for i, ids in enumerate(tokenizer_ids):
        seq = [bos, *ids]
        inputs[i, : len(seq)] = torch.tensor(seq)
        targets[i, : len(ids) + 1] = torch.tensor([*ids, eos])
    return inputs, targets


def caption_logits(lm: TinyLM, prefix: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
    """Logits over the caption positions only: [N, L+1, V] for ``inputs`` [N, L+1]."""
    x = torch.cat([prefix, lm.embed(inputs)], dim=1)
    return lm(x)[:, prefix.shape[1]:]
