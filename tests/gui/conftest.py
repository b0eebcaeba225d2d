"""GUI fixtures: tiny LLaVA-layout expert files on disk and a main window (offscreen)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.factories import make_mlp_projector

# The offscreen platform plugin itself logs this when a top-level window is shown; it says
# nothing about our code, every other Qt warning still fails the test.
OFFSCREEN_NOISE = r"This plugin does not support propagateSizeHints"


def pytest_collection_modifyitems(config, items):  # type: ignore[no-untyped-def]
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.qt_log_ignore(OFFSCREEN_NOISE))
            item.add_marker(pytest.mark.gui)


def save_llava(projector, path: Path) -> Path:
    """``torch.save`` of the projector in LLaVA's ``mm_projector.bin`` key layout."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({k: v.contiguous() for k, v in projector.original_state_dict().items()}, path)
    return path


@pytest.fixture
def expert_files(tmp_path: Path) -> dict[str, Path]:
    """Three experts (one shared init + perturbations), a base, an incompatible one, a
    broken file, and a folder holding two experts."""
    base = make_mlp_projector(8, 16, 12, seed=100)
    out: dict[str, Path] = {"base": save_llava(base, tmp_path / "base" / "mm_projector.bin")}
    for k in range(3):
        p = make_mlp_projector(8, 16, 12, seed=k)
        state = {n: base.state()[n] + 0.2 * t for n, t in p.state().items()}
        out[f"e{k}"] = save_llava(base.with_state(state), tmp_path / f"expert{k}" / "mm_projector.bin")
    out["wide"] = save_llava(make_mlp_projector(8, 20, 12, seed=7), tmp_path / "wide" / "mm_projector.bin")
    broken = tmp_path / "broken.bin"
    broken.write_bytes(b"this is not a checkpoint")
    out["broken"] = broken
    folder = tmp_path / "folder_of_experts"
    for k in range(2):
        p = make_mlp_projector(8, 16, 12, seed=20 + k)
        save_llava(p, folder / f"domain{k}" / "mm_projector.bin")
    out["folder"] = folder
    return out


@pytest.fixture
def window(qtbot):  # type: ignore[no-untyped-def]
    from pivotmerge_gui.gui.main_window import MainWindow

    w = MainWindow()
    w.quiet_errors = True
    qtbot.addWidget(w)
    w.show()
    qtbot.waitUntil(lambda: w.core_ready, timeout=60_000)
    yield w
    from pivotmerge_gui.gui.workers import stop_all

    stop_all(10_000)


def wait_idle(qtbot, window, timeout: int = 30_000) -> None:  # type: ignore[no-untyped-def]
    qtbot.waitUntil(window.is_idle, timeout=timeout)
