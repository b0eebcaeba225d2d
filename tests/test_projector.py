import pytest
import torch

from pivotmerge_gui.core.errors import IncompatibleExperts
from pivotmerge_gui.core.projector import Layer, Projector, check_compatible, mean_projector
from tests.factories import make_mlp_projector


def test_forward_matches_torch_mlp():
    p = make_mlp_projector()
    x = torch.randn(5, 16)
    l0, l2 = p.layer("0"), p.layer("2")
    ref = torch.nn.functional.gelu(x @ l0.weight.T + l0.bias) @ l2.weight.T + l2.bias
    torch.testing.assert_close(p.forward(x), ref)
    assert p.in_features == 16 and p.out_features == 24
    assert p.hidden_pairs() == [("0", "2")]


def test_forward_capture_and_state_roundtrip():
    p = make_mlp_projector()
    x = torch.randn(3, 16)
    _, inputs = p.forward_with_inputs(x, capture=True)
    assert set(inputs) == {"0", "2"}
    torch.testing.assert_close(inputs["0"], x)
    q = p.with_state({k: v * 2 for k, v in p.state().items()})
    torch.testing.assert_close(q.layer("0").weight, p.layer("0").weight * 2)
    assert q.layer("0").keys == p.layer("0").keys
    assert list(p.original_state_dict())[0] == "model.mm_projector.0.weight"


def test_qwen_style_merge_tokens_and_rmsnorm():
    g = torch.Generator().manual_seed(1)
    p = Projector(
        family="qwen2_5_vl-merger",
        layers=[
            Layer("ln_q", "rmsnorm", {"weight": torch.rand(8, generator=g) + 0.5}),
            Layer("mlp.0", "linear", {"weight": torch.randn(32, 32, generator=g), "bias": torch.zeros(32)}),
            Layer("mlp.2", "linear", {"weight": torch.randn(6, 32, generator=g), "bias": torch.zeros(6)}),
        ],
        ops=("rmsnorm:ln_q:1e-6", "merge_tokens:4", "linear:mlp.0", "gelu", "linear:mlp.2"),
    )
    x = torch.randn(8, 8)
    assert p.in_features == 8
    assert p.forward(x).shape == (2, 6)


def test_check_compatible_names_expert_tensor_and_shapes():
    a = make_mlp_projector()
    b = make_mlp_projector(d_hidden=40)
    with pytest.raises(IncompatibleExperts) as e:
        check_compatible([a, b], ["a.bin", "b.bin"])
    msg = str(e.value)
    assert "b.bin" in msg and "0.weight" in msg and "[40, 16]" in msg and "[32, 16]" in msg


def test_mean_projector():
    ps = [make_mlp_projector(seed=s) for s in range(3)]
    m = mean_projector(ps)
    torch.testing.assert_close(m.layer("2").bias, torch.stack([p.layer("2").bias for p in ps]).mean(0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_all_finite_finds_nan_and_inf_anywhere(dtype):
    from pivotmerge_gui.core.projector import all_finite

    assert all_finite(torch.randn(1000).to(dtype)) and all_finite(torch.zeros(0, dtype=dtype))
    assert all_finite(torch.tensor([65000.0, 65000.0] * 100).to(dtype))  # a sum would overflow fp16
    for n in (1, 7, 33, 4097):
        for bad in (float("nan"), float("inf"), -float("inf")):
            for pos in {0, n // 2, n - 1}:
                t = torch.randn(n).to(dtype)
                t[pos] = bad
                assert not all_finite(t) and not all_finite(t.reshape(1, n).t()), (n, bad, pos)
