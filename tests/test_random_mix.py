"""Random mixes of legal requests on one engine (in-process, CPU platform, fp32, prefix caching on,
a KV pool small enough to preempt): every policy, budgets from 1 token to more than the prompt,
``page_aligned`` both ways, windows, re-compression intervals, both prefill modes, prompt lengths up
to max_model_len, shared prefixes, n > 1, prompt logprobs and aborts (madakv_eval/random_mix.py).

Invariants: the engine never fails; at every step a worker's retained entries live only in pages
the scheduler still gives the request, none of them hashed, and where both sides have seen the same
length they hold the same plan; every page comes back; policy ``full`` gives stock's tokens; a greedy
request compressed at its prompt's end gives the tokens it gives alone on an empty engine (or first
differs at a tie within 1e-3: a preempted request recomputes its KV in other kernel calls).
CI runs ``CASES``; ``scripts/fuzz_engine.py --seeds FIRST LAST`` runs more.
"""

import os

import pytest
from conftest import preempt

from madakv_eval.random_mix import draw_mix, same_up_to_a_tie

CASES = [int(s) for s in os.environ.get("MADAKV_MIX_SEEDS", "0,1,2,3,4,5").split(",")]
MAX_MODEL_LEN = 1024
POOL = {"num_gpu_blocks_override": 66, "max_model_len": MAX_MODEL_LEN, "max_num_seqs": 16}


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def check_step(llm) -> int:
    """Scheduler/worker agreement after a step; returns the compressed requests checked."""
    from madakv_vllm.integration import per_head

    kvm = core(llm).scheduler.kv_cache_manager
    mgr = kvm.coordinator.single_type_managers[0]
    pool = kvm.block_pool
    checked = 0
    for st in per_head.STATES:
        for rid, rs in st.requests.items():
            plan = mgr.requests.get(rid)
            if plan is not None and plan.seen == rs.seen:
                assert (plan.plan, plan.event_len, plan.decided) == (rs.plan, rs.event_len, rs.decided), rid
            if not rs.is_compressed or rid not in mgr.req_to_blocks:
                continue
            held = {b.block_id for b in mgr.req_to_blocks[rid] if not b.is_null}
            used = rs.used_subblocks(st.bs)
            L, H = used.shape
            for l in range(L):
                for h in range(H):
                    for sub in rs.subblocks[l, h, : int(used[l, h])].tolist():
                        page = (sub // st.H) % st.cache.num_blocks
                        assert page in held, f"{rid}: layer {l} head {h} uses page {page}, freed by the scheduler"
                        assert pool.blocks[page].block_hash is None, f"{rid}: writes into hashed page {page}"
            checked += 1
    return checked


def run_mix(llm, mix) -> tuple[dict, int]:
    engine = llm.llm_engine
    vocab_outputs: dict = {}
    for r in mix.requests:
        engine.add_request(r.name, {"prompt_token_ids": r.prompt_token_ids}, r.sampling_params())
    aborts = {r.name: r.abort_at for r in mix.requests if r.abort_at is not None}
    step, checked = 0, 0
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                vocab_outputs[o.request_id] = o
        step += 1
        engine.abort_request([name for name, at in aborts.items() if at == step])
        if step in mix.preempt_at:
            preempt_one(llm, mix.rng)
        checked += check_step(llm)
        assert step < 20_000
    return vocab_outputs, checked


def preempt_one(llm, rng) -> None:
    sched = core(llm).scheduler
    if sched.running:
        preempt(llm, rng.choice(list(sched.running)))


def alone(llm, r):
    core(llm).scheduler.reset_prefix_cache()
    return llm.generate([{"prompt_token_ids": r.prompt_token_ids}], r.sampling_params(), use_tqdm=False)[0].outputs[0]


@pytest.mark.parametrize("seed", CASES)
def test_random_mix_keeps_every_invariant(engine, seed):
    llm = engine("qwen2vl", {"policy": "madakv", "budget": 0.2}, **POOL)
    stock = engine("qwen2vl", None, **POOL)
    sched = core(llm).scheduler
    preempted = []
    orig = sched._preempt_request
    sched._preempt_request = lambda request, *a, **k: (preempted.append(request.request_id), orig(request, *a, **k))[1]
    pool = sched.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    vocab = range(100, min(llm.get_tokenizer().vocab_size, 4000))
    mix = draw_mix(seed, vocab, MAX_MODEL_LEN, num_requests=20)
    try:
        outs, checked = run_mix(llm, mix)
    finally:
        sched._preempt_request = orig
    assert pool.get_num_free_blocks() == free0
    assert sched.kv_cache_manager.coordinator.single_type_managers[0].requests == {}
    assert checked > 0, "no compressed request was checked"
    finished = [r for r in mix.requests if r.abort_at is None or r.name in outs and outs[r.name].finished]
    for r in finished:
        if r.abort_at is None:
            assert r.name in outs and all(len(c.token_ids) == r.max_tokens for c in outs[r.name].outputs), r
    for r in finished:
        if not r.greedy or r.name not in outs:
            continue
        got = outs[r.name].outputs[0]
        if r.xargs["madakv_policy"] == "full":
            assert same_up_to_a_tie(got, alone(stock, r)), (r.name, r.xargs)
        elif r.end_mode:
            assert same_up_to_a_tie(got, alone(llm, r)), (r.name, r.xargs)
    assert pool.get_num_free_blocks() == free0
    print(f"seed {seed}: {len(mix.requests)} requests, {len(preempted)} preemptions, {checked} compressed-row checks")
