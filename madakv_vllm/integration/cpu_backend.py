"""The MADAKV attention backend on vLLM's CPU platform: Backend / MetadataBuilder / Impl.

A thin adapter: it runs vLLM's own CPU paged-attention kernels on a per-head
view of the KV buffer, one kernel sequence per (request, KV head), so each head
can hold its own token set, and delegates the choice of tokens to
madakv_vllm.policies through WorkerKV.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import CpuArchEnum, current_platform
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec

from madakv_vllm.integration import per_head
from madakv_vllm.integration.block_layout import LayoutError, kernel_layout
from madakv_vllm.integration.eviction import WorkerKV
from madakv_vllm.integration.paged import FlatKVCache
from madakv_vllm.integration.rules import DEFAULT_BLOCK_SIZE, server_config

logger = logging.getLogger("vllm.madakv")


def cpu_description() -> str:
    """This machine's CPU model, and whether it has AMX tiles (vLLM's bf16 ISA choice hangs on it)."""
    import platform

    model = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), model)
    except OSError:
        pass
    return f"{model} ({'with' if torch.cpu._is_amx_tile_supported() else 'without'} AMX tiles)"


def portable_isa(block_size: int, head_size: int) -> str:
    """The ISA vLLM 0.32 picks on an x86 CPU without AMX (``_get_attn_isa``): the fallback."""
    return "vec16" if block_size % 32 or (head_size % 32 and head_size % 16 == 0) else "vec"


def readable_isa(isa: str, dtype: torch.dtype, block_size: int, head_size: int, kv_cache_dtype: str) -> str:
    """``isa`` if compaction can read its KV layout back (block_layout.probe), else the portable
    x86 ISA if that one reads back (with a WARNING naming both and the CPU); else startup stops,
    naming the ISA, the dtype and the CPU. Runs while the engine starts, before any request."""
    try:
        layout = kernel_layout(isa, block_size, head_size, dtype, kv_cache_dtype)
    except LayoutError as e:
        failure = e
    else:
        logger.info("madakv: CPU attention ISA %r (%s, block size %d, head size %d) on %s; KV layout read "
                    "back from vLLM's writer: %s", isa, dtype, block_size, head_size, cpu_description(),
                    layout.description)
        return isa
    fallback = portable_isa(block_size, head_size)
    if fallback != isa and current_platform.get_cpu_architecture() == CpuArchEnum.X86:
        try:
            kernel_layout(fallback, block_size, head_size, dtype, kv_cache_dtype)
        except LayoutError:
            pass
        else:
            logger.warning("madakv: vLLM chose CPU attention ISA %r for %s on %s, but its KV layout does not read "
                           "back (%s); using ISA %r, whose layout does", isa, dtype, cpu_description(), failure,
                           fallback)
            return fallback
    raise LayoutError(f"--attention-backend madakv cannot run CPU attention ISA {isa!r} with {dtype} on "
                      f"{cpu_description()}: {failure}. Serve without madakv, or try another --dtype")


class MadaKVCPUBackend(CPUAttentionBackend):
    """CPU_ATTN's capabilities (dtypes, head sizes, 32-token kernel blocks) minus what per-head
    eviction cannot serve: non-causal decoder attention and sinks (vLLM's validate_configuration
    refuses them at startup, rules.validate_backend). Sliding-window layers never reach it: a
    hybrid model's bounded layers run on stock's backend (rules.evicts)."""

    # We write K/V ourselves: slots are per (token, KV head) in the per-head view.
    forward_includes_kv_cache_update: bool = True

    @classmethod
    def supports_sliding_window(cls) -> bool:
        return False

    @classmethod
    def supports_non_causal(cls) -> bool:
        return False

    @classmethod
    def supports_mm_prefix(cls) -> bool:
        """Models whose image tokens attend bidirectionally (Gemma 3) are served causally, as vLLM
        0.32's CPU platform serves them with CPU_ATTN (which never reads the bidirectional ranges
        and is picked without this check): policy ``full`` gives stock's tokens."""
        return True

    @staticmethod
    def get_name() -> str:
        return "MADAKV"

    @staticmethod
    def get_impl_cls() -> type["MadaKVCPUImpl"]:
        return MadaKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type["MadaKVCPUMetadataBuilder"]:
        return MadaKVCPUMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return per_head.customize_spec(spec)

    @staticmethod
    def stock_backend_path() -> str:
        """What a hybrid model's chunked local attention layers wrap instead of us (patches.py)."""
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        return AttentionBackendEnum.CPU_ATTN.get_path()

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return preferred_block_size(cls, super().get_preferred_block_size(default_block_size))


def preferred_block_size(backend_cls, preferred: int) -> int:
    """The page size of an engine whose user did not set ``--block-size``: the backend's own
    preference, lowered to ``rules.DEFAULT_BLOCK_SIZE`` (32 tokens; pages are the unit in which
    eviction returns memory) where the kernels take that size, as ``rules.configure_engine`` does at
    startup. vLLM 0.33+ sets an unset block size to this after the model loads; vLLM 0.32's CPU
    platform never asks, and its CUDA platform asks with a default (16) below 32, kept as it is."""
    if preferred > DEFAULT_BLOCK_SIZE and backend_cls.supports_block_size(DEFAULT_BLOCK_SIZE):
        return DEFAULT_BLOCK_SIZE
    return preferred


@dataclass
class MadaKVMetadata(CPUAttentionMetadata):
    batch: per_head.PerHeadBatch | None = None
    ps_scheduler_metadata: list | None = None  # per layer


def layer_caches(vllm_config, layer_names: list[str]) -> list[torch.Tensor]:
    layers = get_layers_from_vllm_config(vllm_config, Attention, layer_names)
    caches = []
    for name in layer_names:
        kv = layers[name].kv_cache
        caches.append(kv[0] if isinstance(kv, (list, tuple)) else kv)
    return caches


class MadaKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runner = per_head.hooked_runner(self)
        isa = readable_isa(self.isa, self.dtype, self.block_size, self.head_dim, self.kv_cache_dtype)
        if isa != self.isa:
            self.isa = isa
            self._set_isa_to_layers(layer_names)  # the layers' writer and kernel use it too
        self._layers = sorted(layer_names, key=extract_layer_index)
        self.state = WorkerKV(
            server_config(vllm_config), self._layers, self.num_kv_heads, self.num_heads, self.head_dim, self.block_size,
            prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
        )
        per_head.STATES.add(self.state)

    def bind_kv_cache(self) -> None:
        """At startup, once the runner has allocated the KV cache (per_head.initializing_kv_cache)."""
        self.state.cache = FlatKVCache(layer_caches(self.vllm_config, self._layers), self.isa, self.kv_cache_dtype,
                                       self.dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        cm = common_attn_metadata
        if not isinstance(cm.causal, bool):
            raise ValueError("--attention-backend madakv supports causal decoder attention only")
        st = self.state
        batch = per_head.build_batch(st, common_attn_metadata, self.block_size, self.runner)
        H, R = self.num_kv_heads, common_attn_metadata.num_reqs
        sched = []
        for l in range(st.num_layers):
            if l > 0 and not batch.has_compressed:  # all layers share lengths
                sched.append(sched[0])
                continue
            sched.append(
                ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=H * R,
                    num_heads=self.num_heads // H,
                    num_kv_heads=1,
                    head_dim=self.head_dim,
                    seq_lens=batch.ps_seq_lens[l],
                    dtype=self.dtype,
                    query_start_loc=batch.ps_query_start_loc,
                    causal=cm.causal,
                    sliding_window_size=-1,
                    isa=self.isa,
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                    dynamic_causal=None,
                    kv_cache_dtype=self.kv_cache_dtype,
                )
            )
        # The stock fields describe the batch per request; the kernels read only `batch`.
        return MadaKVMetadata(
            num_actual_tokens=cm.num_actual_tokens, max_query_len=cm.max_query_len,
            query_start_loc=cm.query_start_loc, max_seq_len=cm.max_seq_len, seq_lens=cm.seq_lens,
            block_table=cm.block_table_tensor, slot_mapping=cm.slot_mapping, scheduler_metadata=None,
            causal=cm.causal, batch=batch, ps_scheduler_metadata=sched,
        )


class MadaKVCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        per_head.remember_engine_config(get_current_vllm_config())
        # ALiBi and soft-capping are not in vLLM's selector config, so validation cannot see them.
        if self.attn_type == AttentionType.DECODER and (self.alibi_slopes is not None or self.logits_soft_cap):
            raise ValueError("--attention-backend madakv supports plain causal attention layers only "
                             "(no ALiBi, no logit soft-capping)")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.attn_type != AttentionType.DECODER:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        # DECODER: written in forward(), per head.

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if attn_metadata is None:  # profiling run: zeros rather than whatever the buffer held
            return output.fill_(0)
        if self.attn_type != AttentionType.DECODER or not isinstance(attn_metadata, MadaKVMetadata):
            if self.attn_type in (AttentionType.ENCODER_DECODER,):
                raise ValueError("--attention-backend madakv does not support encoder-decoder models")
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        md = attn_metadata
        batch = md.batch
        c = batch.state.cache
        l = batch.state.layer_index[layer.layer_name]
        T = batch.num_tokens
        H = self.num_kv_heads

        c.scales[l] = (layer._k_scale_float, layer._v_scale_float)  # an fp8 cache's, for scoring its keys
        if key is not None:
            ops.cpu_attn_reshape_and_cache(
                per_head.to_heads(key[:T], H), per_head.to_heads(value[:T], H), c.key, c.value,
                batch.flat_slots[l], layer.isa,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype,
            )
        q = per_head.to_heads(query[:T], H)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=c.key,
            value_cache=c.value,
            output=out,
            query_start_loc=batch.ps_query_start_loc,
            seq_lens=batch.ps_seq_lens[l],
            scale=self.scale,
            causal=md.causal,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=batch.ps_block_tables[l],
            softcap=0,
            scheduler_metadata=md.ps_scheduler_metadata[l],
            s_aux=None,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        per_head.from_heads(out, output[:T], H)
        per_head.after_attention(batch, l, layer, query[:T], key[:T] if key is not None else None,
                                 value[:T] if value is not None else None, output[:T], self.scale)
        return output
