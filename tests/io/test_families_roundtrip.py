"""Every family: detect, build layers/ops, forward == torch reference, write auto, reload."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.io import (
    detect_family,
    inspect_checkpoint,
    load_projector,
    write_projector,
)
from pivotmerge_gui.core.io.families import FAMILIES

from .cases import CASES, Case

IDS = [c.id for c in CASES]


def _tokens(case: Case, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(case.tokens, case.d_in, generator=g)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_load_forward_matches_reference(case: Case, tmp_path):
    module, state, path = case.save(tmp_path / "in")
    p = load_projector(path)
    assert p.family == case.family
    assert p.files == (str(path),)
    # keys are the ORIGINAL keys, prefix included; unrelated tensors are not part of it
    assert set(p.original_state_dict()) == case.projector_keys(state)
    for key, t in p.original_state_dict().items():
        assert torch.equal(t, state[key]), key
    x = _tokens(case)
    with torch.no_grad():
        ref = module(x)
    out = p.forward(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert len(p.sha256) == 64


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_write_auto_round_trip(case: Case, tmp_path):
    _, state, path = case.save(tmp_path / "in")
    p = load_projector(path)
    out = write_projector(p, tmp_path / "out")
    expected_name = {"mm_projector.bin": "mm_projector.bin"}.get(case.filename, "model.safetensors")
    if case.container:
        expected_name = "checkpoint.pth"
    assert out.name == expected_name
    q = load_projector(out)
    assert q.family == p.family and q.ops == p.ops
    assert list(q.original_state_dict()) == list(p.original_state_dict())
    for key, t in p.original_state_dict().items():
        u = q.original_state_dict()[key]
        assert u.dtype == t.dtype and torch.equal(u, t), key
    if case.container:
        raw = torch.load(out, weights_only=True)
        assert set(raw) == {case.container}
        assert set(raw[case.container]) == case.projector_keys(state)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_detect_family_from_keys_and_inspect(case: Case, tmp_path):
    _, state, path = case.save(tmp_path / "in")
    spec, prefix = detect_family(state.keys())
    assert case.family == spec.name or case.family.startswith(spec.name + "-")
    assert case.prefix.startswith(prefix)
    info = inspect_checkpoint(path)
    p = load_projector(path)
    assert info.family == p.family
    assert info.num_params == p.num_params and info.nbytes == p.nbytes
    assert info.sha256 == p.sha256
    assert [l[0] for l in info.layers] == p.layer_names
    assert info.in_features == p.in_features and info.out_features == p.out_features
    d = info.to_dict()
    assert d["sha256_short"] == p.sha256[:12] and d["family"] == p.family


def test_llava_bf16_dtype_kept_and_llava_loader_accepts(tmp_path):
    case = next(c for c in CASES if c.id == "llava-mlp2x")
    _, state, path = case.save(tmp_path / "in", dtype=torch.bfloat16)
    p = load_projector(path)
    assert p.dtype == torch.bfloat16
    out = write_projector(p, tmp_path / "out")
    # LLaVA's --pretrain_mm_mlp_adapter loader (llava_arch.initialize_vision_modules)
    weights = torch.load(out, map_location="cpu")
    assert all(v.dtype == torch.bfloat16 for v in weights.values())
    get_w = {k.split("mm_projector.")[1]: v for k, v in weights.items() if "mm_projector" in k}
    target = torch.nn.Sequential(torch.nn.Linear(16, 24), torch.nn.GELU(), torch.nn.Linear(24, 24))
    target.load_state_dict(get_w, strict=True)
    assert list(weights) == list(state)


def test_every_family_has_a_round_trip_case():
    detected = {detect_family(c.build()[1].keys())[0].name for c in CASES}
    assert detected == {f.name for f in FAMILIES}


def test_sha256_of_projector_only_file_is_file_hash(tmp_path):
    from pivotmerge_gui.core.io import sha256_file

    case = next(c for c in CASES if c.id == "paligemma")
    _, _, path = case.save(tmp_path)
    p = load_projector(path)
    assert p.sha256 == sha256_file(path) and p.metadata["sha256_of"] == "file"
    case = next(c for c in CASES if c.id == "hf-llava-file")  # holds LM tensors too
    _, _, path = case.save(tmp_path / "b")
    p = load_projector(path)
    assert p.metadata["sha256_of"] == "tensors" and p.sha256 != sha256_file(path)
