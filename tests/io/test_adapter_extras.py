"""Non-projector tensors of adapter files (LLaVA's embed_tokens, LLaVA-NeXT's
vision_resampler, unknown ones) are found, listed, merged or passed through, and written so
that LLaVA's own loader code paths read the output."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.errors import IncompatibleExperts, OutputError
from pivotmerge_gui.core.io import inspect_checkpoint, load_projector, write_projector
from pivotmerge_gui.core.io.extras import adapter_extras, merge_rows
from pivotmerge_gui.core.recipe import Recipe
from tests.factories import make_mlp_projector

VOCAB, HIDDEN, NEW = 40, 24, 2  # make_mlp_projector's d_out is the LLM width (24)
EMBED = "model.embed_tokens.weight"


def _embed(seed: int, dtype=torch.float16) -> torch.Tensor:
    """LLaVA stage 1 with --mm_use_im_start_end: the vocabulary rows are the LLM's own
    (identical in every expert), the two new-token rows were trained (differ)."""
    shared = torch.randn(VOCAB + NEW, HIDDEN, generator=torch.Generator().manual_seed(7))
    own = torch.randn(NEW, HIDDEN, generator=torch.Generator().manual_seed(seed))
    out = shared.clone()
    out[-NEW:] = own
    return out.to(dtype)


def _stage1_adapter(tmp_path, k: int, *, resampler: bool = False, embed=True) -> str:
    p = make_mlp_projector(seed=k)
    sd = dict(p.original_state_dict())
    if embed:
        sd[EMBED] = _embed(k)
    if resampler:  # identical in every expert (frozen / shared)
        g = torch.Generator().manual_seed(99)
        sd["model.vision_resampler.proj.weight"] = torch.randn(16, 16, generator=g)
        sd["model.vision_resampler.proj.bias"] = torch.randn(16, generator=g)
    path = tmp_path / f"dom{k}" / "mm_projector.bin"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, path)
    return str(path)


def _merge(paths, method="linear", **extra):
    recipe = Recipe.from_dict({"merge_method": method, "models": [{"model": p} for p in paths], **extra})
    return pipeline.run(pipeline.plan(recipe))


# ----------------------------------------------------------------- LLaVA's loader, re-implemented
def _llava_initialize_vision_tokenizer_embeddings(adapter: str, input_embeddings: torch.Tensor, num_new_tokens: int):
    """Copy of the embed_tokens branch of ``initialize_vision_tokenizer`` in haotian-liu/LLaVA
    ``llava/model/llava_arch.py`` (``mm_use_im_start_end`` with ``pretrain_mm_mlp_adapter``);
    ``torch.load`` with weights_only=True here (LLaVA's call loads the same dict)."""
    mm_projector_weights = torch.load(adapter, map_location="cpu", weights_only=True)
    embed_tokens_weight = mm_projector_weights["model.embed_tokens.weight"]
    assert num_new_tokens == 2
    if input_embeddings.shape == embed_tokens_weight.shape:
        input_embeddings[-num_new_tokens:] = embed_tokens_weight[-num_new_tokens:]
    elif embed_tokens_weight.shape[0] == num_new_tokens:
        input_embeddings[-num_new_tokens:] = embed_tokens_weight
    else:
        raise ValueError(f"Unexpected embed_tokens_weight shape {embed_tokens_weight.shape}")


def _llava_get_w(weights: dict, keyword: str) -> dict:
    """``get_w`` of ``initialize_vision_modules`` (LLaVA and LLaVA-NeXT ``llava_arch.py``)."""
    return {k.split(keyword + ".")[1]: v for k, v in weights.items() if keyword in k}


def _llava_mm_projector() -> torch.nn.Module:
    """``build_vision_projector`` for ``mlp2x_gelu`` (LLaVA ``multimodal_projector/builder.py``)."""
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 24))


# ----------------------------------------------------------------- tests
def test_stage1_embed_tokens_read_listed_merged_and_loaded_by_llava(tmp_path, capsys):
    paths = [_stage1_adapter(tmp_path, k) for k in range(3)]
    p = load_projector(paths[0])
    assert set(p.extras) == {EMBED} and torch.equal(p.extras[EMBED], _embed(0))
    assert EMBED not in p.original_state_dict()  # the projector itself is unchanged

    info = inspect_checkpoint(paths[0]).to_dict()
    assert info["extras"] == [{"key": EMBED, "shape": [VOCAB + NEW, HIDDEN], "dtype": "float16"}]
    assert cli_main(["inspect", paths[0]]) == 0
    assert f"extra  : {EMBED} [{VOCAB + NEW}, {HIDDEN}] float16" in capsys.readouterr().out
    assert cli_main(["inspect", paths[0], "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["extras"][0]["key"] == EMBED

    result = _merge(paths, "pivotmerge")
    got = result.projector.extras[EMBED]
    want_new = torch.stack([_embed(k)[-NEW:].float() for k in range(3)]).mean(0).half()
    assert got.dtype == torch.float16
    assert torch.equal(got[:-NEW], _embed(0)[:-NEW])  # untouched vocabulary kept bit for bit
    assert torch.equal(got[-NEW:], want_new)  # trained rows averaged
    (entry,) = result.report["extras"]
    assert entry["key"] == EMBED and entry["rows_differing"] == NEW and "averaged" in entry["action"]

    out, _, card = pipeline.save_result(result, tmp_path / "out")
    assert "## Other tensors of the adapter file" in card.read_text() and EMBED in card.read_text()
    # LLaVA's initialize_vision_tokenizer reads the new-token rows from the merged file
    input_embeddings = torch.zeros(VOCAB + NEW, HIDDEN, dtype=torch.float16)
    _llava_initialize_vision_tokenizer_embeddings(str(out), input_embeddings, NEW)
    assert torch.equal(input_embeddings[-NEW:], want_new)
    # ... and initialize_vision_modules loads the projector from it with strict=True
    mm = _llava_mm_projector()
    mm.load_state_dict(_llava_get_w(torch.load(out, weights_only=True), "mm_projector"), strict=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(mm(x), result.projector.forward(x))


def test_identical_extras_pass_through_bit_for_bit_and_resampler_loads(tmp_path):
    paths = [_stage1_adapter(tmp_path, k, resampler=True, embed=False) for k in range(2)]
    src = torch.load(paths[0], weights_only=True)
    result = _merge(paths)
    assert {e["action"] for e in result.report["extras"]} == {"passed through (identical in the experts)"}
    out = write_projector(result.projector, tmp_path / "out")
    sd = torch.load(out, weights_only=True)
    for key in ("model.vision_resampler.proj.weight", "model.vision_resampler.proj.bias"):
        assert torch.equal(sd[key], src[key])
    # LLaVA-NeXT's initialize_vision_modules: get_w(..., "vision_resampler") into the resampler
    resampler = torch.nn.Module()
    resampler.proj = torch.nn.Linear(16, 16)
    resampler.load_state_dict(_llava_get_w(sd, "vision_resampler"), strict=True)
    _llava_mm_projector().load_state_dict(_llava_get_w(sd, "mm_projector"), strict=True)


def test_hf_layout_adapter_extras_round_trip_in_safetensors(tmp_path):
    """A projector-only HF-layout file with an unknown extra tensor keeps it (auto format)."""
    g = torch.Generator().manual_seed(0)
    paths = []
    for k in range(2):
        sd = {
            "multi_modal_projector.linear_1.weight": torch.randn(32, 16, generator=g),
            "multi_modal_projector.linear_1.bias": torch.randn(32, generator=g),
            "multi_modal_projector.linear_2.weight": torch.randn(24, 32, generator=g),
            "multi_modal_projector.linear_2.bias": torch.randn(24, generator=g),
            "adapter_scale": torch.tensor([1.0, 2.0 + k]),
        }
        path = tmp_path / f"e{k}" / "model.safetensors"
        path.parent.mkdir()
        save_file(sd, str(path))
        paths.append(str(path))
    assert inspect_checkpoint(paths[0]).extras == [("adapter_scale", (2,), "float32")]
    result = _merge(paths)
    out = write_projector(result.projector, tmp_path / "out")
    assert torch.equal(load_file(str(out))["adapter_scale"], torch.tensor([1.0, 2.5]))
    with pytest.raises(OutputError, match="adapter_scale"):
        write_projector(result.projector, tmp_path / "hf", fmt="hf-llava")


def test_full_model_files_carry_nothing():
    proj = ["model.mm_projector.0.weight", "model.mm_projector.0.bias"]
    full = [*proj, EMBED, "model.layers.0.self_attn.q_proj.weight", "lm_head.weight"]
    assert adapter_extras(full, proj) == []
    assert adapter_extras([*proj, *(f"extra{i}" for i in range(100))], proj) == []  # too many
    resampler = ["model.vision_resampler.perceiver.layers.0.attn.weight", EMBED]
    assert adapter_extras([*proj, *resampler], proj) == sorted(resampler)


def test_extras_with_different_shapes_are_refused_at_plan(tmp_path):
    paths = [_stage1_adapter(tmp_path, k) for k in range(2)]
    sd = torch.load(paths[1], weights_only=True)
    sd[EMBED] = sd[EMBED][:-1]
    torch.save(sd, paths[1])
    with pytest.raises(IncompatibleExperts, match="embed_tokens"):
        pipeline.plan(Recipe.from_dict({"merge_method": "linear", "models": [{"model": p} for p in paths]}))


def test_extra_in_some_experts_is_carried_with_a_warning(tmp_path):
    paths = [_stage1_adapter(tmp_path, 0), _stage1_adapter(tmp_path, 1, embed=False)]
    plan = pipeline.plan(Recipe.from_dict({"merge_method": "linear", "models": [{"model": p} for p in paths]}))
    assert any(EMBED in w and "1 of 2 experts" in w for w in plan.warnings)
    result = pipeline.run(plan)
    assert torch.equal(result.projector.extras[EMBED], _embed(0))


def test_merge_rows_keeps_equal_rows_and_averages_the_others():
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]], dtype=torch.bfloat16)
    b = a.clone()
    b[1, 0] = 5.0
    merged, rows, differ = merge_rows([a, b])
    assert (rows, differ) == (3, 1)
    assert torch.equal(merged, torch.tensor([[1.0, 2.0], [4.0, 4.0], [5.0, 6.0]], dtype=torch.bfloat16))
    ints = [torch.tensor([1, 2]), torch.tensor([1, 3])]
    merged, _, differ = merge_rows(ints)
    assert differ == 1 and torch.equal(merged, ints[0])
