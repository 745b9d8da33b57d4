"""vLLM's CPU attention ISAs under madakv: the kernel on our per-head view against a dense
reference for every ISA this machine runs, and eviction end to end through the offline engine in bf16
(the dtype users run, where vLLM picks ``amx`` on CPUs with AMX tiles) and fp32.

``amx`` takes two things, which differ: vLLM's amx KV *writer*, compiled only into the ``vllm._C``
library (loaded on x86 CPUs with AVX-512 BF16; plain code, runs without AMX tiles), and its amx
attention *kernel*, which executes AMX tile instructions. Where the writer runs but the kernel cannot
(an AVX-512 BF16 CPU without AMX tiles, e.g. AMD EPYC), the layout is checked only against the
reader (test_block_layout.py::test_amx_writer_round_trips_through_the_reader), not against the kernel.
"""

import pytest
import torch
from conftest import mm_prompt, words
from test_block_layout import cpu_name, kernel_library, written_layout_or_skip
from test_engine import _run, free_blocks, greedy, manager

from madakv_vllm.integration.paged import FlatKVCache

# (ISA, head size vLLM uses it with)
KERNEL_ISAS = [("vec", 64), ("vec16", 80), ("amx", 64)]
TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}


def runs_kernel_or_skip(isa: str, bs: int, d: int, dtype: torch.dtype) -> None:
    """Skips unless this process has vLLM's ``isa`` KV writer for the shape (a property of the vLLM
    library loaded) and this CPU can execute ``isa``'s attention kernel (for ``amx``: AMX tiles)."""
    written_layout_or_skip(isa, bs, d, dtype)  # the writer: skips naming the library
    if isa == "amx":
        if not torch.cpu._is_amx_tile_supported():
            pytest.skip(f"vLLM's amx attention kernel executes AMX tile instructions and this CPU ({cpu_name()}) "
                        f"has no AMX tiles (torch.cpu._is_amx_tile_supported(); lscpu: amx_tile, amx_bf16). Its "
                        f"amx KV writer does run here ({kernel_library()}): the reader's round trip of what it "
                        f"writes is checked by test_block_layout.py; that the amx kernel reads that layout is not "
                        f"checked on this machine")
        torch.cpu._init_amx()  # the engine's worker does this; a bare kernel call without it dies with SIGILL


def dense(q, k, v, q_first, scale):
    """fp32 causal attention of queries at positions q_first.. over keys [0, n): q [m, G, D]."""
    s = torch.einsum("mgd,nd->mgn", q.float(), k.float()) * scale
    pos_q = torch.arange(q_first, q_first + q.shape[0]).view(-1, 1, 1)
    s = s.masked_fill(torch.arange(k.shape[0]).view(1, 1, -1) > pos_q, float("-inf"))
    return torch.einsum("mgn,nd->mgd", torch.softmax(s, -1), v.float())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("isa, d", KERNEL_ISAS)
def test_kernel_on_the_per_head_view_equals_dense_attention(isa, d, dtype):
    """One kernel sequence per (request, KV head), ``num_kv_heads=1``, over scattered sub-blocks of a
    two-layer buffer: a prefill, a chunk of a longer prompt, and a decode step. Entries are written by
    vLLM's own writer of ``isa`` (FlatKVCache.write) and the kernel reads them through our per-head
    block tables: the output equals dense attention only if the kernel reads the layout the writer
    wrote at the sub-blocks our tables name. For ``amx`` this is the only check that the amx kernel
    reads the probed layout, and it needs AMX tiles."""
    from vllm import _custom_ops as ops

    bs, G, L, NB, H = 32, 2, 2, 8, 2
    runs_kernel_or_skip(isa, bs, d, dtype)
    buf = torch.zeros(L, NB, H, bs, 2 * d, dtype=dtype)
    cache = FlatKVCache([buf[l] for l in range(L)], isa)
    gen = torch.Generator().manual_seed(0)
    pool = torch.randperm(cache.num_subblocks, generator=gen)  # each sequence takes scattered sub-blocks
    seqs = [(70, 70), (100, 37), (45, 1)]  # (length, queries): prefill, later chunk, decode
    tables, keys, values, queries, taken = [], [], [], [], 0
    for n, m in seqs:
        nsub = -(-n // bs)
        table = pool[taken : taken + nsub]
        taken += nsub
        k, v = torch.randn(n, d, generator=gen).to(dtype), torch.randn(n, d, generator=gen).to(dtype)
        j = torch.arange(n)
        cache.write(k, v, table[j // bs] * bs + j % bs)
        tables.append(table)
        keys.append(k)
        values.append(v)
        queries.append(torch.randn(m, G, d, generator=gen).to(dtype))
    width = max(len(t) for t in tables)
    block_table = torch.stack([torch.nn.functional.pad(t, (0, width - len(t))) for t in tables]).to(torch.int32)
    seq_lens = torch.tensor([n for n, _ in seqs], dtype=torch.int32)
    qsl = torch.tensor([0] + [m for _, m in seqs], dtype=torch.int32).cumsum(0).to(torch.int32)
    q = torch.cat(queries)
    out = torch.empty_like(q)
    scale = d**-0.5
    try:
        meta = ops.cpu_attn_get_scheduler_metadata(
            num_reqs=len(seqs), num_heads=G, num_kv_heads=1, head_dim=d, seq_lens=seq_lens, dtype=dtype,
            query_start_loc=qsl, causal=True, sliding_window_size=-1, isa=isa, enable_kv_split=False)
        ops.cpu_attention_with_kv_cache(
            query=q, key_cache=cache.key, value_cache=cache.value, output=out, query_start_loc=qsl,
            seq_lens=seq_lens, scale=scale, causal=True, alibi_slopes=None, sliding_window=-1,
            block_table=block_table, softcap=0, scheduler_metadata=meta, s_aux=None)
    except RuntimeError as e:
        if dtype is torch.float16 and "Unsupported" in str(e):
            pytest.skip(f"vLLM's {isa} kernel has no fp16 path on this CPU ({cpu_name()}): {e}")
        raise
    err = 0.0
    for i, (n, m) in enumerate(seqs):
        ref = dense(queries[i], keys[i], values[i], n - m, scale)
        err = max(err, float((out[int(qsl[i]) : int(qsl[i + 1])].float() - ref).abs().max()))
    assert err < TOLERANCE[dtype], (isa, dtype, err)


# --- end to end through the offline engine ------------------------------------------------------


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_eviction_end_to_end_in_the_isa_vllm_picks(engine, dtype):
    """madakv and snapkv at budget 0.2 on a multimodal prompt: compression, 40 decode steps with
    re-compression every 16 tokens, attention over the compacted cache equal to fp32 attention over
    exactly the retained tokens, pages freed, and every page back. In bf16 on a CPU with AMX tiles
    this runs vLLM's ``amx`` ISA; elsewhere ``vec``."""
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa

    from madakv_vllm.integration import per_head, verify

    # float32 is the other engine tests' engine; bf16 one of its own
    llm = engine("qwen2vl", {"policy": "full"}, **({"dtype": dtype} if dtype != "float32" else {}))
    expected_isa = _get_attn_isa(getattr(torch, dtype), 32, 32)  # block size, the tiny model's head size
    free0 = free_blocks(llm)
    held = {}  # request -> pages held at its last step

    def record(step):
        for rid, blocks in manager(llm).req_to_blocks.items():
            held[rid] = sum(not b.is_null for b in blocks)

    reqs = {}
    for i, policy in enumerate(["madakv", "snapkv"]):
        prompt = mm_prompt("qwen2vl", [words(200, i), i, words(300, i + 1), i + 1])
        reqs[f"{policy}-{dtype}"] = (prompt, greedy(40, madakv_policy=policy, madakv_budget=0.2,
                                                    madakv_recompress_interval=16))
    verify.start(llm)  # empties the prefix cache: hits are checked against the shadow's own records
    try:
        outs = list(_run(llm, reqs, record).values())
        isas = {st.cache.isa for st in per_head.STATES if st.cache is not None}
    finally:
        verify.ENABLED = False
    assert len(outs) == 2 and all(len(o.outputs[0].token_ids) == 40 for o in outs)
    assert expected_isa in isas, (expected_isa, isas)
    assert verify.SHADOW.compressed_checked > 500
    assert verify.SHADOW.max_err < TOLERANCE[getattr(torch, dtype)], verify.SHADOW.max_err
    prompt_pages = -(-len(outs[0].prompt_token_ids) // 32)
    assert held and max(held.values()) <= 0.35 * prompt_pages + 3, (held, prompt_pages)  # stock: all + 2
    assert free_blocks(llm) == free0


# --- what startup can find stops startup ---------------------------------------------------------


def _start(model_dir):
    from vllm import LLM

    return LLM(model=str(model_dir("llama")), enforce_eager=True, max_model_len=1024, block_size=32,
               dtype="bfloat16", attention_backend="madakv")


def test_an_unreadable_kv_layout_stops_the_engine_at_startup(model_dir, monkeypatch):
    """No ISA's layout reads back: the engine does not start (rather than dying at a request), and
    the error names the ISA, the dtype and the CPU."""
    from madakv_vllm.integration import cpu_backend
    from madakv_vllm.integration.block_layout import LayoutError

    def unreadable(isa, *args):
        raise LayoutError(f"madakv: emulated unreadable layout of {isa}")

    monkeypatch.setattr(cpu_backend, "kernel_layout", unreadable)
    with pytest.raises(Exception, match=r"cannot run CPU attention ISA '\w+' with torch.bfloat16 on ") as err:
        _start(model_dir)
    assert cpu_name() in str(err.value)


def test_a_kv_cache_the_backend_cannot_view_stops_the_engine_at_startup(model_dir, monkeypatch):
    """The per-head view of the KV buffer is bound once vLLM has allocated it, before any request."""
    from madakv_vllm.integration import cpu_backend

    def refuse(*args, **kwargs):
        raise RuntimeError("madakv: unexpected KV cache view (emulated)")

    monkeypatch.setattr(cpu_backend, "FlatKVCache", refuse)
    with pytest.raises(Exception, match="unexpected KV cache view"):
        _start(model_dir)
