"""``pivotmerge calibrate`` end to end: the file it writes, one-line errors (exit 2), Ctrl-C
(exit 130, no file), --overwrite; and the demo's calibration file through the same driver."""

from __future__ import annotations

import json

import pytest
import torch

from pivotmerge_gui.cli.main import main
from pivotmerge_gui.core.calibration import store
from tests.calibration.tiny import llava_projector_input, save_llava, write_images
from tests.evaluation.llava_tiny import tiny_llava

pytest.importorskip("transformers")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_llava(tmp_path_factory.mktemp("llava") / "model")


def test_calibrate_end_to_end(llava_dir, tmp_path, capsys):
    a = write_images(tmp_path / "a", [(8, 8), (10, 12)])
    b = write_images(tmp_path / "b", [(9, 9), (12, 8), (8, 16)], seed=1)
    (tmp_path / "b" / "bad.png").write_bytes(b"no")
    out = tmp_path / "cal.safetensors"
    rc = main(["calibrate", "--encoder", str(llava_dir), "--images", f"photos={tmp_path / 'a'}",
               "--images", f"charts={tmp_path / 'b'}", "-o", str(out), "--all-tokens", "--device", "cpu",
               "--batch-size", "2", "-q"])
    text = capsys.readouterr().out
    assert rc == 0
    assert "photos: 2 images, 32 tokens x 16" in text and "charts: 3 images, 48 tokens x 16, 1 skipped" in text
    assert "skipped bad.png: not a readable image" in text
    cf = store.read(out)
    assert cf.domains == ["photos", "charts"] and f"sha256 {cf.sha256}" in text
    assert torch.allclose(cf.tensors["photos"], llava_projector_input(tiny_llava(), a), atol=1e-4)
    assert torch.allclose(cf.tensors["charts"], llava_projector_input(tiny_llava(), b), atol=1e-4)
    assert [i["path"] for i in cf.provenance["images"]["charts"]] == ["im0.png", "im1.png", "im2.png"]
    assert cf.provenance["encoder"]["spec"] == str(llava_dir)


def test_calibrate_json_tokens_per_image_and_max_images(llava_dir, tmp_path, capsys):
    write_images(tmp_path / "a", [(8, 8)] * 4)
    out = tmp_path / "cal.safetensors"
    rc = main(["calibrate", "--encoder", str(llava_dir), "--images", f"a={tmp_path / 'a'}", "-o", str(out),
               "--tokens-per-image", "3", "--max-images", "2", "--device", "cpu", "--json", "-q"])
    doc = json.loads(capsys.readouterr().out)
    assert rc == 0 and doc["domains"]["a"] == {"images": 2, "tokens": 6, "skipped": []}
    assert doc["sha256"] == store.read(out).sha256 and store.read(out).tensors["a"].shape == (6, 16)


def test_calibrate_refuses_to_overwrite_without_flag(llava_dir, tmp_path, capsys):
    write_images(tmp_path / "a", [(8, 8)])
    out = tmp_path / "cal.safetensors"
    out.write_bytes(b"old")
    args = ["calibrate", "--encoder", str(llava_dir), "--images", f"a={tmp_path / 'a'}", "-o", str(out), "-q",
            "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already exists" in err[0] and out.read_bytes() == b"old"
    assert main([*args, "--overwrite"]) == 0 and "a" in store.read(out).tensors


@pytest.mark.parametrize("change, message", [
    ({"--images": "nonsense"}, "expected NAME=FOLDER"),
    ({"--images": "a=/no/such/dir"}, "no such folder or file"),
    ({"--tokens-per-image": "0"}, "at least 1"),
    ({"--encoder": "/no/such/model"}, "not a Hub id"),
])
def test_calibrate_errors_are_one_line_exit_2(llava_dir, tmp_path, capsys, change, message):
    write_images(tmp_path / "a", [(8, 8)])
    opts = {"--encoder": str(llava_dir), "--images": f"a={tmp_path / 'a'}",
            "-o": str(tmp_path / "c.safetensors"), "--device": "cpu", **change}
    assert main(["calibrate", "-q", *[x for kv in opts.items() for x in kv]]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
    assert not (tmp_path / "c.safetensors").exists()


def test_ctrl_c_exits_130_and_writes_nothing(llava_dir, tmp_path, monkeypatch, capsys):
    from pivotmerge_gui.core.calibration.encoders import HFVisionEncoder

    write_images(tmp_path / "a", [(8, 8)] * 3)
    calls = []

    def interrupted(self, images):  # type: ignore[no-untyped-def]
        calls.append(len(images))
        raise KeyboardInterrupt

    monkeypatch.setattr(HFVisionEncoder, "encode", interrupted)
    out = tmp_path / "cal.safetensors"
    rc = main(["calibrate", "--encoder", str(llava_dir), "--images", f"a={tmp_path / 'a'}", "-o", str(out),
               "--device", "cpu", "-q"])
    assert rc == 130 and calls == [3] and not out.exists() and list(tmp_path.glob(".*")) == []
    assert "nothing was written" in capsys.readouterr().err


def test_help_default_matches_the_driver():
    from pivotmerge_gui.cli.calibrate import HELP_DEFAULT_TOKENS
    from pivotmerge_gui.core.calibration.compute import DEFAULT_TOKENS_PER_IMAGE

    assert HELP_DEFAULT_TOKENS == DEFAULT_TOKENS_PER_IMAGE


def test_demo_calibration_file_equals_the_demo_features(demo_world, tmp_path):
    from pivotmerge_gui.demo import kit
    from pivotmerge_gui.demo.calibration import build_demo_calibration

    out = tmp_path / "demo.safetensors"
    summary = build_demo_calibration(out, kit.load_world(), n_images=48, split="train")
    cf = store.read(out, expect_sha256=summary.sha256)
    cal = kit.calibration(split="train", n=48)
    assert cf.domains == kit.expert_names() == cal.domains
    for dom, feats in zip(cal.domains, cal.features):
        assert cf.tensors[dom].shape == (48 * 16, 48) and torch.allclose(cf.tensors[dom], feats, atol=1e-6)
    seed = kit.manifest()["data_seed"]
    assert cf.provenance["images"]["text"][5] == {"generator": "pivotmerge-demo", "seed": seed, "split": "train",
                                                  "domain": "text", "index": 5}
    assert cf.provenance["encoder"]["kind"] == "demo"
    assert cf.provenance["encoder"]["sha256"] == kit.manifest()["files"]["vision_encoder.safetensors"]
    assert cf.for_experts(kit.expert_names()).features[1].shape == (768, 48)


def test_cli_demo_encoder_with_image_files(demo_world, tmp_path, capsys):
    """``--encoder demo`` encodes image files (resized to the demo's 16x16)."""
    write_images(tmp_path / "a", [(16, 16), (20, 24)])
    out = tmp_path / "cal.safetensors"
    assert main(["calibrate", "--encoder", "demo", "--images", f"shapes={tmp_path / 'a'}", "-o", str(out),
                 "--all-tokens", "-q"]) == 0
    assert store.read(out).tensors["shapes"].shape == (32, 48)
