"""LLaVA through transformers as a :class:`CaptionBackend` (optional extra ``[llava]``).

The model (``LlavaForConditionalGeneration``: CLIP vision tower, projector, LLM) is loaded
once; every projector under test is *swapped in memory* into the model's own
``multi_modal_projector`` for the duration of a call (:meth:`LlavaHFBackend.swapped`) and
the original weights are put back afterwards, so the projector runs through exactly the
module transformers would use. Both module layouts are handled: transformers < 4.52 keeps
the projector at ``model.multi_modal_projector``, later releases at
``model.model.multi_modal_projector``. Any projector that has an HF Llava equivalent maps
on, including original-LLaVA ``mm_projector.0/2`` files (through
:func:`pivotmerge_gui.core.io.writers.hf_llava_state`, the same mapping the hf-llava
writer uses).

Visual features are the vision tower's hidden states at ``vision_feature_layer`` (the
CLS token dropped for the ``default`` select strategy), computed once per image set:
exactly the projector's input in transformers' own Llava forward. Prompts are
``before <image> after`` with the image placeholder expanded to one image token per
visual token; the caption follows ``after``. The alignment score is the caption's
teacher-forced negative log-likelihood; captions are greedy, streamed token by token
through an optional callback, and a :class:`~pivotmerge_gui.core.progress.CancelToken`
stops generation through a transformers ``StoppingCriteria``.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..devices import resolve_device
from ..errors import Cancelled, HubError, OutputError, PivotMergeError
from ..progress import CancelToken
from ..projector import Projector
from .backend import CaptionBackend, batches, check_pairs

#: LLaVA-1.5's conversation template with a captioning question
DEFAULT_PROMPT = "USER: <image>\nWrite a short caption for this image. ASSISTANT:"
IMAGE_PLACEHOLDER = "<image>"

TokenCallback = Callable[[int, str], None]  # (row in the batch, caption text so far)


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as e:
        raise PivotMergeError(
            "the LLaVA back end needs transformers: pip install 'pivotmerge-gui[llava]'"
        ) from e
    return transformers


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


class ProjectorMismatch(PivotMergeError):
    """A projector that cannot run inside the loaded model (other family or shapes)."""


class _CancelCriteria:
    """A transformers ``StoppingCriteria`` that ends generation when the token is set."""

    def __init__(self, cancel: CancelToken) -> None:
        self.cancel = cancel

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.cancel.cancelled, dtype=torch.bool,
                          device=input_ids.device)


class _CallbackStreamer:
    """transformers streamer protocol (``put``/``end``) feeding a per-token callback with the
    decoded caption so far of every row."""

    def __init__(self, decode: Callable[[list[int]], str], callback: TokenCallback, rows: int,
                 eos: set[int]) -> None:
        self.decode, self.callback, self.eos = decode, callback, eos
        self.ids: list[list[int]] = [[] for _ in range(rows)]
        self.finished = [False] * rows
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        value = value.reshape(len(self.ids), -1)
        for row, toks in enumerate(value.tolist()):
            for t in toks:
                if self.finished[row]:
                    continue
                if t in self.eos:
                    self.finished[row] = True
                    continue
                self.ids[row].append(int(t))
                self.callback(row, self.decode(self.ids[row]))

    def end(self) -> None:
        pass


class LlavaHFBackend(CaptionBackend):
    """A transformers Llava model around a swappable projector.

    ``model`` is a ``LlavaForConditionalGeneration`` (any transformers version with either
    module layout); ``tokenizer`` its tokenizer; ``image_processor`` turns Pillow images
    into ``pixel_values`` (may be ``None`` when callers pass pixel tensors).
    ``prompt`` must contain ``<image>`` once. ``batch`` bounds the sequences per forward.
    """

    name = "llava"
    accepts_pil = True  # encode_images takes Pillow images (see pairs.images_for_backend)
    streams_tokens = True  # generate(..., on_token=) streams captions (see bench.run_bench)
    tokens_per_word = 2.5  # default generation budget per reference word (subword tokens)

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        image_processor: Any = None,
        *,
        prompt: str = DEFAULT_PROMPT,
        device: str | torch.device | None = None,
        dtype: torch.dtype | None = None,
        batch: int = 8,
        source: str = "",
    ) -> None:
        if prompt.count(IMAGE_PLACEHOLDER) != 1:
            raise PivotMergeError(f"the LLaVA prompt must contain '{IMAGE_PLACEHOLDER}' exactly once: {prompt!r}")
        if device is not None or dtype is not None:
            model = model.to(device=resolve_device(device) if device is not None else None, dtype=dtype)
        self.model = model.eval()
        # one swap at a time: the app's test bench and a sweep may share this model
        self._swap_lock = threading.RLock()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.batch = max(1, int(batch))
        self.source = source
        cfg = model.config
        tok_id = getattr(cfg, "image_token_id", None)
        self.image_token_id = int(tok_id if tok_id is not None else cfg.image_token_index)
        self.feature_layer = getattr(cfg, "vision_feature_layer", -2)
        self.select_strategy = getattr(cfg, "vision_feature_select_strategy", "default")
        before, after = prompt.split(IMAGE_PLACEHOLDER)
        self.prompt = prompt
        self._after_text = after
        self._after_alone = list(tokenizer(after, add_special_tokens=False)["input_ids"]) if after else []
        whole = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        if whole.count(self.image_token_id) == 1:
            # the tokenizer knows <image> (LLaVA's do): tokenise the prompt in one piece, as
            # LlavaProcessor does, and expand the placeholder to one id per visual token
            k = whole.index(self.image_token_id)
            self._before, self._after = whole[:k], whole[k + 1:]
        else:
            self._before = list(tokenizer(before, add_special_tokens=True)["input_ids"]) if before else []
            if not before and getattr(tokenizer, "bos_token_id", None) is not None:
                self._before = [int(tokenizer.bos_token_id)]
            self._after = list(self._after_alone)
        eos = getattr(tokenizer, "eos_token_id", None)
        if eos is None:
            eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is None:
            raise PivotMergeError("the LLaVA tokenizer has no end-of-sequence token")
        self.eos_id = int(eos)
        pad = getattr(tokenizer, "pad_token_id", None)
        self.pad_id = int(pad) if pad is not None else self.eos_id

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str,
        *,
        device: str | None = "auto",
        dtype: torch.dtype | None = None,
        prompt: str = DEFAULT_PROMPT,
        batch: int = 8,
        revision: str | None = None,
    ) -> LlavaHFBackend:
        """Load a Llava model folder or Hub id once (fp16 on CUDA, fp32 on CPU by default).

        Offline (``HF_HUB_OFFLINE=1``) only the local cache is used; a missing model is a
        :class:`~pivotmerge_gui.core.errors.HubError` naming it.
        """
        tf = _transformers()
        dev = resolve_device(device)
        if dtype is None:
            dtype = torch.float16 if dev.type == "cuda" else torch.float32
        kw: dict[str, Any] = {"revision": revision}
        if _offline():
            kw["local_files_only"] = True
        try:
            try:
                processor = tf.AutoProcessor.from_pretrained(path_or_id, **kw)
                tokenizer = getattr(processor, "tokenizer", processor)
                image_processor = getattr(processor, "image_processor", None)
            except (OSError, ValueError, KeyError, TypeError):
                tokenizer = tf.AutoTokenizer.from_pretrained(path_or_id, **kw)
                image_processor = tf.AutoImageProcessor.from_pretrained(path_or_id, **kw)
            try:
                model = tf.LlavaForConditionalGeneration.from_pretrained(path_or_id, dtype=dtype, **kw)
            except TypeError:  # transformers < 4.56 names it torch_dtype
                model = tf.LlavaForConditionalGeneration.from_pretrained(path_or_id, torch_dtype=dtype, **kw)
        except OSError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else e.__class__.__name__
            hint = " (offline: only the local cache is searched)" if _offline() else ""
            raise HubError(path_or_id, f"cannot load a Llava model{hint}: {first}") from None
        return cls(model, tokenizer, image_processor, prompt=prompt, device=dev, dtype=dtype,
                   batch=batch, source=path_or_id)

    # ------------------------------------------------------------------ modules
    @property
    def core(self) -> Any:
        """The module holding vision tower and projector (new layout: ``model.model``)."""
        inner = getattr(self.model, "model", None)
        return inner if inner is not None and hasattr(inner, "multi_modal_projector") else self.model

    @property
    def projector_module(self) -> torch.nn.Module:
        return self.core.multi_modal_projector

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.projector_module.parameters()).dtype

    def projector_state(self, projector: Projector) -> dict[str, torch.Tensor]:
        """``projector`` as a state dict of the model's projector module (typed errors when
        it has no HF Llava equivalent or its shapes do not fit this model)."""
        from ..io.writers import hf_llava_state

        try:
            keyed = hf_llava_state(projector)
        except OutputError as e:
            raise ProjectorMismatch(
                f"{projector.source or 'projector'} cannot run in this Llava model: {e}"
            ) from None
        state = {k.removeprefix("multi_modal_projector."): v for k, v in keyed.items()}
        own = self.projector_module.state_dict()
        if set(state) != set(own):
            raise ProjectorMismatch(
                f"{projector.source or 'projector'} has tensors {sorted(state)} but the model's "
                f"projector has {sorted(own)}"
            )
        for k, v in state.items():
            if tuple(v.shape) != tuple(own[k].shape):
                raise ProjectorMismatch(
                    f"{projector.source or 'projector'}: tensor {k} has shape {list(v.shape)} but the "
                    f"model ({self.source or 'Llava'}) needs {list(own[k].shape)}"
                )
        return state

    @contextlib.contextmanager
    def swapped(self, projector: Projector | None) -> Iterator[torch.nn.Module]:
        """Put ``projector``'s weights into the model's projector for the ``with`` block and
        restore the original weights afterwards (also on errors). ``None`` keeps the
        model's own projector."""
        module = self.projector_module
        if projector is None:
            yield module
            return
        state = self.projector_state(projector)
        with self._swap_lock:  # another thread's projector must not be swapped in mid-use
            saved = {k: v.detach().clone() for k, v in module.state_dict().items()}
            try:
                with torch.no_grad():
                    module.load_state_dict({k: v.to(saved[k].device, saved[k].dtype) for k, v in state.items()},
                                           strict=True)
                yield module
            finally:
                with torch.no_grad():
                    module.load_state_dict(saved, strict=True)

    # ------------------------------------------------------------------ images
    @torch.no_grad()
    def encode_images(self, images: Any) -> torch.Tensor:
        """Vision-tower features the projector consumes: ``[N, tokens, d]`` fp32 on CPU.
        ``images``: Pillow images, or a ``pixel_values`` tensor ``[N, 3, H, W]``."""
        if isinstance(images, torch.Tensor):
            pixels = images
        else:
            images = list(images)
            if not images:
                return torch.zeros(0)
            if self.image_processor is None:
                raise PivotMergeError("this LLaVA back end has no image processor; pass pixel tensors")
            pixels = self.image_processor(images=images, return_tensors="pt")["pixel_values"]
        out = []
        tower = self.core.vision_tower
        tower_dtype = next(tower.parameters()).dtype
        for i in range(0, len(pixels), self.batch):
            px = pixels[i:i + self.batch].to(self.device, tower_dtype)
            hidden = tower(px, output_hidden_states=True).hidden_states
            layers = self.feature_layer if isinstance(self.feature_layer, (list, tuple)) else [self.feature_layer]
            feats = [hidden[int(l)] for l in layers]
            if self.select_strategy == "default":
                feats = [f[:, 1:] for f in feats]
            out.append(torch.cat(feats, dim=-1).float().cpu())
        return torch.cat(out)

    # ------------------------------------------------------------------ text
    def caption_ids(self, caption: str) -> list[int]:
        """Token ids of ``caption`` as it follows the prompt (tokenised jointly with the
        prompt's tail when the tail's tokens stay a prefix, so the boundary is natural)."""
        tok = self.tokenizer
        if self._after_text:
            joint = list(tok(self._after_text + " " + caption, add_special_tokens=False)["input_ids"])
            n = len(self._after_alone)
            if joint[:n] == self._after_alone and len(joint) > n:
                return joint[n:]
        return list(tok(caption, add_special_tokens=False)["input_ids"])

    def _decode(self, ids: Sequence[int]) -> str:
        ids = list(ids)
        if self.eos_id in ids:
            ids = ids[: ids.index(self.eos_id)]
        return " ".join(self.tokenizer.decode(ids, skip_special_tokens=True).split())

    def _prompt_embeds(self, image_embeds: torch.Tensor, tails: Sequence[Sequence[int]]) -> tuple[
            torch.Tensor, torch.Tensor, int]:
        """Embeddings of ``before + image tokens + after + tail_i`` (right-padded), the
        attention mask and the prompt length."""
        n, t, _ = image_embeds.shape
        prompt = self._before + [self.image_token_id] * t + self._after
        lens = [len(prompt) + len(tail) for tail in tails]
        width = max(lens)
        ids = torch.full((n, width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((n, width), dtype=torch.long)
        for i, tail in enumerate(tails):
            row = prompt + list(tail)
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        ids, mask = ids.to(self.device), mask.to(self.device)
        is_image = ids == self.image_token_id
        embed = self.model.get_input_embeddings()
        lookup = ids.masked_fill(is_image, self.pad_id)  # the placeholder id may lie outside the table
        emb = embed(lookup)
        emb[is_image] = image_embeds.reshape(-1, image_embeds.shape[-1]).to(emb.dtype)
        return emb, mask, len(prompt)

    # ------------------------------------------------------------------ CaptionBackend
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
        with self.swapped(projector) as module:
            for b in batches(len(captions), self.batch, cancel):
                feats = features[b].to(self.device, self.dtype)
                tails = [self.caption_ids(c) + [self.eos_id] for c in captions[b]]
                emb, mask, plen = self._prompt_embeds(module(feats), tails)
                logits = self.model(inputs_embeds=emb, attention_mask=mask).logits
                pred = logits[:, plen - 1:-1].float()  # position t predicts token t+1
                width = pred.shape[1]
                targets = torch.full((len(tails), width), -100, dtype=torch.long, device=pred.device)
                for r, tail in enumerate(tails):
                    targets[r, : len(tail)] = torch.tensor(tail, dtype=torch.long)
                nll = F.cross_entropy(pred.transpose(1, 2), targets, ignore_index=-100, reduction="none")
                sums.append(nll.sum(1).cpu())
                counts.append(torch.tensor([len(t) for t in tails], dtype=torch.long))
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
        on_token: TokenCallback | None = None,
    ) -> list[str]:
        """Greedy captions. ``on_token(index, text_so_far)`` streams every new token
        (``index`` = position in ``features``); a set ``cancel`` stops generation at the
        next token and raises :class:`~pivotmerge_gui.core.errors.Cancelled`."""
        tf = _transformers()
        cancel = cancel or CancelToken()
        out: list[str] = []
        with self.swapped(projector) as module:
            for b in batches(len(features), self.batch, cancel):
                feats = features[b].to(self.device, self.dtype)
                emb, mask, plen = self._prompt_embeds(module(feats), [[] for _ in range(len(feats))])
                streamer = None
                if on_token is not None:
                    offset = b.start
                    streamer = _CallbackStreamer(self._decode, lambda r, s, o=offset: on_token(o + r, s),
                                                 len(feats), {self.eos_id})
                ids = self.model.generate(
                    inputs_embeds=emb,
                    attention_mask=mask,
                    max_new_tokens=int(max_new_tokens),
                    do_sample=False,
                    num_beams=1,
                    eos_token_id=self.eos_id,
                    pad_token_id=self.pad_id,
                    stopping_criteria=tf.StoppingCriteriaList([_CancelCriteria(cancel)]),
                    streamer=streamer,
                )
                if cancel.cancelled:
                    raise Cancelled()
                if ids.shape[1] > max_new_tokens:  # some versions return the prompt too
                    ids = ids[:, plen:]
                out.extend(self._decode(row) for row in ids.tolist())
        return out
