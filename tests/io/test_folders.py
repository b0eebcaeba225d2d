"""Folder inputs: which file is read, containers, pickle shards, safetensors sets."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from pivotmerge_gui.core.errors import CheckpointError
from pivotmerge_gui.core.io import load_projector, write_projector

from .cases import CASE_BY_ID


def test_stage1_folder_reads_mm_projector_bin(tmp_path):
    _, state, path = CASE_BY_ID["llava-mlp2x"].save(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "trainer_state.json").write_text("{}")
    (tmp_path / "checkpoint-500").mkdir()
    p = load_projector(tmp_path)
    assert p.files == (str(path),) and p.family == "llava-mlp2x_gelu"


def test_safetensors_preferred_over_pickle(tmp_path):
    _, st_state, st_path = CASE_BY_ID["hf-llava-file"].save(tmp_path, seed=1)
    torch.save(CASE_BY_ID["hf-llava-file"].build(seed=2)[1], tmp_path / "pytorch_model.bin")
    p = load_projector(tmp_path)
    assert p.files == (str(st_path),)
    assert torch.equal(p.original_state_dict()["multi_modal_projector.linear_1.weight"],
                       st_state["multi_modal_projector.linear_1.weight"])


def test_lightning_state_dict_container_and_flat_llava_output(tmp_path):
    _, state = CASE_BY_ID["llava-mlp2x"].build()
    path = tmp_path / "last.ckpt"
    torch.save({"state_dict": state, "epoch": 2, "global_step": 100, "hparams": {"lr": 1e-3}}, path)
    p = load_projector(path)
    assert p.family == "llava-mlp2x_gelu" and p.metadata["container_key"] == "state_dict"
    out = write_projector(p, tmp_path / "out")
    assert set(torch.load(out, weights_only=True)) == set(state)  # LLaVA wants the flat dict


def test_pickle_shards_via_index(tmp_path):
    _, state = CASE_BY_ID["hf-llava-file"].build()
    proj = {k: v for k, v in state.items() if k.startswith("multi_modal_projector")}
    lm = {k: v for k, v in state.items() if k not in proj}
    torch.save(lm, tmp_path / "pytorch_model-00001-of-00002.bin")
    torch.save(proj, tmp_path / "pytorch_model-00002-of-00002.bin")
    wm = {k: "pytorch_model-00001-of-00002.bin" for k in lm} | {k: "pytorch_model-00002-of-00002.bin" for k in proj}
    (tmp_path / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": wm}))
    (tmp_path / "pytorch_model-00001-of-00002.bin").unlink()  # not needed for the projector
    p = load_projector(tmp_path)
    assert p.family == "hf-llava" and p.files == (str(tmp_path / "pytorch_model-00002-of-00002.bin"),)
    assert all(torch.equal(p.original_state_dict()[k], v) for k, v in proj.items())
    assert p.metadata["sha256_of"] == "tensors"


def test_several_safetensors_without_index_form_one_key_space(tmp_path):
    _, state = CASE_BY_ID["hf-llava-file"].build()
    keys = sorted(state)
    save_file({k: state[k] for k in keys[:3]}, str(tmp_path / "part-a.safetensors"))
    save_file({k: state[k] for k in keys[3:]}, str(tmp_path / "part-b.safetensors"))
    p = load_projector(tmp_path)
    assert p.family == "hf-llava"
    assert set(p.original_state_dict()) == {k for k in keys if k.startswith("multi_modal_projector")}
    save_file({keys[0]: state[keys[0]]}, str(tmp_path / "part-c.safetensors"))
    with pytest.raises(CheckpointError, match="also appears"):
        load_projector(tmp_path)


def test_several_pickles_are_ambiguous(tmp_path):
    torch.save(CASE_BY_ID["llava-mlp2x"].build()[1], tmp_path / "a.pt")
    torch.save(CASE_BY_ID["llava-mlp2x"].build()[1], tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="several checkpoint files"):
        load_projector(tmp_path)
