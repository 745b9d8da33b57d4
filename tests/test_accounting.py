"""The page contract shared by scheduler and workers: retained KV always fits the kept pages."""

from hypothesis import given, settings
from hypothesis import strategies as st

import pytest
import torch

from madakv_vllm.accounting import EventKind, RequestPlan, aligned_pages, cdiv, peak_pages, plan_compression
from madakv_vllm.config import MadaKVConfig


def test_nothing_evicted_for_full_or_large_budget():
    assert plan_compression(MadaKVConfig(policy="full"), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=1.0), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=0.2, min_prompt_len=2000), 1000, 32) is None


def test_plan_and_freed_range():
    p = plan_compression(MadaKVConfig(budget=0.2, page_aligned=False), 700, 32)
    assert (p.budget, p.keep_pages, p.granule) == (140, 6, 1)
    assert p.freed_runs(700, 32) == [(6, 21)]  # block 21 holds tokens 672..699 and the first decode tokens
    assert p.owned_blocks(700, 22, 32) == [0, 1, 2, 3, 4, 5, 21]
    # page-aligned (default): 700 = 21 pages + r = 28 tokens in the tail page; every head keeps
    # 28 + whole pages: (140 - 28) / 32 = 3.5 -> 4 pages, 156 tokens (<= 1.15 x 140), no slack page
    p = plan_compression(MadaKVConfig(budget=0.2), 700, 32)
    assert (p.budget, p.keep_pages, p.granule, p.offset(700)) == (156, 4, 32, 28)
    assert p.owned_blocks(700, 22, 32) == [0, 1, 2, 3, 21]


def test_aligned_pages_nearest_capped_at_slack_and_window():
    # nearest whole page for what does not fit in the tail page...
    assert aligned_pages(200, 0, 32, 32) == 6  # 6.25
    assert aligned_pages(210, 0, 32, 32) == 7  # 6.56, and 7 * 32 = 224 <= 1.15 * 210
    assert aligned_pages(200, 20, 32, 32) == 6  # (200 - 20) / 32 = 5.6
    # ...but never more than 15% above the budget: 50 tokens is 1.56 pages, 2 pages would be 1.28x
    assert aligned_pages(50, 0, 32, 32) == 1
    assert aligned_pages(60, 8, 32, 32) == 1  # 8 + 64 = 72 > 1.15 x 60: 8 + 32 = 40
    # ...and never below the window (+ sinks)
    assert aligned_pages(40, 0, 64, 32) == 2
    assert aligned_pages(40, 10, 64, 32) == 2  # 10 + 64 >= 64
    assert aligned_pages(50, 31, 32, 32) == 1  # 31 in the tail page < window: one page more (63 tokens)
    assert aligned_pages(32, 0, 32, 32) == 1 and aligned_pages(30, 30, 16, 32) == 0  # all in the tail page
    # nothing to free: no plan
    assert plan_compression(MadaKVConfig(budget=0.9), 100, 32) is None


def test_recompression_events():
    p = plan_compression(MadaKVConfig(budget=0.2, recompress_interval=16, page_aligned=False), 700, 32)
    assert [p.event_len(n) for n in (700, 715, 716, 731, 732)] == [700, 700, 716, 716, 732]
    assert p.freed_runs(732, 32) == [(6, 22)]


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(40, 5000),
    frac=st.floats(0.01, 0.99),
    bs=st.sampled_from([16, 32, 64, 128]),
    L=st.integers(1, 6),
    H=st.integers(1, 4),
    gen=st.integers(0, 300),
    interval=st.sampled_from([0, 16, 50]),
    aligned=st.booleans(),
    rnd=st.randoms(use_true_random=False),
)
def test_retained_entries_fit_owned_pages(n, frac, bs, L, H, gen, interval, aligned, rnd):
    """Any split of L*H*B entries over (layer, head) that the policies can produce (page-aligned:
    the tail share r plus whole sub-blocks), plus decode tokens, fits in the owned sub-blocks; the
    owned pages are exactly P + the tail and stay near the budget."""
    cfg = MadaKVConfig(budget=frac, recompress_interval=interval, page_aligned=aligned)
    plan = plan_compression(cfg, n, bs)
    if plan is None:
        return
    B, g = plan.budget, plan.granule
    assert B < n
    r = plan.offset(n)
    assert (B - r) % g == 0
    # random per-head counts (r + multiples of g) summing exactly to L*H*B, each within [r, n]
    counts = [r] * (L * H)
    for _ in range((L * H * (B - r)) // g):
        i = rnd.randrange(L * H)
        if counts[i] + g > n:
            i = counts.index(min(counts))
        counts[i] += g
    assert sum(counts) == L * H * B
    length = n + gen
    ev = plan.event_len(length)
    since = length - ev  # tokens appended since the last compression event
    if aligned and ev > n:  # re-compressed: each head now keeps r_T + whole pages (eviction.py)
        drop = (r - plan.offset(ev)) % g
        counts = [c - drop if c >= drop else c - drop + g for c in counts]
    num_blocks = cdiv(length, bs)
    owned = len(plan.owned_blocks(ev, num_blocks, bs))
    needed = sum(cdiv(c + since, bs) for c in counts)
    assert needed <= owned * L * H
    tail = num_blocks - ev // bs
    if aligned:  # P packed pages + the tail pages, P*bs + r within 15% of the budget (or the window)
        assert owned == plan.keep_pages + tail
        assert B <= 1.15 * cfg.budget_tokens(n) or plan.keep_pages == cdiv(max(cfg.window - r, 0), bs)
    else:  # one page of packing slack
        assert owned <= cdiv(B, bs) + 1 + tail


def test_chunked_kept_blocks_grow_from_the_previous_tail():
    cfg = MadaKVConfig(budget=0.25, prefill_eviction="chunked", recompress_interval=0)
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=1000)
    assert rp.advance(256, 32) is EventKind.CHUNK  # 8 pages, budget 64: keeps pages 0, 1
    assert rp.plan.kept_blocks() == (0, 1) and rp.plan.freed_runs(256, 32) == [(2, 8)]
    assert rp.advance(256, 32) is None  # a length seen already: nothing new
    assert rp.advance(512, 32) is EventKind.CHUNK  # budget 128 = 4 pages: 0, 1, then the old tail's 8, 9
    assert rp.plan.kept_blocks() == (0, 1, 8, 9) and rp.plan.freed_runs(512, 32) == [(2, 8), (10, 16)]
    assert rp.advance(1000, 32) is EventKind.PROMPT and rp.decided
    assert rp.plan.kept_blocks()[:4] == (0, 1, 8, 9) and rp.plan.budget == 8 + 32 * rp.plan.keep_pages
    assert rp.advance(1001, 32) is None  # no re-compression with interval 0
    end = RequestPlan(cfg=cfg.model_copy(update={"prefill_eviction": "end"}), num_prompt_tokens=1000)
    assert end.advance(512, 32) is None and end.advance(1000, 32) is EventKind.PROMPT
    assert end.plan.kept_blocks() == tuple(range(end.plan.keep_pages))


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(40, 6000),
    budget=st.one_of(st.floats(0.02, 0.9), st.integers(8, 400)),
    bs=st.sampled_from([16, 32, 64]),
    L=st.integers(1, 4),
    H=st.integers(1, 3),
    window=st.integers(1, 48),
    sinks=st.sampled_from([0, 4]),
    chunk=st.integers(1, 700),
    gen=st.integers(0, 120),
    interval=st.sampled_from([0, 16, 50]),
    min_prompt=st.sampled_from([0, 300]),
    rnd=st.randoms(use_true_random=False),
)
def test_chunked_eviction_page_contract(n, budget, bs, L, H, window, sinks, chunk, gen, interval, min_prompt, rnd):
    """Prefill in random chunks, then decode, through RequestPlan.advance (what both sides call)
    and the worker's per-head counts (eviction.chunk_counts): after every event each (layer, head)
    keeps r + whole sub-blocks, at least the window and sinks, never more than it holds, L*H*B in
    all; the pages the scheduler leaves are exactly the ones the workers pack into, they hold every
    entry, and the request never holds more than peak_pages (what admission reserves)."""
    from madakv_vllm.integration.eviction import chunk_counts

    cfg = MadaKVConfig(budget=budget, window=window, sink_tokens=sinks, recompress_interval=interval,
                       prefill_eviction="chunked", min_prompt_len=min_prompt)
    forced = window + sinks
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=n)
    lengths, t = [], 0
    while t < n:
        t = min(n, t + rnd.randint(max(1, chunk // 2), chunk))
        lengths.append(t)
    lengths += list(range(n + 1, n + gen + 1))
    peak = peak_pages(cfg, n, gen, bs, chunk)
    live: set[int] = set()
    lens = base = None  # [L, H] entries per (layer, head) once compressed
    prev = 0
    for T in lengths:
        live |= set(range(cdiv(prev, bs), cdiv(T, bs)))  # vLLM allocates the step's pages first
        assert len(live) <= peak, (len(live), peak)
        if lens is not None:
            lens = lens + (T - prev)
        prev_event = rp.event_len
        kind = rp.advance(T, bs)
        plan = rp.plan
        if kind is not None:
            r, g = plan.offset(T), plan.granule
            if lens is None:  # first compression: any split the policies can produce
                lo = cdiv(max(forced - r, 0), g)
                counts = [r + lo * g] * (L * H)
                for _ in range(L * H * (plan.keep_pages - lo)):
                    i = rnd.randrange(L * H)
                    if counts[i] + g > T:
                        i = counts.index(min(counts))
                    counts[i] += g
                lens = torch.tensor(counts).view(L, H)
            elif kind is EventKind.RECOMPRESS:
                drop = (base % g - r) % g
                lens = torch.where(base - drop >= 0, base - drop, base - drop + g)
            else:
                held = lens
                lens = chunk_counts(lens, lens - (T - prev_event), plan, forced)
                assert bool((lens <= held).all())
            if kind is EventKind.PROMPT:
                base = lens.clone()
            assert bool(((lens - r) % g == 0).all())
            if kind is not EventKind.RECOMPRESS:  # re-compression may cut up to a page below (eviction.py)
                assert int(lens.sum()) == L * H * plan.budget and bool((lens >= min(forced, T)).all())
            for first, last in plan.freed_runs(rp.event_len, bs):
                live -= set(range(first, last))
            assert live == set(plan.owned_blocks(rp.event_len, cdiv(T, bs), bs))
        if lens is not None:
            assert int(((lens + bs - 1) // bs).sum()) <= len(live) * L * H
        prev = T
    if plan is not None and base is not None:
        assert rp.decided and plan.comp_len == n and plan.budget <= 1.15 * cfg.budget_tokens(n) + bs


def test_fresh_pages_follow_the_prompt_and_shift_later_blocks():
    cfg = MadaKVConfig(budget=0.2, recompress_interval=16)
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=700, prefix_caching=True)
    assert rp.extra_pages(699, 32) == 0  # a prefill chunk before the prompt's end: stock's pages
    assert rp.extra_pages(700, 32) == 4  # the step that completes the prompt takes P = 4 fresh pages
    assert rp.max_cache_hit(700, 32) == 700 - cfg.window and rp.max_cached_tokens(32) is None
    assert rp.advance(700, 32) is EventKind.PROMPT
    p = rp.plan  # 700 = 21 full pages + 28 tokens: list [0..20 prompt, 21 tail, 22..25 fresh, decode...]
    assert p.fresh_at == 22 and p.kept_blocks() == (22, 23, 24, 25)
    assert p.freed_runs(700, 32) == [(0, 21)]  # every full prompt page (hashed), back to front by vLLM
    assert p.owned_blocks(700, 26, 32) == [21, 22, 23, 24, 25]  # the tail page and the fresh ones
    assert rp.max_cached_tokens(32) == 672  # never hashes past the prompt's full pages
    assert rp.extra_pages(701, 32) == 4 and p.block_index(21) == 21 and p.block_index(22) == 26
    # re-compression at 716: logical tail 22 is list index 26, after the fresh pages; the old tail goes
    assert rp.advance(716, 32) is EventKind.RECOMPRESS
    assert p.freed_runs(716, 32) == [(0, 22)] and p.owned_blocks(716, 27, 32) == [22, 23, 24, 25, 26]
    # chunked-prefill eviction packs in place: no fresh pages, no hits, nothing hashed
    chunked = RequestPlan(cfg=cfg.model_copy(update={"prefill_eviction": "chunked"}), num_prompt_tokens=700,
                          prefix_caching=True)
    assert chunked.extra_pages(700, 32) == 0 and chunked.max_cache_hit(700, 32) == 0
    assert chunked.max_cached_tokens(32) == 0
    # policy full and short prompts: stock's rules
    for c in (MadaKVConfig(policy="full"), MadaKVConfig(budget=0.2, min_prompt_len=1000)):
        rp = RequestPlan(cfg=c, num_prompt_tokens=700, prefix_caching=True)
        assert rp.extra_pages(700, 32) == 0 and rp.max_cache_hit(700, 32) is None
        rp.advance(700, 32)
        assert rp.max_cached_tokens(32) is None


@settings(max_examples=300, deadline=None)
@given(
    n=st.integers(40, 5000),
    budget=st.one_of(st.floats(0.02, 0.9), st.integers(8, 400)),
    bs=st.sampled_from([16, 32, 64]),
    L=st.integers(1, 4),
    H=st.integers(1, 3),
    window=st.integers(1, 48),
    chunk=st.integers(1, 700),
    hit_frac=st.floats(0, 1),
    gen=st.integers(0, 150),
    interval=st.sampled_from([0, 16, 50]),
    rnd=st.randoms(use_true_random=False),
)
def test_fresh_page_contract_with_prefix_caching(n, budget, bs, L, H, window, chunk, hit_frac, gen, interval, rnd):
    """With prefix caching, through what both sides call: a request that hits the cache (capped by
    max_cache_hit), prefills the rest in chunks and decodes. vLLM allocates cdiv(T, bs) +
    extra_pages(T) list entries and hashes full pages up to max_cached_tokens. Then: the pages the
    workers pack into are never hashed and never hit pages (shared with other requests); the hit
    leaves at least the window to recompute; the scheduler's leftover pages are exactly the ones
    the workers pack into, and they hold every entry."""
    cfg = MadaKVConfig(budget=budget, window=window, recompress_interval=interval)
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=n, prefix_caching=True)
    most = rp.max_cache_hit(n, bs)
    hit = int(hit_frac * (n - 1)) // bs * bs  # what vLLM's lookup found (whole pages, at most n - 1)
    if most is not None:
        hit = min(hit, most // bs * bs)
        assert n - hit >= window
    shared = set(range(hit // bs))  # hit pages: other requests may hold them
    hashed, freed, lengths, t = set(shared), set(), [], hit
    while t < n:
        t = min(n, t + rnd.randint(max(1, chunk // 2), chunk))
        lengths.append(t)
    lengths += list(range(n + 1, n + gen + 1))
    lens = base = None
    prev = hit
    for T in lengths:
        # allocate_slots: the block list only grows (freed entries stay null)...
        live = set(range(cdiv(T, bs) + rp.extra_pages(T, bs))) - freed
        cap = rp.max_cached_tokens(bs)
        hashed |= set(range(min(T, cap if cap is not None else T) // bs))  # ...hashed when scheduled
        if lens is not None:
            lens = lens + (T - prev)
        kind = rp.advance(T, bs)  # the step runs; the scheduler sees it at the next one
        plan = rp.plan
        if kind is not None:
            r, g = plan.offset(T), plan.granule
            if kind is EventKind.PROMPT:
                counts = [r] * (L * H)
                for _ in range(L * H * plan.keep_pages):
                    counts[rnd.randrange(L * H)] += g
                lens = base = torch.tensor(counts).view(L, H)
            else:
                drop = (base % g - r) % g
                lens = torch.where(base - drop >= 0, base - drop, base - drop + g)
            owned = set(plan.owned_blocks(rp.event_len, cdiv(T, bs) + rp.extra_pages(T, bs), bs))
            assert not owned & hashed and not owned & shared  # packed pages: private and never hashed
            for first, last in plan.freed_runs(rp.event_len, bs):
                freed |= set(range(first, last))
            live -= freed
            assert live == owned
        if lens is not None:
            assert int(((lens + bs - 1) // bs).sum()) <= len(live) * L * H
        prev = T
    if rp.plan is None:  # never compressed: cached as stock caches it
        assert rp.max_cached_tokens(bs) is None


def test_unaligned_compression_that_frees_no_page_does_not_happen():
    """Unaligned, P = cdiv(B, bs) + 1 packed pages: at 0.998 of a 1,000-token prompt that is 33
    pages of a 32-page prompt (more block-table entries than vLLM sized; the engine died), and at
    0.9 of 100 tokens 4 fresh pages + the tail against stock's 4. Both run as stock now."""
    assert plan_compression(MadaKVConfig(budget=0.998, page_aligned=False), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=0.9, page_aligned=False), 100, 32) is None
    p = plan_compression(MadaKVConfig(budget=0.9, page_aligned=False), 1000, 32)
    assert p.keep_pages == 30 < 1000 // 32


budgets = st.one_of(st.floats(0.001, 1.0), st.integers(1, 20_000))


@settings(max_examples=500, deadline=None)
@given(budget=budgets, aligned=st.booleans(), window=st.integers(1, 300), sinks=st.sampled_from([None, 0, 4, 64]),
       bs=st.sampled_from([16, 32, 64, 128]), max_len=st.integers(1, 16_384), data=st.data())
def test_every_compression_frees_a_page_and_fits_the_block_table(budget, aligned, window, sinks, bs, max_len, data):
    """For every per-request setting and prompt length up to max_model_len: a compression frees at
    least one page against stock, and with fresh pages (prefix caching) the block list never needs
    more entries than the workers' table holds (MadaKVAttentionSpec.max_num_blocks_per_req: twice
    stock's)."""
    n = data.draw(st.integers(1, max_len))
    gen = data.draw(st.integers(0, max_len - n))
    cfg = MadaKVConfig(budget=budget, page_aligned=aligned, window=window, sink_tokens=sinks)
    plan = plan_compression(cfg, n, bs)
    if plan is None:
        return
    stock = cdiv(n, bs)
    held = plan.keep_pages + (stock - n // bs)  # packed pages + the tail page
    assert held < stock
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=n, prefix_caching=True)
    assert rp.advance(n, bs) is EventKind.PROMPT
    last = rp.plan.block_index(cdiv(n + gen, bs) - 1)  # the block-list index of the last page
    assert last < 2 * cdiv(max_len, bs)
    assert rp.extra_pages(n + gen, bs) == plan.keep_pages < stock


@settings(max_examples=300, deadline=None)
@given(n=st.integers(33, 4000), out=st.integers(1, 500), budget=st.floats(0.05, 0.9),
       window=st.integers(1, 64), chunked=st.booleans())
def test_a_resumed_request_never_hits_past_its_prompt(n, out, budget, window, chunked):
    """A preempted request resumes with its generated tokens in ``num_tokens``; another request's
    hashed pages may cover them (a policy-full request whose prompt is this prompt plus this
    output). The hit must still leave the prompt's last ``window`` tokens to recompute, so the
    prompt's compression runs in a step the workers compute (no hit at all in chunked mode)."""
    cfg = MadaKVConfig(budget=budget, window=window, prefill_eviction="chunked" if chunked else "end")
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=n, prefix_caching=True)
    most = rp.max_cache_hit(n + out, 32)
    if chunked:
        assert most == 0
    elif rp.prompt_plan(32) is None:
        assert most is None  # never compressed: stock's rule
    else:
        assert most == max(n - window, 0) and most < n


def test_chunks_stop_where_the_request_was_compressed():
    """A resumed request replays prompt + output; every chunk stops at the prompt's end, then at
    each re-compression, so it is compressed at the same lengths as before its preemption."""
    cfg = MadaKVConfig(budget=0.2, recompress_interval=32)
    rp = RequestPlan(cfg=cfg, num_prompt_tokens=1000)
    assert rp.chunk_limit(0, 32) == 1000 and rp.chunk_limit(968, 32) == 1000
    assert rp.chunk_limit(1000, 32) == 1032 and rp.chunk_limit(1031, 32) == 1032 and rp.chunk_limit(1032, 32) == 1064
    no_recompress = RequestPlan(cfg=cfg.model_copy(update={"recompress_interval": 0}), num_prompt_tokens=1000)
    assert no_recompress.chunk_limit(500, 32) == 1000 and no_recompress.chunk_limit(1000, 32) is None
    never = RequestPlan(cfg=cfg.model_copy(update={"policy": "full"}), num_prompt_tokens=1000)
    assert never.chunk_limit(1000, 32) is None


def test_a_request_past_its_prompt_at_once_is_decided_uncompressed_on_both_sides():
    """A resumed request its prompt does not compress (2 tokens, budget 2) may hit its own hashed
    output pages: the scheduler first sees the hit's length (64), the workers the step's end (67).
    A compression planned at either length would disagree; both decide as at the prompt: none."""
    cfg = MadaKVConfig(policy="snapkv", budget=2)
    scheduler, worker = (RequestPlan(cfg=cfg, num_prompt_tokens=2, prefix_caching=True) for _ in range(2))
    assert scheduler.max_cache_hit(67, 32) is None  # stock's rule: the hit may pass the prompt
    assert scheduler.advance(64, 32) is None and worker.advance(67, 32) is None
    assert scheduler.decided and worker.decided and scheduler.plan is worker.plan is None
    assert scheduler.advance(67, 32) is None and scheduler.advance(100, 32) is None
