"""Requests at the limits of the page contract, and compressed requests preempted and resumed
(in-process engines, CPU platform, fp32, vLLM's prefix caching on as by default).

A legal per-request setting whose compression would free no page runs as stock instead of
asking for more block-table entries than vLLM sized. A compressed request preempted mid-decode
resumes by recomputing its prompt and output: its hit never reaches past its prompt's observation
window, even where another request's hashed pages cover its prompt and output, and its chunks stop
where it was compressed, so it generates the tokens it generates when it is never preempted.
"""

import pytest
from conftest import mm_prompt, preempt, run_requests, words

SMALL = {"num_gpu_blocks_override": 1024}
RESUME = {"policy": "madakv", "budget": 0.2, "recompress_interval": 8}


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def block_pool(llm):
    return core(llm).scheduler.kv_cache_manager.block_pool


def greedy(n, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, ignore_eos=True, extra_args=extra or None)


def token_prompt(llm, n: int, seed: int) -> dict:
    ids = llm.get_tokenizer().encode(words(4 * n, seed))[:n]
    assert len(ids) == n
    return {"prompt_token_ids": ids}


run = run_requests


def all_pages_back(llm) -> bool:
    pool = block_pool(llm)
    return pool.get_num_free_blocks() == pool.num_gpu_blocks - 1


def test_unaligned_budget_near_one_runs_as_stock(engine):
    """1,000 prompt tokens at budget 0.998 unaligned: P = cdiv(998, 32) + 1 = 33 packed pages, more
    than the prompt's 31 full pages; the block list (32 + 33) outgrew the workers' table (64 at
    max_model_len 1024) and the engine died. Such a request now runs as stock."""
    llm = engine("qwen2vl", {"policy": "madakv", "budget": 0.2}, max_model_len=1024, **SMALL)
    prompt = token_prompt(llm, 1000, 1)
    extreme = run(llm, {"x": (prompt, greedy(24, madakv_page_aligned=False, madakv_budget=0.998))})["x"]
    full = run(llm, {"f": (prompt, greedy(24, madakv_policy="full"))})["f"]
    assert len(extreme.outputs[0].token_ids) == 24
    assert extreme.outputs[0].token_ids == full.outputs[0].token_ids
    assert all_pages_back(llm)


def _preempt(llm, name: str, reset_cache: bool) -> int:
    """Preempt running request ``name`` between two steps, as vLLM's scheduler does when the pool
    runs out (reset_cache: as ``reset_prefix_cache(reset_running_requests=True)``, which also
    empties the prefix cache). Returns the tokens it had generated."""
    sched = core(llm).scheduler
    req = next(r for r in sched.running if r.request_id == name or r.request_id.startswith(name + "-"))
    generated = req.num_output_tokens
    if reset_cache:
        assert sched.reset_prefix_cache(reset_running_requests=True)
    else:
        preempt(llm, req)
    return generated


def _spy_hits(llm) -> list:
    """(num_tokens, num_prompt_tokens, hit) of every prefix-cache lookup from now on."""
    kvm = core(llm).scheduler.kv_cache_manager
    seen = []
    lookup = kvm.get_computed_blocks

    def spy(request, *args, **kwargs):
        result = lookup(request, *args, **kwargs)
        seen.append((request.num_tokens, request.num_prompt_tokens, result[1]))
        return result

    kvm.get_computed_blocks = spy
    return seen


@pytest.mark.parametrize("hit_from", ["none", "own-prompt", "prompt-and-output"])
def test_a_resumed_compressed_request_generates_its_uninterrupted_tokens(engine, hit_from):
    """Preempted after 20 of 40 greedy tokens (re-compressed every 8), a compressed request resumes
    and generates exactly the tokens it generates alone. Its lookup on resumption finds nothing
    (the cache was reset), its own freed prompt pages, or pages of a policy-full request whose
    prompt is this prompt plus 24 of its output tokens: the hit stops at the prompt's end minus
    the window, though vLLM would give it up to num_tokens - 1."""
    llm = engine("qwen2vl", RESUME, max_model_len=2048, **SMALL)
    core(llm).scheduler.reset_prefix_cache()
    prompt = token_prompt(llm, 700, 5)
    n_prompt = len(prompt["prompt_token_ids"])
    alone = list(run(llm, {"alone": (prompt, greedy(40))})["alone"].outputs[0].token_ids)
    if hit_from == "prompt-and-output":
        cover = {"prompt_token_ids": prompt["prompt_token_ids"] + alone[:24]}
        run(llm, {"cover": (cover, greedy(2, madakv_policy="full"))})
    elif hit_from == "none":
        core(llm).scheduler.reset_prefix_cache()

    seen, preempted = _spy_hits(llm), []

    def on_step(step):
        sched = core(llm).scheduler
        req = next((r for r in sched.running if r.request_id.startswith("resumed")), None)
        if not preempted and req is not None and req.num_output_tokens >= 28 - 8 * (hit_from != "prompt-and-output"):
            preempted.append(_preempt(llm, "resumed", reset_cache=hit_from == "none"))

    out = run(llm, {"resumed": (prompt, greedy(40))}, on_step)["resumed"]
    assert preempted and preempted[0] < 40
    assert list(out.outputs[0].token_ids) == alone
    resumed_lookups = [s for s in seen if s[0] > s[1]]  # num_tokens > prompt: after the preemption
    assert resumed_lookups, "the request was not looked up again on resumption"
    for num_tokens, prompt_len, hit in resumed_lookups:
        assert prompt_len == n_prompt and hit <= n_prompt - RESUME.get("window", 32)
        if hit_from != "none":
            assert hit > 0  # its prompt pages were reused
    assert all_pages_back(llm)


def test_preempted_multimodal_request_resumes_with_its_tokens(engine):
    """The same with images, whose modality the resumed compression must see again."""
    llm = engine("qwen2vl", RESUME, max_model_len=2048, **SMALL)
    prompt = mm_prompt("qwen2vl", [words(200, 3), 0, words(150, 4), 1, words(60, 5)])
    alone = list(run(llm, {"mm-alone": (prompt, greedy(30))})["mm-alone"].outputs[0].token_ids)
    preempted = []

    def on_step(step):
        sched = core(llm).scheduler
        req = next((r for r in sched.running if r.request_id.startswith("mm-resumed")), None)
        if not preempted and req is not None and req.num_output_tokens >= 13:
            preempted.append(_preempt(llm, "mm-resumed", reset_cache=False))

    out = run(llm, {"mm-resumed": (prompt, greedy(30))}, on_step)["mm-resumed"]
    assert preempted and list(out.outputs[0].token_ids) == alone
    assert all_pages_back(llm)


def test_the_trim_is_what_limits_a_hit(engine):
    """Two prompts share their first 730 tokens and differ in their last 5: vLLM alone would reuse
    22 pages (704 tokens, as it does for a policy-full request), which would leave fewer than the
    window's 32 tokens to recompute. A compressed request's hit is trimmed to 21 pages (672 <=
    735 - 32), and it generates what the same request generates on an engine without caching."""
    llm = engine("qwen2vl", RESUME, max_model_len=2048, **SMALL)
    fresh = engine("qwen2vl", RESUME, max_model_len=2048, enable_prefix_caching=False, **SMALL)
    core(llm).scheduler.reset_prefix_cache()
    shared = token_prompt(llm, 740, 9)["prompt_token_ids"][:730]
    tail = token_prompt(llm, 20, 10)["prompt_token_ids"]
    first, second, third = ({"prompt_token_ids": shared + tail[i : i + 5]} for i in (0, 5, 10))
    run(llm, {"trim-first": (first, greedy(4))})
    full = run(llm, {"trim-full": (second, greedy(4, madakv_policy="full"))})["trim-full"]
    assert full.num_cached_tokens == 704  # vLLM's own hit: every full page of the shared prefix
    out = run(llm, {"trim-third": (third, greedy(24))})["trim-third"]
    assert out.num_cached_tokens == 672
    alone = run(fresh, {"trim-alone": (third, greedy(24))})["trim-alone"]
    assert alone.num_cached_tokens == 0 and out.outputs[0].token_ids == alone.outputs[0].token_ids


def test_a_seeded_request_over_several_prefill_steps_is_served(engine):
    """vLLM 0.32's CPU runner rewinds a seeded request's generator after each partial-prefill step
    with set_offset, which CPU generators lack: stock's engine dies on it ("CPU Generator does not
    use offset"). With madakv it is served, the same seed giving the same tokens."""
    from vllm import SamplingParams

    llm = engine("qwen2vl", RESUME, max_model_len=2048, **SMALL)
    prompt = token_prompt(llm, 1200, 11)  # three steps of 512 tokens
    sp = SamplingParams(max_tokens=12, temperature=0.8, seed=7, n=2)
    first = [list(c.token_ids) for c in run(llm, {"seeded-a": (prompt, sp)})["seeded-a"].outputs]
    again = [list(c.token_ids) for c in run(llm, {"seeded-b": (prompt, sp)})["seeded-b"].outputs]
    assert all(len(t) == 12 for t in first) and first == again
    assert all_pages_back(llm)
