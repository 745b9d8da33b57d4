"""MadaKV (Li, Jiang et al., ACL 2025, arXiv 2506.15724): modality preference adaptation (MPA)
and hierarchical compression compensation (HCC). Readings of the paper: docs/method.md."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from madakv_vllm.config import NUM_MODALITIES
from madakv_vllm.policies.baselines import pyramid_layer_budgets
from madakv_vllm.policies.core import FORCED, CompressionState, Policy, Ranking, apportion


@dataclass
class MadaKVPolicy(Policy):
    """MadaKV. MPA: per head, the non-forced slots are split over modalities by the head's attention
    mass on each, then top scores within each modality. HCC: per-(layer, head) counts follow each
    head's demand (fewest tokens covering theta of each modality's mass, plus forced), exactly
    L*H*B in total, each between floor and N; ``hcc_mode`` says how (docs/method.md):

    * ``streamed``: layer by layer, each head keeps its clipped demand; the layer total is clamped so
      the remaining layers stay feasible, to at most ``max_scale`` times its fair share of what
      remains, and so that every layer keeps at least ``min_scale`` times the uniform share H*B;
      the last layer takes the rest (only layers <= l are known when layer l selects).
    * ``global``: all layers scored first; L*H*B split over every (layer, head) in proportion to
      its demand, within [floor, N].
    * ``layer``: all layers scored first; L*H*B split over layers in proportion to each layer's
      total demand, then evenly over the layer's heads (the paper's phi[l] is per layer).
    * ``pyramid`` / ``pyramid_uniform``: not the paper's reading: layer totals follow PyramidKV's
      schedule (falling linearly with depth, ``pyramid_beta``), then split over the layer's heads
      by demand / evenly.

    A head whose count equals its raw demand keeps its demand per modality; otherwise MPA's split
    decides. With mpa off everything is one group; with both off this is SnapKV."""

    mpa: bool = True
    hcc: bool = True
    theta: float = 0.9
    min_per_head: int | None = None  # None -> window
    max_scale: float = float("inf")  # streamed: cap on a layer's total, in multiples of H * phi[l]
    min_scale: float = 0.0  # streamed: floor on every layer's total, in multiples of H * B
    hcc_mode: str = "pyramid_uniform"  # as config.MadaKVConfig
    pyramid_beta: float = 20.0  # pyramid readings: PyramidKV's schedule parameter
    mpa_mix: float = 1.0  # MPA: weight of the modality-mass split against the head's top-k split
    mpa_split: str = "mass"  # MPA: split by mass, by theta-demand ("demand"), or by mass capped at demand ("capped")

    def content_group(self, modality):
        return modality.clone() if self.mpa else torch.zeros_like(modality)

    def init_state(self, state):
        want = self.window if self.min_per_head is None else self.min_per_head
        # Never below the forced tokens; never above B, or L*H*B could not be met.
        state.floor = max(state.num_forced, min(want, state.budget))

    def select_layer(self, state, layer, query, key):
        if self.hcc and self.hcc_mode != "streamed":
            raise ValueError(f"hcc_mode {self.hcc_mode!r} needs every layer's scores: use observe_layer + "
                             "select_observed (or select_all)")
        return super().select_layer(state, layer, query, key)

    def decode_rule(self):
        return dataclasses.replace(self, hcc=False)  # the head's count is fixed: MPA's split (or top-k)

    def _groups(self) -> int:
        return NUM_MODALITIES if self.mpa else 1

    def _ranking(self, state, layer) -> Ranking:
        if layer not in state._rankings:
            scores = state.scores[layer]
            state._rankings[layer] = Ranking.of(scores, state.group_on(scores.device))
        return state._rankings[layer]

    def plan(self, state):
        if not self.hcc or self.hcc_mode == "streamed":
            return
        big_l, h, n, f = state.num_layers, state.num_kv_heads, state.seq_len, state.num_forced
        demand = torch.stack([
            f + self._ranking(state, l).mass_and_demand(self._groups(), self.theta)[1].sum(1) for l in range(big_l)
        ]).double()  # [L, H]
        # In units of granules: each (layer, head) keeps r + g*u tokens, u in [lo, hi], sum fixed.
        g, r = state.granule, state.offset
        lo, hi = -(-max(state.floor - r, 0) // g), (n - r) // g
        total = (big_l * h * (state.budget - r)) // g - big_l * h * lo
        if self.hcc_mode == "global":
            units = apportion(total, demand.flatten(), torch.full((big_l * h,), hi - lo)).view(big_l, h)
        elif self.hcc_mode == "layer":
            per_layer = apportion(total, demand.sum(1), torch.full((big_l,), h * (hi - lo)))
            units = apportion(per_layer, torch.ones(big_l, h, dtype=torch.float64), torch.full((big_l, h), hi - lo))
        elif self.hcc_mode in ("pyramid", "pyramid_uniform"):
            # PyramidKV's budget per head of each layer (sums to L*B): the same whatever the number
            # of heads, so a tensor-parallel rank keeps what it would keep at TP=1
            per_head = (pyramid_layer_budgets(state, self.pyramid_beta) - r) // g - lo
            if (per_head < 0).any():  # a floor above the forced tokens: the schedule as weights
                per_layer = apportion(total, per_head.clamp_min(0).double(), torch.full((big_l,), h * (hi - lo)))
                per_head = None
            else:
                per_layer = h * per_head
            if self.hcc_mode == "pyramid_uniform" and per_head is not None:
                units = per_head[:, None].expand(big_l, h).clone()
            else:
                weight = demand if self.hcc_mode == "pyramid" else torch.ones(big_l, h, dtype=torch.float64)
                units = apportion(per_layer, weight, torch.full((big_l, h), hi - lo))
        else:
            raise ValueError(f"unknown hcc_mode {self.hcc_mode!r}")
        state.planned_counts = r + g * (lo + units)

    def quotas(self, state, layer, ranking):
        h, n, f = state.num_kv_heads, state.seq_len, state.num_forced
        groups = self._groups()
        quota = self._empty_quota(state)
        if not self.hcc:
            mass, _ = ranking.mass_and_demand(groups)
            total = torch.full((h,), state.budget - f)
            quota[:, :groups] = self._modality_split(state, ranking, total, mass) if self.mpa else total[:, None]
            return quota
        mass, demand = ranking.mass_and_demand(groups, self.theta)
        raw = f + demand.sum(1)
        if state.planned_counts is not None:
            counts = state.planned_counts[layer]
        else:
            counts = self._layer_counts(state, layer, raw.clamp(state.floor, n), self.max_scale, self.min_scale)
        quota[:, :groups] = torch.where(
            (counts == raw)[:, None], demand, self._modality_split(state, ranking, counts - f, mass, demand)
        )
        return quota

    def _modality_split(self, state, ranking: Ranking, total: torch.Tensor, mass: torch.Tensor,
                        demand: torch.Tensor | None = None) -> torch.Tensor:
        """[H, G]: each head's ``total`` non-forced slots over modalities: MPA's split by attention
        mass; or (``mpa_split``) by the tokens each modality needs to cover theta of its mass
        ("demand"), or by mass with each modality capped at that demand while another is short
        ("capped"); blended (``mpa_mix`` < 1) with the modalities of the head's own ``total`` best
        tokens.

        Why the demand readings exist: a modality whose mass sits on a few high scorers gets, by
        mass, more slots than those tokens, spent on its low scorers, while a modality with less
        but spread mass is cut below tokens that outscore them (docs/method.md, "MPA")."""
        if self.mpa_split in ("demand", "capped") and demand is None:  # HCC's quotas pass theirs
            demand = ranking.mass_and_demand(mass.shape[1], self.theta)[1]
        if self.mpa_split == "demand":
            split = self._split(state, total, demand.double())
        elif self.mpa_split == "capped":
            split = self._capped_split(state, total, mass, demand)
        elif self.mpa_split == "mass":
            split = self._split(state, total, mass)
        else:
            raise ValueError(f"unknown mpa_split {self.mpa_split!r}")
        if self.mpa_mix >= 1.0 or not self.mpa:
            return split
        g = mass.shape[1]
        content = ranking.group < FORCED
        best = content & (content.cumsum(1) <= total.to(ranking.group.device)[:, None])
        topk = torch.stack([(best & (ranking.group == m)).sum(1) for m in range(g)], dim=1).cpu()
        weight = self.mpa_mix * split.double() + (1.0 - self.mpa_mix) * topk.double()
        return apportion(total, weight, state.group_sizes[:g].expand(mass.shape[0], g))

    def _capped_split(self, state, total: torch.Tensor, mass: torch.Tensor, demand: torch.Tensor) -> torch.Tensor:
        """[H, G]: MPA's split by mass, with no modality given more slots than its theta-demand
        while another still wants more: the slots a modality's mass would spend on its low
        scorers go to the other modality's demand first; once every demand is met, the rest is
        split by mass again."""
        g = mass.shape[1]
        size = state.group_sizes[:g].expand(mass.shape[0], g)
        demand = torch.minimum(demand, size)
        need = demand.sum(1)
        within = apportion(torch.minimum(total, need), mass, demand)
        return within + apportion((total - need).clamp_min(0), mass, size - within)

    @staticmethod
    def _layer_counts(state: CompressionState, layer: int, want: torch.Tensor, max_scale: float = float("inf"),
                      min_scale: float = 0.0) -> torch.Tensor:
        """Per-head counts of this layer: ``want`` unless the layer total must move to keep the
        remaining budget feasible (each later layer in [H*floor, H*N]), exceeds ``max_scale`` times
        the layer's fair share H*phi[l] (greedy early layers would starve the later ones), or would
        leave a later layer less than ``min_scale`` times the uniform share H*B (or keep less
        itself); then scaled by largest remainder."""
        h, n, fl, big_l = state.num_kv_heads, state.seq_len, state.floor, state.num_layers
        left = state.num_layers - layer - 1
        rem = state.remaining
        state.phi[layer] = rem / (h * (big_l - layer))
        lo = max(h * fl, rem - left * h * n)
        hi = min(h * n, rem - left * h * fl)
        if max_scale != float("inf"):
            hi = max(lo, min(hi, int(max_scale * h * float(state.phi[layer]))))
        if min_scale > 0:
            reserve = min(int(min_scale * h * state.budget), h * n)  # every layer's floor
            lo = max(lo, min(reserve, hi))
            hi = max(lo, min(hi, rem - left * reserve))
        asked = int(want.sum())
        total = min(max(asked, lo), hi)
        if total < asked:  # shrink each head's demand above the floor proportionally
            return fl + apportion(total - h * fl, (want - fl).double(), want - fl)
        if total > asked:  # grow in proportion to demand, up to N
            return want + apportion(total - asked, want.double(), n - want)
        return want


#: policy name -> its constructor from the config's knobs (common: window and sinks; pooled: the
