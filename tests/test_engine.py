"""The plugin inside a real vLLM engine (in-process, shared engines; CPU platform).

Covers: selection by name, inertness without the flag, exactness of policy
``full`` against stock CPU_ATTN, modality provenance, pages really freed and
close to the budget, attention over the compacted cache equal to dense
attention over the retained tokens, per-request overrides, preemption, aborts
and the pool returning exactly to its start.
"""

import random

import pytest
import torch
from conftest import IMAGE_TOKEN, mm_prompt, run_requests, words

from madakv_vllm.accounting import cdiv
from madakv_vllm.config import IMAGE, TEXT
from madakv_eval.tiny_models import image_token_count

FULL = {"policy": "full"}


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def manager(llm):
    return core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers[0]


def free_blocks(llm) -> int:
    return core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def held_blocks(llm, req_id: str) -> int:
    return sum(not b.is_null for b in manager(llm).req_to_blocks.get(req_id, []))


def internal_id(llm, prefix: str) -> str:
    ids = [r for r in core(llm).scheduler.requests if r.startswith(prefix + "-") or r == prefix]
    assert len(ids) == 1, ids
    return ids[0]


def greedy(n=12, logprobs=1, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, logprobs=logprobs, extra_args=extra or None)


def mixed_batch(kind):
    if kind in ("llama", "qwen2"):
        return [{"prompt": words(n, s)} for s, n in [(0, 5), (1, 300), (2, 900), (3, 40)]]
    return [
        mm_prompt(kind, [words(30)]),
        mm_prompt(kind, [0, words(40, 1)]),
        mm_prompt(kind, [words(20, 2), 1, words(200, 3), 2, words(10), 3]),
        mm_prompt(kind, [words(600, 4)]),
        mm_prompt(kind, [4, 5, words(50, 5)]),
    ]


# --- selection, inertness, exactness -------------------------------------------------


def test_backend_selected_by_name_and_inert_without_flag(engine):
    from madakv_vllm.integration.kv_manager import MadaKVAttentionSpec, MadaKVManager

    stock, ours = engine("qwen2vl"), engine("qwen2vl", FULL)
    runner = lambda llm: core(llm).model_executor.driver_worker.worker.model_runner  # noqa: E731
    assert runner(stock).attn_groups[0][0].backend.get_name() == "CPU_ATTN"
    assert type(manager(stock)).__name__ == "FullAttentionManager"
    assert type(manager(stock).kv_cache_spec).__name__ == "FullAttentionSpec"
    assert runner(ours).attn_groups[0][0].backend.get_name() == "MADAKV"
    assert isinstance(manager(ours), MadaKVManager)
    assert isinstance(manager(ours).kv_cache_spec, MadaKVAttentionSpec)
    assert core(ours).scheduler.kv_cache_manager.enable_caching  # prefix caching stays on (vLLM's default)


@pytest.mark.parametrize("kind", ["qwen2vl", "llava", "llama"])
def test_full_policy_equals_stock(engine, kind):
    stock, ours = engine(kind), engine(kind, FULL)
    batch = mixed_batch(kind)
    a = stock.generate(batch, greedy(16, logprobs=3), use_tqdm=False)
    b = ours.generate(batch, greedy(16, logprobs=3), use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            for t in lx:
                assert abs(lx[t].logprob - ly[t].logprob) < 1e-4


# --- provenance ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["qwen2vl", "llava"])
def test_modality_provenance_from_placeholders(engine, kind):
    from madakv_vllm.integration import per_head

    llm = engine(kind, FULL)
    tok = llm.get_tokenizer()
    image_id = tok.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    cases = {
        "none": [words(20)],
        "one-start": [0, words(20)],
        "one-middle": [words(10), 1, words(10)],
        "one-end": [words(20), 2],
        "several": [3, words(5), 4, 5, words(8), 6],
    }
    sp = greedy(30)
    for name, parts in cases.items():
        llm.llm_engine.add_request(name, mm_prompt(kind, parts), sp)
    checked = set()
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        for name in set(cases) - checked:
            rid = internal_id(llm, name)
            states = [st for st in per_head.STATES if rid in st.requests]
            if not states:
                continue  # not scheduled yet
            req = core(llm).scheduler.requests[rid]
            got = states[0].requests[rid].modality(req.num_prompt_tokens)
            expect = torch.tensor([IMAGE if t == image_id else TEXT for t in req.prompt_token_ids], dtype=torch.int8)
            assert torch.equal(got, expect), name
            n_images = sum(isinstance(p, int) for p in cases[name])
            assert int((expect == IMAGE).sum()) == n_images * image_token_count(kind, 64, 64)
            checked.add(name)
    assert checked == set(cases)


# --- eviction ------------------------------------------------------------------------------


_run = run_requests


def test_pages_freed_close_to_budget(engine):
    """Issue 4.2: after compression a request holds at most 1.15 x budget x stock plus one partly
    filled page, exactly the count madakv_vllm/accounting.py predicts (page-aligned budgets:
    P packed pages + the tail; unaligned: one more page of packing slack)."""
    from madakv_vllm.accounting import plan_compression
    from madakv_vllm.config import MadaKVConfig

    llm = engine("qwen2vl", FULL)
    free0 = free_blocks(llm)
    long = mm_prompt("qwen2vl", [0, words(900), 1, 2, words(900, 1), 3])
    short = mm_prompt("qwen2vl", [0, words(450), 1, words(420, 1)])
    cases = {  # name: (prompt, budget, overrides)
        "b20": (long, 0.2, {"policy": "snapkv"}),
        "b10": (long, 0.1, {"policy": "madakv"}),
        "b05": (long, 0.05, {"policy": "adakv"}),
        "u10": (long, 0.1, {"policy": "madakv", "page_aligned": False}),
        "s10": (short, 0.1, {"policy": "madakv"}),
        "s05": (short, 0.05, {"policy": "pyramidkv"}),
    }
    reqs = {n: (p, greedy(8, madakv_budget=b, **{"madakv_" + k: v for k, v in o.items()})) for n, (p, b, o) in cases.items()}
    reqs["full"], reqs["sfull"] = (long, greedy(8)), (short, greedy(8))
    held = {}

    def record(step):
        for name in reqs:
            ids = [r for r in manager(llm).req_to_blocks if r.startswith(name + "-")]
            if ids:
                held.setdefault(name, []).append(held_blocks(llm, ids[0]))

    outs = _run(llm, reqs, record)
    for name, (prompt, frac, over) in cases.items():
        full = "full" if prompt is long else "sfull"
        c = len(outs[name].prompt_token_ids)
        stock, after = held[full][-1], held[name][-1]  # same prompt, same step: same length
        assert max(held[name]) >= cdiv(c, 32)  # admission still needs the whole prompt
        plan = plan_compression(MadaKVConfig(budget=frac, **over), c, 32)
        assert after == plan.keep_pages + stock - c // 32, (name, after, plan)  # P + the tail pages
        peak = held[name].index(max(held[name]))  # the whole prompt, just before compression
        first = next(x for x in held[name][peak:] if x < max(held[name]))  # right after it
        if over.get("page_aligned", True):
            assert first <= 1.15 * frac * cdiv(c, 32) + 1, (name, first, c)
        else:  # exact budgets: one more page of packing slack
            assert first == cdiv(plan.budget, 32) + 1 + 1, (name, first, plan)
    assert free_blocks(llm) == free0


def test_compacted_attention_equals_dense_reference(engine):
    """Kernel over compacted pages == fp32 softmax attention over exactly the retained tokens,
    through chunked prefill, compression, 40 decode steps and re-compression."""
    from madakv_vllm.integration import verify

    llm = engine("qwen2vl", FULL)
    verify.start(llm)  # empties the prefix cache: hits are checked against the shadow's own records
    try:
        reqs = {}
        for i, pol in enumerate(["madakv", "snapkv", "pyramidkv", "adakv", "h2o", "lookm", "streamingllm", "full"]):
            prompt = mm_prompt("qwen2vl", [words(100 + 60 * i, i), i, words(300, i + 1), i + 1])
            extra = {"madakv_policy": pol, "madakv_budget": 0.25, "madakv_recompress_interval": 16}
            if pol == "streamingllm":
                extra["madakv_sink_tokens"] = 4
            reqs[pol] = (prompt, greedy(40, **extra))
        growth = []

        def bounded(step):  # never more than budget + interval entries per head
            from madakv_vllm.integration import per_head

            for st in per_head.STATES:
                for rs in st.requests.values():
                    if rs.is_compressed:
                        growth.append(int((rs.lens - rs.base_counts).max()))

        outs = _run(llm, reqs, bounded)
    finally:
        verify.ENABLED = False
    assert len(outs) == len(reqs)
    # page-aligned re-compression may also drop up to a page below the base (its tail-page share
    # moves with the event's length, accounting.py), never above it
    assert growth and max(growth) <= 16 and min(growth) > -32
    assert verify.SHADOW.compressed_checked > 1000
    assert verify.SHADOW.max_err < 1e-4, verify.SHADOW.max_err


def test_chunked_eviction_attention_equals_dense_reference_after_every_chunk(engine):
    """prefill_eviction 'chunked', prompts of 4-6 chunks of 512: every chunk after the first
    compression attends over the compacted cache plus itself, and equals fp32 attention over exactly
    the retained tokens (then decoding and re-compression as before); while prefilling, a request
    never holds more pages than accounting.peak_pages (what admission reserves), and far fewer than
    stock; every page comes back."""
    from madakv_vllm.accounting import peak_pages
    from madakv_vllm.integration import per_head, verify

    llm = engine("qwen2vl", FULL)
    free0 = free_blocks(llm)
    verify.start(llm)  # empties the prefix cache: hits are checked against the shadow's own records
    peaks, chunk_events = {}, []
    try:
        reqs = {}
        for i, pol in enumerate(["madakv", "snapkv", "pyramidkv", "adakv", "h2o", "lookm", "streamingllm"]):
            prompt = mm_prompt("qwen2vl", [words(700 + 90 * i, i), i, words(1200, i + 1), i + 1, words(200, i)])
            extra = {"madakv_policy": pol, "madakv_budget": 0.2, "madakv_recompress_interval": 16,
                     "madakv_prefill_eviction": "chunked"}
            reqs[pol] = (prompt, greedy(24, **extra))

        def observe(step):
            for rid, plan in manager(llm).requests.items():
                if not plan.decided:
                    held = held_blocks(llm, rid)
                    peaks[rid] = max(peaks.get(rid, 0), held)
                    cap = peak_pages(plan.cfg, plan.num_prompt_tokens, 0, 32, 512)
                    assert held <= cap, (rid, held, cap)
            for st in per_head.STATES:
                chunk_events.extend(rs.req_id for rs in st.requests.values() if rs.is_compressed and not rs.decided)

        outs = _run(llm, reqs, observe)
    finally:
        verify.ENABLED = False
    assert len(outs) == len(reqs) and all(len(o.outputs[0].token_ids) == 24 for o in outs.values())
    assert len(set(chunk_events)) == len(reqs)  # every request was compressed before its prompt ended
    assert verify.SHADOW.chunk_checked > 10_000, verify.SHADOW.chunk_checked
    assert verify.SHADOW.max_err < 1e-4, verify.SHADOW.max_err
    for o in outs.values():  # ~0.2 x the prompt + one 512-token chunk, vs the whole prompt
        n = len(o.prompt_token_ids)
        assert max(p for r, p in peaks.items() if r.startswith(o.request_id)) < 0.6 * cdiv(n, 32)
    assert free_blocks(llm) == free0


def test_chunked_mode_is_end_mode_for_a_one_chunk_prompt(engine):
    """A prompt that fits one chunk is compressed once, at its end, exactly as in 'end' mode."""
    llm = engine("qwen2vl", FULL)
    prompt = mm_prompt("qwen2vl", [words(200), 1, words(100, 2)])
    outs = [llm.generate([prompt], greedy(20, madakv_budget=0.2, madakv_prefill_eviction=mode), use_tqdm=False)[0]
            for mode in ("end", "chunked")]
    assert outs[0].outputs[0].token_ids == outs[1].outputs[0].token_ids


def test_every_policy_changes_the_kept_set_but_not_the_first_token(engine):
    """The first generated token comes from the full prefill; later ones attend the compressed cache."""
    llm = engine("qwen2vl", FULL)
    prompt = mm_prompt("qwen2vl", [0, words(700), 1, words(300, 2)])
    base = llm.generate([prompt], greedy(12), use_tqdm=False)[0].outputs[0]
    for pol in ["madakv", "snapkv", "h2o", "streamingllm"]:
        out = llm.generate([prompt], greedy(12, madakv_policy=pol, madakv_budget=0.05), use_tqdm=False)[0].outputs[0]
        assert out.token_ids[0] == base.token_ids[0]
        assert abs(list(out.logprobs[0].values())[0].logprob - list(base.logprobs[0].values())[0].logprob) < 1e-4


def test_invalid_request_args_rejected_engine_survives(engine):
    llm = engine("qwen2vl", FULL)
    prompt = mm_prompt("qwen2vl", [words(20)])
    for bad in [{"madakv_budget": 3.5}, {"madakv_policy": "random"}, {"madakv_windw": 3}]:
        with pytest.raises(Exception, match="madakv_"):
            llm.generate([prompt], greedy(4, **bad), use_tqdm=False)
    with pytest.raises(Exception, match="madakv_mpa_split: moved to madakv_experimental_mpa_split"):
        llm.generate([prompt], greedy(4, madakv_mpa_split="demand"), use_tqdm=False)
    assert len(llm.generate([prompt], greedy(4), use_tqdm=False)[0].outputs[0].token_ids) == 4
    # the readings kept for evaluation, per request: a compressed request runs them
    experimental = greedy(4, madakv_policy="madakv", madakv_budget=0.2, madakv_experimental_mpa_split="demand",
                          madakv_experimental_hcc_mode="global")
    long_prompt = mm_prompt("qwen2vl", [0, words(300)])
    assert len(llm.generate([long_prompt], experimental, use_tqdm=False)[0].outputs[0].token_ids) == 4


def test_offline_rejected_request_does_not_poison_the_next_with_its_image(engine):
    """LLM.generate: a request rejected after its image was processed must not leave the image in
    the front end's sender cache only (the next request with it would reach the engine as a bare
    reference and fail)."""
    llm = engine("qwen2vl", FULL)
    prompt = mm_prompt("qwen2vl", [77, words(20)])
    with pytest.raises(Exception, match="madakv_budget"):
        llm.generate([prompt], greedy(4, madakv_budget=3.5), use_tqdm=False)
    out = llm.generate([prompt], greedy(4), use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 4, out.finish_reason


def test_random_requests_aborts_preemption_no_leak(engine):
    """Hundreds of random requests (lengths, images, budgets, policies, eviction at the prompt's end
    or after every prefill chunk, aborts) in a small pool: preemption happens, every block comes
    back."""
    llm = engine("qwen2vl", FULL, num_gpu_blocks_override=96, max_model_len=2048, max_num_seqs=16)
    sched = core(llm).scheduler
    preempted = []
    orig = sched._preempt_request

    def counting(request, *a, **k):
        preempted.append(request.request_id)
        return orig(request, *a, **k)

    sched._preempt_request = counting
    free0 = free_blocks(llm)
    rng = random.Random(0)
    policies = ["madakv", "snapkv", "pyramidkv", "adakv", "h2o", "lookm", "streamingllm", "full", "full"]
    pending = []
    for i in range(200):
        parts = [words(rng.randrange(5, 500), i)]
        for _ in range(rng.randrange(0, 3)):
            parts.insert(rng.randrange(0, len(parts) + 1), rng.randrange(0, 50))
        extra = {"madakv_policy": rng.choice(policies), "madakv_budget": rng.choice([0.05, 0.1, 0.3, 64, 1.0]),
                 "madakv_recompress_interval": rng.choice([0, 8, 32]),
                 "madakv_prefill_eviction": rng.choice(["end", "chunked"])}
        pending.append((f"r{i}", mm_prompt("qwen2vl", parts), greedy(rng.randrange(1, 80), logprobs=None, **extra)))
    live, steps = [], 0
    while pending or llm.llm_engine.has_unfinished_requests():
        while pending and len(live) < 24:
            name, prompt, params = pending.pop()
            llm.llm_engine.add_request(name, prompt, params)
            live.append(name)
        for o in llm.llm_engine.step():
            if o.finished and o.request_id in live:
                live.remove(o.request_id)
        steps += 1
        if live and rng.random() < 0.08:
            victim = live.pop(rng.randrange(len(live)))
            llm.llm_engine.abort_request([victim])
        assert steps < 20_000
    sched._preempt_request = orig
    assert free_blocks(llm) == free0
    assert manager(llm).requests == {}
    assert preempted, "the test should exercise preemption"
    print(f"steps={steps} preempted={len(preempted)}")


def test_window_queries_are_the_last_prompt_queries(engine, monkeypatch):
    """At selection, each layer scores with the queries of the last W prompt tokens, including
    when the final prefill chunk is shorter than W (chunked prefill) or the prompt is one chunk."""
    from madakv_vllm.integration import per_head
    from madakv_vllm.integration.eviction import WorkerKV

    llm = engine("qwen2vl", FULL, enable_prefix_caching=False)  # a hit would leave only the window to compute
    seen = {}
    orig_after, orig_select = per_head.after_attention, WorkerKV.select_layer

    def after(batch, layer_idx, layer, query, *rest):
        seen["query"], seen["batch"] = query, batch
        return orig_after(batch, layer_idx, layer, query, *rest)

    checks = []

    def select(self, ev, layer):
        q = ev.req.queries[layer]
        row = [r for r in seen["batch"].query_rows if r[1] is ev.req][0]
        last = seen["query"][row[3] - 1]
        assert q is not None and q.shape[1] == min(ev.req.cfg.window, ev.length)
        assert torch.equal(q[:, -1], last)
        checks.append((ev.length, row[3] - row[2]))
        return orig_select(self, ev, layer)

    monkeypatch.setattr(per_head, "after_attention", after)
    monkeypatch.setattr(WorkerKV, "select_layer", select)
    tok = llm.get_tokenizer()
    # 512-token chunks: the first prompt ends with a chunk shorter than the window
    n_words = next(n for n in range(400, 700) if len(tok(mm_prompt("qwen2vl", [words(n)])["prompt"]).input_ids) % 512 in range(3, 20))
    prompts = [mm_prompt("qwen2vl", [words(n_words)]), mm_prompt("qwen2vl", [words(200, 1)])]
    for p in prompts:  # one at a time, so chunking is exactly 512-token steps
        llm.generate([p], greedy(3, madakv_policy="snapkv", madakv_budget=0.3), use_tqdm=False)
    chunk_lens = {q for _, q in checks}
    assert checks and min(chunk_lens) < 32 < max(chunk_lens)
