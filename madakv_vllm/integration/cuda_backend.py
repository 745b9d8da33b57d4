"""The MADAKV attention backend on vLLM's CUDA platform (EXPERIMENTAL: not yet run on a GPU).

Same design as the CPU backend (per_head.py, eviction.py): the KV buffer is laid
out LBHNC so each page is one sub-block per KV head, entries are moved with torch
indexing (TorchFlatKVCache), and attention is vLLM's FlashAttention varlen kernel
with one sequence per (request, KV head): ``num_kv_heads = 1``, the head's query
group as its heads, its own ``seqused_k`` and block table. CUDA graphs and async
scheduling are turned off for this backend (rules.configure_engine).

Selected only with MADAKV_EXPERIMENTAL_CUDA=1 until a GPU run has verified it
(``scripts/gpu_check.sh``); importing this module needs no GPU, and on the CPU the tests run
this class end to end with a plain-torch stand-in for flash_attn_varlen_func that enforces the
real kernel's input rules.

Capabilities are class attributes, as in vLLM's own backends, so that vLLM's
``validate_configuration`` (run at backend selection by rules.validate_backend, as stock does)
rejects fp32, unsupported head sizes, GPUs older than SM 8.0, sliding windows, sinks and
non-decoder attention at startup rather than in the kernel.

KV cache dtypes are stock FLASH_ATTN's, checked by its own classmethods: fp8 (e4m3) only where
its FlashAttention reads fp8 K/V (FA3 on SM 9.x, FA4 on SM 10.x; never FA2). With an fp8 cache the
impl does what stock's does: new entries are stored as ``value / scale`` in fp8
(TorchFlatKVCache), the query is quantized with the layer's q_scale by vLLM's own QuantFP8 where
stock quantizes it, and FlashAttention reads fp8 Q/K/V with the layer's scales as descales.
Scoring reads keys dequantized with the layer's k_scale, and compaction moves the stored bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape
from vllm.model_executor.models.utils import extract_layer_index
from vllm.platforms import current_platform
from vllm.v1.attention.backend import (
    AttentionBackend,
    AttentionCGSupport,
    AttentionImpl,
    AttentionMetadataBuilder,
    AttentionType,
    CommonAttentionMetadata,
    MultipleOf,
)
from vllm.v1.attention.backends.fa_utils import flash_attn_supports_quant_query_input
from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
from vllm.v1.kv_cache_interface import AttentionSpec, KVCacheLayout
from vllm.platforms.interface import DeviceCapability
from vllm.utils.torch_utils import canonicalize_singleton_dim_strides, is_quantized_kv_cache

from madakv_vllm.integration import per_head
from madakv_vllm.integration.cpu_backend import layer_caches, preferred_block_size
from madakv_vllm.integration.eviction import WorkerKV
from madakv_vllm.integration.paged import TorchFlatKVCache
from madakv_vllm.integration.rules import server_config



#: FlashAttention versions whose paged varlen call (block_table, seqused_k) we make.
FA_VERSIONS = (2, 3, 4)


class MadaKVCUDABackend(AttentionBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16]
    # Stock FLASH_ATTN's (fp8 is e4m3 only); which of them this GPU's FlashAttention reads is
    # decided by stock's own checks below.
    supported_kv_cache_dtypes: ClassVar[list] = list(FlashAttentionBackend.supported_kv_cache_dtypes)
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None):
        return [MultipleOf(16)]

    @classmethod
    def supports_head_size(cls, head_size: int) -> bool:
        return head_size % 8 == 0 and head_size <= 256  # FlashAttention 2/3 (FA4's larger ones untested)

    @classmethod
    def supports_compute_capability(cls, capability) -> bool:
        return capability is not None and capability >= DeviceCapability(8, 0)

    @classmethod
    def supports_kv_cache_dtype(cls, kv_cache_dtype) -> bool:
        """Stock's: an fp8 cache only where the selected FlashAttention version reads fp8 K/V."""
        return FlashAttentionBackend.supports_kv_cache_dtype(kv_cache_dtype)

    @classmethod
    def supports_combination(cls, head_size, dtype, kv_cache_dtype, block_size, use_mla, has_sink, use_sparse,
                             use_mm_prefix, device_capability) -> str | None:
        """Stock's, naming its reason (an fp8 cache with a FlashAttention version that cannot read
        it for this head size, e.g. FA2 on Ampere, or FA4's head size 256 kernel on Blackwell)."""
        return FlashAttentionBackend.supports_combination(head_size, dtype, kv_cache_dtype, block_size, use_mla,
                                                          has_sink, use_sparse, use_mm_prefix, device_capability)

    @classmethod
    def supported_kv_cache_layouts(cls):
        return (KVCacheLayout.LBHNC,)  # head-major pages: one sub-block per KV head

    @classmethod
    def supports_attn_type(cls, attn_type: str) -> bool:
        return attn_type == AttentionType.DECODER

    @staticmethod
    def get_name() -> str:
        return "MADAKV"

    @staticmethod
    def get_impl_cls():
        return MadaKVCUDAImpl

    @staticmethod
    def get_builder_cls():
        return MadaKVCUDAMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        return per_head.customize_spec(spec)

    @staticmethod
    def stock_backend_path() -> str:
        """What a hybrid model's chunked local attention layers wrap instead of us (patches.py)."""
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        return AttentionBackendEnum.FLASH_ATTN.get_path()

    @classmethod
    def get_preferred_block_size(cls, default_block_size: int) -> int:
        return preferred_block_size(cls, super().get_preferred_block_size(default_block_size))


@dataclass
class MadaKVCUDAMetadata:
    num_actual_tokens: int
    max_query_len: int
    batch: per_head.PerHeadBatch
    flat_slots: list  # device copies of batch's per-layer tensors
    ps_query_start_loc: torch.Tensor
    ps_seq_lens: list
    ps_block_tables: list
    max_seq_lens: list  # per layer, python ints


class MadaKVCUDAMetadataBuilder(AttentionMetadataBuilder[MadaKVCUDAMetadata]):
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.NEVER

    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        self.runner = per_head.hooked_runner(self)
        from vllm.v1.attention.backends.utils import get_num_attention_heads_from_layers

        num_heads = get_num_attention_heads_from_layers(vllm_config, layer_names) or (
            vllm_config.model_config.get_num_attention_heads(vllm_config.parallel_config)
        )
        self.device = device
        self.block_size = kv_cache_spec.block_size
        self._layers = sorted(layer_names, key=extract_layer_index)
        self.state = WorkerKV(
            server_config(vllm_config), self._layers, kv_cache_spec.num_kv_heads, num_heads,
            kv_cache_spec.head_size, self.block_size,
            prefix_caching=bool(vllm_config.cache_config.enable_prefix_caching),
        )
        per_head.STATES.add(self.state)

    def bind_kv_cache(self) -> None:
        """At startup, once the runner has allocated the KV cache (per_head.initializing_kv_cache)."""
        first = get_layers_from_vllm_config(self.vllm_config, Attention, self._layers[:1])[self._layers[0]]
        self.state.cache = TorchFlatKVCache(layer_caches(self.vllm_config, self._layers), first.kv_cache_dtype,
                                            self.vllm_config.model_config.dtype)

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        st = self.state
        batch = per_head.build_batch(st, common_attn_metadata, self.block_size, self.runner)
        dev = lambda t: t.to(self.device, non_blocking=True)  # noqa: E731
        return MadaKVCUDAMetadata(
            num_actual_tokens=batch.num_tokens,
            max_query_len=common_attn_metadata.max_query_len,
            batch=batch,
            flat_slots=[dev(s) for s in batch.flat_slots],
            ps_query_start_loc=dev(batch.ps_query_start_loc),
            ps_seq_lens=[dev(s) for s in batch.ps_seq_lens],
            ps_block_tables=[dev(t) for t in batch.ps_block_tables],
            max_seq_lens=[int(s.max()) if s.numel() else 0 for s in batch.ps_seq_lens],
        )


class MadaKVCUDAImpl(AttentionImpl):
    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                 logits_soft_cap=None, attn_type=AttentionType.DECODER, kv_sharing_target_layer_name=None,
                 sinks=None, **kwargs) -> None:
        if attn_type != AttentionType.DECODER:
            raise ValueError("--attention-backend madakv supports decoder attention only")
        # ALiBi and soft-capping are not in vLLM's selector config (sliding windows and sinks are,
        # and validate_configuration refuses them with the class attributes above).
        if alibi_slopes is not None or logits_soft_cap:
            raise ValueError("--attention-backend madakv supports plain causal attention layers only "
                             "(no ALiBi, no logit soft-capping)")
        if kv_sharing_target_layer_name is not None:
            raise ValueError("--attention-backend madakv does not support cross-layer KV sharing")
        self.num_heads, self.head_size, self.scale = num_heads, head_size, float(scale)
        self.num_kv_heads = num_kv_heads
        self.kv_cache_dtype = kv_cache_dtype
        self.attn_type = attn_type
        per_head.remember_engine_config(get_current_vllm_config())
        from vllm.v1.attention.backends.fa_utils import get_flash_attn_version

        # As stock FlashAttentionImpl asks (no alibi, sinks or softcap here); None means no
        # vllm_flash_attn on this platform (ROCm), whose call we do not make.
        self.fa_version = get_flash_attn_version(head_size=head_size, supports_fa4_hd256=True)
        if self.fa_version not in FA_VERSIONS:
            raise ValueError(
                f"--attention-backend madakv needs vLLM's FlashAttention (versions {FA_VERSIONS}); "
                f"get_flash_attn_version() returned {self.fa_version!r} on this platform"
            )
        # Stock's FlashAttentionImpl reads an fp8 cache with an fp8 query (quantized by the attention
        # layer, which asks supports_quant_query_input), except FA4's SM 9.x fp8 path, which takes the
        # model's. Ours stays False so that the layer hands us the model's query, which scoring uses;
        # we quantize the kernel's copy with the same op where stock would.
        fa4_reads_model_query = self.fa_version == 4 and current_platform.is_device_capability_family(90)
        quantizes_query = flash_attn_supports_quant_query_input() and not fa4_reads_model_query
        self.query_quant = None
        if is_quantized_kv_cache(kv_cache_dtype) and quantizes_query:
            self.query_quant = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR)

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None,
                output_block_scale=None, **kwargs):
        if attn_metadata is None:  # profiling run: zeros, as stock FlashAttention returns
            return output.fill_(0)
        if output_scale is not None or output_block_scale is not None:
            raise ValueError("--attention-backend madakv does not support fused output quantization")
        md = attn_metadata
        batch = md.batch
        c = batch.state.cache
        l = batch.state.layer_index[layer.layer_name]
        T, H = md.num_actual_tokens, self.num_kv_heads
        c.scales[l] = (layer._k_scale_float, layer._v_scale_float)  # an fp8 cache's, for scoring its keys
        if key is not None:  # an fp8 cache: with the scale tensors stock's writer takes
            c.write(per_head.to_heads(key[:T], H)[:, 0], per_head.to_heads(value[:T], H)[:, 0], md.flat_slots[l],
                    layer._k_scale, layer._v_scale)
        q = per_head.to_heads(query[:T], H)
        descales = {}
        if c.quantized:
            # Per (sequence, KV head), as stock expands the layer's scales; ours are (request, KV head)
            # pairs with one KV head each.
            shape = (md.ps_query_start_loc.shape[0] - 1, 1)
            descales = dict(k_descale=layer._k_scale.expand(shape), v_descale=layer._v_scale.expand(shape))
            if self.query_quant is not None:
                q = self.query_quant(q.reshape(-1, self.head_size), layer._q_scale)[0].view(q.shape)
                descales["q_descale"] = layer._q_scale.expand(shape)
        out = per_head_attention(q, c, md.ps_query_start_loc, md.max_query_len, md.ps_seq_lens[l], md.max_seq_lens[l],
                                 md.ps_block_tables[l], self.scale, self.fa_version, **descales)
        per_head.from_heads(out, output[:T], H)
        per_head.after_attention(batch, l, layer, query[:T], key[:T] if key is not None else None,
                                 value[:T] if value is not None else None, output[:T], self.scale)
        return output


def per_head_attention(q, cache: TorchFlatKVCache, cu_seqlens_q, max_seqlen_q: int, seqused_k, max_seqlen_k: int,
                       block_table, scale: float, fa_version: int, q_descale=None, k_descale=None,
                       v_descale=None) -> torch.Tensor:
    """vLLM's paged FlashAttention with one sequence per (request, KV head).

    q: [total_q, G, D] (the rows of sequence i are cu_seqlens_q[i]:cu_seqlens_q[i+1], its G query
    heads share one KV head); the cache's ``key4``/``value4`` [S, bs, 1, D] are the paged K/V of
    every sub-block; sequence i attends causally (bottom-right aligned) to its first seqused_k[i]
    entries in the sub-blocks block_table[i] lists. cu_seqlens_q, seqused_k, block_table: int32.
    An fp8 cache is read as fp8, each sequence's K/V times its k_descale/v_descale [sequences, 1]
    (q too where it is fp8). Returns [total_q, G, D] in the model's dtype.
    """
    from vllm.vllm_flash_attn import flash_attn_varlen_func

    # FA3/FA4 use TMA, which needs 16-byte strides on the size-1 head dim (stock does the same).
    k, v = canonicalize_singleton_dim_strides(cache.key4), canonicalize_singleton_dim_strides(cache.value4)
    if cache.quantized:  # vLLM allocates fp8 caches as uint8 bytes
        k, v = k.view(cache.element_format), v.view(cache.element_format)
    out = torch.empty(q.shape, dtype=cache.dtype, device=q.device)
    flash_attn_varlen_func(
        q=q,
        k=k,
        v=v,
        max_seqlen_q=max_seqlen_q,
        cu_seqlens_q=cu_seqlens_q,
        max_seqlen_k=max_seqlen_k,
        seqused_k=seqused_k,
        softmax_scale=scale,
        causal=True,
        block_table=block_table,
        out=out,
        fa_version=fa_version,
        q_descale=q_descale,
        k_descale=k_descale,
        v_descale=v_descale,
    )
    return out
