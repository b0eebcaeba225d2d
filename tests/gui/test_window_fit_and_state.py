"""Issue 13 (part 1): a window that fits the screen with collapsible side panels, no stale or
wrong state after edits, messages in the app's words, and the small fixes (Delete + undo,
asking before a merge is discarded, the log folder, colours that follow experts)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PySide6.QtCore import QRect, Qt

from tests.factories import make_mlp_projector
from tests.gui.conftest import save_llava, wait_idle

kit = pytest.importorskip("pivotmerge_gui.demo.kit")


def _add(window, qtbot, *paths):  # type: ignore[no-untyped-def]
    window.add_paths([str(p) for p in paths])
    wait_idle(qtbot, window)


def _merge(qtbot, window, method="linear"):  # type: ignore[no-untyped-def]
    assert window.merge_panel.set_method_name(method)
    wait_idle(qtbot, window)
    assert window.merge_panel.merge_button.isEnabled(), window.merge_reason
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.merge_panel.merge_button.click()
    wait_idle(qtbot, window)


# ---------------------------------------------------------------------------- layout
def test_first_window_fits_the_screen_and_the_minimum_width_is_at_most_1024(window):
    from pivotmerge_gui.gui.layout import first_size, split_sizes

    for w, h in ((1366, 768), (1600, 1000), (1920, 1080), (2560, 1440)):
        fw, fh = first_size(QRect(0, 0, w, h))
        assert fw <= w and fh <= h and fw >= min(w, 1680) - 16 and fh >= min(h, 960) - 40
        left, centre, right = split_sizes(fw)
        assert left + centre + right + 12 <= fw
        assert left >= 240 and right >= 300 and centre >= 700 if fw >= 1350 else centre > 0
    assert window.minimumSizeHint().width() <= 1024
    avail = window.screen().availableGeometry()  # offscreen: 800 px, under the minimum width
    assert window.width() <= max(avail.width(), window.minimumSizeHint().width())
    assert window.height() <= avail.height()


def test_side_panels_collapse_from_the_view_menu_and_follow_a_dragged_splitter(window):
    from pivotmerge_gui.gui.layout import set_panel_open

    actions = {i: a for i, a in window.panel_actions}
    assert [a.text() for a in actions.values()] == ["Expert list", "Merge panel"]
    assert all(a.isChecked() for a in actions.values())
    # the views' entries stay above the toggles, also for views registered later
    texts = [a.text() for a in window.view_menu.actions()]
    assert texts.index("Expert list") > max(texts.index(v.name) for v in window.views.views.values())
    window.resize(1400, 800)
    actions[0].trigger()  # collapse the expert list
    assert window.splitter.sizes()[0] == 0 and not actions[0].isChecked()
    actions[0].trigger()
    assert window.splitter.sizes()[0] >= 240 and actions[0].isChecked()
    actions[2].trigger()
    assert window.splitter.sizes()[2] == 0
    set_panel_open(window, 2, True)
    assert window.splitter.sizes()[2] >= 300 and actions[2].isChecked()
    assert window.splitter.handleWidth() >= 5  # a handle one can see and grab


def test_scrolled_views_get_the_space_there_is_not_their_preferred_height(qtbot, window):
    window.resize(1366, 740)
    window.views.show("bench")
    window.bench_panel.load_demo_samples("val", 4)  # a long, word-wrapped status line
    qtbot.wait(50)
    page = window.views.views["bench"].page
    assert window.bench_panel.height() <= max(page.viewport().height(), window.bench_panel.minimumSizeHint().height())
    run = window.bench_panel.run_button
    assert run.mapTo(page.viewport(), run.rect().bottomLeft()).y() <= page.viewport().height()


# ---------------------------------------------------------------------------- stale state
def test_bench_drops_the_old_merged_column_when_the_merge_is_replaced_or_dropped(qtbot, demo_world):
    from pivotmerge_gui.gui.panels.testbench import TestBenchPanel

    panel = TestBenchPanel()
    qtbot.addWidget(panel)
    experts = dict(list(kit.load_experts("shared").items())[:2])
    panel.set_experts(experts)
    first = kit.load_projector_file(kit.joint_path())
    panel.set_merged(first)
    panel.load_demo_samples("val", 1)
    with qtbot.waitSignal(panel.bench_finished, timeout=60_000):
        panel.run()
    qtbot.waitUntil(lambda: not panel.is_busy(), timeout=10_000)  # the worker stops after its result
    assert panel._columns == [*experts, "Merged"] and "Merged" in panel.chart_values()[1]
    panel.set_merged(first)  # the same result again: nothing is stale
    assert panel._columns == [*experts, "Merged"]
    second = first.with_state({k: v * 0.5 for k, v in first.state().items()})
    panel.set_merged(second)  # a new merge under the same name
    assert panel._columns == list(experts) and "Merged" not in panel.chart_values()[1]
    assert panel.grid.columnCount() == 1 + len(experts) and "Press Run" in panel.status.text()
    assert panel.grid.item(0, 1) is not None  # the experts' cells are kept
    panel.set_experts({"shapes": experts["shapes"]})  # an expert removed
    assert panel._columns == ["shapes"] and list(panel.chart_values()[1]) == ["shapes"]
    # a merge replaced right as a run finishes (its worker not yet stopped) is dropped too
    panel.set_experts(experts)
    with qtbot.waitSignal(panel.bench_finished, timeout=60_000):
        panel.run()
    panel.set_merged(first)
    qtbot.waitUntil(lambda: not panel.is_busy(), timeout=10_000)
    assert "Merged" not in panel._columns


def test_done_line_goes_with_the_result_and_a_failed_merge_line_with_the_setup(qtbot, window, expert_files):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    _merge(qtbot, window)
    mp = window.merge_panel
    assert mp.stage_label.text().startswith("Done") and mp.save_button.isEnabled()
    window.confirm = lambda *a: True
    window.remove_experts([2])
    wait_idle(qtbot, window)
    assert window.merge_result is None and not mp.save_button.isEnabled()
    assert not window.action_save_merged.isEnabled()
    assert not mp.stage_label.text().startswith("Done")
    assert "dropped" in mp.stage_label.text()
    # a failed merge says why; the line goes when the setup changes (not under a fresh Ready)
    window._merge_failed(RuntimeError("boom"), "")
    assert mp.stage_label.text().startswith("The last merge failed")
    window.experts.setData(window.experts.index(0, window.experts.WEIGHT), "2")
    wait_idle(qtbot, window)
    assert mp.stage_label.text() == "" and "Ready" in mp.validation_label.text()


def test_views_say_analysing_while_the_first_analysis_runs(qtbot, window, expert_files):
    from pivotmerge_gui.gui.panels.inspect import _StackedPanel

    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    window._set_analysis(None)  # as before the first analysis
    window._colors_by_uid = None
    window._start_analysis()
    texts = [p.message.text() for p in (window.layers_panel, window.spectra_panel, window.similarity_panel)]
    assert texts == ["Analysing 3 expert(s)…"] * 3 and _StackedPanel.EMPTY not in texts
    wait_idle(qtbot, window)
    assert window.analysis is not None


def test_layers_header_names_the_pivot_the_merge_picked(qtbot, window, expert_files):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    assert "merge picks its own pivot" in window.layers_panel.caption.text()
    _merge(qtbot, window, "pivotmerge")
    picked = window.merge_result.report["method_report"]["pivot"]["name"]
    caption = window.layers_panel.caption.text()
    assert f"aligned to {picked}" in caption and f"reference expert {picked}: the merge's pivot" in caption
    assert window.analysis.names[window.analysis.pivot] == picked


def test_spectra_read_out_follows_the_mode_and_log_axis_labels_above_one(qtbot, window, expert_files):
    from pivotmerge_gui.gui.panels.inspect import LogAxis, log_ticks

    _add(window, qtbot, expert_files["e0"], expert_files["e1"])
    sp = window.spectra_panel
    sp._hover = 2
    sp.mode_combo.setCurrentIndex(0)  # raw
    sp.redraw()
    raw = sp.readout.text()
    sp.mode_combo.setCurrentIndex(1)  # normalised: values at the same index, this mode's
    norm = sp.readout.text()
    assert raw != norm and norm == sp.readout_at(2)
    first = next(iter(sp.curves().values()))
    assert f"{first[1]:.4g}" in norm
    # labels above 1 on a log axis: 1, 2, 5 per decade when the span is short
    ticks = log_ticks(np.log10(0.3), np.log10(8.0))
    values = sorted(v for _, level in ticks for v in level)
    labels = LogAxis("left").logTickStrings(values, 1.0, 1.0)
    assert {"1", "2", "5"} <= set(labels) and all(float(x) <= 8 for x in labels)
    assert isinstance(sp.plot.getAxis("left"), LogAxis)


def test_merged_task_vector_curve_pending_indicator_and_colours_follow_experts(qtbot, window, expert_files):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    window.set_base(str(expert_files["base"]))
    wait_idle(qtbot, window)
    colours = window.expert_colors()
    window.experts.move(0, 1)  # reorder: every expert keeps its colour
    wait_idle(qtbot, window)
    assert window.expert_colors() == colours and len(set(colours.values())) == 3
    _merge(qtbot, window)
    sp = window.spectra_panel
    sp.source_combo.setCurrentText("task vectors")
    assert "merged" in sp.curves()  # the merge's own update, beside the experts'
    assert sp.pending.text() == ""
    window._start_analysis()  # recompute: no "computing" line when the curve is already there
    assert sp.pending.text() == ""
    window.session.analysis = None
    window._start_analysis()
    assert "merged curve" in sp.pending.text()
    wait_idle(qtbot, window)
    assert sp.pending.text() == ""


# ---------------------------------------------------------------------------- expert list
def test_delete_removes_the_selection_and_ctrl_z_brings_it_back(qtbot, window, expert_files):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    before = [(e.uid, e.name) for e in window.experts.entries]
    view = window.list_panel.view
    window.list_panel._select_rows([1])
    view.setFocus()
    qtbot.keyClick(view, Qt.Key.Key_Delete)
    assert [e.name for e in window.experts.entries] == [before[0][1], before[2][1]]
    assert window.action_undo_remove.isEnabled()
    window.action_undo_remove.trigger()
    assert [(e.uid, e.name) for e in window.experts.entries] == before
    assert not window.action_undo_remove.isEnabled()
    wait_idle(qtbot, window)
    assert all(e.ready for e in window.experts.entries)


def test_remove_asks_before_it_discards_a_merge(qtbot, window, expert_files):
    _add(window, qtbot, expert_files["e0"], expert_files["e1"], expert_files["e2"])
    _merge(qtbot, window)
    asked: list[str] = []
    window.confirm = lambda title, text: asked.append(text) or False
    window.list_panel._select_rows([0])
    window.list_panel.remove_selected()
    assert len(window.experts.entries) == 3 and window.merge_result is not None
    assert "discards the merged result" in asked[0]
    window.confirm = lambda *a: True
    window.list_panel.remove_selected()
    assert len(window.experts.entries) == 2 and window.merge_result is None


def test_undo_of_an_expert_removed_while_loading_loads_it_again(qtbot, window, expert_files):
    window.add_paths([str(expert_files["e0"])])
    window.session.remove_rows([0])  # at once, before its load finishes
    wait_idle(qtbot, window)
    window.undo_remove()
    wait_idle(qtbot, window)
    assert [e.status for e in window.experts.entries] == ["ready"]


# ---------------------------------------------------------------------------- messages
def test_help_open_log_folder_says_where_it_is_when_it_cannot_open_it(window):
    from pivotmerge_gui.gui.menus import open_log_folder
    from pivotmerge_gui.gui.settings import log_dir

    assert not open_log_folder(window, opener=lambda url: False)
    assert window.errors_shown[-1] == f"No file manager could open it. The log folder is {log_dir()}"
    n = len(window.errors_shown)
    assert open_log_folder(window, opener=lambda url: url.toLocalFile() == str(log_dir()))
    assert len(window.errors_shown) == n


def test_all_zero_expert_is_refused_at_validation_in_the_apps_words(qtbot, window, tmp_path, expert_files):
    zero = make_mlp_projector(8, 16, 12, seed=3)
    zero = zero.with_state({k: torch.zeros_like(v) for k, v in zero.state().items()})
    path = save_llava(zero, tmp_path / "zero" / "mm_projector.bin")
    _add(window, qtbot, expert_files["e0"], path)
    assert not window.merge_panel.merge_button.isEnabled()
    assert "every weight is zero" in window.merge_reason and "zero (" in window.merge_reason


def test_core_messages_are_put_in_the_apps_words_and_the_cli_keeps_its_flags():
    from pivotmerge_gui.core.errors import (
        DeviceOutOfMemory,
        MethodError,
        OutputError,
        ParameterError,
    )
    from pivotmerge_gui.gui.errors import describe_exception

    cases = [
        MethodError("a (x.bin): tensor(s) w contain NaN or Inf; merging them would spread the damage to every "
                    "output weight (allow it explicitly if intended: --allow-nonfinite)"),
        DeviceOutOfMemory("cuda:0"),
        OutputError("/o", "already exists; allow overwriting (CLI: --overwrite) or pick another output folder"),
        ParameterError("ties", "trim_density", "expected a number, got 'x'"),
    ]
    shorts = [describe_exception(e)[0] for e in cases]
    assert all("--" not in s and "CLI" not in s for s in shorts), shorts
    assert "'Allow NaN/Inf in inputs'" in shorts[0] and "Device 'cpu'" in shorts[1]
    assert "Replace an earlier output" in shorts[2] and "'trim density'" in shorts[3]
    assert "--allow-nonfinite" in str(cases[0])  # the CLI prints the core's own text


def test_demo_back_end_names_the_widths_it_takes(demo_world):
    from pivotmerge_gui.core.errors import BackendMismatch

    backend = kit.load_world().backend
    cs = next(iter(kit.load_world().caption_sets("val", 1).values()))
    feats = cs.features if cs.features is not None else backend.encode_images(cs.images)
    big = make_mlp_projector(1024, 32, 4096, seed=0)
    with pytest.raises(BackendMismatch, match=r"the demo model takes 48 -> 64 projectors; this one is 1024 -> 4096"):
        backend.caption_nll(big, feats, cs.captions)


def test_hub_dialog_fails_fast_when_the_hub_cannot_be_reached(qtbot, monkeypatch, tmp_path):
    import time

    from pivotmerge_gui.gui.dialogs import HubDialog

    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens: refused at once
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    dlg = HubDialog()
    qtbot.addWidget(dlg)
    dlg.show()
    field_h = dlg.repo.height()
    dlg.repo.setText("org/some-projector")
    t0 = time.perf_counter()
    dlg.start()
    qtbot.waitUntil(lambda: dlg.worker is None and dlg.error is not None, timeout=15_000)
    assert time.perf_counter() - t0 < 10
    text = dlg.status.text()
    assert "cannot reach 127.0.0.1" in text and "not in the local Hub cache" in text
    qtbot.wait(20)
    assert dlg.repo.height() >= field_h  # the fields keep their height
    assert dlg.add_button.isEnabled()


# ---------------------------------------------------------------------------- start-up
def test_missing_qt_system_library_is_named_with_its_debian_package():
    from pivotmerge_gui.gui.qt_check import uses_xcb, xcb_problem

    x11 = {"DISPLAY": ":0"}
    assert uses_xcb(x11, "linux") and uses_xcb({**x11, "QT_QPA_PLATFORM": "xcb"}, "linux")
    assert not uses_xcb({**x11, "QT_QPA_PLATFORM": "offscreen"}, "linux")
    assert not uses_xcb({}, "linux") and not uses_xcb(x11, "darwin")
    assert not uses_xcb({**x11, "WAYLAND_DISPLAY": "wayland-0"}, "linux")
    text = xcb_problem(x11, "linux", loadable=lambda so: so != "libxcb-cursor.so.0")
    assert text is not None and "libxcb-cursor.so.0" in text and "sudo apt-get install libxcb-cursor0" in text
    assert xcb_problem(x11, "linux", loadable=lambda so: True) is None
    assert xcb_problem({"QT_QPA_PLATFORM": "offscreen"}, "linux", loadable=lambda so: False) is None


def test_app_exits_with_the_package_name_instead_of_a_qt_abort(monkeypatch, capsys):
    from pivotmerge_gui.gui import app, qt_check

    monkeypatch.setenv("DISPLAY", ":99")
    monkeypatch.setenv("QT_QPA_PLATFORM", "xcb")
    monkeypatch.setattr(qt_check, "_loadable", lambda so: so != "libxcb-cursor.so.0")
    assert app.main(["--no-restore"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("pivotmerge-gui: cannot open the X display") and "libxcb-cursor0" in err


def test_save_dialog_defaults_to_a_fresh_folder_so_ctrl_s_then_save_works(qtbot, window, expert_files,
                                                                          tmp_path, monkeypatch):
    from pivotmerge_gui.gui import merge_flow
    from pivotmerge_gui.gui.dialogs import fresh_folder

    out = tmp_path / "out" / "merged"
    assert fresh_folder(out) == out  # not there yet
    out.mkdir(parents=True)
    assert fresh_folder(out) == out  # empty
    (out / "mm_projector.bin").write_bytes(b"x")
    assert fresh_folder(out) == out.parent / "merged-2"
    (out.parent / "merged-2").mkdir()
    (out.parent / "merged-2" / "f").write_bytes(b"x")
    assert fresh_folder(out.parent / "merged-2") == out.parent / "merged-3"
    _add(window, qtbot, expert_files["e0"], expert_files["e1"])
    _merge(qtbot, window)
    window.settings.set_value("save/folder", str(out))  # the last save went here
    shown: list[str] = []

    def fake_exec(dlg):  # type: ignore[no-untyped-def]
        shown.append(dlg.folder.text())
        return merge_flow.SaveDialog.DialogCode.Rejected

    monkeypatch.setattr(merge_flow.SaveDialog, "exec", fake_exec)
    window.action_save_merged.trigger()
    assert shown == [str(out.parent / "merged-3")]


def test_a_saved_layout_bigger_than_this_screen_gives_way_to_the_fitted_one(window):
    from pivotmerge_gui.gui.layout import restore_layout, split_sizes

    window.resize(2400, 1500)  # as saved on a larger monitor
    geometry = window.saveGeometry()
    split = window.splitter.saveState()
    restore_layout(window, geometry, split)
    avail = window.screen().availableGeometry()
    assert window.height() <= avail.height()
    assert window.width() <= max(avail.width(), window.minimumSizeHint().width())
    assert window.splitter.sizes()[0] > 0 and window.splitter.sizes()[2] > 0
    assert split_sizes(1366)[1] > split_sizes(1366)[0]
