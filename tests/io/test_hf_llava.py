"""HF Llava output loads strictly into a tiny transformers Llava; HF folders read back."""

from __future__ import annotations

import json

import pytest
import torch

from pivotmerge_gui.core.errors import OutputError
from pivotmerge_gui.core.io import inspect_checkpoint, load_projector, write_projector
from pivotmerge_gui.core.io.writers import hf_llava_state

from .cases import CASE_BY_ID, llava_mlp

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def tiny_llava():
    """Random LlavaForConditionalGeneration from configs (no download): text hidden 32,
    vision hidden 16 (so a transposed projector cannot load), image 8x8, patch 2."""
    from tests.evaluation.llava_tiny import tiny_llava as build

    return build(seed=0)


def _mm(model):
    return getattr(model, "model", model).multi_modal_projector


def _llava_projector(tmp_path, seed=0):
    torch.manual_seed(seed)
    module = llava_mlp(16, 32, 2)
    state = {"model.mm_projector." + k: v.detach().clone() for k, v in module.state_dict().items()}
    torch.save(state, tmp_path / "mm_projector.bin")
    return module, load_projector(tmp_path / "mm_projector.bin")


def test_llava_to_hf_llava_loads_strict_and_computes_the_same(tmp_path, tiny_llava):
    from safetensors import safe_open
    from safetensors.torch import load_file

    module, p = _llava_projector(tmp_path)
    out = write_projector(p, tmp_path / "out", fmt="hf-llava", metadata={"recipe": "merge_method: linear\n"})
    assert out.name == "model.safetensors"
    state = load_file(str(out))
    assert set(state) == {f"multi_modal_projector.linear_{i}.{r}" for i in (1, 2) for r in ("weight", "bias")}
    with safe_open(str(out), "pt") as fh:
        assert fh.metadata() == {"format": "pt", "recipe": "merge_method: linear\n"}
    proj = _mm(tiny_llava)
    proj.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in state.items()}, strict=True)
    x = torch.randn(5, 16)
    with torch.no_grad():
        torch.testing.assert_close(proj(x), module(x))
        torch.testing.assert_close(proj(x), p.forward(x))


def test_hf_llava_round_trip_from_save_pretrained_single_and_sharded(tmp_path, tiny_llava):
    proj = _mm(tiny_llava)
    want = {f"multi_modal_projector.{k}": v for k, v in proj.state_dict().items()}
    single = tmp_path / "single"
    tiny_llava.save_pretrained(single)
    sharded = tmp_path / "sharded"
    tiny_llava.save_pretrained(sharded, max_shard_size="20KB")
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    for folder in (single, sharded):
        p = load_projector(folder)
        assert p.family == "hf-llava"
        got = p.original_state_dict()
        assert set(got) == set(want)
        assert all(torch.equal(got[k], want[k]) for k in want)
        x = torch.randn(3, 16)
        with torch.no_grad():
            torch.testing.assert_close(p.forward(x), proj(x))
        info = inspect_checkpoint(folder)
        assert info.sha256 == p.sha256 and info.family == "hf-llava"
    p = load_projector(sharded)
    needed = {index["weight_map"][k] for k in want}
    assert {f.split("/")[-1] for f in p.files} == needed  # only the projector's shard(s)
    assert p.metadata["sha256_of"] == "tensors"
    # the model file written back (auto) loads strictly into the model again
    out = write_projector(p, tmp_path / "out")
    from safetensors.torch import load_file

    proj.load_state_dict({k.removeprefix("multi_modal_projector."): v for k, v in load_file(str(out)).items()}, strict=True)


def test_hf_llava_to_llava_bin(tmp_path, tiny_llava):
    tiny_llava.save_pretrained(tmp_path / "hf")
    p = load_projector(tmp_path / "hf")
    out = write_projector(p, tmp_path / "out", fmt="llava-bin")
    weights = torch.load(out, weights_only=True)
    assert set(weights) == {f"model.mm_projector.{i}.{r}" for i in (0, 2) for r in ("weight", "bias")}
    target = llava_mlp(16, 32, 2)
    target.load_state_dict({k.split("mm_projector.")[1]: v for k, v in weights.items()}, strict=True)
    x = torch.randn(2, 16)
    with torch.no_grad():
        torch.testing.assert_close(target(x), p.forward(x))


def test_llava_next_mlp_maps_image_newline(tmp_path):
    _, _, path = CASE_BY_ID["llava-next-mlp"].save(tmp_path)
    p = load_projector(path)
    state = hf_llava_state(p)
    assert set(state) == {"image_newline"} | {f"multi_modal_projector.linear_{i}.{r}" for i in (1, 2) for r in ("weight", "bias")}
    assert torch.equal(state["image_newline"], p.layer("image_newline").weight)


@pytest.mark.parametrize("case_id", ["llava-linear", "llava-mlp3x", "llava-next-res", "qwen2-vl", "internvl", "paligemma"])
def test_no_hf_llava_equivalent_is_a_typed_error(tmp_path, case_id):
    _, _, path = CASE_BY_ID[case_id].save(tmp_path / "in")
    p = load_projector(path)
    with pytest.raises(OutputError, match="no HF Llava equivalent"):
        write_projector(p, tmp_path / "out", fmt="hf-llava")
    assert not (tmp_path / "out" / "model.safetensors").exists()


def test_non_llava_as_llava_bin_is_a_typed_error(tmp_path):
    _, _, path = CASE_BY_ID["qwen2-vl"].save(tmp_path / "in")
    with pytest.raises(OutputError, match="mm_projector.bin"):
        write_projector(load_projector(path), tmp_path / "out", fmt="llava-bin")
