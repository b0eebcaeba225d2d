"""The transformers LLaVA back end on a tiny random Llava built from configs (no download)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")

from pivotmerge_gui.core.errors import Cancelled, HubError
from pivotmerge_gui.core.evaluation.llava_hf import LlavaHFBackend, ProjectorMismatch
from pivotmerge_gui.core.io import load_projector
from tests.factories import make_mlp_projector

from .llava_tiny import IMAGE_TOKEN, PROMPT, tiny_image_processor, tiny_llava, tiny_tokenizer

CAPTIONS = ["a red square at the top left", "there are two blue dots", "text reading a"]


@pytest.fixture(scope="module")
def parts():
    return tiny_llava(), tiny_tokenizer(), tiny_image_processor()


@pytest.fixture(scope="module")
def backend(parts):
    model, tok, ip = parts
    return LlavaHFBackend(model, tok, ip, prompt=PROMPT, batch=2)


@pytest.fixture(scope="module")
def pixels():
    g = torch.Generator().manual_seed(3)
    return torch.rand(3, 3, 8, 8, generator=g)


def _by_hand_nll(model, tok, projector, pixels, captions):
    """NLL through transformers' own Llava forward (input_ids with 16 image tokens per image +
    pixel_values) after writing the projector's weights into a copy by hand."""
    m = copy.deepcopy(model)
    mm = getattr(m, "model", m).multi_modal_projector
    st = projector.state()
    with torch.no_grad():
        mm.linear_1.weight.copy_(st["0.weight"])
        mm.linear_1.bias.copy_(st["0.bias"])
        mm.linear_2.weight.copy_(st["2.weight"])
        mm.linear_2.bias.copy_(st["2.bias"])
    before = tok("USER :", add_special_tokens=True)["input_ids"]
    after = tok(" caption : ASSISTANT :", add_special_tokens=False)["input_ids"]
    out = []
    for i, cap in enumerate(captions):
        tail = tok(cap, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids = torch.tensor([before + [IMAGE_TOKEN] * 16 + after + tail])
        with torch.no_grad():
            logits = m(input_ids=ids, pixel_values=pixels[i:i + 1]).logits[0]
        pred = logits[-len(tail) - 1:-1]
        out.append(F.cross_entropy(pred, torch.tensor(tail), reduction="sum"))
    return torch.stack(out)


def test_swapped_projector_gives_exactly_the_hand_set_model(parts, backend, pixels):
    model, tok, _ = parts
    feats = backend.encode_images(pixels)
    assert feats.shape == (3, 16, 16)
    p = make_mlp_projector(16, 32, 32, seed=5)
    nll, count = backend.caption_nll(p, feats, CAPTIONS)
    want = _by_hand_nll(model, tok, p, pixels, CAPTIONS)
    torch.testing.assert_close(nll, want, rtol=1e-5, atol=1e-5)
    assert count.tolist() == [len(tok(c, add_special_tokens=False)["input_ids"]) + 1 for c in CAPTIONS]
    other = make_mlp_projector(16, 32, 32, seed=6)
    assert not torch.allclose(backend.caption_nll(other, feats, CAPTIONS)[0], nll)


def test_swap_back_restores_the_original_weights_also_on_error(backend):
    before = {k: v.clone() for k, v in backend.projector_module.state_dict().items()}
    p = make_mlp_projector(16, 32, 32, seed=7)
    with backend.swapped(p) as mm:
        torch.testing.assert_close(mm.linear_1.weight, p.state()["0.weight"])
    with pytest.raises(RuntimeError, match="boom"), backend.swapped(p):
        raise RuntimeError("boom")
    after = backend.projector_module.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_two_threads_sharing_the_model_each_score_their_own_projector(backend, pixels):
    """The app's test bench and a sweep may use one back end at once: swaps do not interleave."""
    import threading

    feats = backend.encode_images(pixels)
    projs = [make_mlp_projector(16, 32, 32, seed=40 + k) for k in range(2)]
    want = [backend.caption_nll(p, feats, CAPTIONS)[0] for p in projs]
    got: dict[int, list[torch.Tensor]] = {0: [], 1: []}

    def work(k: int) -> None:
        for _ in range(6):
            got[k].append(backend.caption_nll(projs[k], feats, CAPTIONS)[0])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    for k in range(2):
        assert len(got[k]) == 6
        for nll in got[k]:
            torch.testing.assert_close(nll, want[k])


def test_original_llava_mm_projector_file_maps_onto_linear_1_2(tmp_path, backend):
    g = torch.Generator().manual_seed(1)
    state = {"model.mm_projector.0.weight": torch.randn(32, 16, generator=g),
             "model.mm_projector.0.bias": torch.randn(32, generator=g),
             "model.mm_projector.2.weight": torch.randn(32, 32, generator=g),
             "model.mm_projector.2.bias": torch.randn(32, generator=g)}
    torch.save(state, tmp_path / "mm_projector.bin")
    p = load_projector(tmp_path / "mm_projector.bin")
    with backend.swapped(p) as mm:
        assert torch.equal(mm.linear_1.weight, state["model.mm_projector.0.weight"])
        assert torch.equal(mm.linear_2.bias, state["model.mm_projector.2.bias"])


def test_incompatible_projector_is_a_typed_error(backend):
    with pytest.raises(ProjectorMismatch, match="linear_1.weight"), \
            backend.swapped(make_mlp_projector(16, 24, 32, seed=0)):
        pass


def test_generation_streams_and_matches_the_returned_captions(backend, pixels):
    feats = backend.encode_images(pixels)
    p = make_mlp_projector(16, 32, 32, seed=5)
    seen: dict[int, str] = {}
    calls = []

    def on_token(i: int, text: str) -> None:
        seen[i] = text
        calls.append(i)

    caps = backend.generate(p, feats, 6, on_token=on_token)
    assert len(caps) == 3 and all(isinstance(c, str) for c in caps)
    assert set(calls) <= {0, 1, 2} and len(calls) > 0
    for i, c in enumerate(caps):
        assert seen.get(i, "") == c
    assert backend.generate(p, feats, 6) == caps  # greedy is deterministic


def test_cancel_stops_generation(backend, pixels):
    from pivotmerge_gui.core.progress import CancelToken

    feats = backend.encode_images(pixels[:1])
    token = CancelToken()
    calls = []

    def on_token(i: int, text: str) -> None:
        calls.append(text)
        token.cancel()

    with pytest.raises(Cancelled):
        backend.generate(make_mlp_projector(16, 32, 32, seed=5), feats, 50, token, on_token=on_token)
    assert len(calls) <= 2  # stopped at the next token, not after 50


def test_from_pretrained_local_folder_and_offline_hub_id(tmp_path, parts, pixels):
    model, tok, ip = parts
    folder = tmp_path / "tiny-llava"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    ip.save_pretrained(folder)
    b = LlavaHFBackend.from_pretrained(str(folder), device="cpu", prompt=PROMPT)
    assert b.dtype == torch.float32 and b.source == str(folder)
    ref = LlavaHFBackend(model, tok, ip, prompt=PROMPT)
    p = make_mlp_projector(16, 32, 32, seed=5)
    torch.testing.assert_close(b.caption_nll(p, b.encode_images(pixels), CAPTIONS)[0],
                               ref.caption_nll(p, ref.encode_images(pixels), CAPTIONS)[0])
    with pytest.raises(HubError, match="no-such-org/no-such-llava"):
        LlavaHFBackend.from_pretrained("no-such-org/no-such-llava", device="cpu")


@pytest.mark.parametrize("device", [
    "cpu",
    pytest.param("cuda", marks=[pytest.mark.cuda,
                                pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]),
])
def test_half_precision_model_matches_fp32(parts, pixels, device):
    """The fp16 path (what CUDA runs by default): fp32 projector weights are cast into the
    fp16 module, features cross the boundary, and the NLL stays close to fp32's."""
    model, tok, ip = parts
    b32 = LlavaHFBackend(copy.deepcopy(model), tok, ip, prompt=PROMPT)
    b16 = LlavaHFBackend(copy.deepcopy(model), tok, ip, prompt=PROMPT, device=device, dtype=torch.float16)
    assert b16.dtype == torch.float16 and b16.device.type == device
    p = make_mlp_projector(16, 32, 32, seed=5)
    want = b32.caption_nll(p, b32.encode_images(pixels), CAPTIONS)[0]
    got = b16.caption_nll(p, b16.encode_images(pixels), CAPTIONS)[0]
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    assert b16.projector_module.linear_1.weight.dtype == torch.float16
    assert len(b16.generate(p, b16.encode_images(pixels), 4)) == 3


def test_bench_streams_tokens_and_scores_pil_pairs(backend):
    from pivotmerge_gui.core.evaluation.bench import run_bench
    from pivotmerge_gui.core.evaluation.pairs import Pair, tensor_to_pil
    from pivotmerge_gui.core.progress import drain

    g = torch.Generator().manual_seed(4)
    pairs = [Pair(c, "d", tensor_to_pil(torch.rand(3, 8, 8, generator=g))) for c in CAPTIONS]
    projs = {"a": make_mlp_projector(16, 32, 32, seed=5), "b": make_mlp_projector(16, 32, 32, seed=6)}
    updates = []
    res = drain(run_bench(backend, projs, pairs, max_new_tokens=4, on_token=updates.append))
    assert {(u.projector, u.index) for u in updates} <= {(n, i) for n in projs for i in range(3)}
    assert len(updates) > 0
    last = {(u.projector, u.index): u.text for u in updates}
    for name, rows in res.results.items():
        for r in rows:
            assert last.get((name, r.index), "") == r.caption
    feats = backend.encode_images([p.image for p in pairs])
    nll, cnt = backend.caption_nll(projs["a"], feats, CAPTIONS)
    assert res.metrics["a"].per_domain["d"].nll == pytest.approx(float(nll.sum() / cnt.sum()), rel=1e-5)


class _OldLayout(torch.nn.Module):
    """transformers < 4.52 module layout: vision tower, projector and language model are
    attributes of the top-level model (no ``model.model``); built from the new-layout
    modules so both compute the same function."""

    def __init__(self, new):
        super().__init__()
        self.vision_tower = new.model.vision_tower
        self.multi_modal_projector = new.model.multi_modal_projector
        self.language_model = new.model.language_model
        self.lm_head = new.lm_head
        self.config = new.config

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def forward(self, inputs_embeds, attention_mask):
        from types import SimpleNamespace

        h = self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state
        return SimpleNamespace(logits=self.lm_head(h))


def test_old_transformers_layout_with_top_level_projector(parts, pixels):
    model, tok, ip = parts
    new = copy.deepcopy(model)
    old = _OldLayout(copy.deepcopy(model))
    b_new = LlavaHFBackend(new, tok, ip, prompt=PROMPT)
    b_old = LlavaHFBackend(old, tok, ip, prompt=PROMPT)
    assert b_old.core is old and b_old.projector_module is old.multi_modal_projector
    assert b_new.core is new.model
    p = make_mlp_projector(16, 32, 32, seed=9)
    torch.testing.assert_close(b_old.caption_nll(p, b_old.encode_images(pixels), CAPTIONS)[0],
                               b_new.caption_nll(p, b_new.encode_images(pixels), CAPTIONS)[0])
    with b_old.swapped(p) as mm:
        assert mm is old.multi_modal_projector and torch.equal(mm.linear_2.weight, p.state()["2.weight"])


def test_prompt_tokenised_in_one_piece_when_the_tokenizer_knows_the_image_token(parts, pixels):
    model, tok, ip = parts
    tok_img = tiny_tokenizer(image_special=True)
    assert tok_img("<image>", add_special_tokens=False)["input_ids"] == [IMAGE_TOKEN]
    b = LlavaHFBackend(model, tok_img, ip, prompt=PROMPT)
    fallback = LlavaHFBackend(model, tok, ip, prompt=PROMPT)
    assert b._before == fallback._before and b._after == fallback._after
    p = make_mlp_projector(16, 32, 32, seed=5)
    torch.testing.assert_close(b.caption_nll(p, b.encode_images(pixels), CAPTIONS)[0],
                               _by_hand_nll(model, tok, p, pixels, CAPTIONS), rtol=1e-5, atol=1e-5)
