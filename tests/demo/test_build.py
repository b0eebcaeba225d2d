"""`build --tiny` runs in seconds in a temp dir and produces loadable, hashed files."""

from __future__ import annotations

import json

import torch

from pivotmerge_gui.core.evaluation import evaluate
from pivotmerge_gui.demo import build, kit


def test_tiny_build_produces_loadable_hashed_artifacts(tmp_path):
    out = tmp_path / "world"
    assert build.main(["--tiny", "--quiet", "--out", str(out)]) == 0
    man = json.loads((out / "manifest.json").read_text())
    assert man["tiny"] is True and man["domains"] == ["shapes", "text", "count", "texture"]
    assert kit.verify(out) == []
    # every projector file is listed and hashed
    bins = sorted(p.relative_to(out).as_posix() for p in out.rglob("mm_projector.bin"))
    assert bins == sorted(k for k in man["files"] if k.endswith("mm_projector.bin"))
    assert len(bins) == 4 + 4 + 1 + 1  # shared experts, different experts, base, joint

    # LLaVA layout on disk, through the real loader in memory
    raw = torch.load(out / "shared/text/mm_projector.bin", weights_only=True)
    assert sorted(raw) == ["model.mm_projector.0.bias", "model.mm_projector.0.weight",
                           "model.mm_projector.2.bias", "model.mm_projector.2.weight"]
    assert raw["model.mm_projector.0.weight"].shape == (64, 48)  # [out, in], vision 48 -> LM 64
    assert kit.base_path("different", out) is None
    base = kit.load_projector_file(kit.base_path("shared", out))
    experts = kit.load_experts("shared", out)
    assert list(experts) == kit.expert_names(out)
    for p in [base, *experts.values(), kit.load_projector_file(kit.joint_path(out))]:
        assert p.family == "llava-mlp2x_gelu" and (p.in_features, p.out_features) == (48, 64)
    # shared-init experts moved away from the base; different-init experts differ from it entirely
    moved = [float((e.state()["0.weight"] - base.state()["0.weight"]).abs().max()) for e in experts.values()]
    assert min(moved) > 0.0

    world = kit.load_world(out)
    cal = kit.calibration("shared", n=3, root=out)
    assert cal.domains == world.domains and all(f.shape == (3 * 16, 48) for f in cal.features)
    res = evaluate(world.backend, base, world.caption_sets("val", 4))
    assert set(res.per_domain) == set(world.domains) and res.mean.n == 16

    # tampering is detected
    (out / "joint/mm_projector.bin").write_bytes(b"x")
    assert kit.verify(out) == ["joint/mm_projector.bin: sha256 differs from the manifest"]


def test_tiny_build_is_reproducible(tmp_path):
    a = build.build(tmp_path / "a", tiny=True)
    b = build.build(tmp_path / "b", tiny=True)
    assert a["files"] == b["files"]


def test_expert_set_trains_other_seeds_once_into_the_cache(tmp_path):
    world_dir = tmp_path / "world"
    build.build(world_dir, tiny=True)
    seed0 = kit.expert_set(0, root=world_dir)
    assert seed0["shared"] == kit.experts("shared", world_dir)
    cache = tmp_path / "cache"
    seed1 = kit.expert_set(1, root=world_dir, cache_dir=cache)
    index = cache / "expert_set.json"
    stamp = index.stat().st_mtime_ns
    p0 = kit.load_projector_file(seed0["shared"]["text"]).state()["2.weight"]
    p1 = kit.load_projector_file(seed1["shared"]["text"]).state()["2.weight"]
    assert p0.shape == p1.shape and not torch.equal(p0, p1)  # an independent training run
    again = kit.expert_set(1, root=world_dir, cache_dir=cache)
    assert again["different"] == seed1["different"] and index.stat().st_mtime_ns == stamp


def test_split_expert_set_trains_several_experts_per_domain_from_the_worlds_base(tmp_path):
    world_dir = tmp_path / "world"
    build.build(world_dir, tiny=True)
    cache = tmp_path / "cache"
    split = kit.split_expert_set(2, root=world_dir, cache_dir=cache)
    doms = kit.domains(world_dir)
    names = [f"{d}-{j}" for d in doms for j in (1, 2)]
    assert list(split["shared"]) == names and list(split["different"]) == names
    assert split["domain_of"] == {n: n.rsplit("-", 1)[0] for n in names}
    assert split["base"]["shared"] == kit.base_path("shared", world_dir)
    base = kit.load_projector_file(split["base"]["shared"]).state()["0.weight"]
    a = {n: kit.load_projector_file(p).state()["0.weight"] for n, p in split["shared"].items()}
    b = {n: kit.load_projector_file(p).state()["0.weight"] for n, p in split["different"].items()}
    for n in names:  # trained (moved from their init), and the two shards of a domain differ
        assert not torch.equal(a[n], base)
        assert (a[n] - base).norm() < (b[n] - base).norm()  # shared ones stay near the base
    assert not torch.equal(a[names[0]], a[names[1]])
    index = cache / "split_set.json"
    stamp = index.stat().st_mtime_ns
    assert kit.split_expert_set(2, root=world_dir, cache_dir=cache)["shared"] == split["shared"]
    assert index.stat().st_mtime_ns == stamp  # trained once, then reused
