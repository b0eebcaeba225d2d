"""Metrics match a direct computation on hand-made cases (no demo model involved)."""

from __future__ import annotations

import math

import pytest
import torch

from pivotmerge_gui.core.calibration import calibration_from_features
from pivotmerge_gui.core.errors import Cancelled
from pivotmerge_gui.core.evaluation import (
    CaptionBackend,
    CaptionSet,
    evaluate,
    exact_match,
    retrieval_candidates,
    token_accuracy,
)
from pivotmerge_gui.core.progress import CancelToken
from tests.factories import make_mlp_projector


class TableBackend(CaptionBackend):
    """A back end whose answers come from tables: image i (feature value i) generates
    ``outputs[i]`` and gives caption c the NLL ``nll[(i, c)]`` (default 5 per word)."""

    name = "table"

    def __init__(self, outputs: list[str], nll: dict[tuple[int, str], float]) -> None:
        self.outputs = outputs
        self.nll = nll

    def encode_images(self, images):
        return torch.tensor(images, dtype=torch.float32).view(-1, 1, 1)

    def caption_nll(self, projector, features, captions, cancel=None):
        if cancel is not None:
            cancel.raise_if_cancelled()
        ids = [int(f.item()) for f in features.view(-1)]
        counts = torch.tensor([len(c.split()) + 1 for c in captions])
        sums = torch.tensor([self.nll.get((i, c), 5.0 * n) for i, c, n in zip(ids, captions, counts.tolist())])
        return sums, counts

    def generate(self, projector, features, max_new_tokens, cancel=None):
        return [" ".join(self.outputs[int(f.item())].split()[:max_new_tokens]) for f in features.view(-1)]


def test_token_accuracy_and_exact_match_by_hand():
    assert token_accuracy("a red square", "a red square") == 1.0
    # 2 of 4 positions (a, red, square, </s>) match
    assert token_accuracy("a blue square at", "a red square") == pytest.approx(2 / 4)
    assert token_accuracy("", "a red") == 0.0
    assert token_accuracy("a red", "a red") == 1.0
    assert exact_match(" a  red ", "a red")
    assert not exact_match("a red square", "a red")


def test_retrieval_candidates_are_deterministic_distinct_and_hold_the_truth():
    caps = [f"cap {i % 11}" for i in range(40)]
    c1, t1 = retrieval_candidates(caps, 8, seed=3)
    c2, t2 = retrieval_candidates(caps, 8, seed=3)
    assert (c1, t1) == (c2, t2)
    for cap, cands, t in zip(caps, c1, t1):
        assert len(cands) == 8 and len(set(cands)) == 8
        assert cands[t] == cap
    small, truth = retrieval_candidates(["x", "y", "x"], 8)
    assert all(sorted(c) == ["x", "y"] for c in small)
    assert [c[t] for c, t in zip(small, truth)] == ["x", "y", "x"]


def test_evaluate_matches_direct_computation():
    outputs = ["a red square", "a blue dot", "text reading A B C", "text reading A B Z"]
    refs_a = ["a red square", "a red dot"]
    refs_b = ["text reading A B C", "text reading A B C"]
    # image 1 prefers a wrong caption in retrieval; every other image prefers its truth
    nll = {(0, "a red square"): 1.0, (1, "a red dot"): 9.0, (2, "text reading A B C"): 0.5,
           (3, "text reading A B C"): 2.0}
    for cap in {*refs_a, "a blue dot"}:
        nll.setdefault((1, cap), 3.0 if cap != "a red dot" else 9.0)
    backend = TableBackend(outputs, nll)
    sets = {"A": CaptionSet([0, 1], refs_a), "B": CaptionSet([2, 3], refs_b)}
    res = evaluate(backend, make_mlp_projector(), sets, n_candidates=2)

    # NLL per token: (1.0 + 9.0) / (4 + 4) for A, (0.5 + 2.0) / (6 + 6) for B
    assert res.per_domain["A"].nll == pytest.approx(10.0 / 8)
    assert res.per_domain["B"].nll == pytest.approx(2.5 / 12)
    assert res.mean.nll == pytest.approx((10.0 / 8 + 2.5 / 12) / 2)
    # exact: A 1/2, B 1/2; token acc: A (1 + 3/4)/2, B (1 + 5/6)/2
    assert res.per_domain["A"].exact_match == pytest.approx(0.5)
    assert res.per_domain["B"].exact_match == pytest.approx(0.5)
    assert res.per_domain["A"].token_accuracy == pytest.approx((1 + 3 / 4) / 2)
    assert res.per_domain["B"].token_accuracy == pytest.approx((1 + 5 / 6) / 2)
    assert res.mean.token_accuracy == pytest.approx(((1 + 3 / 4) / 2 + (1 + 5 / 6) / 2) / 2)
    # retrieval among the domain's 2 distinct captions: A image 0 right, image 1 wrong
    # ("a red square" costs 3.0 < 9.0); B has one distinct caption -> trivially right
    assert res.per_domain["A"].retrieval_accuracy == pytest.approx(0.5)
    assert res.per_domain["B"].retrieval_accuracy == pytest.approx(1.0)
    d = res.to_dict()
    assert d["mean"]["n"] == 4 and set(d["per_domain"]) == {"A", "B"}
    assert res.score("token_accuracy") == pytest.approx(res.mean.token_accuracy)
    assert not math.isnan(res.score("nll"))


def test_evaluate_parts_and_cancel():
    backend = TableBackend(["x"], {})
    sets = {"A": CaptionSet([0], ["x"])}
    res = evaluate(backend, make_mlp_projector(), sets, parts=("nll",))
    assert res.mean.nll == pytest.approx(5.0 * 2 / 2)
    assert res.mean.token_accuracy is None
    with pytest.raises(KeyError):
        res.score("token_accuracy")
    with pytest.raises(ValueError):
        evaluate(backend, make_mlp_projector(), sets, parts=("bleu",))
    tok = CancelToken()
    tok.cancel()
    with pytest.raises(Cancelled):
        evaluate(backend, make_mlp_projector(), sets, cancel=tok)


def test_calibration_from_features_flattens_in_order_and_subsamples():
    feats = {"b": torch.ones(3, 4, 5), "a": torch.zeros(2, 4, 5)}
    cal = calibration_from_features(feats, ["a", "b"])
    assert cal.domains == ["a", "b"]
    assert cal.features[0].shape == (8, 5) and float(cal.features[0].abs().sum()) == 0.0
    assert cal.features[1].shape == (12, 5)
    sub = calibration_from_features(feats, ["a", "b"], max_tokens=5, seed=1)
    assert [f.shape[0] for f in sub.features] == [5, 5]
    with pytest.raises(ValueError):
        calibration_from_features([torch.ones(2, 3)], ["a", "b"])
