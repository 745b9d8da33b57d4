"""The rules the patched vLLM entry points apply when the MADAKV backend is selected: backend
validation and engine configuration at startup, the server config, per-request argument
validation and admission to the KV pool (front end), and each request's config on the engine side.

Imported by the patches (``patches.py``), the scheduler side (``kv_manager.py``) and the backends;
it imports nothing of ``madakv_vllm.integration`` itself, so every import points down to it.
"""

from __future__ import annotations

import functools
import logging
import os

from madakv_vllm.accounting import RequestPlan, cdiv, peak_pages
from madakv_vllm.config import MadaKVConfig, config_from_vllm, resolve

logger = logging.getLogger("vllm.madakv")

BACKEND_NAME = "MADAKV"
CPU_BACKEND_PATH = "madakv_vllm.integration.cpu_backend.MadaKVCPUBackend"
CUDA_BACKEND_PATH = "madakv_vllm.integration.cuda_backend.MadaKVCUDABackend"
# The CUDA backend has not run on a GPU yet: opt in explicitly until it has.
CUDA_UNSUPPORTED = (
    "--attention-backend madakv is verified on vLLM's CPU platform only in this version of "
    "madakv-vllm; its CUDA path is experimental and unverified: set MADAKV_EXPERIMENTAL_CUDA=1 to try it"
)


def cuda_backend_path() -> str | None:
    """Our backend on the CUDA platform, or None until opted in (not yet verified on a GPU)."""
    return CUDA_BACKEND_PATH if os.environ.get("MADAKV_EXPERIMENTAL_CUDA") == "1" else None


def is_madakv(backend) -> bool:
    return backend is not None and backend.name == BACKEND_NAME


def is_madakv_name(backend) -> bool:
    """``--attention-backend madakv`` as the API server's arguments hold it (a string or the enum)."""
    return backend is not None and str(getattr(backend, "name", backend)).upper() == BACKEND_NAME


def selected_in(vllm_config) -> bool:
    return is_madakv(vllm_config.attention_config.backend)


# --- startup checks -------------------------------------------------------------


def validate_backend(path: str, attn_selector_config, device_capability) -> None:
    """vLLM's own capability check of the backend at ``path``, as stock selection runs it for a
    selected backend (CudaPlatformBase.get_attn_backend_cls): fails at startup, not in a kernel."""
    from vllm.utils.import_utils import resolve_obj_by_qualname

    backend_cls = resolve_obj_by_qualname(path)
    reasons = backend_cls.validate_configuration(device_capability=device_capability, **attn_selector_config._asdict())
    if reasons:
        raise ValueError(f"--attention-backend madakv is not valid for this configuration ({attn_selector_config!r}): "
                         + "; ".join(reasons))


# --- which model runner --------------------------------------------------------

V2_RUNNER_UNSUPPORTED_FEATURE = "the madakv attention backend (its worker hook is on the V1 runner)"
V2_RUNNER_UNSUPPORTED = (
    "--attention-backend madakv needs vLLM's V1 model runner: the scheduler frees evicted KV pages "
    "and only the V1 runner's hook compacts them. Unset VLLM_USE_V2_MODEL_RUNNER=1 (and features "
    "that require Model Runner V2, such as HiSparse or watermarking)"
)


DEFAULT_BLOCK_SIZE = 32


def check_model(model_config) -> None:
    """Per-head eviction is defined for a decoder's full causal attention over its own KV cache.
    A hybrid model's other layers (sliding-window, chunked local, linear attention / state-space)
    run as stock beside it (``evicts``); models with nothing to evict per head are refused at
    startup, naming why (one with no full-attention layer at all is refused once its layers are
    known: ``no_full_attention_layer``)."""
    if model_config is None:
        return
    arch = model_config.architecture
    why = None
    if model_config.is_encoder_decoder:
        why = "it is an encoder-decoder model (its cross-attention KV would not be evicted per head)"
    elif model_config.is_attention_free:
        why = "it has no attention layers (its state-space state cannot be evicted per token)"
    elif model_config.use_mla:
        why = "it uses multi-head latent attention (one latent KV shared by every head)"
    if why:
        raise ValueError(f"--attention-backend madakv cannot serve {arch}: {why}. Serve it without madakv.")


def evicts(attn_selector_config) -> bool:
    """Whether MADAKV serves this attention layer: full causal decoder attention. A hybrid model's
    sliding-window layers keep stock's backend and vLLM's own KV manager (their KV is bounded and
    dropped by position already); so do its chunked local attention layers (patches.py) and its
    linear-attention layers (which never ask for an attention backend)."""
    from vllm.v1.attention.backend import AttentionType

    return attn_selector_config.attn_type == AttentionType.DECODER and not attn_selector_config.has_sliding_window


def has_bounded_layers(model_config) -> bool:
    """Whether the model has layers of bounded KV or state beside full attention (a hybrid:
    sliding-window, chunked local or linear attention). Such a model's other KV cache groups
    share the pool, so a request's peak is not ours alone: the admission that lets max_model_len
    exceed the pool (chunked-prefill eviction) is stock's there (kv_manager.py)."""
    if model_config is None:
        return False
    return bool(model_config.is_hybrid or model_config.get_sliding_window() is not None
                or getattr(model_config.hf_text_config, "attention_chunk_size", None))


def no_full_attention_layer(model_config) -> ValueError:
    arch = model_config.architecture if model_config is not None else "this model"
    return ValueError(f"--attention-backend madakv cannot serve {arch}: it has no full-attention layer "
                      "(every attention layer is bounded already: sliding-window or chunked local attention, "
                      "or linear attention). Serve it without madakv.")


def model_dtype_cache(cache_dtype: str | None, model_dtype) -> str | None:
    """``"auto"`` where ``cache_dtype`` names the model's own dtype (``bfloat16`` for a bf16 model),
    else ``cache_dtype`` unchanged."""
    import torch

    named = {"float16": torch.float16, "bfloat16": torch.bfloat16}.get(str(cache_dtype))
    return "auto" if named is not None and named == model_dtype else cache_dtype


_selected_in_this_process = False


def selected_in_this_process() -> bool:
    """An engine config with MADAKV was built in this process (where a patched vLLM function has
    no config at hand: the front end's media loading)."""
    return _selected_in_this_process


def configure_engine(vllm_config) -> MadaKVConfig:
    """Startup checks when MADAKV is selected: fail early, naming the field."""
    global _selected_in_this_process
    cfg = config_from_vllm(vllm_config.additional_config)
    check_model(vllm_config.model_config)
    cache = vllm_config.cache_config
    # The KV cache dtypes are stock's on the CPU and CUDA platforms: the backends take CPU_ATTN's and
    # FLASH_ATTN's lists and checks, which vLLM's validation runs at selection (on the CPU, vLLM's ISA
    # choice refuses fp8 where its kernels lack it; on CUDA, FLASH_ATTN's checks refuse fp8 where the
    # FlashAttention version cannot read it).
    from vllm.platforms import current_platform

    if current_platform.is_cpu() and vllm_config.model_config is not None:
        same = model_dtype_cache(cache.cache_dtype, vllm_config.model_config.dtype)
        if same != cache.cache_dtype:
            # stock's CPU platform serves a cache dtype naming the model's own dtype exactly as "auto" (the
            # same buffers and kernels); CPU_ATTN's list, which vLLM checks for our backend, names only "auto"
            logger.info("madakv: kv_cache_dtype %s is the model's dtype: served as 'auto', as stock serves it",
                        cache.cache_dtype)
            cache.cache_dtype = same
    quantized = cache.cache_dtype not in ("auto", None) and not str(cache.cache_dtype).startswith("auto")
    if quantized and not (current_platform.is_cpu() or current_platform.is_cuda()):
        raise ValueError(f"--attention-backend madakv needs an unquantized KV cache on "
                         f"{current_platform.device_name} (got kv_cache_dtype={cache.cache_dtype}); "
                         "quantized caches are served on the CPU and CUDA platforms")
    if cache.enable_prefix_caching and cfg.chunked:
        logger.warning("madakv: prefill_eviction 'chunked' compacts pages while the prompt is still being hashed: "
                       "requests evicting during prefill neither read nor add to vLLM's prefix cache; requests "
                       "with madakv_prefill_eviction 'end' and uncompressed requests use it")
    if not cache.user_specified_block_size and (cache.block_size or 0) > DEFAULT_BLOCK_SIZE:
        # Pages are the unit in which eviction returns memory, and a compressed request keeps up to
        # two partly used pages per layer (accounting.py): the CPU platform's default of 128 tokens
        # would cost up to 256 tokens per head on top of the budget. 32 keeps the CPU kernels' fast
        # path (block sizes that are multiples of 32); --block-size overrides.
        logger.info("madakv: block_size %s -> %s (pages are the unit of eviction)", cache.block_size, DEFAULT_BLOCK_SIZE)
        cache.block_size = DEFAULT_BLOCK_SIZE
    sched = vllm_config.scheduler_config
    if sched.async_scheduling:
        # Pages freed at step t+1 must already be compacted by step t's forward.
        logger.info("madakv: async scheduling turned off (eviction needs step-ordered frees)")
        sched.async_scheduling = False
    from vllm.config import CUDAGraphMode

    comp = vllm_config.compilation_config
    if comp.cudagraph_mode not in (None, CUDAGraphMode.NONE):
        logger.info("madakv: CUDA graphs turned off (per-head tables and lengths change every step)")
        comp.cudagraph_mode = CUDAGraphMode.NONE
    spec = vllm_config.speculative_config
    if spec is not None:
        raise ValueError("--attention-backend madakv does not support speculative decoding yet")
    logger.info("madakv: %s", cfg.model_dump())
    _selected_in_this_process = True
    return cfg


# --- request validation (frontend) -------------------------------------------


@functools.lru_cache(maxsize=8)
def _server_config(additional_config_key: str) -> MadaKVConfig:
    import json

    return config_from_vllm(json.loads(additional_config_key))


def server_config(vllm_config) -> MadaKVConfig:
    import json

    return _server_config(json.dumps(vllm_config.additional_config or {}, sort_keys=True, default=str))


def validate_request_args(vllm_config, extra_args) -> MadaKVConfig:
    """Per-request overrides must be valid before they reach the engine (HTTP 400)."""
    from vllm.exceptions import VLLMValidationError

    try:
        return resolve(server_config(vllm_config), extra_args)
    except ValueError as e:
        # named as the request spells them: madakv_budget, madakv_experimental_mpa_mix
        msg = str(e).replace("madakv.experimental.", "madakv_experimental_").replace("madakv.", "madakv_")
        raise VLLMValidationError(msg, parameter="vllm_xargs") from None


def check_fits_pool(vllm_config, request) -> None:
    """A request must fit the KV pool at its peak (HTTP 400 otherwise). Stock vLLM guarantees it by
    refusing a max_model_len above the pool; with eviction during chunked prefill the server accepts
    one (MadaKVAttentionSpec.max_memory_usage_bytes), so a request that would not evict while it
    prefills ("end", policy "full") or whose budget is too large is refused here, not left waiting."""
    from vllm.exceptions import VLLMValidationError

    cache = vllm_config.cache_config
    if not cache.num_gpu_blocks or request.sampling_params is None:
        return  # not started yet, or no KV to hold (pooling)
    usable = cache.num_gpu_blocks - 1  # vLLM's pool holds one null block back
    cfg = resolve(server_config(vllm_config), request.sampling_params.extra_args)
    n = len(request.prompt_token_ids) if request.prompt_token_ids is not None else len(request.prompt_embeds)
    out = request.sampling_params.max_tokens or 0
    if cfg.chunked:
        need = peak_pages(cfg, n, out, cache.block_size, vllm_config.scheduler_config.max_num_batched_tokens)
    else:  # its whole sequence, plus the fresh pages its compression takes with prefix caching
        plan = RequestPlan(cfg=cfg, num_prompt_tokens=n, prefix_caching=bool(cache.enable_prefix_caching))
        need = (cdiv(min(n + out, vllm_config.model_config.max_model_len), cache.block_size)
                + plan.extra_pages(n, cache.block_size))
    if need > usable:
        how = ("evicting during prefill it still needs" if cfg.chunked
               else f"with prefill_eviction '{cfg.prefill_eviction}' and policy '{cfg.policy}' it needs")
        raise VLLMValidationError(
            f"madakv: this request ({n} prompt tokens, max_tokens {out}) does not fit the KV cache: {how} "
            f"{need} pages of {cache.block_size} tokens, the pool has {usable}. Use madakv_prefill_eviction "
            "'chunked' with a smaller madakv_budget, or a shorter prompt or max_tokens", parameter="vllm_xargs")


# --- a request's config (engine side) ----------------------------------------


def request_config(server: MadaKVConfig, req_id: str, sampling_params) -> MadaKVConfig:
    """The engine side's view of a request's config. The frontend rejected invalid overrides
    already (HTTP 400); anything that still fails here falls back to the server config with a
    warning rather than crashing the engine. Scheduler and workers resolve identically."""
    try:
        return resolve(server, sampling_params.extra_args if sampling_params is not None else None)
    except ValueError as e:
        logger.warning("madakv: ignoring invalid per-request args of %s: %s", req_id, e)
        return server
