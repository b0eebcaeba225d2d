"""TIES / DARE-TIES with per-expert weights against mergekit's formula, written out by hand.

mergekit (``generalized_task_arithmetic.py``, ``sparsify.magnitude``), per tensor:
    delta_k  = theta_k - base, trimmed to its top int(density * n) magnitudes
    wd_k     = w_k * delta_k
    sign     = +1 where sum_k wd_k >= 0, else -1          (consensus "sum")
    m_k      = sign(wd_k) == sign                         (zeros never agree)
    mixed    = sum_k wd_k m_k / sum_k w_k m_k  (divisor 0 -> 1)   if normalize
             = sum_k wd_k m_k                                     otherwise
    theta    = base + lambda * mixed
normalize defaults to true for ``ties`` and to false for ``dare_ties``. Our ``divide_by:
weight`` is the first line, ``merge: sum`` the second; the default ``divide_by: count``
divides by the number of agreeing experts (the TIES paper).
Sizes are chosen so that density * n is an integer (mergekit floors it, we round it).
"""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.errors import ParameterError
from pivotmerge_gui.core.methods import get_method

from .helpers import family, job_for, run

WEIGHTS = [0.3, 1.0, 2.5]
DENSITY = 0.25  # every test tensor has a multiple of 4 entries


def mergekit_ties(base, thetas, weights, density, lam, normalize, divide_by_weights=True):
    deltas = []
    for t in thetas:
        d = (t - base).double()
        flat = d.flatten()
        k = int(density * flat.numel())
        mask = torch.zeros_like(flat)
        mask[torch.argsort(flat.abs(), descending=True)[:k]] = 1
        deltas.append((flat * mask).view_as(d))
    w = torch.tensor(weights, dtype=torch.float64).view(-1, *([1] * base.dim()))
    wd = torch.stack(deltas) * w
    sign = (wd.sum(0) >= 0).double() * 2 - 1
    agree = (torch.sign(wd) == sign).double()
    mixed = (wd * agree).sum(0)
    if normalize:
        divisor = (w * agree).sum(0) if divide_by_weights else agree.sum(0)
        divisor[divisor == 0] = 1
        mixed = mixed / divisor
    return (base.double() + lam * mixed).float()


def _check(out, base, experts, **formula):
    for key, b in base.state().items():
        want = mergekit_ties(b, [e.state()[key] for e in experts], **formula)
        torch.testing.assert_close(out.state[key], want, rtol=1e-5, atol=1e-7, msg=key)


def test_ties_divide_by_weight_is_mergekit_normalize():
    base, experts = family(3, seed=4)
    params = {"density": DENSITY, "scaling": 0.7, "divide_by": "weight"}
    out = run("ties", job_for("ties", experts, base, params, weights=WEIGHTS))
    _check(out, base, experts, weights=WEIGHTS, density=DENSITY, lam=0.7, normalize=True)


def test_ties_default_divides_by_the_count_of_agreeing_experts():
    base, experts = family(3, seed=4)
    params = {"density": DENSITY, "scaling": 0.7}
    out = run("ties", job_for("ties", experts, base, params, weights=WEIGHTS))
    _check(out, base, experts, weights=WEIGHTS, density=DENSITY, lam=0.7, normalize=True,
           divide_by_weights=False)
    mk = run("ties", job_for("ties", experts, base, {**params, "divide_by": "weight"}, weights=WEIGHTS))
    gap = max(float((out.state[k] - mk.state[k]).abs().max()) for k in out.state)
    assert gap > 1e-3  # unequal weights: the two conventions really differ


def test_divisors_agree_with_unit_weights():
    base, experts = family(3, seed=5)
    a = run("ties", job_for("ties", experts, base, {"divide_by": "count"}))
    b = run("ties", job_for("ties", experts, base, {"divide_by": "weight"}))
    for k in a.state:
        torch.testing.assert_close(a.state[k], b.state[k], rtol=0, atol=0)


def test_dare_ties_without_drop_follows_mergekit():
    """mergekit's dare_ties (normalize: false) is merge: sum; with normalize: true it is
    divide_by: weight. drop_rate 0 leaves DARE's random mask out of the comparison."""
    base, experts = family(3, seed=6)
    common = {"drop_rate": 0.0, "density": DENSITY, "scaling": 1.0}
    summed = run("dare_ties", job_for("dare_ties", experts, base, {**common, "merge": "sum"}, weights=WEIGHTS))
    _check(summed, base, experts, weights=WEIGHTS, density=DENSITY, lam=1.0, normalize=False)
    normed = run("dare_ties", job_for("dare_ties", experts, base, {**common, "divide_by": "weight"},
                                      weights=WEIGHTS))
    _check(normed, base, experts, weights=WEIGHTS, density=DENSITY, lam=1.0, normalize=True)


def test_zero_weight_expert_never_counts():
    base, experts = family(3, seed=7)
    w = [1.0, 0.0, 2.0]
    out = run("ties", job_for("ties", experts, base, {"density": DENSITY, "divide_by": "weight"}, weights=w))
    _check(out, base, experts, weights=w, density=DENSITY, lam=1.0, normalize=True)


def test_divide_by_is_documented_and_validated():
    for name in ("ties", "dare_ties"):
        cls = get_method(name)
        param = {p.name: p for p in cls.params}["divide_by"]
        assert param.default == "count" and param.choices == ("count", "weight")
        assert "mergekit" in param.help and "divide_by: weight" in cls.description
        assert cls.validate_params({})["divide_by"] == "count"  # old recipes keep their meaning
        with pytest.raises(ParameterError):
            cls.validate_params({"divide_by": "sum"})
