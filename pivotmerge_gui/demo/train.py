"""Training of the demo world: encoder (auxiliary objective), LM (caption text), projectors
(LLaVA stage 1). Plain torch, CPU, deterministic for a given seed and thread count.

Why each step looks the way it does:

- **Vision encoder.** A randomly initialised encoder would make the projector's job
  mostly noise fitting. Real MLLMs use a pre-trained CLIP, whose features are
  informative for every domain. We imitate that cheaply: the encoder is trained briefly
  on all four domains with an auxiliary head (:class:`~.models.SlotHead`) that must name
  the image's content words from attention-pooled patch tokens. The head is discarded,
  the encoder frozen.
- **Language model.** Trained on caption text only, with the caption's content words
  placed in order in random prefix slots (the rest ``<blank>``). This gives the LM the
  in-context reading ability a real LLM has, so a projector can steer it.
- **Projectors.** LLaVA stage 1: image tokens prefix the caption, next-token loss on
  the caption, encoder and LM frozen, only the ``mlp2x_gelu`` projector trains (AdamW,
  no weight decay, 3% linear warm-up then cosine decay, as in LLaVA's pretrain script).
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .data import NUM_PATCHES, DomainData, Tokenizer, patchify
from .models import (
    PROJECTOR_PREFIX,
    SlotHead,
    TinyLM,
    VisionEncoder,
    WorldConfig,
    caption_batch,
    caption_logits,
    make_projector,
    projector_state_to_llava,
)

Log = Callable[[str], None]
PROJECTOR_FILE = "mm_projector.bin"
BUILD_THREADS = 1  # tiny models gain nothing from threads; one thread is robust on a busy machine


@dataclass(frozen=True)
class TrainConfig:
    """Step counts and learning rates (stored in the manifest)."""

    encoder_steps: int = 1500
    encoder_lr: float = 3e-3
    lm_steps: int = 600
    lm_lr: float = 3e-3
    projector_steps: int = 500
    projector_lr: float = 2e-3
    joint_steps_factor: float = 2.0  # the joint projector sees all domains: give it more steps
    batch: int = 64
    # Opt-in (larger benchmark world only): the fraction of its domain's training examples
    # and of ``projector_steps`` each expert gets, in domain order; () = every expert all of
    # them (the demo). The joint projector trains on the union of the experts' subsets.
    expert_fractions: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "expert_fractions", tuple(float(f) for f in self.expert_fractions))

    def to_dict(self) -> dict[str, Any]:
        """The manifest's ``train_config``; opt-in fields at their default are left out, so
        the demo's manifest (and every cache key made from it) is what it always was."""
        from dataclasses import asdict

        d = asdict(self)
        if not d["expert_fractions"]:
            del d["expert_fractions"]
        else:
            d["expert_fractions"] = list(d["expert_fractions"])
        return d


TINY = TrainConfig(encoder_steps=8, lm_steps=10, projector_steps=6, batch=16)


def _schedule(step: int, total: int, warmup_frac: float = 0.03) -> float:
    warm = max(1, round(total * warmup_frac))
    if step < warm:
        return (step + 1) / warm
    prog = (step - warm) / max(1, total - warm)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, prog)))


def _optimizer(params: Sequence[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)


def content_targets(tok: Tokenizer, content: Sequence[Sequence[str]], slots: int) -> torch.Tensor:
    out = torch.full((len(content), slots), tok.pad_id, dtype=torch.long)
    for i, words in enumerate(content):
        ids = [tok.ids[w] for w in words][:slots]
        out[i, : len(ids)] = torch.tensor(ids)
    return out


def train_encoder(cfg: WorldConfig, tcfg: TrainConfig, train: dict[str, DomainData],
                  tok: Tokenizer, seed: int, log: Log | None = None) -> VisionEncoder:
    torch.manual_seed(seed)
    enc = VisionEncoder(cfg)
    slots = max(len(c) for d in train.values() for c in d.content)
    head = SlotHead(cfg.vision_width, slots, cfg.vocab_size)
    patches = torch.cat([patchify(d.images) for d in train.values()])
    targets = torch.cat([content_targets(tok, d.content, slots) for d in train.values()])
    opt = _optimizer([*enc.parameters(), *head.parameters()], tcfg.encoder_lr)
    g = torch.Generator().manual_seed(seed + 1)
    bs = tcfg.batch * 2
    for step in range(tcfg.encoder_steps):
        for group in opt.param_groups:
            group["lr"] = tcfg.encoder_lr * _schedule(step, tcfg.encoder_steps)
        idx = torch.randint(0, len(patches), (bs,), generator=g)
        logits = head(enc(patches[idx]))
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets[idx].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 100 == 0 or step == tcfg.encoder_steps - 1):
            acc = (logits.argmax(-1) == targets[idx]).float().mean().item()
            log(f"encoder step {step}: loss {loss.item():.3f} slot acc {acc:.3f}")
    enc.eval()
    for p in enc.parameters():
        p.requires_grad_(False)
    return enc


def _text_prefix(tok: Tokenizer, content: Sequence[Sequence[str]], g: torch.Generator) -> torch.Tensor:
    """Content words in order at sorted random slots among the 16 image-token slots."""
    out = torch.full((len(content), NUM_PATCHES), tok.blank_id, dtype=torch.long)
    for i, words in enumerate(content):
        pos = torch.randperm(NUM_PATCHES, generator=g)[: len(words)].sort().values
        out[i, pos] = torch.tensor([tok.ids[w] for w in words])
    return out


def train_lm(cfg: WorldConfig, tcfg: TrainConfig, train: dict[str, DomainData],
             tok: Tokenizer, seed: int, log: Log | None = None) -> TinyLM:
    torch.manual_seed(seed)
    lm = TinyLM(cfg)
    captions = [c for d in train.values() for c in d.captions]
    content = [c for d in train.values() for c in d.content]
    ids = [tok.encode(c) for c in captions]
    opt = _optimizer(list(lm.parameters()), tcfg.lm_lr)
    g = torch.Generator().manual_seed(seed + 2)
    bs = tcfg.batch * 2
    for step in range(tcfg.lm_steps):
        for group in opt.param_groups:
            group["lr"] = tcfg.lm_lr * _schedule(step, tcfg.lm_steps)
        idx = torch.randint(0, len(ids), (bs,), generator=g).tolist()
        prefix_ids = _text_prefix(tok, [content[i] for i in idx], g)
        inputs, targets = caption_batch([ids[i] for i in idx], tok.bos_id, tok.eos_id, tok.pad_id)
        logits = caption_logits(lm, lm.embed(prefix_ids), inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 250 == 0 or step == tcfg.lm_steps - 1):
            log(f"lm step {step}: loss {loss.item():.3f}")
    lm.eval()
    for p in lm.parameters():
        p.requires_grad_(False)
    return lm


@torch.no_grad()
def encode(enc: VisionEncoder, images: torch.Tensor, batch: int = 512) -> torch.Tensor:
    """Frozen visual features [N, 16, vision_width] (what the projector consumes)."""
    return torch.cat([enc(patchify(images[i:i + batch])) for i in range(0, len(images), batch)]) \
        if len(images) else torch.zeros(0, NUM_PATCHES, enc.pos.shape[1])


def train_projector(init: nn.Module, lm: TinyLM, features: torch.Tensor, captions: Sequence[str],
                    tok: Tokenizer, steps: int, lr: float, batch: int, seed: int,
                    log: Log | None = None, name: str = "projector") -> nn.Module:
    """LLaVA stage 1 on precomputed features: only the projector's parameters move."""
    proj = copy.deepcopy(init)
    proj.train()
    ids = [tok.encode(c) for c in captions]
    opt = _optimizer(list(proj.parameters()), lr)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        for group in opt.param_groups:
            group["lr"] = lr * _schedule(step, steps)
        idx = torch.randint(0, len(ids), (batch,), generator=g)
        inputs, targets = caption_batch([ids[i] for i in idx.tolist()], tok.bos_id, tok.eos_id, tok.pad_id)
        logits = caption_logits(lm, proj(features[idx]), inputs)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if log and (step % 100 == 0 or step == steps - 1):
            log(f"{name} step {step}: loss {loss.item():.3f}")
    proj.eval()
    return proj


@dataclass
class ExpertSet:
    """Every projector of one expert seed (nn modules, fp32)."""

    seed: int
    base: nn.Module
    shared: dict[str, nn.Module]
    different: dict[str, nn.Module]
    different_inits: dict[str, nn.Module]
    joint: nn.Module


def expert_budget(tcfg: TrainConfig, domains: Sequence[str], sizes: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(training examples, steps) of each domain's expert: everything, or the configured
    fractions (at least one example and one step each)."""
    fracs = tcfg.expert_fractions or (1.0,) * len(domains)
    if len(fracs) != len(domains):
        raise ValueError(f"expert_fractions has {len(fracs)} entries for {len(domains)} domains")
    return {d: (max(1, round(f * sizes[d])), max(1, round(f * tcfg.projector_steps)))
            for d, f in zip(domains, fracs)}


def train_experts(cfg: WorldConfig, tcfg: TrainConfig, lm: TinyLM,
                  features: dict[str, torch.Tensor], captions: dict[str, list[str]],
                  tok: Tokenizer, seed: int, log: Log | None = None) -> ExpertSet:
    """One expert per domain (the keys of ``features``, in order) from a shared init and
    from separate inits, plus the joint projector (from the shared init, all domains).
    Seeds are derived from ``seed`` so a different ``seed`` is an independent training run
    of every projector."""
    s = 10_000 + 100 * seed
    base = make_projector(cfg, s)
    domains = list(features)
    budget = expert_budget(tcfg, domains, {d: len(features[d]) for d in domains})
    features = {d: features[d][: budget[d][0]] for d in domains}
    captions = {d: list(captions[d][: budget[d][0]]) for d in domains}
    shared, different, inits = {}, {}, {}
    for k, dom in enumerate(domains):
        steps = budget[dom][1]
        shared[dom] = train_projector(base, lm, features[dom], captions[dom], tok, steps,
                                      tcfg.projector_lr, tcfg.batch, s + 1 + k, log, f"shared/{dom}")
        inits[dom] = make_projector(cfg, s + 11 + k)
        different[dom] = train_projector(inits[dom], lm, features[dom], captions[dom], tok,
                                         steps, tcfg.projector_lr, tcfg.batch,
                                         s + 21 + k, log, f"different/{dom}")
    all_feats = torch.cat([features[d] for d in domains])
    all_caps = [c for d in domains for c in captions[d]]
    joint = train_projector(base, lm, all_feats, all_caps, tok,
                            int(tcfg.projector_steps * tcfg.joint_steps_factor), tcfg.projector_lr,
                            tcfg.batch, s + 31, log, "joint")
    return ExpertSet(seed, base, shared, different, inits, joint)


def train_split_experts(cfg: WorldConfig, tcfg: TrainConfig, lm: TinyLM, base: nn.Module,
                        features: dict[str, torch.Tensor], captions: dict[str, list[str]],
                        tok: Tokenizer, seed: int, per_domain: int, log: Log | None = None
                        ) -> tuple[dict[str, nn.Module], dict[str, nn.Module]]:
    """Many experts: ``per_domain`` experts for each domain, expert ``j`` trained on the
    ``j``-th of ``per_domain`` contiguous shards of the domain's training examples (teams
    aligning on overlapping kinds of data), each with the full step budget. Returns
    ``(shared, different)``, keyed ``"{domain}-{j+1}"``: from ``base`` and from an init of
    their own. Seeds are derived from ``seed`` and never coincide with
    :func:`train_experts`'."""
    if per_domain < 1:
        raise ValueError("per_domain must be at least 1")
    s = 50_000 + 1000 * seed
    shared: dict[str, nn.Module] = {}
    different: dict[str, nn.Module] = {}
    k = 0
    for dom, dom_feats in features.items():
        n = len(dom_feats)
        for j in range(per_domain):
            lo, hi = j * n // per_domain, (j + 1) * n // per_domain
            name = f"{dom}-{j + 1}"
            feats, caps = dom_feats[lo:hi], list(captions[dom][lo:hi])
            shared[name] = train_projector(base, lm, feats, caps, tok, tcfg.projector_steps, tcfg.projector_lr,
                                           tcfg.batch, s + 1 + k, log, f"shared/{name}")
            different[name] = train_projector(make_projector(cfg, s + 300 + k), lm, feats, caps, tok,
                                              tcfg.projector_steps, tcfg.projector_lr, tcfg.batch,
                                              s + 600 + k, log, f"different/{name}")
            k += 1
    return shared, different


# --------------------------------------------------------------------------- saving
def save_projector_bin(module: torch.nn.Module, path: Path) -> None:
    """A LLaVA ``mm_projector.bin`` of a trained projector module."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(projector_state_to_llava(module), path)


def load_projector_bin(cfg: WorldConfig, path: Path) -> nn.Module:
    """The projector module saved by :func:`save_projector_bin` (``weights_only`` load)."""
    module = make_projector(cfg, 0)
    state = torch.load(path, map_location="cpu", weights_only=True)
    module.load_state_dict({k.removeprefix(PROJECTOR_PREFIX): v for k, v in state.items()})
    return module


def save_expert_set(es: ExpertSet, out: Path) -> dict[str, Any]:
    """Write every projector of ``es`` under ``out``; return the manifest's path tables."""
    paths: dict[str, Any] = {"shared": {}, "different": {}}
    base = Path("shared") / "base" / PROJECTOR_FILE
    save_projector_bin(es.base, out / base)
    for dom in es.shared:
        for scenario, table in (("shared", es.shared), ("different", es.different)):
            rel = Path(scenario) / dom / PROJECTOR_FILE
            save_projector_bin(table[dom], out / rel)
            paths[scenario][dom] = rel.as_posix()
    joint = Path("joint") / PROJECTOR_FILE
    save_projector_bin(es.joint, out / joint)
    return {"experts": paths, "base": {"shared": base.as_posix()}, "joint": joint.as_posix()}
