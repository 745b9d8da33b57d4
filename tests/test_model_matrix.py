"""The model matrix: tiny random-weight builds of the VLM families people serve (madakv_eval.zoo),
through vLLM's CPU platform, stock and with ``--attention-backend madakv`` (in-process engines).

For every family:
* only full-attention layers evict: their KV cache groups get our spec and manager, every other
  group (sliding window, chunked local, linear attention) is stock's, with stock's layers;
* policy ``full`` gives stock's greedy tokens (text, and each modality the family takes);
* madakv at 0.2 frees pages of the full-attention group(s) while every other group holds, step by
  step, exactly the pages stock holds for the same request;
* the modality array equals the processor's placeholders: each medium's embedding tokens are its
  own modality (image, video, audio), separators and text are text;
* every page returns to the pool.

One family's engines live for that family's tests only (the fixture is parametrized per module).
"""

import gc

import pytest
import torch
from conftest import assert_same_tokens, close_engine, ensure_expert_parallel_group, run_requests

from madakv_eval import zoo
from madakv_eval.prompts import words
from madakv_vllm.accounting import RequestPlan, cdiv
from madakv_vllm.config import MODALITY_IDS, TEXT

BLOCK = 32
FULL = {"madakv_policy": "full"}


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def kv_cache_config(llm):
    return core(llm).scheduler.kv_cache_manager.kv_cache_config


def managers(llm):
    return core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers


def held(llm, req_id: str) -> list[int]:
    """Pages the request holds in each KV cache group."""
    return [sum(not b.is_null for b in m.req_to_blocks.get(req_id, [])) for m in managers(llm)]


def free_blocks(llm) -> int:
    return core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def greedy(n: int, extra: dict | None = None, logprobs: int | None = None):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, logprobs=logprobs, extra_args=extra)


class Family:
    """One family's build and its two engines (stock; madakv at budget 0.2), made when first used."""

    def __init__(self, family: zoo.TinyFamily, path):
        self.family, self.path = family, path
        self._engines: dict[str, object] = {}
        self.free_at_start: dict[str, int] = {}

    def engine(self, which: str):
        if which not in self._engines:
            from vllm import LLM

            args = dict(model=str(self.path), enforce_eager=True, max_model_len=4096, block_size=BLOCK,
                        dtype=self.family.dtype, seed=0, max_num_batched_tokens=1024,
                        limit_mm_per_prompt={m: 2 for m in self.family.modalities}, **self.family.engine_kwargs)
            if which == "madakv":
                args.update(attention_backend="madakv", additional_config={"madakv": {"budget": 0.2}})
            ensure_expert_parallel_group()
            self._engines[which] = LLM(**args)
            self.free_at_start[which] = free_blocks(self._engines[which])
        return self._engines[which]

    @property
    def stock(self):
        return self.engine("stock")

    @property
    def ours(self):
        return self.engine("madakv")

    def prompt(self, parts):
        return self.family.module.prompt(parts)

    def short_prompts(self) -> list[dict]:
        """Text only, each modality alone between text, and all of them in one prompt."""
        media = [(m, i) for i, m in enumerate(self.family.modalities)]
        out = [self.prompt([words(40)])]
        out += [self.prompt([words(20, 1), item, words(30, 2)]) for item in media]
        if len(media) > 1:
            out.append(self.prompt([words(10, 3), *[p for item in media for p in (item, words(8, 4))]]))
        return out

    def long_prompt(self) -> dict:
        """~700 text tokens around one item of each modality: compressed at 0.2."""
        parts = [words(350)]
        for i, m in enumerate(self.family.modalities):
            parts += [(m, 10 + i), words(40, i)]
        return self.prompt(parts + [words(300, 5)])

    def close(self) -> None:
        for llm in self._engines.values():
            close_engine(llm)
        self._engines.clear()
        gc.collect()


@pytest.fixture(scope="module", params=zoo.FAMILY_NAMES)
def fam(request, tmp_path_factory):
    family = zoo.family(request.param)
    if family.stock_cpu_error:
        pytest.skip(f"stock vLLM 0.32 cannot serve {family.architecture} on its CPU platform: "
                    f"{family.stock_cpu_error}")
    path = family.module.build(tmp_path_factory.mktemp(family.name) / f"tiny-{family.name}", seed=0)
    f = Family(family, path)
    yield f
    f.close()


def test_only_full_attention_layers_evict(fam):
    """Our spec and manager on stock's full-attention groups, the same layers; every other group
    exactly stock's."""
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    from madakv_vllm.integration.kv_manager import MadaKVAttentionSpec, MadaKVManager

    stock, ours = kv_cache_config(fam.stock), kv_cache_config(fam.ours)
    assert len(stock.kv_cache_groups) == len(ours.kv_cache_groups)
    evicting = 0
    for s, o, m in zip(stock.kv_cache_groups, ours.kv_cache_groups, managers(fam.ours)):
        assert s.layer_names == o.layer_names
        if type(s.kv_cache_spec) is FullAttentionSpec:
            assert isinstance(o.kv_cache_spec, MadaKVAttentionSpec) and isinstance(m, MadaKVManager)
            evicting += 1
        else:
            assert o.kv_cache_spec == s.kv_cache_spec and not isinstance(m, MadaKVManager)
    assert evicting >= 1
    assert (len(stock.kv_cache_groups) > evicting) == fam.family.is_hybrid


def test_policy_full_gives_stocks_greedy_tokens(fam):
    prompts = fam.short_prompts()
    tol = 1e-4 if fam.family.dtype == "float32" else 2e-2
    a = fam.stock.generate(prompts, greedy(12, logprobs=2), use_tqdm=False)
    b = fam.ours.generate(prompts, greedy(12, FULL, logprobs=2), use_tqdm=False)
    for x, y in zip(a, b):
        assert x.prompt_token_ids == y.prompt_token_ids
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            for t in lx.keys() & ly.keys():
                assert abs(lx[t].logprob - ly[t].logprob) < tol


def test_madakv_frees_full_attention_pages_and_leaves_the_other_groups_as_stock(fam):
    from madakv_vllm.integration.kv_manager import MadaKVManager

    prompt = fam.long_prompt()
    trace = {}
    for which in ("stock", "madakv"):
        llm = fam.engine(which)
        steps = []

        def record(_step, llm=llm, steps=steps):
            rid = _internal_id(llm, "long")
            if rid is not None:
                steps.append(held(llm, rid))

        out = run_requests(llm, {"long": (prompt, greedy(6))}, on_step=record)
        assert len(out["long"].outputs[0].token_ids) == 6
        trace[which] = steps
    n = len(out["long"].prompt_token_ids)
    assert n > 600
    ours = [isinstance(m, MadaKVManager) for m in managers(fam.ours)]
    # with prefix caching the step that compresses the prompt takes fresh pages (accounting.py)
    fresh = max(RequestPlan(cfg=m.server_config, num_prompt_tokens=n, prefix_caching=m.enable_caching)
                .extra_pages(n, m.block_size) for m in managers(fam.ours) if isinstance(m, MadaKVManager))
    assert len(trace["stock"]) == len(trace["madakv"])
    for s, o in zip(trace["stock"], trace["madakv"]):
        for g, evicts in enumerate(ours):
            if evicts:
                assert o[g] <= s[g] + fresh
            else:
                assert o[g] == s[g], "a group madakv does not evict held other pages than stock's"
    last = trace["madakv"][-1]
    for g, m in enumerate(managers(fam.ours)):
        if ours[g]:  # 0.2 of the prompt's pages, plus at most two partly used pages
            assert last[g] <= cdiv(n, m.block_size) // 5 + 2 < trace["stock"][-1][g], (last, trace["stock"][-1])


def _internal_id(llm, prefix: str):
    ids = [r for r in core(llm).scheduler.requests if r == prefix or r.startswith(prefix + "-")]
    return ids[0] if ids else None


def test_modality_array_matches_the_processors_placeholders(fam):
    """The worker's modality array of each prompt against its token ids: each medium's embedding
    placeholder token is that modality, everything else text."""
    from madakv_vllm.integration import per_head

    llm = fam.ours
    ids = fam.family.module.embed_token_ids(llm.get_tokenizer())
    assert set(ids) == set(fam.family.modalities)
    modality_of = {tok: MODALITY_IDS[m] for m, tok in ids.items()}
    cases = {f"case{i}": p for i, p in enumerate(fam.short_prompts())}
    for name, p in cases.items():
        llm.llm_engine.add_request(name, p, greedy(8, FULL))
    checked, seen = set(), set()
    while llm.llm_engine.has_unfinished_requests():
        llm.llm_engine.step()
        for name in set(cases) - checked:
            rid = _internal_id(llm, name)
            states = [st for st in per_head.STATES if rid in st.requests]
            if not states:
                continue
            req = core(llm).scheduler.requests[rid]
            got = states[0].requests[rid].modality(req.num_prompt_tokens)
            expect = torch.tensor([modality_of.get(t, TEXT) for t in req.prompt_token_ids], dtype=torch.int8)
            assert torch.equal(got, expect), name
            seen |= {int(m) for m in expect.unique()}
            checked.add(name)
    assert checked == set(cases)
    assert seen == {TEXT} | {MODALITY_IDS[m] for m in fam.family.modalities}


def _pair_past_the_cap(fam, llm, block: int):
    """Two prompts that differ in their last words only, whose shared pages reach past the second's
    hit cap (its prompt's end minus the 32-token window, in whole pages): filler words move the
    shared part's end to just past a page boundary."""
    media = [(m, 20 + i) for i, m in enumerate(fam.family.modalities)]

    def pair(k):
        shared = [words(60, 8), *media, words(450 + k, 9)]
        return fam.prompt(shared + [words(4, 1)]), fam.prompt(shared + [words(4, 2)])

    def lengths(k):
        a, b = (llm.generate([p], greedy(1, FULL), use_tqdm=False)[0].prompt_token_ids for p in pair(k))
        return next(i for i, (x, y) in enumerate(zip(a, b)) if x != y), len(b)

    common0, _ = lengths(0)
    per_word = (lengths(20)[0] - common0) / 20  # tokens per filler word
    k = round((block - common0 % block) % block / per_word)
    for _ in range(12):
        common, n = lengths(k)
        if min(common, n - 1) // block > (n - 32) // block:
            llm.reset_prefix_cache()
            return (*pair(k), min(common, n - 1) // block * block)
        k += 1 if common % block > block // 2 else -1  # short of the boundary, or too far past it
    pytest.fail("no filler length puts the shared pages past the cap")


def test_a_capped_prefix_hit_is_exact(fam):
    """A compressed request's prefix-cache hit stops a window short of its prompt's end (it is
    looked up again with that cap, so a hybrid's other groups hold the pages the shorter hit
    needs, and they retained them there); its tokens equal the same request's without any hit."""
    llm = fam.ours
    block = managers(llm)[0].block_size
    first, second, stock_hit = _pair_past_the_cap(fam, llm, block)
    llm.generate([first], greedy(2, FULL), use_tqdm=False)
    b = llm.generate([second], greedy(12, logprobs=2), use_tqdm=False)[0]
    n = len(b.prompt_token_ids)
    if "linear" in fam.family.attention:
        # vLLM 0.32 keeps a linear-attention state only where a prefill chunk ended (the prompt's
        # last full page), past the cap: a compressed request finds none and recomputes
        assert b.num_cached_tokens == 0 and n - 32 < stock_hit
    else:
        assert 0 < b.num_cached_tokens <= n - 32 < stock_hit
    llm.reset_prefix_cache()
    alone = llm.generate([second], greedy(12, logprobs=2), use_tqdm=False)[0]
    assert alone.num_cached_tokens == 0
    assert_same_tokens(b.outputs[0], alone.outputs[0], fam.family.dtype)


def test_a_preempted_compressed_request_resumes_with_its_tokens(fam):
    """Preempted after 16 of 30 greedy tokens (re-compressed every 8), as vLLM's scheduler preempts,
    a compressed request resumes (its lookup may hit its own prompt's pages, a window short of its
    end: every group retained them there) and generates the tokens it generates uninterrupted
    (in bf16, up to a tie: ``assert_same_tokens``)."""
    from conftest import preempt

    llm = fam.ours
    prompt, params = fam.long_prompt(), greedy(30, {"madakv_recompress_interval": 8}, logprobs=2)
    llm.reset_prefix_cache()
    alone = run_requests(llm, {"alone": (prompt, params)})["alone"].outputs[0]
    preempted, hits = [], []
    kvm = core(llm).scheduler.kv_cache_manager
    lookup = kvm.get_computed_blocks

    def spy(request, *args, **kwargs):
        result = lookup(request, *args, **kwargs)
        hits.append((request.num_tokens > request.num_prompt_tokens, result[1]))
        return result

    def on_step(_step):
        req = next((r for r in core(llm).scheduler.running if r.request_id.startswith("resumed")), None)
        if not preempted and req is not None and req.num_output_tokens >= 16:
            preempted.append(req.num_output_tokens)
            preempt(llm, req)

    kvm.get_computed_blocks = spy
    try:
        out = run_requests(llm, {"resumed": (prompt, params)}, on_step)["resumed"]
    finally:
        del kvm.get_computed_blocks
    assert preempted and preempted[0] < 30
    assert_same_tokens(out.outputs[0], alone, fam.family.dtype)
    n = len(out.prompt_token_ids)
    resumed = [hit for after_prompt, hit in hits if after_prompt]
    assert resumed and all(hit <= n - 32 for hit in resumed)
    assert free_blocks(llm) == fam.free_at_start["madakv"]


def test_chunked_prefill_eviction_keeps_a_long_prompt_near_its_budget(fam):
    """``prefill_eviction: chunked`` on a prompt of three prefill chunks: compressed after each,
    the request never holds its whole prompt in the full-attention groups, and finishes."""
    from madakv_vllm.integration.kv_manager import MadaKVManager

    llm = fam.ours
    media = [(m, 30 + i) for i, m in enumerate(fam.family.modalities)]
    prompt = fam.prompt([words(900), *media, words(1400, 3)])
    peak = {}

    def record(_step):
        rid = _internal_id(llm, "chunked")
        if rid is not None:
            for g, n in enumerate(held(llm, rid)):
                peak[g] = max(peak.get(g, 0), n)

    out = run_requests(llm, {"chunked": (prompt, greedy(4, {"madakv_prefill_eviction": "chunked"}))}, record)
    n = len(out["chunked"].prompt_token_ids)
    assert n > 2048 and len(out["chunked"].outputs[0].token_ids) == 4
    for g, m in enumerate(managers(llm)):
        if isinstance(m, MadaKVManager):
            assert peak[g] < 0.75 * cdiv(n, m.block_size), (peak, n)


def test_every_page_returns(fam):
    from madakv_vllm.integration.kv_manager import MadaKVManager

    fam.ours.generate([fam.long_prompt(), *fam.short_prompts()], greedy(4), use_tqdm=False)
    assert free_blocks(fam.ours) == fam.free_at_start["madakv"]
    for m in managers(fam.ours):
        assert not any(m.req_to_blocks.values())
        if isinstance(m, MadaKVManager):
            assert m.requests == {}
