"""Hostile and broken inputs: each one a typed error naming the file and the problem."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pivotmerge_gui.core.errors import CheckpointError, UnknownLayoutError, UnsafeCheckpointError
from pivotmerge_gui.core.io import inspect_checkpoint, load_projector
from pivotmerge_gui.core.io.safetensors_header import read_header

from .cases import CASE_BY_ID


def _raw_safetensors(path: Path, header: object, data: bytes = b"", header_len: int | None = None) -> Path:
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    n = len(raw) if header_len is None else header_len
    path.write_bytes(struct.pack("<Q", n) + raw + data)
    return path


def _projector_state() -> dict[str, torch.Tensor]:
    return CASE_BY_ID["hf-llava-file"].build()[1]


# ------------------------------------------------------------------ unsafe pickles
class _Payload:
    """Unpickling this calls ``open(target, "w")``: it would create a file."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (open, (self.target, "w"))


class _ShellPayload:
    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("payload_cls", [_Payload, _ShellPayload])
@pytest.mark.parametrize("container", ["torch-zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path, payload_cls, container):
    target = tmp_path / "pwned.txt"
    evil = {"model.mm_projector.0.weight": torch.zeros(2, 2), "x": payload_cls(str(target))}
    path = tmp_path / "mm_projector.bin"
    if container == "torch-zip":
        torch.save(evil, path)
    else:
        path.write_bytes(pickle.dumps(evil))
    assert not target.exists()
    with pytest.raises(UnsafeCheckpointError) as err:
        load_projector(path)
    assert not target.exists(), "the pickle payload ran"
    assert str(path) in str(err.value) and "weights_only" in str(err.value)
    with pytest.raises(UnsafeCheckpointError):
        inspect_checkpoint(tmp_path)  # via the folder too
    assert not target.exists()


# ------------------------------------------------------------------ pickles, broken
def test_empty_pickle(tmp_path):
    path = tmp_path / "mm_projector.bin"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_projector(path)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_pickle(tmp_path, legacy):
    _, state = CASE_BY_ID["llava-mlp2x"].build()
    full = tmp_path / "full.bin"
    torch.save(state, full, _use_new_zipfile_serialization=not legacy)
    path = tmp_path / "mm_projector.bin"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(CheckpointError) as err:
        load_projector(path)
    assert str(path) in str(err.value) and ("truncated" in str(err.value) or "corrupt" in str(err.value))


def test_legacy_non_zip_pickle_loads(tmp_path):
    case = CASE_BY_ID["llava-mlp2x"]
    _, state = case.build()
    path = tmp_path / "mm_projector.bin"
    torch.save(state, path, _use_new_zipfile_serialization=False)
    p = load_projector(path)
    assert p.family == "llava-mlp2x_gelu"
    assert all(torch.equal(p.original_state_dict()[k], v) for k, v in state.items())


def test_pickle_of_a_non_dict(tmp_path):
    path = tmp_path / "weights.pt"
    torch.save([torch.zeros(2)], path)
    with pytest.raises(CheckpointError, match="not a dict of tensors"):
        load_projector(path)


def test_text_file_named_bin(tmp_path):
    path = tmp_path / "mm_projector.bin"
    path.write_text("this is not a checkpoint at all")
    with pytest.raises(CheckpointError):
        load_projector(path)


# ------------------------------------------------------------------ safetensors, broken
def test_empty_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        read_header(path)
    with pytest.raises(CheckpointError, match="empty"):
        load_projector(path)


def test_truncated_safetensors_inside_data(tmp_path):
    full = tmp_path / "full.safetensors"
    save_file(_projector_state(), str(full))
    path = tmp_path / "model.safetensors"
    path.write_bytes(full.read_bytes()[:-40])
    with pytest.raises(CheckpointError, match="out of range"):
        load_projector(path)


def test_truncated_safetensors_inside_header(tmp_path):
    full = tmp_path / "full.safetensors"
    save_file(_projector_state(), str(full))
    path = tmp_path / "model.safetensors"
    path.write_bytes(full.read_bytes()[:30])
    with pytest.raises(CheckpointError, match="exceeds the file size"):
        load_projector(path)


def test_too_short_for_a_header(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x01\x02\x03")
    with pytest.raises(CheckpointError, match="truncated"):
        load_projector(path)


@pytest.mark.parametrize("n", [2**62, 2**64 - 1, 0])
def test_huge_negative_or_zero_header_length(tmp_path, n):
    path = _raw_safetensors(tmp_path / "model.safetensors", {}, data=b"\0" * 16, header_len=n)
    with pytest.raises(CheckpointError, match="header length"):
        load_projector(path)


def test_bad_json_header(tmp_path):
    path = _raw_safetensors(tmp_path / "model.safetensors", b"{not json at all")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_projector(path)


def test_header_not_an_object(tmp_path):
    path = _raw_safetensors(tmp_path / "model.safetensors", [1, 2])
    with pytest.raises(CheckpointError, match="not a JSON object"):
        load_projector(path)


def test_overlapping_offsets(tmp_path):
    header = {
        "multi_modal_projector.linear_1.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]},
        "multi_modal_projector.linear_1.bias": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]},
    }
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match="overlap"):
        load_projector(path)


def test_out_of_range_offsets(tmp_path):
    header = {"multi_modal_projector.linear_1.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 8)
    with pytest.raises(CheckpointError, match="out of range"):
        load_projector(path)


def test_size_mismatch_between_shape_and_offsets(tmp_path):
    header = {"multi_modal_projector.linear_1.weight": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 16]}}
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match="needs 24 bytes"):
        load_projector(path)


def test_unknown_dtype(tmp_path):
    header = {"multi_modal_projector.linear_1.weight": {"dtype": "F7", "shape": [2, 2], "data_offsets": [0, 16]}}
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 16)
    with pytest.raises(CheckpointError, match="unknown dtype 'F7'") as err:
        load_projector(path)
    assert "multi_modal_projector.linear_1.weight" in str(err.value)


def test_bad_metadata(tmp_path):
    path = _raw_safetensors(tmp_path / "model.safetensors", {"__metadata__": {"format": 1}})
    with pytest.raises(CheckpointError, match="__metadata__"):
        load_projector(path)


# ------------------------------------------------------------------ shards, folders, layouts
def _sharded(tmp_path: Path) -> Path:
    state = _projector_state()
    folder = tmp_path / "model"
    folder.mkdir()
    lm = {k: v for k, v in state.items() if k.startswith("language_model")}
    proj = {k: v for k, v in state.items() if not k.startswith("language_model")}
    save_file(lm, str(folder / "model-00001-of-00002.safetensors"), metadata={"format": "pt"})
    save_file(proj, str(folder / "model-00002-of-00002.safetensors"), metadata={"format": "pt"})
    wm = {k: "model-00001-of-00002.safetensors" for k in lm} | {k: "model-00002-of-00002.safetensors" for k in proj}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return folder


def test_index_pointing_at_missing_shard(tmp_path):
    folder = _sharded(tmp_path)
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as err:
        load_projector(folder)
    assert "model-00002-of-00002.safetensors" in str(err.value)


def test_missing_shard_without_projector_is_not_needed(tmp_path):
    folder = _sharded(tmp_path)
    (folder / "model-00001-of-00002.safetensors").unlink()  # the LM shard
    p = load_projector(folder)
    assert p.family == "hf-llava" and p.files == (str(folder / "model-00002-of-00002.safetensors"),)


def test_index_lies_about_a_key(tmp_path):
    folder = _sharded(tmp_path)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    idx["weight_map"]["multi_modal_projector.linear_1.weight"] = "model-00001-of-00002.safetensors"
    (folder / "model.safetensors.index.json").write_text(json.dumps(idx))
    with pytest.raises(CheckpointError, match="no such tensor"):
        load_projector(folder)


@pytest.mark.parametrize("text", ["", "{bad", json.dumps({"weight_map": [1]}), json.dumps({"weight_map": {"a": "../x.safetensors"}})])
def test_bad_index(tmp_path, text):
    folder = _sharded(tmp_path)
    (folder / "model.safetensors.index.json").write_text(text)
    with pytest.raises(CheckpointError) as err:
        load_projector(folder)
    assert "model.safetensors.index.json" in str(err.value)


def test_folder_with_no_checkpoint(tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="no checkpoint file"):
        load_projector(tmp_path)


def test_file_with_no_projector_lists_tensors_and_patterns(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"language_model.lm_head.weight": torch.zeros(4, 4), "vision.patch.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UnknownLayoutError) as err:
        load_projector(path)
    assert "language_model.lm_head.weight" in err.value.tensors
    assert any("mm_projector" in p for p in err.value.patterns)
    assert "patterns tried" in str(err.value) and str(path) in str(err.value)


def test_mixed_families_in_one_file(tmp_path):
    state = CASE_BY_ID["llava-mlp2x"].build()[1] | CASE_BY_ID["qwen2-vl"].build()[1]
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="more than one projector") as err:
        load_projector(path)
    assert "LLaVA" in str(err.value) and "Qwen2-VL" in str(err.value)


def test_wrong_bias_shape(tmp_path):
    state = _projector_state()
    state["multi_modal_projector.linear_1.bias"] = torch.zeros(5)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="linear_1.bias"):
        load_projector(path)


def test_width_chain_mismatch(tmp_path):
    state = _projector_state()
    state["multi_modal_projector.linear_2.weight"] = torch.zeros(24, 7)
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    with pytest.raises(CheckpointError, match="expects 7 inputs"):
        load_projector(path)


def test_nan_inf_are_warned_not_fatal(tmp_path):
    state = _projector_state()
    state["multi_modal_projector.linear_1.weight"][0, 0] = float("nan")
    state["multi_modal_projector.linear_2.bias"][1] = float("inf")
    path = tmp_path / "model.safetensors"
    save_file(state, str(path))
    p = load_projector(path)
    assert p.metadata["nonfinite_tensors"].split(",") == [
        "multi_modal_projector.linear_1.weight",
        "multi_modal_projector.linear_2.bias",
    ]
    assert "NaN or Inf" in p.metadata["warnings"]


def test_missing_path_and_dangling_and_looping_symlinks(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        load_projector(tmp_path / "nothing" / "mm_projector.bin")
    with pytest.raises(CheckpointError, match="no such file"):
        load_projector("some_dir/mm_projector.bin")  # looks like a path, not a Hub id
    (tmp_path / "dangling.bin").symlink_to(tmp_path / "gone.bin")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_projector(tmp_path / "dangling.bin")
    (tmp_path / "a.bin").symlink_to(tmp_path / "b.bin")
    (tmp_path / "b.bin").symlink_to(tmp_path / "a.bin")
    with pytest.raises(CheckpointError, match="symbolic link"):
        load_projector(tmp_path / "a.bin")


def test_unreadable_file(tmp_path):
    case = CASE_BY_ID["paligemma"]
    _, _, path = case.save(tmp_path)
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):
            pytest.skip("running as root: permissions do not stop reads")
        with pytest.raises(CheckpointError, match="cannot read"):
            load_projector(path)
    finally:
        os.chmod(path, 0o644)


def test_a_folder_named_like_a_file_is_unreadable_not_a_crash(tmp_path):
    (tmp_path / "model.safetensors").mkdir()
    with pytest.raises(CheckpointError):
        load_projector(tmp_path / "model.safetensors")


def test_non_utf8_and_unicode_paths(tmp_path):
    case = CASE_BY_ID["llava-mlp2x"]
    folder = Path(os.fsdecode(os.fsencode(str(tmp_path)) + b"/\xff\xfe-caf\xc3\xa9"))
    _, _, path = case.save(folder)
    p = load_projector(path)
    assert p.family == "llava-mlp2x_gelu"
    assert load_projector(folder).sha256 == p.sha256
    case = CASE_BY_ID["hf-llava-file"]
    _, state, path = case.save(folder / "hf")
    q = load_projector(path)
    assert q.family == "hf-llava"
    assert all(torch.equal(t, state[k]) for k, t in q.original_state_dict().items())
    assert inspect_checkpoint(path).sha256 == q.sha256


@pytest.mark.parametrize("case_id", ["paligemma", "llava-mlp2x"])
def test_permission_denied_is_a_checkpoint_error(tmp_path, monkeypatch, case_id):
    """Same as above but independent of the user (root reads everything): open() fails."""
    import builtins

    _, _, path = CASE_BY_ID[case_id].save(tmp_path)
    real_open = builtins.open

    def deny(file, *args, **kwargs):
        if os.fspath(file) == str(path):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", deny)
    with pytest.raises(CheckpointError, match="cannot read file: Permission denied") as err:
        load_projector(path)
    assert str(path) in str(err.value)


def test_overlap_hidden_behind_an_empty_tensor(tmp_path):
    header = {
        "multi_modal_projector.linear_1.weight": {"dtype": "F32", "shape": [5, 5], "data_offsets": [0, 100]},
        "multi_modal_projector.linear_1.bias": {"dtype": "F32", "shape": [0], "data_offsets": [0, 0]},
        "multi_modal_projector.linear_2.bias": {"dtype": "F32", "shape": [5], "data_offsets": [50, 70]},
    }
    path = _raw_safetensors(tmp_path / "model.safetensors", header, b"\0" * 100)
    with pytest.raises(CheckpointError, match="linear_1.weight' and '.*linear_2.bias' overlap"):
        read_header(path)
