"""The demo kit opens with its experts, base and calibration features, and merges with
PivotMerge's data-driven ALM out of the box."""

from __future__ import annotations

from .conftest import wait_idle


def test_demo_opens_ready_to_merge_with_calibration(qtbot, window):
    from pivotmerge_gui.demo import kit

    window.open_demo("shared")
    qtbot.waitUntil(lambda: len(window.experts.entries) == 4 and window.base_entry is not None, timeout=60_000)
    wait_idle(qtbot, window, 60_000)
    assert [e.name for e in window.experts.entries] == list(kit.expert_names())
    cal = window.merge_panel.calibration_object
    assert cal is not None and len(cal.features) == 4
    assert all(f.shape[1] == 48 for f in cal.features)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.start_merge()
    alm = window.merge_result.report["method_report"]["alm"]
    assert alm["mode"] == "data"
