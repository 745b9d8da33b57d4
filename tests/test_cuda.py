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


def e4m3_reference(x: torch.Tensor, scale: float) -> torch.Tensor:
    """The e4m3 byte vLLM's CUDA writer stores for ``x`` with ``scale``
    (``__nv_cvt_float_to_fp8(float(x) / scale, __NV_SATFINITE, __NV_E4M3)``), found by search over
    the format's finite values rather than by a cast: the nearest one to x / scale (fp32), the even
    code of two equally near, the largest finite value beyond it, the sign kept (-0 stays -0)."""
    t = x.float() / scale
    codes = torch.arange(127)  # 0x7f is NaN
    mags = codes.to(torch.uint8).view(torch.float8_e4m3fn).float()
    d = (mags.view(1, -1) - t.abs().reshape(-1, 1)).abs()
    nearest = d == d.min(dim=1, keepdim=True).values
    code = torch.where(nearest, codes.view(1, -1) % 2, 2).argmin(dim=1).to(torch.uint8)
    return (code | (torch.signbit(t).reshape(-1).to(torch.uint8) << 7)).view(t.shape)


def fp8_cache(L=2, NB=4, H=2, bs=16, D=32, fill=None):
    """A TorchFlatKVCache over an fp8 (uint8) LBHNC buffer of a bf16 model, and the buffer."""
    buf = torch.zeros(L, NB, H, bs, 2 * D, dtype=torch.uint8) if fill is None else fill
    return TorchFlatKVCache([buf[l] for l in range(buf.shape[0])], "fp8", torch.bfloat16), buf


def test_torch_flat_cache_fp8_stores_what_the_cuda_writer_stores():
    """An fp8 cache's new entries are the bytes vLLM's CUDA writer stores (``value / scale``,
    round to nearest even, saturated to 448, -0 kept), with float or tensor scales; ``read`` gives
    those bytes and ``read_values`` their values times the layer's scales."""
    c, buf = fp8_cache()
    D, bs = c.head_size, c.block_size
    gen = torch.Generator().manual_seed(0)
    k = torch.randn(40, D, generator=gen) * torch.tensor([0.01, 1.0, 30.0, 1000.0]).repeat_interleave(10).view(-1, 1)
    k[0, :4] = torch.tensor([0.0, -0.0, -1e-6, 1e5])  # zeros, an underflow to -0, a saturation
    ties = torch.tensor([1.0625, 1.1875, 17.0, 19.0, 0.0029296875, 232.0, 464.0, -1.0625])  # e4m3 midpoints
    k[1, : len(ties)] = ties * 0.5  # exactly representable in bf16: with k_scale 0.5, ties
    k, v = k.to(torch.bfloat16), (-k).to(torch.bfloat16)
    slots = torch.randperm(c.num_subblocks * bs, generator=gen)[:40]
    c.write(k[:1], v[:1], slots[:1], torch.tensor(0.3), torch.tensor(1.7))  # the layer's scale tensors
    c.write(k[1:2], v[1:2], slots[1:2], 0.5, 2.0)
    c.write(k[2:], v[2:], torch.where(torch.arange(38) == 5, -1, slots[2:]), 0.3, 1.7)  # -1: padding, skipped
    rk, rv = c.read(slots)
    assert rk.dtype == torch.uint8
    for rows, ks, vs in ((slice(0, 1), 0.3, 1.7), (slice(1, 2), 0.5, 2.0), (slice(2, None), 0.3, 1.7)):
        want_k, want_v = e4m3_reference(k[rows], ks), e4m3_reference(v[rows], vs)
        if rows.start == 2:  # the padding slot was not written
            keep = torch.arange(38) != 5
            assert not rk[rows][~keep].any() and not rv[rows][~keep].any()
            want_k, want_v, got_k, got_v = want_k[keep], want_v[keep], rk[rows][keep], rv[rows][keep]
        else:
            got_k, got_v = rk[rows], rv[rows]
        assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    assert rk[0, :4].tolist() == [0x00, 0x80, 0x80, 0x7E]
    assert rk[1, :8].tolist() == [0x38, 0x3A, 0x58, 0x5A, 0x02, 0x76, 0x7E, 0xB8]  # even codes; 464 saturates
    written = torch.zeros(len(c.entries), dtype=torch.bool)
    rows = c._rows(slots[torch.arange(40) != 7])
    written[rows], written[rows + bs] = True, True
    assert not c.entries[~written].any()  # nothing else written (the padding slot included)
    c.scales = [(0.3, 1.7), (1.0, 1.0)]
    dk, dv = c.read_values(0, slots)
    assert dk.dtype == torch.float32
    assert torch.equal(dk, rk.view(torch.float8_e4m3fn).float() * 0.3)
    assert torch.equal(dv, rv.view(torch.float8_e4m3fn).float() * 1.7)


def test_torch_flat_cache_fp8_put_moves_bytes_unchanged():
    """Compaction's move of an fp8 cache stores the bytes ``read`` gave, bit for bit, NaN patterns
    and -0 included, and touches nothing else (a re-quantization would change them)."""
    gen = torch.Generator().manual_seed(1)
    fill = torch.randint(0, 256, (2, 4, 2, 16, 64), generator=gen, dtype=torch.uint8)
    c, buf = fp8_cache(fill=fill)
    before = c.entries.clone()
    perm = torch.randperm(c.num_subblocks * c.block_size, generator=gen)
    src, dst = perm[:120], perm[120:240]
    k, v = c.read(src)
    c.put(k, v, dst)
    mk, mv = c.read(dst)
    assert torch.equal(mk, k) and torch.equal(mv, v)
    moved = torch.cat([k, v]).view(-1)
    assert {0x7F, 0xFF, 0x80} <= set(moved.tolist())  # NaNs and -0 among the moved bytes
    touched = torch.zeros(len(c.entries), dtype=torch.bool)
    rows = c._rows(dst)
    touched[rows], touched[rows + c.block_size] = True, True
    assert torch.equal(c.entries[~touched], before[~touched])


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
                                     causal, block_table, out, fa_version=None, q_descale=None, k_descale=None,
                                     v_descale=None, **unused):
    """Plain-torch stand-in for vLLM's paged FlashAttention varlen call, as the CUDA backend makes
    it: q [total_q, G, D]; k, v [num_blocks, bs, 1, D]; sequence i has query rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1], its first seqused_k[i] keys in block_table[i]'s blocks, and
    causal masking aligned bottom-right (its queries are its last keys). fp8 inputs are read as
    their values times sequence i's descale (1 where none is given, as the kernel does).

    It first enforces what the real kernel requires of its inputs (vllm_flash_attn's checks):
    fp16/bf16 q/k/v/out of one dtype, or fp8 e4m3 q/k/v (FA3/FA4 only; FA3 then writes bf16 only,
    head sizes a multiple of 16) with float32 descales of shape (sequences, KV heads); int32
    cu_seqlens_q/seqused_k/block_table, a paged block size that is a multiple of 16, a contiguous
    last dimension, a known FA version. (FA4's SM 9.x path for fp8 K/V with a bf16 query, head size
    512 only, is not modelled.)"""
    num_seqs = cu_seqlens_q.shape[0] - 1
    if torch.float8_e4m3fn in (q.dtype, k.dtype, v.dtype):
        _require(fa_version in (3, 4), f"FA{fa_version} reads no fp8 (fp16/bf16 q, k, v only)")
        _require(q.dtype == k.dtype == v.dtype, f"q {q.dtype}, k {k.dtype}, v {v.dtype}: one dtype (fp8 q too)")
        _require(out.dtype == torch.bfloat16 or (fa_version == 4 and out.dtype == torch.float16),
                 f"out {out.dtype}: FA3 writes fp8 attention in bf16 only")
        _require(q.shape[-1] % 16 == 0, f"fp8 head size {q.shape[-1]} is not a multiple of 16")
        for name, t in (("q_descale", q_descale), ("k_descale", k_descale), ("v_descale", v_descale)):
            _require(t is None or (tuple(t.shape) == (num_seqs, k.shape[2]) and t.dtype == torch.float32),
                     f"{name} {None if t is None else (tuple(t.shape), t.dtype)}: float32 (sequences, KV heads)")
    else:
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

    def descale(t, i):  # fp8 values times their sequence's descale; fp16/bf16 inputs ignore descales
        return t[i, 0] if t is not None and q.dtype == torch.float8_e4m3fn else 1.0

    for i in range(block_table.shape[0]):
        q0, q1, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(seqused_k[i])
        if q1 == q0:
            continue
        _require(n <= max_seqlen_k, "seqused_k above max_seqlen_k")
        blocks = block_table[i, : -(-n // bs)].long()
        kk = k[blocks, :, 0].reshape(-1, k.shape[-1])[:n].float() * descale(k_descale, i)
        vv = v[blocks, :, 0].reshape(-1, v.shape[-1])[:n].float() * descale(v_descale, i)
        qq = q[q0:q1].float() * descale(q_descale, i)  # [nq, G, D]
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
    fp8 = torch.float8_e4m3fn
    scale = torch.ones(1, 1)
    good8 = {**good, "q": q.to(fp8), "k": k.to(fp8), "v": k.to(fp8), "fa_version": 3,
             "q_descale": scale, "k_descale": scale, "v_descale": scale}
    reference_flash_attn_varlen_func(**good8)
    bad8 = [
        dict(q=q),  # a bf16 query over fp8 K/V
        dict(fa_version=2),
        dict(out=torch.empty_like(q, dtype=torch.float16)),  # FA3 writes bf16 only
        dict(k_descale=torch.ones(1, 2)),
        dict(v_descale=torch.ones(1)),
        dict(q_descale=torch.ones(1, 1, dtype=torch.bfloat16)),
        dict(q=torch.zeros(3, 2, 24, dtype=fp8), k=torch.zeros(4, bs, 1, 24, dtype=fp8),
             v=torch.zeros(4, bs, 1, 24, dtype=fp8), out=torch.empty(3, 2, 24, dtype=torch.bfloat16)),
    ]
    for change in bad8:
        with pytest.raises(KernelContractError):
            reference_flash_attn_varlen_func(**{**good8, **change})


def fake_flash_attn(monkeypatch, kernel=reference_flash_attn_varlen_func):
    import sys
    import types

    fake = types.ModuleType("vllm.vllm_flash_attn")
    fake.flash_attn_varlen_func = kernel
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fake)
    return fake


def test_per_head_attention_reads_an_fp8_cache_with_the_layers_descales(monkeypatch):
    """The CUDA backend's FlashAttention call over an fp8 cache (K/V written with scales 0.3 / 1.7,
    the query quantized by vLLM's QuantFP8 with q_scale 0.5 as the impl does): fp8 Q/K/V, float32
    descales per (sequence, KV head), a bf16 output equal to dense attention over the dequantized
    values (``read_values``); without the descales it is not."""
    from vllm.config import VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.quantization.input_quant_fp8 import QuantFP8
    from vllm.model_executor.layers.quantization.utils.quant_utils import GroupShape

    from madakv_vllm.integration.cuda_backend import per_head_attention

    fake_flash_attn(monkeypatch)
    c, _ = fp8_cache(L=1, NB=8, H=2, bs=16, D=32)
    c.scales = [(0.3, 1.7)]
    gen = torch.Generator().manual_seed(2)
    lengths, nq, G = [37, 5, 20], [3, 1, 20], 2  # a decode, a prefill chunk, a whole prompt
    table = torch.randperm(c.num_subblocks, generator=gen)[:9].view(3, 3).to(torch.int32)
    for i, n in enumerate(lengths):
        j = torch.arange(n)
        slots = table[i, j // c.block_size].long() * c.block_size + j % c.block_size
        kv = torch.randn(2, n, c.head_size, generator=gen).to(torch.bfloat16)
        c.write(kv[0], kv[1], slots, torch.tensor(0.3), torch.tensor(1.7))
    cu = torch.tensor([0, 3, 4, 24], dtype=torch.int32)
    q = torch.randn(24, G, c.head_size, generator=gen).to(torch.bfloat16)
    with set_current_vllm_config(VllmConfig()):
        q8 = QuantFP8(static=True, group_shape=GroupShape.PER_TENSOR)(q.reshape(-1, c.head_size),
                                                                       torch.tensor(0.5))[0].view(q.shape)
    shape = (3, 1)
    descales = dict(q_descale=torch.tensor(0.5).expand(shape), k_descale=torch.tensor(0.3).expand(shape),
                    v_descale=torch.tensor(1.7).expand(shape))
    args = (q8, c, cu, 20, torch.tensor(lengths, dtype=torch.int32), 37, table, 32**-0.5, 3)
    out = per_head_attention(*args, **descales)
    assert out.dtype == torch.bfloat16 and out.shape == q.shape
    ref = torch.empty(q.shape)
    for i, n in enumerate(lengths):
        j = torch.arange(n)
        kk, vv = c.read_values(0, table[i, j // c.block_size].long() * c.block_size + j % c.block_size)
        qq = q8[cu[i] : cu[i + 1]].float() * 0.5
        s = torch.einsum("qgd,nd->gqn", qq, kk) * 32**-0.5
        qpos = torch.arange(n - nq[i], n).view(1, -1, 1)
        ref[cu[i] : cu[i + 1]] = torch.einsum("gqn,nd->qgd", s.masked_fill(j.view(1, 1, -1) > qpos, -torch.inf)
                                              .softmax(-1), vv)
    assert float((out.float() - ref).abs().max()) < 2e-2
    assert float((per_head_attention(*args).float() - ref).abs().max()) > 0.2


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
    ("fp8 on FA2", {"kv_cache_dtype": "fp8", "capability": (8, 0), "fa_version": 2}, "FP8 KV cache requires FA3"),
    ("fp8_e5m2", {"kv_cache_dtype": "fp8_e5m2"}, "kv_cache_dtype not supported"),
])
def test_cuda_backend_rejects_what_flash_attention_cannot_run_at_startup(model_dir, cuda_backend_on_cpu, monkeypatch,
                                                                         what, change, reason):
    """vLLM's own validate_configuration runs at selection: fp32, a pre-Ampere GPU, an fp8 cache
    where stock's FlashAttention reads none (FA2 on Ampere) or in a format it never reads (e5m2)
    fail at startup naming stock's reason, not in the kernel on the first forward."""
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends import fa_utils

    if "capability" in change:
        cuda_backend_on_cpu["value"] = DeviceCapability(*change["capability"])
    if "fa_version" in change:
        monkeypatch.setattr(fa_utils, "get_flash_attn_version", lambda **kw: change["fa_version"])
    with pytest.raises(Exception, match=reason):
        _qwen_llm(model_dir, change.get("dtype", "bfloat16"), attention_backend="madakv",
                  kv_cache_dtype=change.get("kv_cache_dtype", "auto"))


def evict_under_the_shadow(llm, batch, reference) -> None:
    """madakv and snapkv at 0.2, re-compressed every 16 tokens, under the shadow check: each
    request's first token is the reference run's (its prompt's last query sees every entry), every
    page returns, and the compressed steps match dense attention over what was kept."""
    from vllm import SamplingParams

    from madakv_vllm.integration import verify

    pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    for policy in ("madakv", "snapkv"):
        evict = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                               extra_args={"madakv_policy": policy, "madakv_budget": 0.2,
                                           "madakv_recompress_interval": 16})
        out = llm.generate(batch, evict, use_tqdm=False)
        assert [o.outputs[0].token_ids[0] for o in out] == [o.outputs[0].token_ids[0] for o in reference]
        assert pool.get_num_free_blocks() == free0
    assert verify.SHADOW.compressed_checked > 100
    assert verify.SHADOW.max_err < 2e-2, verify.SHADOW.max_err  # bf16 outputs of an fp32 reference


@pytest.mark.parametrize("capability, fa_version", [((8, 0), 2), ((8, 9), 2), ((9, 0), 3), ((9, 0), 4), ((10, 0), 4),
                                                    ((10, 0), 2)])
def test_cuda_backend_takes_stock_flash_attentions_kv_cache_dtypes(monkeypatch, capability, fa_version):
    """Our validation of every KV cache dtype is stock FLASH_ATTN's, reasons included: fp8 (e4m3)
    only with FA3 on SM 9.x or FA4 on SM 10.x (FA4 on SM 9.x reads fp8 for head size 512 only),
    e5m2 and other quantized formats never; unquantized ones always."""
    from vllm.platforms.cpu import CpuPlatform
    from vllm.platforms.interface import DeviceCapability
    from vllm.v1.attention.backends import fa_utils
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from madakv_vllm.integration.cuda_backend import MadaKVCUDABackend

    cap = DeviceCapability(*capability)
    monkeypatch.setattr(fa_utils, "get_flash_attn_version", lambda **kw: fa_version)
    monkeypatch.setattr(CpuPlatform, "get_device_capability", classmethod(lambda cls, device_id=0: cap))
    assert MadaKVCUDABackend.supported_kv_cache_dtypes == FlashAttentionBackend.supported_kv_cache_dtypes
    fp8_read = (fa_version, capability[0]) in ((3, 9), (4, 10))
    for kv_cache_dtype in ("auto", "float16", "bfloat16", "fp8", "fp8_e4m3", "fp8_e5m2", "fp8_inc", "nvfp4"):
        for head_size in (64, 128, 256):
            cfg = AttentionSelectorConfig(head_size=head_size, dtype=torch.bfloat16, kv_cache_dtype=kv_cache_dtype,
                                          block_size=32)
            args = dict(device_capability=cap, **cfg._asdict())
            ours = MadaKVCUDABackend.validate_configuration(**args)
            assert ours == FlashAttentionBackend.validate_configuration(**args), (kv_cache_dtype, head_size)
            assert (not ours) == (kv_cache_dtype in ("auto", "float16", "bfloat16")
                                  or kv_cache_dtype in ("fp8", "fp8_e4m3") and fp8_read), (kv_cache_dtype, ours)


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
        evict_under_the_shadow(llm, batch, stock)
    finally:
        verify.ENABLED = False
        del llm


Q_SCALE, K_SCALE, V_SCALE = 0.125, 0.3, 1.7


def set_layer_scales(llm, q_scale: float, k_scale: float, v_scale: float) -> int:
    """Every attention layer's q/k/v scales, tensors and floats, as a checkpoint with KV scales sets
    them (vLLM's BaseKVCacheMethod.process_weights_after_loading)."""
    from vllm.model_executor.layers.attention import Attention

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
    for layer in layers:
        for name, value in (("q", q_scale), ("k", k_scale), ("v", v_scale)):
            getattr(layer, f"_{name}_scale").fill_(value)
            setattr(layer, f"_{name}_scale_float", value)
    return len(layers)


def fp8_round_trip(x: torch.Tensor, scale: float) -> torch.Tensor:
    """x as an e4m3 cache (or stock's quantized query) holds it, dequantized: float32."""
    return e4m3_reference(x, scale).view(torch.float8_e4m3fn).float() * scale


def test_cuda_backend_logic_runs_on_cpu_with_an_fp8_cache(model_dir, cuda_backend_on_cpu, monkeypatch):
    """The CUDA backend end to end on the CPU platform with ``kv_cache_dtype="fp8"`` (FA3 on an
    SM 9.0 device, as stock reads fp8 there) and scales q 0.125, k 0.3, v 1.7 on every layer:
    FlashAttention (the reference, enforcing the real kernel's fp8 input rules) gets fp8 Q/K/V
    with their descales; its output equals dense attention over the query, keys and values as an
    fp8 cache holds them (quantized independently here, dequantized), with policy full and after
    madakv / snapkv compression at 0.2 with re-compression; the layers' scales are recorded for
    scoring; every page returns."""
    from conftest import mm_prompt, words
    from vllm import SamplingParams

    from madakv_vllm.integration import per_head, verify

    record_and_check = verify.Shadow.record_and_check

    def on_dequantized(self, batch, layer, query, key, value, output, scale):
        query = fp8_round_trip(query, Q_SCALE)
        key, value = fp8_round_trip(key, K_SCALE), fp8_round_trip(value, V_SCALE)
        return record_and_check(self, batch, layer, query, key, value, output, scale)

    monkeypatch.setattr(verify.Shadow, "record_and_check", on_dequantized)
    batch = [mm_prompt("qwen2vl", [0, words(400), 1]), mm_prompt("qwen2vl", [words(30, 1)]),
             mm_prompt("qwen2vl", [words(200, 2), 2, words(250, 3)])]
    llm = None
    try:
        llm = _qwen_llm(model_dir, "bfloat16", attention_backend="madakv", kv_cache_dtype="fp8",
                        additional_config={"madakv": {"policy": "full"}})
        num_layers = set_layer_scales(llm, Q_SCALE, K_SCALE, V_SCALE)
        verify.start(llm)
        full = llm.generate(batch, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
        assert verify.SHADOW.checked > 1000 and verify.SHADOW.max_err < 2e-2, verify.SHADOW.max_err
        (state,) = [st for st in per_head.STATES if isinstance(st.cache, TorchFlatKVCache) and st.cache.quantized]
        assert state.cache.scales == [(K_SCALE, V_SCALE)] * num_layers
        evict_under_the_shadow(llm, batch, full)
    finally:
        verify.ENABLED = False
        del llm


@needs_gpu
def test_cuda_engine_with_an_fp8_kv_cache_on_a_gpu(model_dir, monkeypatch):
    """On a real GPU whose FlashAttention reads fp8 K/V (stock's own check: FA3 on Hopper, FA4 on
    Blackwell; elsewhere stock and madakv both refuse fp8 at startup, tested on the CPU above):
    ``kv_cache_dtype="fp8"``, policy full gives stock FLASH_ATTN fp8's greedy tokens; madakv at 0.2
    with decode and re-compression holds fewer pages once compressed; every page returns."""
    monkeypatch.setenv("MADAKV_EXPERIMENTAL_CUDA", "1")
    from conftest import assert_same_tokens, mm_prompt, run_requests, words
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend

    if not FlashAttentionBackend.supports_kv_cache_dtype("fp8"):
        pytest.skip(f"stock FLASH_ATTN reads no fp8 KV cache on {torch.cuda.get_device_name()} (FA3 on SM 9.x or "
                    "FA4 on SM 10.x only); madakv refuses it there too")
    model = str(model_dir("qwen2vl"))
    common = dict(model=model, enforce_eager=True, max_model_len=8192, block_size=32, dtype="bfloat16", seed=0,
                  gpu_memory_utilization=0.3, max_num_batched_tokens=512, limit_mm_per_prompt={"image": 8},
                  kv_cache_dtype="fp8")
    batch = [mm_prompt("qwen2vl", [0, words(400), 1]), mm_prompt("qwen2vl", [words(30, 1)]),
             mm_prompt("qwen2vl", [words(200, 2), 2, words(250, 3)])]
    sp = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    stock_llm = LLM(**common)
    stock = [o.outputs[0] for o in stock_llm.generate(batch, sp)]
    del stock_llm
    ours = LLM(**common, attention_backend="madakv", additional_config={"madakv": {"policy": "full"}})
    for got, expected in zip(ours.generate(batch, sp), stock):
        assert_same_tokens(got.outputs[0], expected, "bfloat16")
    core = ours.llm_engine.engine_core.engine_core
    pool = core.scheduler.kv_cache_manager.block_pool
    manager = core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    free0 = pool.get_num_free_blocks()
    held = {}
    for policy in ("full", "madakv"):
        params = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                                extra_args={"madakv_policy": policy, "madakv_budget": 0.2,
                                            "madakv_recompress_interval": 16})
        steps = []

        def count_held(_, policy=policy):
            steps.append(sum(not b.is_null for b in manager.req_to_blocks.get(policy, [])))

        out = run_requests(ours, {policy: (batch[0], params)}, on_step=count_held)
        assert out[policy].outputs[0].token_ids[0] == stock[0].token_ids[0]
        held[policy] = steps[-2]  # the last step before it finished
        assert pool.get_num_free_blocks() == free0
    assert held["madakv"] < 0.5 * held["full"], held


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
