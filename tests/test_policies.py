"""Policy library: hand-computed cases per policy, properties (budget exactness, window kept, quotas,
HCC feasibility), edge cases. Pure torch; no vLLM."""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from madakv_vllm.config import AUDIO, IMAGE, POLICIES, TEXT, VIDEO, MadaKVConfig
from madakv_vllm.config import NUM_MODALITIES
from madakv_vllm.policies import (
    FORCED,
    CompressionState,
    MadaKVPolicy,
    Policy,
    Ranking,
    apportion,
    make_policy,
    pool_scores,
    window_scores,
)

def hcc(mode: str) -> dict:
    """MadaKVConfig fields of an HCC reading: the paper's and the default at the top level, the
    readings kept for evaluation in the experimental block."""
    return {"hcc_mode": mode} if mode in ("streamed", "pyramid_uniform") else {"experimental": {"hcc_mode": mode}}


PROPS = settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow])
FEW = settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def qk_from_strengths(strengths, window, num_q_heads=1, d=4):
    """q/k for one KV head whose window attention on token i grows with strengths[i] (monotone:
    every window query has the same logit s_i on key i, so psi_i = exp(s_i) * const before the
    window). Strengths of window tokens are irrelevant (window is always kept)."""
    n = len(strengths)
    wq = min(window, n)
    k = torch.zeros(1, n, d)
    k[0, :, 0] = torch.tensor(strengths, dtype=torch.float32)
    q = torch.zeros(num_q_heads, wq, d)
    q[:, :, 0] = 2.0
    return q, k


def stack_heads(pairs):
    qs, ks = zip(*pairs)
    return torch.cat(qs, 0), torch.cat(ks, 0)


def random_layers(num_layers, num_kv_heads, group, n, window, d=4, seed=0, sharp=1.0):
    gen = torch.Generator().manual_seed(seed)
    wq = min(window, n)
    qs = [torch.randn(num_kv_heads * group, wq, d, generator=gen) * sharp for _ in range(num_layers)]
    ks = [torch.randn(num_kv_heads, n, d, generator=gen) * sharp for _ in range(num_layers)]
    return qs, ks


def run(cfg, qs, ks, modality, budget=None):
    pol = make_policy(cfg)
    n = ks[0].shape[1]
    b = cfg.budget_tokens(n) if budget is None else budget
    state = pol.begin(num_layers=len(ks), num_kv_heads=ks[0].shape[0], seq_len=n, modality=modality, budget=b)
    for l, (q, k) in enumerate(zip(qs, ks)):  # as the worker does: score every layer, then select
        pol.observe_layer(state, l, q, k)
    return pol.select_observed(state), state


def select_from_scores(cfg, psi, modality, budget, num_layers=1):
    """Drive the allocator from given scores [H, N] (the same for every layer; bypasses the scorer)."""
    pol = make_policy(cfg)
    h, n = psi.shape
    state = pol.begin(num_layers=num_layers, num_kv_heads=h, seq_len=n, modality=modality, budget=budget)
    kept = [pol.select_layer_scores(state, l, psi) for l in range(num_layers)]
    return kept, state


def as_lists(kept_layer):
    return [t.tolist() for t in kept_layer]


def reference_window_scores(q, k):
    """Loop reference for window_scores (no pooling)."""
    hq, wq, d = q.shape
    h, n, _ = k.shape
    g = hq // h
    psi = torch.zeros(h, n, dtype=torch.float64)
    for qh in range(hq):
        kh = qh // g
        for j in range(wq):
            pos = n - wq + j
            logits = (k[kh, : pos + 1].double() @ q[qh, j].double()) / math.sqrt(d)
            psi[kh, : pos + 1] += torch.softmax(logits, 0) / g
    return psi


def reference_demand(psi_row, groups, num_groups, theta):
    """Fewest best tokens of each group whose psi covers theta of the group's mass (python floats)."""
    out = []
    for m in range(num_groups):
        vals = sorted(((-float(psi_row[i]), i) for i in range(len(groups)) if groups[i] == m))
        vals = [-v for v, _ in vals]
        total = 0.0
        for v in vals:
            total += v
        target, acc, need = theta * total, 0.0, 0
        for v in vals:
            if acc < target:
                need += 1
            acc += v
        out.append(need)
    return out


def forced_set(n, window, sinks):
    return set(range(min(sinks, n))) | set(range(n - min(window, n), n))


# ---------------------------------------------------------------------------------------------
# apportion
# ---------------------------------------------------------------------------------------------


def test_apportion_hand_cases():
    big = torch.tensor([100, 100, 100])
    assert apportion(10, torch.tensor([1.0, 1, 1]), big).tolist() == [4, 3, 3]  # tie -> lower index
    assert apportion(10, torch.tensor([8.0, 1, 1]), torch.tensor([3, 10, 10])).tolist() == [3, 4, 3]
    assert apportion(5, torch.tensor([0.0, 0, 0]), big).tolist() == [2, 2, 1]  # no weight: even
    assert apportion(4, torch.tensor([1.0, 0, 0]), torch.tensor([1, 2, 5])).tolist() == [1, 2, 1]
    assert apportion(7, torch.tensor([3.0, 1]), torch.tensor([2, 9])).tolist() == [2, 5]
    rows = apportion(torch.tensor([6, 1]), torch.tensor([[1.0, 2.0], [1.0, 1.0]]), torch.tensor([[9, 9], [9, 9]]))
    assert rows.tolist() == [[2, 4], [1, 0]]
    with pytest.raises(ValueError):
        apportion(11, torch.tensor([1.0, 1.0]), torch.tensor([5, 5]))


@PROPS
@given(
    st.lists(st.tuples(st.floats(0, 100), st.integers(0, 20)), min_size=1, max_size=6),
    st.integers(0, 10**6),
)
def test_apportion_properties(items, seed):
    w = torch.tensor([a for a, _ in items], dtype=torch.float64)
    cap = torch.tensor([c for _, c in items])
    total = seed % (int(cap.sum()) + 1)
    x = apportion(total, w, cap)
    assert int(x.sum()) == total
    assert (x >= 0).all() and (x <= cap).all()
    assert torch.equal(x, apportion(total, w, cap))
    if w.sum() > 0 and (cap >= total).all():  # no cap can bind: within 1 of the exact share
        share = total * w / w.sum()
        assert ((x.double() - share).abs() < 1 + 1e-9).all()


# ---------------------------------------------------------------------------------------------
# scoring
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group,n,wq", [(1, 7, 3), (3, 5, 5), (2, 9, 1), (4, 6, 4)])
def test_window_scores_matches_loop_reference(group, n, wq):
    gen = torch.Generator().manual_seed(group * 100 + n)
    h, d = 2, 8
    q = torch.randn(h * group, wq, d, generator=gen)
    k = torch.randn(h, n, d, generator=gen)
    q0, k0 = q.clone(), k.clone()
    psi = window_scores(q, k, kernel_size=1)
    assert torch.equal(q, q0) and torch.equal(k, k0)  # inputs untouched
    assert psi.dtype == torch.float32 and psi.shape == (h, n)
    torch.testing.assert_close(psi.double(), reference_window_scores(q, k), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(psi.sum(1), torch.full((h,), float(wq)))  # each query's row sums to 1


def test_window_scores_uniform_causal():
    # q = 0: query at position p attends uniformly to p+1 keys.
    n, wq = 6, 3
    psi = window_scores(torch.zeros(2, wq, 4), torch.randn(1, n, 4), kernel_size=1)[0]
    expected = [sum(1 / (p + 1) for p in range(n - wq, n) if p >= i) for i in range(n)]
    torch.testing.assert_close(psi.double(), torch.tensor(expected, dtype=torch.float64))


def test_pooling_same_padding():
    x = torch.tensor([[0.0, 0, 5, 0, 0]])
    torch.testing.assert_close(pool_scores(x, 3, "avg"), torch.tensor([[0, 5 / 3, 5 / 3, 5 / 3, 0]]))
    torch.testing.assert_close(pool_scores(x, 3, "max"), torch.tensor([[0.0, 5, 5, 5, 0]]))
    # even kernel: (k-1)//2 = 1 left, k//2 = 2 right
    torch.testing.assert_close(pool_scores(x, 4, "avg"), torch.tensor([[1.25, 1.25, 1.25, 1.25, 0]]))
    assert pool_scores(x, 1) is x


# ---------------------------------------------------------------------------------------------
# hand-computed cases, one or more per policy
# ---------------------------------------------------------------------------------------------


def test_full_keeps_everything_whatever_the_budget():
    qs, ks = random_layers(2, 2, 2, 10, 4)
    kept, state = run(MadaKVConfig(policy="full", window=4), qs, ks, torch.zeros(10, dtype=torch.long), budget=3)
    assert state.budget == 10
    assert all(t.tolist() == list(range(10)) for layer in kept for t in layer)
    assert int(state.kept_counts.sum()) == 2 * 2 * 10


def test_snapkv_keeps_window_and_top_scores_per_head():
    s0 = [0, 5, 1, 4, 1, 3, 0, 2, 0, 0]
    s1 = [3, 0, 0, 0, 0, 0, 1, 2, 0, 0]
    q, k = stack_heads([qk_from_strengths(s0, 2), qk_from_strengths(s1, 2)])
    cfg = MadaKVConfig(policy="snapkv", window=2, kernel_size=1, budget=5)
    kept, state = run(cfg, [q], [k], torch.zeros(10, dtype=torch.long))
    assert as_lists(kept[0]) == [[1, 3, 5, 8, 9], [0, 6, 7, 8, 9]]
    assert state.kept_counts.tolist() == [[5, 5]]


def test_snapkv_ties_go_to_the_lower_index():
    psi = torch.tensor([[1.0, 2, 2, 2, 1, 0, 0]])
    kept, _ = select_from_scores(MadaKVConfig(policy="snapkv", window=2), psi, torch.zeros(7, dtype=torch.long), 4)
    assert kept[0][0].tolist() == [1, 2, 5, 6]


def test_streamingllm_sinks_and_recent():
    qs, ks = random_layers(1, 1, 1, 10, 2)
    mod = torch.zeros(10, dtype=torch.long)
    kept, _ = run(MadaKVConfig(policy="streamingllm", window=2, sink_tokens=2, budget=6), qs, ks, mod)
    assert kept[0][0].tolist() == [0, 1, 6, 7, 8, 9]
    kept, _ = run(MadaKVConfig(policy="streamingllm", window=2, sink_tokens=0, budget=4), qs, ks, mod)
    assert kept[0][0].tolist() == [6, 7, 8, 9]
    # by default StreamingLLM keeps its paper's 4 sinks (the budget is raised to hold sinks + window)
    kept, state = run(MadaKVConfig(policy="streamingllm", window=2, budget=4), qs, ks, mod)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 8, 9] and state.budget == 6


def test_h2o_heavy_hitters_plus_recent_share():
    # B = 6, recent share round(0.5 * 6) = 3 -> {9, 10, 11}; heavy 3 by unpooled attention.
    s = [5, 0, 4, 0, 3, 0, 2, 0, 1, 0, 9, 9]
    q, k = qk_from_strengths(s, 2, num_q_heads=2)
    cfg = MadaKVConfig(policy="h2o", window=2, budget=6, kernel_size=7)  # kernel ignored by h2o
    kept, _ = run(cfg, [q], [k], torch.zeros(12, dtype=torch.long))
    assert kept[0][0].tolist() == [0, 2, 4, 9, 10, 11]
    kept, _ = run(cfg.model_copy(update={"h2o_recent_ratio": 0.0}), [q], [k], torch.zeros(12, dtype=torch.long))
    assert kept[0][0].tolist() == [0, 2, 4, 6, 10, 11]  # only the window is recent


def test_pyramidkv_linear_layer_budgets():
    # E = B - W = 10, beta 2: 15, 11.67, 8.33, 5 -> largest remainder 15, 12, 8, 5 (+ window 4).
    cfg = MadaKVConfig(policy="pyramidkv", window=4, pyramid_beta=2.0, kernel_size=1)
    n = 40
    s = [float(i % 7) for i in range(n)]
    q, k = qk_from_strengths(s, 4)
    kept, state = run(cfg, [q] * 4, [k] * 4, torch.zeros(n, dtype=torch.long), budget=14)
    assert state.kept_counts[:, 0].tolist() == [19, 16, 12, 9]
    assert int(state.kept_counts.sum()) == 4 * 14
    order = sorted(range(n - 4), key=lambda i: (-s[i], i))
    for layer, extra in enumerate([15, 12, 8, 5]):
        assert kept[layer][0].tolist() == sorted(order[:extra] + [36, 37, 38, 39])


def test_pyramidkv_caps_at_prompt_length():
    # E = 14, beta 20, N = 28 = 2E: 27.3 and 0.7 -> layer 0 capped at N - W = 24, layer 1 takes 4.
    psi = torch.arange(28.0)[None]
    cfg = MadaKVConfig(policy="pyramidkv", window=4)
    _, state = select_from_scores(cfg, psi, torch.zeros(28, dtype=torch.long), 18, num_layers=2)
    assert state.kept_counts[:, 0].tolist() == [28, 8]


def test_pyramidkv_is_uniform_when_the_prompt_is_shorter_than_twice_the_budget():
    # As the reference (KVCache-Factory PyramidKVCluster): N = 20 < 2E = 28 -> SnapKV's uniform budget.
    psi = torch.arange(20.0)[None]
    cfg = MadaKVConfig(policy="pyramidkv", window=4)
    _, state = select_from_scores(cfg, psi, torch.zeros(20, dtype=torch.long), 18, num_layers=2)
    assert state.kept_counts[:, 0].tolist() == [18, 18]


def test_adakv_joint_topk_then_safeguard():
    # B = 6, W = 2 -> E = 4 content slots per head, 8 for the layer. Joint top-8: all in head 0
    # (c = [8, 0]); safeguard alpha 0.5: (1 - 0.5) * c + int(0.5 * 4) = [6, 2].
    head0 = [10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, 0]
    head1 = [0.5, 0.4, 0.3, 0.2, 0.1, 0.05, 0.04, 0.03, 0.02, 0.01, 0, 0]
    psi = torch.tensor([head0, head1])
    cfg = MadaKVConfig(policy="adakv", window=2, adakv_alpha=0.5)
    kept, state = select_from_scores(cfg, psi, torch.zeros(12, dtype=torch.long), 6)
    assert as_lists(kept[0]) == [[0, 1, 2, 3, 4, 5, 10, 11], [0, 1, 10, 11]]
    assert state.kept_counts.tolist() == [[8, 4]]
    # alpha 0: the unconstrained joint allocation
    kept, state = select_from_scores(cfg.model_copy(update={"adakv_alpha": 0.0}), psi, torch.zeros(12, dtype=torch.long), 6)
    assert state.kept_counts.tolist() == [[10, 2]]


def test_adakv_alpha_one_is_uniform():
    psi = torch.tensor([[10.0, 9, 8, 7, 0, 0], [1.0, 2, 3, 4, 0, 0]])
    cfg = MadaKVConfig(policy="adakv", window=2, adakv_alpha=1.0)
    kept, _ = select_from_scores(cfg, psi, torch.zeros(6, dtype=torch.long), 4)
    assert as_lists(kept[0]) == [[0, 1, 4, 5], [2, 3, 4, 5]]


def test_lookm_protects_text_then_best_visual():
    mod = torch.tensor([TEXT] * 4 + [IMAGE] * 6 + [TEXT] * 2)
    psi = torch.tensor([[0.0, 0, 0, 0, 1, 5, 2, 4, 3, 0, 9, 9]])
    cfg = MadaKVConfig(policy="lookm", window=2, h2o_recent_ratio=0.0)  # recent block = the window only
    kept, _ = select_from_scores(cfg, psi, mod, 8)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 5, 7, 10, 11]
    # LOOK-M's own recent block (H2O's, half the budget): 4 recent, then the 4 text tokens
    kept, _ = select_from_scores(cfg.model_copy(update={"h2o_recent_ratio": 0.5}), psi, mod, 8)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 8, 9, 10, 11]
    psi_text = torch.tensor([[1.0, 3, 2, 0, 9, 9, 9, 9, 9, 9, 0, 0]])
    kept, _ = select_from_scores(cfg, psi_text, mod, 4)  # 2 slots, 4 text tokens: best 2 text
    assert kept[0][0].tolist() == [1, 2, 10, 11]


def test_lookm_decodes_with_h2o_not_the_text_prior():
    """Generated tokens are text: a text prior at decode time would evict the prompt's images
    first. LOOK-M compresses the prompt only; its decode rule is the H2O rule it builds on."""
    mod = torch.tensor([TEXT] * 2 + [IMAGE] * 4 + [TEXT] * 6)  # 6 generated (text) entries at the end
    psi = torch.tensor([0.0, 0, 5, 4, 3, 2, 0, 0, 0, 0, 9, 9])
    pol = make_policy(MadaKVConfig(policy="lookm", window=2, h2o_recent_ratio=0.0))
    assert pol.recompress_scores(psi, mod, 5).tolist() == [2, 3, 4, 10, 11]


MPA_MOD = torch.tensor([TEXT] * 5 + [IMAGE] * 5 + [TEXT] * 2)
MPA_PSI = torch.tensor([[5.0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 9, 9]])


def test_madakv_mpa_splits_by_modality_mass():
    # slots 6 split 8:4 -> text 4, image 2.
    cfg = MadaKVConfig(policy="madakv", window=2, hcc=False, kernel_size=1)
    kept, _ = select_from_scores(cfg, MPA_PSI, MPA_MOD, 8)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 5, 6, 10, 11]
    # mpa off: plain top-6 over both modalities (here the same set: 5, then the 1s by index)
    kept, _ = select_from_scores(cfg.model_copy(update={"mpa": False}), MPA_PSI, MPA_MOD, 8)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 5, 6, 10, 11]


def test_madakv_mpa_gives_text_image_video_and_audio_each_their_share():
    """Four modalities, each its own group: 8 slots split by attention mass 8:4:2:2 -> 4, 2, 1, 1,
    the best-scored tokens within each. Plain top-8 keeps no audio token (its scores are flat and
    low); video and audio pooled as one group would keep two video tokens."""
    mod = torch.tensor([TEXT] * 4 + [IMAGE] * 4 + [VIDEO] * 4 + [AUDIO] * 4 + [TEXT] * 2)
    psi = torch.tensor([[4.0, 2, 1, 1, 2, 1, 0.5, 0.5, 1.5, 0.5, 0, 0, 0.5, 0.5, 0.5, 0.5, 9, 9]])
    cfg = MadaKVConfig(policy="madakv", window=2, hcc=False, kernel_size=1)
    kept, _ = select_from_scores(cfg, psi, mod, 10)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 4, 5, 8, 12, 16, 17]
    kept, _ = select_from_scores(cfg.model_copy(update={"mpa": False}), psi, mod, 10)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 8, 16, 17]
    pooled = torch.where(mod == AUDIO, VIDEO, mod)
    kept, _ = select_from_scores(cfg, psi, pooled, 10)
    assert kept[0][0].tolist() == [0, 1, 2, 3, 4, 5, 8, 9, 16, 17]


def test_madakv_mpa_differs_from_topk():
    psi = torch.tensor([[9.0, 8, 7, 6, 0.5, 0.4, 0.3, 0.2, 0, 0]])
    mod = torch.tensor([TEXT] * 4 + [IMAGE] * 4 + [TEXT] * 2)
    cfg = MadaKVConfig(policy="madakv", window=2, hcc=False)
    kept, _ = select_from_scores(cfg, psi, mod, 6)  # 4 slots: 30/31.4 -> text 4, image 0
    assert kept[0][0].tolist() == [0, 1, 2, 3, 8, 9]
    psi2 = torch.tensor([[3.0, 1, 1, 1, 3, 1, 1, 1, 0, 0]])
    kept, _ = select_from_scores(cfg, psi2, mod, 6)  # masses 6:6 -> 2 and 2
    assert kept[0][0].tolist() == [0, 1, 4, 5, 8, 9]


def test_madakv_hcc_demand_then_last_layer_absorbs():
    # theta 0.5: text [8,1,1,0,0] needs 1, image [3,3,0,0,0] needs 1 -> demand 2 + window 2 = 4.
    mod = torch.tensor([TEXT] * 5 + [IMAGE] * 5 + [TEXT] * 2)
    psi = torch.tensor([[8.0, 1, 1, 0, 0, 3, 3, 0, 0, 0, 1, 1]])
    cfg = MadaKVConfig(policy="madakv", window=2, min_per_head=2, theta=0.5, kernel_size=1)
    kept, state = select_from_scores(cfg, psi, mod, 6, num_layers=2)
    assert kept[0][0].tolist() == [0, 5, 10, 11]
    # last layer takes the remaining 12 - 4 = 8: MPA split of 6 by 10:6 -> 3.75/2.25 -> 4 and 2
    assert kept[1][0].tolist() == [0, 1, 2, 3, 5, 6, 10, 11]
    assert state.kept_counts.tolist() == [[4], [8]]
    assert state.phi.tolist() == [6.0, 8.0]


def test_madakv_hcc_clamps_greedy_layer_to_keep_later_layers_feasible():
    # Uniform psi: demand ~ 0.9 * 10 + 2 -> clipped 11; B = 4, total 8; layer 1 needs >= floor 2.
    psi = torch.ones(1, 12)
    cfg = MadaKVConfig(policy="madakv", window=2, kernel_size=1)
    _, state = select_from_scores(cfg, psi, torch.zeros(12, dtype=torch.long), 4, num_layers=2)
    assert state.kept_counts.tolist() == [[6], [2]]
    assert state.phi.tolist() == [4.0, 2.0]


def test_madakv_hcc_without_mpa_uses_one_group():
    mod = torch.tensor([TEXT] * 5 + [IMAGE] * 5 + [TEXT] * 2)
    psi = torch.tensor([[8.0, 1, 1, 0, 0, 3, 3, 0, 0, 0, 1, 1]])
    cfg = MadaKVConfig(policy="madakv", window=2, min_per_head=2, theta=0.5, mpa=False)
    kept, _ = select_from_scores(cfg, psi, mod, 6, num_layers=2)
    assert kept[0][0].tolist() == [0, 10, 11]  # 8 >= 0.5 * 16: one token
    # last layer: 12 - 3 = 9, i.e. 7 slots by plain top-k: 8, 3, 3, 1, 1, then the lowest-index zeros
    assert kept[1][0].tolist() == [0, 1, 2, 3, 4, 5, 6, 10, 11]


# ---------------------------------------------------------------------------------------------
# properties over all policies
# ---------------------------------------------------------------------------------------------


@st.composite
def scenarios(draw, policy=None):
    policy = policy or draw(st.sampled_from(POLICIES))
    n = draw(st.integers(1, 48))
    window = draw(st.integers(1, 10))
    present = draw(st.lists(st.sampled_from([TEXT, IMAGE, VIDEO, AUDIO]), min_size=1, max_size=4, unique=True))
    modality = torch.tensor(draw(st.lists(st.sampled_from(present), min_size=n, max_size=n)), dtype=torch.long)
    budget = draw(st.one_of(st.floats(0.01, 1.0), st.integers(1, 24)))
    cfg = MadaKVConfig(
        policy=policy,
        budget=budget,
        window=window,
        sink_tokens=draw(st.integers(0, 4)),
        kernel_size=draw(st.integers(1, 5)),
        pooling=draw(st.sampled_from(["avg", "max"])),
        theta=draw(st.sampled_from([0.1, 0.3, 0.5, 0.9, 1.0])),
        min_per_head=draw(st.one_of(st.none(), st.integers(1, 20))),
        mpa=draw(st.booleans()),
        hcc=draw(st.booleans()),
        **hcc(draw(st.sampled_from(["streamed", "global", "layer", "pyramid", "pyramid_uniform"]))),
        pyramid_beta=draw(st.floats(0.5, 30.0)),
        adakv_alpha=draw(st.floats(0.0, 1.0)),
        h2o_recent_ratio=draw(st.floats(0.0, 1.0)),
    )
    cfg = cfg.model_copy(update={"experimental": cfg.experimental.model_copy(
        update={"hcc_min_scale": draw(st.sampled_from([0.0, 0.0, 0.5, 1.0]))})})
    shape = dict(
        num_layers=draw(st.integers(1, 3)),
        num_kv_heads=draw(st.integers(1, 3)),
        group=draw(st.integers(1, 3)),
        seed=draw(st.integers(0, 2**16)),
        sharp=draw(st.sampled_from([0.3, 1.0, 4.0, 10.0])),
    )
    return cfg, modality, shape


def check_invariants(cfg, modality, shape):
    n = modality.numel()
    qs, ks = random_layers(shape["num_layers"], shape["num_kv_heads"], shape["group"], n, cfg.window,
                           seed=shape["seed"], sharp=shape["sharp"])
    kept, state = run(cfg, qs, ks, modality)
    big_l, h = shape["num_layers"], shape["num_kv_heads"]
    b = cfg.budget_tokens(n)
    assert state.budget == b
    total = sum(t.numel() for layer in kept for t in layer)
    assert total == big_l * h * b == int(state.kept_counts.sum())
    must = forced_set(n, cfg.window, cfg.sink_tokens)
    for l, layer in enumerate(kept):
        assert len(layer) == h
        for hh, t in enumerate(layer):
            assert t.dtype == torch.int64
            assert min(n, cfg.window) <= t.numel() <= n
            assert t.numel() == int(state.kept_counts[l, hh])
            assert torch.equal(t, torch.unique(t))  # sorted, unique
            assert int(t.min()) >= 0 and int(t.max()) < n
            assert must <= set(t.tolist())
            if b >= n:
                assert t.tolist() == list(range(n))
    kept2, _ = run(cfg, qs, ks, modality)
    assert all(torch.equal(a, c) for la, lc in zip(kept, kept2) for a, c in zip(la, lc))  # deterministic
    return kept, state, qs, ks


@pytest.mark.parametrize("policy", POLICIES)
@FEW
@given(data=st.data())
def test_invariants_every_policy(policy, data):
    check_invariants(*data.draw(scenarios(policy)))


@PROPS
@given(scenarios("madakv"))
def test_hcc_budget_feasible_layer_by_layer_and_demand_kept(scenario):
    cfg, modality, shape = scenario
    cfg = cfg.model_copy(update={"hcc": True, "hcc_mode": "streamed",
                                 "experimental": cfg.experimental.model_copy(update={"hcc_mode": None})})
    kept, state, qs, ks = check_invariants(cfg, modality, shape)
    n, big_l, h = modality.numel(), shape["num_layers"], shape["num_kv_heads"]
    event(f"keeps all: {state.keeps_all}")
    if state.keeps_all:
        return
    fl, f = state.floor, state.num_forced
    groups = state.group.tolist()
    num_groups = 4 if cfg.mpa else 1
    remaining = big_l * h * state.budget
    for l in range(big_l):
        counts = state.kept_counts[l]
        left = big_l - l - 1
        lo, hi = max(h * fl, remaining - left * h * n), min(h * n, remaining - left * h * fl)
        hi = max(lo, min(hi, int(cfg.hcc_max_scale * h * remaining / (h * (big_l - l)))))  # the greedy-layer cap
        if cfg.experimental.hcc_min_scale > 0:  # every layer's floor, reserved for the later ones too
            reserve = min(int(cfg.experimental.hcc_min_scale * h * state.budget), h * n)
            lo = max(lo, min(reserve, hi))
            hi = max(lo, min(hi, remaining - left * reserve))
        assert state.phi[l] == pytest.approx(remaining / (h * (big_l - l)))
        assert lo <= int(counts.sum()) <= hi
        assert ((counts >= fl) & (counts <= n)).all()
        psi = window_scores(qs[l], ks[l], cfg.kernel_size, cfg.pooling)
        raw = [f + sum(reference_demand(psi[hh], groups, num_groups, cfg.theta)) for hh in range(h)]
        want = [min(max(r, fl), n) for r in raw]
        if lo <= sum(want) <= hi:
            event("layer keeps its clipped demand")
            assert counts.tolist() == want
        else:
            event("layer total clamped for feasibility")
        for hh in range(h):
            kept_groups = [groups[i] for i in kept[l][hh].tolist()]
            per_group = [kept_groups.count(m) for m in range(num_groups)]
            assert sum(per_group) == int(counts[hh]) - f  # quotas sum to the head budget minus forced
            if int(counts[hh]) == raw[hh]:
                event("head keeps its raw demand")
                assert per_group == reference_demand(psi[hh], groups, num_groups, cfg.theta)
        remaining -= int(counts.sum())
        assert left * h * fl <= remaining <= left * h * n
    assert remaining == 0


def _water_filled(total: int, weight: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """The real-valued split apportion() rounds: proportional to weight, capped, excess re-split."""
    weight, cap = weight.double(), cap.double()
    share, free, left = torch.zeros_like(weight), torch.ones_like(weight, dtype=torch.bool), float(total)
    while free.any() and float(weight[free].sum()) > 0:
        s = torch.where(free, left * weight / weight[free].sum(), torch.zeros_like(weight))
        over = free & (s > cap)
        if not over.any():
            return torch.where(free, s, share)
        share[over], left, free = cap[over], left - float(cap[over].sum()), free & ~over
    return share


@PROPS
@given(scenarios("madakv"))
def test_mpa_quotas_by_mass_and_top_within_modality(scenario):
    cfg, modality, shape = scenario
    cfg = cfg.model_copy(update={"hcc": False, "mpa": True})
    kept, state, qs, ks = check_invariants(cfg, modality, shape)
    if state.keeps_all:
        return
    groups = state.group
    slots = state.budget - state.num_forced
    sizes = torch.bincount(groups, minlength=5)[:4]
    for l in range(len(ks)):
        psi = window_scores(qs[l], ks[l], cfg.kernel_size, cfg.pooling)
        for hh, t in enumerate(kept[l]):
            mask = torch.zeros(modality.numel(), dtype=torch.bool)
            mask[t] = True
            got = [int((mask & (groups == m)).sum()) for m in range(4)]
            assert sum(got) == slots
            mass = torch.tensor([float(psi[hh][groups == m].double().sum()) for m in range(4)])
            expected = apportion(slots, mass, sizes).tolist()
            if got != expected:  # allowed only for a float tie between largest remainders
                share = _water_filled(slots, mass, sizes)
                assert ((torch.tensor(got) - share).abs() < 1).all()
                frac = (share - share.floor())[[m for m in range(4) if got[m] != expected[m]]]
                assert float(frac.max() - frac.min()) < 1e-6
            for m in range(4):  # the kept tokens of a modality are its best-scored ones
                inm = groups == m
                if (mask & inm).any() and (~mask & inm).any():
                    assert psi[hh][mask & inm].min() >= psi[hh][~mask & inm].max()


@PROPS
@given(scenarios("pyramidkv"))
def test_pyramidkv_budgets_fall_with_depth(scenario):
    cfg, modality, shape = scenario
    cfg = cfg.model_copy(update={"pyramid_beta": max(cfg.pyramid_beta, 1.0)})
    _, state, _, _ = check_invariants(cfg, modality, shape)
    per_layer = state.kept_counts[:, 0].tolist()
    assert all(a >= c for a, c in zip(per_layer, per_layer[1:]))
    assert (state.kept_counts == state.kept_counts[:, :1]).all()  # same for every head of a layer


def test_layers_are_streamed_in_order():
    cfg = MadaKVConfig(policy="madakv", window=2, budget=5)
    qs, ks = random_layers(3, 2, 2, 12, 2)
    mod = torch.tensor([TEXT, IMAGE] * 6)
    kept, _ = run(cfg, qs, ks, mod)
    ks_other = ks[:2] + [torch.randn_like(ks[2])]
    kept_other, _ = run(cfg, qs, ks_other, mod)
    for l in range(2):  # earlier layers cannot depend on later ones
        assert all(torch.equal(a, c) for a, c in zip(kept[l], kept_other[l]))
    pol = make_policy(cfg)
    state = pol.begin(num_layers=3, num_kv_heads=2, seq_len=12, modality=mod, budget=5)
    with pytest.raises(ValueError):
        pol.select_layer(state, layer=1, query=qs[1], key=ks[1])


# ---------------------------------------------------------------------------------------------
# edge cases
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("policy", POLICIES)
def test_prompt_shorter_than_window_keeps_all(policy):
    cfg = MadaKVConfig(policy=policy, window=8, budget=0.2)
    qs, ks = random_layers(2, 2, 3, 5, 8)
    kept, state = run(cfg, qs, ks, torch.tensor([0, 1, 1, 0, 0]), budget=3)  # 3 < window: clamped
    assert state.budget == 5
    assert all(t.tolist() == [0, 1, 2, 3, 4] for layer in kept for t in layer)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize(
    "modality",
    [
        [TEXT] * 24,
        [IMAGE] * 24,
        [VIDEO] * 12 + [AUDIO] * 12,
        [TEXT] * 4 + [IMAGE] * 8 + [VIDEO] * 4 + [AUDIO] * 4 + [TEXT] * 4,
    ],
    ids=["all-text", "all-image", "video-audio", "four"],
)
def test_modality_mixes_one_kv_head(policy, modality):
    cfg = MadaKVConfig(policy=policy, window=4, budget=9, sink_tokens=1)
    qs, ks = random_layers(3, 1, 1, 24, 4, sharp=2.0)
    kept, state = run(cfg, qs, ks, torch.tensor(modality))
    b = 24 if policy == "full" else 9
    assert int(state.kept_counts.sum()) == 3 * b
    for layer in kept:
        assert {0, 20, 21, 22, 23} <= set(layer[0].tolist())


def test_budget_fraction_and_tokens_agree():
    qs, ks = random_layers(2, 2, 2, 40, 4)
    mod = torch.tensor([TEXT] * 20 + [IMAGE] * 20)
    a, sa = run(MadaKVConfig(window=4, budget=0.25), qs, ks, mod)
    b, sb = run(MadaKVConfig(window=4, budget=10), qs, ks, mod)
    assert sa.budget == sb.budget == 10
    assert all(torch.equal(x, y) for la, lb in zip(a, b) for x, y in zip(la, lb))


def test_select_all_matches_streaming_calls():
    cfg = MadaKVConfig(policy="adakv", window=3, budget=0.3)
    qs, ks = random_layers(3, 2, 2, 30, 3)
    mod = torch.tensor([TEXT, IMAGE, IMAGE] * 10)
    pol = make_policy(cfg)
    out = pol.select_all(qs, ks, mod, cfg.budget_tokens(30))
    kept, _ = run(cfg, qs, ks, mod)
    assert all(torch.equal(x, y) for la, lb in zip(out, kept) for x, y in zip(la, lb))
    assert isinstance(pol, Policy) and isinstance(pol.last_state, CompressionState)


def test_bad_inputs_raise():
    pol = make_policy(MadaKVConfig())
    with pytest.raises(ValueError):
        pol.begin(num_layers=1, num_kv_heads=1, seq_len=3, modality=torch.tensor([0, 1, 4]), budget=2)
    with pytest.raises(ValueError):
        pol.begin(num_layers=1, num_kv_heads=1, seq_len=3, modality=torch.tensor([0, 1]), budget=2)
    state = pol.begin(num_layers=1, num_kv_heads=2, seq_len=3, modality=torch.tensor([0, 1, 0]), budget=2)
    with pytest.raises(ValueError):
        pol.select_layer(state, layer=0, query=torch.zeros(2, 3, 4), key=torch.zeros(1, 3, 4))


# ---------------------------------------------------------------------------------------------
# decode-time re-compression
# ---------------------------------------------------------------------------------------------


def _decode_policy(name, **knobs):
    return make_policy(MadaKVConfig(policy=name, window=2, **knobs))


# Scores of 12 retained entries (window = the last 2) and their modalities.
RE_PSI = torch.tensor([5.0, 1, 1, 1, 0, 1, 1, 1, 1, 0, 9, 9])
RE_MOD = torch.tensor([TEXT] * 5 + [IMAGE] * 5 + [TEXT] * 2)


@pytest.mark.parametrize("name, knobs, keep, expected", [
    # MadaKV: MPA's split of keep - window by modality mass (text 8, image 4 -> 4 + 2), best of each.
    ("madakv", {}, 8, [0, 1, 2, 3, 5, 6, 10, 11]),
    ("madakv", {"hcc": False}, 8, [0, 1, 2, 3, 5, 6, 10, 11]),
    # without MPA, and SnapKV-family policies: plain top-k over all modalities, window kept.
    ("madakv", {"mpa": False}, 5, [0, 1, 2, 10, 11]),
    ("snapkv", {}, 5, [0, 1, 2, 10, 11]),
    ("pyramidkv", {}, 5, [0, 1, 2, 10, 11]),
    ("adakv", {}, 5, [0, 1, 2, 10, 11]),
    # SnapKV at 8 ignores modality: the image scores (1) tie the text ones, lower index first.
    ("snapkv", {}, 8, [0, 1, 2, 3, 5, 6, 10, 11]),
    ("snapkv", {}, 9, [0, 1, 2, 3, 5, 6, 7, 10, 11]),
    ("madakv", {}, 9, [0, 1, 2, 3, 4, 5, 6, 10, 11]),
    # StreamingLLM: sinks (4 by default, as many as fit) + the most recent, whatever the scores.
    ("streamingllm", {"sink_tokens": 0}, 5, [7, 8, 9, 10, 11]),
    ("streamingllm", {"sink_tokens": 1}, 5, [0, 8, 9, 10, 11]),
    ("streamingllm", {}, 5, [0, 1, 2, 10, 11]),
    # H2O: a recent block of round(0.5 * keep) = 3, then heavy hitters.
    ("h2o", {}, 6, [0, 1, 2, 9, 10, 11]),
    # LOOK-M at decode: the H2O rule (recent block of 4, then heavy hitters), no text prior.
    ("lookm", {}, 8, [0, 1, 2, 3, 8, 9, 10, 11]),
    # keep below the window: the most recent entries, every policy
    ("madakv", {}, 1, [11]),
    ("h2o", {}, 1, [11]),
    ("snapkv", {}, 20, list(range(12))),
])
def test_recompress_follows_each_policys_own_rule(name, knobs, keep, expected):
    """Decode-time re-compression of one head to a fixed count, with the request's own policy
    (not MadaKV's rule for everyone): given scores, each keeps what its rule keeps. StreamingLLM's
    scores are its scorer's (recency), not attention."""
    pol = _decode_policy(name, **knobs)
    psi = pol.scorer.score(None, torch.zeros(1, 12, 1))[0] if name == "streamingllm" else RE_PSI
    assert pol.recompress_scores(psi, RE_MOD, keep).tolist() == expected


def test_recompress_scores_with_each_policys_scorer():
    """recompress(query, key) scores with the policy's own scorer: StreamingLLM keeps the most
    recent entries whatever the attention; SnapKV keeps the pooled-attention best; H2O/LOOK-M use
    unpooled attention."""
    gen = torch.Generator().manual_seed(0)
    n, d = 30, 8
    key = torch.randn(n, d, generator=gen)
    query = torch.randn(2, 2, d, generator=gen)  # group of 2 query heads, 2 window queries
    mod = torch.tensor([TEXT] * 10 + [IMAGE] * 18 + [TEXT] * 2)
    assert _decode_policy("streamingllm", sink_tokens=0).recompress(query, key, mod, 6).tolist() == list(range(24, 30))
    for name, kernel in (("snapkv", 5), ("h2o", 1), ("lookm", 1), ("madakv", 5)):
        pol = _decode_policy(name)
        psi = window_scores(query, key[None], kernel, "avg")[0]
        assert torch.equal(pol.recompress(query, key, mod, 9), pol.recompress_scores(psi, mod, 9)), name


@pytest.mark.parametrize("name", POLICIES)
@FEW
@given(
    st.lists(st.floats(0, 10), min_size=1, max_size=40),
    st.lists(st.sampled_from([TEXT, IMAGE, VIDEO, AUDIO]), min_size=40, max_size=40),
    st.integers(0, 50),
    st.integers(1, 8),
    st.integers(0, 3),
)
def test_recompress_properties_every_policy(name, psi, mods, keep, window, sinks):
    n = len(psi)
    psi_t = torch.tensor(psi)
    mod = torch.tensor(mods[:n])
    pol = make_policy(MadaKVConfig(policy=name, window=window, sink_tokens=sinks))
    out = pol.recompress_scores(psi_t, mod, keep)
    want = n if name == "full" else min(keep, n)
    assert out.dtype == torch.int64 and out.numel() == want
    assert torch.equal(out, torch.unique(out))
    got = set(out.tolist())
    w = min(window, n)
    if name == "full":
        return
    if keep >= w:
        assert set(range(n - w, n)) <= got
        assert set(range(min(sinks, keep - w, n - w))) <= got
    else:
        assert got == set(range(n - keep, n))
    assert torch.equal(out, pol.recompress_scores(psi_t, mod, keep))


# ---------------------------------------------------------------------------------------------
# packaging
# ---------------------------------------------------------------------------------------------


def test_policies_do_not_import_vllm():
    code = "import sys, madakv_vllm.policies; assert not any(m == 'vllm' or m.startswith('vllm.') for m in sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_hcc_max_scale_caps_greedy_early_layers():
    """Diffuse attention: uncapped HCC hands early layers most of the budget; the cap bounds each
    layer by max_scale x its fair share of what remains, and the total stays exact."""
    from madakv_vllm.config import MadaKVConfig

    torch.manual_seed(0)
    L, H, G, N, D, B = 6, 2, 2, 400, 16, 80
    q = [torch.randn(H * G, 32, D) * 0.1 for _ in range(L)]
    k = [torch.randn(H, N, D) * 0.1 for _ in range(L)]
    mod = torch.zeros(N, dtype=torch.long)
    mod[100:300] = 1
    totals = {}
    for scale in (float("inf"), 2.0):
        policy = make_policy(MadaKVConfig(hcc_max_scale=scale, hcc_mode="streamed"))
        policy.select_all(q, k, mod, B)
        st = policy.last_state
        counts = st.kept_counts.sum(1)
        assert int(counts.sum()) == L * H * B
        totals[scale] = counts
        if scale != float("inf"):
            for layer in range(L - 1):
                assert counts[layer] <= max(H * 32, int(scale * H * float(st.phi[layer]))) + 0
    assert totals[float("inf")][0] > totals[2.0][0]


def test_hcc_min_scale_bounds_how_far_early_layers_starve_later_ones():
    """Diffuse image attention: each head's demand (theta of every modality's mass) exceeds the
    budget, so streamed HCC gives the early layers up to max_scale x their share and the last
    layers what is left; min_scale s keeps every layer at >= s x H*B, and the total stays exact."""
    from madakv_vllm.config import MadaKVConfig

    torch.manual_seed(0)
    L, H, G, N, D, B = 6, 2, 2, 400, 16, 160
    k = [torch.randn(H, N, D) * 0.1 for _ in range(L)]
    q = [torch.randn(H * G, 32, D) * 0.1 for _ in range(L)]
    mod = torch.zeros(N, dtype=torch.long)
    mod[100:300] = 1
    last = {}
    for floor in (0.0, 0.75):
        policy = make_policy(MadaKVConfig(experimental={"hcc_min_scale": floor}, hcc_mode="streamed"))
        policy.select_all(q, k, mod, B)
        counts = policy.last_state.kept_counts.sum(1)
        assert int(counts.sum()) == L * H * B
        assert all(int(c) >= int(floor * H * B) for c in counts), counts
        last[floor] = int(counts[-1])
    assert last[0.0] < 0.75 * H * B <= last[0.75]


# ---------------------------------------------------------------------------------------------
# page-aligned budgets (granule, offset): every head keeps whole KV pages + its share of the tail page
# ---------------------------------------------------------------------------------------------


@PROPS
@given(
    policy=st.sampled_from([p for p in POLICIES if p != "full"]),
    hcc_mode=st.sampled_from(["streamed", "global", "layer"]),
    num_layers=st.integers(1, 5),
    h=st.integers(1, 4),
    n=st.integers(80, 900),
    g=st.sampled_from([8, 16, 32]),
    frac=st.sampled_from([0.5, 0.2, 0.1, 0.05]),
    window=st.sampled_from([4, 8, 16]),
    sinks=st.sampled_from([0, 2]),
    seed=st.integers(0, 10_000),
)
def test_granule_counts_are_offset_plus_whole_pages_summing_exactly(policy, hcc_mode, num_layers, h, n, g, frac, window,
                                                                    sinks, seed):
    from madakv_vllm.accounting import plan_compression

    cfg = MadaKVConfig(policy=policy, budget=frac, window=window, sink_tokens=sinks, **hcc(hcc_mode))
    plan = plan_compression(cfg, n, g)
    if plan is None:
        return
    gen = torch.Generator().manual_seed(seed)
    mod = torch.randint(0, 3, (n,), generator=gen)
    pol = make_policy(cfg)
    r = plan.offset(n)  # n mod g entries of every head share the tail page
    state = pol.begin(num_layers=num_layers, num_kv_heads=h, seq_len=n, modality=mod, budget=plan.budget,
                      granule=plan.granule, offset=r)
    state.scores = [torch.rand(h, n, generator=gen) ** 4 for _ in range(num_layers)]  # as observe_layer stores
    kept = pol.select_observed(state)
    counts = torch.tensor([[len(k) for k in layer] for layer in kept])
    assert bool(((counts - r) % g == 0).all()), (counts, r)
    assert int(counts.sum()) == num_layers * h * plan.budget
    forced = set(range(n - min(window, n), n)) | set(range(min(sinks, n)))
    for layer in kept:
        for k in layer:
            assert len(set(k.tolist())) == len(k) and forced <= set(k.tolist())


def test_granule_rounds_madakv_layers_and_later_layers_compensate():
    """HCC asks for unaligned per-head counts; aligned, each layer moves to whole granules and
    the remaining budget carries the difference, so the total is still exact."""
    n, h, g, big_l = 400, 2, 16, 3
    mod = torch.tensor([TEXT] * 150 + [IMAGE] * 250)
    psi = torch.rand(h, n, generator=torch.Generator().manual_seed(3)) ** 6
    cfg = MadaKVConfig(policy="madakv", window=8)
    free, s_free = select_from_scores(cfg, psi, mod, 99, big_l)
    pol = make_policy(cfg)
    state = pol.begin(num_layers=big_l, num_kv_heads=h, seq_len=n, modality=mod, budget=99, granule=g, offset=3)
    kept = [pol.select_layer_scores(state, l, psi) for l in range(big_l)]
    assert bool(((s_free.kept_counts - 3) % g != 0).any())  # the unaligned policy asks for other counts
    assert bool(((state.kept_counts - 3) % g == 0).all())
    assert int(state.kept_counts.sum()) == int(s_free.kept_counts.sum()) == big_l * h * 99
    assert (state.kept_counts - s_free.kept_counts)[0].abs().max() < g  # layer 0: rounded, not redistributed
    # layer 0 asked for the same counts: a head rounded up keeps a superset of what it asked for,
    # one rounded down a subset (quotas move within the head's own ranking)
    for j in range(h):
        a, b = set(kept[0][j].tolist()), set(free[0][j].tolist())
        assert a <= b or b <= a


def test_begin_rejects_unaligned_budget():
    begin = make_policy(MadaKVConfig()).begin
    with pytest.raises(ValueError, match="granule"):
        begin(num_layers=1, num_kv_heads=1, seq_len=100, modality=torch.zeros(100, dtype=torch.long), budget=40, granule=32)
    with pytest.raises(ValueError, match="offset"):
        begin(num_layers=1, num_kv_heads=1, seq_len=100, modality=torch.zeros(100, dtype=torch.long), budget=40,
              granule=32, offset=32)
    assert begin(num_layers=1, num_kv_heads=1, seq_len=100, modality=torch.zeros(100, dtype=torch.long), budget=40,
                 granule=32, offset=8).offset == 8


# ---------------------------------------------------------------------------------------------
# HCC readings that see every layer before selecting
# ---------------------------------------------------------------------------------------------


def _observed(cfg, scores, modality, budget, granule=1, offset=0):
    pol = make_policy(cfg)
    big_l, h, n = len(scores), scores[0].shape[0], scores[0].shape[1]
    state = pol.begin(num_layers=big_l, num_kv_heads=h, seq_len=n, modality=modality, budget=budget,
                      granule=granule, offset=offset)
    state.scores = list(scores)
    return pol.select_observed(state), state


def _demand(scores, window, theta):
    """Raw HCC demand of each head of [H, N] scores (one modality, window forced)."""
    n = scores.shape[1]
    out = []
    for row in scores:
        vals = sorted(row[: n - window].tolist(), reverse=True)
        total, acc, need = sum(vals), 0.0, 0
        for v in vals:
            if acc < theta * total:
                need += 1
            acc += v
        out.append(window + need)
    return out


def test_hcc_global_splits_the_whole_budget_by_demand():
    """Layer 0's heads attend diffusely (high demand), layer 1's sharply (low demand): global HCC
    gives each (layer, head) floor + its demand's share of the rest, exactly L*H*B in total."""
    n, w, b = 200, 4, 40
    mod = torch.zeros(n, dtype=torch.long)
    diffuse = torch.ones(2, n)
    sharp = torch.zeros(2, n)
    sharp[:, :3] = 1.0
    sharp[:, n - w:] = 1.0
    cfg = MadaKVConfig(policy="madakv", window=w, **hcc("global"), mpa=False, kernel_size=1)
    kept, state = _observed(cfg, [diffuse, sharp], mod, b)
    demand = torch.tensor([_demand(diffuse, w, cfg.theta), _demand(sharp, w, cfg.theta)], dtype=torch.float64)
    assert demand[0, 0] > 10 * demand[1, 0]
    expect = w + apportion(2 * 2 * (b - w), demand.flatten(), torch.full((4,), n - w)).view(2, 2)
    assert torch.equal(state.kept_counts, expect)
    assert int(state.kept_counts.sum()) == 2 * 2 * b
    assert int(state.kept_counts[0].min()) > int(state.kept_counts[1].max())


def test_hcc_layer_mode_moves_budget_between_layers_not_heads():
    n, w, b = 200, 4, 40
    mod = torch.zeros(n, dtype=torch.long)
    gen = torch.Generator().manual_seed(0)
    diffuse = torch.rand(2, n, generator=gen) + 1.0
    sharp = torch.rand(2, n, generator=gen) ** 20
    cfg = MadaKVConfig(policy="madakv", window=w, **hcc("layer"), kernel_size=1)
    kept, state = _observed(cfg, [diffuse, sharp, diffuse], mod, b)
    counts = state.kept_counts
    assert int(counts.sum()) == 3 * 2 * b
    assert all(int(c.max()) - int(c.min()) <= 1 for c in counts)  # heads of a layer: even split
    assert counts[0, 0] > counts[1, 0] and counts[2, 0] > counts[1, 0]


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_global_readings_refuse_streamed_selection(mode):
    pol = make_policy(MadaKVConfig(**hcc(mode)))
    state = pol.begin(num_layers=2, num_kv_heads=1, seq_len=100, modality=torch.zeros(100, dtype=torch.long), budget=40)
    with pytest.raises(ValueError, match="every layer"):
        pol.select_layer(state, 0, torch.randn(1, 32, 4), torch.randn(1, 100, 4))


def test_observed_selection_equals_streamed_for_streamed_rules():
    """For rules that need no look-ahead, scoring every layer first changes nothing."""
    qs, ks = random_layers(3, 2, 2, 120, 8, seed=5)
    mod = torch.tensor([TEXT] * 60 + [IMAGE] * 60)
    for name in POLICIES:
        cfg = MadaKVConfig(policy=name, window=8, budget=0.3, hcc_mode="streamed")
        pol = make_policy(cfg)
        state = pol.begin(num_layers=3, num_kv_heads=2, seq_len=120, modality=mod, budget=cfg.budget_tokens(120))
        streamed = [pol.select_layer(state, l, q, k) for l, (q, k) in enumerate(zip(qs, ks))]
        observed, _ = run(cfg, qs, ks, mod)
        assert all(torch.equal(a, c) for la, lc in zip(streamed, observed) for a, c in zip(la, lc)), name


@pytest.mark.parametrize("hcc_mode", ["pyramid_uniform", "streamed"])
def test_mpa_mix_blends_the_modality_split_with_top_k_exactly(hcc_mode):
    """mpa_mix 1 is MPA's split, 0 the head's own top-k within its count (with HCC off: exactly
    what one content group keeps); every mix keeps exactly L*H*B and moves the kept image share
    monotonically between the two."""
    gen = torch.Generator().manual_seed(3)
    L, H, N, D = 3, 2, 400, 16
    q = [torch.randn(4, 32, D, generator=gen) for _ in range(L)]
    k = [torch.randn(H, N, D, generator=gen) for _ in range(L)]
    k[1][:, 100:250] += 0.8  # layer 1 attends the image more
    mod = torch.zeros(N, dtype=torch.long)
    mod[100:250] = IMAGE
    images = []
    for mix in (1.0, 0.5, 0.0):
        pol = make_policy(MadaKVConfig(experimental={"mpa_mix": mix}, hcc_mode=hcc_mode))
        kept = pol.select_all(q, k, mod, 80)
        assert sum(len(x) for layer in kept for x in layer) == L * H * 80
        images.append(sum(int((mod[x] == IMAGE).sum()) for layer in kept for x in layer))
    assert images[0] != images[2] and min(images[0], images[2]) <= images[1] <= max(images[0], images[2])
    no_hcc = make_policy(MadaKVConfig(experimental={"mpa_mix": 0.0}, hcc=False)).select_all(q, k, mod, 80)
    one_group = make_policy(MadaKVConfig(mpa=False, hcc=False)).select_all(q, k, mod, 80)
    assert all(torch.equal(a, b) for la, lb in zip(no_hcc, one_group) for a, b in zip(la, lb))


@pytest.mark.parametrize("hcc_mode", ["pyramid_uniform", "streamed"])
def test_mpa_demand_split_follows_the_tokens_each_modality_needs(hcc_mode):
    """mpa_split "demand": a head's quota per modality follows the fewest tokens covering theta of
    that modality's mass, not the mass. Text mass on three very high scorers and image mass spread
    over many tokens: by mass text gets most slots (spent on its low scorers), by demand the image
    does; both keep exactly L*H*B, and the split is the one apportion gives."""
    N, W = 300, 8
    mod = torch.zeros(N, dtype=torch.long)
    mod[100:250] = IMAGE
    scores = torch.full((1, N), 1e-4)
    scores[0, [10, 20, 30]] = 0.2  # text: 60% of the mass on 3 tokens
    scores[0, 100:250] = 0.3 / 150  # image: 30% spread evenly
    kept = {}
    for split in ("mass", "demand"):
        pol = make_policy(MadaKVConfig(experimental={"mpa_split": split}, hcc_mode=hcc_mode, window=W, theta=0.9))
        state = pol.begin(num_layers=1, num_kv_heads=1, seq_len=N, modality=mod, budget=100)
        idx = pol.select_layer_scores(state, 0, scores.clone())[0]
        assert idx.numel() == 100 and bool((idx[-W:] == torch.arange(N - W, N)).all())
        kept[split] = int((mod[idx] == IMAGE).sum())
    ranking = Ranking.of(scores, torch.where(torch.arange(N) >= N - W, FORCED, mod))
    mass, demand = ranking.mass_and_demand(NUM_MODALITIES, 0.9)
    caps = torch.bincount(mod[: N - W], minlength=NUM_MODALITIES)
    assert kept["mass"] == int(apportion(100 - W, mass[0], caps)[IMAGE])
    assert kept["demand"] == int(apportion(100 - W, demand[0].double(), caps)[IMAGE])
    assert kept["demand"] > 2 * kept["mass"]
    with pytest.raises(ValueError, match="mpa_split"):
        MadaKVConfig(experimental={"mpa_split": "tokens"})


def test_mpa_capped_split_gives_no_modality_more_than_its_demand_while_another_wants_more():
    """mpa_split "capped": MPA's mass split, except that a modality's slots beyond its theta-demand
    go to the other modalities' demand first; the same as MPA's split wherever that split is
    within every demand, and never below a demand once all demands fit."""
    pol = MadaKVPolicy(mpa_split="capped")
    gen = torch.Generator().manual_seed(11)
    sizes = torch.tensor([300, 200, 0, 0, 32])
    state = CompressionState(num_layers=1, num_kv_heads=64, seq_len=532, budget=100, modality=torch.zeros(532, dtype=torch.long),
                             group=torch.zeros(532, dtype=torch.long), group_sizes=sizes, num_forced=32, floor=32,
                             kept_counts=torch.zeros(1, 64, dtype=torch.long), phi=torch.zeros(1, dtype=torch.float64))
    g = NUM_MODALITIES
    mass = torch.rand(64, g, generator=gen, dtype=torch.float64) * (sizes[:g] > 0)
    demand = torch.minimum(torch.randint(0, 300, (64, g), generator=gen), sizes[:g])
    total = torch.randint(0, 500, (64,), generator=gen)
    split = pol._capped_split(state, total, mass, demand)
    by_mass = apportion(total, mass, sizes[:g].expand(64, g))
    assert torch.equal(split.sum(1), total) and bool((split <= sizes[:g]).all())
    tight = total <= demand.sum(1)
    assert bool((split[tight] <= demand[tight]).all())
    assert bool((split[~tight] >= demand[~tight]).all())
    within = (by_mass <= demand).all(1) & tight
    assert within.any() and torch.equal(split[within], by_mass[within])
    assert not torch.equal(split, by_mass)
