"""Short fuzz of the readers: mutated safetensors and pickle files either load or raise a
typed CheckpointError, never anything else (the long run belongs in benchmarks/)."""

from __future__ import annotations

import io
import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save

from pivotmerge_gui.core.errors import CheckpointError
from pivotmerge_gui.core.io import load_projector

from .cases import CASE_BY_ID

_STATE = {k: v for k, v in CASE_BY_ID["hf-llava-file"].build()[1].items()}
_VALID_ST = save(_STATE, metadata={"format": "pt"})
_buf = io.BytesIO()
torch.save(CASE_BY_ID["llava-mlp2x"].build()[1], _buf)
_VALID_PT = _buf.getvalue()

_SETTINGS = settings(max_examples=int(__import__("os").environ.get("PM_FUZZ_EXAMPLES", "150")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def _mutate(data: bytes, edits: list[tuple[int, int]], cut: int | None) -> bytes:
    b = bytearray(data)
    for pos, val in edits:
        b[pos % len(b)] = val
    return bytes(b[:cut] if cut is not None else b)


def _load_or_typed_error(path) -> None:
    try:
        p = load_projector(path)
    except CheckpointError as exc:
        assert str(exc)  # a message for the user
        return
    assert p.layers  # loaded: a real projector


edits = st.lists(st.tuples(st.integers(0, 10**6), st.integers(0, 255)), max_size=8)
cuts = st.one_of(st.none(), st.integers(0, 4096))


@_SETTINGS
@given(edits=edits, cut=cuts)
def test_mutated_safetensors(tmp_path, edits, cut):
    path = tmp_path / "model.safetensors"
    path.write_bytes(_mutate(_VALID_ST, edits, cut))
    _load_or_typed_error(path)


@_SETTINGS
@given(header=st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(-2**70, 2**70), st.text(max_size=8)),
    lambda c: st.one_of(st.lists(c, max_size=4), st.dictionaries(st.text(max_size=40), c, max_size=4)),
    max_leaves=12,
), data=st.binary(max_size=64))
def test_arbitrary_json_headers(tmp_path, header, data):
    raw = json.dumps(header).encode()
    path = tmp_path / "model.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    _load_or_typed_error(path)


@_SETTINGS
@given(edits=edits, cut=st.one_of(st.none(), st.integers(0, len(_VALID_PT))))
def test_mutated_pickles(tmp_path, edits, cut):
    path = tmp_path / "mm_projector.bin"
    path.write_bytes(_mutate(_VALID_PT, edits, cut))
    _load_or_typed_error(path)


@pytest.mark.parametrize("blob", [b"\0" * 8, b"PK\x03\x04", b"\x80\x02}q\x00.", b"\x80\x04\x95"])
def test_tiny_blobs(tmp_path, blob):
    path = tmp_path / "mm_projector.bin"
    path.write_bytes(blob)
    with pytest.raises(CheckpointError):
        load_projector(path)


def test_fuzzer_smoke_every_strategy_runs_clean():
    """Two cases of each strategy of ``benchmarks/fuzz_inputs.py`` (the long run is there)."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "fuzz_inputs.py"
    spec = importlib.util.spec_from_file_location("fuzz_inputs", path)
    assert spec is not None and spec.loader is not None
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fuzz
    spec.loader.exec_module(fuzz)
    res = fuzz.run(2 * len(fuzz.STRATEGIES), seed=1, log=lambda _line: None)
    assert res["failures"] == []
    assert res["cases"] == 14 and {n: sum(c.values()) for n, c in res["per_strategy"].items()} == {
        n: 2 for n in fuzz.STRATEGIES}
    assert {"pickle_structure", "yaml_alias", "deep_nesting"} <= set(res["per_strategy"])
