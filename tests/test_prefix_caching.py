"""vLLM's prefix caching with madakv (in-process engines, CPU platform, fp32).

A request compressed at its prompt's end packs into fresh pages; its prompt pages go back to the
pool still hashed, so a later request with the same prefix reuses them and compresses for its own
question (madakv_vllm/accounting.py). Checked here: policy ``full`` is stock; a hit keeps exactly
what a fresh request keeps and generates the same tokens; no page holding packed entries is ever
hashed; pages shared with another request are never written; aborts, preemption, n > 1 and
duplicate prompts return every page.
"""

import random

import pytest
import torch
from conftest import mm_prompt, words

MADAKV = {"policy": "madakv", "budget": 0.2}
SMALL = {"num_gpu_blocks_override": 1024}  # 32K tokens: these engines' KV buffers stay small
PREFIX = [words(300, 11), 0, words(380, 12), 1, 2, words(250, 13)]  # ~1,000 tokens with 3 images


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def manager(llm):
    return core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def block_pool(llm):
    return core(llm).scheduler.kv_cache_manager.block_pool


def greedy(n=16, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, extra_args=extra or None)


def question(i: int) -> dict:
    return mm_prompt("qwen2vl", PREFIX + [words(40, 100 + i)])


def worker_state(llm, rid: str):
    from madakv_vllm.integration import per_head

    states = [st for st in per_head.STATES if rid in st.requests]
    return (states[0], states[0].requests[rid]) if states else (None, None)


def internal_id(llm, name: str) -> str | None:
    ids = [r for r in core(llm).scheduler.requests if r == name or r.startswith(name + "-")]
    return ids[0] if ids else None


def run(llm, reqs: dict, on_step=None, abort_at: dict | None = None, completions: dict | None = None) -> dict:
    """reqs: {name: (prompt, params)} added at once; steps the engine; returns {name: RequestOutput}.
    on_step(llm) runs after every step; abort_at: {name: step} aborts a request at that step;
    ``completions`` collects every finished sample by request and index."""
    completions = {} if completions is None else completions
    for name, (prompt, params) in reqs.items():
        llm.llm_engine.add_request(name, prompt, params)
    outs, step = {}, 0
    while llm.llm_engine.has_unfinished_requests():
        for o in llm.llm_engine.step():
            for c in o.outputs:  # n > 1: a step reports the samples that changed
                if c.finish_reason is not None:
                    completions.setdefault(o.request_id, {})[c.index] = c
            if o.finished:
                outs[o.request_id] = o
        step += 1
        for name, at in (abort_at or {}).items():
            if at == step:
                llm.llm_engine.abort_request([name])
        if on_step:
            on_step(llm)
        assert step < 5_000
    return outs


def kept_entries(llm, name: str, params) -> tuple[dict, list[int], int]:
    """Run one request; its retained logical positions per (layer, head) right after the prompt's
    compression, its generated tokens and its prefix-cache hit (tokens)."""
    seen = {}

    def capture(llm):
        rid = internal_id(llm, name)
        _, rs = worker_state(llm, rid) if rid else (None, None)
        if rs is not None and rs.base_counts is not None and "entries" not in seen:
            L, H = rs.lens.shape
            seen["entries"] = {(l, h): sorted(rs.entry_position[l, h, : int(rs.base_counts[l, h])].tolist())
                               for l in range(L) for h in range(H)}

    out = run(llm, {name: (question(int(name.split("q")[-1])), params)}, capture)[name]
    assert "entries" in seen, "the request was never compressed"
    return seen["entries"], list(out.outputs[0].token_ids), out.num_cached_tokens


def test_prefix_caching_stays_on(engine):
    llm = engine("qwen2vl", MADAKV, **SMALL)
    assert core(llm).scheduler.kv_cache_manager.enable_caching
    assert llm.llm_engine.vllm_config.cache_config.enable_prefix_caching


def test_full_policy_with_prefix_caching_is_stock(engine):
    """Policy full is cached and reused exactly as stock: same hits, same tokens, same logprobs."""
    from vllm import SamplingParams

    stock, ours = engine("qwen2vl"), engine("qwen2vl", {"policy": "full"})
    sp = SamplingParams(max_tokens=12, temperature=0, logprobs=3)
    for i in (0, 1, 2):
        a = stock.generate([question(i)], sp, use_tqdm=False)[0]
        b = ours.generate([question(i)], sp, use_tqdm=False)[0]
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.num_cached_tokens == b.num_cached_tokens and (i == 0 or b.num_cached_tokens > 0)
        for lx, ly in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert lx.keys() == ly.keys() and all(abs(lx[t].logprob - ly[t].logprob) < 1e-4 for t in lx)


@pytest.mark.parametrize("policy,dtype", [("madakv", "float32"), ("snapkv", "float32"), ("madakv", "bfloat16")])
def test_a_hit_keeps_what_a_fresh_request_keeps(engine, policy, dtype):
    """The same request with a prefix-cache hit and without one: exactly the same retained entries
    in every (layer, head) and the same greedy tokens; the hit leaves the window to recompute."""
    cfg = {"policy": policy, "budget": 0.2}
    kw = SMALL if dtype == "float32" else {**SMALL, "dtype": dtype}
    cached, fresh = engine("qwen2vl", cfg, **kw), engine("qwen2vl", cfg, enable_prefix_caching=False, **kw)
    sp = greedy(24)
    kept_entries(cached, f"{policy}-{dtype}-prime-q0", sp)  # puts the shared prefix in the cache
    for i in (1, 2):
        e_hit, t_hit, hit = kept_entries(cached, f"{policy}-{dtype}-hit-q{i}", sp)
        e_new, t_new, none = kept_entries(fresh, f"{policy}-{dtype}-fresh-q{i}", sp)
        n = len(cached.get_tokenizer()(question(i)["prompt"]).input_ids)
        assert none == 0 and 0 < hit <= n - 32 and hit % 32 == 0, (hit, n)
        assert hit >= (n - 32 - 40 - 32) // 32 * 32  # the whole shared prefix, up to a page
        assert e_hit == e_new
        assert t_hit == t_new


def test_packed_pages_never_hashed_and_shared_pages_never_written(engine):
    """Two requests hit one cached prefix and compress in the same steps: at every step no page a
    compressed request packs into has a hash (so no lookup can find it), and the shared pages hold
    the same bytes before and after both compressions."""
    llm = engine("qwen2vl", MADAKV, **SMALL)
    pool = block_pool(llm)
    hashed_by_prime: set[int] = set()
    states = []

    def note_hashed(llm):
        rid = internal_id(llm, "prime-q20")
        if rid:
            hashed_by_prime.update(b.block_id for b in manager(llm).req_to_blocks[rid] if b.block_hash is not None)
            states.append(worker_state(llm, rid)[0])

    run(llm, {"prime-q20": (question(20), greedy(4))}, note_hashed)
    state = next(st for st in states if st is not None)
    c = state.cache

    def page_bytes(pages):
        sub = torch.tensor([c.subblock(l, p, h) for p in pages for l in range(state.num_layers) for h in range(state.H)])
        return c.flat[sub].clone()

    shared_pages = sorted(hashed_by_prime)
    before = page_bytes(shared_pages)
    hits, checked = {}, [0]

    def check(llm):
        for name in ("hit-q21", "hit-q22"):
            rid = internal_id(llm, name)
            if rid is None:
                continue
            blocks = manager(llm).req_to_blocks.get(rid, [])
            hits.setdefault(name, {b.block_id for b in blocks if not b.is_null and b.block_id in hashed_by_prime})
            _, rs = worker_state(llm, rid)
            if rs is None or not rs.is_compressed:
                continue
            n_used = rs.used_subblocks(state.bs)  # [L, H]
            L, H = n_used.shape
            subs = torch.cat([rs.subblocks[l, h, : int(n_used[l, h])] for l in range(L) for h in range(H)])
            pages = ((subs // state.H) % c.num_blocks).tolist()
            assert not set(pages) & hashed_by_prime
            for p in pages:
                assert pool.blocks[p].block_hash is None, p
            checked[0] += 1

    outs = run(llm, {"hit-q21": (question(21), greedy(40)), "hit-q22": (question(22), greedy(40))}, check)
    assert checked[0] > 40 and all(o.num_cached_tokens > 0 for o in outs.values())
    assert hits["hit-q21"] and hits["hit-q21"] == hits["hit-q22"] <= set(shared_pages)
    assert torch.equal(page_bytes(shared_pages), before)


def test_aborts_preemption_n_and_duplicates_with_shared_pages_return_every_page(engine):
    """Shared prefixes in a small pool: duplicate prompts sent at once, n > 1 sampling, aborts
    mid-prefill and mid-decode, preemption; every request finishes, greedy duplicates agree with a
    fresh engine, and the pool returns exactly to its start."""
    from vllm import SamplingParams

    llm = engine("qwen2vl", MADAKV, num_gpu_blocks_override=80, max_model_len=2048, max_num_seqs=16)
    fresh = engine("qwen2vl", MADAKV, enable_prefix_caching=False, **SMALL)
    sched = core(llm).scheduler
    preempted = []
    orig = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (preempted.append(request.request_id), orig(request, *a, **k))[1]
    free0 = block_pool(llm).get_num_free_blocks()
    rng = random.Random(0)
    try:
        reqs = {f"dup{i}": (question(1), greedy(30)) for i in range(3)}
        reqs["n3"] = (question(2), SamplingParams(max_tokens=30, n=3, temperature=0.8, seed=1))
        for i in range(14):
            reqs[f"r{i}"] = (question(3 + i % 4), greedy(rng.randrange(5, 60), madakv_budget=rng.choice([0.1, 0.2, 0.5]),
                                                           madakv_recompress_interval=rng.choice([0, 16])))
        for i in range(8):  # uncompressed requests that grow while decoding: preemption
            reqs[f"d{i}"] = (mm_prompt("qwen2vl", [words(rng.randrange(50, 400), 200 + i)]),
                             greedy(rng.randrange(150, 400), madakv_policy="full"))
        samples: dict = {}
        outs = run(llm, reqs, abort_at={"r0": 1, "r1": 3, "r2": 12}, completions=samples)
    finally:
        sched._preempt_request = orig
    expect = fresh.generate([question(1)], greedy(30), use_tqdm=False)[0].outputs[0].token_ids
    for i in range(3):
        assert outs[f"dup{i}"].outputs[0].token_ids == expect
    assert sorted(samples["n3"]) == [0, 1, 2] and all(c.token_ids for c in samples["n3"].values())
    assert sum(o.num_cached_tokens > 0 for o in outs.values()) >= 8
    assert preempted, "the test should exercise preemption"
    assert block_pool(llm).get_num_free_blocks() == free0
    assert manager(llm).requests == {}


def test_chunked_prefill_eviction_neither_reads_nor_adds_to_the_cache(engine):
    """Requests that evict during chunked prefill rewrite pages in place: none of their pages is ever
    hashed and they get no hit, while an end-mode request on the same server reuses the prefix."""
    llm = engine("qwen2vl", MADAKV, **SMALL)
    chunked = greedy(8, madakv_prefill_eviction="chunked")
    hashed = []

    def note(llm):
        for rid in list(manager(llm).req_to_blocks):
            if rid.startswith("chunked-"):
                hashed.extend(b.block_id for b in manager(llm).req_to_blocks[rid] if b.block_hash is not None)

    outs = run(llm, {"chunked-q7": (question(7), chunked)}, note)
    outs |= run(llm, {"chunked-q8": (question(8), chunked)}, note)
    assert outs["chunked-q7"].num_cached_tokens == outs["chunked-q8"].num_cached_tokens == 0 and not hashed
    run(llm, {"end-q9": (question(9), greedy(8))})
    assert run(llm, {"end-q10": (question(10), greedy(8))})["end-q10"].num_cached_tokens > 0
