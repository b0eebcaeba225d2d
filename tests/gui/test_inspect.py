"""Inspect views fed by the real core analysis: layer table, spectra, similarity."""

from __future__ import annotations

import csv

import numpy as np
import pytest

from pivotmerge_gui.core.analysis import iter_analysis
from pivotmerge_gui.gui.panels.inspect import LayersPanel, SimilarityPanel, SpectraPanel
from tests.factories import make_mlp_projector
from tests.gui.conftest import wait_idle


def _run(gen):  # type: ignore[no-untyped-def]
    while True:
        try:
            next(gen)
        except StopIteration as stop:
            return stop.value


@pytest.fixture(scope="module")
def analysis():  # type: ignore[no-untyped-def]
    base = make_mlp_projector(8, 16, 12, seed=100)
    experts = []
    for k in range(3):
        d = make_mlp_projector(8, 16, 12, seed=k)
        experts.append(base.with_state({n: base.state()[n] + 0.3 * t for n, t in d.state().items()}))
    merged = base.with_state({n: sum(e.state()[n] for e in experts) / 3 for n in base.state()})
    return _run(iter_analysis(experts, base=base, names=["ocr", "charts", "photos"], merged=merged))


def test_layers_panel_shows_one_row_per_layer_and_exports_csv(qtbot, analysis, tmp_path):
    panel = LayersPanel()
    qtbot.addWidget(panel)
    panel.set_analysis(analysis)
    rows = analysis.layer_table()
    assert panel.model.rowCount() == len(rows) == 2
    assert panel.model.columns == list(rows[0])
    assert "3 experts" in panel.caption.text()
    out = tmp_path / "layers.csv"
    panel.export_csv(out)
    with open(out) as fh:
        got = list(csv.reader(fh))
    assert got[0] == panel.model.columns and len(got) == 3


def test_spectra_panel_modes_overlay_shared_rank_readout_and_export(qtbot, analysis, tmp_path):
    panel = SpectraPanel()
    qtbot.addWidget(panel)
    panel.set_analysis(analysis)
    layer = panel.layer_combo.currentText()
    curves = panel.curves()
    assert set(curves) == {"ocr", "charts", "photos", "base", "merged"}
    lay = next(l for l in analysis.layers if l.layer == layer)
    np.testing.assert_allclose(curves["ocr"], lay.spectra["ocr"].values)
    legend = [item[1].text for item in panel.legend.items]
    assert "Merged" in legend and "ocr" in legend
    panel.mode_combo.setCurrentIndex(1)  # normalised
    assert all(abs(v[0] - 1.0) < 1e-12 for v in panel.curves().values())
    panel.mode_combo.setCurrentIndex(2)  # cumulative energy
    for v in panel.curves().values():
        assert np.all(np.diff(v) >= -1e-12) and v[-1] <= 1.0 + 1e-9
    panel.source_combo.setCurrentText("task vectors")
    assert set(panel.curves()) >= {"ocr", "charts", "photos"}
    assert panel._shared_line is not None and panel._shared_line.value() == analysis.shared_ranks()[layer]
    text = panel.readout_at(1)
    assert text.startswith("i=1") and "ocr:" in text and "photos:" in text
    assert panel.readout_at(10_000) == " "
    png, csv_path = tmp_path / "s.png", tmp_path / "s.csv"
    panel.export_png(png)
    panel.export_csv(csv_path)
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with open(csv_path) as fh:
        got = list(csv.reader(fh))
    assert got[0][0] == "index" and set(got[0][1:]) == set(panel.curves())
    assert len(got) - 1 == max(len(v) for v in panel.curves().values())


def test_similarity_panel_shows_the_cosine_matrix(qtbot, analysis):
    panel = SimilarityPanel()
    qtbot.addWidget(panel)
    panel.set_analysis(analysis)
    assert [panel.kind_combo.itemText(i) for i in range(panel.kind_combo.count())] == ["weights", "task vectors"]
    layer = panel.layer_combo.currentText()
    lay = next(l for l in analysis.layers if l.layer == layer)
    np.testing.assert_allclose(panel.matrix, lay.cosine_weights)
    assert panel.matrix.shape == (4, 4)  # 3 experts + merged
    panel.kind_combo.setCurrentText("task vectors")
    np.testing.assert_allclose(panel.matrix, lay.cosine_tasks)
    assert "mean off-diagonal" in panel.note.text()


def test_empty_and_failed_analysis_show_a_message(qtbot):
    panel = SpectraPanel()
    qtbot.addWidget(panel)
    panel.set_analysis(None)
    assert "Drop two or more" in panel.message.text()
    panel.set_analysis(None, problem="boom")
    assert panel.message.text() == "Analysis failed: boom"


def test_analysis_runs_in_background_and_the_merged_result_joins_the_views(qtbot, window, expert_files):
    window.add_paths([str(expert_files[k]) for k in ("e0", "e1", "e2")])
    wait_idle(qtbot, window)
    assert window.analysis is not None and window.analysis.names == ["expert0", "expert1", "expert2"]
    assert not window.analysis.has_merged
    assert window.layers_panel.model.rowCount() == 2
    assert window.merge_panel.set_method_name("linear")
    wait_idle(qtbot, window)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.merge_panel.merge_button.click()
    wait_idle(qtbot, window)
    assert window.analysis.has_merged
    assert "merged" in window.spectra_panel.curves()
    # removing an expert drops the stale result and re-analyses
    window.experts.remove_rows([2])
    wait_idle(qtbot, window)
    assert window.merge_result is None and not window.analysis.has_merged
    assert window.analysis.names == ["expert0", "expert1"]


def test_window_feeds_the_test_bench_and_autotune_and_applies_tuned_coefficients(qtbot, window):
    from pivotmerge_gui.core.tuning import TuneSetting
    from pivotmerge_gui.demo import kit

    window.add_paths([str(p) for p in kit.expert_paths("shared")[:2]])
    wait_idle(qtbot, window)
    names = kit.expert_names()[:2]
    assert list(window.bench_panel.experts) == names and list(window.autotune_panel.experts) == names
    assert window.merge_panel.set_method_name("linear")
    wait_idle(qtbot, window)
    with qtbot.waitSignal(window.merge_finished, timeout=60_000):
        window.merge_panel.merge_button.click()
    wait_idle(qtbot, window)
    # the bench's merged column is named after the result in the merge history
    assert window.bench_panel.merged is not None and window.bench_panel.merged[0] == "#1 Weight average"
    assert "#1 Weight average" in window.bench_panel.projectors()
    # scoring the merged result before saving, through the bench's own worker
    window.bench_panel.load_demo_samples("val", 1)
    w = window.bench_panel.run()
    assert w is not None
    with qtbot.waitSignal(window.bench_panel.bench_finished, timeout=120_000) as blocker:
        pass
    result = blocker.args[0]
    assert "#1 Weight average" in result.projectors and all(n in result.projectors for n in names)
    wait_idle(qtbot, window)
    # auto-tune's best setting lands in the per-layer overrides and the recipe
    layer = window.merge_panel.coefficients.layers[0]
    window.autotune_panel.apply_requested.emit(TuneSetting({layer: 0.75}))
    assert window.current_recipe().layer_coefficients == {layer: 0.75}


def test_in_memory_calibration_from_the_test_bench_enables_regmean(qtbot, window, expert_files):
    import torch

    from pivotmerge_gui.core.methods.base import Calibration

    window.add_paths([str(expert_files["e0"]), str(expert_files["e1"])])
    wait_idle(qtbot, window)
    needs = [m.name for m in window.methods if m.needs_calibration]
    assert window.merge_panel.set_method_name(needs[0])
    wait_idle(qtbot, window)
    assert not window.merge_panel.merge_button.isEnabled()
    g = torch.Generator().manual_seed(0)
    cal = Calibration([torch.randn(16, 8, generator=g) for _ in range(2)], ["a", "b"])
    window.bench_panel.alignment_scores_ready.emit(None, cal)
    wait_idle(qtbot, window)
    assert window.merge_panel.merge_button.isEnabled(), window.merge_reason
    assert window.current_recipe().calibration is None  # in memory, not in the recipe


def test_data_driven_layer_scores_join_the_layer_table(qtbot, analysis):
    from pivotmerge_gui.core.evaluation.layer_scores import LayerAlignmentScores

    panel = LayersPanel()
    qtbot.addWidget(panel)
    panel.set_analysis(analysis)
    scores = LayerAlignmentScores(experts=["ocr", "charts"], domains=["ocr", "charts"], layers=["0", "2"],
                                  delta=[[0.2, 0.1], [0.4, 0.0]], expert_nll=[1.0, 1.0],
                                  reference_nll=[1.5, 1.4], reference="base", n_pairs=[4, 4])
    panel.set_layer_scores(scores)
    rows = panel.model.rows
    assert rows[0]["data_delta_nll"] == pytest.approx(0.3)
    assert rows[1]["data_share[charts]"] == pytest.approx(0.0)
    assert rows[0]["data_share[charts]"] == pytest.approx(0.4 / 0.4)
    assert "test bench" in panel.model.tooltips["data_delta_nll"]
