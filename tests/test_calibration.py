"""core.calibration: the one Calibration type, built from features and re-ordered."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.calibration import Calibration, calibration_from_features


def _cal() -> Calibration:
    return Calibration([torch.full((2, 3), float(k)) for k in range(3)], ["a", "b", "c"])


def test_select_reorders_features_and_domains():
    cal = _cal()
    out = cal.select([2, 0])
    assert out is not cal and out.domains == ["c", "a"]
    assert [float(f[0, 0]) for f in out.features] == [2.0, 0.0]
    assert cal.domains == ["a", "b", "c"] and len(cal.features) == 3  # the original is untouched


def test_select_drops_domains_that_do_not_match_the_features():
    cal = Calibration([torch.zeros(1, 2), torch.ones(1, 2)], ["only one name"])
    out = cal.select([1, 0, 1])
    assert out.domains == [] and [float(f.sum()) for f in out.features] == [2.0, 0.0, 2.0]


def test_select_rejects_an_index_past_the_end():
    with pytest.raises(IndexError):
        _cal().select([3])


def test_methods_package_uses_the_same_type():
    from pivotmerge_gui.core.methods import Calibration as FromMethods
    from pivotmerge_gui.core.methods.base import Calibration as FromBase

    assert FromMethods is Calibration and FromBase is Calibration
    assert isinstance(calibration_from_features([torch.zeros(2, 4, 3)]), Calibration)
