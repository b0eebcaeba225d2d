"""Hub ids: offline from a real cache layout, online through monkeypatched huggingface_hub.

No test here touches the network: offline tests read a cache folder built in tmp, online
tests replace ``list_repo_files`` / ``hf_hub_download`` with local fakes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pivotmerge_gui.core.errors import HubError
from pivotmerge_gui.core.io import inspect_checkpoint, load_projector, parse_hub_id
from pivotmerge_gui.core.io.hub import hub_cache_dir

from .cases import CASE_BY_ID

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def test_parse_hub_id():
    assert parse_hub_id("liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5") == (
        "liuhaotian/llava-v1.5-mlp2x-336px-pretrain-vicuna-7b-v1.5", None, None)
    assert parse_hub_id("org/name@v1.0") == ("org/name", "v1.0", None)
    assert parse_hub_id("org/name@refs/pr/3:sub/mm_projector.bin") == ("org/name", "refs/pr/3", "sub/mm_projector.bin")
    assert parse_hub_id("org/name:model.safetensors") == ("org/name", None, "model.safetensors")
    assert parse_hub_id("dir/mm_projector.bin") is None  # a missing local file, not a repo
    assert parse_hub_id("/abs/path") is None and parse_hub_id("a/b/c") is None


def _cache_repo(repo: str, files: dict[str, Path], revision: str = "main", commit: str = COMMIT) -> Path:
    """The huggingface_hub cache layout: refs/<rev> -> commit, snapshots/<commit>/<files>."""
    root = hub_cache_dir() / ("models--" + repo.replace("/", "--"))
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / revision).write_text(commit)
    snap = root / "snapshots" / commit
    for name, src in files.items():
        dst = snap / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dst)
    return snap


def test_offline_reads_the_cache(tmp_path):
    _, state, path = CASE_BY_ID["llava-mlp2x"].save(tmp_path / "src")
    _cache_repo("org/proj", {"mm_projector.bin": path, "README.md": path})
    p = load_projector("org/proj")
    assert p.family == "llava-mlp2x_gelu" and p.source == "org/proj"
    assert all(torch.equal(p.original_state_dict()[k], v) for k, v in state.items())
    assert inspect_checkpoint("org/proj").sha256 == p.sha256


def test_offline_revision_and_filename(tmp_path):
    _, _, a = CASE_BY_ID["llava-mlp2x"].save(tmp_path / "a", seed=1)
    _, _, b = CASE_BY_ID["paligemma"].save(tmp_path / "b", seed=2)
    _cache_repo("org/proj", {"mm_projector.bin": a}, revision="main", commit=COMMIT)
    _cache_repo("org/proj", {"sub/weights.safetensors": b}, revision="v2", commit="f" * 40)
    assert load_projector("org/proj").family == "llava-mlp2x_gelu"
    assert load_projector("org/proj@v2:sub/weights.safetensors").family == "paligemma"
    assert load_projector(f"org/proj@{'f' * 40}:sub/weights.safetensors").family == "paligemma"


def test_offline_sharded_needs_only_the_projector_shard(tmp_path):
    state = CASE_BY_ID["hf-llava-file"].build()[1]
    src = tmp_path / "src"
    src.mkdir()
    proj = {k: v for k, v in state.items() if k.startswith("multi_modal_projector")}
    save_file(proj, str(src / "model-00002-of-00002.safetensors"))
    wm = {k: ("model-00002-of-00002.safetensors" if k in proj else "model-00001-of-00002.safetensors") for k in state}
    (src / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    # the LM shard was never downloaded: offline reading must not need it
    _cache_repo("org/big", {n: src / n for n in ("model.safetensors.index.json", "model-00002-of-00002.safetensors")})
    p = load_projector("org/big")
    assert p.family == "hf-llava" and len(p.files) == 1


def test_offline_not_cached_is_actionable(tmp_path):
    with pytest.raises(HubError) as err:
        load_projector("org/never-downloaded")
    assert "HF_HUB_OFFLINE" in str(err.value) and "local Hub cache" in str(err.value)
    _, _, a = CASE_BY_ID["llava-mlp2x"].save(tmp_path / "a")
    _cache_repo("org/proj", {"mm_projector.bin": a})
    with pytest.raises(HubError, match="not in the local Hub cache"):
        load_projector("org/proj:other.safetensors")


class _FakeHub:
    """Serves files of a local folder like the Hub would; records what was fetched."""

    def __init__(self, remote: Path, cache: Path) -> None:
        self.remote, self.cache, self.fetched = remote, cache, []

    def list_repo_files(self, repo_id, revision=None, **_):
        return sorted(str(p.relative_to(self.remote)) for p in self.remote.rglob("*") if p.is_file())

    def hf_hub_download(self, repo_id, filename, *, revision=None, cache_dir=None, local_files_only=False,
                        tqdm_class=None, **_):
        assert not local_files_only
        src = self.remote / filename
        if not src.exists():
            from huggingface_hub.errors import EntryNotFoundError

            raise EntryNotFoundError(f"{filename} not found")
        self.fetched.append(filename)
        dst = Path(cache_dir) / "fake" / (revision or "main") / filename
        dst.parent.mkdir(parents=True, exist_ok=True)
        size = src.stat().st_size
        if tqdm_class is not None:
            # the same helper huggingface_hub's http_get uses to build its bar
            import logging

            from huggingface_hub.utils.tqdm import _get_progress_bar_context

            with _get_progress_bar_context(desc=filename, log_level=logging.INFO, total=size,
                                           tqdm_class=tqdm_class, name="huggingface_hub.http_get") as bar:
                bar.update(size // 2)
                bar.update(size - size // 2)
        shutil.copyfile(src, dst)
        return str(dst)


@pytest.fixture
def online(monkeypatch, tmp_path):
    import huggingface_hub

    remote = tmp_path / "remote"
    remote.mkdir()
    fake = _FakeHub(remote, tmp_path / "cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub, "list_repo_files", fake.list_repo_files)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake.hf_hub_download)
    return fake


def test_online_downloads_only_index_and_projector_shard_with_progress(online, capsys):
    state = CASE_BY_ID["hf-llava-file"].build()[1]
    proj = {k: v for k, v in state.items() if k.startswith("multi_modal_projector")}
    lm = {k: v for k, v in state.items() if k not in proj}
    save_file(lm, str(online.remote / "model-00001-of-00002.safetensors"))
    save_file(proj, str(online.remote / "model-00002-of-00002.safetensors"))
    wm = {k: "model-00001-of-00002.safetensors" for k in lm} | {k: "model-00002-of-00002.safetensors" for k in proj}
    (online.remote / "model.safetensors.index.json").write_text(json.dumps({"weight_map": wm}))
    (online.remote / "config.json").write_text("{}")
    events = []
    p = load_projector("org/model", progress=events.append)
    assert online.fetched == ["model.safetensors.index.json", "model-00002-of-00002.safetensors"]
    assert p.family == "hf-llava"
    downloads = [e for e in events if e.stage == "download"]
    assert downloads and downloads[-1].fraction == pytest.approx(1.0)
    assert any(e.payload and e.payload.get("bytes") for e in downloads)
    assert all(0.0 <= e.fraction <= 1.0 for e in events)
    assert events[-1].stage == "load" and events[-1].fraction == 1.0
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""  # core prints nothing, progress bars included


def test_online_single_file_and_ambiguity(online):
    _, _, path = CASE_BY_ID["llava-mlp2x"].save(online.remote)
    assert load_projector("org/stage1").family == "llava-mlp2x_gelu"
    assert online.fetched == ["mm_projector.bin"]
    shutil.copyfile(path, online.remote / "other.pt")
    path.unlink()
    (online.remote / "extra.ckpt").write_bytes(b"x")
    with pytest.raises(HubError, match="several checkpoint files"):
        load_projector("org/stage1")


def test_online_errors_become_hub_errors(online, monkeypatch):
    import importlib

    import huggingface_hub
    from huggingface_hub import errors
    from huggingface_hub.errors import RepositoryNotFoundError

    # the HTTP library huggingface_hub builds its errors from (httpx, or httpx2 in 2.x)
    httpx = importlib.import_module(errors.Response.__module__.split(".")[0])

    def missing(*_a, **_k):
        raise RepositoryNotFoundError("404", response=httpx.Response(404, request=httpx.Request("GET", "https://x")))

    monkeypatch.setattr(huggingface_hub, "list_repo_files", missing)
    with pytest.raises(HubError, match="repository org/missing not found"):
        load_projector("org/missing")

    def offline_error(*_a, **_k):
        raise ConnectionError("network unreachable")

    monkeypatch.setattr(huggingface_hub, "list_repo_files", offline_error)
    with pytest.raises(HubError, match="network unreachable"):
        load_projector("org/anything")
    with pytest.raises(HubError, match="'nope.safetensors' not found"):
        load_projector("org/anything:nope.safetensors")
