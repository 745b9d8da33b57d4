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
