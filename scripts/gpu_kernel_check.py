#!/usr/bin/env python3
"""The CUDA backend's per-head FlashAttention call against a dense fp32 reference, on a GPU.

    python scripts/gpu_kernel_check.py [--seed 0]

Calls ``madakv_vllm.integration.cuda_backend.per_head_attention`` -- the exact call the CUDA
backend makes: one pseudo-sequence per (request, KV head) over the per-head paged view of an LBHNC
KV buffer, int32 tables -- for every FlashAttention version this GPU supports (2, 3, 4), fp16 and
bf16, block sizes 16 and 32, GQA groups of 1, 4 and 7 query heads per KV head, head dims 64 and 128,
in a decode batch (one query per sequence) and a mixed one (prefill chunks beside decodes). Each
sequence gets its own length and a shuffled sub-block table, as compaction leaves them. Prints
one line per case and exits 1 if any case exceeds its tolerance (max |error| / max |reference|).
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

TOLERANCE = {torch.float16: 5e-3, torch.bfloat16: 3e-2}


def dense_reference(q, cache, cu_seqlens_q, seqused_k, block_table, scale):
    """fp32 attention of each sequence's queries over its first seqused_k entries, causal with the
    queries at the end of the sequence."""
    bs = cache.key4.shape[1]
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    for i in range(block_table.shape[0]):
        q0, q1, n = int(cu_seqlens_q[i]), int(cu_seqlens_q[i + 1]), int(seqused_k[i])
        j = torch.arange(n, device=q.device)
        sub = block_table[i, j // bs].long()
        k = cache.key4[sub, j % bs, 0].float()  # [n, D]
        v = cache.value4[sub, j % bs, 0].float()
        s = torch.einsum("qgd,kd->gqk", q[q0:q1].float(), k) * scale
        qpos = torch.arange(n - (q1 - q0), n, device=q.device).view(1, -1, 1)
        s = s.masked_fill(j.view(1, 1, -1) > qpos, float("-inf"))
        out[q0:q1] = torch.einsum("gqk,kd->qgd", s.softmax(-1), v)
    return out


def one_case(fa_version, dtype, bs, group, head_dim, mixed, gen, device="cuda") -> float:
    from madakv_vllm.integration.cuda_backend import per_head_attention
    from madakv_vllm.integration.paged import TorchFlatKVCache

    dev = torch.device(device)
    num_reqs, num_kv_heads, num_blocks = 5, 2, 160
    buf = torch.zeros(1, num_blocks, num_kv_heads, bs, 2 * head_dim, dtype=dtype, device=dev)
    cache = TorchFlatKVCache([buf[0]])
    num_seqs = num_reqs * num_kv_heads
    lengths = torch.randint(1, 600, (num_seqs,), generator=gen)
    nq = torch.ones(num_seqs, dtype=torch.long)
    if mixed:  # every third sequence is a prefill chunk of up to 64 queries
        chunk = torch.randint(2, 65, (num_seqs,), generator=gen)
        nq = torch.where(torch.arange(num_seqs) % 3 == 0, torch.minimum(chunk, lengths), nq)
    max_blocks = int((lengths.max() + bs - 1) // bs)
    perm = torch.randperm(num_blocks * num_kv_heads, generator=gen)  # every sub-block once
    need = (lengths + bs - 1) // bs
    assert int(need.sum()) <= perm.numel()
    table = torch.zeros(num_seqs, max_blocks, dtype=torch.int32)
    start = 0
    for i in range(num_seqs):
        table[i, : need[i]] = perm[start : start + int(need[i])].to(torch.int32)
        start += int(need[i])
        j = torch.arange(int(lengths[i]))
        slots = table[i, j // bs].long() * bs + j % bs
        k = torch.randn(len(j), head_dim, generator=gen).to(dtype)
        v = torch.randn(len(j), head_dim, generator=gen).to(dtype)
        cache.write(k.to(dev), v.to(dev), slots.to(dev))
    cu = torch.zeros(num_seqs + 1, dtype=torch.int32)
    cu[1:] = nq.cumsum(0).to(torch.int32)
    q = torch.randn(int(cu[-1]), group, head_dim, generator=gen).to(dtype).to(dev)
    scale = head_dim**-0.5
    args = (cu.to(dev), int(nq.max()), lengths.to(torch.int32).to(dev), int(lengths.max()), table.to(dev))
    got = per_head_attention(q, cache, *args, scale, fa_version)
    ref = dense_reference(q, cache, args[0], args[2], args[4], scale)
    return float((got.float() - ref).abs().max() / ref.abs().max())


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_kernel_check: no CUDA device", file=sys.stderr)
        return 2
    from vllm.vllm_flash_attn.flash_attn_interface import fa_version_unsupported_reason, is_fa_version_supported

    versions = [v for v in (2, 3, 4) if is_fa_version_supported(v)]
    for v in (2, 3, 4):
        if v not in versions:
            print(f"FA{v}: not supported on {torch.cuda.get_device_name()} ({fa_version_unsupported_reason(v)})")
    gen = torch.Generator().manual_seed(args.seed)
    failed = 0
    cases = itertools.product(versions, (torch.bfloat16, torch.float16), (16, 32), (1, 4, 7), (64, 128), (False, True))
    for fa, dtype, bs, group, head_dim, mixed in cases:
        try:
            err = one_case(fa, dtype, bs, group, head_dim, mixed, gen)
            ok = err <= TOLERANCE[dtype]
            msg = f"rel err {err:.2e}"
        except Exception as e:  # a kernel that rejects the call is a failure of this case
            ok, msg = False, f"{type(e).__name__}: {e}"
        failed += not ok
        print(f"{'ok  ' if ok else 'FAIL'} FA{fa} {str(dtype)[6:]:8} bs={bs:<2} group={group} head_dim={head_dim:<3} "
              f"{'mixed ' if mixed else 'decode'} {msg}", flush=True)
    print(f"gpu_kernel_check: {failed} failed of {len(versions) * 48} cases")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
