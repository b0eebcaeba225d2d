"""The workbench loop in the window (offscreen): merge history with bench columns, rename,
pin, delete, cap, A/B compare, save a history result, Merge & test, and a sweep with a
cancel and a click on a cell."""

from __future__ import annotations

import pytest
from PySide6.QtCore import Qt

from .conftest import wait_idle

kit = pytest.importorskip("pivotmerge_gui.demo.kit")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture
def demo_window(qtbot, window, demo_world):  # type: ignore[no-untyped-def]
    """The window with the four demo experts and their base, Task Arithmetic, 1 pair per domain."""
    window.add_paths([str(p) for p in kit.expert_paths("shared")])
    window.set_base(str(kit.base_path("shared")))
    wait_idle(qtbot, window, 60_000)
    assert window.merge_panel.set_method_name("task_arithmetic")
    window.bench_panel.load_demo_samples("val", 1)
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    return window


def _merge(qtbot, window, scaling: float):  # type: ignore[no-untyped-def]
    window.merge_panel.form.set_values({"scaling": scaling})
    window._form_changed()
    qtbot.waitUntil(lambda: window.merge_panel.merge_button.isEnabled(), timeout=30_000)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.start_merge()
    wait_idle(qtbot, window, 60_000)
    return window.merge_result


def _bench_names(window) -> list[str]:  # type: ignore[no-untyped-def]
    lst = window.bench_panel.projector_list
    return [lst.item(i).data(Qt.ItemDataRole.UserRole) for i in range(lst.count())]


def test_history_keeps_every_merge_as_bench_columns_and_compares_two(qtbot, demo_window, tmp_path):
    w = demo_window
    wb, h, panel = w.workbench, w.workbench.history, w.workbench.history_panel
    r1 = _merge(qtbot, w, 0.3)
    r2 = _merge(qtbot, w, 1.2)
    assert [e.name for e in h.entries] == ["#1 Task Arithmetic", "#2 Task Arithmetic"]
    assert h.current_entry().result is r2 and wb.merged_name() == "#2 Task Arithmetic"
    assert panel.list.count() == 2 and panel.list.item(0).text().startswith("#2 Task Arithmetic\n")
    # both results are bench projectors: the shown one as the merged column, the other as a result
    assert _bench_names(w)[-2:] == ["#2 Task Arithmetic", "#1 Task Arithmetic"]
    assert w.bench_panel.merged[1] is r2.projector and w.bench_panel.results["#1 Task Arithmetic"] is r1.projector
    # rename (the bench follows), pin, a refused rename goes to the status bar
    uid1 = h.entries[0].uid
    assert panel.rename(uid1, "low scale")
    assert "low scale" in _bench_names(w)
    assert not panel.rename(uid1, "#2 Task Arithmetic")
    assert "already called" in w.statusBar().currentMessage()
    h.set_pinned(uid1)
    assert panel.list.item(1).text().startswith("[pinned] low scale")
    # A/B: report values differ in the scale, the recipe diff shows it
    panel.set_pair(uid1, h.entries[1].uid)
    table = {panel.values.item(i, 0).text(): (panel.values.item(i, 1).text(), panel.values.item(i, 2).text())
             for i in range(panel.values.rowCount())}
    assert table["Parameter: scaling"] == ("0.3", "1.2") and table["Method"] == ("Task Arithmetic",) * 2
    assert panel.values.item(0, 1).background().color().name() != panel.values.item(
        list(table).index("Parameter: scaling"), 1).background().color().name()
    diff = panel.diff.toPlainText().splitlines()
    assert "+  scaling: 1.2" in diff  # A used the default scale: its recipe has none
    # "Run both on the bench": captions of A and B appear in the comparison, scores in the list
    with qtbot.waitSignal(w.bench_panel.bench_finished, timeout=60_000):
        panel.test_button.click()
    wait_idle(qtbot, w, 60_000)
    assert panel.caption_table.rowCount() == len(w.bench_panel.pairs) == 4
    assert all(panel.caption_table.item(0, j).text() for j in range(3))
    assert "mean" in h.entries[0].scores and "bench " in h.entries[0].summary()
    # show the first result: it becomes the session's (report, save), then save it
    panel.select(uid1)
    panel.show_button.click()
    assert w.merge_result is r1 and w.bench_panel.merged[0] == "low scale"
    w.save_to(tmp_path / "saved", result=r2)  # an explicit result is saved whatever is shown
    qtbot.waitUntil(lambda: bool(w.last_saved), timeout=30_000)
    from pivotmerge_gui.core.recipe import Recipe

    assert Recipe.load(tmp_path / "saved" / "recipe.yml").parameters["scaling"] == 1.2
    # delete the shown one: the bench drops its column
    panel.select(h.entries[1].uid)
    panel.delete_button.click()
    assert [e.name for e in h.entries] == ["low scale"] and "#2 Task Arithmetic" not in _bench_names(w)


def test_history_cap_drops_the_oldest_unpinned_merge(qtbot, demo_window):
    w = demo_window
    h = w.workbench.history
    h.cap = 2
    for s in (0.2, 0.4, 0.6):
        _merge(qtbot, w, s)
    assert [e.name for e in h.entries] == ["#2 Task Arithmetic", "#3 Task Arithmetic"]
    assert "#1 Task Arithmetic" not in _bench_names(w)
    assert w.workbench.history_panel.list.count() == 2


def test_merge_and_test_runs_the_bench_on_the_new_result(qtbot, demo_window):
    w = demo_window
    assert w.workbench.merge_test_button.isEnabled()
    with qtbot.waitSignal(w.bench_panel.bench_finished, timeout=90_000) as sig:
        w.workbench.merge_test_button.click()
    result = sig.args[0]
    assert "#1 Task Arithmetic" in result.projectors
    assert w.views.current() == "bench"
    wait_idle(qtbot, w, 60_000)
    entry = w.workbench.history.entries[0]
    assert entry.scores["mean"] == pytest.approx(result.metrics["#1 Task Arithmetic"].mean.token_accuracy)
    # a plain Merge afterwards does not start the bench
    _merge(qtbot, w, 1.0)
    assert not w.bench_panel.is_busy() and len(w.workbench.history) == 2


def test_merge_and_test_without_pairs_says_what_to_do(qtbot, demo_window):
    w = demo_window
    w.bench_panel.set_pairs([])
    w.workbench.merge_test_button.click()
    assert "no image-caption pairs" in w.statusBar().currentMessage() and not w.merge_job.busy


def test_sweep_cancel_keeps_the_finished_cells_and_a_click_opens_one(qtbot, demo_window):
    w = demo_window
    wb, sp = w.workbench, w.workbench.sweep_panel
    assert sp.x_param.currentData() == "scaling"  # the method's main scale first
    assert sp.y_param.findData("layer_coefficients.0") > 0 and sp.y_param.findData("method") > 0
    sp.set_axis("x", "scaling", "0.2, 0.6, 1.0, 1.4")
    sp.set_axis("y", "layer_coefficients.2", "0.5, 1.5")
    cells = []

    def on_cell(ev):  # type: ignore[no-untyped-def]
        if ev.stage == "cell":
            cells.append(ev.payload)
            if len(cells) == 2:
                sp.cancel_button.click()

    sp.run_button.click()
    assert wb.sweep_job.busy and sp.cancel_button.isEnabled() and not sp.run_button.isEnabled()
    wb.sweep_job.worker.progressed.connect(on_cell)
    qtbot.waitUntil(lambda: not wb.sweep_job.busy, timeout=90_000)
    wait_idle(qtbot, w, 60_000)
    assert 2 <= len(sp.cells) < 8 and sp.table.rowCount() == 2 and sp.table.columnCount() == 4
    assert "Sweep cancelled" in sp.status.text() and sp.run_button.isEnabled()
    best = sp.best()
    assert best is not None and sp.table.item(best.row, best.col).text().endswith("\N{BLACK STAR}")
    assert sp.table.horizontalHeaderItem(0).text() == "scaling = 0.2"
    # clicking a finished cell opens its merge: it joins the history and becomes the result
    sp.table.cellClicked.emit(0, 1)
    entry = wb.history.current_entry()
    assert entry.name == "sweep: scaling=0.6, layer 2=0.5" and entry.origin == "sweep"
    assert w.merge_result is entry.result and entry.result.recipe.parameters["scaling"] == 0.6
    assert entry.result.recipe.layer_coefficients == {"2": 0.5}
    assert w.views.current() == "history"


def test_sweep_refuses_values_out_of_range_and_runs_to_the_end(qtbot, demo_window):
    w = demo_window
    wb, sp = w.workbench, w.workbench.sweep_panel
    sp.set_axis("x", "scaling", "0.5, 9")
    assert wb.start_sweep() is None and "9.0 is above the maximum 5.0" in sp.status.text()
    sp.set_axis("x", "method", "task_arithmetic, ties")
    sp.set_axis("y", "", "")
    assert wb.start_sweep() is not None
    qtbot.waitUntil(lambda: not wb.sweep_job.busy, timeout=90_000)
    wait_idle(qtbot, w, 60_000)
    assert len(wb.last_sweep.cells) == 2 and sp.save_best_button.isEnabled()
    assert sp.table.verticalHeaderItem(0).text() == "token_accuracy"
    # Save best: the best cell's merge becomes the shown result and goes to the Save dialog's path
    saved = []
    w.save_merged = lambda: saved.append(w.merge_result)  # the dialog itself is modal
    sp.save_best_button.click()
    best = wb.last_sweep.best()
    assert saved == [best.result] and wb.history.current_entry().name == f"sweep: {best.label}"


def test_the_saved_sweep_document_runs_in_the_cli_with_the_same_scores(qtbot, demo_window, tmp_path, capsys):
    import json

    from pivotmerge_gui.cli.main import main as cli_main

    w = demo_window
    wb, sp = w.workbench, w.workbench.sweep_panel
    sp.set_axis("x", "scaling", "0.3, 1.1")
    path = wb.export_sweep(tmp_path / "sweep.yml")
    assert wb.start_sweep() is not None
    qtbot.waitUntil(lambda: not wb.sweep_job.busy, timeout=90_000)
    gui = wb.last_sweep.grid()
    assert cli_main(["sweep", str(path), "--json", "--quiet"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert cli["spec"]["score"] == {"backend": "demo", "pairs": "demo:val:1", "metric": "token_accuracy"}
    assert cli["grid"][0] == pytest.approx(gui[0]) and len(cli["grid"]) == len(gui) == 1
    # pairs from two sources cannot be named in one document
    w.bench_panel.pair_sources.append({"pairs": str(tmp_path)})
    from pivotmerge_gui.core.errors import PivotMergeError

    with pytest.raises(PivotMergeError, match="one source"):
        wb.export_sweep(tmp_path / "other.yml")


def test_pinned_results_are_dotted_curves_in_the_spectra_view(qtbot, demo_window):
    w = demo_window
    h = w.workbench.history
    _merge(qtbot, w, 0.3)
    _merge(qtbot, w, 1.5)
    first = h.entries[0]
    assert w.spectra_panel.extra == {}
    h.set_pinned(first.uid)
    wait_idle(qtbot, w, 60_000)
    extra = w.spectra_panel.extra
    assert set(extra) == {"weights", "task vectors"} and set(extra["weights"]) == {"0", "2"}
    from pivotmerge_gui.core.analysis import singular_values

    want = singular_values(first.result.projector.state()["0.weight"]).values
    assert list(extra["weights"]["0"]) == [first.name]
    assert extra["weights"]["0"][first.name].values == pytest.approx(want)
    qtbot.waitUntil(lambda: w.spectra_panel.view is not None, timeout=30_000)
    w.spectra_panel.redraw()
    assert first.name in w.spectra_panel.curves() and "merged" in w.spectra_panel.curves()
    # shown, it is the analysis' merged curve, not a dotted one; unpinned, it leaves the plot
    w.workbench.show_entry(first.uid)
    wait_idle(qtbot, w, 60_000)
    assert w.spectra_panel.extra == {}
    w.workbench.show_entry(h.entries[1].uid)
    h.set_pinned(first.uid, False)
    wait_idle(qtbot, w, 60_000)
    assert w.spectra_panel.extra == {}
