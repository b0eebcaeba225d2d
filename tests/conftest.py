"""Shared fixtures: isolated user dirs, offline Hub, Qt offscreen, tiny projectors.

Fixtures only; helpers that tests import live in :mod:`tests.factories`."""

from __future__ import annotations

import os

os.environ.setdefault("QT_QPA_PLATFORM", "offscreen")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

import pytest
import torch

from tests.factories import make_mlp_projector


@pytest.fixture(autouse=True)
def _isolated_user_dirs(tmp_path_factory, monkeypatch):
    """Keep user settings, caches and logs of every test in its own temp folder."""
    root = tmp_path_factory.mktemp("userdirs")
    for var in ("XDG_CONFIG_HOME", "XDG_DATA_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME"):
        monkeypatch.setenv(var, str(root / var.lower()))
    monkeypatch.setenv("HF_HOME", str(root / "hf"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture
def mlp_projector_factory():
    return make_mlp_projector


@pytest.fixture
def one_torch_thread():
    """Run torch single-threaded: the demo models are tiny, and on a busy 2-core machine two
    intra-op threads per process make them an order of magnitude slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def demo_world():
    """The shipped demo world (encoder, LM, data); skips where its artifacts are not built."""
    kit = pytest.importorskip("pivotmerge_gui.demo.kit")
    from pivotmerge_gui.core.errors import PivotMergeError

    try:
        return kit.load_world()
    except PivotMergeError as e:
        pytest.skip(str(e))
