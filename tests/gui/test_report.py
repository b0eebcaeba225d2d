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
    for part in ("align hidden units", "chosen by", "in layer", "alm ridge", "timings"):
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
