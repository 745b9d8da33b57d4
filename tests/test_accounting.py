"""The page contract shared by scheduler and workers: retained KV always fits the kept pages."""

from hypothesis import given, settings
from hypothesis import strategies as st

from madakv_vllm.accounting import aligned_pages, cdiv, plan_compression
from madakv_vllm.config import MadaKVConfig


def test_nothing_evicted_for_full_or_large_budget():
    assert plan_compression(MadaKVConfig(policy="full"), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=1.0), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=0.2, min_prompt_len=2000), 1000, 32) is None


def test_plan_and_freed_range():
    p = plan_compression(MadaKVConfig(budget=0.2, page_aligned=False), 700, 32)
    assert (p.budget, p.keep_pages, p.granule) == (140, 6, 1)
    assert p.freed_range(700, 32) == (6, 21)  # block 21 holds tokens 672..699 and the first decode tokens
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
    assert p.freed_range(732, 32) == (6, 22)


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
