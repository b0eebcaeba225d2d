import torch

from pivotmerge_gui.core.linalg import low_rank
from pivotmerge_gui.core.methods.consensus import disjoint_merge, elect_sign, trim_top_k


def test_trim_keeps_largest_per_expert():
    s = torch.tensor([[1.0, -5.0, 2.0, 0.5], [3.0, 0.1, -0.2, -4.0]])
    t = trim_top_k(s, 0.5)
    assert torch.equal(t, torch.tensor([[0.0, -5.0, 2.0, 0.0], [3.0, 0.0, 0.0, -4.0]]))


def test_sign_election_and_disjoint_mean():
    s = torch.tensor([[1.0, -2.0, 0.0], [3.0, 1.0, 0.0], [-1.0, -2.0, 0.0]])
    sign = elect_sign(s)
    assert torch.equal(sign, torch.tensor([1.0, -1.0, 1.0]))
    m, agree = disjoint_merge(s, sign)
    assert torch.allclose(m, torch.tensor([2.0, -2.0, 0.0]))
    assert agree.sum().item() == 4


def test_low_rank_exact_for_rank_one():
    a = torch.outer(torch.arange(1.0, 4.0), torch.arange(1.0, 5.0))
    torch.testing.assert_close(low_rank(a + 0, 1), a)
