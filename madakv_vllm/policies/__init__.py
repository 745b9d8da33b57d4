"""KV-cache eviction policies in pure torch: MadaKV (MPA + HCC) and the baselines it is compared with.

No vLLM import here. The attention backend calls, per prompt::

    policy = make_policy(cfg)
    state = policy.begin(num_layers=L, num_kv_heads=H, seq_len=N, modality=mod, budget=B)
    for l in range(L):  # right after layer l's attention
        policy.observe_layer(state, layer=l, query=q_window, key=k_all)
    kept = policy.select_observed(state)  # per layer, H sorted index tensors

and, during decoding, per (layer, KV head) whose count the page contract fixes::

    kept = policy.recompress(query=q_window_of_group, key=k_retained, modality=mod_retained, keep=count)

Each policy's whole rule, prompt time and decode time, lives in its class.

Structure (kvpress style): a *scorer* turns (window queries, keys) into one score per (KV head, token);
a *policy* decides how many tokens each head keeps from each token *group* (a modality, text vs visual,
or "any"); one shared selector then keeps the best-scored tokens of each group. Window and sink tokens
form the group ``FORCED`` that every head keeps. Equations and every reading of the paper: docs/method.md.
"""

from __future__ import annotations

from madakv_vllm.config import POLICIES, MadaKVConfig
from madakv_vllm.policies.baselines import AdaKVPolicy, FullPolicy, H2OPolicy, LookMPolicy, PyramidKVPolicy
from madakv_vllm.policies.core import (
    FORCED,
    NUM_GROUPS,
    CompressionState,
    Policy,
    Ranking,
    align_quota,
    apportion,
    select_by_quota,
)
from madakv_vllm.policies.madakv import MadaKVPolicy
from madakv_vllm.policies.scorers import Recency, Scorer, WindowAttention, pool_scores, window_scores

__all__ = [
    "FORCED",
    "NUM_GROUPS",
    "REGISTRY",
    "AdaKVPolicy",
    "CompressionState",
    "FullPolicy",
    "H2OPolicy",
    "LookMPolicy",
    "MadaKVPolicy",
    "Policy",
    "PyramidKVPolicy",
    "Ranking",
    "Recency",
    "Scorer",
    "WindowAttention",
    "align_quota",
    "apportion",
    "make_policy",
    "pool_scores",
    "select_by_quota",
    "window_scores",
]

#: pooled window-attention scorer). Keys are exactly config.PolicyName's values (checked below).
REGISTRY = {
    "full": lambda cfg, common, pooled: FullPolicy(**common),
    "streamingllm": lambda cfg, common, pooled: Policy(**common, scorer=Recency()),
    "snapkv": lambda cfg, common, pooled: Policy(**common, scorer=pooled),
    "h2o": lambda cfg, common, pooled: H2OPolicy(**common, recent_ratio=cfg.h2o_recent_ratio),
    "pyramidkv": lambda cfg, common, pooled: PyramidKVPolicy(**common, scorer=pooled, beta=cfg.pyramid_beta),
    "adakv": lambda cfg, common, pooled: AdaKVPolicy(**common, scorer=pooled, alpha=cfg.adakv_alpha),
    "lookm": lambda cfg, common, pooled: LookMPolicy(**common, recent_ratio=cfg.h2o_recent_ratio),
    "madakv": lambda cfg, common, pooled: MadaKVPolicy(
        **common, scorer=pooled, mpa=cfg.mpa, hcc=cfg.hcc, theta=cfg.theta, min_per_head=cfg.head_floor,
        max_scale=cfg.hcc_max_scale, min_scale=cfg.experimental.hcc_min_scale, hcc_mode=cfg.hcc_reading,
        pyramid_beta=cfg.pyramid_beta, mpa_mix=cfg.experimental.mpa_mix, mpa_split=cfg.experimental.mpa_split),
}
assert set(REGISTRY) == set(POLICIES), "every policy name has exactly one constructor"


def make_policy(cfg: MadaKVConfig) -> Policy:
    """The policy named by ``cfg.policy``, with cfg's knobs."""
    if cfg.policy not in REGISTRY:
        raise ValueError(f"unknown policy {cfg.policy!r}")
    common = dict(window=cfg.window, sink_tokens=cfg.sinks)
    return REGISTRY[cfg.policy](cfg, common, WindowAttention(cfg.kernel_size, cfg.pooling))
