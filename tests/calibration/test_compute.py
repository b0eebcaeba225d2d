"""compute_calibration with tiny random transformers models: features equal the projector's
input inside the full model, the language model is never read, bad images are skipped and
counted, cancel writes nothing, provenance lists every image with its sha256."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from pivotmerge_gui.core.calibration import store
from pivotmerge_gui.core.calibration.compute import (
    CalibrationInputError,
    compute_calibration,
    parse_source,
    sample_tokens,
)
from pivotmerge_gui.core.calibration.encoders import EncoderError, load_encoder
from pivotmerge_gui.core.errors import Cancelled, OutputError
from pivotmerge_gui.core.progress import CancelToken
from tests.calibration.tiny import (
    llava_projector_input,
    qwen_merger_input,
    save_llava,
    save_qwen,
    split_shards,
    write_images,
)
from tests.evaluation.llava_tiny import tiny_llava

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")

SIZES = [(10, 12), (8, 8), (16, 9), (9, 14), (12, 12)]


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory) -> Path:
    return save_llava(tmp_path_factory.mktemp("llava") / "model")


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    folder = tmp_path_factory.mktemp("qwen") / "model"
    return save_qwen(folder), folder


def _sorted_images(folder: Path) -> list[Path]:
    return sorted((p for p in folder.rglob("*.png")), key=lambda p: p.relative_to(folder).as_posix())


@pytest.mark.parametrize("layout", ["saved", "old", "new"])
def test_llava_all_tokens_equal_the_projector_input_of_the_full_model(tmp_path, layout):
    folder = save_llava(tmp_path / "model", layout)
    write_images(tmp_path / "imgs", SIZES[:3])
    write_images(tmp_path / "imgs" / "sub", SIZES[3:], seed=1)
    out = tmp_path / "cal.safetensors"
    enc = load_encoder(str(folder), device="cpu")
    summary = compute_calibration(enc, [parse_source(f"photos={tmp_path / 'imgs'}")], out, all_tokens=True,
                                  batch_size=2)
    got = store.read(out).tensors["photos"]
    want = llava_projector_input(tiny_llava(), _sorted_images(tmp_path / "imgs"))
    assert got.shape == want.shape == (5 * 16, 16)
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert summary.domains["photos"].images == 5 and summary.domains["photos"].tokens == 80
    prov = enc.provenance()
    assert prov["features"]["layer"] == -2 and prov["features"]["select"] == "default"
    assert prov["encoder"]["kind"] == "llava" and len(prov["encoder"]["sha256"]) == 64


def test_llava_feature_overrides_follow_transformers(llava_dir, tmp_path):
    """A list of layers is concatenated, 'full' keeps the CLS token (as get_image_features)."""
    paths = write_images(tmp_path / "imgs", SIZES[:2])
    enc = load_encoder(str(llava_dir), device="cpu", feature_layer=[-2, -1], select="full")
    feats = enc.encode([__import__("PIL.Image", fromlist=["Image"]).open(p).convert("RGB") for p in paths])
    assert enc.in_features == 32 and [tuple(f.shape) for f in feats] == [(17, 32), (17, 32)]
    model = tiny_llava()
    from tests.calibration.tiny import pil
    from tests.evaluation.llava_tiny import tiny_image_processor

    px = tiny_image_processor()(images=pil(paths), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        hs = model.model.vision_tower(px, output_hidden_states=True).hidden_states
    want = torch.cat([hs[-2], hs[-1]], dim=-1)
    assert torch.allclose(torch.stack(feats), want, atol=1e-5)


def test_qwen2_vl_all_tokens_equal_the_merger_input_of_the_full_model(qwen, tmp_path):
    model, folder = qwen
    paths = write_images(tmp_path / "imgs", [(12, 8), (8, 8), (16, 12)])
    lines = [json.dumps({"image": f"imgs/{p.name}", "caption": "unused"}) for p in paths]
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    enc = load_encoder(str(folder), device="cpu")
    assert enc.token_group == 4 and enc.in_features == 16
    out = tmp_path / "cal.safetensors"
    summary = compute_calibration(enc, [parse_source(f"docs={tmp_path / 'pairs.jsonl'}")], out, all_tokens=True,
                                  batch_size=2)
    got = store.read(out).tensors["docs"]
    want = qwen_merger_input(model, paths)
    assert got.shape == want.shape == (24 + 16 + 48, 16)  # t*h*w patches per image
    assert torch.allclose(got, want, atol=1e-4, rtol=0)
    assert summary.domains["docs"].tokens == 88
    # a token subset keeps whole merge groups (4 consecutive rows = one merged token)
    out2 = tmp_path / "cal2.safetensors"
    compute_calibration(enc, [parse_source(f"docs={tmp_path / 'pairs.jsonl'}")], out2, tokens_per_image=8)
    sub = store.read(out2).tensors["docs"]
    assert sub.shape == (3 * 8, 16)
    groups = want.reshape(-1, 4, 16)
    for g in sub.reshape(-1, 4, 16):
        assert (groups - g).abs().amax(dim=(1, 2)).min() < 1e-5


def test_qwen2_5_vl_features_equal_the_merger_input(tmp_path):
    model = save_qwen(tmp_path / "model", "2.5")
    paths = write_images(tmp_path / "imgs", [(16, 16), (12, 20)])
    enc = load_encoder(str(tmp_path / "model"), device="cpu")
    assert enc.kind == "qwen2_5_vl" and enc.token_group == 4 and enc.in_features == 16
    out = tmp_path / "cal.safetensors"
    compute_calibration(enc, [parse_source(f"a={tmp_path / 'imgs'}")], out, all_tokens=True)
    want = qwen_merger_input(model, paths)
    got = store.read(out).tensors["a"]
    assert got.shape == want.shape == (64 + 60, 16) and torch.allclose(got, want, atol=1e-4, rtol=0)


def test_the_language_model_is_never_read(tmp_path, monkeypatch):
    """LM tensors sit in their own shard, replaced by junk: never opened. Every key read
    through safe_open is a vision tower key."""
    import safetensors

    folder = save_llava(tmp_path / "model")
    _, lm_shard = split_shards(folder, lambda k: k.startswith("vision_tower."))
    lm_shard.write_bytes(b"junk: this shard must never be opened" * 100)
    read: list[str] = []
    real = safetensors.safe_open

    class Recording:
        def __init__(self, path, **kw):  # type: ignore[no-untyped-def]
            self.path, self.inner = path, real(path, **kw)

        def __enter__(self):  # type: ignore[no-untyped-def]
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *a):  # type: ignore[no-untyped-def]
            return self.inner.__exit__(*a)

        def get_tensor(self, key):  # type: ignore[no-untyped-def]
            read.append(key)
            return self.f.get_tensor(key)

    monkeypatch.setattr(safetensors, "safe_open", Recording)
    write_images(tmp_path / "imgs", SIZES[:2])
    enc = load_encoder(str(folder), device="cpu")
    compute_calibration(enc, [parse_source(f"a={tmp_path / 'imgs'}")], tmp_path / "cal.safetensors")
    assert read and all(k.startswith("vision_tower.") for k in read)
    own = set(enc.tower.state_dict())
    assert {k.removeprefix("vision_tower.") for k in read} <= own and len(read) >= len(own) - 1


def test_bad_and_missing_images_are_named_skipped_and_counted(llava_dir, tmp_path, monkeypatch):
    from PIL import Image

    write_images(tmp_path / "imgs", SIZES[:3])
    (tmp_path / "imgs" / "broken.png").write_bytes(b"\x89PNG not really")
    (tmp_path / "imgs" / "empty.jpg").write_bytes(b"")
    big = write_images(tmp_path / "imgs", [(40, 40)], prefix="zbig")[0]
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # 40x40 = 1600 px is a "bomb" now
    lines = ['{"image": "imgs/im0.png"}', '{"image": "imgs/nope.png"}', "not json", '{"caption": "no image"}', ""]
    (tmp_path / "list.jsonl").write_text("\n".join(lines))
    enc = load_encoder(str(llava_dir), device="cpu")
    out = tmp_path / "cal.safetensors"
    s = compute_calibration(enc, [parse_source(f"folder={tmp_path / 'imgs'}"),
                                  parse_source(f"list={tmp_path / 'list.jsonl'}")], out, all_tokens=True)
    folder, listed = s.domains["folder"], s.domains["list"]
    assert folder.images == 3 and listed.images == 1
    reasons = dict(folder.skipped)
    assert set(reasons) == {"broken.png", "empty.jpg", big.name}
    assert "decompression-bomb" in reasons[big.name] and "not a readable image" in reasons["broken.png"]
    assert dict(listed.skipped) == {"imgs/nope.png": "file not found", "list.jsonl:3": "not valid JSON (Expecting value)",
                                    "list.jsonl:4": "no 'image' path"}
    prov = store.read(out).provenance
    assert {d["image"] for d in prov["skipped"]["folder"]} == set(reasons)


def test_a_domain_without_usable_images_is_a_clear_error(llava_dir, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"nope")
    enc = load_encoder(str(llava_dir), device="cpu")
    with pytest.raises(CalibrationInputError, match=r"no usable images for domain 'x' \(1 skipped: a.png"):
        compute_calibration(enc, [parse_source(f"x={tmp_path / 'imgs'}")], tmp_path / "cal.safetensors")
    assert not (tmp_path / "cal.safetensors").exists()
    with pytest.raises(CalibrationInputError, match="no such folder or file"):
        parse_source(f"x={tmp_path / 'missing'}")
    with pytest.raises(CalibrationInputError, match="NAME=FOLDER"):
        parse_source(str(tmp_path))


def test_provenance_lists_each_image_with_its_sha256_and_the_sampling(llava_dir, tmp_path):
    paths = write_images(tmp_path / "imgs", SIZES)
    enc = load_encoder(str(llava_dir), device="cpu")
    out = tmp_path / "cal.safetensors"
    s = compute_calibration(enc, [parse_source(f"a={tmp_path / 'imgs'}")], out, max_images=4, seed=3)
    cf = store.read(out, expect_sha256=s.sha256)
    assert cf.tensors["a"].shape == (4 * 16, 16)  # default 64 tokens/image > 16 -> all 16
    assert cf.provenance["images"]["a"] == [
        {"path": p.name, "sha256": hashlib.sha256(p.read_bytes()).hexdigest()} for p in paths[:4]]
    assert cf.provenance["sampling"] == {"tokens_per_image": 64, "all_tokens": False, "seed": 3, "max_images": 4,
                                         "token_group": 1}
    assert cf.provenance["encoder"] == enc.provenance()["encoder"]
    assert cf.provenance["features"]["layer"] == -2
    assert cf.provenance["tool"].startswith("pivotmerge-gui ")


def test_token_subsets_are_seeded_and_drawn_from_each_image(llava_dir, tmp_path):
    write_images(tmp_path / "imgs", SIZES[:3])
    enc = load_encoder(str(llava_dir), device="cpu")
    src = f"a={tmp_path / 'imgs'}"
    full = tmp_path / "full.safetensors"
    compute_calibration(enc, [parse_source(src)], full, all_tokens=True)
    a, b, c = (tmp_path / f"{n}.safetensors" for n in "abc")
    compute_calibration(enc, [parse_source(src)], a, tokens_per_image=5, seed=1)
    compute_calibration(enc, [parse_source(src)], b, tokens_per_image=5, seed=1, batch_size=1)
    compute_calibration(enc, [parse_source(src)], c, tokens_per_image=5, seed=2)
    ta, tb, tc, tf = (store.read(p).tensors["a"] for p in (a, b, c, full))
    # same rows whatever the batching (values equal up to batched-matmul rounding)
    assert ta.shape == (15, 16) and torch.allclose(ta, tb, atol=1e-5) and not torch.allclose(ta, tc, atol=1e-3)
    for i in range(3):  # image i's 5 rows are rows of image i's 16 tokens
        block = tf[16 * i:16 * (i + 1)]
        for row in ta[5 * i:5 * (i + 1)]:
            assert (block - row).abs().amax(dim=1).min() < 1e-5


def test_sample_tokens_keeps_whole_groups():
    x = torch.arange(40.0)[:, None].repeat(1, 2)
    got = sample_tokens(x, 8, 4, seed=0)
    assert got.shape == (8, 2) and all(int(g[0, 0]) % 4 == 0 and torch.equal(g[:, 0] - g[0, 0], torch.arange(4.0))
                                       for g in got.reshape(2, 4, 2))
    assert torch.equal(sample_tokens(x, None, 1, 0), x) and torch.equal(sample_tokens(x, 100, 1, 0), x)


def test_cancel_leaves_no_file(llava_dir, tmp_path):
    write_images(tmp_path / "imgs", SIZES)
    enc = load_encoder(str(llava_dir), device="cpu")
    token = CancelToken()
    events = []

    def progress(ev):  # type: ignore[no-untyped-def]
        events.append(ev)
        token.cancel()

    out = tmp_path / "cal.safetensors"
    with pytest.raises(Cancelled):
        compute_calibration(enc, [parse_source(f"a={tmp_path / 'imgs'}")], out, batch_size=1, progress=progress,
                            cancel=token)
    assert len(events) == 1 and not out.exists() and list(tmp_path.glob("*.safetensors*")) == []


def test_existing_output_refused_before_work_unless_overwrite(llava_dir, tmp_path):
    write_images(tmp_path / "imgs", SIZES[:1])
    out = tmp_path / "cal.safetensors"
    out.write_bytes(b"keep me")
    enc = load_encoder(str(llava_dir), device="cpu")
    called = []
    real = enc.encode
    enc.encode = lambda ims: called.append(1) or real(ims)  # type: ignore[method-assign]
    with pytest.raises(OutputError, match="already exists"):
        compute_calibration(enc, [parse_source(f"a={tmp_path / 'imgs'}")], out)
    assert out.read_bytes() == b"keep me" and not called
    compute_calibration(enc, [parse_source(f"a={tmp_path / 'imgs'}")], out, overwrite=True)
    assert "a" in store.read(out).tensors


def test_encoder_errors_are_typed(tmp_path, llava_dir):
    with pytest.raises(EncoderError, match="no config.json"):
        load_encoder(str(tmp_path), device="cpu")
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(EncoderError, match="model type 'bert' is not supported"):
        load_encoder(str(tmp_path / "m"), device="cpu")
    with pytest.raises(EncoderError, match="feature selection must be one of"):
        load_encoder(str(llava_dir), select="cls")
    with pytest.raises(EncoderError, match="not a Hub id"):
        load_encoder("no/such/thing/here", device="cpu")


def test_standalone_clip_vision_model(tmp_path):
    """A CLIP vision model folder: layer -2 without CLS by default (LLaVA-1.5's choice)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from tests.calibration.tiny import pil
    from tests.evaluation.llava_tiny import tiny_image_processor

    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=8, patch_size=2)).eval()
    model.save_pretrained(tmp_path / "clip")
    tiny_image_processor().save_pretrained(tmp_path / "clip")
    paths = write_images(tmp_path / "imgs", SIZES[:2])
    enc = load_encoder(str(tmp_path / "clip"), device="cpu")
    feats = enc.encode(pil(paths))
    px = tiny_image_processor()(images=pil(paths), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        want = model(px, output_hidden_states=True).hidden_states[-2][:, 1:]
    assert enc.kind == "clip_vision_model" and torch.allclose(torch.stack(feats), want, atol=1e-5)


def test_llava_next_takes_the_base_image_of_the_anyres_grid(tmp_path):
    """LlavaNext: the projector input of each image's first (base) patch, as the model's
    own get_image_features computes it; the anyres crops are left out."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaNextConfig,
        LlavaNextForConditionalGeneration,
        LlavaNextImageProcessor,
    )

    from tests.calibration.tiny import pil

    grid = [[8, 16], [16, 8], [16, 16]]
    vc = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                          image_size=8, patch_size=2)
    tc = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                     num_key_value_heads=2, vocab_size=128)
    torch.manual_seed(0)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(vision_config=vc, text_config=tc, image_token_index=127,
                                                              image_grid_pinpoints=grid)).eval()
    proc = LlavaNextImageProcessor(size={"shortest_edge": 8}, crop_size={"height": 8, "width": 8},
                                   image_grid_pinpoints=grid)
    model.save_pretrained(tmp_path / "model")
    proc.save_pretrained(tmp_path / "model")
    paths = write_images(tmp_path / "imgs", [(16, 16), (8, 16)])
    enc = load_encoder(str(tmp_path / "model"), device="cpu")
    got = enc.encode(pil(paths))
    batch = proc(images=pil(paths), return_tensors="pt")
    captured = []
    model.model.multi_modal_projector.register_forward_pre_hook(lambda _m, a: captured.append(a[0]))
    with torch.no_grad():
        model.model.get_image_features(batch["pixel_values"], batch["image_sizes"], vision_feature_layer=-2,
                                       vision_feature_select_strategy="default")
    allp = captured[0]  # [patches of all images, 16, 16]: image 0 has 1 + 4 crops, image 1 has 1 + 2
    assert allp.shape[0] == 8 and enc.kind == "llava_next"
    assert torch.allclose(got[0], allp[0], atol=1e-5) and torch.allclose(got[1], allp[5], atol=1e-5)
    assert "base image of the anyres grid" in enc.provenance()["features"]["description"]
