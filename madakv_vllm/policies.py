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

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F

from madakv_vllm.config import NUM_MODALITIES, TEXT, MadaKVConfig

FORCED = NUM_MODALITIES  # group id of window and sink tokens (always kept)
NUM_GROUPS = NUM_MODALITIES + 1

__all__ = [
    "FORCED",
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
    "TopKPolicy",
    "WindowAttention",
    "apportion",
    "make_policy",
    "pool_scores",
    "select_by_quota",
    "window_scores",
]


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
# Scorers
# ----------------------------------------------------------------------------------------------


def window_scores(
    q: torch.Tensor, k: torch.Tensor, kernel_size: int = 1, pooling: str = "avg"
) -> torch.Tensor:
    """psi[h, i] = sum over window queries j of attention(j -> i), averaged over the GQA group.

    ``q``: [Hq, Wq, D] post-RoPE queries of the last Wq prompt tokens (query head ``h*g + i`` belongs
    to KV head ``h``, as in vLLM/HF); ``k``: [H, N, D]. Causal: window query j sits at position
    N - Wq + j. Softmax in fp32 with scale 1/sqrt(D). Then optional 1-D pooling over the N - Wq
    tokens before the window with 'same' zero padding (left (k-1)//2, right k//2), as SnapKV and
    kvpress pool ``attn[..., :-window]``; the window's scores are returned unpooled. Returns
    float32 [H, N].
    """
    hq, wq, d = q.shape
    h, n, _ = k.shape
    if hq % h or not 1 <= wq <= n:
        raise ValueError(f"window_scores: q {tuple(q.shape)} incompatible with k {tuple(k.shape)}")
    g = hq // h
    logits = torch.matmul(q.float().reshape(h, g * wq, d) * d**-0.5, k.float().transpose(1, 2))
    # Only the last Wq keys can lie in a window query's future.
    future = torch.ones(wq, wq, dtype=torch.bool, device=k.device).triu_(1).repeat(g, 1)
    logits[:, :, n - wq :].masked_fill_(future, -math.inf)
    # softmax in place, then sum over rows as one mat-vec with 1/(Z*g): fewer passes over [H, g*Wq, N]
    logits.sub_(logits.amax(-1, keepdim=True)).exp_()
    inv_z = logits.sum(-1).mul_(g).reciprocal_()
    psi = torch.bmm(inv_z[:, None, :], logits)[:, 0]
    if kernel_size <= 1 or n == wq:
        return psi
    # As SnapKV and kvpress: pool the keys before the window only (zero padding at the window
    # boundary); the window's own scores stay raw (every policy keeps the window anyway).
    return torch.cat([pool_scores(psi[:, : n - wq], kernel_size, pooling), psi[:, n - wq :]], dim=1)


def pool_scores(psi: torch.Tensor, kernel_size: int, pooling: str = "avg") -> torch.Tensor:
    """1-D pooling over the token axis of [H, N] scores, output length N (SnapKV's smoothing)."""
    if kernel_size <= 1:
        return psi
    x = F.pad(psi[:, None], ((kernel_size - 1) // 2, kernel_size // 2))  # scores >= 0: zero pad is safe
    if pooling == "avg":
        x = F.avg_pool1d(x, kernel_size, stride=1)
    elif pooling == "max":
        x = F.max_pool1d(x, kernel_size, stride=1)
    else:
        raise ValueError(f"unknown pooling {pooling!r}")
    return x[:, 0]


class Scorer(Protocol):
    def score(self, query: torch.Tensor | None, key: torch.Tensor) -> torch.Tensor: ...


@dataclass
class WindowAttention:
    """Observation-window attention (SnapKV, MadaKV's psi; kernel_size=1 for H2O/LOOK-M)."""

    kernel_size: int = 5
    pooling: str = "avg"

    def score(self, query, key):
        return window_scores(query, key, self.kernel_size, self.pooling)


@dataclass
class Recency:
    """Later tokens first (StreamingLLM)."""

    def score(self, query, key):
        h, n, _ = key.shape
        return torch.arange(n, device=key.device, dtype=torch.float64).expand(h, n)


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
    """Base: every head keeps B tokens, the forced ones plus the best-scored others (SnapKV)."""

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


@dataclass
class TopKPolicy(Policy):
    """Uniform B per head, best-scored tokens: SnapKV (pooled window attention) or StreamingLLM (Recency)."""


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
        big_l, f, g = state.num_layers, state.num_forced, state.granule
        extra = state.budget - f
        if big_l == 1 or state.seq_len < 2 * extra:
            # As PyramidKV (KVCache-Factory PyramidKVCluster): a prompt shorter than twice the
            # non-window budget gets SnapKV's uniform budget (the pyramid would not fit under N).
            sched = torch.full((big_l,), float(extra), dtype=torch.float64)
        else:
            lo = extra / self.beta
            hi = 2 * extra - lo
            sched = hi - (hi - lo) * torch.arange(big_l, dtype=torch.float64) / (big_l - 1)
        if g > 1:  # the same schedule in whole granules: r + g * [ceil((F-r)/g), (N-r) // g] per layer
            r = state.offset
            low, high = -(-max(f - r, 0) // g), (state.seq_len - r) // g
            alloc = apportion(big_l * ((state.budget - r) // g - low), sched, torch.full((big_l,), high - low))
            state.layer_budget = r + (alloc + low) * g
        else:
            alloc = apportion(big_l * extra, sched, torch.full((big_l,), state.seq_len - f))
            state.layer_budget = alloc + f
        state.phi = state.layer_budget.double()

    def quotas(self, state, layer, ranking):
        quota = self._empty_quota(state)
        quota[:, 0] = int(state.layer_budget[layer]) - state.num_forced
        return quota


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


@dataclass
class MadaKVPolicy(Policy):
    """MadaKV. MPA: per head, the non-forced slots are split over modalities by the head's attention
    mass on each, then top scores within each modality. HCC: per-(layer, head) counts follow each
    head's demand (fewest tokens covering theta of each modality's mass, plus forced), exactly
    L*H*B in total, each between floor and N; ``hcc_mode`` says how (docs/method.md):

    * ``streamed``: layer by layer, each head keeps its clipped demand; the layer total is clamped so
      the remaining layers stay feasible and to ``max_scale`` times its fair share; the last layer
      takes the rest (only layers <= l are known when layer l selects).
    * ``global``: all layers scored first; L*H*B split over every (layer, head) in proportion to
      its demand, within [floor, N].
    * ``layer``: all layers scored first; L*H*B split over layers in proportion to each layer's
      total demand, then evenly over the layer's heads (the paper's phi[l] is per layer).

    A head whose count equals its raw demand keeps its demand per modality; otherwise MPA's split
    decides. With mpa off everything is one group; with both off this is SnapKV."""

    mpa: bool = True
    hcc: bool = True
    theta: float = 0.9
    min_per_head: int | None = None  # None -> window
    max_scale: float = float("inf")  # streamed: cap on a layer's total, in multiples of H * phi[l]
    hcc_mode: str = "streamed"

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
            quota[:, :groups] = self._split(state, total, mass) if self.mpa else total[:, None]
            return quota
        mass, demand = ranking.mass_and_demand(groups, self.theta)
        raw = f + demand.sum(1)
        if state.planned_counts is not None:
            counts = state.planned_counts[layer]
        else:
            counts = self._layer_counts(state, layer, raw.clamp(state.floor, n), self.max_scale)
        quota[:, :groups] = torch.where(
            (counts == raw)[:, None], demand, self._split(state, counts - f, mass)
        )
        return quota

    @staticmethod
    def _layer_counts(state: CompressionState, layer: int, want: torch.Tensor, max_scale: float = float("inf")) -> torch.Tensor:
        """Per-head counts of this layer: ``want`` unless the layer total must move to keep the
        remaining budget feasible (each later layer in [H*floor, H*N]) or exceeds ``max_scale`` times
        the layer's fair share H*phi[l] (greedy early layers would starve the later ones); then
        scaled by largest remainder."""
        h, n, fl, big_l = state.num_kv_heads, state.seq_len, state.floor, state.num_layers
        left = state.num_layers - layer - 1
        rem = state.remaining
        state.phi[layer] = rem / (h * (big_l - layer))
        lo = max(h * fl, rem - left * h * n)
        hi = min(h * n, rem - left * h * fl)
        if max_scale != float("inf"):
            hi = max(lo, min(hi, int(max_scale * h * float(state.phi[layer]))))
        asked = int(want.sum())
        total = min(max(asked, lo), hi)
        if total < asked:  # shrink each head's demand above the floor proportionally
            return fl + apportion(total - h * fl, (want - fl).double(), want - fl)
        if total > asked:  # grow in proportion to demand, up to N
            return want + apportion(total - asked, want.double(), n - want)
        return want


def make_policy(cfg: MadaKVConfig) -> Policy:
    """The policy named by ``cfg.policy``, with cfg's knobs."""
    common = dict(window=cfg.window, sink_tokens=cfg.sinks)
    pooled = WindowAttention(cfg.kernel_size, cfg.pooling)
    name = cfg.policy
    if name == "full":
        return FullPolicy(**common)
    if name == "streamingllm":
        return TopKPolicy(**common, scorer=Recency())
    if name == "snapkv":
        return TopKPolicy(**common, scorer=pooled)
    if name == "h2o":
        return H2OPolicy(**common, recent_ratio=cfg.h2o_recent_ratio)
    if name == "pyramidkv":
        return PyramidKVPolicy(**common, scorer=pooled, beta=cfg.pyramid_beta)
    if name == "adakv":
        return AdaKVPolicy(**common, scorer=pooled, alpha=cfg.adakv_alpha)
    if name == "lookm":
        return LookMPolicy(**common, recent_ratio=cfg.h2o_recent_ratio)
    if name == "madakv":
        return MadaKVPolicy(
            **common, scorer=pooled, mpa=cfg.mpa, hcc=cfg.hcc, theta=cfg.theta, min_per_head=cfg.head_floor,
            max_scale=cfg.hcc_max_scale, hcc_mode=cfg.hcc_mode,
        )
    raise ValueError(f"unknown policy {name!r}")
