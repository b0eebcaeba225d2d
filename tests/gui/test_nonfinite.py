"""NaN/Inf experts block the Merge button with the reason until the user allows them."""

from __future__ import annotations

import torch

from tests.factories import make_mlp_projector

from .conftest import save_llava, wait_idle


def test_nonfinite_expert_blocks_merge_until_allowed(qtbot, window, expert_files, tmp_path):
    bad = make_mlp_projector(8, 16, 12, seed=3)
    bad.layer("2").weight[0, 0] = float("nan")
    bad_path = save_llava(bad, tmp_path / "nan" / "mm_projector.bin")
    window.add_paths([str(expert_files["e0"]), str(bad_path)])
    wait_idle(qtbot, window)
    window.merge_panel.set_method_name("linear")
    qtbot.waitUntil(lambda: "NaN" in window.merge_panel.validation_label.text(), timeout=20_000)
    assert not window.merge_panel.merge_button.isEnabled()
    window.merge_panel.allow_nonfinite_check.setChecked(True)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=20_000)
    assert "allowed by the user" in window.merge_panel.validation_label.text()
    # the merge then runs on the unsanitised inputs and its report carries the warning
    with qtbot.waitSignal(window.merge_finished, timeout=30_000):
        window.start_merge()
    report = window.merge_result.report
    assert any("NaN/Inf" in w and "allowed by the user" in w for w in report["warnings"]), report["warnings"]
    merged = window.merge_result.projector.layer("2").weight
    assert torch.isnan(merged).any()  # linear averaging propagates the NaN: nothing was hidden
