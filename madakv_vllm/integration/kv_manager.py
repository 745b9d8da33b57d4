"""Scheduler side: a KV cache spec whose manager returns evicted pages to vLLM's pool.

The manager never hears from the workers: which pages a request keeps is a pure
function of its compression length, effective config and the block size
(madakv_vllm.accounting), computed identically on both sides.

With vLLM's prefix caching on, a request compressed at its prompt's end packs into fresh pages
the manager allocates in the step that completes the prompt; its prompt pages go back to the
pool still hashed (reusable by a later request with the same prefix), and nothing it writes
after that is ever hashed (``cache_blocks``). A prefix-cache hit is capped so that the request
recomputes its observation window (``max_cache_hit``, applied by patches.py). A request resumed
after preemption replays its output in chunks that stop where it was compressed (``chunk_tokens``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from madakv_vllm.accounting import RequestPlan, peak_pages
from madakv_vllm.config import MadaKVConfig
from madakv_vllm.integration import metrics
from madakv_vllm.integration.rules import has_bounded_layers, request_config


@dataclass(frozen=True, kw_only=True)
class MadaKVAttentionSpec(FullAttentionSpec):
    """Full attention whose pages may be freed mid-request. Carries the server-wide
    MadaKV config (JSON) so the scheduler process needs nothing else."""

    madakv_config: str = "{}"
    max_chunk_tokens: int = 0  # the scheduler's token budget per step: the longest prefill chunk

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """What vLLM's startup check reserves for one request of max_model_len: with eviction during
        chunked prefill, its peak (budget + one chunk, accounting.peak_pages), so max_model_len
        may exceed the pool (not in a hybrid model, whose other groups share the pool:
        rules.has_bounded_layers); with prefix caching, stock's whole sequence plus the fresh pages
        its compression takes; otherwise stock's whole sequence."""
        cfg = MadaKVConfig.model_validate_json(self.madakv_config)
        stock = super().max_memory_usage_bytes(vllm_config)
        if vllm_config.parallel_config.decode_context_parallel_size > 1:
            return stock
        max_len = vllm_config.model_config.max_model_len
        if cfg.chunked and not has_bounded_layers(vllm_config.model_config):
            return min(stock, peak_pages(cfg, max_len, 0, self.block_size, self.max_chunk_tokens) * self.page_size_bytes)
        plan = RequestPlan(cfg=cfg, num_prompt_tokens=max_len,
                           prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching))
        return stock + plan.extra_pages(max_len, self.block_size) * self.page_size_bytes

    def max_num_blocks_per_req(self, vllm_config, max_len: int) -> int:
        """The workers' block-table width: with prefix caching, a compressed request's block list
        also holds its fresh pages, fewer than its prompt's (accounting.plan_compression)."""
        stock = super().max_num_blocks_per_req(vllm_config, max_len)
        return 2 * stock if vllm_config.cache_config.enable_prefix_caching else stock

    @classmethod
    def merge(cls, specs):
        merged = super().merge(specs)  # rebuilds from base fields only
        return dataclasses.replace(merged, madakv_config=specs[0].madakv_config,
                                   max_chunk_tokens=specs[0].max_chunk_tokens)

    @classmethod
    def from_full(cls, spec: FullAttentionSpec, config_json: str, max_chunk_tokens: int) -> "MadaKVAttentionSpec":
        base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return cls(**base, madakv_config=config_json, max_chunk_tokens=max_chunk_tokens)


class MadaKVManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: MadaKVAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.server_config = MadaKVConfig.model_validate_json(kv_cache_spec.madakv_config)
        self.requests: dict[str, RequestPlan] = {}

    def note_request(self, request) -> RequestPlan:
        """Called before every prefix-cache lookup and allocate_slots (patches.py): learn the
        request's config once."""
        st = self.requests.get(request.request_id)
        if st is None:
            cfg = request_config(self.server_config, request.request_id, request.sampling_params)
            st = RequestPlan(cfg=cfg, num_prompt_tokens=request.num_prompt_tokens, prefix_caching=self.enable_caching)
            self.requests[request.request_id] = st
        return st

    def max_cache_hit(self, request) -> int | None:
        """Most tokens of ``request`` a prefix-cache hit may cover, in whole pages (None: stock's)."""
        most = self.note_request(request).max_cache_hit(request.num_tokens, self.block_size)
        return None if most is None else most // self.block_size * self.block_size

    def replay_boundaries(self, request) -> list[int]:
        """Where a compressed request replaying this prompt hits the cache: its hit stops a window
        short of the prompt (``max_cache_hit``), for the request itself (resumed after preemption,
        or sent again) and for one with the server's config. vLLM retains a hybrid model's
        sliding-window and state pages only at the boundaries it is told (stock's: the prompt's
        last token): these are added (patches.py), or such a hit would find nothing."""
        out = set()
        for cfg in (self.note_request(request).cfg, self.server_config):
            plan = RequestPlan(cfg=cfg, num_prompt_tokens=request.num_prompt_tokens, prefix_caching=self.enable_caching)
            most = plan.max_cache_hit(request.num_prompt_tokens, self.block_size)
            if most:
                out.add(most // self.block_size * self.block_size)
        return sorted(out)

    def chunk_tokens(self, request, num_computed_tokens: int, num_new_tokens: int) -> int:
        """vLLM's chunk for ``request``, cut at its next compression (a resumed request replaying
        its output: accounting.RequestPlan.chunk_limit)."""
        limit = self.note_request(request).chunk_limit(num_computed_tokens, self.block_size)
        return num_new_tokens if limit is None else min(num_new_tokens, limit - num_computed_tokens)

    def cache_blocks(self, request, num_tokens: int, *args, **kwargs) -> None:
        """Hash only pages that hold a prompt's stock KV: never a compressed request's own."""
        st = self.requests.get(request.request_id)
        most = None if st is None else st.max_cached_tokens(self.block_size)
        super().cache_blocks(request, num_tokens if most is None else min(num_tokens, most), *args, **kwargs)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        st = self.requests.get(request_id)
        if st is None:
            return
        # The worker compresses at exactly these lengths, in the steps that reach them.
        was_compressed = st.plan is not None
        if st.advance(processed_computed_tokens, self.block_size) is None:
            return
        if not was_compressed:
            metrics.request_compressed(st.cfg.policy)
        blocks = self.req_to_blocks.get(request_id, [])
        freed = 0
        for first, last in st.plan.freed_runs(st.event_len, self.block_size):
            # vLLM frees backwards from a range's end up to a freed page: give it each held stretch
            j = min(last, len(blocks))
            while j > first:
                if blocks[j - 1] is self._null_block:
                    j -= 1
                    continue
                i = j
                while i > first and blocks[i - 1] is not self._null_block:
                    i -= 1
                self._remove_blocks_in_range(request_id, i, j)
                freed += j - i
                j = i
        if freed:
            metrics.pages_freed(freed)

    def _slots_with_fresh_pages(self, request_id, num_tokens: int, num_tokens_main_model: int) -> int:
        """vLLM's slot count plus the request's fresh pages (prefix caching: accounting.py)."""
        st = self.requests.get(request_id)
        return num_tokens + (0 if st is None else st.extra_pages(num_tokens_main_model, self.block_size) * self.block_size)

    def allocate_new_blocks(self, request_id, num_tokens: int, num_tokens_main_model: int):
        return super().allocate_new_blocks(
            request_id, self._slots_with_fresh_pages(request_id, num_tokens, num_tokens_main_model), num_tokens_main_model)

    def get_num_blocks_to_allocate(self, request_id, num_tokens, new_computed_blocks, total_computed_tokens,
                                   num_local_computed_tokens, num_tokens_main_model, *args,
                                   apply_admission_cap: bool = False, **kwargs) -> int:
        """The fresh pages a compression takes count too (prefix caching). With
        ``apply_admission_cap`` (vLLM's admission gate and its reservation for prefills in flight)
        a request that evicts during chunked prefill needs its peak, not its whole sequence."""
        need = super().get_num_blocks_to_allocate(
            request_id, self._slots_with_fresh_pages(request_id, num_tokens, num_tokens_main_model),
            new_computed_blocks, total_computed_tokens, num_local_computed_tokens, num_tokens_main_model, *args,
            apply_admission_cap=apply_admission_cap, **kwargs)
        st = self.requests.get(request_id)
        if apply_admission_cap and st is not None and st.cfg.chunked:
            held = sum(b is not self._null_block for b in self.req_to_blocks.get(request_id, ()))
            peak = peak_pages(st.cfg, num_tokens, 0, self.block_size, self.kv_cache_spec.max_chunk_tokens)
            need = min(need, max(peak - held, 0))
        return need

    def pop_blocks_for_free(self, request_id: str):
        self.requests.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def register_spec() -> None:
    """Map our spec to our manager in vLLM's registry (idempotent; called by ``register()``). The
    built-ins must be registered first, or the registry would skip them later."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(MadaKVAttentionSpec, MadaKVManager, uniform_type_base_spec=FullAttentionSpec)
