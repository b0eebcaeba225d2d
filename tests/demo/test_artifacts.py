"""The shipped demo artifacts are intact, load through the real loader, and the experts are
really specialised (each captions its own domain far better than the other experts do)."""

from __future__ import annotations

import pytest
import torch

from pivotmerge_gui.core.evaluation import evaluate
from pivotmerge_gui.core.io import load_projector
from pivotmerge_gui.demo import kit

N_IMAGES = 32  # per domain, from the test split: enough for the margins below, fast


def test_shipped_artifacts_match_the_manifest():
    man = kit.manifest()
    assert man["tiny"] is False
    assert kit.verify() == []
    total = sum((kit.artifacts_dir() / rel).stat().st_size for rel in man["files"])
    assert total < 5_000_000  # "a few MB at most"


def test_shipped_projectors_load_as_llava_mlp2x_gelu():
    paths = [*kit.expert_paths("shared"), *kit.expert_paths("different"), kit.base_path("shared"),
             kit.joint_path()]
    assert kit.base_path("different") is None
    for p in paths:
        proj = load_projector(str(p))
        assert proj.family == "llava-mlp2x_gelu", p
        assert (proj.in_features, proj.out_features) == (48, 64)
        assert proj.layer("0").keys["weight"] == "model.mm_projector.0.weight"
        assert proj.sha256 == kit.manifest()["files"][p.relative_to(kit.artifacts_dir()).as_posix()]
    # shared-scenario experts start from the shipped base; different-init ones do not
    base = load_projector(str(kit.base_path("shared"))).state()["0.weight"]
    shared = [load_projector(str(p)).state()["0.weight"] for p in kit.expert_paths("shared")]
    different = [load_projector(str(p)).state()["0.weight"] for p in kit.expert_paths("different")]
    d_shared = max(float((w - base).norm() / base.norm()) for w in shared)
    d_diff = min(float((w - base).norm() / base.norm()) for w in different)
    assert d_shared < d_diff


@pytest.fixture(scope="module")
def specialisation():
    world = kit.load_world()
    sets = world.caption_sets("test", N_IMAGES)
    out = {}
    for scenario in kit.SCENARIOS:
        for dom, proj in kit.load_experts(scenario).items():
            res = evaluate(world.backend, proj, sets, parts=("generate", "nll"))
            out[scenario, dom] = res
    out["joint"] = evaluate(world.backend, kit.load_projector_file(kit.joint_path()), sets,
                            parts=("generate", "nll"))
    return out


@pytest.mark.parametrize("scenario", kit.SCENARIOS)
def test_each_expert_captions_its_own_domain_best(specialisation, scenario):
    domains = kit.domains()
    for dom in domains:
        own = specialisation[scenario, dom]
        others = [specialisation[scenario, o] for o in domains if o != dom]
        own_acc = own.per_domain[dom].token_accuracy
        best_other = max(o.per_domain[dom].token_accuracy for o in others)
        # strict margins, measured on the shipped artifacts (see the build manifest)
        assert own_acc >= OWN_MIN_TOKEN_ACC, (scenario, dom, own_acc)
        assert own_acc - best_other >= MIN_MARGIN, (scenario, dom, own_acc, best_other)
        # and in likelihood: its own domain's captions are far more probable under it
        assert own.per_domain[dom].nll < min(o.per_domain[dom].nll for o in others) - MIN_NLL_GAP


def test_joint_projector_is_good_everywhere(specialisation):
    joint = specialisation["joint"]
    for dom in kit.domains():
        own = specialisation["shared", dom].per_domain[dom].token_accuracy
        assert joint.per_domain[dom].token_accuracy >= own - JOINT_SLACK, dom


def test_demo_backend_nll_matches_a_direct_computation():
    world = kit.load_world()
    proj = kit.load_projector_file(kit.expert_paths("shared")[0])
    data = world.dataset("test", 2)["shapes"]
    feats = world.backend.encode_images(data.images)
    nll, count = world.backend.caption_nll(proj, feats, data.captions)
    tok, lm = world.tokenizer, world.lm
    for i, cap in enumerate(data.captions):
        ids = tok.encode(cap)
        prefix = proj.forward(feats[i:i + 1])
        x = torch.cat([prefix, lm.embed(torch.tensor([[tok.bos_id, *ids]]))], dim=1)
        with torch.no_grad():
            logp = lm(x)[0, 16:].log_softmax(-1)
        direct = -sum(float(logp[j, t]) for j, t in enumerate([*ids, tok.eos_id]))
        assert float(nll[i]) == pytest.approx(direct, rel=1e-5, abs=1e-5)
        assert int(count[i]) == len(ids) + 1


# Thresholds, set from the shipped artifacts' measured numbers (test split, 32 images per
# domain): own-domain token accuracy 0.69-0.96, best other expert on that domain <= 0.35.
OWN_MIN_TOKEN_ACC = 0.6
MIN_MARGIN = 0.35
MIN_NLL_GAP = 0.5  # nats per token
JOINT_SLACK = 0.1
