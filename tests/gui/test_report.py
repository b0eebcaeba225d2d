"""The merge report panel renders every part of a real report readably (no raw JSON)."""

from __future__ import annotations

import re

import torch

from pivotmerge_gui.core.methods.base import Calibration
from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.gui.panels.report import ReportPanel, report_html
from tests.factories import make_mlp_projector


def _report() -> dict:
    experts = [make_mlp_projector(8, 16, 12, seed=s) for s in (1, 2, 3)]
    g = torch.Generator().manual_seed(0)
    cal = Calibration([torch.randn(32, 8, generator=g) for _ in experts], ["a", "b", "c"])
    return merge_projectors(experts, "pivotmerge", calibration=cal).report


def test_report_html_renders_nested_values_as_tables_not_json(qtbot):
    rep = _report()
    text = report_html(rep)
    assert "PivotMerge" in text and "arxiv.org/abs/2604.22823" in text
    assert '{"' not in text and "[{" not in text  # nested dicts and lists are tables, not JSON
    # the method report's parts are all there: stages, pivot choice, alignment pairs, ALM
    for part in ("Align hidden units", "Chosen by", "In layer", "ALM ridge", "Timings"):
        assert part in text, part
    assert text.count("<table") > 8  # nested tables
    # long lists are cut with a count; booleans read as yes/no
    long = report_html({"method": "x", "method_report": {"scores": list(range(40)), "ok": True}})
    assert "… (40 in all)" in long and ">yes<" in long
    # an absurdly deep value stays bounded
    deep: dict = {"v": 1}
    for _ in range(10):
        deep = {"d": deep}
    assert len(report_html({"method": "x", "method_report": {"deep": deep}})) < 2000
    panel = ReportPanel()
    qtbot.addWidget(panel)
    panel.set_report(rep)
    plain = panel.browser.toPlainText()
    assert "Alignment" in plain and not re.search(r'\{"\w+":', plain)


def test_report_reads_at_a_glance_labels_units_human_values_and_unwrapped_cells(qtbot):
    from pivotmerge_gui.gui.panels.report import label, param_value

    rep = _report()
    text = report_html(rep)
    # parameters: human names and values from the registry's Param metadata
    assert re.search(r">Pivot</th><td[^>]*>automatic \(-1\)<", text)
    assert re.search(r">Align hidden units</th><td[^>]*>yes<", text)
    assert re.search(r">Filter conflicts</th><td[^>]*>no<", text)
    assert re.search(r">ALM</th><td[^>]*>automatic<", text)
    assert re.search(r">Trim density</th><td[^>]*>no trim \(1\)<", text)
    # summary: labelled values with units; the pivot the merge picked is named
    assert re.search(r">Time</th><td[^>]*>\d+\.\d\d s<", text)
    assert re.search(r">Pivot</th><td[^>]*>[^<(]+ — ", text)
    # every table cell and header refuses to wrap; alignment pairs are a flat table of their own
    cells = re.findall(r"<t[dh][^>]*>", text)
    assert cells and all("white-space:nowrap" in c for c in cells)
    assert "Alignment: pairs" in text and text.count("<table") >= 8
    assert label("pivot_and_alignment_s") == "Pivot and alignment (s)"
    assert label("estimated_peak_gib") == "Estimated peak (GiB)"
    assert param_value(None, True) == "yes" and param_value(None, "auto") == "automatic"
    # a method report that repeats the parameters does not show them twice; small peaks in MiB
    again = report_html({"method": "x", "parameters": {"density": 0.2}, "estimated_peak_gib": 0.001,
                         "method_report": {"params": {"density": 0.2}, "other": {"density": 0.5}}})
    assert "<h4>Params</h4>" not in again and "<h4>Other</h4>" in again and "1.0 MiB" in again
    # a narrow panel scrolls sideways instead of squashing the columns
    panel = ReportPanel()
    qtbot.addWidget(panel)
    panel.resize(360, 500)
    panel.show()
    panel.set_report(rep)
    assert panel.browser.document().size().width() > 400
