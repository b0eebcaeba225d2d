"""Issue 15, item 10: the memory guard counts ``ulimit -v`` (RLIMIT_AS) and the memory
cgroup (v2 ``memory.max``, v1 ``memory.limit_in_bytes``), not only the system's free memory,
so a merge that cannot fit is refused up front instead of dying in ``std::bad_alloc``."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pivotmerge_gui.core import devices, pipeline
from pivotmerge_gui.core.errors import ResourceError
from pivotmerge_gui.core.recipe import Recipe

GiB = 2**30


def _write(folder: Path, files: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in files.items():
        (folder / name).write_text(text)


def test_cgroup_v2_limit_is_the_tightest_ancestor_minus_usage(tmp_path):
    _write(tmp_path, {"memory.max": "max"})
    _write(tmp_path / "user.slice", {"memory.max": str(3 * GiB), "memory.current": str(1 * GiB)})
    _write(tmp_path / "user.slice" / "job", {"memory.max": str(8 * GiB), "memory.current": str(GiB // 2),
                                             "memory.stat": f"anon 1\ninactive_file {GiB // 4}\n"})
    assert devices.cgroup_headroom(tmp_path, "0::/user.slice/job\n") == 2 * GiB  # the parent's 3 - 1
    (tmp_path / "user.slice" / "memory.max").write_text("max")
    assert devices.cgroup_headroom(tmp_path, "0::/user.slice/job\n") == 8 * GiB - GiB // 4
    (tmp_path / "user.slice" / "job" / "memory.max").write_text("max")
    assert devices.cgroup_headroom(tmp_path, "0::/user.slice/job\n") is None


def test_cgroup_v1_limit_and_its_no_limit_value(tmp_path):
    mem = tmp_path / "memory"
    _write(mem, {"memory.limit_in_bytes": "9223372036854771712", "memory.usage_in_bytes": str(GiB)})
    assert devices.cgroup_headroom(tmp_path, "4:memory:/\n0::/\n") is None
    _write(mem / "docker" / "abc", {"memory.limit_in_bytes": str(2 * GiB), "memory.usage_in_bytes": str(GiB),
                                    "memory.stat": f"total_inactive_file {GiB // 2}\n"})
    assert devices.cgroup_headroom(tmp_path, "4:memory:/docker/abc\n0::/\n") == GiB + GiB // 2
    # usage above the limit (cache not yet reclaimed) is no headroom, never negative
    (mem / "docker" / "abc" / "memory.usage_in_bytes").write_text(str(4 * GiB))
    assert devices.cgroup_headroom(tmp_path, "4:memory:/docker/abc\n") == 0
    assert devices.cgroup_headroom(tmp_path / "nothing", "") is None


def test_rlimit_as_headroom(monkeypatch):
    import resource

    monkeypatch.setattr(resource, "getrlimit", lambda which: (6 * GiB, resource.RLIM_INFINITY))
    monkeypatch.setattr(devices.psutil, "Process", lambda: SimpleNamespace(
        memory_info=lambda: SimpleNamespace(vms=2 * GiB)))
    assert devices.rlimit_headroom() == 4 * GiB
    monkeypatch.setattr(resource, "getrlimit", lambda which: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert devices.rlimit_headroom() is None


def test_host_memory_is_the_least_of_the_three(monkeypatch):
    monkeypatch.setattr(devices, "_system_available", lambda: 16 * GiB)
    monkeypatch.setattr(devices, "rlimit_headroom", lambda: None)
    monkeypatch.setattr(devices, "cgroup_headroom", lambda: 3 * GiB)
    assert devices.host_memory_available() == 3 * GiB
    monkeypatch.setattr(devices, "rlimit_headroom", lambda: GiB)
    assert devices.host_memory_available() == GiB
    assert pipeline.available_memory(torch.device("cpu")) == GiB
    for name in ("_system_available", "rlimit_headroom", "cgroup_headroom"):
        monkeypatch.setattr(devices, name, lambda: None)
    assert devices.host_memory_available() is None


def _wide_linear_experts(tmp_path: Path) -> Path:
    """Two LLaVA linear projectors [16, 4096]: 256 KiB files, but a merge workspace (two
    4096^2 Gram matrices) of 128 MiB in the estimate."""
    for i in range(2):
        (tmp_path / f"e{i}").mkdir()
        torch.save({"model.mm_projector.weight": torch.randn(16, 4096), "model.mm_projector.bias": torch.randn(16)},
                   tmp_path / f"e{i}" / "mm_projector.bin")
    recipe = tmp_path / "r.yml"
    recipe.write_text(f"merge_method: linear\nmodels:\n - model: {tmp_path / 'e0'}\n - model: {tmp_path / 'e1'}\n")
    return recipe


def test_a_cgroup_limit_refuses_the_merge_at_plan(tmp_path, monkeypatch):
    recipe = _wide_linear_experts(tmp_path)
    monkeypatch.setattr(devices, "cgroup_headroom", lambda: 32 * 2**20)
    with pytest.raises(ResourceError, match=r"cpu: the merge needs about 0\.\d GiB but only 0\.0 GiB is available"):
        pipeline.plan(Recipe.load(recipe))


def test_under_ulimit_v_the_cli_refuses_in_one_line(tmp_path):
    """A real RLIMIT_AS in a child process: 64 MiB of address space left, a merge estimated
    at well over that: exit 2 with one line (before: the guard saw the machine's free RAM)."""
    recipe = _wide_linear_experts(tmp_path)
    script = textwrap.dedent(f"""
        import resource, sys
        import psutil
        from pivotmerge_gui.cli.main import main
        from pivotmerge_gui.core import pipeline  # noqa: F401 (imported before the limit)
        from pivotmerge_gui.core.methods import list_methods
        list_methods()
        vms = psutil.Process().memory_info().vms
        resource.setrlimit(resource.RLIMIT_AS, (vms + 64 * 2**20, resource.RLIM_INFINITY))
        sys.exit(main(["merge", {str(recipe)!r}, {str(tmp_path / "out")!r}, "-q"]))
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[1], check=False)
    err = out.stderr.strip().splitlines()
    assert out.returncode == 2, out.stderr[-2000:]
    assert len(err) == 1 and "the merge needs about" in err[0] and "GiB is available" in err[0]
    assert not (tmp_path / "out").exists()
