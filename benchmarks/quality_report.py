"""Tables and statistics of benchmarks/merge_quality.py (kept apart so that the benchmark
reads as the protocol and this file as the arithmetic).

Every number here is computed from the per-seed records the benchmark stores: means and
sample standard deviations over seeds, and paired differences (same seed = same world,
same experts, same calibration subset) with a two-sided 95 % Student-t interval.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from typing import Any

MAIN = "token_accuracy"
# two-sided 95 % Student-t quantiles by degrees of freedom (n - 1 seeds)
T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306,
        9: 2.262, 10: 2.228, 11: 2.201, 12: 2.179, 14: 2.145, 19: 2.093, 29: 2.045}


def t975(df: int) -> float:
    if df <= 0:
        return float("nan")
    if df in T975:
        return T975[df]
    below = [d for d in T975 if d <= df]
    return T975[max(below)] if df < 30 else 1.96


@dataclass
class Row:
    """One projector configuration of one table: its records, one per seed."""

    label: str
    kind: str  # expert | joint | base | merge
    method: str = ""
    group: str = ""  # data-free | data-driven | reference
    tuned_param: str = ""
    per_seed: list[dict[str, Any]] = field(default_factory=list)


def stat(values: list[float | None]) -> tuple[float, float]:
    values = [v for v in values if v is not None]  # metrics a run did not compute
    if not values:
        return float("nan"), float("nan")
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def fmt(values: list[float | None], digits: int = 3) -> str:
    m, s = stat(values)
    if math.isnan(m):
        return "n/a"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if sum(v is not None for v in values) > 1 else f"{m:.{digits}f}"


def scores(row: Row, which: str = "test", metric: str = MAIN) -> dict[int, float]:
    """Seed -> mean-over-domains score of the tuned (or only) result."""
    return {s["seed"]: s[which]["mean"][metric] for s in row.per_seed if which in s}


def table(rows: dict[str, Row], domains: list[str]) -> str:
    head = ["projector", *domains, f"**mean {MAIN}**", f"default-settings {MAIN}", "retrieval", "NLL",
            "chosen on validation"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in rows.values():
        ok = [s for s in row.per_seed if "test" in s]
        if not ok:
            err = row.per_seed[0].get("error", "") if row.per_seed else ""
            lines.append(f"| {row.label} | " + " | ".join(["n/a"] * (len(head) - 2)) + f" | {err[:60]} |")
            continue
        cells = [fmt([s["test"]["per_domain"][d][MAIN] for s in ok]) for d in domains]
        cells.append("**" + fmt([s["test"]["mean"][MAIN] for s in ok]) + "**")
        dflt = [s["default_test"]["mean"][MAIN] for s in ok if "default_test" in s]
        cells.append(fmt(dflt) if dflt else "")
        cells.append(fmt([s["test"]["mean"]["retrieval_accuracy"] for s in ok]))
        cells.append(fmt([s["test"]["mean"]["nll"] for s in ok]))
        chosen = sorted({s["chosen"] for s in ok if s.get("chosen") is not None})
        fixed = sorted({v for s in ok for v in (s.get("fixed") or {}).values()})
        if chosen:
            cells.append(f"{row.tuned_param} ∈ {{{', '.join(f'{c:g}' for c in chosen)}}}")
        elif fixed:
            cells.append(f"PivotMerge's {row.tuned_param} ∈ {{{', '.join(f'{c:g}' for c in fixed)}}}")
        else:
            cells.append("")
        lines.append(f"| {row.label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def paired(a: Row, b: Row) -> dict[str, Any] | None:
    """a - b over the seeds both have: mean, 95 % t-interval, n."""
    sa, sb = scores(a), scores(b)
    common = sorted(set(sa) & set(sb))
    if not common:
        return None
    d = [sa[s] - sb[s] for s in common]
    m, sd = stat(d)
    half = t975(len(d) - 1) * sd / math.sqrt(len(d)) if len(d) > 1 else float("nan")
    return {"mean": m, "lo": m - half, "hi": m + half, "n": len(d)}


def best_row(rows: list[Row]) -> Row | None:
    scored = [(stat(list(scores(r).values()))[0], r.label, r) for r in rows if scores(r)]
    scored = [x for x in scored if not math.isnan(x[0])]
    return max(scored, key=lambda x: (x[0], x[1]))[2] if scored else None


def comparison_lines(pm: Row | None, others: list[Row], joint: Row | None, title: str) -> list[str]:
    """PivotMerge's row against the best other row and against each one: paired
    difference with its 95 % interval, and PivotMerge's own spread over seeds."""
    if pm is None or not scores(pm):
        return []
    m_pm, sd_pm = stat(list(scores(pm).values()))
    out = [f"**{title}**: {pm.label} {m_pm:.3f} (spread, std over seeds: {sd_pm:.3f})", "",
           "| against | its mean | PivotMerge - it (paired, 95 % CI) | n | above it by more than the spread? |",
           "|---|---:|---|---:|---|"]
    best = best_row(others)
    ordered = ([best] if best else []) + [r for r in others if r is not best]
    for r in ordered:
        p = paired(pm, r)
        if p is None:
            continue
        m_r = stat(list(scores(r).values()))[0]
        verdict = "yes" if p["mean"] > sd_pm else ("below" if p["mean"] < -sd_pm else "no (within the spread)")
        tag = " (best other)" if r is best else ""
        out.append(f"| {r.label}{tag} | {m_r:.3f} | {p['mean']:+.3f} [{p['lo']:+.3f}, {p['hi']:+.3f}] | "
                   f"{p['n']} | {verdict} |")
    if joint is not None:
        sj = scores(joint)
        common = sorted(set(sj) & set(scores(pm)))
        if common:
            ratio = [scores(pm)[s] / sj[s] for s in common if sj[s] > 0]
            out += ["", f"{pm.label} / jointly trained projector: {fmt(ratio)} (goal >= 0.95)"]
    return out + [""]


def compact(tables: dict[str, dict[str, Row]], regimes: list[str]) -> str:
    """One scenario in one table: a row per configuration, a column per calibration
    regime (data-free rows fill the first column only); cells = test mean ± std."""
    head = ["projector", "no calibration", *[f"calibration `{r}`" for r in regimes]]
    lines = ["| " + " | ".join(head) + " |", "|---|" + "---:|" * (len(head) - 1)]
    for row in tables.get("reference", {}).values():
        if row.kind in ("joint", "base"):
            lines.append(f"| {row.label} | " + " | ".join([fmt(list(scores(row).values()))] * (len(head) - 1)) + " |")
    for row in tables.get("data-free", {}).values():
        lines.append(f"| {row.label} | {fmt(list(scores(row).values()))} |" + " |" * len(regimes))
    labels = list(dict.fromkeys(lab for r in regimes for lab in tables.get(r, {})))
    for lab in labels:
        cells = [fmt(list(scores(tables[r][lab]).values())) if lab in tables.get(r, {}) else "" for r in regimes]
        lines.append(f"| {lab} | | " + " | ".join(cells) + " |")
    return "\n".join(lines)
