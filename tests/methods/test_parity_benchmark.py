"""benchmarks/parity.py without the references: one clear message, exit 0, nothing run."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

PARITY = Path(__file__).resolve().parents[2] / "benchmarks" / "parity.py"


def _load(monkeypatch):
    spec = importlib.util.spec_from_file_location("parity_benchmark", PARITY)
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "parity_benchmark", mod)  # dataclasses look it up
    spec.loader.exec_module(mod)
    return mod


def test_parity_without_references_says_so_and_exits_0(monkeypatch, capsys):
    mod = _load(monkeypatch)
    monkeypatch.setattr(mod, "available", lambda name: False)
    monkeypatch.setattr(mod, "make_world", lambda *a: (_ for _ in ()).throw(AssertionError("ran")))
    assert mod.main([]) == 0
    out = capsys.readouterr().out
    assert "neither mergekit nor fusion_bench is importable" in out
    assert ".[parity]" in out


def test_parity_rejects_bad_sizes(monkeypatch, capsys):
    mod = _load(monkeypatch)
    try:
        mod.main(["--size", "10,20"])
    except SystemExit as e:
        assert e.code == 2
    else:
        raise AssertionError("a bad --size was accepted")
    assert "--size" in capsys.readouterr().err
