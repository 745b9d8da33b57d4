"""The CUDA path. Its storage layer runs anywhere; the engine tests need an NVIDIA GPU."""

import pytest
import torch

from madakv_vllm.integration.paged import TorchFlatKVCache

HAS_GPU = torch.cuda.is_available()
needs_gpu = pytest.mark.skipif(
    not HAS_GPU, reason="needs an NVIDIA GPU and vLLM's CUDA build (pip install 'madakv-vllm[cuda]'); none here"
)


def test_torch_flat_cache_round_trip_and_layout():
    """Per-head view over a layer-major LBHNC buffer: sub-block (slot*NB + page)*H + head,
    K rows then V rows inside; FlashAttention's paged views see the same entries."""
    L, NB, H, bs, D = 3, 5, 2, 16, 8
    buf = torch.zeros(L, NB, H, bs, 2 * D)
    c = TorchFlatKVCache([buf[l] for l in range(L)])
    gen = torch.Generator().manual_seed(0)
    k, v = torch.randn(6, D, generator=gen), torch.randn(6, D, generator=gen)
    slots = torch.tensor([0, 17, bs * 7 + 3, int(c.subblock(2, 4, 1)) * bs + 15, -1, 40])
    c.write(k, v, slots)
    ok = slots >= 0
    rk, rv = c.read(slots[ok])
    assert torch.equal(rk, k[ok]) and torch.equal(rv, v[ok])
    assert torch.equal(buf[2, 4, 1].view(2 * bs, D)[15], k[3]) and torch.equal(buf[2, 4, 1].view(2 * bs, D)[bs + 15], v[3])
    sb, off = int(slots[3]) // bs, int(slots[3]) % bs
    assert torch.equal(c.key4[sb, off, 0], k[3]) and torch.equal(c.value4[sb, off, 0], v[3])
    assert c.key4.shape == (L * NB * H, bs, 1, D) and c.key4.stride(-1) == 1


@needs_gpu
@pytest.mark.parametrize("block_size", [16, 32])
def test_cuda_engine_evicts_on_a_gpu(model_dir, monkeypatch, block_size):
    """On a real GPU, real FlashAttention: policy full == stock FLASH_ATTN tokens; madakv and
    snapkv at 0.2 with decode and re-compression: attention over the compacted cache equals dense
    attention over the retained tokens (shadow check), the V1 runner serves, every page returns."""
    monkeypatch.setenv("MADAKV_EXPERIMENTAL_CUDA", "1")
    from conftest import mm_prompt, words
    from vllm import LLM, SamplingParams
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    from madakv_vllm.integration import verify

    model = str(model_dir("qwen2vl"))
    common = dict(model=model, enforce_eager=True, max_model_len=8192, block_size=block_size, dtype="bfloat16",
                  seed=0, gpu_memory_utilization=0.3, max_num_batched_tokens=512, limit_mm_per_prompt={"image": 8})
    batch = [mm_prompt("qwen2vl", [0, words(400), 1]), mm_prompt("qwen2vl", [words(30, 1)]),
             mm_prompt("qwen2vl", [words(200, 2), 2, words(250, 3)])]
    sp = SamplingParams(max_tokens=12, temperature=0)
    stock_llm = LLM(**common)
    stock = [o.outputs[0].token_ids for o in stock_llm.generate(batch, sp)]
    del stock_llm
    ours = LLM(**common, attention_backend="madakv", additional_config={"madakv": {"policy": "full"}})
    runner = ours.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    assert isinstance(runner, GPUModelRunner), type(runner)  # the hooked V1 runner, not V2
    assert [o.outputs[0].token_ids[:4] for o in ours.generate(batch, sp)] == [t[:4] for t in stock]
    pool = ours.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    verify.start(ours)
    try:
        for policy in ("madakv", "snapkv"):
            evict = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                   extra_args={"madakv_policy": policy, "madakv_budget": 0.2,
                                               "madakv_recompress_interval": 16})
            out = ours.generate(batch, evict)
            assert [o.outputs[0].token_ids[0] for o in out] == [t[0] for t in stock]
            assert pool.get_num_free_blocks() == free0
        assert verify.SHADOW.compressed_checked > 100
        assert verify.SHADOW.max_err < 2e-2, verify.SHADOW.max_err  # bf16 outputs
    finally:
        verify.ENABLED = False


def test_cuda_module_imports_without_gpu():
    from madakv_vllm.integration import cuda_backend

    assert cuda_backend.MadaKVCUDABackend.get_name() == "MADAKV"
    assert cuda_backend.MadaKVCUDABackend.supported_kv_cache_layouts()[0].name == "LBHNC"


class KernelContractError(AssertionError):
    pass


def _require(cond: bool, what: str) -> None:
    if not cond:
        raise KernelContractError(f"flash_attn_varlen_func would reject this call: {what}")


def reference_flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale,
                                     causal, block_table, out, fa_version=None, **unused):
    """Plain-torch stand-in for vLLM's paged FlashAttention varlen call, as the CUDA backend makes
    it: q [total_q, G, D]; k, v [num_blocks, bs, 1, D]; sequence i has query rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1], its first seqused_k[i] keys in block_table[i]'s blocks, and
    causal masking aligned bottom-right (its queries are its last keys).

    It first enforces what the real kernel requires of its inputs (vllm_flash_attn's checks):
    fp16/bf16 q/k/v/out of one dtype, int32 cu_seqlens_q/seqused_k/block_table, a paged block
    size that is a multiple of 16, a contiguous last dimension, a known FA version."""
    _require(q.dtype in (torch.float16, torch.bfloat16), f"dtype {q.dtype} (fp16/bf16 only)")
    _require(k.dtype == v.dtype == out.dtype == q.dtype, "q, k, v and out must share one dtype")
    for name, t in (("cu_seqlens_q", cu_seqlens_q), ("seqused_k", seqused_k), ("block_table", block_table)):
        _require(t.dtype == torch.int32, f"{name} is {t.dtype}, not int32")
    _require(k.shape[1] % 16 == 0, f"paged block size {k.shape[1]} is not a multiple of 16")
    for name, t in (("q", q), ("k", k), ("v", v), ("out", out)):
        _require(t.stride(-1) == 1, f"{name}'s last dimension is not contiguous")
    _require(fa_version in (2, 3, 4), f"fa_version {fa_version!r}")
    _require(causal and k.shape[2] == 1 and max_seqlen_q >= 1, "one KV head per sequence, causal")
    bs = k.shape[1]
    for i in range(block_table.shape[0]):
        q0, q1, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(seqused_k[i])
        if q1 == q0:
            continue
        _require(n <= max_seqlen_k, "seqused_k above max_seqlen_k")
        blocks = block_table[i, : -(-n // bs)].long()
        kk = k[blocks, :, 0].reshape(-1, k.shape[-1])[:n].float()
        vv = v[blocks, :, 0].reshape(-1, v.shape[-1])[:n].float()
        qq = q[q0:q1].float()  # [nq, G, D]
        s = torch.einsum("qgd,kd->gqk", qq, kk) * softmax_scale
        qpos = torch.arange(n - (q1 - q0), n).view(1, -1, 1)
        s = s.masked_fill(torch.arange(n).view(1, 1, -1) > qpos, float("-inf"))
        out[q0:q1] = torch.einsum("gqk,kd->qgd", s.softmax(-1), vv).to(out.dtype)
    return out


def test_reference_kernel_enforces_the_real_kernels_rules():
    D, bs = 32, 16
    q = torch.zeros(3, 2, D, dtype=torch.bfloat16)
    k = torch.zeros(4, bs, 1, D, dtype=torch.bfloat16)
    good = dict(q=q, k=k, v=k.clone(), max_seqlen_q=3, cu_seqlens_q=torch.tensor([0, 3], dtype=torch.int32),
                max_seqlen_k=20, seqused_k=torch.tensor([20], dtype=torch.int32), softmax_scale=1.0, causal=True,
                block_table=torch.tensor([[2, 1]], dtype=torch.int32), out=torch.empty_like(q), fa_version=2)
    reference_flash_attn_varlen_func(**good)
    bad = [
        dict(q=q.float(), out=torch.empty_like(q).float()),
        dict(block_table=good["block_table"].long()),
        dict(seqused_k=good["seqused_k"].long()),
        dict(k=torch.zeros(4, 8, 1, D, dtype=torch.bfloat16), v=torch.zeros(4, 8, 1, D, dtype=torch.bfloat16)),
        dict(q=torch.zeros(3, D, 2, dtype=torch.bfloat16).transpose(1, 2)),
        dict(fa_version=None),
    ]
    for change in bad:
        with pytest.raises(KernelContractError):
            reference_flash_attn_varlen_func(**{**good, **change})


@pytest.fixture
def cuda_backend_on_cpu(monkeypatch):
    """The CPU platform standing in for CUDA: our CUDA backend is selected (and validated against
    an SM 9.0 device), FlashAttention is the reference above, FA version 3."""
    import sys
    import types

    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import fa_utils

    from madakv_vllm.integration import rules

    fake = types.ModuleType("vllm.vllm_flash_attn")
    fake.flash_attn_varlen_func = reference_flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fake)
    monkeypatch.setattr(fa_utils, "get_flash_attn_version", lambda **kw: 3)
    monkeypatch.setattr(rules, "CPU_BACKEND_PATH", rules.CUDA_BACKEND_PATH)
    capability = {"value": DeviceCapability(9, 0)}
    monkeypatch.setattr(CpuPlatform, "get_device_capability", classmethod(lambda cls, device_id=0: capability["value"]))
    # vLLM caches the backend class per selection; engines of other tests must get the CPU one.
    selector._cached_get_attn_backend.cache_clear()
    yield capability
    selector._cached_get_attn_backend.cache_clear()


def _qwen_llm(model_dir, dtype, **kw):
    from vllm import LLM

    return LLM(model=str(model_dir("qwen2vl")), enforce_eager=True, max_model_len=8192, block_size=32, dtype=dtype,
               seed=0, max_num_batched_tokens=512, limit_mm_per_prompt={"image": 8}, **kw)


@pytest.mark.parametrize("what, change, reason", [
    ("fp32", {"dtype": "float32"}, "dtype not supported"),
    ("SM 7.5", {"capability": (7, 5)}, "compute capability not supported"),
])
def test_cuda_backend_rejects_what_flash_attention_cannot_run_at_startup(model_dir, cuda_backend_on_cpu, what,
                                                                         change, reason):
    """vLLM's own validate_configuration runs at selection: fp32 or a pre-Ampere GPU fail at
    startup naming the reason, not in the kernel on the first forward."""
    from vllm.platforms.interface import DeviceCapability

    if "capability" in change:
        cuda_backend_on_cpu["value"] = DeviceCapability(*change["capability"])
    with pytest.raises(Exception, match=reason):
        _qwen_llm(model_dir, change.get("dtype", "bfloat16"), attention_backend="madakv")


def test_cuda_backend_logic_runs_on_cpu_with_reference_attention(engine, model_dir, cuda_backend_on_cpu):
    """The CUDA backend end to end on the CPU platform in bf16, with only FlashAttention replaced
    by the plain-torch reference above (which enforces the real kernel's input rules): metadata,
    per-head tables, torch KV moves, compaction and page freeing are the CUDA path's own code, on
    the V1 runner, the only one the CUDA platform may pick for madakv (V2 is refused: see
    test_vllm_contract.py). Full policy == stock CPU_ATTN in bf16 (same first tokens, log-probs
    close); with eviction, attention over the compacted cache == dense attention over the
    retained tokens, for madakv and snapkv with re-compression; every page returns."""
    from conftest import mm_prompt, words
    from vllm import SamplingParams

    from madakv_vllm.integration import verify

    batch = [mm_prompt("qwen2vl", [0, words(400), 1]), mm_prompt("qwen2vl", [words(30, 1)]),
             mm_prompt("qwen2vl", [words(200, 2), 2, words(250, 3)])]
    sp = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    stock = engine("qwen2vl", dtype="bfloat16").generate(batch, sp, use_tqdm=False)
    llm = None
    try:
        llm = _qwen_llm(model_dir, "bfloat16", attention_backend="madakv", additional_config={"madakv": {"policy": "full"}})
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        backends = {type(g.backend).__name__ if not isinstance(g.backend, type) else g.backend.__name__
                    for groups in runner.attn_groups for g in groups}
        assert backends == {"MadaKVCUDABackend"}, backends
        ours = llm.generate(batch, sp, use_tqdm=False)
        for a, b in zip(ours, stock):
            ta, tb = a.outputs[0].token_ids, b.outputs[0].token_ids
            assert ta[0] == tb[0]
            for j in range(len(tb)):  # while the contexts agree, bf16 log-probs agree closely
                if ta[:j] != tb[:j]:
                    break
                for t in b.outputs[0].logprobs[j]:
                    if t in a.outputs[0].logprobs[j]:
                        assert abs(a.outputs[0].logprobs[j][t].logprob - b.outputs[0].logprobs[j][t].logprob) < 0.1

        verify.start(llm)
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        free0 = pool.get_num_free_blocks()
        for policy in ("madakv", "snapkv"):
            evict = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                   extra_args={"madakv_policy": policy, "madakv_budget": 0.2,
                                               "madakv_recompress_interval": 16})
            out = llm.generate(batch, evict, use_tqdm=False)
            assert [o.outputs[0].token_ids[0] for o in out] == [o.outputs[0].token_ids[0] for o in stock]
            assert pool.get_num_free_blocks() == free0
        assert verify.SHADOW.compressed_checked > 100
        assert verify.SHADOW.max_err < 2e-2, verify.SHADOW.max_err  # bf16 outputs of an fp32 reference
    finally:
        verify.ENABLED = False
        del llm


def test_gpu_kernel_check_harness_runs_on_cpu_with_the_reference(monkeypatch):
    """scripts/gpu_kernel_check.py's cases (tables, lengths, mixed batches) on the CPU with the
    reference kernel in place of FlashAttention: its dense reference agrees, and a wrong kernel
    (keys of the wrong sub-block) is caught."""
    import sys
    import types

    from conftest import load_script

    check = load_script("gpu_kernel_check")
    fake = types.ModuleType("vllm.vllm_flash_attn")
    fake.flash_attn_varlen_func = reference_flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fake)
    gen = torch.Generator().manual_seed(0)
    for dtype, bs, group, head_dim, mixed in [(torch.bfloat16, 16, 7, 64, True), (torch.float16, 32, 4, 128, False)]:
        err = check.one_case(2, dtype, bs, group, head_dim, mixed, gen, device="cpu")
        assert err <= check.TOLERANCE[dtype], err

    def shifted(**kw):  # reads every sequence's table one sub-block off
        return reference_flash_attn_varlen_func(**{**kw, "block_table": (kw["block_table"] + 1).to(torch.int32)})

    fake.flash_attn_varlen_func = shifted
    assert check.one_case(2, torch.bfloat16, 16, 1, 64, False, gen, device="cpu") > 0.1
