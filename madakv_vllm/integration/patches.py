"""Every monkeypatch madakv-vllm makes to vLLM, in one place (checked against vLLM 0.32.0).

``install()`` (idempotent; called by ``madakv_vllm.register()``, vLLM's general-plugin entry
point, in every vLLM process) wraps each symbol below. Every wrapper leaves vLLM's behaviour as
stock unless the MADAKV backend is selected, a MadaKV KV-cache manager exists, or one of our
metadata builders serves the batch. ``PATCHED`` records what ``install()`` wrapped, and
tests/test_vllm_contract.py checks that it equals the "wrapped" entries of
``madakv_vllm.integration.VLLM_TOUCHPOINTS`` (so a patch cannot be added without its touchpoint).

| wrapped | why |
|---|---|
| ``CpuPlatform`` / ``CudaPlatformBase.get_attn_backend_cls`` | the platforms ignore a selected plugin backend: route MADAKV's full-attention decoder layers to ours, after vLLM's own ``validate_configuration``; a hybrid model's sliding-window layers get stock's choice |
| ``create_chunked_local_attention_backend`` | chunked local attention layers (Llama 4) wrap the selected backend: they wrap stock's instead of ours |
| ``CpuPlatform`` / ``CudaPlatformBase.check_and_update_config`` | validate our config at startup; page size, async scheduling, CUDA graphs (prefix caching stays as configured) |
| ``VllmConfig._get_v2_model_runner_unsupported_features`` | madakv needs the V1 model runner: vLLM then chooses it |
| ``InputProcessor._validate_params`` | HTTP 400 for a bad ``madakv_*`` request argument |
| ``BaseRenderer._process_tokens`` / ``_process_tokens_async`` | note the multimodal sender-cache entries a rendered request added (``mm_cache.py``); roll back those of a render whose request was cancelled while it ran |
| ``InputProcessor.process_inputs`` | submit them with the engine request, or roll them back when it is rejected; HTTP 400 for a request that cannot fit the KV pool (``rules.check_fits_pool``) |
| ``OfflineInferenceMixin._render_and_add_requests`` | one rollback scope per offline ``LLM`` call |
| ``vllm.entrypoints.launchers.app.init_entrypoints_middleware`` | one rollback scope per HTTP request (ASGI middleware) |
| ``MediaConnector._load_data_url`` | RFC 2397 data URLs without ``;base64`` are decoded (vLLM 0.32 answers them with HTTP 501) |
| ``MediaConnector._load_file_url`` | a file URL the server may not or cannot read is a 400 (vLLM 0.32: 500 without ``--allowed-local-media-path``) |
| ``KVCacheManager.allocate_slots`` | our single-type manager only sees request ids: it learns each request's config here |
| ``KVCacheManager.get_computed_blocks`` | a prefix-cache hit of a request that is compressed at its prompt's end leaves its observation window to recompute (looked up again with that cap, for every KV cache group); chunked-prefill eviction reads no hit (``accounting.RequestPlan.max_cache_hit``) |
| ``KVCacheCoordinator.cache_blocks`` / ``replay_boundaries`` | a hybrid model's sliding-window and state groups also retain their pages where a compressed request's capped hit lands (``MadaKVManager.replay_boundaries``) |
| ``Scheduler._reserve_prefill_lookahead`` | a request resumed after preemption replays its output in chunks that stop where it was compressed (``accounting.RequestPlan.chunk_limit``) |
| ``GPUModelRunner._update_states`` | the workers drop finished, preempted and resumed requests |
| ``GPUModelRunner._bookkeeping_sync`` | a seeded request whose prompt takes several steps no longer kills the CPU engine (vLLM 0.32 rewinds its sampler with ``Generator.set_offset``, which CPU generators lack) |
| ``GPUModelRunner.initialize_kv_cache`` | hands the V1 runner to our metadata builders (a builder built elsewhere refuses to start), which then bind their per-head views of the KV cache it allocated |

What the wrappers apply lies below this module and never imports it: ``rules.py`` (startup checks,
request validation, admission), ``mm_cache.py``, ``metrics.py``, and the scheduler and worker
modules (``kv_manager.py``, ``per_head.py``, imported when a wrapper first runs: they load vLLM's
engine modules). Only ``plugin.register()`` imports this module.
"""

from __future__ import annotations

import contextvars
import functools
import importlib

from madakv_vllm.integration import metrics, mm_cache, rules

#: (module, qualified name) of every symbol install() wrapped, in order.
PATCHED: list[tuple[str, str]] = []
_installed = False


def install() -> None:
    global _installed
    if _installed:
        return
    _installed = True
    _patch_platform("vllm.platforms.cpu", "CpuPlatform", lambda: rules.CPU_BACKEND_PATH)
    try:  # the CUDA platform module imports without a GPU; a build without it has nothing to patch
        importlib.import_module("vllm.platforms.cuda")
    except (ImportError, OSError):  # pragma: no cover
        pass
    else:
        _patch_platform("vllm.platforms.cuda", "CudaPlatformBase", rules.cuda_backend_path)
    _wrap("vllm.model_executor.layers.attention.chunked_local_attention", "create_chunked_local_attention_backend",
          _chunked_local_backend)
    _wrap("vllm.config", "VllmConfig._get_v2_model_runner_unsupported_features", _v2_runner_unsupported)
    _wrap("vllm.v1.engine.input_processor", "InputProcessor._validate_params", _validate_params)
    _wrap("vllm.renderers.base", "BaseRenderer._process_tokens", _process_tokens)
    _wrap("vllm.renderers.base", "BaseRenderer._process_tokens_async", _process_tokens_async)
    _wrap("vllm.v1.engine.input_processor", "InputProcessor.process_inputs", _process_inputs)
    _wrap("vllm.entrypoints.common.offline", "OfflineInferenceMixin._render_and_add_requests", _offline_scope)
    _wrap("vllm.entrypoints.launchers.app", "init_entrypoints_middleware", _entrypoints_middleware)
    _wrap("vllm.multimodal.media.connector", "MediaConnector._load_data_url", _load_data_url)
    _wrap("vllm.multimodal.media.connector", "MediaConnector._load_file_url", _load_file_url)
    _wrap("vllm.v1.core.kv_cache_manager", "KVCacheManager.allocate_slots", _allocate_slots)
    _wrap("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", _get_computed_blocks)
    _wrap("vllm.v1.core.kv_cache_coordinator", "KVCacheCoordinator.cache_blocks", _coordinator_cache_blocks)
    _wrap("vllm.v1.core.kv_cache_coordinator", "replay_boundaries", _replay_boundaries)
    _wrap("vllm.v1.core.sched.scheduler", "Scheduler._reserve_prefill_lookahead", _reserve_prefill_lookahead)
    _wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states", _update_states)
    _wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache", _initialize_kv_cache)
    _wrap("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync", _bookkeeping_sync)


def _wrap(module: str, qualname: str, make_wrapper, as_classmethod: bool = False) -> None:
    """Replace ``module.qualname`` (``Class.attr``, or a module-level name) by
    ``make_wrapper(original)``. The attribute must exist: a vLLM that renamed it fails here, at
    plugin load, not silently later."""
    owner_name, _, attr = qualname.rpartition(".")
    owner = importlib.import_module(module)
    for part in filter(None, owner_name.split(".")):
        owner = getattr(owner, part)
    original = getattr(owner, attr)
    if as_classmethod:
        original = original.__func__
    wrapper = functools.wraps(original)(make_wrapper(original))
    setattr(owner, attr, classmethod(wrapper) if as_classmethod else wrapper)
    PATCHED.append((module, qualname))


# --- platforms (every process) ---------------------------------------------------------------


def _patch_platform(module: str, cls_name: str, backend_path) -> None:
    """backend_path(): our backend's class path on this platform, or None if unavailable there."""
    def get_attn_backend_cls(orig):
        def wrapper(cls, selected_backend, attn_selector_config, *args, **kwargs):
            if rules.is_madakv(selected_backend) and not rules.evicts(attn_selector_config):
                # a hybrid model's bounded layers (sliding window) run as stock, on stock's choice
                return orig(cls, None, attn_selector_config, *args, **kwargs)
            if rules.is_madakv(selected_backend):
                path = backend_path()
                if path is None:
                    raise ValueError(rules.CUDA_UNSUPPORTED)
                rules.validate_backend(path, attn_selector_config, cls.get_device_capability())
                return path
            return orig(cls, selected_backend, attn_selector_config, *args, **kwargs)

        return wrapper

    def check_and_update_config(orig):
        def wrapper(cls, vllm_config) -> None:
            selected = rules.selected_in(vllm_config)
            if selected:
                if backend_path() is None:
                    raise ValueError(rules.CUDA_UNSUPPORTED)
                if vllm_config.use_v2_model_runner:
                    raise ValueError(rules.V2_RUNNER_UNSUPPORTED)
            orig(cls, vllm_config)
            if selected:
                rules.configure_engine(vllm_config)
                metrics.export_from_engine_processes()

        return wrapper

    _wrap(module, f"{cls_name}.get_attn_backend_cls", get_attn_backend_cls, as_classmethod=True)
    _wrap(module, f"{cls_name}.check_and_update_config", check_and_update_config, as_classmethod=True)


def _chunked_local_backend(orig):
    """A chunked local attention layer (Llama 4) asks for the selected backend and wraps it with
    vLLM's chunking builder; with MADAKV selected it wraps stock's backend instead: its KV is bounded
    by the chunk already, and its group has vLLM's own manager (never ours)."""
    def wrapper(underlying_attn_backend, attention_chunk_size, *args, **kwargs):
        stock = getattr(underlying_attn_backend, "stock_backend_path", None)
        if stock is not None:
            from vllm.utils.import_utils import resolve_obj_by_qualname

            underlying_attn_backend = resolve_obj_by_qualname(stock())
        return orig(underlying_attn_backend, attention_chunk_size, *args, **kwargs)

    return wrapper


def _v2_runner_unsupported(orig):
    """On CUDA vLLM 0.32 picks Model Runner V2 whenever Triton is present; listing madakv among
    V2's unsupported features makes vLLM itself choose V1 (and log why)."""
    def wrapper(self) -> list[str]:
        unsupported = orig(self)
        if rules.selected_in(self):
            unsupported.append(rules.V2_RUNNER_UNSUPPORTED_FEATURE)
        return unsupported

    return wrapper


# --- frontend (API server / LLM process) --------------------------------------------------------


def _validate_params(orig):
    def wrapper(self, params, supported_tasks):
        result = orig(self, params, supported_tasks)
        if rules.selected_in(self.vllm_config):
            rules.validate_request_args(self.vllm_config, params.extra_args)
        return result

    return wrapper


def _note_rendered(renderer, engine_input, skip_mm_cache: bool) -> None:
    scope = mm_cache.current()
    if scope is not None and rules.selected_in(renderer.config):
        scope.note(renderer, engine_input, skip_mm_cache)


def _process_tokens(orig):
    def wrapper(self, prompt, *args, skip_mm_cache: bool = False, **kwargs):
        engine_input = orig(self, prompt, *args, skip_mm_cache=skip_mm_cache, **kwargs)
        _note_rendered(self, engine_input, skip_mm_cache)
        return engine_input

    return wrapper


def _process_tokens_async(orig):
    """The render runs on the renderer's multimodal thread, which a cancelled request (the client
    went away) cannot stop: the entries it adds are then rolled back once it finishes, as a
    rejected request's are, instead of being left in the sender cache only."""
    import asyncio

    async def wrapper(self, prompt, *args, skip_mm_cache: bool = False, **kwargs):
        if not rules.selected_in(self.config):
            return await orig(self, prompt, *args, skip_mm_cache=skip_mm_cache, **kwargs)
        render = asyncio.ensure_future(orig(self, prompt, *args, skip_mm_cache=skip_mm_cache, **kwargs))
        try:
            engine_input = await asyncio.shield(render)
        except asyncio.CancelledError:
            render.add_done_callback(lambda done: mm_cache.roll_back_finished(self, done, skip_mm_cache))
            raise
        _note_rendered(self, engine_input, skip_mm_cache)
        return engine_input

    return wrapper


def _process_inputs(orig):
    """The engine request is built (it goes to the engine core, which stores the new items) or the
    request is rejected: the rendered input's new sender-cache entries are submitted or rolled back."""
    def wrapper(self, request_id, prompt, params, *args, **kwargs):
        if not rules.selected_in(self.vllm_config):
            return orig(self, request_id, prompt, params, *args, **kwargs)
        with mm_cache.request_scope() as scope:
            before = set(scope.pending)
            try:
                request = orig(self, request_id, prompt, params, *args, **kwargs)
                rules.check_fits_pool(self.vllm_config, request)
            except BaseException:
                scope.roll_back([id(prompt), *(set(scope.pending) - before)])
                raise
            scope.submit([id(prompt), *(set(scope.pending) - before)])  # a raw prompt renders in there
            return request

    return wrapper


def _offline_scope(orig):
    def wrapper(self, *args, **kwargs):
        if not rules.selected_in(self.llm_engine.vllm_config):
            return orig(self, *args, **kwargs)
        with mm_cache.request_scope():
            return orig(self, *args, **kwargs)

    return wrapper


def _entrypoints_middleware(orig):
    """Added last, so outermost: its request scope is set before any other middleware runs."""
    def wrapper(args, app, supported_tasks, *rest, **kwargs):
        result = orig(args, app, supported_tasks, *rest, **kwargs)
        # configure_engine ran in this process before the app is built; the flag is the fallback
        if rules.selected_in_this_process() or rules.is_madakv_name(getattr(args, "attention_backend", None)):
            app.add_middleware(mm_cache.RejectedRequestRollback)
        return result

    return wrapper


def _load_data_url(orig):
    """A data URL without ``;base64`` carries percent-encoded bytes (RFC 2397). vLLM 0.32 raises
    NotImplementedError for it, which its server answers with HTTP 501; decoding it makes a payload
    that is no image a 400, like any other bad image."""
    import urllib.parse

    def wrapper(self, url, media_io, *args, **kwargs):
        spec, sep, data = url[5:].partition(",")
        if rules.selected_in_this_process() and sep and spec.rpartition(";")[2] != "base64":
            return media_io.load_bytes(urllib.parse.unquote_to_bytes(data))
        return orig(self, url, media_io, *args, **kwargs)

    return wrapper


def _load_file_url(orig):
    """vLLM 0.32 answers a file URL outside ``--allowed-local-media-path`` with HTTP 400 but,
    without that flag, with a RuntimeError, hence HTTP 500; a missing or unreadable file is an
    OSError, also a 500. All three are the client's error."""
    def wrapper(self, url_spec, media_io, *args, **kwargs):
        if not rules.selected_in_this_process():
            return orig(self, url_spec, media_io, *args, **kwargs)
        if self.allowed_local_media_path is None:
            raise ValueError("Cannot load local files without `--allowed-local-media-path`.")
        try:
            return orig(self, url_spec, media_io, *args, **kwargs)
        except OSError as e:
            raise ValueError(f"Cannot load the local file: {e}") from None

    return wrapper


# --- scheduler (engine core) -----------------------------------------------------------------


def _madakv_managers(owner) -> list:
    """Our managers among the single-type managers of a ``KVCacheManager`` (through its coordinator)
    or of a ``KVCacheCoordinator``: every KV cache group of a plain model, a hybrid's full-attention
    groups, none without MADAKV. Found once per owner."""
    from madakv_vllm.integration.kv_manager import MadaKVManager

    managers = owner.__dict__.get("_madakv_managers")
    if managers is None:
        coordinator = getattr(owner, "coordinator", owner)
        managers = [m for m in coordinator.single_type_managers if isinstance(m, MadaKVManager)]
        owner._madakv_managers = managers
    return managers


def _allocate_slots(orig):
    def wrapper(self, request, *args, **kwargs):
        for m in _madakv_managers(self):
            m.note_request(request)
        return orig(self, request, *args, **kwargs)

    return wrapper


def _get_computed_blocks(orig):
    """vLLM caps a hit at N - 1 tokens; a request compressed at its prompt's end must recompute its
    last ``window`` tokens, whose queries choose what it keeps. A longer hit is looked up again with
    that cap, as vLLM's own lookup takes it (``find_longest_cache_hit``'s ``max_cache_hit_length``):
    every KV cache group of a hybrid model then agrees on the shorter hit (a sliding window group
    keeps the pages that end before it; a hit cut after the lookup would not have them). The
    scheduler records the capped hit in vLLM's prefix-cache counters."""
    def wrapper(self, request, *args, **kwargs):
        blocks, num_hit, *rest = orig(self, request, *args, **kwargs)
        if num_hit:
            limits = [m.max_cache_hit(request) for m in _madakv_managers(self)]
            most = min((x for x in limits if x is not None), default=None)
            if most is not None and most < num_hit:
                hit_blocks, num_hit, num_uncached = self.coordinator.find_longest_cache_hit(request.block_hashes, most)
                blocks = self.create_kv_cache_blocks(hit_blocks)
                if rest:  # vLLM's shared-prefix boundary, as get_computed_blocks computes it
                    rest[0] = num_hit + num_uncached if num_uncached else 0
        return (blocks, num_hit, *rest)

    return wrapper


_EXTRA_REPLAY_BOUNDARIES = contextvars.ContextVar("madakv_extra_replay_boundaries", default=())


def _coordinator_cache_blocks(orig):
    """Caching a request's blocks: where a compressed request replaying its prompt will hit
    (``MadaKVManager.replay_boundaries``) joins vLLM's replay boundaries for this call."""
    def wrapper(self, request, *args, **kwargs):
        ours = _madakv_managers(self)
        if not ours:
            return orig(self, request, *args, **kwargs)
        token = _EXTRA_REPLAY_BOUNDARIES.set(tuple(b for m in ours for b in m.replay_boundaries(request)))
        try:
            return orig(self, request, *args, **kwargs)
        finally:
            _EXTRA_REPLAY_BOUNDARIES.reset(token)

    return wrapper


def _replay_boundaries(orig):
    def wrapper(*args, **kwargs):
        stock = orig(*args, **kwargs)
        extra = _EXTRA_REPLAY_BOUNDARIES.get()
        return tuple(sorted({*stock, *extra})) if extra else stock

    return wrapper


def _reserve_prefill_lookahead(orig):
    """vLLM's last cut of a chunk, for running and waiting requests alike: a request resumed after
    preemption replays its output in chunks that stop where it was compressed, so it compresses at
    the same lengths as it did before (``MadaKVManager.chunk_tokens``)."""
    def wrapper(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs):
        n = orig(self, request, num_computed_tokens, num_new_tokens, *args, **kwargs)
        if n > 1:  # one token (decode) never passes a compression
            for m in _madakv_managers(self.kv_cache_manager):
                n = m.chunk_tokens(request, num_computed_tokens, n)
        return n

    return wrapper


# --- workers -----------------------------------------------------------------------------------


def _update_states(orig):
    def wrapper(self, scheduler_output):
        from madakv_vllm.integration import per_head

        gone = set(scheduler_output.finished_req_ids)
        gone |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        gone |= set(scheduler_output.preempted_req_ids or ())
        if gone:
            per_head.drop_requests(gone)
        return orig(self, scheduler_output)

    return wrapper


def _initialize_kv_cache(orig):
    def wrapper(self, *args, **kwargs):
        from madakv_vllm.integration import per_head

        with per_head.initializing_kv_cache(self):
            return orig(self, *args, **kwargs)

    return wrapper


def _bookkeeping_sync(orig):
    """vLLM 0.32 rewinds the generator of a seeded request whose step was a partial prefill (its
    sampled token is discarded) with ``get_offset``/``set_offset``, which only CUDA generators have:
    on the CPU platform ``RuntimeError: CPU Generator does not use offset`` ends the engine. CPU
    generators are kept out of that rewind: the discarded draw advances them, so a seeded request's
    samples are reproducible for the same chunking of its prompt."""
    def wrapper(self, *args, **kwargs):
        gens = self.input_batch.generators
        cpu = {i: g for i, g in gens.items() if g.device.type == "cpu"} if rules.selected_in(self.vllm_config) else {}
        for i in cpu:
            del gens[i]
        try:
            return orig(self, *args, **kwargs)
        finally:
            gens.update(cpu)

    return wrapper
