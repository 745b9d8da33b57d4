"""Scheduler side: a KV cache spec whose manager returns evicted pages to vLLM's pool.

The manager never hears from the workers: which pages a request keeps is a pure
function of its compression length, effective config and the block size
(madakv_vllm.accounting), computed identically on both sides.
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
from madakv_vllm.integration.rules import request_config


@dataclass(frozen=True, kw_only=True)
class MadaKVAttentionSpec(FullAttentionSpec):
    """Full attention whose pages may be freed mid-request. Carries the server-wide
    MadaKV config (JSON) so the scheduler process needs nothing else."""

    madakv_config: str = "{}"
    max_chunk_tokens: int = 0  # the scheduler's token budget per step: the longest prefill chunk

    @property
    def prefix_cacheable(self) -> bool:
        return False  # a compacted page no longer holds the tokens its hash names

    def max_memory_usage_bytes(self, vllm_config) -> int:
        """What vLLM's startup check reserves for one request of max_model_len: with eviction during
        chunked prefill, its peak (budget + one chunk, accounting.peak_pages), so max_model_len
        may exceed the pool; otherwise stock's whole sequence."""
        cfg = MadaKVConfig.model_validate_json(self.madakv_config)
        stock = super().max_memory_usage_bytes(vllm_config)
        if not cfg.chunked or vllm_config.parallel_config.decode_context_parallel_size > 1:
            return stock
        pages = peak_pages(cfg, vllm_config.model_config.max_model_len, 0, self.block_size, self.max_chunk_tokens)
        return min(stock, pages * self.page_size_bytes)

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

    def note_request(self, request) -> None:
        """Called before every allocate_slots (patches.py): learn the request's config once."""
        if request.request_id not in self.requests:
            cfg = request_config(self.server_config, request.request_id, request.sampling_params)
            self.requests[request.request_id] = RequestPlan(cfg=cfg, num_prompt_tokens=request.num_prompt_tokens)

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

    def get_num_blocks_to_allocate(self, request_id, num_tokens, *args, apply_admission_cap: bool = False, **kwargs) -> int:
        """With ``apply_admission_cap`` (vLLM's admission gate and its reservation for prefills in
        flight) a request that evicts during chunked prefill needs its peak, not its whole sequence."""
        need = super().get_num_blocks_to_allocate(request_id, num_tokens, *args,
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
