"""Data-driven per-layer alignment scores and calibration from pairs (demo world)."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.errors import PivotMergeError
from pivotmerge_gui.core.evaluation.layer_scores import (
    calibration_from_sets,
    caption_sets_from_pairs,
    layer_alignment_scores,
    match_domains,
)
from pivotmerge_gui.core.evaluation.pairs import pairs_from_caption_sets
from pivotmerge_gui.core.progress import drain

pytestmark = pytest.mark.usefixtures("one_torch_thread")


kit = pytest.importorskip("pivotmerge_gui.demo.kit")




def test_scores_definition_and_signs(demo_world):
    experts = kit.load_experts("shared")
    base = kit.load_projector_file(kit.base_path("shared"))
    sets = demo_world.caption_sets("val", 8)
    events = list(layer_alignment_scores(demo_world.backend, experts, sets, base=base))
    res = events[-1].payload
    assert events[-1].stage == "done" and [e.fraction for e in events] == sorted(e.fraction for e in events)
    assert res.experts == list(experts) and res.domains == list(experts) and res.layers == ["0", "2"]
    assert res.reference == "base" and res.n_pairs == [8] * 4
    # every expert aligns its own domain better than the shared init, and resetting a layer
    # to the init costs alignment
    assert all(g > 0.1 for g in res.gain)
    assert all(d > 0 for row in res.delta for d in row)
    # one entry recomputed directly from the definition
    e = experts["text"]
    st = dict(e.state())
    for role in ("weight", "bias"):
        st[f"2.{role}"] = base.state()[f"2.{role}"]
    s = sets["text"]
    nll, cnt = demo_world.backend.caption_nll(e.with_state(st), s.features, s.captions)
    own, cnt0 = demo_world.backend.caption_nll(e, s.features, s.captions)
    want = float(nll.sum() / cnt.sum()) - float(own.sum() / cnt0.sum())
    assert res.delta[1][1] == pytest.approx(want, rel=1e-6, abs=1e-7)
    assert len(res.table()) == 8 and res.share()[1][1] == pytest.approx(res.delta[1][1] / res.gain[1])
    d = res.to_dict()
    assert set(d["per_layer"]) == {"0", "2"}


def test_expert_equal_to_reference_scores_zero(demo_world):
    e = kit.load_projector_file(kit.expert_paths("shared")[0])
    sets = demo_world.caption_sets("val", 4)
    res = drain(layer_alignment_scores(demo_world.backend, {"shapes": e}, sets, base=e))
    assert res.delta == [[0.0, 0.0]] and res.gain == [0.0] and res.share() == [[0.0, 0.0]]


def test_domain_matching():
    assert match_domains(["a", "b"], ["b", "a", "c"]) == ["a", "b"]
    assert match_domains(["x", "y"], ["p", "q"]) == ["p", "q"]
    assert match_domains(["x"], ["p", "q"], ["q"]) == ["q"]
    with pytest.raises(PivotMergeError, match="cannot tell which calibration domain"):
        match_domains(["x", "y", "z"], ["p", "q"])
    with pytest.raises(PivotMergeError, match="no calibration pairs for domain"):
        match_domains(["x"], ["p"], ["r"])


def test_calibration_from_pairs_equals_the_kits(demo_world):
    sets = demo_world.caption_sets("val", 6)
    pairs = pairs_from_caption_sets(sets)
    again = caption_sets_from_pairs(demo_world.backend, pairs)
    assert list(again) == demo_world.domains
    order = list(reversed(demo_world.domains))
    cal = calibration_from_sets(demo_world.backend, again, order, max_tokens=None)
    want = kit.calibration("shared", "val", 6)
    assert cal.domains == order
    for d, f in zip(order, cal.features):
        assert f.shape == (6 * 16, 48)
        torch.testing.assert_close(f, want.features[demo_world.domains.index(d)])
    with pytest.raises(PivotMergeError, match="no calibration pairs for domain"):
        calibration_from_sets(demo_world.backend, again, ["nope"])
