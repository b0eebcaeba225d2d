"""Loading user image-caption pairs: folders with .txt side files, .jsonl, typed errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pivotmerge_gui.core.evaluation.backend import CaptionSet
from pivotmerge_gui.core.evaluation.pairs import (
    PairsError,
    group_by_domain,
    images_for_backend,
    load_pairs,
    pairs_from_caption_sets,
    pil_to_tensor,
    tensor_to_pil,
)

Image = pytest.importorskip("PIL.Image")


def _img(path: Path, colour=(255, 0, 0), size=(12, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def test_folder_with_side_files_and_subfolder_domains(tmp_path):
    root = tmp_path / "mypairs"
    _img(root / "a.png")
    (root / "a.txt").write_text("a  red\nsquare \n")
    _img(root / "ocr" / "b.jpg", (0, 0, 255))
    (root / "ocr" / "b.txt").write_text("text reading b")
    pairs = load_pairs(root)
    assert [(p.name, p.domain, p.caption) for p in pairs] == [
        ("a.png", "mypairs", "a red square"), ("ocr/b.jpg", "ocr", "text reading b")]
    assert pairs[0].image.mode == "RGB" and pairs[0].image.size == (12, 10)
    assert group_by_domain(pairs) == {"mypairs": [0], "ocr": [1]}
    assert len(load_pairs(root, max_pairs=1)) == 1


def test_jsonl_relative_paths_default_domain_and_blank_lines(tmp_path):
    _img(tmp_path / "img" / "x.png")
    lines = [{"image": "img/x.png", "caption": "one", "domain": "shapes"}, {},
             {"image": str(tmp_path / "img" / "x.png"), "caption": "two"}]
    f = tmp_path / "set.jsonl"
    f.write_text("\n".join(json.dumps(o) if o else "" for o in lines) + "\n")
    pairs = load_pairs(f)
    assert [(p.caption, p.domain) for p in pairs] == [("one", "shapes"), ("two", "set")]
    assert pairs[0].path == tmp_path / "img" / "x.png"


@pytest.mark.parametrize("content, match", [
    ("{not json", r"set.jsonl:1: not valid JSON"),
    ('{"caption": "x"}', r"set.jsonl:1: missing 'image'"),
    ('{"image": "x.png", "caption": " "}', r"set.jsonl:1: missing or empty 'caption'"),
    ('{"image": "nope.png", "caption": "c"}', r"set.jsonl:1: image .*nope.png: image file not found"),
    ('[1, 2]', r"set.jsonl:1: each line must be a JSON object"),
    ("", r"set.jsonl: no image-caption pairs"),
])
def test_jsonl_errors_name_file_and_line(tmp_path, content, match):
    f = tmp_path / "set.jsonl"
    f.write_text(content)
    with pytest.raises(PairsError, match=match):
        load_pairs(f)


def test_folder_errors(tmp_path):
    with pytest.raises(PairsError, match="no such file or folder"):
        load_pairs(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PairsError, match="no images"):
        load_pairs(tmp_path / "empty")
    _img(tmp_path / "nocap" / "a.png")
    with pytest.raises(PairsError, match=r"a.png: no caption side file a.txt"):
        load_pairs(tmp_path / "nocap")
    bad = tmp_path / "broken"
    bad.mkdir()
    (bad / "a.png").write_bytes(b"not an image at all")
    (bad / "a.txt").write_text("cap")
    with pytest.raises(PairsError, match=r"a.png: not a readable image"):
        load_pairs(bad)
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(PairsError, match="expected a folder of images"):
        load_pairs(tmp_path / "x.csv")


def test_image_conversion_for_tensor_and_pil_backends():
    t = torch.rand(3, 16, 16)
    back = pil_to_tensor(tensor_to_pil(t))
    assert back.shape == (3, 16, 16) and float((back - t).abs().max()) <= 1 / 255 + 1e-6
    big = Image.new("RGB", (40, 30), (255, 255, 0))

    class TensorBackend:
        image_size = 16

    class PilBackend:
        accepts_pil = True

    stacked = images_for_backend(TensorBackend(), [t, big])
    assert stacked.shape == (2, 3, 16, 16)
    torch.testing.assert_close(stacked[1, :, 0, 0], torch.tensor([1.0, 1.0, 0.0]))
    pil = images_for_backend(PilBackend(), [t, big])
    assert pil[0].size == (16, 16) and pil[1] is big


def test_pairs_from_caption_sets():
    sets = {"a": CaptionSet(torch.zeros(3, 3, 4, 4), ["x", "y", "z"]), "b": CaptionSet(torch.ones(1, 3, 4, 4), ["w"])}
    pairs = pairs_from_caption_sets(sets, 2)
    assert [(p.domain, p.caption, p.name) for p in pairs] == [("a", "x", "a #0"), ("a", "y", "a #1"), ("b", "w", "b #0")]


def test_split_pairs_per_domain_deterministic():
    from pivotmerge_gui.core.evaluation.pairs import Pair, split_pairs

    pairs = [Pair(f"c{i}", "a" if i < 6 else "b", None, name=str(i)) for i in range(9)] + [Pair("solo", "c", None)]
    val, test = split_pairs(pairs, 0.5, seed=1)
    assert sorted(p.name for p in val + test) == sorted(p.name for p in pairs)
    assert {p.domain for p in test} == {"a", "b"} and [p.domain for p in val].count("c") == 1
    assert sum(p.domain == "a" for p in test) == 3 and sum(p.domain == "b" for p in test) in (1, 2)
    again = split_pairs(pairs, 0.5, seed=1)
    assert [p.name for p in again[0]] == [p.name for p in val]
    with pytest.raises(ValueError):
        split_pairs(pairs, 1.0)
