"""Full-model export from Hub ids (online through a fake Hub, offline from a cache layout)
and ``--push-to-hub`` (huggingface_hub mocked; no test touches the network)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core.errors import HubError
from pivotmerge_gui.core.io.export import check_push_target, export_model, open_model, push_to_hub

from .test_export import make_experts, merge, projector_state, synthetic_model, write_recipe
from .test_hub import _cache_repo, online  # noqa: F401 - the fake Hub fixture

SHARDS = [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]


def _remote(remote: Path) -> None:
    """A Hub repo: the model plus files an export does not need."""
    synthetic_model(remote / "m")
    for p in (remote / "m").rglob("*"):
        if p.is_file():
            dst = remote / p.relative_to(remote / "m")
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(p, dst)
    shutil.rmtree(remote / "m")
    (remote / "pytorch_model.bin").write_bytes(b"other format")
    (remote / "flax_model.msgpack").write_bytes(b"flax")
    (remote / ".gitattributes").write_text("*.safetensors filter=lfs")
    (remote / "onnx").mkdir()
    (remote / "onnx" / "model.onnx").write_bytes(b"onnx")


@pytest.fixture
def online_model(online):  # noqa: F811 - uses the imported fixture
    """The fake Hub of :mod:`.test_hub` serving :func:`_remote`'s repo."""
    _remote(online.remote)
    return online


def test_hub_model_fetches_only_what_the_folder_needs_with_progress(online_model, tmp_path):
    hub = online_model
    events = []
    target = open_model("org/tiny-llava", progress=events.append)
    # checking the fit needs the config, the index and the projector's shard only
    assert hub.fetched == ["config.json", "model.safetensors.index.json", SHARDS[2]]
    result = merge(make_experts(tmp_path / "e", projector_state(hub.remote, "multi_modal_projector")))
    rep = export_model(result, target, tmp_path / "out", progress=events.append)
    assert sorted(hub.fetched) == sorted(["config.json", "model.safetensors.index.json", "tokenizer.json", *SHARDS])
    assert rep.rewritten == [SHARDS[2]] and sorted(rep.linked) == SHARDS[:2]
    assert sorted(p.name for p in rep.out.iterdir()) == sorted(
        ["README.md", "recipe.yml", "config.json", "model.safetensors.index.json", "tokenizer.json", *SHARDS])
    downloads = [e for e in events if e.stage == "download"]
    assert downloads and any(e.payload and e.payload.get("bytes") for e in downloads)
    assert all(0.0 <= e.fraction <= 1.0 for e in events) and events[-1].stage == "done"
    front = yaml.safe_load((rep.out / "README.md").read_text().split("---")[1])
    assert front["base_model"] == "org/tiny-llava" and "merge_base" in front
    for name in SHARDS[:2]:
        assert (rep.out / name).read_bytes() == (hub.remote / name).read_bytes()


def test_offline_uses_the_cache_and_says_what_is_missing(tmp_path):
    with pytest.raises(HubError, match="HF_HUB_OFFLINE"):
        open_model("org/never-downloaded")
    remote = tmp_path / "remote"
    _remote(remote)
    names = ["config.json", "model.safetensors.index.json", "tokenizer.json", *SHARDS]
    snap = _cache_repo("org/tiny-llava", {n: remote / n for n in names})
    result = merge(make_experts(tmp_path / "e", projector_state(remote, "multi_modal_projector")))
    rep = export_model(result, "org/tiny-llava", tmp_path / "out")
    assert rep.rewritten == [SHARDS[2]]
    # a snapshot folder of the cache given as a path still names its repo as the base model
    assert open_model(str(snap)).base_model == "org/tiny-llava"
    (snap / SHARDS[0]).unlink()
    with pytest.raises(HubError, match="not in the local Hub cache"):
        export_model(result, "org/tiny-llava", tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


class _Uploads:
    def __init__(self) -> None:
        self.calls = []

    def create_repo(self, repo_id, *, private=None, exist_ok=False, repo_type=None, **_):
        self.calls.append(("create", repo_id, private, exist_ok))

    def upload_folder(self, *, repo_id, folder_path, repo_type=None, commit_message=None, **_):
        self.calls.append(("upload", repo_id, sorted(p.name for p in Path(folder_path).iterdir())))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/1"})()


@pytest.fixture
def uploads(monkeypatch):
    import huggingface_hub

    up = _Uploads()
    monkeypatch.setattr(huggingface_hub, "create_repo", up.create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", up.upload_folder)
    return up


def test_push_to_hub_is_private_by_default(tmp_path, uploads, monkeypatch, capsys):
    model = synthetic_model(tmp_path / "model")
    experts = make_experts(tmp_path / "e", projector_state(model, "multi_modal_projector"))
    recipe = write_recipe(tmp_path / "r.yml", experts)
    argv = ["merge", str(recipe), str(tmp_path / "out"), "--into", str(model), "--push-to-hub", "me/merged", "-q"]
    assert cli_main(argv) == 2  # HF_HUB_OFFLINE is set by the test suite: refused before the merge
    assert "HF_HUB_OFFLINE" in capsys.readouterr().err and not uploads.calls
    assert not (tmp_path / "out").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert cli_main(argv) == 0
    assert "pushed to https://huggingface.co/me/merged/commit/1" in capsys.readouterr().out
    assert uploads.calls[0] == ("create", "me/merged", True, True)
    assert uploads.calls[1][:2] == ("upload", "me/merged") and "model-00003-of-00003.safetensors" in uploads.calls[1][2]
    assert push_to_hub(tmp_path / "out", "me/public", private=False).endswith("/commit/1")
    assert uploads.calls[2] == ("create", "me/public", False, True)
    for bad in ("nope", "me/merged@v1", "me/merged:file.bin"):
        with pytest.raises(HubError, match="ORG/NAME"):
            check_push_target(bad)


def test_upload_failure_is_a_hub_error(tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")

    def refuse(*_a, **_k):
        raise PermissionError("403 Forbidden: not your namespace")

    monkeypatch.setattr(huggingface_hub, "create_repo", refuse)
    with pytest.raises(HubError, match="cannot upload: PermissionError: 403 Forbidden"):
        push_to_hub(tmp_path, "someone/else")
