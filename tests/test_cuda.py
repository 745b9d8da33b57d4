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
def test_cuda_full_policy_matches_stock_and_frees_pages(model_dir, monkeypatch):
    monkeypatch.setenv("MADAKV_EXPERIMENTAL_CUDA", "1")
    from conftest import mm_prompt, words
    from vllm import LLM, SamplingParams

    model = str(model_dir("qwen2vl"))
    common = dict(model=model, enforce_eager=True, max_model_len=8192, block_size=32, dtype="bfloat16", seed=0,
                  gpu_memory_utilization=0.3)
    batch = [mm_prompt("qwen2vl", [0, words(400), 1]), mm_prompt("qwen2vl", [words(30, 1)])]
    sp = SamplingParams(max_tokens=12, temperature=0)
    stock = [o.outputs[0].token_ids for o in LLM(**common).generate(batch, sp)]
    ours = LLM(**common, attention_backend="madakv", additional_config={"madakv": {"policy": "full"}})
    assert [o.outputs[0].token_ids for o in ours.generate(batch, sp)] == stock
    sp_evict = SamplingParams(max_tokens=12, temperature=0, extra_args={"madakv_budget": 0.2})
    pool = ours.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
    free0 = pool.get_num_free_blocks()
    out = ours.generate(batch, sp_evict)
    assert out[0].outputs[0].token_ids[0] == stock[0][0]
    assert pool.get_num_free_blocks() == free0


def test_cuda_module_imports_without_gpu():
    from madakv_vllm.integration import cuda_backend

    assert cuda_backend.MadaKVCUDABackend.get_name() == "MADAKV"
    assert cuda_backend.MadaKVCUDABackend.supported_kv_cache_layouts()[0].name == "LBHNC"


def reference_flash_attn_varlen_func(q, k, v, max_seqlen_q, cu_seqlens_q, max_seqlen_k, seqused_k, softmax_scale,
                                     causal, block_table, out, fa_version=None, **unused):
    """Plain-torch stand-in for vLLM's paged FlashAttention varlen call, as the CUDA backend makes
    it: q [total_q, G, D]; k, v [num_blocks, bs, 1, D]; sequence i has query rows
    cu_seqlens_q[i]:cu_seqlens_q[i+1], its first seqused_k[i] keys in block_table[i]'s blocks, and
    causal masking aligned bottom-right (its queries are its last keys)."""
    assert causal and k.shape[2] == 1 and max_seqlen_q >= 1
    bs = k.shape[1]
    for i in range(block_table.shape[0]):
        q0, q1, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(seqused_k[i])
        if q1 == q0:
            continue
        assert n <= max_seqlen_k
        blocks = block_table[i, : -(-n // bs)].long()
        kk = k[blocks, :, 0].reshape(-1, k.shape[-1])[:n].float()
        vv = v[blocks, :, 0].reshape(-1, v.shape[-1])[:n].float()
        qq = q[q0:q1].float()  # [nq, G, D]
        s = torch.einsum("qgd,kd->gqk", qq, kk) * softmax_scale
        qpos = torch.arange(n - (q1 - q0), n).view(1, -1, 1)
        s = s.masked_fill(torch.arange(n).view(1, 1, -1) > qpos, float("-inf"))
        out[q0:q1] = torch.einsum("gqk,kd->qgd", s.softmax(-1), vv).to(out.dtype)
    return out


def test_cuda_backend_logic_runs_on_cpu_with_reference_attention(engine, model_dir, monkeypatch):
    """The CUDA backend end to end on the CPU platform, with only FlashAttention replaced by the
    plain-torch reference above: metadata, per-head tables, torch KV moves, compaction and page
    freeing are the CUDA path's own code. Full policy == stock CPU_ATTN tokens; with eviction,
    attention over the compacted cache == dense attention over the retained tokens."""
    import sys
    import types

    from conftest import mm_prompt, words
    from vllm import LLM, SamplingParams
    from vllm.v1.attention import selector
    from vllm.v1.attention.backends import fa_utils

    from madakv_vllm.integration import plugin, verify

    fake = types.ModuleType("vllm.vllm_flash_attn")
    fake.flash_attn_varlen_func = reference_flash_attn_varlen_func
    monkeypatch.setitem(sys.modules, "vllm.vllm_flash_attn", fake)
    monkeypatch.setattr(fa_utils, "get_flash_attn_version", lambda **kw: 2)
    monkeypatch.setattr(plugin, "CPU_BACKEND_PATH", plugin.CUDA_BACKEND_PATH)
    # vLLM caches the backend class per selection; engines of other tests must get the CPU one.
    selector._cached_get_attn_backend.cache_clear()

    batch = [mm_prompt("qwen2vl", [0, words(400), 1]), mm_prompt("qwen2vl", [words(30, 1)]),
             mm_prompt("qwen2vl", [words(200, 2), 2, words(250, 3)])]
    sp = SamplingParams(max_tokens=12, temperature=0, logprobs=2)
    stock = engine("qwen2vl").generate(batch, sp, use_tqdm=False)
    llm = None
    try:
        llm = LLM(model=str(model_dir("qwen2vl")), enforce_eager=True, max_model_len=8192, block_size=32,
                  dtype="float32", seed=0, max_num_batched_tokens=512, limit_mm_per_prompt={"image": 8},
                  attention_backend="madakv", additional_config={"madakv": {"policy": "full"}})
        runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
        backends = {type(g.backend).__name__ if not isinstance(g.backend, type) else g.backend.__name__
                    for groups in runner.attn_groups for g in groups}
        assert backends == {"MadaKVCUDABackend"}, backends
        ours = llm.generate(batch, sp, use_tqdm=False)
        for a, b in zip(ours, stock):
            assert a.outputs[0].token_ids == b.outputs[0].token_ids
            for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
                for t in lb:
                    assert abs(la[t].logprob - lb[t].logprob) < 1e-4

        verify.SHADOW, verify.ENABLED = verify.Shadow(), True
        pool = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.block_pool
        free0 = pool.get_num_free_blocks()
        evict = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True,
                               extra_args={"madakv_policy": "madakv", "madakv_budget": 0.2,
                                           "madakv_recompress_interval": 16})
        out = llm.generate(batch, evict, use_tqdm=False)
        assert [o.outputs[0].token_ids[0] for o in out] == [o.outputs[0].token_ids[0] for o in stock]
        assert verify.SHADOW.compressed_checked > 100
        assert verify.SHADOW.max_err < 1e-4, verify.SHADOW.max_err
        assert pool.get_num_free_blocks() == free0
    finally:
        verify.ENABLED = False
        del llm
        selector._cached_get_attn_backend.cache_clear()
