"""The merge-speed benchmark runs end to end on tiny inputs: every row its own process,
rows interleaved in an order that rotates from round to round, medians in the JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks" / "merge_speed.py"


def test_merge_speed_runs_rotating_rows(tmp_path):
    out = tmp_path / "speed.json"
    proc = subprocess.run(
        [sys.executable, str(BENCH), "--family", "shared-small", "--width", "64", "--vision-width", "32",
         "--experts", "2", "--methods", "linear,ties", "--no-mergekit", "--runs", "2", "--json", str(out)],
        capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    order = [line.split(":")[1].split()[0] for line in proc.stderr.splitlines() if "] run " in line]
    assert order == ["linear", "ties", "ties", "linear"]  # round 2 starts at the second row
    doc = json.loads(out.read_text())
    rows = {r["method"]: r for r in doc["rows"]}
    assert set(rows) == {"linear", "ties"}
    for r in rows.values():
        assert r["family"] == "shared-small" and len(r["runs_s"]) == 2
        assert r["process_s"] > 0 and r["process_peak_rss_mb"] > 0 and r["merge_s"] >= 0
