"""Worker side: per-request retained-KV state, selection and compaction.

Timeline of one request (see madakv_vllm/accounting.py for the page contract):
1. Prefill chunks run in the stock layout (head h of page p is sub-block p*H+h);
   the last ``window`` queries of every layer are kept. A prefix-cache hit
   supplies the first pages (shared with other requests, never written here).
2. In the step whose chunk completes the prompt (length C), every layer, right
   after its attention, asks the policy which tokens each KV head keeps. After
   the LAST layer, all layers' retained entries are gathered and re-written,
   packed, into the sub-blocks of the pages the request keeps: with prefix
   caching, fresh pages the scheduler appended in this step (accounting.py),
   else the first pages. The scheduler frees the other pages when it next
   schedules, i.e. after this step.
   With ``prefill_eviction: chunked`` this first compression may come after an
   earlier chunk, to the budget of the tokens seen so far; later chunks are then
   appended to every (layer, head) sequence like decode tokens (the kernel's
   causal mask holds: they are each sequence's last entries) and cut back after
   each chunk, every head to its share of the new budget, with the policy's rule.
3. Decoding appends each new token to every (layer, head) sequence; new
   sub-blocks come from pages the scheduler appends.
4. Every ``recompress_interval`` tokens, each head drops back to its retained
   count (window kept) and is re-packed the same way.
Logical positions never change (RoPE is applied before the cache); only
physical slots, per-head lengths and block tables do.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from madakv_vllm.accounting import EventKind, RequestPlan, cdiv
from madakv_vllm.config import MODALITY_NAMES, MadaKVConfig
from madakv_vllm.integration import metrics
from madakv_vllm.integration.paged import FlatKVCache
from madakv_vllm.integration.rules import request_config
from madakv_vllm.modality import modality_array

logger = logging.getLogger("vllm.madakv")


@dataclass(kw_only=True)
class RequestKV(RequestPlan):
    """One request on a worker: its plan (shared rule with the scheduler, accounting.py) and, once
    compressed, where each (layer, KV head)'s retained entries live."""

    req_id: str
    mm_features: list
    # rolling window of the most recent queries, per layer: [Hq, W, D]
    queries: list[torch.Tensor | None] = field(default_factory=list)
    # Compressed layout (set by the first compaction). Entry j of (layer l, head h) -- its j-th
    # retained token, in position order -- lives in slot j % bs of flat sub-block
    # subblocks[l, h, j // bs] of the per-head view (paged.FlatKVCache).
    subblocks: torch.Tensor | None = None  # [L, H, cap] flat sub-block ids owned by each sequence (int64)
    lens: torch.Tensor | None = None  # [L, H] entries per (layer, head)
    base_counts: torch.Tensor | None = None  # [L, H] retained after the prompt's compression
    entry_modality: torch.Tensor | None = None  # [L, H, cap_tokens] modality id of each entry
    entry_position: torch.Tensor | None = None  # [L, H, cap_tokens] logical position of each entry
    free: list[int] = field(default_factory=list)  # owned sub-blocks not yet used by any sequence
    known_blocks: int = 0  # pages of the request's block list already split into `free`

    _modality: torch.Tensor | None = None

    @property
    def is_compressed(self) -> bool:
        return self.subblocks is not None

    def used_subblocks(self, block_size: int) -> torch.Tensor:
        """[L, H] sub-blocks each sequence uses: exactly enough for its entries."""
        return (self.lens + block_size - 1) // block_size

    def modality(self, length: int) -> torch.Tensor:
        """int8 [length] modality ids, built once from the placeholders and cached."""
        if self._modality is None or self._modality.numel() < length:
            self._modality = modality_array(max(length, self.num_prompt_tokens), self.mm_features)
        return self._modality[:length]

    @property
    def tracks_queries(self) -> bool:
        """Window queries are needed until the prompt's compression, then only to re-compress."""
        return not self.decided or (self.plan is not None and self.plan.interval > 0)

    def push_queries(self, layer: int, q: torch.Tensor, window: int) -> None:
        """q: [n, Hq, D] of this step's tokens (in order)."""
        q = q[-window:].transpose(0, 1)  # [Hq, n, D]
        buf = self.queries[layer]
        buf = q.clone() if buf is None else torch.cat([buf, q], dim=1)[:, -window:]
        self.queries[layer] = buf


@dataclass
class Event:
    """One compression of one request in this step."""

    req: RequestKV
    length: int  # logical length after this step
    kind: EventKind
    block_ids: list[int]
    from_stock: bool = True  # the request's first compression (its KV is in the stock layout)
    keep: torch.Tensor | None = None  # [L, H] entries each head keeps (a compressed request's event)
    kept: list = field(default_factory=list)  # per layer: list of H index tensors
    policy: object = None  # the request's policy (policies.Policy)
    policy_state: object = None  # policies.CompressionState of a prompt event
    seconds: float = 0.0  # spent in selection and compaction (not in the model's layers between)


class WorkerKV:
    """The worker's MadaKV requests of one KV cache group: their registry (request id ->
    RequestKV), the policy's selection after each layer, and the compactor that packs retained
    KV into the pages that stay. A hybrid model's group holds its full-attention layers only, so
    budgets and HCC's schedule run over those layers, in model order."""

    def __init__(self, server_config: MadaKVConfig, layer_names: list[str], num_kv_heads: int, num_heads: int,
                 head_size: int, block_size: int, prefix_caching: bool = False):
        self.server_config = server_config
        self.prefix_caching = prefix_caching  # vLLM's prefix caching is on: compress into fresh pages
        self.layer_names = layer_names  # in model order
        self.layer_index = {n: i for i, n in enumerate(layer_names)}
        self.num_layers = len(layer_names)
        self.H, self.Hq, self.D, self.bs = num_kv_heads, num_heads, head_size, block_size
        self.G = num_heads // num_kv_heads
        self.requests: dict[str, RequestKV] = {}
        self.cache: FlatKVCache | None = None
        self.group_id = 0  # the group's index among the model's KV cache groups (set at startup)

    # --- request lifecycle ----------------------------------------------------

    def drop(self, req_ids) -> None:
        for rid in req_ids:
            self.requests.pop(rid, None)

    def request(self, req_id: str, req_state) -> RequestKV:
        rs = self.requests.get(req_id)
        if rs is None:
            cfg = request_config(self.server_config, req_id, req_state.sampling_params)
            rs = RequestKV(req_id=req_id, cfg=cfg, num_prompt_tokens=req_state.num_prompt_tokens,
                           prefix_caching=self.prefix_caching, mm_features=list(req_state.mm_features or []))
            rs.queries = [None] * self.num_layers
            self.requests[req_id] = rs
        return rs

    # --- per step ---------------------------------------------------------------

    def plan_row(self, rs: RequestKV, length: int, block_ids: list[int]) -> Event | None:
        """Decide whether this step's chunk (or decode token) triggers a compression event; a
        compressed request's new entries are already appended (append_slots)."""
        prev_len = rs.event_len
        kind = rs.advance(length, self.bs)
        if kind is None:
            if rs.decided and rs.plan is None:
                rs.queries = [None] * self.num_layers  # never compressed: never needed again
            return None
        ev = Event(rs, length, kind, list(block_ids), from_stock=not rs.is_compressed)
        if ev.from_stock:
            return ev
        if kind is EventKind.RECOMPRESS:
            # Page-aligned: a head keeps r_T + whole sub-blocks, r_T = T mod bs entries sharing the
            # tail page (accounting.py). From the prompt's r_C + j*bs that is base - ((r_C - r_T) mod bs),
            # never more than the base (only a sub-page base with r_T > r_C keeps r_T).
            drop = (rs.plan.offset(rs.plan.comp_len) - rs.plan.offset(length)) % rs.plan.granule
            keep = rs.base_counts - drop
            ev.keep = torch.where(keep >= 0, keep, keep + rs.plan.granule)
        else:  # a chunk appended to a compressed request: cut back to the budget at this length
            ev.keep = chunk_counts(rs.lens, rs.lens - (length - prev_len), rs.plan, rs.cfg.window + rs.cfg.sinks)
        return ev

    def append_slots(self, rs: RequestKV, block_ids: list[int], first: int, count: int) -> torch.Tensor:
        """Reserve slots in every (layer, head) sequence for a compressed request's next ``count``
        tokens, at logical positions ``first`` on (one decode token, or a later prefill chunk),
        appended in order, so each sequence's last entries (the kernel's causal mask holds).

        Returns [L, H, count] flat slots and advances the lengths.
        """
        c, bs = self.cache, self.bs
        for j in range(rs.known_blocks, len(block_ids)):
            page = block_ids[j]
            rs.free.extend(int(c.subblock(l, page, h)) for l in range(self.num_layers) for h in range(self.H))
        rs.known_blocks = len(block_ids)
        n = rs.lens
        have = (n + bs - 1) // bs  # sub-blocks in use
        need = (n + count + bs - 1) // bs - have  # new ones each sequence takes
        k = int(need.sum())
        if k:
            if k > len(rs.free):
                raise RuntimeError(f"madakv: request {rs.req_id} ran out of owned sub-blocks (accounting bug)")
            self._ensure_capacity(rs, int((have + need).max()))
            li, hi = need.nonzero(as_tuple=True)
            reps = need[li, hi]
            li, hi = li.repeat_interleave(reps), hi.repeat_interleave(reps)
            within = torch.arange(k) - torch.repeat_interleave(torch.cumsum(reps, 0) - reps, reps)
            rs.subblocks[li, hi, have[li, hi] + within] = torch.tensor(rs.free[:k], dtype=torch.long)
            del rs.free[:k]
        j = n.unsqueeze(-1) + torch.arange(count)  # [L, H, count] entry indices
        slots = torch.gather(rs.subblocks, 2, j // bs) * bs + j % bs
        self._ensure_tokens(rs, int(n.max()) + count)
        pos = torch.arange(first, first + count)
        mods = torch.zeros(count, dtype=torch.int8)  # generated tokens are text
        in_prompt = pos < rs.num_prompt_tokens
        mods[in_prompt] = rs.modality(rs.num_prompt_tokens)[pos[in_prompt]]
        rs.entry_modality.scatter_(2, j, mods.expand_as(j).contiguous())
        rs.entry_position.scatter_(2, j, pos.to(torch.int32).expand_as(j).contiguous())
        rs.lens = n + count
        return slots

    # --- selection (after each layer's attention) ---------------------------------

    def select_layer(self, ev: Event, layer: int) -> None:
        """Right after ``layer``'s attention. Prompt: the policy scores the layer; after the last
        layer it selects every layer's tokens at once (HCC's global readings need all layers).
        Re-compression: each head is cut back to its count with the request's own policy."""
        t0 = time.perf_counter()
        try:
            self._select_layer(ev, layer)
        finally:
            ev.seconds += time.perf_counter() - t0

    def _select_layer(self, ev: Event, layer: int) -> None:
        rs = ev.req
        from madakv_vllm.policies import make_policy

        cfg = rs.cfg
        queries = rs.queries[layer]  # [Hq, Wq, D]
        if ev.policy is None:
            ev.policy = make_policy(cfg)
        if ev.from_stock:
            n = ev.length
            if ev.policy_state is None:
                ev.policy_state = ev.policy.begin(
                    num_layers=self.num_layers, num_kv_heads=self.H, seq_len=n, modality=rs.modality(n).long(),
                    budget=rs.plan.budget, granule=rs.plan.granule, offset=rs.plan.offset(n))
            keys = self.read_stock(layer, ev.block_ids, n)[0]  # [H, n, D]
            wq = min(cfg.window, n)
            ev.policy.observe_layer(ev.policy_state, layer, queries[:, -wq:].float(), keys.float())
            if layer == self.num_layers - 1:
                ev.kept = [[k.to("cpu", torch.long) for k in kept] for kept in ev.policy.select_observed(ev.policy_state)]
        else:
            kept = []
            for h in range(self.H):
                n = int(rs.lens[layer, h])
                keys = self.read_compressed(rs, layer, h, n)[0]  # [n, D]
                wq = min(cfg.window, n)
                q = queries[h * self.G : (h + 1) * self.G, -wq:]
                idx = ev.policy.recompress(q.float(), keys.float(), rs.entry_modality[layer, h, :n].long(),
                                           int(ev.keep[layer, h]))
                kept.append(idx.to("cpu", torch.long))
            ev.kept.append(kept)

    # --- compaction (after the last layer) ---------------------------------------

    def compact(self, ev: Event) -> None:
        t0 = time.perf_counter()
        rs, c, bs, L, H = ev.req, self.cache, self.bs, self.num_layers, self.H
        if ev.from_stock:
            all_mods = rs.modality(ev.length)
            before = torch.bincount(all_mods.long(), minlength=len(MODALITY_NAMES)) * (L * H)
        else:
            before = entries_by_modality(rs.entry_modality, rs.lens)
        counts = torch.tensor([[len(ev.kept[l][h]) for h in range(H)] for l in range(L)], dtype=torch.long)
        src_slots, mods, poss = [], [], []
        for l in range(L):
            for h in range(H):
                idx = ev.kept[l][h]
                if ev.from_stock:
                    src_slots.append(self.stock_slots(l, h, ev.block_ids, idx))
                    mods.append(all_mods[idx])
                    poss.append(idx)
                else:
                    src_slots.append(rs.subblocks[l, h, idx // bs] * bs + idx % bs)
                    mods.append(rs.entry_modality[l, h, idx])
                    poss.append(rs.entry_position[l, h, idx].long())
        k_all, v_all = c.read(torch.cat(src_slots))  # gather everything before any write

        owned = rs.plan.owned_blocks(ev.length, len(ev.block_ids), bs)
        pages = [ev.block_ids[j] for j in owned]
        pool = (
            (torch.tensor(c.layer_slot).view(1, L, 1) * c.num_blocks + torch.tensor(pages).view(-1, 1, 1)) * H
            + torch.arange(H).view(1, 1, H)
        ).reshape(-1)
        nsub = (counts + bs - 1) // bs
        total_sub = int(nsub.sum())
        if total_sub > pool.numel():
            raise RuntimeError(
                f"madakv: {total_sub} sub-blocks needed but {pool.numel()} owned (request {rs.req_id}); accounting bug"
            )
        cap = max(int(nsub.max()) + 1, 4)
        sub = torch.zeros(L, H, cap, dtype=torch.long)
        starts = torch.cumsum(nsub.reshape(-1), 0) - nsub.reshape(-1)
        dst = []
        for i, (l, h) in enumerate((l, h) for l in range(L) for h in range(H)):
            k = int(nsub[l, h])
            sub[l, h, :k] = pool[int(starts[i]) : int(starts[i]) + k]
            j = torch.arange(int(counts[l, h]))
            dst.append(sub[l, h, j // bs] * bs + j % bs)
        c.put(k_all, v_all, torch.cat(dst))  # the stored elements, moved (an fp8 cache's bytes)

        tok_cap = max(int(counts.max()) + max(rs.cfg.recompress_interval, 64), 64)
        entry_modality = torch.zeros(L, H, tok_cap, dtype=torch.int8)
        entry_position = torch.zeros(L, H, tok_cap, dtype=torch.int32)
        for i, (l, h) in enumerate((l, h) for l in range(L) for h in range(H)):
            entry_modality[l, h, : int(counts[l, h])] = mods[i].to(torch.int8)
            entry_position[l, h, : int(counts[l, h])] = poss[i].to(torch.int32)
        rs.subblocks, rs.lens, rs.entry_modality, rs.entry_position = sub, counts, entry_modality, entry_position
        rs.free = pool[total_sub:].tolist()
        rs.known_blocks = len(ev.block_ids)
        if ev.kind is EventKind.PROMPT:
            rs.base_counts = counts.clone()
            if rs.plan.interval <= 0:
                rs.queries = [None] * L  # no re-compression: the window queries are not needed again
        kept = entries_by_modality(entry_modality, counts)
        metrics.compression(ev.kind.value, kept, before, ev.seconds + time.perf_counter() - t0)
        if ev.kind is EventKind.PROMPT and logger.isEnabledFor(logging.DEBUG):
            log_compression(rs, rs.modality(ev.length), kept, L * H, cdiv(ev.length, bs), len(pages))

    # --- reading entries -----------------------------------------------------------

    def stock_slots(self, layer: int, head: int, block_ids: list[int], positions: torch.Tensor) -> torch.Tensor:
        pages = torch.tensor(block_ids, dtype=torch.long)[positions // self.bs]
        return self.cache.subblock(layer, pages, head) * self.bs + positions % self.bs

    def read_stock(self, layer: int, block_ids: list[int], n: int):
        """K, V of positions [0, n) of every head, stock layout: [H, n, D] each, as the kernel
        reads them (an fp8 cache's dequantized with the layer's scales)."""
        pos = torch.arange(n)
        slots = torch.stack([self.stock_slots(layer, h, block_ids, pos) for h in range(self.H)])
        k, v = self.cache.read_values(layer, slots.reshape(-1))
        return k.view(self.H, n, self.D), v.view(self.H, n, self.D)

    def read_compressed(self, rs: RequestKV, layer: int, head: int, n: int):
        j = torch.arange(n)
        slots = rs.subblocks[layer, head, j // self.bs] * self.bs + j % self.bs
        return self.cache.read_values(layer, slots)

    # --- growth ------------------------------------------------------------------

    def _ensure_capacity(self, rs: RequestKV, nsub: int) -> None:
        if nsub > rs.subblocks.shape[2]:
            grow = torch.zeros(*rs.subblocks.shape[:2], max(nsub, 2 * rs.subblocks.shape[2]), dtype=torch.long)
            grow[:, :, : rs.subblocks.shape[2]] = rs.subblocks
            rs.subblocks = grow

    def _ensure_tokens(self, rs: RequestKV, n: int) -> None:
        cap = rs.entry_modality.shape[2]
        if n > cap:
            new_cap = max(n, 2 * cap)
            rs.entry_modality = torch.nn.functional.pad(rs.entry_modality, (0, new_cap - cap))
            rs.entry_position = torch.nn.functional.pad(rs.entry_position, (0, new_cap - cap))




def chunk_counts(lens: torch.Tensor, weight: torch.Tensor, plan, forced: int) -> torch.Tensor:
    """[L, H] entries each (layer, head) of a compressed request keeps at a chunk's event: exactly
    L*H*(P*bs + r) in all (``plan``'s budget), each r + whole sub-blocks, at least the ``forced``
    window and sinks and at most the ``lens`` it holds, the whole sub-blocks split in proportion to
    ``weight`` (what each head kept at the previous event: the policy's split carries forward)."""
    from madakv_vllm.policies.core import apportion

    bs, r = plan.granule, plan.offset(plan.comp_len)
    assert bool(((lens - r) % bs == 0).all()), "chunked eviction: a head's count lost its page alignment"
    avail = (lens - r) // bs
    lo = cdiv(max(forced - r, 0), bs)
    total = lens.numel() * (plan.keep_pages - lo)
    extra = apportion(total, weight.reshape(-1).double(), (avail - lo).reshape(-1))
    return r + (lo + extra.view_as(lens)) * bs


def entries_by_modality(entry_modality: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """Entries per modality over every (layer, head): ``entry_modality[l, h, :counts[l, h]]``."""
    live = torch.arange(entry_modality.shape[2]).view(1, 1, -1) < counts.unsqueeze(-1)
    return torch.bincount(entry_modality[live].long(), minlength=len(MODALITY_NAMES))


def log_compression(rs: RequestKV, prompt_mods: torch.Tensor, kept: torch.Tensor, num_heads: int,
                    pages_before: int, pages_after: int) -> None:
    """One DEBUG line per prompt compression (the demo parses it): per modality, prompt tokens and
    the tokens kept per (layer, KV head) on average (``kept``: entries over all ``num_heads``
    (layer, head) pairs); the request's KV pages before and after."""
    in_prompt = torch.bincount(prompt_mods.long(), minlength=len(MODALITY_NAMES))
    parts = [f"{name}={int(in_prompt[m])}->{float(kept[m]) / num_heads:.1f}"
             for m, name in enumerate(MODALITY_NAMES) if in_prompt[m] > 0]
    logger.debug("madakv compressed request=%s policy=%s budget=%s tokens=%d kept_per_head: %s pages=%d->%d",
                 rs.req_id, rs.cfg.policy, rs.cfg.budget, int(prompt_mods.numel()), " ".join(parts),
                 pages_before, pages_after)
