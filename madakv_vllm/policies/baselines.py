"""The baselines MadaKV is compared with, each as its reference implementation's rule
(deviations and their reasons: docs/method.md). SnapKV and StreamingLLM are the base ``Policy``
with the pooled window-attention and the recency scorer."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from madakv_vllm.config import TEXT
from madakv_vllm.policies.core import Policy, apportion
from madakv_vllm.policies.scorers import Scorer, WindowAttention


@dataclass
class FullPolicy(Policy):
    """No eviction: B = N whatever budget is passed."""

    def effective_budget(self, budget, n, num_forced):
        return n

    def recompress_scores(self, scores, modality, keep):
        return torch.arange(scores.numel(), device=scores.device)


@dataclass
class H2OPolicy(Policy):
    """Heavy hitters + recent tokens. The recent share round(recent_ratio * B) joins the forced set
    (it contains the window); the rest of B goes to the highest accumulated attention. Accumulated
    over the observation window only: see docs/method.md."""

    recent_ratio: float = 0.5
    scorer: Scorer = field(default_factory=lambda: WindowAttention(kernel_size=1))

    def forced_mask(self, n, budget):
        forced = super().forced_mask(n, budget)
        sinks = min(self.sink_tokens, n)
        recent = max(min(self.window, n), min(int(round(self.recent_ratio * budget)), budget - sinks))
        forced[n - recent :] = True
        return forced


@dataclass
class PyramidKVPolicy(Policy):
    """SnapKV selection with per-layer budgets falling linearly with depth (PyramidKV): the non-forced
    part E = B - F runs from 2E - E/beta (layer 0) to E/beta (last layer); integer, capped at N - F,
    summing to L*E exactly. Prompts shorter than 2E get the uniform E (SnapKV), as the reference."""

    beta: float = 20.0

    def init_state(self, state):
        state.layer_budget = pyramid_layer_budgets(state, self.beta)
        state.phi = state.layer_budget.double()

    def quotas(self, state, layer, ranking):
        quota = self._empty_quota(state)
        quota[:, 0] = int(state.layer_budget[layer]) - state.num_forced
        return quota


def pyramid_layer_budgets(state, beta: float) -> torch.Tensor:
    """PyramidKV's per-(layer, head) budgets [L]: the non-forced part E = B - F falls linearly from
    2E - E/beta (layer 0) to E/beta (last layer), summing to L*B exactly, each in [F, N] (in whole
    granules when page-aligned); uniform when N < 2E, as the reference."""
    big_l, f, g = state.num_layers, state.num_forced, state.granule
    extra = state.budget - f
    if big_l == 1 or state.seq_len < 2 * extra:
        # As PyramidKV (KVCache-Factory PyramidKVCluster): a prompt shorter than twice the
        # non-window budget gets SnapKV's uniform budget (the pyramid would not fit under N).
        sched = torch.full((big_l,), float(extra), dtype=torch.float64)
    else:
        lo = extra / beta
        hi = 2 * extra - lo
        sched = hi - (hi - lo) * torch.arange(big_l, dtype=torch.float64) / (big_l - 1)
    if g > 1:  # the same schedule in whole granules: r + g * [ceil((F-r)/g), (N-r) // g] per layer
        r = state.offset
        low, high = -(-max(f - r, 0) // g), (state.seq_len - r) // g
        alloc = apportion(big_l * ((state.budget - r) // g - low), sched, torch.full((big_l,), high - low))
        return r + (alloc + low) * g
    alloc = apportion(big_l * extra, sched, torch.full((big_l,), state.seq_len - f))
    return alloc + f


@dataclass
class AdaKVPolicy(Policy):
    """AdaKV (Feng et al.; the authors' code, FFY0/AdaKV ``AdaptiveSnapKVCluster``): the layer's
    H*E content slots (E = B - F) first go to the best scores over all heads jointly, giving each
    head c_h; each head then keeps (1 - alpha) * c_h + int(alpha * E) content tokens (the safeguard
    shrinks the joint allocation towards uniform), made integers summing to H*E exactly by largest
    remainder (the reference rounds each head, so its total drifts by a few tokens)."""

    alpha: float = 0.2

    def quotas(self, state, layer, ranking):
        h, n, f, b = state.num_kv_heads, state.seq_len, state.num_forced, state.budget
        extra = b - f
        joint = torch.zeros(h, dtype=torch.int64)
        if extra > 0:
            in_any = ranking.group == 0
            vals = torch.where(in_any, ranking.sorted_scores().float(), -math.inf).flatten()
            # stable: equal scores go to the lower head, then the better in-head rank
            best = torch.sort(vals, descending=True, stable=True).indices[: h * extra]
            joint = torch.bincount(best // n, minlength=h).cpu()
        want = (1.0 - self.alpha) * joint.double() + int(self.alpha * extra)
        quota = self._empty_quota(state)
        quota[:, 0] = apportion(h * extra, want, state.group_sizes[0].expand(h))
        return quota


@dataclass
class LookMPolicy(H2OPolicy):
    """LOOK-M text-prior eviction (no KV merging): H2O's recent block (round(recent_ratio * B)
    tokens, with the window) and sinks are forced; then every text token (the best-scored if they
    exceed the rest of the budget), then visual tokens by score. Scores: unpooled window attention.
    LOOK-M compresses the prompt only; during decoding (every generated token is text, so a text
    prior would push the images out) a head is re-compressed with the H2O rule it is built on."""

    def content_group(self, modality):
        return (modality != TEXT).long()  # 0 text, 1 any visual/audio

    def quotas(self, state, layer, ranking):
        slots = state.budget - state.num_forced
        text = min(int(state.group_sizes[0]), slots)
        quota = self._empty_quota(state)
        quota[:, 0], quota[:, 1] = text, slots - text
        return quota

    def decode_rule(self):
        return H2OPolicy(window=self.window, sink_tokens=self.sink_tokens, scorer=self.scorer,
                         recent_ratio=self.recent_ratio)


