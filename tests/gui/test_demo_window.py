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
    cal = window.session.memory_calibration.calibration
    assert cal is not None and len(cal.features) == 4
    assert all(f.shape[1] == 48 for f in cal.features)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.start_merge()
    alm = window.merge_result.report["method_report"]["alm"]
    assert alm["mode"] == "data"


def test_in_memory_calibration_follows_its_experts_through_reorder_and_removal(qtbot, window):
    """Calibration feature sets belong to experts, not to list positions: dragging or
    removing experts must not hand one domain's features to another expert."""
    import torch

    window.open_demo("shared")
    qtbot.waitUntil(lambda: len(window.experts.entries) == 4 and window.base_entry is not None, timeout=60_000)
    wait_idle(qtbot, window, 60_000)
    cal = window.session.memory_calibration.calibration
    own = {e.name: cal.features[i] for i, e in enumerate(window.experts.entries)}
    window.experts.move_rows_to([0], 4)  # shapes to the end, as a drag does
    window.experts.remove_rows([0])  # drop "text"
    names = [e.name for e in window.experts.entries]
    assert names == ["count", "texture", "shapes"]
    mapped = window.session.calibration_for()
    assert mapped.domains == names
    for n, f in zip(names, mapped.features):
        assert torch.equal(f, own[n])
    assert window.session.calibration_for() is mapped  # stable while the order is (plan cache)
    wait_idle(qtbot, window, 60_000)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    assert [len(f) for f in window.plan.calibration.features] == [len(own[n]) for n in names]
    assert all(torch.equal(a, own[n]) for a, n in zip(window.plan.calibration.features, names))
    # an expert without a feature set: PivotMerge (uses calibration) is blocked with the reason
    window.add_spec(window.base_entry.spec, name="newcomer")
    wait_idle(qtbot, window, 60_000)
    qtbot.waitUntil(lambda: "newcomer" in window.merge_panel.validation_label.text(), timeout=30_000)
    assert not window.merge_panel.merge_button.isEnabled()
    assert "Test bench" in window.merge_panel.validation_label.text()
    # a method that does not use calibration still validates and merges (the setup key of
    # an unusable calibration is stable, so Merge does not re-validate forever)
    assert window.merge_panel.set_method_name("linear")
    wait_idle(qtbot, window, 60_000)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.start_merge()
    assert window.merge_result.report["method"] == "linear"
    assert window.merge_result.report["experts"] == ["count", "texture", "shapes", "newcomer"]
