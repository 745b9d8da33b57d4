"""vLLM versions other than the one madakv-vllm was checked against.

* On a vLLM whose minor version is not ``VLLM_MINOR`` the plugin installs nothing, logs one
  WARNING naming both versions, vLLM serves as stock, and ``attention_backend="madakv"`` fails at
  startup. vLLM's version is faked in a subprocess, so the patches of this process are untouched.
* The wrappers and overrides that vLLM 0.33+ reaches with new arguments accept them.
* ``scripts/check_touchpoints.py`` reads vLLM 0.33's and 0.34's wheels (no import) and must find
  exactly the differences listed below. It needs the wheels (~900 MB with 0.32.0's, the baseline)
  in ``~/.cache/madakv-vllm/wheels`` (``$MADAKV_WHEEL_CACHE``): run
  ``python scripts/check_touchpoints.py --download 0.33.0 0.34.0`` once, or set
  ``MADAKV_DOWNLOAD_VLLM_WHEELS=1``; otherwise that test is skipped, saying so.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import ROOT, load_script
from madakv_vllm.integration import VLLM_CUDA_TOUCHPOINTS, VLLM_MINOR, VLLM_TOUCHPOINTS
from madakv_vllm.integration import plugin

# --- the plugin on another vLLM (faked version, in a subprocess) --------------------------------

PROBE = r'''
import copyreg, importlib, json, logging, sys

import vllm

fake, model, run_llm, fail_install = sys.argv[1], sys.argv[2], sys.argv[3] == "1", sys.argv[4] == "1"
if fake != "-":
    vllm.__version__ = fake


class Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


ours = Records()
logging.getLogger("vllm.madakv").addHandler(ours)

from madakv_vllm.integration import VLLM_CUDA_TOUCHPOINTS, VLLM_TOUCHPOINTS


def owner_of(module, qualname):
    obj = importlib.import_module(module)
    *path, attr = qualname.split(".")
    for part in path:
        obj = getattr(obj, part)
    return obj, attr


originals = {}
for t in VLLM_TOUCHPOINTS + VLLM_CUDA_TOUCHPOINTS:
    if t.kind != "wrapped":
        continue
    try:
        owner, attr = owner_of(t.module, t.qualname)
    except (ImportError, OSError):  # the CUDA platform module on a build without it
        continue
    originals[(t.module, t.qualname)] = (owner, attr, vars(owner)[attr])

if fail_install:
    from madakv_vllm.integration import patches

    def broken():
        raise RuntimeError("a symbol vLLM renamed")

    patches.install = broken

import vllm.plugins

vllm.plugins.load_general_plugins()  # our entry point, as vLLM runs it in every process
import madakv_vllm

madakv_vllm.register()  # idempotent
imported = sorted(m for m in sys.modules if m.startswith("madakv_vllm.integration."))

from vllm.v1.attention.backends.registry import AttentionBackendEnum

from madakv_vllm.integration import patches

out = {
    "version": vllm.__version__,
    "patched": [list(p) for p in patches.PATCHED],
    "replaced": [f"{m}.{q}" for (m, q), (owner, attr, orig) in originals.items() if vars(owner)[attr] is not orig],
    "checked": len(originals),
    "madakv_registered": "MADAKV" in AttentionBackendEnum.__members__,
    "enum_reducer": AttentionBackendEnum in copyreg.dispatch_table,
    "imported": imported,
    "warnings": [r.getMessage() for r in ours.records if r.levelno >= logging.WARNING],
}
if run_llm:
    from vllm import LLM, SamplingParams

    args = dict(model=model, enforce_eager=True, dtype="float32", max_model_len=256, seed=0)
    llm = LLM(**args)
    result = llm.generate(["the quick brown fox"], SamplingParams(max_tokens=4, temperature=0.0))
    cfg = llm.llm_engine.vllm_config
    out["stock_tokens"] = list(result[0].outputs[0].token_ids)
    out["stock_backend"] = None if cfg.attention_config.backend is None else cfg.attention_config.backend.name
    out["stock_block_size"] = cfg.cache_config.block_size
    del llm
    try:
        LLM(**args, attention_backend="madakv")
    except Exception as e:
        out["madakv_error"] = f"{type(e).__name__}: {e}"
    else:
        out["madakv_error"] = None
    out["warnings"] = [r.getMessage() for r in ours.records if r.levelno >= logging.WARNING]
print("PROBE " + json.dumps(out))
'''


def _probe(fake: str, model: str = "-", run_llm: bool = False, fail_install: bool = False) -> dict:
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("VLLM_PLUGINS", None)  # every general plugin loads, as in a default install
    proc = subprocess.run([sys.executable, "-c", PROBE, fake, model, str(int(run_llm)), str(int(fail_install))],
                          capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("PROBE ")]
    assert proc.returncode == 0 and lines, (
        f"probe failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return json.loads(lines[-1][len("PROBE "):])


def test_on_the_supported_vllm_the_plugin_installs_its_patches():
    """The probe's control: on vLLM 0.32 it sees every patch, the name and no WARNING."""
    got = _probe("-")
    assert got["patched"] and got["replaced"] and got["madakv_registered"] and got["enum_reducer"]
    assert got["warnings"] == []


def _assert_untouched(got: dict, fake: str) -> None:
    assert got["version"] == fake
    assert got["patched"] == [], "a patch was installed on an unsupported vLLM"
    assert got["replaced"] == [] and got["checked"] >= 10, "a vLLM function is not the original"
    assert not got["madakv_registered"] and not got["enum_reducer"]
    # nothing but the entry point's module was even imported
    assert got["imported"] == ["madakv_vllm.integration.plugin"], got["imported"]
    assert len(got["warnings"]) == 1, got["warnings"]
    warning = got["warnings"][0]
    assert fake in warning and f"{VLLM_MINOR}.x" in warning and "runs as stock" in warning
    assert "--attention-backend madakv" in warning


def test_on_another_vllm_nothing_is_installed_and_one_warning_names_both_versions():
    """(Other version strings: test_minor_version.)"""
    _assert_untouched(_probe("0.33.0"), "0.33.0")


def test_on_another_vllm_stock_serves_and_madakv_is_refused_at_startup(model_dir):
    """vLLM 0.34 (faked) with the plugin installed: nothing installed, one WARNING; a stock engine
    generates as stock (CPU defaults: no backend chosen, 128-token pages), and an engine asking for
    madakv does not start (vLLM refuses the unregistered name before any model loads, on every
    platform) instead of serving stock attention under that name."""
    got = _probe("0.34.0", str(model_dir("llama")), run_llm=True)
    _assert_untouched(got, "0.34.0")  # the WARNING is still the only one after both engines
    assert len(got["stock_tokens"]) == 4
    assert got["stock_backend"] is None and got["stock_block_size"] == 128
    assert got["madakv_error"] is not None, "attention_backend='madakv' started on an unsupported vLLM"
    assert "Unknown attention backend: 'MADAKV'" in got["madakv_error"], got["madakv_error"]


def test_a_failed_install_on_the_supported_vllm_warns_and_leaves_madakv_unregistered():
    """register() never raises (vLLM loads plugins unguarded in every process): if installing
    fails, one WARNING says so and the backend name is not registered, so madakv is refused."""
    got = _probe("-", fail_install=True)
    assert not got["madakv_registered"]
    assert len(got["warnings"]) == 1 and "could not hook into vLLM" in got["warnings"][0]
    assert "a symbol vLLM renamed" in got["warnings"][0]


@pytest.mark.parametrize("version, minor", [
    ("0.32.0", "0.32"), ("0.32.0+cpu", "0.32"), ("0.32.1.dev3+g1234abc", "0.32"), ("v0.32.2", "0.32"),
    ("0.33.0", "0.33"), ("0.320.0", "0.320"), ("1.0", "1.0"), ("unknown", None), ("", None),
])
def test_minor_version(version, minor):
    assert plugin.minor_version(version) == minor
    assert plugin.supported(version) == (minor == VLLM_MINOR)


# --- what vLLM 0.33+ passes to our wrappers and overrides ---------------------------------------


def test_get_computed_blocks_wrapper_passes_max_cache_hit_length_through():
    """vLLM 0.33's scheduler calls ``get_computed_blocks(request, max_cache_hit_length)``,
    positionally: the wrapper passes it on and still caps the hit of a compressed request (a new
    lookup with the cap; the shared-prefix boundary as vLLM computes it)."""
    from types import SimpleNamespace

    from madakv_vllm.integration import patches

    seen, looked_up = [], []

    def original(self, request, max_cache_hit_length=None):
        seen.append(max_cache_hit_length)
        return ["p0", "p1", "p2"], 96, 0

    class Manager:
        def max_cache_hit(self, request):
            return 64

    class Coordinator:
        def find_longest_cache_hit(self, block_hashes, max_cache_hit_length):
            looked_up.append(max_cache_hit_length)
            return (["p0", "p1"],), 64, 32

    class KVCacheManager:
        def __init__(self):
            self._madakv_managers = [Manager()]
            self.coordinator = Coordinator()

        def create_kv_cache_blocks(self, blocks):
            return list(blocks[0])

    request = SimpleNamespace(block_hashes=["h0", "h1", "h2", "h3"])
    wrapper = patches._get_computed_blocks(original)
    assert wrapper(KVCacheManager(), request, 80) == (["p0", "p1"], 64, 96)
    assert wrapper(KVCacheManager(), request, max_cache_hit_length=90) == (["p0", "p1"], 64, 96)
    assert wrapper(KVCacheManager(), request) == (["p0", "p1"], 64, 96)
    assert seen == [80, 90, None]
    assert looked_up == [64, 64, 64]


@pytest.mark.parametrize("backend", ["cpu", "cuda"])
def test_an_unset_block_size_stays_32_tokens_when_vllm_asks_the_backend(backend):
    """vLLM 0.33+ sets a block size the user did not choose to the backend's preference after the
    model loads (on the CPU platform: ``_preferred_block_size_for_backends(backends, 128)``):
    ours prefer rules.DEFAULT_BLOCK_SIZE where stock CPU attention prefers 128. vLLM 0.32's CUDA
    platform asks with 16, which stays 16."""
    from vllm.config import VllmConfig
    from vllm.platforms.interface import Platform
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    from madakv_vllm.integration.rules import DEFAULT_BLOCK_SIZE

    if backend == "cpu":
        from madakv_vllm.integration.cpu_backend import MadaKVCPUBackend as ours
    else:
        from madakv_vllm.integration.cuda_backend import MadaKVCUDABackend as ours
    cfg = VllmConfig()
    assert Platform._preferred_block_size_for_backends([CPUAttentionBackend], 128, cfg) == 128  # stock
    assert Platform._preferred_block_size_for_backends([ours], 128, cfg) == DEFAULT_BLOCK_SIZE
    assert ours.get_preferred_block_size(64) == DEFAULT_BLOCK_SIZE
    assert ours.get_preferred_block_size(16) == (16 if backend == "cuda" else 32)  # CPU kernels: multiples of 32


# --- the touchpoints in other vLLM releases, read from their wheels -----------------------------

check_touchpoints = load_script("check_touchpoints")


def test_static_check_finds_every_touchpoint_in_the_installed_vllm():
    """The checker, run on the installed vLLM's files, agrees with tests/test_vllm_contract.py
    (which imports it): everything found, leading parameters as listed; and it does report a
    missing name and changed parameters."""
    from madakv_vllm.integration import Touchpoint

    where = check_touchpoints.installed_vllm_dir()
    src = check_touchpoints.Source(where, "installed")
    results = check_touchpoints.check(VLLM_TOUCHPOINTS, src)
    assert check_touchpoints.differences(results) == {}, check_touchpoints.table(results)
    fake = [Touchpoint("vllm.v1.core.kv_cache_manager", "KVCacheManager.no_such_method", "called", None, ""),
            Touchpoint("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks", "wrapped",
                       ("self", "req"), ""),
            Touchpoint("vllm.no_such_module", "X", "read", None, "")]
    assert check_touchpoints.differences(check_touchpoints.check(fake, src)) == {
        ("vllm.v1.core.kv_cache_manager", "KVCacheManager.no_such_method"): "MISSING",
        ("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks"): "PARAMS",
        ("vllm.no_such_module", "X"): "MISSING",
    }


R, M, S = "MISSING", "MISSING", "SIGNATURE"  # R: removed, M: moved (new place checked below)
#: What differs from vLLM 0.32.0 (module, qualname) -> status, and why it matters to us.
EXPECTED = {
    "0.33.0": {
        ("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks"): S,
        # +max_cache_hit_length, passed positionally by the scheduler: the wrapper passes it on
        ("vllm.vllm_flash_attn", "flash_attn_varlen_func"): S,  # +gather_kv_indices, gather_kv_valid_length (trailing)
    },
    "0.34.0": {
        ("vllm.config", "VllmConfig._get_v2_model_runner_unsupported_features"): R,  # Model Runner V1 removed
        ("vllm.config", "VllmConfig.use_v2_model_runner"): R,  # only V2 exists
        ("vllm.v1.core.kv_cache_manager", "KVCacheManager.get_computed_blocks"): S,
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._update_states"): R,  # V2: add/update/finish_requests
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache"): M,  # vllm.v1.worker.gpu.model_runner
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.input_batch"): R,
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.requests"): R,
        ("vllm.v1.worker.gpu_input_batch", "InputBatch.req_ids"): R,
        ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner._bookkeeping_sync"): R,
        ("vllm.v1.worker.gpu_input_batch", "InputBatch.generators"): R,
        ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.block_ids"): R,
        ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.sampling_params"): R,
        ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.num_prompt_tokens"): R,
        ("vllm.v1.worker.gpu_input_batch", "CachedRequestState.mm_features"): R,
        ("vllm.v1.core.sched.output", "CachedRequestData.resumed_req_ids"): R,  # resumed requests come as new ones
        ("vllm._custom_ops", "cpu_attn_reshape_and_cache"): M,  # vllm._cpu_ops
        ("vllm._custom_ops", "cpu_attention_with_kv_cache"): M,
        ("vllm._custom_ops", "cpu_attn_get_scheduler_metadata"): M,
        ("vllm.v1.worker.utils", "allocate_kv_cache"): S,  # +allocate (trailing)
        ("vllm.vllm_flash_attn", "flash_attn_varlen_func"): S,
    },
}
#: Where 0.34 moved a touchpoint: (old module, qualname) -> (new module, qualname, leading parameters).
MOVED_034 = {
    ("vllm.v1.worker.gpu_model_runner", "GPUModelRunner.initialize_kv_cache"):
        ("vllm.v1.worker.gpu.model_runner", "GPUModelRunner.initialize_kv_cache", ("self", "kv_cache_config")),
    **{("vllm._custom_ops", name): ("vllm._cpu_ops", name, None)
       for name in ("cpu_attn_reshape_and_cache", "cpu_attention_with_kv_cache", "cpu_attn_get_scheduler_metadata")},
}
#: Model Runner V2's request hooks, where 0.34 would need our worker hook.
V2_RUNNER_HOOKS = ("add_requests", "update_requests", "finish_requests")


@pytest.fixture(scope="module")
def wheels():
    """{version: Source} for 0.32.0 (the baseline), 0.33.0 and 0.34.0."""
    versions = ("0.32.0", "0.33.0", "0.34.0")
    missing = [v for v in versions if check_touchpoints.cached_wheel(v) is None]
    if missing and os.environ.get("MADAKV_DOWNLOAD_VLLM_WHEELS") != "1":
        pytest.skip(f"vLLM wheels {', '.join(missing)} are not cached in {check_touchpoints.wheel_cache()} "
                    "(~300 MB each): run `python scripts/check_touchpoints.py --download 0.33.0 0.34.0` once, "
                    "or set MADAKV_DOWNLOAD_VLLM_WHEELS=1")
    try:
        return {v: check_touchpoints.open_source(v, download=True) for v in versions}
    except RuntimeError as e:  # offline, or PyPI refused
        pytest.skip(f"could not download the vLLM wheels: {e}")


@pytest.mark.parametrize("version", sorted(EXPECTED))
def test_touchpoints_in_newer_vllm_differ_exactly_as_known(wheels, version):
    results = check_touchpoints.check(VLLM_TOUCHPOINTS + VLLM_CUDA_TOUCHPOINTS, wheels[version], wheels["0.32.0"])
    assert wheels[version].version() == version
    assert check_touchpoints.differences(results) == EXPECTED[version], (
        f"vLLM {version} differs from what we know:\n{check_touchpoints.table(results)}")


def test_where_vllm_034_moved_what_we_need(wheels):
    src = wheels["0.34.0"]
    for (module, qualname), (new_module, new_qualname, leading) in MOVED_034.items():
        got = check_touchpoints.locate(src, new_module, new_qualname)
        assert isinstance(got, list), f"{new_module}.{new_qualname}: {got}"
        old = next(t for t in VLLM_TOUCHPOINTS if (t.module, t.qualname) == (module, qualname))
        assert got[: len(leading or old.params)] == list(leading or old.params), (new_qualname, got)
    for hook in V2_RUNNER_HOOKS:
        assert check_touchpoints.locate(src, "vllm.v1.worker.gpu.model_runner", f"GPUModelRunner.{hook}") == [
            "self", "scheduler_output"]
