"""The verify shadow (madakv_vllm/integration/verify.py) is not circular for prefix-cache hits.

A request that starts with a hit attends over pages another request wrote. The shadow's dense
reference takes those tokens' K/V from its own record of the request that computed them (keyed by
token ids, multimodal identities and page), never from the shared pages, and the shared pages must
equal that record. Here a shared page is corrupted between two requests: the shadow reports it
(and its attention check fails with it), while a shadow that copies the prefix from the pages (the
former behaviour) does not notice.
"""

import pytest
import torch
from conftest import mm_prompt, words

FULL = {"policy": "full"}  # the fp32 engine of test_engine.py / test_cpu_isa.py (shared)


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def manager(llm):
    return core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def greedy(n):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0)


def prompt(image: int, question: int) -> dict:
    """~600 tokens shared by every question on ``image`` (an image no other test uses first)."""
    return mm_prompt("qwen2vl", [image, words(250, 4), image + 1, words(250, 9), words(30, 100 + question)])


def run(llm, name: str, p: dict, seen: dict | None = None):
    """One request to completion; ``seen``: its worker state and pages (block order, hashed or not)."""
    from madakv_vllm.integration import per_head

    llm.llm_engine.add_request(name, p, greedy(4))
    out = None
    while llm.llm_engine.has_unfinished_requests():
        for o in llm.llm_engine.step():
            if o.finished:
                out = o
        if seen is not None:
            for rid, blocks in manager(llm).req_to_blocks.items():
                if rid == name or rid.startswith(name + "-"):
                    seen["pages"] = [b.block_id for b in blocks]
                    seen["hashed"] = [b.block_id for b in blocks if b.block_hash is not None]
                    seen.setdefault("state", next((st for st in per_head.STATES if rid in st.requests), None))
    return out


def pages_shadow():
    """A shadow with the former behaviour: a hit's prefix copied from the shared pages themselves."""
    from madakv_vllm.integration import verify

    class PagesShadow(verify.Shadow):
        def prefix_kv(self, batch, i, rid, layer, first):
            pk, pv = batch.state.read_stock(layer, batch.block_table[i].tolist(), first)
            return pk.float(), pv.float()

    return PagesShadow()


def test_a_corrupted_shared_prefix_page_is_caught(engine):
    """prime computes a prefix (checked, recorded); hit-clean reuses it: taken from the record, the
    pages match it, attention matches. Then one shared page is corrupted in every layer and head:
    hit-corrupt's shadow reports that page as differing from its record, and its attention check
    fails too (the kernel reads the corrupted page, the reference the record); a shadow copying the
    prefix from the pages sees nothing wrong for hit-old on the same page."""
    from madakv_vllm.integration import verify

    llm = engine("qwen2vl", FULL)
    saved = None
    try:
        shadow = verify.start(llm)
        prime = {}
        run(llm, "shadow-prime", prompt(901, 0), prime)
        st, c = prime["state"], prime["state"].cache
        assert st is not None and len(prime["hashed"]) >= 15
        assert shadow.errors == [] and shadow.max_err < 1e-4

        shadow = verify.start()  # a new shadow; the records of the engine's pages stay
        clean = {}
        out = run(llm, "shadow-hit-clean", prompt(901, 1), clean)
        assert out.num_cached_tokens >= 15 * 32
        assert shadow.hit_tokens == out.num_cached_tokens * st.num_layers  # every hit token, every layer
        assert shadow.errors == [] and shadow.max_err < 1e-4

        page = prime["hashed"][2]
        subs = torch.tensor([int(c.subblock(l, page, h)) for l in range(st.num_layers) for h in range(st.H)])
        saved = c.flat[subs].clone()
        c.flat[subs] = saved + 3.0 * torch.randn(saved.shape, generator=torch.Generator().manual_seed(0))

        shadow = verify.start()
        corrupt = {}
        out = run(llm, "shadow-hit-corrupt", prompt(901, 2), corrupt)
        assert page in corrupt["pages"][: out.num_cached_tokens // 32]  # it attended over that page
        assert any(f"shared page {page} (block 2) differs" in e for e in shadow.errors), shadow.errors
        assert len(shadow.errors) == st.num_layers  # only that page, in every layer
        assert shadow._max_err > 1e-2, shadow._max_err
        with pytest.raises(AssertionError, match=f"shared page {page}"):
            shadow.max_err

        old = verify.SHADOW = pages_shadow()
        old_seen = {}
        out = run(llm, "shadow-hit-old", prompt(901, 3), old_seen)
        assert page in old_seen["pages"][: out.num_cached_tokens // 32]
        assert old.errors == [] and old.max_err < 1e-4  # the corruption goes unnoticed
    finally:
        verify.ENABLED = False
        if saved is not None:
            c.flat[subs] = saved
        llm.reset_prefix_cache()  # nothing computed over the corrupted page stays cached


def test_a_hit_with_no_independent_copy_is_an_error(engine):
    """A prefix computed while the shadow was off has no record: a later hit on it is reported (and
    ``max_err`` raises) rather than trusted."""
    from madakv_vllm.integration import verify

    llm = engine("qwen2vl", FULL)
    try:
        assert llm.reset_prefix_cache()
        verify.ENABLED = False
        run(llm, "unshadowed-prime", prompt(911, 0))
        shadow = verify.start()
        out = run(llm, "unshadowed-hit", prompt(911, 1))
        assert out.num_cached_tokens >= 15 * 32
        assert shadow.errors and all("no independent copy" in e for e in shadow.errors), shadow.errors
        with pytest.raises(AssertionError, match="no independent copy"):
            shadow.max_err
    finally:
        verify.ENABLED = False
        llm.reset_prefix_cache()


def test_block_keys_follow_token_ids_and_images():
    """The key a hit is looked up by: block j's key changes with any token or image overlapping blocks
    0..j, not with later ones; token ids the worker does not know give no key."""
    from types import SimpleNamespace as NS

    from madakv_vllm.integration.verify import block_keys

    def req(tokens, images=(("img-a", 40, 20),), out=()):
        feats = [NS(identifier=i, mm_position=NS(offset=o, length=n)) for i, o, n in images]
        return NS(prompt_token_ids=list(tokens), output_token_ids=list(out), mm_features=feats, lora_request=None)

    tokens = list(range(100, 228))  # 4 blocks of 32; the image covers positions 40-59 (block 1)
    base = block_keys(req(tokens), 4, 32, [])
    assert len(base) == 4 and len(set(base)) == 4
    assert block_keys(req(tokens), 4, 32, []) == base
    other_token = tokens[:70] + [7] + tokens[71:]  # block 2
    assert block_keys(req(other_token), 4, 32, [])[:2] == base[:2]
    assert all(a != b for a, b in zip(block_keys(req(other_token), 4, 32, [])[2:], base[2:]))
    other_image = block_keys(req(tokens, images=(("img-b", 40, 20),)), 4, 32, [])
    assert other_image[0] == base[0] and all(a != b for a, b in zip(other_image[1:], base[1:]))
    assert block_keys(req(tokens[:96]), 4, 32, []) == base[:3]  # a partial block has no key
    assert block_keys(req(tokens[:96], out=tokens[96:]), 4, 32, []) == base  # output tokens count too
    assert block_keys(req(tokens[:96], out=[-1] * 32), 4, 32, []) == base[:3]  # placeholders: unknown
    assert block_keys(NS(prompt_token_ids=None), 4, 32, []) == []  # prompt embeddings
