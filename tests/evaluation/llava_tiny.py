"""A tiny random Llava and word-level tokenizer built locally (no download) for the
transformers back-end tests: text hidden 32, vision hidden 16, image 8x8, patch 2 ->
16 image tokens per image."""

from __future__ import annotations

import torch

WORDS = ["USER", "ASSISTANT", ":", "caption", "image", "the", "a", "red", "blue", "green", "square", "circle", "dot", "at", "top", "bottom", "left", "right", "of", "and", "is", "there", "are", "one", "two", "three", "text", "reading"]
IMAGE_TOKEN = 127
VOCAB = 128


def tiny_tokenizer(image_special: bool = False):
    """Word-level; ``image_special`` registers ``<image>`` as a special token (as LLaVA's
    tokenizers do) so a prompt tokenises with the placeholder in one piece."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "<pad>": 3}
    for w in WORDS:
        vocab.setdefault(w, len(vocab))
    vocab["<image>"] = IMAGE_TOKEN
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    out = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                                  eos_token="</s>", pad_token="<pad>")
    if image_special:
        out.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return out


def tiny_llava(seed: int = 0):
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
    )

    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=8, patch_size=2, projection_dim=16)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=VOCAB, bos_token_id=1, eos_token_id=2, pad_token_id=3)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vc, text_config=tc,
                                                      image_token_index=IMAGE_TOKEN))
    return model.eval()


def tiny_image_processor():
    from transformers import CLIPImageProcessor

    return CLIPImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8})


PROMPT = "USER : <image> caption : ASSISTANT :"
