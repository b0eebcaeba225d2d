"""The test bench shown alone on the demo world (``python -m pivotmerge_gui.gui.panels.bench_demo
[PNG]``): four experts and a PivotMerge merge side by side."""

from __future__ import annotations


def demo(screenshot: str | None = None, n_per_domain: int = 3) -> int:
    """Show the panel standalone on the demo world: four experts + a PivotMerge merge,
    run the bench; with ``screenshot`` save a PNG when done and quit."""
    import sys

    from PySide6.QtWidgets import QApplication

    from pivotmerge_gui.core.pipeline import merge_projectors
    from pivotmerge_gui.demo import kit

    from ..standalone import run_panel
    from .testbench import TestBenchPanel

    app = QApplication.instance() or QApplication(sys.argv)
    experts = kit.load_experts("shared")
    base = kit.load_projector_file(kit.base_path("shared"))
    merged = merge_projectors(list(experts.values()), "pivotmerge", base=base,
                              calibration=kit.calibration("shared"), names=list(experts)).projector
    panel = TestBenchPanel()
    panel.setWindowTitle("PivotMerge Studio — test bench")
    panel.resize(1280, 860)
    panel.set_experts(experts, base)
    panel.set_merged(merged, "PivotMerge")
    panel.load_demo_samples("test", n_per_domain)
    return run_panel(app, panel, panel.bench_finished, screenshot)


if __name__ == "__main__":
    import sys

    raise SystemExit(demo(sys.argv[1] if len(sys.argv) > 1 else None))
