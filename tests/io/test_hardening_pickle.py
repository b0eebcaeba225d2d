"""Pickle checkpoints that lie about sizes (issue 15, items 4 and 11): every storage and
tensor view is checked against the file before torch materialises a byte; refusals name the
file, the tensor or storage, and what was refused; the CLI gives exit 2 and one line."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core.errors import CheckpointError, UnsafeCheckpointError
from pivotmerge_gui.core.io import load_projector
from pivotmerge_gui.core.io.pickle_scan import refusal_reason, scan_pickle, view_problem
from pivotmerge_gui.core.io.readers import _copy_tensor

from .hostile import Storage, View, floats, legacy_checkpoint, zip_checkpoint

W, B = "model.mm_projector.weight", "model.mm_projector.bias"  # LLaVA's linear projector


def _linear(weight: View, bias: View) -> dict:
    return {W: weight, B: bias}


def _honest_zip(path: Path) -> Path:
    s, b = Storage("0", 6), Storage("1", 2)
    return zip_checkpoint(path, _linear(View(s, 0, (2, 3), (3, 1)), View(b, 0, (2,), (1,))),
                          {"0": floats(*range(6)), "1": floats(7, 8)})


def test_hand_built_honest_zip_loads_with_its_values(tmp_path):
    p = load_projector(_honest_zip(tmp_path / "mm_projector.bin"))
    assert torch.equal(p.layers[0].tensors["weight"], torch.arange(6.0).reshape(2, 3))
    assert torch.equal(p.layers[0].tensors["bias"], torch.tensor([7.0, 8.0]))
    assert scan_pickle(tmp_path / "mm_projector.bin").format == "zip"


def test_stride_zero_view_is_refused_before_any_copy(tmp_path):
    s, b = Storage("0", 1), Storage("1", 2)
    path = zip_checkpoint(tmp_path / "mm_projector.bin",
                          _linear(View(s, 0, (100_000, 100_000), (0, 0)), View(b, 0, (2,), (1,))),
                          {"0": floats(1), "1": floats(7, 8)})
    assert path.stat().st_size < 3000
    with pytest.raises(CheckpointError) as err:
        load_projector(path)
    msg = str(err.value)
    assert str(path) in msg and f"tensor '{W}'" in msg and "10000000000 elements over a storage of 1" in msg


def test_overlapping_view_within_its_storage_is_resolved_by_a_bounded_copy(tmp_path):
    # a sliding window: 4 elements over a 3-element storage would expand; 2x2 over 3 with
    # strides (1, 1) reads [[0, 1], [1, 2]]: 4 > 3 elements, refused; 2x1 windows are fine
    s, b = Storage("0", 3), Storage("1", 2)
    ok = zip_checkpoint(tmp_path / "ok.bin", _linear(View(s, 0, (2, 1), (1, 1)), View(b, 0, (2,), (1,))),
                        {"0": floats(0, 1, 2), "1": floats(7, 8)})
    assert torch.equal(load_projector(ok).layers[0].tensors["weight"], torch.tensor([[0.0], [1.0]]))
    bad = zip_checkpoint(tmp_path / "bad.bin", _linear(View(s, 0, (2, 2), (1, 1)), View(b, 0, (2,), (1,))),
                         {"0": floats(0, 1, 2), "1": floats(7, 8)})
    with pytest.raises(CheckpointError, match="overlapping view of 4 elements over a storage of 3"):
        load_projector(bad)


def test_storage_that_over_claims_its_zip_record_is_an_error_not_a_misread(tmp_path):
    s, b = Storage("0", 12), Storage("1", 2)
    path = zip_checkpoint(tmp_path / "mm_projector.bin", _linear(View(s, 0, (3, 4), (4, 1)), View(b, 0, (2,), (1,))),
                          {"0": floats(0, 1, 2, 3), "1": floats(7, 8)})
    with pytest.raises(CheckpointError, match=r"storage '0' claims 12 elements of 4 bytes \(48 bytes\) but its "
                                              r"record holds 16 bytes"):
        load_projector(path)


def test_compressed_or_missing_storage_records_are_refused(tmp_path):
    s, b = Storage("0", 6), Storage("1", 2)
    state = _linear(View(s, 0, (2, 3), (3, 1)), View(b, 0, (2,), (1,)))
    packed = zip_checkpoint(tmp_path / "packed.bin", state, {"0": floats(*range(6)), "1": floats(7, 8)}, compress=True)
    with pytest.raises(CheckpointError, match="storage record 'archive/data/0' is compressed"):
        load_projector(packed)
    missing = zip_checkpoint(tmp_path / "missing.bin", state, {"1": floats(7, 8)})
    with pytest.raises(CheckpointError, match="storage record 'archive/data/0' is missing"):
        load_projector(missing)


@pytest.mark.parametrize(("offset", "size", "stride", "problem"), [
    (5, (2, 3), (3, 1), "reaches element 10 of a storage of 6 elements"),
    (-1, (2, 3), (3, 1), "invalid storage offset -1"),
    (0, (2, -3), (3, 1), "invalid sizes"),
    (0, (2, 3), (3, -1), "invalid strides"),
    (0, (2, 3), (3,), "2 sizes but 1 strides"),
    (0, (1,) * 65, (1,) * 65, "65 dimensions"),
    (0, (10**400, 3), (0, 1), "invalid sizes [<1329-bit integer>, 3]"),
    (0, (10**6, 10**6), (0, 0), "stride-0 or overlapping view of 1000000000000 elements"),
    (0, (2.5, 3), (3, 1), "invalid sizes"),
])
def test_impossible_views_are_refused_naming_the_tensor(tmp_path, offset, size, stride, problem):
    s, b = Storage("0", 6), Storage("1", 2)
    path = zip_checkpoint(tmp_path / "mm_projector.bin", _linear(View(s, offset, size, stride), View(b, 0, (2,), (1,))),
                          {"0": floats(*range(6)), "1": floats(7, 8)})
    with pytest.raises(CheckpointError) as err:
        load_projector(path)
    assert problem in str(err.value) and f"tensor '{W}'" in str(err.value)
    assert len(str(err.value)) < 1000


def test_legacy_storage_claims_are_checked_against_the_file(tmp_path):
    honest = legacy_checkpoint(tmp_path / "honest.bin",
                               _linear(View(Storage("0", 6), 0, (2, 3), (3, 1)), View(Storage("1", 2), 0, (2,), (1,))),
                               {"0": (6, floats(*range(6))), "1": (2, floats(7, 8))})
    assert scan_pickle(honest).format == "legacy"
    assert torch.equal(load_projector(honest).layers[0].tensors["weight"], torch.arange(6.0).reshape(2, 3))

    huge = legacy_checkpoint(tmp_path / "huge.bin",
                             _linear(View(Storage("0", 10**12), 0, (2, 3), (3, 1)), View(Storage("1", 2), 0, (2,), (1,))),
                             {"0": (6, floats(*range(6))), "1": (2, floats(7, 8))})
    with pytest.raises(CheckpointError, match="claims 1000000000000 elements of 4 bytes, more than the whole"):
        load_projector(huge)
    lying = legacy_checkpoint(tmp_path / "lying.bin",
                              _linear(View(Storage("0", 6), 0, (2, 3), (3, 1)), View(Storage("1", 2), 0, (2,), (1,))),
                              {"0": (5, floats(*range(6))), "1": (2, floats(7, 8))})
    with pytest.raises(CheckpointError, match="storage '0' claims 6 elements but its data says 5"):
        load_projector(lying)
    bomb = legacy_checkpoint(tmp_path / "bomb.bin",
                             _linear(View(Storage("0", 6), 0, (10**6, 10**6), (0, 0)), View(Storage("1", 2), 0, (2,), (1,))),
                             {"0": (6, floats(*range(6))), "1": (2, floats(7, 8))})
    with pytest.raises(CheckpointError, match=f"tensor '{W}': a stride-0 or overlapping view"):
        load_projector(bomb)


def test_copy_guard_catches_views_the_scan_did_not_see():
    with pytest.raises(CheckpointError, match="tensor 'k': a stride-0 or overlapping view"):
        _copy_tensor(torch.zeros(1).expand(10**5, 10**5), "f.bin", "k")
    t = torch.arange(6.0)[1:5]
    assert torch.equal(_copy_tensor(t, "f.bin", "k"), torch.tensor([1.0, 2, 3, 4]))
    assert view_problem(6, 0, (2, 3), (3, 1)) is None and view_problem(0, 0, (0, 5), (5, 1)) is None


class _System:
    def __reduce__(self):
        return (os.system, ("true",))


class _Custom:  # unpickling needs this class: NEWOBJ + BUILD of a non-allowlisted global
    def __init__(self):
        self.x = 1


class _Eval:
    def __reduce__(self):
        return (eval, ("1",))


@pytest.mark.parametrize(("payload", "named"), [(_System, "system"), (_Custom, "_Custom"), (_Eval, "eval")])
@pytest.mark.parametrize("legacy", [False, True])
def test_refused_pickles_give_a_full_reason_naming_what_was_refused(tmp_path, payload, named, legacy):
    path = tmp_path / "mm_projector.bin"
    torch.save({W: torch.zeros(2, 2), "x": payload()}, path, _use_new_zipfile_serialization=not legacy)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_projector(path)
    msg = str(err.value)
    reason = msg.split("needs to run code to load (", 1)[1].split("). PivotMerge", 1)[0]
    assert msg.startswith(f"{path}: refused") and named in reason and "more characters" not in reason
    assert "Weights only load failed" not in reason and "\n" not in msg


def test_refusal_reason_is_never_empty():
    assert refusal_reason("", []) == "an object torch will not rebuild without running code"
    assert refusal_reason("Weights only load failed.\n\nCheck the documentation", ["torch.Size", "evil.mod"]) == \
        "it references evil.mod"
    long = refusal_reason("Unsupported global: GLOBAL " + "a" * 2000, [])
    assert long.startswith("Unsupported global: GLOBAL aaa") and long.endswith("(1527 more characters)")


def test_cli_inspect_of_a_hostile_pickle_is_one_line(tmp_path, capsys):
    s = Storage("0", 1)
    path = zip_checkpoint(tmp_path / "mm_projector.bin", _linear(View(s, 0, (10**5, 10**5), (0, 0)), View(s, 0, (1,), (1,))),
                          {"0": floats(1)})
    assert cli_main(["inspect", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("pivotmerge: error: ") and "stride-0" in err[0]


def test_the_bombs_stay_within_bounded_memory(tmp_path):
    """In a fresh process (so its peak RSS is its own): a 1.6 GB stride-0 view, an
    over-claiming record and a legacy 4 TB claim are refused with the process peak far below
    what copying them would need."""
    s = Storage("0", 1)
    bomb = zip_checkpoint(tmp_path / "bomb.bin", _linear(View(s, 0, (20_000, 20_000), (0, 0)), View(s, 0, (1,), (1,))),
                          {"0": floats(1)})
    over = zip_checkpoint(tmp_path / "over.bin", _linear(View(Storage("0", 4 * 10**8), 0, (20_000, 20_000), (20_000, 1)),
                                                         View(s, 0, (1,), (1,))), {"0": floats(1)})
    legacy = legacy_checkpoint(tmp_path / "legacy.bin", _linear(View(Storage("0", 10**12), 0, (2,), (1,)),
                                                                View(Storage("0", 10**12), 0, (1,), (1,))),
                               {"0": (1, floats(1))})
    script = textwrap.dedent(f"""
        import sys
        from pivotmerge_gui.core.errors import CheckpointError
        from pivotmerge_gui.core.io import load_projector
        for f in {[str(bomb), str(over), str(legacy)]!r}:
            try:
                load_projector(f)
            except CheckpointError as e:
                print("refused", e)
        # VmHWM is this process image's own peak: ru_maxrss would carry the parent's (pytest's)
        # peak over from before exec
        hwm = next(ln for ln in open("/proc/self/status") if ln.startswith("VmHWM:"))
        print("peak_mib", int(hwm.split()[1]) // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                         cwd=Path(__file__).resolve().parents[2], check=False)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert [ln.split()[0] for ln in lines] == ["refused"] * 3 + ["peak_mib"]
    assert int(lines[-1].split()[1]) < 1000  # one copy of the bomb alone would be 1526 MiB


def test_damaged_zip_records_the_fuzzer_found_are_typed_errors(tmp_path, monkeypatch):
    """Found by benchmarks/fuzz_inputs.py: a zip entry needing an unknown zip version
    (zipfile's NotImplementedError) and torch.load failing with struct.error."""
    data = bytearray(_honest_zip(tmp_path / "ok.bin").read_bytes())
    central = data.index(b"PK\x01\x02")
    data[central + 6:central + 8] = (164).to_bytes(2, "little")  # "needs zip version 16.4"
    (tmp_path / "v164.bin").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="truncated or corrupt checkpoint"):
        load_projector(tmp_path / "v164.bin")

    import struct

    def broken(*args, **kwargs):
        raise struct.error("unpack requires a buffer of 4 bytes")

    monkeypatch.setattr(torch, "load", broken)
    with pytest.raises(CheckpointError, match=r"corrupt checkpoint \(error: unpack requires a buffer of 4 bytes\)"):
        load_projector(tmp_path / "ok.bin")
