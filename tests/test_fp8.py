"""fp8 KV caches (``kv_cache_dtype`` ``fp8``, ``fp8_e4m3``, ``fp8_e5m2``) under madakv on vLLM's CPU platform.

vLLM 0.32's CPU writer stores ``value / k_scale`` (``value / v_scale``) as fp8 bytes in a uint8
buffer, rounding its own way (not torch's casts); its kernels read ``byte's value * scale``. Checked
here: the layout probe reads fp8 pages in bytes; scoring sees the keys the kernel sees (the stored
values times the layer's k_scale); compaction moves the stored bytes, so every retained entry is
bit-identical after it; policy ``full`` gives stock fp8's tokens; every page comes back.

Stock accepts fp8 KV caches only on x86 CPUs with AVX-512 or AMX (vLLM's ``_get_attn_isa``); where
it refuses, these tests skip with its message. The end-to-end tests run a tiny bf16 Qwen2-VL (head
size 32: fp8 needs multiples of 32) with KV scales that are not powers of two (0.3, 1.7), set on
every attention layer as a checkpoint's would be (``BaseKVCacheMethod.process_weights_after_loading``
sets ``_k_scale_float``), so that re-quantizing a stored byte would change it.
"""

import gc

import pytest
import torch
from conftest import assert_same_tokens, close_engine, mm_prompt, run_requests, words
from test_block_layout import cpu_name, kernel_library

from madakv_vllm.integration.block_layout import FP8_FORMATS, LayoutError, kernel_layout, probe

VARIANTS = ("fp8", "fp8_e4m3", "fp8_e5m2")
K_SCALE, V_SCALE = 0.3, 1.7
BS = 32


def stock_fp8_refusal(kv_cache_dtype: str, head_size: int = 32) -> str | None:
    """vLLM's own refusal of an fp8 KV cache on this CPU (``_get_attn_isa``), or None if stock runs it."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return f"vLLM's platform here is {current_platform.device_name!r}, not its CPU platform"
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    try:
        _get_attn_isa(torch.bfloat16, BS, head_size, kv_cache_dtype)
    except NotImplementedError as e:
        return str(e)
    return None


def skip_unless_stock_runs(kv_cache_dtype: str) -> None:
    why = stock_fp8_refusal(kv_cache_dtype)
    if why:
        pytest.skip(f"stock vLLM refuses a {kv_cache_dtype} KV cache on this CPU ({cpu_name()}): {why}")


def writer_or_skip(isa: str, bs: int, d: int, kv_cache_dtype: str):
    """The probed fp8 layout of vLLM's ``isa`` writer; skips where the writer refuses fp8 pages."""
    skip_unless_stock_runs(kv_cache_dtype)
    try:
        return kernel_layout(isa, bs, d, torch.bfloat16, kv_cache_dtype)
    except LayoutError as e:
        if "refuses" in str(e):
            pytest.skip(f"vLLM's {isa!r} KV writer ({kernel_library()}) writes no {kv_cache_dtype} pages: "
                        f"{str(e).split('): ', 1)[-1]}")
        raise


def fp8_values(n: int, d: int, fmt: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """[n, d] bf16 values the fp8 format holds exactly, none zero (vLLM stores -0 as +0)."""
    x = (torch.randn(n, d, generator=gen) * 4).to(fmt).float()
    return torch.where(x == 0, 1.0, x).to(torch.bfloat16)


# --- (5) the layout probe, in bytes --------------------------------------------------------------


@pytest.mark.parametrize("kv_cache_dtype", VARIANTS)
@pytest.mark.parametrize("isa, bs, d", [(isa, bs, d) for isa in ("vec", "amx", "vec16")
                                        for bs, d in ((32, 32), (32, 64), (64, 128), (256, 512))])
def test_fp8_pages_are_probed_in_bytes_and_read_back(isa, bs, d, kv_cache_dtype):
    """Every fp8 writer this vLLM library has is probed (``vec16`` has none: vLLM writes fp8 with
    AMX/VEC only); its tables count bytes of the uint8 sub-block. Values the format holds, written by
    vLLM's writer into every slot of a two-layer, two-head buffer, read back as exactly the bytes the
    format gives them; ``read_values`` gives them times the layer's scales."""
    from madakv_vllm.integration.paged import FlatKVCache

    layout = writer_or_skip(isa, bs, d, kv_cache_dtype)
    assert layout.key_index.shape == (bs, d)
    positions = torch.cat([layout.key_index.view(-1), layout.value_index.view(-1)])
    assert torch.equal(positions.sort().values, torch.arange(2 * bs * d))  # every byte of the sub-block, once
    fmt = FP8_FORMATS[kv_cache_dtype]
    L, NB, H = 2, 3, 2
    pad = 3 * d  # the buffer starts inside a larger allocation, as the engine's layer views do
    buf = torch.zeros(pad + L * NB * H * bs * 2 * d, dtype=torch.uint8)[pad:].view(L, NB, H, bs, 2 * d)
    cache = FlatKVCache([buf[l] for l in range(L)], isa, kv_cache_dtype, torch.bfloat16)
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(cache.num_subblocks * bs, generator=gen)
    k, v = fp8_values(len(slots), d, fmt, gen), fp8_values(len(slots), d, fmt, gen)
    cache.write(k, v, slots)  # vLLM's cpu_attn_reshape_and_cache, scales 1
    rk, rv = cache.read(slots)
    assert rk.dtype == torch.uint8
    assert torch.equal(rk, k.to(fmt).view(torch.uint8)) and torch.equal(rv, v.to(fmt).view(torch.uint8))
    cache.scales = [(1.0, 1.0), (K_SCALE, V_SCALE)]
    dk, dv = cache.read_values(1, slots)
    assert torch.equal(dk, k.float() * K_SCALE) and torch.equal(dv, v.float() * V_SCALE)


@pytest.mark.parametrize("kv_cache_dtype", VARIANTS)
def test_the_probe_needs_codes_the_fp8_format_holds(kv_cache_dtype, monkeypatch):
    """bf16's codes (digits up to 128) do not survive fp8 (e4m3 holds integers up to 16 exactly,
    e5m2 up to 8): probed with them, the fp8 writer's rounded codes collide and the probe fails
    loudly; with the format's radix it reads."""
    from madakv_vllm.integration import block_layout

    writer_or_skip("vec", 32, 64, kv_cache_dtype)
    writer = block_layout.kernel_writer("vec", kv_cache_dtype)
    assert probe(writer, "vec", 32, 64, torch.bfloat16, kv_cache_dtype).key_index.shape == (32, 64)
    monkeypatch.setattr(block_layout, "format_radix", lambda fmt: block_layout.RADIX)
    with pytest.raises(LayoutError, match="at more than one position|does not store the entries"):
        probe(writer, "vec", 32, 64, torch.bfloat16, kv_cache_dtype)


@pytest.mark.parametrize("kv_cache_dtype", VARIANTS)
def test_vec_fp8_layout_is_vecs_bf16_layout_in_bytes(kv_cache_dtype):
    """A hand reading of vLLM's vec writer: K transposed ``[D, bs]``, V plain ``[bs, D]``, one byte each."""
    bs, d = 32, 64
    layout = writer_or_skip("vec", bs, d, kv_cache_dtype)
    o, j = torch.arange(bs).view(-1, 1), torch.arange(d).view(1, -1)
    assert torch.equal(layout.key_index, j * bs + o)
    assert torch.equal(layout.value_index, bs * d + o * d + j)


@pytest.mark.parametrize("kv_cache_dtype", VARIANTS)
@pytest.mark.parametrize("isa", ["vec", "amx"])
def test_put_moves_every_byte_unchanged(isa, kv_cache_dtype):
    """Compaction's move (``FlatKVCache.put``): any bytes (NaN patterns and -0 included, which vLLM's
    writer never reproduces) read at some slots and put at others read back identical there."""
    from madakv_vllm.integration.paged import FlatKVCache

    bs, d = 32, 64
    writer_or_skip(isa, bs, d, kv_cache_dtype)
    L, NB, H = 2, 4, 2
    gen = torch.Generator().manual_seed(2)
    buf = torch.randint(0, 256, (L, NB, H, bs, 2 * d), generator=gen, dtype=torch.uint8)
    cache = FlatKVCache([buf[l] for l in range(L)], isa, kv_cache_dtype, torch.bfloat16)
    perm = torch.randperm(cache.num_subblocks * bs, generator=gen)
    src, dst = perm[:100], perm[100:200]
    k, v = cache.read(src)
    cache.put(k, v, dst)
    mk, mv = cache.read(dst)
    assert torch.equal(mk, k) and torch.equal(mv, v)
    assert bool((k == 0x80).any() or (v == 0x80).any())  # the bytes include -0


@pytest.mark.parametrize("kv_cache_dtype", VARIANTS)
def test_the_kernel_reads_fp8_entries_as_scoring_does(kv_cache_dtype):
    """What scoring reads (``read_values``: the stored value times the layer's scales) is what vLLM's
    attention kernel reads: its output over a page written with scales (0.3, 1.7) equals dense
    attention over ``read_values``; over the stored values without the scales it does not."""
    from vllm import _custom_ops as ops

    from madakv_vllm.integration.paged import FlatKVCache

    bs, d, G, n, m = 32, 64, 2, 90, 5
    isa = "vec"
    writer_or_skip(isa, bs, d, kv_cache_dtype)
    buf = torch.zeros(2, 4, 1, bs, 2 * d, dtype=torch.uint8)
    cache = FlatKVCache([buf[0], buf[1]], isa, kv_cache_dtype, torch.bfloat16)
    cache.scales[1] = (K_SCALE, V_SCALE)
    gen = torch.Generator().manual_seed(3)
    table = torch.tensor([6, 4, 7], dtype=torch.long)  # layer 1's sub-blocks, out of order
    slots = table[torch.arange(n) // bs] * bs + torch.arange(n) % bs
    k, v = torch.randn(n, d, generator=gen).to(torch.bfloat16), torch.randn(n, d, generator=gen).to(torch.bfloat16)
    cache.write(k, v, slots, K_SCALE, V_SCALE)
    q = torch.randn(m, G, d, generator=gen).to(torch.bfloat16)
    out = torch.empty_like(q)
    seq_lens, qsl = torch.tensor([n], dtype=torch.int32), torch.tensor([0, m], dtype=torch.int32)
    scale = d**-0.5
    meta = ops.cpu_attn_get_scheduler_metadata(
        num_reqs=1, num_heads=G, num_kv_heads=1, head_dim=d, seq_lens=seq_lens, dtype=torch.bfloat16,
        query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False,
        kv_cache_dtype=kv_cache_dtype)
    ops.cpu_attention_with_kv_cache(
        query=q, key_cache=cache.key, value_cache=cache.value, output=out, query_start_loc=qsl, seq_lens=seq_lens,
        scale=scale, causal=True, alibi_slopes=None, sliding_window=-1, block_table=table.view(1, -1).to(torch.int32),
        softcap=0, scheduler_metadata=meta, s_aux=None, k_scale=K_SCALE, v_scale=V_SCALE, kv_cache_dtype=kv_cache_dtype)

    def dense(keys, values):
        s = torch.einsum("mgd,nd->mgn", q.float(), keys) * scale
        pos_q = torch.arange(n - m, n).view(-1, 1, 1)
        s = s.masked_fill(torch.arange(n).view(1, 1, -1) > pos_q, float("-inf"))
        return torch.einsum("mgn,nd->mgd", torch.softmax(s, -1), values)

    dk, dv = cache.read_values(1, slots)
    assert float((out.float() - dense(dk, dv)).abs().max()) < 1e-2
    fmt = FP8_FORMATS[kv_cache_dtype]
    rk, rv = cache.read(slots)
    assert float((out.float() - dense(rk.view(fmt).float(), rv.view(fmt).float())).abs().max()) > 0.1


# --- which KV cache dtypes are accepted ------------------------------------------------------------


def test_the_kv_cache_dtypes_are_stocks_on_the_cpu_and_on_cuda(monkeypatch):
    """On the CPU platform, vLLM's validation checks stock CPU_ATTN's list (our backend inherits it);
    the CUDA backend takes FLASH_ATTN's (tests/test_cuda.py checks its validation against stock's);
    configure_engine refuses a quantized cache on other platforms only."""
    from types import SimpleNamespace

    import vllm.platforms
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
    from vllm.v1.attention.backends.flash_attn import FlashAttentionBackend
    from vllm.v1.attention.selector import AttentionSelectorConfig

    from madakv_vllm.integration import rules
    from madakv_vllm.integration.cpu_backend import MadaKVCPUBackend
    from madakv_vllm.integration.cuda_backend import MadaKVCUDABackend

    assert MadaKVCPUBackend.supported_kv_cache_dtypes == CPUAttentionBackend.supported_kv_cache_dtypes
    assert set(VARIANTS) <= set(MadaKVCPUBackend.supported_kv_cache_dtypes)
    assert MadaKVCUDABackend.supported_kv_cache_dtypes == FlashAttentionBackend.supported_kv_cache_dtypes
    cfg = AttentionSelectorConfig(head_size=64, dtype=torch.bfloat16, kv_cache_dtype="fp8", block_size=32)
    rules.validate_backend(rules.CPU_BACKEND_PATH, cfg, None)
    with pytest.raises(ValueError, match="kv_cache_dtype not supported"):
        rules.validate_backend(rules.CPU_BACKEND_PATH, cfg._replace(kv_cache_dtype="fp8_inc"), None)
    with pytest.raises(ValueError, match="kv_cache_dtype not supported"):  # under an fp32 model
        rules.validate_backend(rules.CPU_BACKEND_PATH, cfg._replace(kv_cache_dtype="bfloat16", dtype=torch.float32),
                               None)

    def config():
        cache = SimpleNamespace(cache_dtype="fp8", enable_prefix_caching=False, user_specified_block_size=True,
                                block_size=16)
        return SimpleNamespace(additional_config=None, model_config=None, cache_config=cache,
                               scheduler_config=SimpleNamespace(async_scheduling=False),
                               compilation_config=SimpleNamespace(cudagraph_mode=None), speculative_config=None)

    monkeypatch.setattr(rules, "_selected_in_this_process", rules._selected_in_this_process)  # restored after
    cuda = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: True, device_name="cuda")
    monkeypatch.setattr(vllm.platforms, "current_platform", cuda)
    rules.configure_engine(config())
    xpu = SimpleNamespace(is_cpu=lambda: False, is_cuda=lambda: False, device_name="xpu")
    monkeypatch.setattr(vllm.platforms, "current_platform", xpu)
    with pytest.raises(ValueError, match="needs an unquantized KV cache on xpu"):
        rules.configure_engine(config())


def test_where_stock_refuses_fp8_madakv_refuses_with_stocks_message(tmp_path):
    """Head size 80 (not a multiple of 32): stock's ISA choice refuses an fp8 cache; so does madakv, with
    the same message (its builder runs stock's choice first)."""
    from vllm import LLM

    from madakv_eval.tiny_models import build_model

    skip_unless_stock_runs("fp8")
    message = stock_fp8_refusal("fp8", head_size=80)
    assert message
    path = build_model("llama", tmp_path / "tiny-llama-80", seed=0, head_dim=80, dtype="bfloat16")
    for extra in ({}, {"attention_backend": "madakv"}):
        with pytest.raises(Exception, match=message.replace(".", r"\.")):
            LLM(model=str(path), enforce_eager=True, max_model_len=1024, block_size=32, dtype="bfloat16",
                kv_cache_dtype="fp8", **extra)
        gc.collect()


def test_a_cache_dtype_naming_the_models_dtype_is_served_as_stock_serves_it(bf16_model):
    """``--kv-cache-dtype bfloat16`` with a bf16 model: stock's CPU platform serves it as ``auto``
    (CPU_ATTN's list, which vLLM checks for our backend, names only ``auto``); so does madakv, with
    stock's greedy tokens under policy ``full``. Under a float32 model it stays ``bfloat16``, which
    vLLM's validation refuses for our backend (test above)."""
    import torch
    from vllm import LLM

    from madakv_vllm.integration.rules import model_dtype_cache

    assert model_dtype_cache("bfloat16", torch.bfloat16) == "auto"
    assert model_dtype_cache("bfloat16", torch.float32) == "bfloat16"
    assert model_dtype_cache("fp8", torch.bfloat16) == "fp8"
    batch = [mm_prompt("qwen2vl", [words(30)]), mm_prompt("qwen2vl", [0, words(40, 1)])]
    tokens = {}
    for extra in ({}, {"attention_backend": "madakv", "additional_config": {"madakv": {"policy": "full"}}}):
        llm = LLM(model=str(bf16_model), enforce_eager=True, max_model_len=4096, block_size=BS, dtype="bfloat16",
                  seed=0, kv_cache_dtype="bfloat16", limit_mm_per_prompt={"image": 2}, **extra)
        tokens[bool(extra)] = [o.outputs[0].token_ids for o in llm.generate(batch, greedy(12))]
        close_engine(llm)
        gc.collect()
    assert tokens[True] == tokens[False]


# --- end to end: a bf16 model with an fp8 KV cache ------------------------------------------------


def set_kv_scales(llm, k_scale: float, v_scale: float) -> int:
    """Every decoder attention layer's KV scales, as a checkpoint with KV scales sets them."""
    from vllm.model_executor.layers.attention import Attention

    runner = llm.llm_engine.engine_core.engine_core.model_executor.driver_worker.worker.model_runner
    layers = [m for m in runner.model.modules() if isinstance(m, Attention)]
    for layer in layers:
        layer._k_scale_float, layer._v_scale_float = k_scale, v_scale
    return len(layers)


def core(llm):
    return llm.llm_engine.engine_core.engine_core


def free_blocks(llm) -> int:
    return core(llm).scheduler.kv_cache_manager.block_pool.get_num_free_blocks()


def held_blocks(llm) -> dict[str, int]:
    manager = core(llm).scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    return {rid: sum(not b.is_null for b in blocks) for rid, blocks in manager.req_to_blocks.items()}


def greedy(n, **extra):
    from vllm import SamplingParams

    return SamplingParams(max_tokens=n, temperature=0, logprobs=3, extra_args=extra or None)


class Engines:
    """A stock and a madakv engine over one fp8 KV cache dtype, both with KV scales (0.3, 1.7)."""

    def __init__(self, path, kv_cache_dtype: str):
        self.path, self.kv_cache_dtype = path, kv_cache_dtype
        self._engines = {}

    def get(self, madakv: bool):
        if madakv not in self._engines:
            from vllm import LLM

            args = dict(model=str(self.path), enforce_eager=True, max_model_len=8192, block_size=BS, dtype="bfloat16",
                        seed=0, max_num_batched_tokens=512, limit_mm_per_prompt={"image": 8},
                        kv_cache_dtype=self.kv_cache_dtype)
            if madakv:
                args.update(attention_backend="madakv", additional_config={"madakv": {"policy": "full"}})
            llm = LLM(**args)
            assert set_kv_scales(llm, K_SCALE, V_SCALE) >= 2
            self._engines[madakv] = llm
        return self._engines[madakv]

    def close(self) -> None:
        for llm in self._engines.values():
            close_engine(llm)
        self._engines.clear()
        gc.collect()


@pytest.fixture(scope="module")
def bf16_model(tmp_path_factory):
    from madakv_eval.tiny_models import build_model

    return build_model("qwen2vl", tmp_path_factory.mktemp("fp8") / "tiny-qwen2vl-bf16", seed=0, dtype="bfloat16")


@pytest.fixture(scope="module", params=VARIANTS)
def engines(request, bf16_model):
    skip_unless_stock_runs(request.param)
    e = Engines(bf16_model, request.param)
    yield e
    e.close()


def test_full_policy_gives_stock_fp8s_tokens(engines):
    """(1) Policy ``full`` over an fp8 cache: stock's greedy tokens, and its logprobs."""
    batch = [mm_prompt("qwen2vl", [words(30)]), mm_prompt("qwen2vl", [0, words(40, 1)]),
             mm_prompt("qwen2vl", [words(20, 2), 1, words(200, 3), 2, words(10), 3]),
             mm_prompt("qwen2vl", [words(600, 4)])]
    stock = engines.get(False).generate(batch, greedy(16), use_tqdm=False)
    ours = engines.get(True).generate(batch, greedy(16), use_tqdm=False)
    for a, b in zip(stock, ours):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for la, lb in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert la.keys() == lb.keys()
            assert all(abs(la[t].logprob - lb[t].logprob) < 1e-3 for t in la)


def writer_bytes(values: torch.Tensor, isa: str, kv_cache_dtype: str, scale: float) -> torch.Tensor:
    """The byte vLLM's writer stores for each of ``values`` as a key with k_scale ``scale``, asked of
    the writer without any layout: a value written to every dim of one entry fills the K half of its
    sub-block with D copies of its byte and zeros."""
    from vllm import _custom_ops as ops

    d = values.shape[-1]
    uniq, inverse = torch.unique(values.reshape(-1), return_inverse=True)
    buf = torch.zeros(len(uniq), 1, 2 * BS, d, dtype=torch.uint8)
    key_cache, value_cache = buf.chunk(2, dim=2)
    entry = uniq.view(-1, 1, 1).expand(-1, 1, d).contiguous()
    ops.cpu_attn_reshape_and_cache(entry, entry, key_cache, value_cache, torch.arange(len(uniq)) * BS, isa,
                                   k_scale=scale, v_scale=scale, kv_cache_dtype=kv_cache_dtype)
    k_half = buf[:, 0, :BS].reshape(len(uniq), -1)
    byte = k_half.max(dim=1).values
    written = (k_half != 0).sum(dim=1)
    assert bool(((written == 0) | (written == d)).all()) and bool(((k_half == 0) | (k_half == byte.view(-1, 1))).all())
    return byte[inverse].view(values.shape)


@pytest.fixture(scope="module")
def evicted(engines):
    """One request at budget 0.2 (madakv), compressed after its prompt and re-compressed twice while
    decoding, with what scoring and compaction saw recorded: the keys each layer wrote (as computed,
    before quantization), the policy's inputs, and the bytes of every retained entry before and after
    each compaction."""
    from madakv_vllm.integration import per_head
    from madakv_vllm.integration.eviction import WorkerKV
    from madakv_vllm.policies.core import Policy

    llm = engines.get(True)
    rec = {"keys": {}, "begin": [], "observed": [], "compactions": [], "held": [], "free0": free_blocks(llm)}
    after_attention, begin, observe_layer, compact = (
        per_head.after_attention, Policy.begin, Policy.observe_layer, WorkerKV.compact)

    def recording_after_attention(batch, layer_idx, layer, query, key, *rest):
        if key is not None:
            rec["keys"].setdefault(layer_idx, []).append(key.detach().clone())
        return after_attention(batch, layer_idx, layer, query, key, *rest)

    def recording_begin(self, **kwargs):
        rec["begin"].append(dict(kwargs))
        return begin(self, **kwargs)

    def recording_observe_layer(self, state, layer, query, key):
        rec["observed"].append((layer, query.clone(), key.clone()))
        return observe_layer(self, state, layer, query, key)

    def recording_compact(self, ev):
        c, bs, rs = self.cache, self.bs, ev.req
        before, src = {}, {}
        for l in range(self.num_layers):
            for h in range(self.H):
                idx = ev.kept[l][h]
                src[l, h] = (self.stock_slots(l, h, ev.block_ids, idx) if ev.from_stock
                             else rs.subblocks[l, h, idx // bs] * bs + idx % bs)
                before[l, h] = [t.clone() for t in c.read(src[l, h])]
        compact(self, ev)
        after, dst = {}, {}
        for (l, h) in before:
            j = torch.arange(int(rs.lens[l, h]))
            dst[l, h] = rs.subblocks[l, h, j // bs] * bs + j % bs
            after[l, h] = c.read(dst[l, h])
        rec["compactions"].append(dict(from_stock=ev.from_stock, kept=[[k.clone() for k in ks] for ks in ev.kept],
                                       cfg=rs.cfg, isa=c.isa, before=before, after=after, src=src, dst=dst))

    prompt = mm_prompt("qwen2vl", [words(250, 11), 0, words(300, 12), 1, words(60, 13)])
    params = greedy(40, madakv_policy="madakv", madakv_budget=0.2, madakv_recompress_interval=16)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(per_head, "after_attention", recording_after_attention)
        mp.setattr(Policy, "begin", recording_begin)
        mp.setattr(Policy, "observe_layer", recording_observe_layer)
        mp.setattr(WorkerKV, "compact", recording_compact)
        outs = run_requests(llm, {"evict": (prompt, params)},
                            on_step=lambda step: rec["held"].append(sum(held_blocks(llm).values())))
    rec["output"] = outs["evict"]
    return rec


def test_eviction_keeps_what_a_selection_on_the_dequantized_keys_keeps(evicted, engines):
    """(2) The keys the policy scored are the stored fp8 keys times k_scale, found independently: each
    key the model computed, quantized by asking vLLM's writer value by value (no layout), times 0.3.
    The engine kept exactly what the request's policy keeps on those keys and the same queries."""
    from madakv_vllm.policies import make_policy

    assert len(evicted["output"].outputs[0].token_ids) == 40
    begin_args = evicted["begin"][0]  # the prompt's compression (re-compressions begin one per head)
    prompt_event = next(c for c in evicted["compactions"] if c["from_stock"])
    n, fmt = begin_args["seq_len"], FP8_FORMATS[engines.kv_cache_dtype]
    layers = sorted(evicted["keys"])
    observed = evicted["observed"][: len(layers)]
    assert begin_args["num_layers"] == len(layers) and [layer for layer, _, _ in observed] == layers
    assert n == len(evicted["output"].prompt_token_ids)
    queries, dequantized = [], []
    for layer, query, seen in observed:
        computed = torch.cat(evicted["keys"][layer])[:n].transpose(0, 1)  # [H, n, D] as the model computed them
        stored = writer_bytes(computed, prompt_event["isa"], engines.kv_cache_dtype, K_SCALE)
        dequantized.append(stored.view(fmt).float() * K_SCALE)
        assert torch.equal(seen, dequantized[-1]), f"layer {layer}: scored keys differ from the dequantized fp8 keys"
        assert not torch.equal(seen, computed.float())  # (the cache is quantized: scoring did not see these)
        queries.append(query)
    policy = make_policy(prompt_event["cfg"])
    state = policy.begin(**begin_args)
    for layer, (q, k) in enumerate(zip(queries, dequantized)):
        policy.observe_layer(state, layer, q, k)
    expected = policy.select_observed(state)
    for l, (got, want) in enumerate(zip(prompt_event["kept"], expected)):
        for h, (g, w) in enumerate(zip(got, want)):
            assert torch.equal(g, w.to(g.dtype)), (l, h)
    assert sum(len(k) for ks in prompt_event["kept"] for k in ks) < 0.3 * n * len(layers) * len(prompt_event["kept"][0])


def test_compaction_moves_the_retained_bytes_unchanged(evicted):
    """(3) Every retained entry's K and V bytes at its packed slot after a compaction (the prompt's,
    and the re-compressions while decoding) equal its bytes at its slot before it."""
    kinds = [c["from_stock"] for c in evicted["compactions"]]
    assert kinds[0] and not all(kinds), kinds  # the prompt's compression, then re-compressions
    moved = []  # entries each compaction moved (a re-compression that keeps every entry moves none)
    for i, c in enumerate(evicted["compactions"]):
        moved.append(0)
        for (l, h), (k, v) in c["before"].items():
            ak, av = c["after"][l, h]
            assert k.dtype == torch.uint8 and len(ak) == len(k) > 0
            assert torch.equal(ak, k) and torch.equal(av, v), f"compaction {i}, layer {l}, head {h}"
            moved[-1] += int((c["src"][l, h] != c["dst"][l, h]).sum())
    assert moved[0] > 0 and any(m > 0 for m, stock in zip(moved, kinds) if not stock), moved


def test_every_page_returns(evicted, engines):
    """(4) The evicting request frees pages right after its compression, and once it and a batch of
    policies at budget 0.2 with re-compression (and one evicting after every prefill chunk) have
    finished, every page is back in the pool."""
    llm = engines.get(True)
    held = evicted["held"]
    prompt_pages = -(-len(evicted["output"].prompt_token_ids) // BS)
    peak = held.index(max(held))  # the whole prompt, just before its compression
    assert held[peak] >= prompt_pages and held[peak + 1] <= 0.35 * prompt_pages + 3, (held, prompt_pages)
    assert free_blocks(llm) == evicted["free0"]
    reqs = {}
    for i, pol in enumerate(["madakv", "snapkv", "h2o", "full"]):
        prompt = mm_prompt("qwen2vl", [words(200 + 50 * i, 20 + i), i, words(400, 30 + i), i + 1])
        reqs[pol] = (prompt, greedy(24, madakv_policy=pol, madakv_budget=0.2, madakv_recompress_interval=8))
    prompt = mm_prompt("qwen2vl", [words(900, 40), 0, words(700, 41)])  # evicted after each 512-token chunk
    reqs["chunked"] = (prompt, greedy(24, madakv_budget=0.2, madakv_prefill_eviction="chunked"))
    outs = run_requests(llm, reqs)
    assert len(outs) == len(reqs) and all(len(o.outputs[0].token_ids) == 24 for o in outs.values())
    assert free_blocks(llm) == evicted["free0"]


def test_a_compressed_requests_prefix_hit_on_fp8_pages_gives_its_tokens_without_the_hit(engines):
    """Prefix caching over an fp8 cache: a compressed request hits another request's fp8 pages
    (a window short of its prompt's end), scores and moves them like its own, and generates the
    tokens it generates with no hit (bf16 model: up to a tie, ``assert_same_tokens``)."""
    llm = engines.get(True)
    shared = [words(60, 8), 0, words(600, 9)]
    first, second = mm_prompt("qwen2vl", shared + [words(4, 1)]), mm_prompt("qwen2vl", shared + [words(4, 2)])
    evict = dict(madakv_policy="madakv", madakv_budget=0.2)
    llm.reset_prefix_cache()
    llm.generate([first], greedy(2), use_tqdm=False)  # policy full (the engine's): its prompt pages are hashed
    hit = llm.generate([second], greedy(12, **evict), use_tqdm=False)[0]
    assert 0 < hit.num_cached_tokens <= len(hit.prompt_token_ids) - 32
    llm.reset_prefix_cache()
    alone = llm.generate([second], greedy(12, **evict), use_tqdm=False)[0]
    assert alone.num_cached_tokens == 0
    assert_same_tokens(hit.outputs[0], alone.outputs[0], "bfloat16")
