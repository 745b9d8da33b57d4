"""Scheduler side: a KV cache spec whose manager returns evicted pages to vLLM's pool.

The manager never hears from the workers: which pages a request keeps is a pure
function of its compression length, effective config and the block size
(madakv_vllm.accounting), computed identically on both sides.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from dataclasses import dataclass

from vllm.v1.core.single_type_kv_cache_manager import FullAttentionManager
from vllm.v1.kv_cache_interface import FullAttentionSpec
from vllm.v1.kv_cache_spec_registry import KVCacheSpecRegistry

from madakv_vllm.accounting import CompressionPlan, plan_compression
from madakv_vllm.config import MadaKVConfig, request_overrides

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


@dataclass
class _RequestPages:
    cfg: MadaKVConfig
    num_prompt_tokens: int
    decided: bool = False
    plan: CompressionPlan | None = None


class MadaKVManager(FullAttentionManager):
    def __init__(self, kv_cache_spec: MadaKVAttentionSpec, **kwargs) -> None:
        super().__init__(kv_cache_spec, **kwargs)
        self.server_config = MadaKVConfig.model_validate_json(kv_cache_spec.madakv_config)
        self.requests: dict[str, _RequestPages] = {}
        _install_allocate_hook()

    def note_request(self, request) -> None:
        """Called before every allocate_slots: learn the request's effective config once."""
        if request.request_id in self.requests:
            return
        params = request.sampling_params
        try:
            cfg = self.server_config.with_overrides(request_overrides(params.extra_args if params else None))
        except ValueError as e:  # validated in the frontend; never crash the engine here
            logger.warning("madakv: ignoring invalid per-request args of %s: %s", request.request_id, e)
            cfg = self.server_config
        self.requests[request.request_id] = _RequestPages(cfg, request.num_prompt_tokens)

    def remove_skipped_blocks(self, request_id, processed_computed_tokens, num_prompt_tokens=None) -> None:
        st = self.requests.get(request_id)
        if st is None:
            return
        if not st.decided:
            if processed_computed_tokens < st.num_prompt_tokens:
                return
            # The worker compressed at exactly this length, in the step that completed the prompt.
            st.decided = True
            st.plan = plan_compression(st.cfg, processed_computed_tokens, self.block_size)
        if st.plan is None:
            return
        first, last = st.plan.freed_range(st.plan.event_len(processed_computed_tokens), self.block_size)
        self._remove_blocks_in_range(request_id, first, last)

    def pop_blocks_for_free(self, request_id: str):
        self.requests.pop(request_id, None)
        return super().pop_blocks_for_free(request_id)


def _install_allocate_hook() -> None:
    """KVCacheManager.allocate_slots sees the Request; single-type managers only its id."""
    from vllm.v1.core.kv_cache_manager import KVCacheManager

    if getattr(KVCacheManager, "_madakv_patched", False):
        return
    orig = KVCacheManager.allocate_slots

    @functools.wraps(orig)
    def allocate_slots(self, request, *args, **kwargs):
        managers = self.__dict__.get("_madakv_managers")
        if managers is None:
            managers = [m for m in self.coordinator.single_type_managers if isinstance(m, MadaKVManager)]
            self._madakv_managers = managers
        for m in managers:
            m.note_request(request)
        return orig(self, request, *args, **kwargs)

    KVCacheManager.allocate_slots = allocate_slots
    KVCacheManager._madakv_patched = True


def _register() -> None:
    KVCacheSpecRegistry._ensure_registered()
    KVCacheSpecRegistry.register(MadaKVAttentionSpec, MadaKVManager, uniform_type_base_spec=FullAttentionSpec)


_register()
