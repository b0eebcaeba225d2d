"""Full-model export (``pivotmerge merge RECIPE OUT --into MODEL``): tiny random HF models
built from configs and synthetic sharded folders; MODEL is never changed, OUT loads
strictly and holds exactly the merge."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from pivotmerge_gui.cli.main import main as cli_main
from pivotmerge_gui.core import pipeline
from pivotmerge_gui.core.errors import CastOverflow, ExportMismatch, OutputError
from pivotmerge_gui.core.io import load_projector
from pivotmerge_gui.core.io.export import check_fit, check_out_dir, export_model, open_model
from pivotmerge_gui.core.io.safetensors_header import read_header
from pivotmerge_gui.core.progress import CancelToken
from pivotmerge_gui.core.recipe import Recipe

from .cases import CASE_BY_ID, CASES

pytestmark = pytest.mark.usefixtures("one_torch_thread")

HF_KEYS = ("multi_modal_projector.linear_1.weight", "multi_modal_projector.linear_1.bias",
           "multi_modal_projector.linear_2.weight", "multi_modal_projector.linear_2.bias")


# --------------------------------------------------------------------------- helpers
def snapshot(folder: Path) -> dict[str, tuple[str, int, int]]:
    """relative path -> (sha256, inode, size) of every file: MODEL must not change."""
    out = {}
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            st = p.stat()
            out[str(p.relative_to(folder))] = (hashlib.sha256(p.read_bytes()).hexdigest(), st.st_ino, st.st_size)
    return out


def projector_state(folder: Path, prefix: str | tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The tensors of a sharded folder whose keys contain ``prefix`` (or one of them)."""
    idx = json.loads((folder / "model.safetensors.index.json").read_text())
    out = {}
    for key, shard in idx["weight_map"].items():
        if any(p in key for p in ((prefix,) if isinstance(prefix, str) else prefix)):
            out[key] = load_file(str(folder / shard))[key]
    return out


def make_experts(root: Path, state: dict[str, torch.Tensor], n: int = 2, scale: float = 0.05) -> list[str]:
    """Projector-only expert files: ``state`` plus seeded noise, under the same keys."""
    paths = []
    for i in range(n):
        g = torch.Generator().manual_seed(100 + i)
        sd = {k: (v.float() + scale * torch.randn(v.shape, generator=g)).to(v.dtype).contiguous() for k, v in state.items()}
        p = root / f"expert{i}" / "model.safetensors"
        p.parent.mkdir(parents=True)
        save_file(sd, str(p))
        paths.append(str(p))
    return paths


def write_recipe(path: Path, experts: list[str], **extra) -> Path:
    doc = {"merge_method": "linear", "models": [{"model": e, "parameters": {"weight": 1.0 + i}}
                                                 for i, e in enumerate(experts)], **extra}
    path.write_text(yaml.safe_dump(doc))
    return path


def merge(experts: list[str]) -> pipeline.MergeResult:
    return pipeline.run(pipeline.plan(Recipe(merge_method="linear", models=[
        {"model": e, "parameters": {"weight": 1.0 + i}} for i, e in enumerate(experts)])))


def synthetic_model(root: Path, dtype=torch.float32, d_in: int = 8, d_hidden: int = 12, d_out: int = 12,
                    shards: int = 3, arch: str = "LlavaForConditionalGeneration") -> Path:
    """An HF-Llava-like sharded folder: LM tensors in the first shards, the projector in the
    last, an index with ``total_size``, config, tokenizer files and a sub-folder."""
    g = torch.Generator().manual_seed(0)
    root.mkdir(parents=True)
    wm, total = {}, 0
    for s in range(shards):
        name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        sd = {f"model.language_model.layers.{s}.mlp.weight": torch.randn(16, 16, generator=g).to(dtype)}
        if s == shards - 1:
            sd.update({HF_KEYS[0]: torch.randn(d_hidden, d_in, generator=g), HF_KEYS[1]: torch.randn(d_hidden, generator=g),
                       HF_KEYS[2]: torch.randn(d_out, d_hidden, generator=g), HF_KEYS[3]: torch.randn(d_out, generator=g)})
        sd = {k: v.to(dtype) for k, v in sd.items()}
        save_file(sd, str(root / name), metadata={"format": "pt"})
        wm.update(dict.fromkeys(sd, name))
        total += sum(v.numel() * v.element_size() for v in sd.values())
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wm}))
    (root / "config.json").write_text(json.dumps({"architectures": [arch], "model_type": "llava"}))
    (root / "tokenizer.json").write_text('{"version": "1.0"}')
    (root / "README.md").write_text("# the model's own card\n")
    (root / "extra").mkdir()
    (root / "extra" / "notes.txt").write_text("kept")
    return root


@pytest.fixture(scope="module")
def tiny_llava_dir(tmp_path_factory) -> Path:
    pytest.importorskip("transformers")
    from tests.evaluation.llava_tiny import tiny_image_processor, tiny_llava, tiny_tokenizer

    folder = tmp_path_factory.mktemp("models") / "tiny-llava"
    tiny_llava().save_pretrained(folder, max_shard_size="30KB")
    tiny_tokenizer(image_special=True).save_pretrained(folder)
    tiny_image_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_qwen_dir(tmp_path_factory) -> Path:
    tf = pytest.importorskip("transformers")
    cfg = tf.Qwen2VLConfig(
        text_config={"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
                         "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]},
                         "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 3},
        vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 32, "num_heads": 2, "mlp_ratio": 2, "patch_size": 2,
                           "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
        image_token_id=120, video_token_id=121, vision_start_token_id=122, vision_end_token_id=123)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("models") / "tiny-qwen2-vl"
    tf.Qwen2VLForConditionalGeneration(cfg).eval().save_pretrained(folder, max_shard_size="30KB")
    return folder


def _assert_untouched_and_linked(model: Path, out: Path, before: dict, rewritten: list[str]) -> None:
    assert snapshot(model) == before  # MODEL: same bytes, same inodes
    for rel, (sha, ino, _size) in before.items():
        if rel in ("README.md",) or rel in rewritten:
            continue
        got = out / rel
        assert hashlib.sha256(got.read_bytes()).hexdigest() == sha, rel
        if rel.endswith(".safetensors"):
            assert got.stat().st_ino == ino, f"{rel} should be a hard link"  # same file system here
        else:
            assert got.stat().st_ino != ino, f"{rel} is small: copied so editing OUT never edits MODEL"
    for rel in rewritten:
        assert (out / rel).stat().st_ino != before[rel][1] and (out / rel).stat().st_nlink == 1


def _assert_index_right(out: Path) -> None:
    idx = json.loads((out / "model.safetensors.index.json").read_text())
    total, seen = 0, {}
    for shard in sorted(set(idx["weight_map"].values())):
        for key, entry in read_header(out / shard).tensors.items():
            seen[key] = shard
            total += entry.nbytes
    assert seen == idx["weight_map"] and idx["metadata"]["total_size"] == total


# --------------------------------------------------------------------------- HF models
def test_llava_export_loads_strictly_generates_and_holds_the_plain_merge(tiny_llava_dir, tmp_path, capsys):
    from transformers import LlavaForConditionalGeneration

    from tests.evaluation.llava_tiny import IMAGE_TOKEN

    model = tiny_llava_dir
    before = snapshot(model)
    experts = make_experts(tmp_path, projector_state(model, "multi_modal_projector"))
    recipe = write_recipe(tmp_path / "r.yml", experts)
    out, plain = tmp_path / "out", tmp_path / "plain"
    assert cli_main(["merge", str(recipe), str(out), "--into", str(model), "-q"]) == 0
    text = capsys.readouterr().out
    assert "hard-linked" in text and "rewrote model-" in text
    assert cli_main(["merge", str(recipe), str(plain), "-q"]) == 0

    loaded, info = LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    want = load_file(str(plain / "model.safetensors"))
    got = loaded.model.multi_modal_projector.state_dict()
    assert {f"multi_modal_projector.{k}" for k in got} == set(want)
    assert all(torch.equal(got[k.removeprefix("multi_modal_projector.")], v) for k, v in want.items())
    ids = torch.tensor([[1, 4] + [IMAGE_TOKEN] * 16 + [5]])
    gen = loaded.generate(input_ids=ids, pixel_values=torch.rand(1, 3, 8, 8), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, ids.shape[1] + 3)

    rewritten = sorted({json.loads((model / "model.safetensors.index.json").read_text())["weight_map"][k]
                        for k in want})
    _assert_untouched_and_linked(model, out, before, rewritten)
    _assert_index_right(out)
    assert (out / "tokenizer.json").read_bytes() == (model / "tokenizer.json").read_bytes()
    card = (out / "README.md").read_text()
    assert "lmms_eval --model llava_hf" in card and f"vllm serve {out.resolve()}" in card
    assert f"pivotmerge evaluate --backend llava:{out.resolve()}" in card
    assert Recipe.load(out / "recipe.yml").into == str(model.resolve())


def test_qwen2_vl_projector_over_two_shards_both_rewritten(tiny_qwen_dir, tmp_path):
    from transformers import Qwen2VLForConditionalGeneration

    model = tiny_qwen_dir
    before = snapshot(model)
    experts = make_experts(tmp_path, projector_state(model, "visual.merger."), n=3)
    result = merge(experts)
    rep = export_model(result, str(model), tmp_path / "out")
    wm = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    assert rep.rewritten == sorted({v for k, v in wm.items() if "merger" in k}) and len(rep.rewritten) == 2
    assert rep.linked and not (set(rep.linked) & set(rep.rewritten))
    loaded, info = Qwen2VLForConditionalGeneration.from_pretrained(rep.out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    merger = loaded.model.visual.merger.state_dict()
    for layer in result.projector.layers:
        for role, t in layer.tensors.items():
            assert torch.equal(merger[f"{layer.name}.{role}"], t)
    gen = loaded.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 6)
    _assert_untouched_and_linked(model, rep.out, before, rep.rewritten)
    _assert_index_right(rep.out)
    assert "--model qwen2_vl" in (rep.out / "README.md").read_text()


# --------------------------------------------------------------------------- layouts
def test_original_llava_experts_map_onto_hf_llava_keys(tmp_path):
    model = synthetic_model(tmp_path / "model")
    proj = projector_state(model, "multi_modal_projector")
    back = {"multi_modal_projector.linear_1.": "model.mm_projector.0.", "multi_modal_projector.linear_2.": "model.mm_projector.2."}
    experts = []
    for i in range(2):
        p = tmp_path / f"stage1-{i}" / "mm_projector.bin"
        p.parent.mkdir()
        torch.save({back[k.rsplit(".", 1)[0] + "."] + k.rsplit(".", 1)[1]: v + i for k, v in proj.items()}, p)
        experts.append(str(p))
    result = merge(experts)
    rep = export_model(result, str(model), tmp_path / "out")
    got = projector_state(rep.out, "multi_modal_projector")
    for key, t in got.items():
        layer = "0" if "linear_1" in key else "2"
        assert torch.equal(t, result.projector.layer(layer).tensors[key.rsplit(".", 1)[1]])


def test_original_llava_pickle_shards_rewritten_in_their_own_format(tmp_path):
    model = tmp_path / "llava-v1.5-tiny"
    model.mkdir()
    g = torch.Generator().manual_seed(1)
    lm = {"model.layers.0.mlp.weight": torch.randn(8, 8, generator=g).half()}
    proj = {"model.mm_projector.0.weight": torch.randn(12, 8, generator=g).half(), "model.mm_projector.0.bias": torch.zeros(12).half(),
            "model.mm_projector.2.weight": torch.randn(12, 12, generator=g).half(), "model.mm_projector.2.bias": torch.zeros(12).half(),
            "model.norm.weight": torch.ones(12).half()}
    torch.save(lm, model / "pytorch_model-00001-of-00002.bin")
    torch.save(proj, model / "pytorch_model-00002-of-00002.bin")
    wm = dict.fromkeys(lm, "pytorch_model-00001-of-00002.bin") | dict.fromkeys(proj, "pytorch_model-00002-of-00002.bin")
    (model / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 1}, "weight_map": wm}))
    (model / "config.json").write_text(json.dumps({"architectures": ["LlavaLlamaForCausalLM"], "mm_projector_type": "mlp2x_gelu"}))
    before = snapshot(model)
    experts = []
    for i in range(2):
        p = tmp_path / f"e{i}" / "mm_projector.bin"
        p.parent.mkdir()
        torch.save({k: (v.float() * (i + 2)) for k, v in proj.items() if "mm_projector" in k}, p)
        experts.append(str(p))
    result = merge(experts)
    rep = export_model(result, str(model), tmp_path / "out")
    assert rep.rewritten == ["pytorch_model-00002-of-00002.bin"] and rep.linked == ["pytorch_model-00001-of-00002.bin"]
    sd = torch.load(rep.out / "pytorch_model-00002-of-00002.bin", weights_only=True)
    assert set(sd) == set(proj) and torch.equal(sd["model.norm.weight"], proj["model.norm.weight"])
    for key in (k for k in proj if "mm_projector" in k):
        layer = result.projector.layer(key.split(".")[2])
        assert sd[key].dtype == torch.float16  # the model's dtype, not the merge's float32
        assert torch.equal(sd[key], layer.tensors[key.rsplit(".", 1)[1]].half())
    assert snapshot(model) == before
    card = (rep.out / "README.md").read_text()
    assert "--model llava --model_args" in card and "sglang.launch_server" in card


def test_bfloat16_model_gets_bfloat16_tensors_and_overflow_is_refused(tmp_path):
    model = synthetic_model(tmp_path / "model", dtype=torch.float16)
    experts = make_experts(tmp_path, {k: v.float() for k, v in projector_state(model, "multi_modal_projector").items()})
    result = merge(experts)
    rep = export_model(result, str(model), tmp_path / "out")
    got = projector_state(rep.out, "multi_modal_projector")
    assert all(t.dtype == torch.float16 for t in got.values())
    assert torch.equal(got[HF_KEYS[0]], result.projector.layer("linear_1").weight.half())
    big = result.projector.with_state({k: v * 1e6 for k, v in result.projector.state().items()})
    result.projector = big
    with pytest.raises(CastOverflow):
        export_model(result, str(model), tmp_path / "out2")
    assert not (tmp_path / "out2").exists()


# --------------------------------------------------------------------------- refusals
def test_misfits_are_refused_before_the_merge(tmp_path, capsys):
    model = synthetic_model(tmp_path / "model")
    target = open_model(str(model))
    wrong = synthetic_model(tmp_path / "wider", d_hidden=16)
    result = merge(make_experts(tmp_path / "w", projector_state(wrong, "multi_modal_projector")))
    with pytest.raises(ExportMismatch, match=r"shape \[12, 8\] but the merged projector's linear_1.weight has \[16, 8\]"):
        check_fit(result.projector, target)
    qwen = {"visual.merger.ln_q.weight": torch.ones(8), "visual.merger.ln_q.bias": torch.zeros(8),
            "visual.merger.mlp.0.weight": torch.randn(12, 32), "visual.merger.mlp.0.bias": torch.zeros(12),
            "visual.merger.mlp.2.weight": torch.randn(12, 12), "visual.merger.mlp.2.bias": torch.zeros(12)}
    qexperts = make_experts(tmp_path / "q", qwen)
    with pytest.raises(ExportMismatch, match="Qwen2-VL merger .* another family"):
        check_fit(merge(qexperts).projector, target)
    recipe = write_recipe(tmp_path / "q.yml", qexperts, into=str(model))
    assert cli_main(["merge", str(recipe), str(tmp_path / "qout"), "-q"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another family" in err and "Traceback" not in err
    assert not (tmp_path / "qout").exists()
    with pytest.raises(ExportMismatch, match="holds no projector"):
        open_model(str(tmp_path / "q"))


def test_out_must_not_be_model_inside_it_or_around_it(tmp_path):
    model = synthetic_model(tmp_path / "models" / "m")
    target = open_model(str(model))
    for bad, what in [(model, "model folder or inside it"), (model / "sub", "inside it"),
                      (tmp_path / "models", "holds the model folder"), (tmp_path, "holds the model folder")]:
        with pytest.raises(OutputError, match=what):
            check_out_dir(target, bad, overwrite=True)
    link = tmp_path / "alias"
    link.symlink_to(model)
    with pytest.raises(OutputError, match="inside it"):
        check_out_dir(target, link, overwrite=True)
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(OutputError, match="already exists"):
        check_out_dir(target, foreign)
    with pytest.raises(OutputError, match="not an earlier PivotMerge output"):
        check_out_dir(target, foreign, overwrite=True)
    assert (foreign / "cat.jpg").read_bytes() == b"x"


def test_reexport_replaces_the_whole_folder_and_an_expert_file_of_model_is_fine(tmp_path):
    model = synthetic_model(tmp_path / "model", shards=2)
    other = synthetic_model(tmp_path / "other", shards=4)
    # experts: MODEL itself (its shard files are inputs) and a perturbed copy
    experts = [str(model), *make_experts(tmp_path, projector_state(model, "multi_modal_projector"), n=1)]
    result = merge(experts)
    out = tmp_path / "out"
    export_model(result, str(other), out)
    assert (out / "model-00004-of-00004.safetensors").exists()
    with pytest.raises(OutputError, match="already exists"):
        export_model(result, str(model), out)
    rep = export_model(result, str(model), out, overwrite=True)
    assert sorted(p.name for p in out.iterdir() if p.suffix == ".safetensors") == [
        "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]  # nothing stale left
    assert rep.linked == ["model-00001-of-00002.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_copies_when_hard_links_fail_and_with_link_false(tmp_path, monkeypatch):
    model = synthetic_model(tmp_path / "model")
    before = snapshot(model)
    result = merge(make_experts(tmp_path, projector_state(model, "multi_modal_projector")))
    rep = export_model(result, str(model), tmp_path / "a", link=False)
    assert not rep.linked and "model-00001-of-00003.safetensors" in rep.copied

    def no_links(*_a, **_k):
        raise OSError(18, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_links)
    rep = export_model(result, str(model), tmp_path / "b")
    assert not rep.linked
    _assert_index_right(rep.out)
    for rel, (sha, ino, _size) in before.items():
        if rel not in rep.rewritten and rel != "README.md":
            got = rep.out / rel
            assert hashlib.sha256(got.read_bytes()).hexdigest() == sha and got.stat().st_ino != ino
    assert rep.bytes_written >= sum(s for r, (_h, _i, s) in before.items() if r != "README.md")


def test_cancel_during_the_shard_write_leaves_nothing(tmp_path, monkeypatch):
    model = synthetic_model(tmp_path / "model")
    before = snapshot(model)
    result = merge(make_experts(tmp_path, projector_state(model, "multi_modal_projector")))
    cancel = CancelToken()

    def progress(ev):
        if ev.stage == "export":
            cancel.cancel()

    from pivotmerge_gui.core.errors import Cancelled

    with pytest.raises(Cancelled):
        export_model(result, str(model), tmp_path / "out", progress=progress, cancel=cancel)
    assert not (tmp_path / "out").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".out")]
    assert snapshot(model) == before


def test_evaluate_runs_on_the_exported_folder_as_the_merge_inside_model(tiny_llava_dir, tmp_path, capsys):
    from PIL import Image

    lines = []
    for i, colour in enumerate([(255, 0, 0), (0, 0, 255)]):
        Image.new("RGB", (8, 8), colour).save(tmp_path / f"{i}.png")
        lines.append(json.dumps({"image": f"{i}.png", "caption": "a red dot", "domain": f"d{i}"}))
    (tmp_path / "pairs.jsonl").write_text("\n".join(lines))
    experts = make_experts(tmp_path, projector_state(tiny_llava_dir, "multi_modal_projector"), scale=0.5)
    recipe = write_recipe(tmp_path / "r.yml", experts, into=str(tiny_llava_dir))
    out = tmp_path / "out"
    assert cli_main(["merge", str(recipe), str(out), "-q"]) == 0  # into: from the recipe
    capsys.readouterr()
    common = ["--pairs", str(tmp_path / "pairs.jsonl"), "--device", "cpu", "--json"]
    assert cli_main(["evaluate", "--backend", f"llava:{out}", *common]) == 0
    own = json.loads(capsys.readouterr().out)["projectors"][0]
    merged = merge(experts)
    pipeline.save_result(merged, tmp_path / "plain2", fmt="hf-llava")
    assert cli_main(["evaluate", str(tmp_path / "plain2"), "--backend", f"llava:{tiny_llava_dir}", *common]) == 0
    swapped = json.loads(capsys.readouterr().out)["projectors"][0]
    assert [r["nll"] for r in own["pairs"]] == pytest.approx([r["nll"] for r in swapped["pairs"]], rel=1e-6)
    assert [r["caption"] for r in own["pairs"]] == [r["caption"] for r in swapped["pairs"]]
    base = load_projector(str(tiny_llava_dir)).original_state_dict()
    assert not torch.equal(load_projector(str(out)).original_state_dict()[HF_KEYS[0]], base[HF_KEYS[0]])


def test_single_file_model_and_a_loose_mm_projector_bin_both_get_the_merge(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    g = torch.Generator().manual_seed(3)
    proj = {HF_KEYS[0]: torch.randn(12, 8, generator=g), HF_KEYS[1]: torch.randn(12, generator=g),
            HF_KEYS[2]: torch.randn(12, 12, generator=g), HF_KEYS[3]: torch.randn(12, generator=g)}
    save_file({"lm_head.weight": torch.randn(32, 12, generator=g), **proj}, str(model / "model.safetensors"))
    stage1 = {"model.mm_projector.0.weight": proj[HF_KEYS[0]], "model.mm_projector.0.bias": proj[HF_KEYS[1]],
              "model.mm_projector.2.weight": proj[HF_KEYS[2]], "model.mm_projector.2.bias": proj[HF_KEYS[3]]}
    torch.save(stage1, model / "mm_projector.bin")
    (model / "training_args.bin").write_bytes(b"not a weight file")
    before = snapshot(model)
    result = merge(make_experts(tmp_path / "e", proj))
    rep = export_model(result, str(model), tmp_path / "out")
    assert sorted(rep.rewritten) == ["mm_projector.bin", "model.safetensors"] and rep.linked == ["training_args.bin"]
    single = load_file(str(rep.out / "model.safetensors"))
    assert torch.equal(single["lm_head.weight"], load_file(str(model / "model.safetensors"))["lm_head.weight"])
    loose = torch.load(rep.out / "mm_projector.bin", weights_only=True)
    for hf, orig in zip(HF_KEYS, stage1):
        layer, role = hf.split(".")[1], hf.rsplit(".", 1)[1]
        assert torch.equal(single[hf], result.projector.layer(layer).tensors[role])
        assert torch.equal(loose[orig], single[hf])
    assert snapshot(model) == before


@pytest.mark.parametrize("case_id", [c.id for c in CASES])
def test_every_family_exports_into_its_own_layout(case_id, tmp_path):
    case = CASE_BY_ID[case_id]
    _, state = case.build(seed=0)
    model = tmp_path / "model"
    model.mkdir()
    lm = {"zz_language_model.layers.0.weight": torch.randn(8, 8)}
    save_file(lm, str(model / "model-00001-of-00002.safetensors"))
    save_file(state, str(model / "model-00002-of-00002.safetensors"))
    wm = dict.fromkeys(lm, "model-00001-of-00002.safetensors") | dict.fromkeys(state, "model-00002-of-00002.safetensors")
    (model / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": wm}))
    experts = [str(case.save(tmp_path / f"e{i}", seed=i + 1)[2]) for i in range(2)]
    result = merge(experts)
    rep = export_model(result, str(model), tmp_path / "out")
    assert rep.rewritten == ["model-00002-of-00002.safetensors"]
    got = load_projector(str(rep.out))
    assert got.family == result.projector.family
    want = result.projector.state()
    assert got.state().keys() == want.keys() and all(torch.equal(got.state()[k], v) for k, v in want.items())
    kept = load_file(str(rep.out / "model-00002-of-00002.safetensors"))
    assert all(torch.equal(kept[k], state[k]) for k in case.other_tensors)  # the shard's other tensors stay


def test_in_memory_calibration_is_saved_and_the_exported_recipe_reproduces(tmp_path):
    from pivotmerge_gui.core.calibration import Calibration

    model = synthetic_model(tmp_path / "model")
    experts = make_experts(tmp_path, projector_state(model, "multi_modal_projector"), scale=0.3)
    g = torch.Generator().manual_seed(4)
    cal = Calibration([torch.randn(40, 8, generator=g), torch.randn(30, 8, generator=g)], ["a", "b"])
    recipe = Recipe(merge_method="regmean", models=[{"model": e, "name": f"e{i}"} for i, e in enumerate(experts)])
    result = pipeline.run(pipeline.plan(recipe, calibration=cal))
    rep = export_model(result, str(model), tmp_path / "out")
    saved = Recipe.load(rep.out / "recipe.yml")
    assert saved.calibration.file == pipeline.CALIBRATION_FILE and (rep.out / pipeline.CALIBRATION_FILE).is_file()
    assert saved.into == str(model.resolve())
    assert cli_main(["merge", str(rep.out / "recipe.yml"), str(tmp_path / "again"), "-q"]) == 0
    a, b = projector_state(rep.out, "multi_modal_projector"), projector_state(tmp_path / "again", "multi_modal_projector")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a[HF_KEYS[0]], merge(experts).projector.layer("linear_1").weight)  # regmean, not linear


def test_a_killed_export_leaves_no_out_and_the_next_one_cleans_up(tmp_path):
    import subprocess
    import sys

    model = synthetic_model(tmp_path / "model")
    experts = make_experts(tmp_path, projector_state(model, "multi_modal_projector"))
    before = snapshot(model)
    code = (
        "import os, signal, sys\n"
        "from pivotmerge_gui.core.io.export import export_model\n"
        "from tests.io.test_export import merge\n"
        f"result = merge({experts!r})\n"
        "def crash(ev):\n"
        "    if ev.stage == 'export':\n"
        "        os.kill(os.getpid(), signal.SIGKILL)  # mid-write, as a power cut would\n"
        f"export_model(result, {str(model)!r}, {str(tmp_path / 'out')!r}, progress=crash)\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], check=False, cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]  # the half-written temp folder
    assert snapshot(model) == before
    rep = export_model(merge(experts), str(model), tmp_path / "out")
    assert rep.rewritten and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]


def test_a_file_with_other_links_is_never_opened_for_writing(tmp_path):
    from pivotmerge_gui.core.io.export import _open_own

    a = tmp_path / "a.safetensors"
    a.write_bytes(b"model bytes")
    os.link(a, tmp_path / "b.safetensors")
    with pytest.raises(OutputError, match="hard link"):
        _open_own(tmp_path / "b.safetensors")
    assert a.read_bytes() == b"model bytes"


def _tiny_llava_next(tf):
    from tests.evaluation.llava_tiny import tiny_llava

    small = tiny_llava().config
    cfg = tf.LlavaNextConfig(vision_config=small.vision_config, text_config=small.text_config, image_token_index=127,
                             image_grid_pinpoints=[[8, 8], [8, 16]])
    return tf.LlavaNextForConditionalGeneration(cfg), ("multi_modal_projector", "image_newline")


def _tiny_qwen25(tf):
    text = {"vocab_size": 128, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "max_position_embeddings": 256,
            "rope_scaling": {"type": "mrope", "mrope_section": [2, 2, 4]}, "bos_token_id": 1, "eos_token_id": 2}
    vision = {"depth": 1, "hidden_size": 16, "out_hidden_size": 32, "intermediate_size": 32, "num_heads": 2,
              "patch_size": 2, "spatial_merge_size": 2, "temporal_patch_size": 2, "fullatt_block_indexes": [0]}
    cfg = tf.Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121,
                              vision_start_token_id=122, vision_end_token_id=123)
    return tf.Qwen2_5_VLForConditionalGeneration(cfg), "visual.merger."


@pytest.mark.parametrize("build", [_tiny_llava_next, _tiny_qwen25], ids=["llava-next", "qwen2.5-vl"])
def test_llava_next_and_qwen25_vl_load_strictly_after_export(build, tmp_path):
    tf = pytest.importorskip("transformers")
    torch.manual_seed(0)
    net, prefix = build(tf)
    model = tmp_path / "model"
    net.eval().save_pretrained(model, max_shard_size="30KB")
    result = merge(make_experts(tmp_path, projector_state(model, prefix), n=2))
    rep = export_model(result, str(model), tmp_path / "out")
    loaded, info = type(net).from_pretrained(rep.out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    state = loaded.state_dict()
    got = load_projector(str(rep.out))
    for layer in result.projector.layers:
        for role, t in layer.tensors.items():
            key = got.layer(layer.name).keys[role]
            assert torch.equal(state[key if key in state else f"model.{key}"], t), key
    assert loaded.generate(input_ids=torch.tensor([[1, 5, 6]]), max_new_tokens=2, do_sample=False).shape == (1, 5)
