"""Merge history (Qt-free): names, pins, the cap, delete, and the A/B comparison."""

from __future__ import annotations

import pytest

from pivotmerge_gui.core.pipeline import merge_projectors
from pivotmerge_gui.session.history import HistoryError, MergeHistory, compare, key_parameters
from tests.factories import make_mlp_projector


@pytest.fixture(scope="module")
def experts():
    base = make_mlp_projector(8, 16, 12, seed=100)
    out = []
    for k in range(2):
        p = make_mlp_projector(8, 16, 12, seed=k)
        out.append(base.with_state({n: base.state()[n] + 0.1 * t for n, t in p.state().items()}))
    return base, out


def _merge(experts, method="task_arithmetic", **params):
    base, ex = experts
    return merge_projectors(ex, method, params, base=base, names=["a", "b"])


def test_add_names_select_and_same_result_once(experts):
    h = MergeHistory(cap=5)
    seen = []
    h.changed.connect(lambda: seen.append(len(h)))
    r1, r2 = _merge(experts, scaling=0.5), _merge(experts, "ties", density=0.4)
    e1 = h.add(r1)
    e2 = h.add(r2, name="ties try")
    assert [e.name for e in h.entries] == ["#1 Task Arithmetic", "ties try"] and h.current == e2.uid
    assert h.add(r1) is e1 and len(h) == 2 and h.current == e1.uid  # kept once, selected again
    assert "scaling 0.5" in e1.summary() and e1.summary().startswith("Task Arithmetic · ")
    assert "density 0.4" in key_parameters(e2.report)
    assert h.add(_merge(experts, scaling=0.5), name="ties try").name == "ties try (2)"  # names stay unique
    assert seen == [1, 2, 2, 3]


def test_rename_refuses_empty_taken_and_unknown(experts):
    h = MergeHistory()
    a, b = h.add(_merge(experts)), h.add(_merge(experts, scaling=1.0))
    assert h.rename(a.uid, "  best   so far ").name == "best so far"
    with pytest.raises(HistoryError, match="needs a name"):
        h.rename(a.uid, "   ")
    with pytest.raises(HistoryError, match="already called 'best so far'"):
        h.rename(b.uid, "best so far")
    with pytest.raises(HistoryError, match="no result #99"):
        h.rename(99, "x")


def test_cap_drops_oldest_unpinned_and_pins_survive(experts):
    h = MergeHistory(cap=3)
    dropped = []
    h.dropped.connect(lambda es: dropped.extend(e.name for e in es))
    results = [_merge(experts, scaling=0.1 * (k + 1)) for k in range(6)]
    first = h.add(results[0], name="r0")
    h.set_pinned(first.uid)
    for k in range(1, 6):
        h.add(results[k], name=f"r{k}")
    assert [e.name for e in h.entries] == ["r0", "r4", "r5"]  # r0 pinned, r1..r3 dropped oldest first
    assert dropped == ["r1", "r2", "r3"] and h.current == h.entries[-1].uid
    # unpinning applies the cap again, keeping the newest
    h.set_pinned(first.uid, False)
    assert [e.name for e in h.entries] == ["r0", "r4", "r5"]
    h.add(_merge(experts, scaling=2.0), name="r6")
    assert [e.name for e in h.entries] == ["r4", "r5", "r6"]
    # all pinned: the cap gives way to pins rather than dropping one
    for e in h.entries:
        h.set_pinned(e.uid)
    h.add(_merge(experts, scaling=2.5), name="r7")
    assert len(h) == 4


def test_delete_and_select(experts):
    h = MergeHistory()
    a, b = h.add(_merge(experts)), h.add(_merge(experts, scaling=1.0))
    h.delete(b.uid)
    assert h.names() == [a.name] and h.current is None
    with pytest.raises(HistoryError):
        h.delete(b.uid)
    assert h.select(a.uid) is a and h.current_entry() is a


def test_compare_lines_up_values_and_diffs_the_recipes(experts):
    h = MergeHistory()
    a = h.add(_merge(experts, scaling=0.5), name="A")
    b = h.add(_merge(experts, "ties", density=0.4), name="B")
    h.set_scores(b.uid, {"shapes": 0.5, "mean": 0.45}, "token accuracy")
    c = compare(a, b)
    rows = {label: (va, vb) for label, va, vb in c.rows}
    assert rows["Method"] == ("Task Arithmetic", "TIES-Merging")
    assert rows["Parameter: scaling"] == ("0.5", "1")
    assert rows["Parameter: density"] == ("—", "0.4")
    assert rows["Bench token accuracy: mean"] == ("—", "0.450")
    assert rows["Experts"] == ("a, b", "a, b") and "Experts" not in c.differing()
    assert "Method" in c.differing()
    lines = c.recipe_diff.splitlines()
    assert lines[0] == "--- A: A" and lines[1] == "+++ B: B"
    assert "-merge_method: task_arithmetic" in lines and "+merge_method: ties" in lines
    assert "+  density: 0.4" in lines
    assert compare(a, a).recipe_diff == ""
