"""The shared machinery of every policy: exact integer splits, the compression state, rankings,
quota-based selection, page-granule rounding, and the ``Policy`` base class (its prompt-time and
decode-time rule; subclasses change the forced set, the groups and the quotas)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
import torch.nn.functional as F

from madakv_vllm.config import NUM_MODALITIES
from madakv_vllm.policies.scorers import Scorer, WindowAttention

FORCED = NUM_MODALITIES  # group id of window and sink tokens (always kept)
NUM_GROUPS = NUM_MODALITIES + 1


# ----------------------------------------------------------------------------------------------
# Integer arithmetic: exact splits
# ----------------------------------------------------------------------------------------------


def apportion(total, weight: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Split ``total`` into integers in ``[0, cap]`` proportional to ``weight``, summing exactly.

    Rows are independent (``weight``/``cap`` are ``[K]`` or ``[R, K]``, ``total`` a scalar or ``[R]``).
    Water-filling: a share above its cap is cut to the cap and the excess re-split over the rest;
    if the uncapped entries all weigh 0 they split evenly. Integers by largest remainder, ties to the
    lower index. Requires ``0 <= total <= cap.sum()``. Runs on CPU (the vectors are tiny).
    """
    weight = weight.detach().to("cpu", torch.float64).clamp_min(0.0)
    cap = cap.detach().to("cpu", torch.int64).clamp_min(0)
    single = weight.dim() == 1
    if single:
        weight, cap = weight[None], cap[None]
    cap = cap.expand_as(weight)
    total = torch.as_tensor(total, dtype=torch.int64).cpu().reshape(-1).expand(weight.shape[0])
    if (total < 0).any() or (total > cap.sum(1)).any():
        raise ValueError(f"apportion: total {total.tolist()} outside [0, {cap.sum(1).tolist()}]")
    capf = cap.double()
    fixed = cap == 0
    share = torch.zeros_like(weight)
    for _ in range(weight.shape[1] + 1):
        free = ~fixed
        left = total.double()[:, None] - torch.where(fixed, capf, 0.0).sum(1, keepdim=True)
        w = torch.where(free, weight, 0.0)
        ws = w.sum(1, keepdim=True)
        w = torch.where(ws > 0, w, free.double())  # all free weights zero -> even split
        ws = w.sum(1, keepdim=True)
        share = torch.where(fixed, capf, left.clamp_min(0) * w / torch.where(ws > 0, ws, 1.0))
        over = free & (share > capf)
        if not over.any():
            break
        fixed |= over
    # +1e-9: a share computed as 2.9999999999 is 3 (sum of floors still <= total, see docs)
    x = torch.minimum((share + 1e-9).floor().long(), cap)
    deficit = total - x.sum(1)
    cols = torch.arange(x.shape[1]).expand_as(x)
    while (deficit > 0).any():
        room = x < cap
        rem = torch.where(room, share - x, -math.inf)
        order = torch.sort(rem, dim=1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(1, order, cols)
        add = room & (rank < deficit[:, None])
        x += add.long()
        deficit -= add.sum(1)
    return x[0] if single else x



# ----------------------------------------------------------------------------------------------
# State and selection
# ----------------------------------------------------------------------------------------------


@dataclass
class CompressionState:
    """One prompt's compression, filled in layer by layer."""

    num_layers: int
    num_kv_heads: int
    seq_len: int
    budget: int  # B actually used: the given budget clamped to [forced tokens, N]
    modality: torch.Tensor  # [N] int64
    group: torch.Tensor  # [N] int64: the policy's content group of each token, FORCED for window/sinks
    group_sizes: torch.Tensor  # [NUM_GROUPS] int64 (CPU)
    num_forced: int
    floor: int  # fewest tokens any head keeps
    kept_counts: torch.Tensor  # [L, H] int64, filled as layers are selected
    phi: torch.Tensor  # [L] float64: per-head allocation of each layer (HCC's phi; B or fixed budget else)
    layer_budget: torch.Tensor | None = None  # [L] per-head budget fixed in advance (pyramidkv)
    granule: int = 1  # every head keeps offset + a multiple of granule tokens (whole KV pages + the tail's share)
    offset: int = 0
    remaining: int = 0  # tokens still to keep over the layers not selected yet
    next_layer: int = 0
    scores: list = field(default_factory=list)  # per observed layer: [H, N] scores (None if keeps_all)
    planned_counts: torch.Tensor | None = None  # [L, H] per-head counts fixed before selection (HCC global/layer)
    _group_on: dict = field(default_factory=dict, repr=False)
    _rankings: dict = field(default_factory=dict, repr=False)

    @property
    def total_budget(self) -> int:
        return self.num_layers * self.num_kv_heads * self.budget

    @property
    def keeps_all(self) -> bool:
        return self.budget >= self.seq_len

    def group_on(self, device) -> torch.Tensor:
        device = torch.device(device)
        if device not in self._group_on:
            self._group_on[device] = self.group.to(device)
        return self._group_on[device]


@dataclass
class Ranking:
    """Tokens of each head ordered by descending score; ties to the lower index (stable sort)."""

    scores: torch.Tensor  # [H, N] in token order
    order: torch.Tensor  # [H, N] token indices, best first
    group: torch.Tensor  # [H, N] group of the token at each rank

    @classmethod
    def of(cls, scores: torch.Tensor, group: torch.Tensor) -> "Ranking":
        order = torch.sort(scores, dim=1, descending=True, stable=True).indices
        return cls(scores, order, group[order])

    def sorted_scores(self) -> torch.Tensor:
        return self.scores.gather(1, self.order)

    def mass_and_demand(self, num_groups: int, theta: float | None = None):
        """Per head and content group: w = summed score, and (if theta) the demand k = fewest
        best-scored tokens of the group whose scores sum to >= theta * w. CPU tensors [H, G]."""
        s = self.sorted_scores().double()
        h = s.shape[0]
        mass = torch.zeros(h, num_groups, dtype=torch.float64)
        demand = torch.zeros(h, num_groups, dtype=torch.int64)
        for m in range(num_groups):
            in_m = self.group == m
            vals = torch.where(in_m, s, 0.0)
            cum = vals.cumsum(1)
            w = cum[:, -1:]
            mass[:, m] = w[:, 0].cpu()
            if theta is not None:
                before = F.pad(cum[:, :-1], (1, 0))  # mass of the better tokens of this group
                demand[:, m] = (in_m & (before < theta * w)).sum(1).cpu()
        return mass, demand


def align_quota(state: CompressionState, layer: int, quota: torch.Tensor) -> torch.Tensor:
    """Round one layer's quotas so every head keeps r + j·g tokens (``g = state.granule``,
    ``r = state.offset``, j >= 0 whole granules).

    The layer's granules go to the nearest whole number, clamped so the later layers can still
    reach exactly L·H·B (each head between the fewest granules covering ``state.floor`` and the
    most that fit in N); heads get granules in proportion to what the policy asked for above
    that floor (largest remainder); a head's extra or missing tokens are given to or taken from
    its content groups in proportion to their quotas (the selector then keeps each group's
    best). HCC sees the rounded counts through ``state.remaining``, so later layers compensate.
    Quotas already of that form and feasible (uniform B, AdaKV's layer total H·B, PyramidKV's
    aligned schedule) come back unchanged.
    """
    g, r, h, n = state.granule, state.offset, state.num_kv_heads, state.seq_len
    asked = quota.sum(1)
    lo, hi = -(-max(state.floor - r, 0) // g), (n - r) // g
    left = state.num_layers - layer - 1
    rem = (state.remaining - (left + 1) * h * r) // g  # granules still to keep, this layer included
    total = int(math.floor((int(asked.sum()) - h * r) / g + 0.5))
    total = min(max(total, h * lo, rem - left * h * hi), h * hi, rem - left * h * lo)
    if h * r + total * g == int(asked.sum()) and not bool(((asked - r) % g).any()):
        return quota
    weight = ((asked - r).double() / g - lo).clamp_min(0.0)
    want = r + (lo + apportion(total - h * lo, weight, torch.full((h,), hi - lo))) * g
    content = quota[:, :FORCED]
    room = state.group_sizes[:FORCED].expand_as(content) - content
    more, less = (want - asked).clamp_min(0), (asked - want).clamp_min(0)
    out = quota.clone()
    out[:, :FORCED] = content + apportion(more, content.double(), room) - apportion(less, content.double(), content)
    return out


def select_by_quota(ranking: Ranking, quota: torch.Tensor) -> list[torch.Tensor]:
    """Keep, per head h and group g, the quota[h, g] best-ranked tokens of g. Sorted indices per head."""
    quota = quota.to(ranking.order.device)
    take = torch.zeros_like(ranking.order, dtype=torch.bool)
    for g in range(quota.shape[1]):
        if not bool((quota[:, g] > 0).any()):
            continue
        in_g = ranking.group == g
        take |= in_g & (in_g.cumsum(1) <= quota[:, g : g + 1])
    keep = torch.zeros_like(take).scatter_(1, ranking.order, take)
    return [row.nonzero(as_tuple=True)[0] for row in keep]


def _all_tokens(h: int, n: int, device) -> list[torch.Tensor]:
    ar = torch.arange(n, device=device)
    return [ar.clone() for _ in range(h)]



# ----------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------


@dataclass
class Policy:
    """Base: every head keeps B tokens, the forced ones plus the best-scored others: SnapKV with
    pooled window attention, StreamingLLM with the Recency scorer."""

    window: int = 32
    sink_tokens: int = 0
    scorer: Scorer = field(default_factory=WindowAttention)

    # -- hooks -------------------------------------------------------------------------------
    def forced_mask(self, n: int, budget: int) -> torch.Tensor:
        """Tokens every head keeps: the observation window and the sinks."""
        forced = torch.zeros(n, dtype=torch.bool)
        forced[: min(self.sink_tokens, n)] = True
        forced[n - min(self.window, n) :] = True
        return forced

    def content_group(self, modality: torch.Tensor) -> torch.Tensor:
        """Group of each non-forced token; one group ("any") unless the policy splits by modality."""
        return torch.zeros_like(modality)

    def effective_budget(self, budget: int, n: int, num_forced: int) -> int:
        return int(min(max(int(budget), num_forced), n))

    def init_state(self, state: CompressionState) -> None:
        pass

    def quotas(self, state: CompressionState, layer: int, ranking: Ranking) -> torch.Tensor:
        """[H, NUM_GROUPS] tokens each head keeps from each group (FORCED column = all forced)."""
        quota = self._empty_quota(state)
        quota[:, 0] = state.budget - state.num_forced
        return quota

    # -- API ---------------------------------------------------------------------------------
    def begin(
        self,
        *,
        num_layers: int,
        num_kv_heads: int,
        seq_len: int,
        modality: torch.Tensor,
        budget: int,
        granule: int = 1,
        offset: int = 0,
    ) -> CompressionState:
        """``granule`` > 1: every (layer, head) keeps ``offset`` + a multiple of ``granule`` tokens
        (whole KV pages plus a share of the tail page, see madakv_vllm/accounting.py); ``budget``
        must be of that form too."""
        n = int(seq_len)
        if n < 1 or num_layers < 1 or num_kv_heads < 1 or granule < 1 or not 0 <= offset < granule:
            raise ValueError("begin: need seq_len, num_layers, num_kv_heads, granule >= 1, 0 <= offset < granule")
        mod = torch.as_tensor(modality).to("cpu", torch.int64).reshape(-1)
        if mod.numel() != n:
            raise ValueError(f"begin: modality has {mod.numel()} entries, seq_len is {n}")
        if mod.min() < 0 or mod.max() >= NUM_MODALITIES:
            raise ValueError(f"begin: modality ids must be in [0, {NUM_MODALITIES})")
        b = self.effective_budget(budget, n, int(Policy.forced_mask(self, n, n).sum()))
        if granule > 1 and b < n and (b - offset) % granule:
            raise ValueError(f"begin: budget {b} is not {offset} + a multiple of granule {granule}")
        forced = self.forced_mask(n, b)
        group = torch.where(forced, FORCED, self.content_group(mod))
        state = CompressionState(
            num_layers=num_layers,
            num_kv_heads=num_kv_heads,
            seq_len=n,
            budget=b,
            modality=mod,
            group=group,
            group_sizes=torch.bincount(group, minlength=NUM_GROUPS),
            num_forced=int(forced.sum()),
            floor=int(forced.sum()),
            kept_counts=torch.zeros(num_layers, num_kv_heads, dtype=torch.int64),
            phi=torch.full((num_layers,), float(b), dtype=torch.float64),
            remaining=num_layers * num_kv_heads * b,
            granule=granule if b < n else 1,
            offset=offset if b < n else 0,
        )
        self.init_state(state)
        return state

    def select_layer(
        self, state: CompressionState, layer: int, query: torch.Tensor | None, key: torch.Tensor
    ) -> list[torch.Tensor]:
        h, n = state.num_kv_heads, state.seq_len
        if key.dim() != 3 or key.shape[0] != h or key.shape[1] != n:
            raise ValueError(f"select_layer: key {tuple(key.shape)}, expected [{h}, {n}, D]")
        if state.keeps_all:
            self._check_layer(state, layer)
            return self._record(state, layer, torch.full((h,), n), _all_tokens(h, n, key.device))
        return self.select_layer_scores(state, layer, self.scorer.score(query, key))

    def select_layer_scores(
        self, state: CompressionState, layer: int, scores: torch.Tensor
    ) -> list[torch.Tensor]:
        """select_layer from precomputed scores [H, N] (the scorer's output)."""
        self._check_layer(state, layer)
        h, n = state.num_kv_heads, state.seq_len
        if tuple(scores.shape) != (h, n):
            raise ValueError(f"scores {tuple(scores.shape)}, expected ({h}, {n})")
        if state.keeps_all:
            return self._record(state, layer, torch.full((h,), n), _all_tokens(h, n, scores.device))
        ranking = state._rankings.pop(layer, None) or Ranking.of(scores, state.group_on(scores.device))
        quota = self.quotas(state, layer, ranking)
        if state.granule > 1:
            quota = align_quota(state, layer, quota)
        return self._record(state, layer, quota.sum(1), select_by_quota(ranking, quota))

    def observe_layer(self, state: CompressionState, layer: int, query: torch.Tensor | None, key: torch.Tensor) -> None:
        """Score one layer (layers in order) and keep its scores [H, N] for :meth:`select_observed`.
        The prompt's compression runs after the last layer's attention, so every policy can see
        all layers' scores before any layer selects; streamed rules simply do not look ahead."""
        h, n = state.num_kv_heads, state.seq_len
        if key.dim() != 3 or key.shape[0] != h or key.shape[1] != n:
            raise ValueError(f"observe_layer: key {tuple(key.shape)}, expected [{h}, {n}, D]")
        if layer != len(state.scores):
            raise ValueError(f"observe_layer: expected layer {len(state.scores)}, got {layer} (layers go in order)")
        state.scores.append(None if state.keeps_all else self.scorer.score(query, key))

    def select_observed(self, state: CompressionState) -> list[list[torch.Tensor]]:
        """Every layer's kept indices (per layer, H sorted index tensors), once all are observed."""
        if len(state.scores) != state.num_layers or state.next_layer != 0:
            raise ValueError(f"select_observed: {len(state.scores)} of {state.num_layers} layers observed")
        if state.keeps_all:
            h, n = state.num_kv_heads, state.seq_len
            return [self._record(state, l, torch.full((h,), n), _all_tokens(h, n, "cpu")) for l in range(state.num_layers)]
        self.plan(state)
        return [self.select_layer_scores(state, l, scores) for l, scores in enumerate(state.scores)]

    def plan(self, state: CompressionState) -> None:
        """Hook run once all layers are scored, before any selects (HCC's global readings)."""

    def select_all(
        self,
        query_per_layer: Sequence[torch.Tensor | None],
        key_per_layer: Sequence[torch.Tensor],
        modality: torch.Tensor,
        budget: int,
    ) -> list[list[torch.Tensor]]:
        h, n, _ = key_per_layer[0].shape
        state = self.begin(
            num_layers=len(key_per_layer), num_kv_heads=h, seq_len=n, modality=modality, budget=budget
        )
        self.last_state = state  # for tests and benchmarks
        for l, (q, k) in enumerate(zip(query_per_layer, key_per_layer)):
            self.observe_layer(state, l, q, k)
        return self.select_observed(state)

    # -- decode-time re-compression ------------------------------------------------------------
    def decode_rule(self) -> "Policy":
        """The policy whose prompt-time rule re-compresses one head during decoding (with the
        head's count fixed by the page contract): itself, unless its rule allocates across heads
        or layers in a way a fixed count replaces (MadaKV's HCC)."""
        return self

    def recompress(self, query: torch.Tensor, key: torch.Tensor, modality: torch.Tensor, keep: int) -> torch.Tensor:
        """Cut one head's n retained entries (in position order) to ``min(keep, n)``, with this
        policy's own rule; returns sorted indices. ``query``: [G, Wq, D] the most recent window
        queries of the head's query group; ``key``: [n, D]; ``modality``: [n] (generated tokens are
        text). The window is the last min(window, n) entries; sinks are the first entries."""
        return self.recompress_scores(self.scorer.score(query, key.unsqueeze(0))[0], modality, keep)

    def recompress_scores(self, scores: torch.Tensor, modality: torch.Tensor, keep: int) -> torch.Tensor:
        """:meth:`recompress` from the scorer's output [n] for the head."""
        n = scores.numel()
        keep = max(0, min(int(keep), n))
        if keep == n:
            return torch.arange(n, device=scores.device)
        w = min(self.window, n)
        if keep <= w:  # not even the window fits: the most recent entries
            return torch.arange(n - keep, n, device=scores.device)
        rule = self.decode_rule()
        sinks = min(rule.sink_tokens, keep - w)
        if sinks != rule.sink_tokens:
            rule = dataclasses.replace(rule, sink_tokens=sinks)
        state = rule.begin(num_layers=1, num_kv_heads=1, seq_len=n, modality=modality, budget=keep)
        return rule.select_layer_scores(state, 0, scores.reshape(1, n))[0]

    # -- helpers -----------------------------------------------------------------------------
    @staticmethod
    def _check_layer(state: CompressionState, layer: int) -> None:
        if layer != state.next_layer:
            raise ValueError(f"select_layer: expected layer {state.next_layer}, got {layer} (layers go in order)")

    @staticmethod
    def _record(state, layer, counts, kept):
        state.kept_counts[layer] = counts.cpu()
        state.remaining -= int(counts.sum())
        state.next_layer = layer + 1
        return kept

    @staticmethod
    def _empty_quota(state: CompressionState) -> torch.Tensor:
        quota = torch.zeros(state.num_kv_heads, NUM_GROUPS, dtype=torch.int64)
        quota[:, FORCED] = state.num_forced
        return quota

    def _split(self, state, total: torch.Tensor, mass: torch.Tensor) -> torch.Tensor:
        """Per head: ``total[h]`` non-forced slots split over content groups by mass (MPA),
        capped by each group's token count. [H, G]."""
        g = mass.shape[1]
        return apportion(total, mass, state.group_sizes[:g].expand(mass.shape[0], g))


