"""``pivotmerge evaluate`` end to end on the demo back end."""

from __future__ import annotations

import json

import pytest
import torch

from pivotmerge_gui.cli.main import main
from pivotmerge_gui.core.evaluation import evaluate

kit = pytest.importorskip("pivotmerge_gui.demo.kit")


pytestmark = pytest.mark.usefixtures("one_torch_thread")




def _run_json(capsys, argv):
    assert main(argv) == 0
    return json.loads(capsys.readouterr().out)


def test_demo_experts_end_to_end_match_a_direct_computation(demo_world, capsys):
    out = _run_json(capsys, ["evaluate", "--backend", "demo", "--split", "val", "--max-pairs", "6", "--json"])
    names = [p["name"] for p in out["projectors"]]
    assert names == demo_world.domains and out["backend"] == "demo"
    assert len(out["pairs"]) == 6 * len(demo_world.domains)
    sets = demo_world.caption_sets("val", 6)
    experts = kit.load_experts("shared")
    for entry in out["projectors"]:
        want = evaluate(demo_world.backend, experts[entry["name"]], sets, parts=("nll", "generate"))
        for dom, m in want.per_domain.items():
            got = entry["per_domain"][dom]
            assert got["nll"] == pytest.approx(m.nll, rel=1e-5)
            assert got["token_accuracy"] == pytest.approx(m.token_accuracy)
            assert got["exact_match"] == pytest.approx(m.exact_match)
            assert got["n"] == 6
        assert entry["mean"]["nll"] == pytest.approx(want.mean.nll, rel=1e-5)
        # per-pair rows: the references are the data's, the captions the greedy ones
        rows = entry["pairs"]
        assert [r["reference"] for r in rows] == [c for d in demo_world.domains for c in sets[d].captions]
        limit = max(len(c.split()) for c in sets["text"].captions) + 2  # the metrics' rule
        gen = demo_world.backend.generate(experts[entry["name"]], sets["text"].features, limit)
        assert [r["caption"] for r in rows if r["domain"] == "text"] == gen
    # each expert captions its own domain best (and well)
    for entry in out["projectors"]:
        own = entry["per_domain"][entry["name"]]["token_accuracy"]
        assert own >= 0.6
        others = [p["per_domain"][entry["name"]]["token_accuracy"] for p in out["projectors"] if p is not entry]
        assert own > max(others)


def test_projector_files_user_pairs_and_text_output(demo_world, tmp_path, capsys):
    from pivotmerge_gui.core.evaluation.pairs import tensor_to_pil

    data = demo_world.dataset("test", 2)
    folder = tmp_path / "pairs"
    for dom, d in data.items():
        (folder / dom).mkdir(parents=True)
        for i in range(2):
            tensor_to_pil(d.images[i]).save(folder / dom / f"{i}.png")
            (folder / dom / f"{i}.txt").write_text(d.captions[i])
    text_expert = str(kit.experts("shared")["text"])
    out = _run_json(capsys, ["evaluate", text_expert, "--pairs", str(folder), "--json"])
    assert [p["name"] for p in out["projectors"]] == ["text"]
    assert sorted(out["projectors"][0]["per_domain"]) == sorted(demo_world.domains)
    # PNG round trip is lossless up to 8-bit quantisation: the text expert still reads text
    assert out["projectors"][0]["per_domain"]["text"]["token_accuracy"] >= 0.5
    assert main(["evaluate", text_expert, "--split", "test", "--max-pairs", "2", "--retrieval"]) == 0
    txt = capsys.readouterr().out
    assert "retrieval_accuracy" in txt and "mean" in txt and "[text] reference:" in txt


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "--backend", "nope"], "unknown back end 'nope'"),
    (["evaluate", "--pairs", "/no/such/folder"], "/no/such/folder: no such file or folder"),
    (["evaluate", "--max-pairs", "0"], "--max-pairs must be at least 1"),
    (["evaluate", "--backend", "llava:no-such-org/no-such-llava", "--pairs", "x.jsonl"], "no-such-org/no-such-llava"),
])
def test_typed_errors_exit_2(demo_world, capsys, argv, message):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


def test_llava_backend_from_a_local_folder(tmp_path, capsys):
    pytest.importorskip("transformers")
    from PIL import Image

    from tests.evaluation.llava_tiny import tiny_image_processor, tiny_llava, tiny_tokenizer

    folder = tmp_path / "tiny-llava"
    tiny_llava().save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    lines = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": f"a dot {i}", "domain": f"d{i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    g = torch.Generator().manual_seed(0)
    state = {"model.mm_projector.0.weight": torch.randn(32, 16, generator=g), "model.mm_projector.0.bias": torch.zeros(32),
             "model.mm_projector.2.weight": torch.randn(32, 32, generator=g), "model.mm_projector.2.bias": torch.zeros(32)}
    (tmp_path / "exp").mkdir()
    torch.save(state, tmp_path / "exp" / "mm_projector.bin")
    out = _run_json(capsys, ["evaluate", str(tmp_path / "exp" / "mm_projector.bin"), "--backend", f"llava:{folder}",
                             "--pairs", str(tmp_path / "pairs.jsonl"), "--device", "cpu", "--json"])
    assert out["backend"] == "llava" and [p["name"] for p in out["projectors"]] == ["exp"]
    entry = out["projectors"][0]
    assert sorted(entry["per_domain"]) == ["d0", "d1"] and all(r["n_tokens"] > 0 for r in entry["pairs"])
    assert all(r["nll"] > 0 for r in entry["pairs"])
    # no projector given: the model's own (a full-model export is evaluated as it is)
    own = _run_json(capsys, ["evaluate", "--backend", f"llava:{folder}", "--pairs", str(tmp_path / "pairs.jsonl"),
                             "--device", "cpu", "--json"])
    assert [p["name"] for p in own["projectors"]] == ["tiny-llava"]
    assert all(r["nll"] > 0 for r in own["projectors"][0]["pairs"])
