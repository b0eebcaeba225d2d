"""The merge report as readable HTML (plain data from ``MergeResult.report``)."""

from __future__ import annotations

import html
import json
from typing import Any

from PySide6.QtWidgets import QTextBrowser, QVBoxLayout, QWidget


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        text = json.dumps(v, default=str)
        return html.escape(text if len(text) < 400 else text[:400] + " …")
    return html.escape(str(v))


def report_html(report: dict[str, Any]) -> str:
    """Render a merge report: summary, parameters, per-layer method report."""
    out = [f"<h3>{html.escape(str(report.get('method_pretty', report.get('method', 'merge'))))}</h3>"]
    ref = report.get("reference_url")
    if ref:
        out.append(f"<p><a href='{html.escape(ref)}'>{html.escape(ref)}</a></p>")
    summary = [("experts", ", ".join(report.get("experts", []))),
               ("weights", ", ".join(f"{w:g}" for w in report.get("weights", []))),
               ("base", report.get("base") or "none"),
               ("device", report.get("device")), ("compute dtype", report.get("compute_dtype")),
               ("output dtype", report.get("out_dtype")), ("seed", report.get("seed")),
               ("time", f"{report.get('elapsed_s', 0):.2f} s")]
    out.append("<table cellspacing=0 cellpadding=3 border=1>")
    out += [f"<tr><th align=left>{k}</th><td>{_fmt(v)}</td></tr>" for k, v in summary]
    out.append("</table>")
    params = report.get("parameters") or {}
    if params:
        out.append("<h4>Parameters</h4><table cellspacing=0 cellpadding=3 border=1>")
        out += [f"<tr><th align=left>{html.escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in params.items()]
        out.append("</table>")
    if report.get("layer_coefficients_applied"):
        out.append("<h4>Layer coefficients applied</h4><p>"
                   + _fmt(report["layer_coefficients_applied"]) + "</p>")
    mrep = report.get("method_report") or {}
    layers = mrep.get("layers") if isinstance(mrep, dict) else None
    if isinstance(layers, dict) and layers:
        keys: list[str] = []
        for row in layers.values():
            if isinstance(row, dict):
                keys += [k for k in row if k not in keys]
        out.append("<h4>Per layer</h4><table cellspacing=0 cellpadding=3 border=1><tr><th>layer</th>"
                   + "".join(f"<th>{html.escape(k)}</th>" for k in keys) + "</tr>")
        for name, row in layers.items():
            cells = "".join(f"<td>{_fmt(row.get(k, '')) if isinstance(row, dict) else ''}</td>" for k in keys)
            out.append(f"<tr><th align=left>{html.escape(str(name))}</th>{cells}</tr>")
        out.append("</table>")
    rest = {k: v for k, v in mrep.items() if k != "layers"} if isinstance(mrep, dict) else {}
    if rest:
        out.append("<h4>Method report</h4><table cellspacing=0 cellpadding=3 border=1>")
        out += [f"<tr><th align=left>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>" for k, v in rest.items()]
        out.append("</table>")
    warnings = report.get("warnings") or []
    if warnings:
        out.append("<h4>Warnings</h4><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    return "\n".join(out)


class ReportPanel(QWidget):
    """Shows the last merge report. GUI thread."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.browser = QTextBrowser()
        self.browser.setOpenExternalLinks(True)
        self.browser.setPlaceholderText("Run a merge to see its report here.")
        lay = QVBoxLayout(self)
        lay.setContentsMargins(0, 0, 0, 0)
        lay.addWidget(self.browser)

    def set_report(self, report: dict[str, Any] | None) -> None:
        self.browser.setHtml(report_html(report) if report else "")
