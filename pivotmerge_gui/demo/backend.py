"""The demo captioning back end: the demo's frozen encoder and LM behind
:class:`~pivotmerge_gui.core.evaluation.CaptionBackend`.

Any projector with 48-d inputs and 64-d outputs plugs in (a canonical
:class:`~pivotmerge_gui.core.projector.Projector`, as loaded from ``mm_projector.bin`` or
produced by a merge); it runs through the Projector's own forward program, so the
evaluation exercises the same code the app uses.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ..core.errors import BackendMismatch
from ..core.evaluation.backend import CaptionBackend, batches, check_pairs
from ..core.progress import CancelToken
from ..core.projector import Projector
from .data import Tokenizer
from .models import TinyLM, VisionEncoder, caption_batch, caption_logits
from .train import encode


class DemoBackend(CaptionBackend):
    """Frozen demo encoder + LM. ``batch`` bounds the sequences per LM forward."""

    name = "demo"

    def __init__(self, encoder: VisionEncoder, lm: TinyLM, tokenizer: Tokenizer, batch: int = 2048) -> None:
        self.encoder = encoder.eval()
        self.lm = lm.eval()
        self.tok = tokenizer
        self.batch = batch

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return encode(self.encoder, images)

    def _prefix(self, projector: Projector, features: torch.Tensor) -> torch.Tensor:
        self.check_projector(projector, int(features.shape[-1]))
        return projector.forward(features.float()).float()

    def check_projector(self, projector: Projector, in_features: int) -> None:
        """Raise :class:`BackendMismatch` (one clear line) for a projector of other widths
        than the demo's encoder (in) and LM (out), instead of a matrix-shape error."""
        want_in = in_features  # the encoder's feature width
        want_out = int(self.lm.tok.embedding_dim)
        try:
            got_in, got_out = projector.in_features, projector.out_features
        except (ValueError, IndexError, KeyError):
            return  # no linear layers to read widths from: let the forward pass say more
        if (got_in, got_out) != (want_in, want_out):
            raise BackendMismatch(
                "demo", projector.source or "projector",
                f"the demo model takes {want_in} -> {want_out} projectors; this one is {got_in} -> {got_out}. "
                "Test real projectors with the LLaVA (transformers) back end.")

    @torch.no_grad()
    def caption_nll(
        self,
        projector: Projector,
        features: torch.Tensor,
        captions: Sequence[str],
        cancel: CancelToken | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        check_pairs(features, captions)
        sums, counts = [], []
        for b in batches(len(captions), self.batch, cancel):
            ids = [self.tok.encode(c) for c in captions[b]]
            inputs, targets = caption_batch(ids, self.tok.bos_id, self.tok.eos_id, self.tok.pad_id)
            logits = caption_logits(self.lm, self._prefix(projector, features[b]), inputs)
            nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=-100, reduction="none")
            sums.append(nll.sum(1))
            counts.append((targets != -100).sum(1))
        if not sums:
            return torch.zeros(0), torch.zeros(0, dtype=torch.long)
        return torch.cat(sums), torch.cat(counts)

    @torch.no_grad()
    def generate(
        self,
        projector: Projector,
        features: torch.Tensor,
        max_new_tokens: int,
        cancel: CancelToken | None = None,
    ) -> list[str]:
        out: list[str] = []
        for b in batches(len(features), self.batch, cancel):
            prefix = self._prefix(projector, features[b])
            ids = torch.full((len(prefix), 1), self.tok.bos_id, dtype=torch.long)
            done = torch.zeros(len(prefix), dtype=torch.bool)
            step_in = torch.cat([prefix, self.lm.embed(ids)], dim=1)
            cache = None
            for _ in range(max_new_tokens):
                logits, cache = self.lm.step(step_in, cache)  # KV cache: only the new token runs
                nxt = logits[:, -1].argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.tok.eos_id), nxt)
                ids = torch.cat([ids, nxt[:, None]], dim=1)
                done |= nxt == self.tok.eos_id
                if bool(done.all()):
                    break
                step_in = self.lm.embed(nxt[:, None])
            out.extend(self.tok.decode(row[1:]) for row in ids.tolist())
        return out
