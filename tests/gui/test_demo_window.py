"""The demo kit opens with its experts, base and calibration file, merges with PivotMerge's
data-driven ALM out of the box, and what the app saves reproduces with the CLI."""

from __future__ import annotations

from .conftest import wait_idle


def _open_demo(qtbot, window) -> None:
    window.open_demo("shared")
    qtbot.waitUntil(lambda: len(window.experts.entries) == 4 and window.base_entry is not None, timeout=60_000)
    wait_idle(qtbot, window, 60_000)


def test_demo_opens_with_its_calibration_file_and_the_saved_recipe_reproduces(qtbot, window, tmp_path):
    import torch

    from pivotmerge_gui.cli.main import main as cli_main
    from pivotmerge_gui.core.calibration import store
    from pivotmerge_gui.core.io import load_projector
    from pivotmerge_gui.core.recipe import Recipe
    from pivotmerge_gui.demo import kit

    _open_demo(qtbot, window)
    names = list(kit.expert_names())
    assert [e.name for e in window.experts.entries] == names
    path = window.session.calibration_path
    assert path is not None and store.read(path).provenance["encoder"]["kind"] == "demo"
    assert window.current_recipe().calibration.domains == {n: n for n in names}
    assert "demo calibration" in window.merge_panel.calibration_label.text()
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.start_merge()
    assert window.merge_result.report["method_report"]["alm"]["mode"] == "data"
    # Save (the dialog's code path), then the CLI on the saved recipe: the same tensors
    out = tmp_path / "out"
    window.save_to(out)
    qtbot.waitUntil(lambda: bool(window.last_saved), timeout=60_000)
    recipe = Recipe.load(out / "recipe.yml")
    assert recipe.calibration.file == path and len(recipe.calibration.sha256) == 64
    assert "## Calibration" in (out / "README.md").read_text()
    assert cli_main(["merge", str(out / "recipe.yml"), str(tmp_path / "cli"), "--quiet"]) == 0
    proj = window.last_saved[0].name
    a = load_projector(str(out / proj)).state()
    b = load_projector(str(tmp_path / "cli" / proj)).state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # cleared, then the demo opened again over the same experts: its calibration comes back
    window.session.clear_calibration()
    window.open_demo("shared")
    wait_idle(qtbot, window, 60_000)
    assert window.session.calibration_path == path and len(window.experts.entries) == 4


def test_the_calibration_file_follows_its_experts_and_a_newcomer_is_uncovered(qtbot, window):
    _open_demo(qtbot, window)
    window.experts.move_rows_to([0], 4)  # shapes to the end, as a drag does
    window.experts.remove_rows([0])  # drop "text"
    names = [e.name for e in window.experts.entries]
    assert names == ["count", "texture", "shapes"]
    assert window.current_recipe().calibration.domains == {n: n for n in names}
    wait_idle(qtbot, window, 60_000)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    assert window.plan.calibration.domains == names
    # an expert without calibration data: warned in the panel, merged with the stand-in
    window.add_spec(window.base_entry.spec, name="newcomer")
    wait_idle(qtbot, window, 60_000)
    assert "No calibration data for newcomer" in window.merge_panel.calibration_label.text()
    assert window.current_recipe().calibration.domains["newcomer"] is None
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.start_merge()
    rep = window.merge_result.report
    assert rep["experts"] == ["count", "texture", "shapes", "newcomer"]
    assert rep["method_report"]["alm"]["uncovered"] == ["newcomer"]
    assert any("no calibration data for newcomer" in w for w in rep["warnings"])
