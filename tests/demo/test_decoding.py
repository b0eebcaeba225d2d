"""Greedy captioning decodes incrementally (KV cache); it must agree with running the LM on
the whole sequence at every step, which is what the cache replaces."""

from __future__ import annotations

import torch

from pivotmerge_gui.demo import kit
from pivotmerge_gui.demo.models import TinyLM, WorldConfig, caption_logits


def _full_sequence_greedy(backend, projector, features, max_new):
    prefix = backend._prefix(projector, features)
    ids = torch.full((len(prefix), 1), backend.tok.bos_id, dtype=torch.long)
    done = torch.zeros(len(prefix), dtype=torch.bool)
    for _ in range(max_new):
        nxt = caption_logits(backend.lm, prefix, ids)[:, -1].argmax(-1)
        nxt = torch.where(done, torch.full_like(nxt, backend.tok.eos_id), nxt)
        ids = torch.cat([ids, nxt[:, None]], dim=1)
        done |= nxt == backend.tok.eos_id
        if bool(done.all()):
            break
    return [backend.tok.decode(row[1:]) for row in ids.tolist()]


def test_cached_steps_give_the_full_forward_logits():
    torch.manual_seed(0)
    lm = TinyLM(WorldConfig(vocab_size=11)).eval()
    x = torch.randn(3, 20, 64)
    with torch.no_grad():
        full = lm(x)
        first, cache = lm.step(x[:, :13])
        parts = [first]
        for t in range(13, 20):
            logits, cache = lm.step(x[:, t:t + 1], cache)
            parts.append(logits)
    assert cache[0][0].shape[2] == 20
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-5, atol=1e-5)


def test_generate_matches_full_sequence_decoding_on_the_demo_world():
    world = kit.load_world()
    experts = kit.load_experts("shared")
    feats = world.features("test", 12)
    for proj in experts.values():
        for f in feats.values():
            with torch.no_grad():
                want = _full_sequence_greedy(world.backend, proj, f, 16)
            got = world.backend.generate(proj, f, 16)
            assert got == want
            assert any(got)  # real captions, not empty strings
