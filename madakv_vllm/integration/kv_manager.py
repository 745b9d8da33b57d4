"""Scheduler side: a KV cache spec whose manager returns evicted pages to vLLM's pool.

The manager never hears from the workers: which pages a request keeps is a pure
function of its compression length, effective config and the block size
(madakv_vllm.accounting), computed identically on both sides.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from madakv_vllm.accounting import RequestPlan
from madakv_vllm.config import MadaKVConfig, resolve
from madakv_vllm.integration import metrics

logger = logging.getLogger("vllm.madakv")


@dataclass(frozen=True, kw_only=True)
class MadaKVAttentionSpec(FullAttentionSpec):
    """Full attention whose pages may be freed mid-request. Carries the server-wide
    MadaKV config (JSON) so the scheduler process needs nothing else."""

    madakv_config: str = "{}"

    @property
    def prefix_cacheable(self) -> bool:
        return False  # a compacted page no longer holds the tokens its hash names

    @classmethod
    def merge(cls, specs):
        merged = super().merge(specs)  # rebuilds from base fields only
        return dataclasses.replace(merged, madakv_config=specs[0].madakv_config)

    @classmethod
    def from_full(cls, spec: FullAttentionSpec, config_json: str) -> "MadaKVAttentionSpec":
        base = {f.name: getattr(spec, f.name) for f in dataclasses.fields(spec) if f.init}
        return cls(**base, madakv_config=config_json)


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
        # The worker compresses at exactly this length, in the step that completes the prompt.
        if st.prompt_done(processed_computed_tokens, self.block_size) and st.plan is not None:
            metrics.request_compressed(st.cfg.policy)
        if st.plan is None:
            return
        first, last = st.plan.freed_range(st.plan.event_len(processed_computed_tokens), self.block_size)
        blocks = self.req_to_blocks.get(request_id, ())
        last = min(last, len(blocks))
        if first >= last or blocks[last - 1] is self._null_block:
            return  # freed already (vLLM frees backwards from the range's end, up to a freed page)
        held = sum(b is not self._null_block for b in blocks[first:last])
        self._remove_blocks_in_range(request_id, first, last)
        metrics.pages_freed(held - sum(b is not self._null_block for b in blocks[first:last]))

    def pop_blocks_for_free(self, request_id: str):
        self.requests.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def request_config(server: MadaKVConfig, req_id: str, sampling_params) -> MadaKVConfig:
    """The engine side's view of a request's config. The frontend rejected invalid overrides
    already (HTTP 400); anything that still fails here falls back to the server config with a
    warning rather than crashing the engine. Scheduler and workers resolve identically."""
    try:
        return resolve(server, sampling_params.extra_args if sampling_params is not None else None)
    except ValueError as e:
        logger.warning("madakv: ignoring invalid per-request args of %s: %s", req_id, e)
        return server


def register_spec() -> None:
    """Map our spec to our manager in vLLM's registry (idempotent; called by ``register()``). The
    built-ins must be registered first, or the registry would skip them later."""
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(MadaKVAttentionSpec, MadaKVManager, uniform_type_base_spec=FullAttentionSpec)
