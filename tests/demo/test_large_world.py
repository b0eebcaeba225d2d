"""The larger benchmark world (presets ``large`` / ``large-unequal``) is opt-in: it builds
with 6 domains and 256 -> 1024 -> 1024 projectors, loads through every kit helper, and
leaves the shipped demo world (data, vocabulary, configs, tiny build) exactly as it was."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from pivotmerge_gui.demo import build, kit, presets
from pivotmerge_gui.demo.data import (
    ALL_DOMAINS,
    COLORS,
    DOMAINS,
    Tokenizer,
    generate,
    generate_all,
    vocabulary,
)
from pivotmerge_gui.demo.models import WorldConfig
from pivotmerge_gui.demo.train import TrainConfig, expert_budget

# sha256 of a `build --tiny` of the demo preset (seed 0) made before presets existed, with
# torch 2.13.0 on one thread: a demo build must not move by one bit.
DEMO_TINY_HASHES = {
    "different/count/mm_projector.bin": "9c442a929b7c4a95d8af8092c94de3bc38b4d4f56e245961a033d34c27d26e10",
    "different/shapes/mm_projector.bin": "831433d9a732590f5bc80174ca730e74d28af5e2c559be49bba816916f1e6507",
    "different/text/mm_projector.bin": "a0989edac84eed441e15b3d798b5d37508ca13fb329652750bea4646eb3b6e05",
    "different/texture/mm_projector.bin": "5853edf459df4719ed78f2f8b5ecbd921ff9aac0cfdaaa1d6c792eb6493a5e87",
    "joint/mm_projector.bin": "9d51ce132df20a2cf88ca5047268f1957f2b42051e49a645b72a42f6baa8eb67",
    "language_model.safetensors": "cbaff20f18c0c5ab366356de97e8aff2045750e9fd946492d0c86a18639c0dd2",
    "shared/base/mm_projector.bin": "d3beda917459153378877f4d0a510cb027cdda1b20ef4bad6e3167f7d7dbb06b",
    "shared/count/mm_projector.bin": "3f1f759aa75644790eece61308cab3693a863924b17e623915de09f061185747",
    "shared/shapes/mm_projector.bin": "d45038dca90cb32396827bfb9b4309d418138de6c842df9121dfe29118441806",
    "shared/text/mm_projector.bin": "03ef5213d892d3ef420763e53f76d06e883a45455b80e776ccdf4a0b455f8b0a",
    "shared/texture/mm_projector.bin": "5e81c0f304589006b0e5d3960ca4d189b5511e8cd029df2de7cc8a7ce60f1eda",
    "vision_encoder.safetensors": "312c8e5df72177f07a4218d5c66f56b31f37bc4779e7973cd2b0d1824c15f838",
}


def test_demo_preset_is_the_shipped_world():
    man = kit.manifest()
    assert "preset" not in man
    demo = presets.get("demo")
    assert list(demo.domains) == man["domains"] == list(DOMAINS)
    assert vocabulary(demo.domains) == vocabulary() == man["vocabulary"]
    assert TrainConfig().to_dict() == man["train_config"]  # no opt-in keys in the demo's manifest
    assert WorldConfig(vocab_size=len(man["vocabulary"])).to_dict() == man["world_config"]
    assert demo.split_sizes == man["split_sizes"] and demo.threads == man["threads"]
    assert kit.verify() == []
    with pytest.raises(ValueError, match="unknown demo preset 'huge'"):
        presets.get("huge")


def test_demo_tiny_build_is_bit_identical_to_before_presets(tmp_path):
    if torch.__version__.split("+")[0] != "2.13.0":
        pytest.skip("the recorded hashes are of torch 2.13.0 (other builds round differently)")
    man = build.build(tmp_path / "tiny", tiny=True)
    assert man["files"] == DEMO_TINY_HASHES and "preset" not in man
    # the build's in-process check equals kit's, which reloads everything from the files
    assert man["validation_token_accuracy"] == kit.specialisation_matrix(tmp_path / "tiny")


def test_large_vocabulary_extends_the_demo_ids_and_covers_the_new_captions():
    small, large = vocabulary(), vocabulary(ALL_DOMAINS)
    assert large[: len(small)] == small and set(large[len(small):]) == {"above", "below", "number"}
    tok = Tokenizer(large)
    data = generate_all("val", 30, seed=0, domains=ALL_DOMAINS)
    assert list(data) == list(ALL_DOMAINS)
    for dom in ("relation", "digits"):
        d = data[dom]
        assert d.images.shape == (30, 3, 16, 16)
        for cap, content in zip(d.captions, d.content):
            assert tok.unk_id not in tok.encode(cap), cap
            assert all(w in cap.split() for w in content)
    # shared words make the new domains compete with the old ones for the output space
    assert {w for c in data["digits"].captions for w in c.split()} & {"one", "two", "three"}
    assert {w for c in data["relation"].captions for w in c.split()} & set(COLORS)


def _centroid(img: torch.Tensor, colour: str) -> tuple[float, float]:
    rgb = torch.tensor(COLORS[colour]).view(3, 1, 1)
    mask = ((img - rgb).abs().amax(0) < 0.2).numpy()
    ys, xs = np.nonzero(mask)
    assert len(ys) >= 4, colour
    return float(ys.mean()), float(xs.mean())


def test_relation_images_match_their_captions():
    d = generate("relation", "test", 40, seed=3, noise=0.0)
    rels = set()
    for img, (c1, _s1, rel, c2, _s2) in zip(d.images, d.content):
        (y1, x1), (y2, x2) = _centroid(img, c1), _centroid(img, c2)
        rels.add(rel)
        if rel == "left":
            assert x1 < x2 - 4
        elif rel == "right":
            assert x1 > x2 + 4
        elif rel == "above":
            assert y1 < y2 - 4
        else:
            assert y1 > y2 + 4
    assert rels == {"left", "right", "above", "below"}


def test_expert_budget_gives_unequal_experts_their_fraction():
    tcfg = presets.get("large-unequal").train
    budget = expert_budget(tcfg, ALL_DOMAINS, dict.fromkeys(ALL_DOMAINS, 1024))
    assert [budget[d][0] for d in ALL_DOMAINS] == [1024, 128, 512, 256, 1024, 128]
    steps = tcfg.projector_steps
    assert [budget[d][1] for d in ALL_DOMAINS] == [steps, round(steps / 8), round(steps / 2),
                                                   round(steps / 4), steps, round(steps / 8)]
    assert tcfg.to_dict()["expert_fractions"] == list(presets.UNEQUAL_FRACTIONS)
    assert TrainConfig(**tcfg.to_dict()) == tcfg  # round-trips through the manifest
    equal = expert_budget(presets.get("large").train, ALL_DOMAINS, dict.fromkeys(ALL_DOMAINS, 1024))
    assert set(equal.values()) == {(1024, presets.get("large").train.projector_steps)}
    with pytest.raises(ValueError, match="6 entries for 4 domains"):
        expert_budget(tcfg, DOMAINS, dict.fromkeys(DOMAINS, 8))


def test_tiny_large_build_has_six_domains_wide_projectors_and_loads_through_kit(tmp_path):
    out = tmp_path / "large"
    assert build.main(["--tiny", "--quiet", "--preset", "large", "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["preset"] == "large" and man["domains"] == list(ALL_DOMAINS) and len(man["domains"]) >= 6
    assert man["threads"] == 2 and man["vocabulary"] == vocabulary(ALL_DOMAINS)
    assert set(man["validation_token_accuracy"]["shared"]) == set(ALL_DOMAINS)
    assert kit.verify(out) == []
    raw = torch.load(out / "shared/relation/mm_projector.bin", weights_only=True)
    assert raw["model.mm_projector.0.weight"].shape == (1024, 256)
    assert raw["model.mm_projector.2.weight"].shape == (1024, 1024)

    world = kit.load_world(out)
    assert world.domains == list(ALL_DOMAINS) and world.config.lm_width == 1024
    for p in [*kit.load_experts("different", out).values(), kit.load_projector_file(kit.joint_path(out))]:
        assert (p.in_features, p.out_features) == (256, 1024)
    sets = world.caption_sets("val", 2)
    assert list(sets) == list(ALL_DOMAINS) and sets["digits"].features.shape == (2, 16, 256)
    assert "number reading" in sets["digits"].captions[0]
    cal = kit.calibration("shared", n=2, root=out)
    assert cal.domains == list(ALL_DOMAINS) and all(f.shape == (2 * 16, 256) for f in cal.features)
    seed0 = kit.expert_set(0, root=out)
    assert list(seed0["shared"]) == list(ALL_DOMAINS)
    assert torch.get_num_threads() == 1  # the build's 2 threads were put back


def test_world_root_builds_a_preset_world_once_atomically(tmp_path, monkeypatch):
    """world_root's caching for a preset (the build itself is covered above): built once
    into a temp folder renamed into place, keyed by preset, reused afterwards; a failed
    build leaves nothing behind."""
    calls = []

    def fake_build(out, *, seed, data_seed, log, preset):
        calls.append((preset, seed, data_seed))
        if seed == 7:
            raise RuntimeError("interrupted")
        (out / "manifest.json").write_text(json.dumps({"preset": preset, "seed": seed, "data_seed": data_seed}))

    monkeypatch.setattr(build, "build", fake_build)
    root = kit.world_root(5, cache_dir=tmp_path, preset="large-unequal")
    assert root.parent == tmp_path and root.name.startswith("world-large-unequal-seed5-")
    assert [p.name for p in tmp_path.iterdir()] == [root.name]  # no temp folder left behind
    assert kit.manifest(root)["preset"] == "large-unequal"
    assert kit.world_root(5, cache_dir=tmp_path, preset="large-unequal") == root
    large = kit.world_root(5, cache_dir=tmp_path, preset="large")
    assert large != root and large.name.startswith("world-large-seed5-")
    assert calls == [("large-unequal", 5, 5), ("large", 5, 5)]
    with pytest.raises(RuntimeError, match="interrupted"):
        kit.world_root(7, cache_dir=tmp_path, preset="large")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([root.name, large.name])
    assert kit.world_root(0) == kit.artifacts_dir()  # the demo's seed 0 is still the shipped world
    with pytest.raises(ValueError, match="unknown demo preset"):
        kit.world_root(1, cache_dir=tmp_path, preset="huge")
