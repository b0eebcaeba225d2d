"""Long fuzzing run of everything PivotMerge reads from strangers (issues 6 and 15).

Every generated input must either load or raise a typed, user-facing error
(:class:`~pivotmerge_gui.core.errors.PivotMergeError` with a non-empty message); anything
else (a bare exception, a crash, a hang past ``--case-timeout``, a ``MemoryError`` under the
address-space cap, a payload that ran) is a failure, printed with its strategy and case
number so it can be replayed (``--strategy NAME --seed S --cases N``).

Strategies (each a seeded generator of one case):

- ``mutated_safetensors`` / ``mutated_pickles``: byte edits and truncations of valid
  projector files (safetensors, torch zip, legacy pickle);
- ``json_headers``: arbitrary safetensors headers (shapes and offsets of any size and type);
- ``pickle_structure``: hand-built zip and legacy pickles whose storages and views lie
  (over/under-claimed records, stride-0 and overlapping views, huge/negative/float sizes,
  65 dimensions, missing or compressed records, code-running globals that must never run);
- ``yaml_alias``: recipes with anchors and aliases (billion laughs of random depth and
  width, merge keys, undefined/recursive aliases, python tags);
- ``deep_nesting``: 10 to 100,000 levels of nesting in YAML recipes, safetensors headers,
  shard indexes, ``.jsonl`` pair lines and pickles;
- ``recipe_docs``: random recipe mappings (wrong types, huge integers, control characters).

    python benchmarks/fuzz_inputs.py [--cases 10500] [--seed 0]

prints the cases run per strategy (loaded / refused), failures, wall time and peak RSS.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import resource
import signal
import struct
import sys
import tempfile
import time
import traceback
import zipfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch
from safetensors.torch import save

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.evaluation.pairs import load_pairs
from pivotmerge_gui.core.io import load_projector
from pivotmerge_gui.core.io.discovery import read_index
from pivotmerge_gui.core.recipe import Recipe
from tests.io.cases import CASE_BY_ID
from tests.io.hostile import Storage, View, legacy_checkpoint, zip_checkpoint

W, B = "model.mm_projector.weight", "model.mm_projector.bias"
SENTINEL_NAME = "PAYLOAD_RAN"


class Payload:
    """Unpickling this would create the sentinel file: it must never happen."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


# ------------------------------------------------------------------ seeds to mutate
def _seed_files() -> dict[str, bytes]:
    st = CASE_BY_ID["hf-llava-file"].build()[1]
    mlp = CASE_BY_ID["llava-mlp2x"].build()[1]
    zbuf = io.BytesIO()
    torch.save(mlp, zbuf)  # byte-identical in every run
    # torch's legacy writer names storages by memory address (different bytes each run):
    # the same layout with fixed names, so a seed replays exactly
    state, records = {}, {}
    for i, (key, t) in enumerate(mlp.items()):
        t = t.detach().contiguous().float()
        state[key] = View(Storage(str(i), t.numel()), 0, tuple(t.shape), tuple(t.stride()))
        records[str(i)] = (t.numel(), t.numpy().tobytes())
    with tempfile.TemporaryDirectory() as d:
        legacy = legacy_checkpoint(Path(d) / "legacy.bin", state, records).read_bytes()
    return {"safetensors": save(st, metadata={"format": "pt"}), "zip": zbuf.getvalue(), "legacy": legacy}


SEEDS = _seed_files()


def _mutate(rng: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rng.randint(0, 8)):
        pos = rng.randrange(len(b))
        op = rng.random()
        if op < 0.6:
            b[pos] = rng.randrange(256)
        elif op < 0.8:
            del b[pos:pos + rng.randint(1, 16)]
        else:
            b[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    if b and rng.random() < 0.3:
        b = b[:rng.randrange(len(b))]
    return bytes(b)


# ------------------------------------------------------------------ strategies
Case = Callable[[], str]  # runs the case; returns an outcome ("loaded", "refused", ...)


def _load(path: Path) -> str:
    try:
        load_projector(path)
    except PivotMergeError as exc:
        if not str(exc).strip():
            raise AssertionError(f"empty message from {type(exc).__name__}") from exc
        return "refused"
    return "loaded"


def _recipe(text: str) -> str:
    try:
        r = Recipe.from_yaml(text)
    except PivotMergeError as exc:
        if not str(exc).strip():
            raise AssertionError("empty recipe error") from exc
        return "refused"
    if Recipe.from_yaml(r.to_yaml()) != r:
        raise AssertionError("recipe does not round-trip")
    return "loaded"


def _inert(case: Case, sentinel: Path) -> Case:
    """``case``, failing if the payload it carries ran (created ``sentinel``)."""

    def run() -> str:
        outcome = case()
        if sentinel.exists():
            raise AssertionError("a payload in the input ran code")
        return outcome

    return run


def mutated_safetensors(rng: random.Random, tmp: Path) -> Case:
    path = tmp / "model.safetensors"
    path.write_bytes(_mutate(rng, SEEDS["safetensors"]))
    return lambda: _load(path)


def mutated_pickles(rng: random.Random, tmp: Path) -> Case:
    path = tmp / "mm_projector.bin"
    path.write_bytes(_mutate(rng, SEEDS[rng.choice(["zip", "legacy"])]))
    return lambda: _load(path)


def _any_number(rng: random.Random) -> object:
    return rng.choice([0, 1, 2, 3, 8, 16, 24, 64, -1, 2**31, 2**63, 2**64, 10**400, 1.5, "8", None, True, [2]])


def json_headers(rng: random.Random, tmp: Path) -> Case:
    keys = ["multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
            "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias", "x", ""]
    shapes = {keys[0]: [24, 16], keys[1]: [24], keys[2]: [24, 24], keys[3]: [24]}  # transformers' Llava projector
    valid = rng.random() < 0.3
    header: dict[str, object] = {}
    offset = 0
    for key in keys[:4] if valid else rng.sample(keys, rng.randint(0, len(keys))):
        shape = list(shapes[key]) if valid else [_any_number(rng) if rng.random() < 0.2 else rng.choice([0, 1, 16, 24])
                                                 for _ in range(rng.randint(0, 3))]
        if valid and rng.random() < 0.3:
            shape[rng.randrange(len(shape))] = _any_number(rng)
        dtype = "F32" if valid else rng.choice(["F32", "F16", "BF16", "I8", "F4", "C64", "BOOL", "X", 3])
        n = 1
        for d in shape:
            n = n * d if isinstance(d, int) and not isinstance(d, bool) and 0 <= d < 2**20 else n
        size = n * 4
        offs = [offset, offset + size] if valid or rng.random() < 0.8 else [_any_number(rng), _any_number(rng)]
        offset += size
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": offs}
    if rng.random() < 0.3:
        header["__metadata__"] = rng.choice([{"format": "pt"}, {"a": 1}, [], "x", None])
    raw = json.dumps(header).encode()
    path = tmp / "model.safetensors"
    data = offset if valid else rng.randint(0, 2 * offset + 8) % 4096
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(min(data, 2**16)))
    return lambda: _load(path)


_STORAGE_TYPES = [(torch.FloatStorage, 4), (torch.HalfStorage, 2), (torch.DoubleStorage, 8),
                  (torch.BFloat16Storage, 2), (torch.ByteStorage, 1), (torch.LongStorage, 8)]


def _dim(rng: random.Random) -> object:
    return rng.choice([0, 1, 2, 3, 4, 6, 8, 16, 10**6, 10**400, -1, 2**63, 2.5, "3", None])


def pickle_structure(rng: random.Random, tmp: Path) -> Case:
    sentinel = tmp / SENTINEL_NAME
    honest = rng.random() < 0.35  # storages and views that fit their records: many load
    storages: list[tuple[Storage, int]] = []
    records: dict[str, bytes] = {}
    rows, cols = rng.randint(1, 8), rng.randint(1, 8)
    for i in range(2 if honest else rng.randint(1, 3)):
        cls, itemsize = rng.choice(_STORAGE_TYPES[:4] if honest else _STORAGE_TYPES)
        real = (rows * cols if i == 0 else rows) if honest else rng.choice([0, 1, 2, 4, 6, 12, 64])
        claim = real if honest else rng.choice([real, real, real + 1, 2 * real + 3, max(0, real - 1), 10**12, -1, 2**63])
        storages.append((Storage(str(i), claim, cls), real))
        if honest or rng.random() > 0.05:
            records[str(i)] = bytes(rng.randrange(256) for _ in range(real * itemsize))
    state: dict[str, object] = {}
    for key, ndim in ((W, 2), (B, 1)):
        storage, real = storages[ndim % 2] if honest else rng.choice(storages)
        if honest:  # weight [rows, cols] on storage 0, bias [rows] on storage 1: a linear projector
            size, stride = ((rows, cols), (cols, 1)) if ndim == 2 else ((rows,), (1,))
            offset = 0
        else:
            nd = rng.choice([0, 1, 2, 2, 3, 65])
            size = tuple(_dim(rng) for _ in range(nd))
            stride = tuple(rng.choice([0, 1, 2, 3, -1, 2**62, 10**30]) for _ in range(nd + rng.choice([0, 0, 0, 1])))
            offset = rng.choice([0, 0, 1, 5, -1, 2**63, 10**30, 1.5])
        state[key] = View(storage, offset, size, stride)
    if rng.random() < 0.15:
        state["junk"] = Payload(str(sentinel))
    if rng.random() < 0.2:
        state = {rng.choice(["model", "state_dict", "module", "other"]): state}
    path = tmp / "mm_projector.bin"
    if rng.random() < 0.7:
        zip_checkpoint(path, state, records, compress=not honest and rng.random() < 0.1)
    else:  # legacy: each storage's bytes follow the element count written before them
        counts = {s.key: real if honest or rng.random() < 0.8 else rng.choice([0, 1, 10**9]) for s, real in storages}
        legacy_checkpoint(path, state, {k: (counts[k], v) for k, v in records.items()})

    return _inert(lambda: _load(path), sentinel)


def yaml_alias(rng: random.Random, tmp: Path) -> Case:
    sentinel = tmp / SENTINEL_NAME
    depth, width = rng.randint(1, 12), rng.randint(1, 12)
    kind = rng.choice(["laughs", "scalar", "merge_key", "undefined", "recursive", "key", "tag"])
    if kind == "laughs":
        lines = ['a0: &a0 ["lol"]'] + [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * width)}]" for i in range(1, depth)]
        target = rng.choice(["merge_method: *a{d}", "parameters: {{k: *a{d}}}", "models: [{{model: *a{d}}}]"])
        text = "\n".join(lines) + "\n" + target.format(d=depth - 1) + "\n"
    elif kind == "scalar":
        text = "merge_method: &m linear\nmodels:\n - model: a\n   name: *m\n"
    elif kind == "merge_key":
        text = "base: &b {weight: 1}\nmerge_method: linear\nmodels:\n - model: a\n   parameters: {<<: *b}\n"
    elif kind == "undefined":
        text = "merge_method: *nope\n"
    elif kind == "recursive":
        text = "a: &a [*a]\nmerge_method: linear\n"
    elif kind == "key":
        text = "? &k merge_method\n: linear\n*k : ties\n"
    else:
        text = f'merge_method: !!python/object/apply:os.system ["touch {sentinel}"]\n'

    return _inert(lambda: _recipe(text), sentinel)


def _nested_pickle(depth: int) -> bytes:
    """data.pkl of {"model.mm_projector.weight": [[[...]]]} nested ``depth`` lists deep,
    written opcode by opcode (pickle.dumps would recurse)."""
    key = W.encode()
    return (b"\x80\x02}" + b"X" + struct.pack("<I", len(key)) + key + b"]" * depth + b"a" * (depth - 1)
            + b"s.")


def deep_nesting(rng: random.Random, tmp: Path) -> Case:
    depth = rng.choice([10, 63, 64, 65, 100, 1000, 5000, 20000, 100000])
    target = rng.choice(["yaml_flow", "yaml_block", "header", "index", "jsonl", "pickle"])
    nest = "[" * depth + "]" * depth
    if target == "yaml_flow":
        return lambda: _recipe(f"merge_method: linear\nparameters: {{k: {nest}}}\n")
    if target == "yaml_block":
        d = min(depth, 3000)
        return lambda: _recipe("merge_method: linear\nparameters:\n" + "".join(" " * (i + 1) + "k:\n" for i in range(d))
                               + " " * (d + 1) + "1\n")
    if target == "header":
        raw = ('{"__metadata__": {"format": "pt"}, "x": ' + nest + "}").encode()
        path = tmp / "model.safetensors"
        path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 8)
        return lambda: _load(path)
    if target == "index":
        (tmp / "model.safetensors.index.json").write_text('{"metadata": ' + nest + ', "weight_map": {}}')

        def run_index() -> str:
            try:
                read_index(tmp / "model.safetensors.index.json")
            except PivotMergeError:
                return "refused"
            return "loaded"

        return run_index
    if target == "jsonl":
        (tmp / "p.jsonl").write_text(nest + "\n")

        def run_pairs() -> str:
            try:
                load_pairs(tmp / "p.jsonl")
            except PivotMergeError:
                return "refused"
            return "loaded"

        return run_pairs
    path = tmp / "mm_projector.bin"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        z.writestr("archive/data.pkl", _nested_pickle(depth))
        z.writestr("archive/byteorder", "little")
        z.writestr("archive/version", "3\n")
    return lambda: _load(path)


_TEXT = ["", "linear", "ties", "a\nb", "\x1b[31m", "é", "x" * 300, "../../etc/passwd", "nan"]


def _value(rng: random.Random, depth: int = 0) -> object:
    r = rng.random()
    if depth < 3 and r < 0.15:
        return [_value(rng, depth + 1) for _ in range(rng.randint(0, 3))]
    if depth < 3 and r < 0.3:
        return {rng.choice(_TEXT + ["weight", "k"]): _value(rng, depth + 1) for _ in range(rng.randint(0, 3))}
    return rng.choice([None, True, 0, -1, 2**70, 10**30, 1.5, float("nan"), float("inf"), *_TEXT])


def recipe_docs(rng: random.Random, tmp: Path) -> Case:
    keys = ["merge_method", "models", "base_model", "parameters", "dtype", "out_dtype", "output_format", "device",
            "random_seed", "layer_coefficients", "schema_version", "calibration", "x"]
    doc = {k: _value(rng) for k in rng.sample(keys, rng.randint(0, len(keys)))}
    if rng.random() < 0.3:  # a valid recipe with one field replaced by anything
        doc = {"merge_method": rng.choice(["linear", "ties", "pivotmerge"]), "models": [{"model": "a"}, {"model": "b"}]}
        if rng.random() < 0.7:
            doc[rng.choice(keys)] = _value(rng)
    elif rng.random() < 0.5:
        doc["merge_method"] = rng.choice(["linear", "ties", "pivotmerge", "nope"])
        doc["models"] = [{"model": rng.choice(_TEXT[1:]), "parameters": {"weight": _value(rng)}}
                         for _ in range(rng.randint(0, 3))]
    text = json.dumps(doc)  # JSON is YAML
    return lambda: _recipe(text)


STRATEGIES: dict[str, Callable[[random.Random, Path], Case]] = {
    "mutated_safetensors": mutated_safetensors,
    "json_headers": json_headers,
    "mutated_pickles": mutated_pickles,
    "pickle_structure": pickle_structure,
    "yaml_alias": yaml_alias,
    "deep_nesting": deep_nesting,
    "recipe_docs": recipe_docs,
}


# ------------------------------------------------------------------ runner
class _Hang(Exception):
    pass


def _alarm(_signum, _frame):  # type: ignore[no-untyped-def]
    raise _Hang()


def run(cases: int, seed: int = 0, strategies: list[str] | None = None, case_timeout: float = 20.0,
        log: Callable[[str], None] = print) -> dict:
    """Run ``cases`` cases spread evenly over ``strategies``; returns the figures."""
    names = strategies or list(STRATEGIES)
    per = {n: cases // len(names) + (1 if i < cases % len(names) else 0) for i, n in enumerate(names)}
    outcomes: dict[str, Counter] = {n: Counter() for n in names}
    failures: list[dict] = []
    t0 = time.perf_counter()
    use_alarm = hasattr(signal, "SIGALRM") and case_timeout > 0
    if use_alarm:
        previous = signal.signal(signal.SIGALRM, _alarm)
    try:
        for name in names:
            for i in range(per[name]):
                rng = random.Random(f"{seed}:{name}:{i}")
                with tempfile.TemporaryDirectory(prefix="pm-fuzz-") as d:
                    try:
                        if use_alarm:
                            signal.setitimer(signal.ITIMER_REAL, case_timeout)
                        outcome = STRATEGIES[name](rng, Path(d))()
                    except _Hang:
                        outcome = "FAILED"
                        failures.append({"strategy": name, "case": i, "error": f"hang (> {case_timeout} s)"})
                    except Exception as exc:  # noqa: BLE001 - any non-typed exception is what we hunt
                        outcome = "FAILED"
                        failures.append({"strategy": name, "case": i, "error": f"{type(exc).__name__}: {exc}"[:500],
                                         "traceback": traceback.format_exc(limit=6)})
                    finally:
                        if use_alarm:
                            signal.setitimer(signal.ITIMER_REAL, 0)
                outcomes[name][outcome] += 1
            log(f"  {name:<20} {per[name]:>6} cases: " + ", ".join(f"{k} {v}" for k, v in sorted(outcomes[name].items())))
    finally:
        if use_alarm:
            signal.signal(signal.SIGALRM, previous)
    return {
        "cases": sum(per.values()),
        "per_strategy": {n: dict(outcomes[n]) for n in names},
        "failures": failures,
        "wall_s": time.perf_counter() - t0,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=10_500, help="total cases, spread evenly over the strategies")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strategy", action="append", choices=list(STRATEGIES), help="only these (repeatable)")
    ap.add_argument("--case-timeout", type=float, default=20.0, help="seconds before a case counts as a hang")
    ap.add_argument("--memory-cap-gib", type=float, default=4.0,
                    help="address space allowed above the start (RLIMIT_AS): a bomb becomes a MemoryError failure")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    if args.memory_cap_gib > 0:
        import psutil

        cap = psutil.Process().memory_info().vms + int(args.memory_cap_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    print(f"fuzzing {args.cases} cases, seed {args.seed}")
    res = run(args.cases, args.seed, args.strategy, args.case_timeout)
    print(f"cases: {res['cases']}; failures: {len(res['failures'])}; wall time {res['wall_s']:.0f} s; "
          f"peak RSS {res['peak_rss_mib']:.0f} MiB")
    for f in res["failures"][:10]:
        print(f"FAILED {f['strategy']} case {f['case']}: {f['error']}\n{f.get('traceback', '')}")
    return 1 if res["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
