"""The page contract shared by scheduler and workers: retained KV always fits the kept pages."""

from hypothesis import given, settings
from hypothesis import strategies as st

from madakv_vllm.accounting import cdiv, plan_compression
from madakv_vllm.config import MadaKVConfig


def test_nothing_evicted_for_full_or_large_budget():
    assert plan_compression(MadaKVConfig(policy="full"), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=1.0), 1000, 32) is None
    assert plan_compression(MadaKVConfig(budget=0.2, min_prompt_len=2000), 1000, 32) is None


def test_plan_and_freed_range():
    p = plan_compression(MadaKVConfig(budget=0.2), 700, 32)
    assert (p.budget, p.keep_pages) == (140, 6)
    assert p.freed_range(700, 32) == (6, 21)  # block 21 holds tokens 672..699 and the first decode tokens
    assert p.owned_blocks(700, 22, 32) == [0, 1, 2, 3, 4, 5, 21]


def test_recompression_events():
    p = plan_compression(MadaKVConfig(budget=0.2, recompress_interval=16), 700, 32)
    assert [p.event_len(n) for n in (700, 715, 716, 731, 732)] == [700, 700, 716, 716, 732]
    assert p.freed_range(732, 32) == (6, 22)


@settings(max_examples=200, deadline=None)
@given(
    n=st.integers(40, 5000),
    frac=st.floats(0.01, 0.99),
    bs=st.sampled_from([32, 64, 128]),
    L=st.integers(1, 6),
    H=st.integers(1, 4),
    gen=st.integers(0, 300),
    interval=st.sampled_from([0, 16, 50]),
    data=st.data(),
)
def test_retained_entries_fit_owned_pages(n, frac, bs, L, H, gen, interval, data):
    """Any split of L*H*B entries over (layer, head), plus decode tokens, fits in the owned sub-blocks."""
    plan = plan_compression(MadaKVConfig(budget=frac, recompress_interval=interval), n, bs)
    if plan is None:
        return
    B = plan.budget
    # random per-head counts summing exactly to L*H*B, each within [1, n]
    counts = [1] * (L * H)
    for _ in range(L * H * B - L * H):
        i = data.draw(st.integers(0, L * H - 1))
        if counts[i] < n:
            counts[i] += 1
        else:
            counts[counts.index(min(counts))] += 1
    length = n + gen
    ev = plan.event_len(length)
    since = length - ev  # tokens appended since the last compression event
    num_blocks = cdiv(length, bs)
    owned = len(plan.owned_blocks(ev, num_blocks, bs))
    needed = sum(cdiv(c + since, bs) for c in counts)
    assert needed <= owned * L * H
    # and memory stays close to the budget: at most ceil(B/bs)+1 pages plus the decode tail
    assert owned <= cdiv(B, bs) + 1 + num_blocks - ev // bs
