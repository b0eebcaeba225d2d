"""Public helpers over the demo world for the app, the CLI, tests and benchmarks.

>>> from pivotmerge_gui.demo import kit
>>> kit.expert_paths("shared")          # one mm_projector.bin per domain, domain order
>>> world = kit.load_world()            # encoder, LM, tokenizer, data, back end
>>> cal = kit.calibration()             # unlabelled visual features per expert domain

Everything is read from the artifacts folder (shipped in the package, rebuilt by
``python -m pivotmerge_gui.demo.build``); data are regenerated deterministically from
the seed recorded in the manifest, so they are not shipped.
"""

from __future__ import annotations

import contextlib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..core.calibration import Calibration, calibration_from_features
from ..core.errors import CheckpointError
from ..core.evaluation.backend import CaptionSet
from ..core.io.hashing import sha256_file
from ..core.projector import Projector
from .backend import DemoBackend
from .data import DomainData, Tokenizer, generate_all
from .models import TinyLM, VisionEncoder, WorldConfig

Scenario = Literal["shared", "different"]
SCENARIOS: tuple[str, ...] = ("shared", "different")


def artifacts_dir() -> Path:
    """The shipped artifacts folder inside the installed package."""
    return Path(__file__).resolve().parent / "artifacts"


def _root(root: Path | str | None) -> Path:
    return Path(root) if root is not None else artifacts_dir()


@functools.lru_cache(maxsize=8)
def _manifest_cached(path: str, mtime: float) -> dict[str, Any]:
    return json.loads(Path(path).read_text())


def manifest(root: Path | str | None = None) -> dict[str, Any]:
    """The build manifest (configs, seeds, file hashes, validation numbers)."""
    p = _root(root) / "manifest.json"
    if not p.is_file():
        raise CheckpointError(str(p), "demo manifest not found; run `python -m pivotmerge_gui.demo.build`")
    return _manifest_cached(str(p), p.stat().st_mtime)


def domains(root: Path | str | None = None) -> list[str]:
    return list(manifest(root)["domains"])


def _check_scenario(scenario: str) -> None:
    if scenario not in SCENARIOS:
        raise ValueError(f"unknown demo scenario '{scenario}'; choose one of {', '.join(SCENARIOS)}")


def experts(scenario: Scenario = "shared", root: Path | str | None = None) -> dict[str, Path]:
    """Domain name -> expert ``mm_projector.bin``, in domain order."""
    _check_scenario(scenario)
    r = _root(root)
    table = manifest(r)["experts"][scenario]
    return {d: r / table[d] for d in manifest(r)["domains"]}


def expert_paths(scenario: Scenario = "shared", root: Path | str | None = None) -> list[Path]:
    """The expert files of a scenario, in domain order (``expert_names`` gives the names)."""
    return list(experts(scenario, root).values())


def expert_names(root: Path | str | None = None) -> list[str]:
    """Names of the experts (= their domains), in the order of :func:`expert_paths`."""
    return domains(root)


def base_path(scenario: Scenario = "shared", root: Path | str | None = None) -> Path | None:
    """The shared init of a scenario's experts; ``None`` for ``different`` (each expert
    has its own init there, so there is no common base)."""
    _check_scenario(scenario)
    rel = manifest(root)["base"].get(scenario)
    return _root(root) / rel if rel else None


def joint_path(root: Path | str | None = None) -> Path:
    """The projector trained jointly on all domains (the merge's upper bound)."""
    return _root(root) / manifest(root)["joint"]


def load_projector_file(path: Path | str) -> Projector:
    """Load an ``mm_projector.bin`` through the project's real loader
    (:func:`pivotmerge_gui.core.io.load_projector`: ``weights_only`` pickles, family
    detection), exactly as a user's LLaVA checkpoint would be read."""
    from ..core.io import load_projector

    return load_projector(str(path))


def load_experts(scenario: Scenario = "shared", root: Path | str | None = None) -> dict[str, Projector]:
    return {d: load_projector_file(p) for d, p in experts(scenario, root).items()}


def verify(root: Path | str | None = None) -> list[str]:
    """Files whose sha256 differs from the manifest (or that are missing); empty = intact."""
    r = _root(root)
    bad = []
    for rel, digest in manifest(r)["files"].items():
        p = r / rel
        if not p.is_file():
            bad.append(f"{rel}: missing")
        elif sha256_file(p) != digest:
            bad.append(f"{rel}: sha256 differs from the manifest")
    return bad


@dataclass
class DemoWorld:
    """The frozen encoder and LM, the tokenizer, and the data of the demo world."""

    root: Path
    config: WorldConfig
    tokenizer: Tokenizer
    encoder: VisionEncoder
    lm: TinyLM
    manifest: dict[str, Any]
    _data: dict[tuple[str, int | None], dict[str, DomainData]] = field(default_factory=dict, repr=False)
    _features: dict[tuple[str, int | None], dict[str, torch.Tensor]] = field(default_factory=dict, repr=False)

    @property
    def domains(self) -> list[str]:
        return list(self.manifest["domains"])

    @functools.cached_property
    def backend(self) -> DemoBackend:
        return DemoBackend(self.encoder, self.lm, self.tokenizer)

    def dataset(self, split: str = "val", n: int | None = None) -> dict[str, DomainData]:
        """Split ``split`` of every domain (``n`` examples each; default: the build's size)."""
        key = (split, n)
        if key not in self._data:
            size = n if n is not None else self.manifest["split_sizes"][split]
            self._data[key] = generate_all(split, size, self.manifest["data_seed"], self.domains)
        return self._data[key]

    def features(self, split: str = "val", n: int | None = None) -> dict[str, torch.Tensor]:
        """Frozen visual features ``[N, 16, 48]`` per domain (cached)."""
        key = (split, n)
        if key not in self._features:
            self._features[key] = {d: self.backend.encode_images(x.images) for d, x in self.dataset(split, n).items()}
        return self._features[key]

    def training_pairs(self) -> tuple[dict[str, torch.Tensor], dict[str, list[str]]]:
        """The train split's encoder features and captions per domain: what a projector
        (expert or joint) is trained on."""
        train = self.dataset("train")
        return self.features("train"), {d: list(train[d].captions) for d in self.domains}

    def caption_sets(self, split: str = "val", n: int | None = None) -> dict[str, CaptionSet]:
        """Ready-to-evaluate sets (features already encoded) for ``core.evaluation.evaluate``."""
        data, feats = self.dataset(split, n), self.features(split, n)
        return {d: CaptionSet(data[d].images, list(data[d].captions), feats[d]) for d in self.domains}


def _load_module(module: torch.nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise CheckpointError(str(path), "demo model file not found; run `python -m pivotmerge_gui.demo.build`")
    module.load_state_dict(load_file(str(path)))
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


@functools.lru_cache(maxsize=4)
def _load_world_cached(root: str, mtime: float) -> DemoWorld:
    r = Path(root)
    man = manifest(r)
    tok = Tokenizer(man["vocabulary"])
    cfg = WorldConfig(**man["world_config"])
    enc, lm = VisionEncoder(cfg), TinyLM(cfg)
    _load_module(enc, r / "vision_encoder.safetensors")
    _load_module(lm, r / "language_model.safetensors")
    return DemoWorld(r, cfg, tok, enc, lm, man)


def load_world(root: Path | str | None = None) -> DemoWorld:
    """The demo world (cached per folder and manifest version)."""
    r = _root(root)
    man_path = r / "manifest.json"
    manifest(r)  # raises a clear error when absent
    return _load_world_cached(str(r), man_path.stat().st_mtime)


def calibration(scenario: Scenario = "shared", split: str = "val", n: int = 64,
                root: Path | str | None = None) -> Calibration:
    """Unlabelled visual features of each expert's domain, in expert order:
    ``n`` images per domain, all 16 patch tokens each (``[n*16, 48]`` per domain).

    The features do not depend on the scenario (the encoder is shared); the argument
    is accepted so that callers name what they merge.
    """
    _check_scenario(scenario)
    world = load_world(root)
    feats = world.features(split, n)
    return calibration_from_features(feats, world.domains)


def calibration_file(n: int = 64, split: str = "train", root: Path | str | None = None,
                     cache_dir: Path | str | None = None) -> Path:
    """The demo's calibration file (``n`` unlabelled ``split`` images per domain, every
    patch token), made once by the same code as ``pivotmerge calibrate`` (the demo's
    encoder through :func:`...core.calibration.compute.compute_calibration`) into the user
    cache, keyed by the world's file hashes; its features equal :func:`calibration`'s."""
    from .calibration import build_demo_calibration

    r = _root(root)
    man = manifest(r)
    key = _short_hash(json.dumps([man["files"].get("vision_encoder.safetensors"), man["data_seed"],
                                  split, n], sort_keys=True), 16)
    folder = Path(cache_dir) if cache_dir is not None else _cache_root().parent / "demo-calibration"
    path = folder / f"demo-{split}-{n}-{key}.safetensors"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        build_demo_calibration(path, load_world(r), n_images=n, split=split, overwrite=True)
    return path


def specialisation_matrix(root: Path | str | None = None, split: str = "val",
                          n: int | None = None) -> dict[str, Any]:
    """Token accuracy of every expert (and the joint projector) on every domain."""
    from .build import specialisation_matrix_of

    world = load_world(root)
    experts_ = {sc: experts(sc, root) for sc in SCENARIOS}  # type: ignore[arg-type]
    return specialisation_matrix_of(world.backend, world.caption_sets(split, n), experts_, joint_path(root))


def _cache_root() -> Path:
    import platformdirs

    return Path(platformdirs.user_cache_dir("pivotmerge-gui")) / "demo-experts"


@contextlib.contextmanager
def _build_threads(man: dict[str, Any]) -> Iterator[None]:
    """Torch threads set to the world's build setting (its manifest's ``threads``) inside."""
    from .train import BUILD_THREADS

    threads = torch.get_num_threads()
    torch.set_num_threads(int(man.get("threads", BUILD_THREADS)))
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def expert_set(seed: int = 0, root: Path | str | None = None, cache_dir: Path | str | None = None,
               log: Any = None) -> dict[str, Any]:
    """Paths of every projector of one independent training run (``seed``).

    The shipped artifacts are the manifest's seed; any other seed is trained on the shipped
    encoder/LM with the shipped training recipe into ``cache_dir`` (default: the user
    cache), keyed by the world's file hashes, and reused afterwards. Returns ``{"shared": {domain: Path}, "different": {...}, "base": {"shared":
    Path}, "joint": Path, "root": Path}``.
    """
    r = _root(root)
    man = manifest(r)
    if seed == man["seed"]:
        return {"shared": experts("shared", r), "different": experts("different", r),
                "base": {"shared": base_path("shared", r)}, "joint": joint_path(r), "root": r}
    key_src = json.dumps([man["files"].get("vision_encoder.safetensors"),
                          man["files"].get("language_model.safetensors"),
                          man["train_config"], man["split_sizes"], man["data_seed"]], sort_keys=True)
    key = _short_hash(key_src, 16)
    out = Path(cache_dir) if cache_dir is not None else _cache_root() / key / f"seed{seed}"
    index = out / "expert_set.json"
    if not index.is_file():
        from .train import TrainConfig, save_expert_set, train_experts

        with _build_threads(man):
            world = load_world(r)
            es = train_experts(world.config, TrainConfig(**man["train_config"]), world.lm,
                               *world.training_pairs(), world.tokenizer, seed, log)
        tables = save_expert_set(es, out)
        files = {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*.bin"))}
        index.write_text(json.dumps({**tables, "seed": seed, "files": files, "world": key}, indent=1))
    tables = json.loads(index.read_text())
    return {
        "shared": {d: out / rel for d, rel in tables["experts"]["shared"].items()},
        "different": {d: out / rel for d, rel in tables["experts"]["different"].items()},
        "base": {"shared": out / tables["base"]["shared"]},
        "joint": out / tables["joint"],
        "root": out,
    }


def split_expert_set(per_domain: int = 2, root: Path | str | None = None,
                     cache_dir: Path | str | None = None, log: Any = None) -> dict[str, Any]:
    """Paths of a many-experts set of the world at ``root``: ``per_domain`` experts per
    domain, each trained on its own shard of the domain's data
    (:func:`.train.train_split_experts`), from the world's shared base ("shared") and
    from inits of their own ("different"); trained once into the user cache. Returns
    ``{"shared": {name: Path}, "different": {...}, "domain_of": {name: domain},
    "base": {"shared": Path}, "joint": Path, "root": Path}`` (base and joint: the world's)."""
    r = _root(root)
    man = manifest(r)
    key = _short_hash(json.dumps(["split", per_domain, man["files"], man["train_config"],
                                  man["split_sizes"], man["seed"], man["data_seed"]], sort_keys=True), 16)
    out = Path(cache_dir) if cache_dir is not None else _cache_root() / key / f"split{per_domain}"
    index = out / "split_set.json"
    if not index.is_file():
        from .train import TrainConfig, load_projector_bin, save_projector_bin, train_split_experts

        with _build_threads(man):
            world = load_world(r)
            base = load_projector_bin(world.config, base_path("shared", r))
            shared, different = train_split_experts(
                world.config, TrainConfig(**man["train_config"]), world.lm, base, *world.training_pairs(),
                world.tokenizer, int(man["seed"]), per_domain, log)
        tables: dict[str, Any] = {"shared": {}, "different": {}, "domain_of": {}}
        for scenario, table in (("shared", shared), ("different", different)):
            for name, module in table.items():
                rel = f"{scenario}/{name}/mm_projector.bin"
                save_projector_bin(module, out / rel)
                tables[scenario][name] = rel
                tables["domain_of"][name] = name.rsplit("-", 1)[0]
        index.write_text(json.dumps(tables, indent=1))
    tables = json.loads(index.read_text())
    return {"shared": {n: out / rel for n, rel in tables["shared"].items()},
            "different": {n: out / rel for n, rel in tables["different"].items()},
            "domain_of": dict(tables["domain_of"]), "base": {"shared": base_path("shared", r)},
            "joint": joint_path(r), "root": out}


def world_root(seed: int, cache_dir: Path | str | None = None, log: Any = None,
               preset: str = "demo") -> Path:
    """A whole demo world of its own (encoder, LM, data and every projector trained from
    ``seed``, data drawn from ``data_seed = seed``): the shipped artifacts for the manifest's
    seed, else built once by :func:`pivotmerge_gui.demo.build.build` into the user cache
    (about 6-7 minutes on one core) and reused. Benchmarks use it to vary the whole world
    between seeds, not only the projectors' training.

    ``preset`` picks the world (:mod:`.presets`): ``"demo"`` (the shipped one), ``"large"``
    (6 domains, 256 -> 1024 -> 1024 projectors; about 3-4 minutes on 2 idle cores, far
    longer on a busy machine) or
    ``"large-unequal"`` (``large`` with experts trained on 1/8..1x of their data). Only
    the demo preset ever returns the shipped artifacts."""
    import shutil
    import tempfile

    from .build import FORMAT_VERSION, build
    from .presets import get

    pre = get(preset)
    shipped = manifest(None)
    if preset == "demo" and seed == shipped["seed"] and seed == shipped["data_seed"]:
        return artifacts_dir()
    folder = Path(cache_dir) if cache_dir is not None else _cache_root().parent / "demo-worlds"
    if preset == "demo":
        key = _short_hash(json.dumps([FORMAT_VERSION, shipped["train_config"], shipped["world_config"],
                                      shipped["split_sizes"], torch.__version__.split("+")[0]]))
        out = folder / f"world-seed{seed}-{key}"
    else:
        key = _short_hash(json.dumps([FORMAT_VERSION, preset, pre.domains, pre.train.to_dict(),
                                      pre.world.to_dict(), pre.split_sizes, torch.__version__.split("+")[0]]))
        out = folder / f"world-{preset}-seed{seed}-{key}"
    if not (out / "manifest.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".building-{preset}-seed{seed}-", dir=folder))
        try:
            build(tmp, seed=seed, data_seed=seed, log=log, preset=preset)
            if (out / "manifest.json").is_file():  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                shutil.rmtree(out, ignore_errors=True)
                tmp.rename(out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return out


def _short_hash(text: str, length: int = 12) -> str:
    """The first ``length`` hex digits of the sha256 of ``text``: the cache keys of the demo
    calibration file, of expert sets and of whole worlds."""
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()[:length]
