"""The merge report as readable HTML (plain data from ``MergeResult.report``).

Read at a glance: a summary of labelled values with units, the parameters under their
human names and values (from the method registry's ``Param`` metadata: ``pivot -1`` reads
"automatic", booleans "yes"/"no"), then the method's own report: scalars as labelled rows
and every per-layer / per-expert list as a flat table whose cells never wrap (a nested list
inside a row becomes its own table below, keyed by the row it came from).
"""

from __future__ import annotations

import html
import json
import re
from typing import Any

from PySide6.QtWidgets import QTextBrowser, QVBoxLayout, QWidget

_MAX_LIST = 16  # scalars shown of a long list (the rest is counted)
_MAX_DEPTH = 3  # nesting rendered as tables; deeper values are shown as truncated JSON
_TABLE = "<table cellspacing=0 cellpadding=4 border=1 style='border-collapse:collapse'>"
_TH = "<th align=left style='white-space:nowrap; background:#eef1f5'>"
_TD = "<td style='white-space:nowrap'>"
_TDN = "<td align=right style='white-space:nowrap'>"  # numbers: right-aligned
# units by key suffix (the report's keys name their unit: elapsed_s, estimated_peak_gib)
_UNITS = (("_gib", "GiB"), ("_mib", "MiB"), ("_s", "s"), ("_ms", "ms"))
_PERCENT = re.compile(r"(fraction|energy_kept|shared_energy$|share$)")
_WORDS = {"alm": "ALM", "sdf": "SDF", "nll": "NLL", "svd": "SVD", "mu": "μ", "gib": "GiB", "id": "id"}


def label(key: str) -> str:
    """A report key as a label: words, abbreviations in capitals, the unit in brackets."""
    k = str(key)
    unit = next((u for suffix, u in _UNITS if k.endswith(suffix) and len(k) > len(suffix)), None)
    if unit:
        k = k[: -len(next(s for s, u in _UNITS if u == unit))]
    words = [_WORDS.get(w, w) for w in k.replace("-", "_").split("_") if w]
    text = " ".join(words)
    text = text[:1].upper() + text[1:]
    return f"{text} ({unit})" if unit else text


def fmt_number(key: str, v: float) -> str:
    """A number with the precision and unit its key implies."""
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, int):
        return f"{v:,}".replace(",", " ") if abs(v) >= 10_000 else str(v)
    if _PERCENT.search(str(key)) and 0.0 <= v <= 1.0:
        return f"{100 * v:.1f} %"
    if v != 0 and (abs(v) >= 1e5 or abs(v) < 1e-3):
        return f"{v:.3e}"
    return f"{v:.4g}"


def _fmt(v: Any, key: str = "", depth: int = 0) -> str:
    """HTML for one report value: scalars as text, lists and dicts as nested tables."""
    if v is None:
        return "—"
    if isinstance(v, (bool, int, float)):
        return fmt_number(key, v)
    if isinstance(v, str):
        return html.escape(v)
    if depth >= _MAX_DEPTH:
        text = json.dumps(v, default=str)
        return html.escape(text if len(text) < 200 else text[:200] + " …")
    if isinstance(v, (list, tuple)):
        if not v:
            return "none"
        if key == "shape" and all(isinstance(x, int) for x in v):
            return " × ".join(str(x) for x in v)
        if all(isinstance(x, dict) for x in v):
            return _html_table(list(v), depth + 1)
        shown = ", ".join(_fmt(x, key, depth + 1) for x in v[:_MAX_LIST])
        return shown + (f", … ({len(v)} in all)" if len(v) > _MAX_LIST else "")
    if isinstance(v, dict):
        if not v:
            return "none"
        return _kv_table(v, depth + 1)
    return html.escape(str(v))


def _kv_table(values: dict[str, Any], depth: int = 0) -> str:
    rows = "".join(f"<tr>{_TH}{html.escape(label(k))}</th>{_TD}{_fmt(x, k, depth)}</td></tr>"
                   for k, x in values.items())
    return f"{_TABLE}{rows}</table>"


def param_value(param: Any, value: Any) -> str:
    """A parameter's value as the form would say it: booleans yes/no, a sentinel the help
    text names ("-1 = automatic") by that name, "auto" as "automatic"."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    help_ = str(getattr(param, "help", "") or "")
    if isinstance(value, (int, float)):
        m = re.search(rf"(?<![\w.]){re.escape(_num(value))}(?:\.0+)?\s*=\s*([a-zA-Z][\w \-]*?)\s*[:;,.)]", help_)
        if m:
            return f"{m.group(1)} ({_num(value)})"
        return fmt_number(getattr(param, "name", ""), value)
    if value == "auto":
        return "automatic"
    return html.escape(str(value))


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def method_params(method: str) -> dict[str, Any]:
    """The registry's ``Param`` metadata of a method by name ({} when unknown)."""
    from pivotmerge_gui.core.errors import PivotMergeError
    from pivotmerge_gui.core.methods.base import get_method

    try:
        return {p.name: p for p in get_method(method).params}
    except PivotMergeError:  # an unknown method (a report from elsewhere): plain labels will do
        return {}


def report_html(report: dict[str, Any]) -> str:
    """Render a merge report: summary, parameters, per-layer method report."""
    title = html.escape(str(report.get("method_pretty", report.get("method", "merge"))))
    out = [f"<h3>{title} merge</h3>"]
    ref = report.get("reference_url")
    if ref:
        out.append(f"<p>Method reference: <a href='{html.escape(ref)}'>{html.escape(ref)}</a></p>")
    mrep = report.get("method_report") if isinstance(report.get("method_report"), dict) else {}
    experts = list(report.get("experts", []))
    weights = list(report.get("weights", []))
    summary: dict[str, Any] = {
        "Experts": ", ".join(f"{html.escape(str(n))} (weight {w:g})" for n, w in zip(experts, weights))
        or ", ".join(html.escape(str(n)) for n in experts),
        "Base": html.escape(str(report.get("base") or "none")),
    }
    pivot = mrep.get("pivot") if isinstance(mrep, dict) else None
    if isinstance(pivot, dict) and pivot.get("name") is not None:
        summary["Pivot"] = html.escape(f"{pivot['name']} — {pivot.get('chosen_by', '')}".rstrip(" —"))
    summary.update({
        "Device": html.escape(str(report.get("device", "—"))),
        "Compute dtype": html.escape(str(report.get("compute_dtype", "—"))),
        "Output dtype": html.escape(str(report.get("out_dtype", "—"))),
        "Random seed": html.escape(str(report.get("seed", "—"))),
        "Time": f"{float(report.get('elapsed_s') or 0):.2f} s",
    })
    if report.get("estimated_peak_gib") is not None:
        gib = float(report["estimated_peak_gib"])
        summary["Estimated peak memory"] = (f"{gib:.2f} GiB" if gib >= 0.1 else f"{gib * 1024:.1f} MiB"
                                            if gib * 1024 >= 0.1 else "under 0.1 MiB")
    out.append(_TABLE + "".join(f"<tr>{_TH}{k}</th>{_TD}{v}</td></tr>" for k, v in summary.items()) + "</table>")
    params = report.get("parameters") or {}
    if params:
        meta = method_params(str(report.get("method", "")))
        out.append("<h4>Parameters</h4>" + _TABLE)
        for k, v in params.items():
            p = meta.get(k)
            tip = f" title='{html.escape(p.help)}'" if p is not None else ""
            out.append(f"<tr>{_TH[:-1]}{tip}>{html.escape(label(k))}</th>{_TD}{param_value(p, v)}</td></tr>")
        out.append("</table>")
    if report.get("layer_coefficients_applied"):
        out.append("<h4>Layer coefficients applied</h4>" + _fmt(report["layer_coefficients_applied"]))
    if mrep:
        scalars = {k: v for k, v in mrep.items() if _table_rows(v) is None and not isinstance(v, dict)
                   and k not in ("warnings",)}
        groups = {k: v for k, v in mrep.items() if _table_rows(v) is None and isinstance(v, dict) and v
                  and not all(params.get(ik, object()) == iv for ik, iv in v.items())}  # not the Parameters again
        if scalars:
            out.append("<h4>Method report</h4>" + _kv_table(scalars))
        for k, v in groups.items():
            inner_tables = {ik: iv for ik, iv in v.items() if _table_rows(iv) is not None}
            flat = {ik: iv for ik, iv in v.items() if ik not in inner_tables}
            out.append(f"<h4>{html.escape(label(k))}</h4>" + (_kv_table(flat) if flat else ""))
            for ik, iv in inner_tables.items():
                out += _tables(f"{label(k)}: {label(ik).lower()}", _table_rows(iv) or [])
        for k, v in mrep.items():
            rows = _table_rows(v)
            if rows:
                out += _tables(label(k), rows)
    warnings = list(report.get("warnings") or []) + [w for w in (mrep.get("warnings") or []) if isinstance(w, str)]
    if warnings:
        out.append("<h4>Warnings</h4><ul>" + "".join(f"<li>{html.escape(w)}</li>"
                                                      for w in dict.fromkeys(warnings)) + "</ul>")
    return "\n".join(out)


def _table_rows(v: Any) -> list[dict[str, Any]] | None:
    """Rows when ``v`` is a list of dicts or a dict of dicts (per-layer reports), else None."""
    if isinstance(v, list) and v and all(isinstance(r, dict) for r in v):
        return v
    if isinstance(v, dict) and v and all(isinstance(r, dict) for r in v.values()):
        return [{"name": k, **r} for k, r in v.items()]
    return None


def _tables(title: str, rows: list[dict[str, Any]]) -> list[str]:
    """A heading and a flat table; a column that holds lists of dicts (alignment pairs per
    expert) becomes its own table below, each of its rows keyed by the row it belongs to."""
    first = next(iter(rows[0]), "")
    nested = [k for k in dict.fromkeys(k for r in rows for k in r)
              if any(isinstance(r.get(k), list) and r.get(k) and all(isinstance(x, dict) for x in r[k])
                     for r in rows)]
    flat = [{k: v for k, v in r.items() if k not in nested} for r in rows]
    out = [f"<h4>{html.escape(title)}</h4>", _html_table(flat)]
    for k in nested:
        sub = [{first: r.get(first), **x} for r in rows for x in (r.get(k) or [])]
        if sub:
            out += [f"<h4>{html.escape(title)}: {html.escape(label(k).lower())}</h4>", _html_table(sub)]
    return out


def _html_table(rows: list[dict[str, Any]], depth: int = 0) -> str:
    keys: list[str] = []
    for r in rows:
        keys += [k for k in r if k not in keys]
    head = "".join(f"{_TH}{html.escape(label(k))}</th>" for k in keys)
    body = "".join("<tr>" + "".join(
        (_TDN if isinstance(r.get(k), (int, float)) and not isinstance(r.get(k), bool) else _TD)
        + f"{_fmt(r.get(k, ''), k, depth)}</td>" for k in keys) + "</tr>" for r in rows)
    return f"{_TABLE}<tr>{head}</tr>{body}</table>"


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
