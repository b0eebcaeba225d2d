"""The merge report as readable HTML (plain data from ``MergeResult.report``)."""

from __future__ import annotations

import html
import json
from typing import Any

from PySide6.QtWidgets import QTextBrowser, QVBoxLayout, QWidget

_MAX_LIST = 16  # scalars shown of a long list (the rest is counted)
_MAX_DEPTH = 3  # nesting rendered as tables; deeper values are shown as truncated JSON


def _fmt(v: Any, depth: int = 0) -> str:
    """HTML for one report value: scalars as text, lists and dicts as nested tables."""
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (int, str)):
        return html.escape(str(v))
    if depth >= _MAX_DEPTH:
        text = json.dumps(v, default=str)
        return html.escape(text if len(text) < 200 else text[:200] + " …")
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if all(isinstance(x, dict) for x in v):
            return _html_table(list(v), depth + 1)
        shown = ", ".join(_fmt(x, depth + 1) for x in v[:_MAX_LIST])
        return shown + (f", … ({len(v)} in all)" if len(v) > _MAX_LIST else "")
    if isinstance(v, dict):
        if not v:
            return "none"
        rows = "".join(f"<tr><th align=left>{html.escape(str(k)).replace('_', ' ')}</th>"
                       f"<td>{_fmt(x, depth + 1)}</td></tr>" for k, x in v.items())
        return f"<table cellspacing=0 cellpadding=2 border=1>{rows}</table>"
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
    if isinstance(mrep, dict) and mrep:
        scalars = {k: v for k, v in mrep.items() if _table_rows(v) is None}
        if scalars:
            out.append("<h4>Method report</h4><table cellspacing=0 cellpadding=3 border=1>")
            out += [f"<tr><th align=left>{html.escape(str(k))}</th><td>{_fmt(v)}</td></tr>"
                    for k, v in scalars.items()]
            out.append("</table>")
        for k, v in mrep.items():
            rows = _table_rows(v)
            if rows:
                out.append(f"<h4>{html.escape(str(k)).replace('_', ' ').capitalize()}</h4>")
                out.append(_html_table(rows))
    warnings = report.get("warnings") or []
    if warnings:
        out.append("<h4>Warnings</h4><ul>" + "".join(f"<li>{html.escape(w)}</li>" for w in warnings) + "</ul>")
    return "\n".join(out)


def _table_rows(v: Any) -> list[dict[str, Any]] | None:
    """Rows when ``v`` is a list of dicts or a dict of dicts (per-layer reports), else None."""
    if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
        return v
    if isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()):
        return [{"name": k, **r} for k, r in v.items()]
    return None


def _html_table(rows: list[dict[str, Any]], depth: int = 0) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    head = "".join(f"<th>{html.escape(str(k)).replace('_', ' ')}</th>" for k in keys)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(k, ''), depth)}</td>" for k in keys) + "</tr>"
                   for r in rows)
    return f"<table cellspacing=0 cellpadding=3 border=1><tr>{head}</tr>{body}</table>"


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
