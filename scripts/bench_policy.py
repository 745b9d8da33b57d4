"""Cost of MadaKV scoring + selection for one prompt, all layers (no vLLM).

Attention shape of Qwen2-VL-2B: 28 layers, 12 query heads, 2 KV heads, head_dim 128. Random post-RoPE
q/k; modality half text / half image in alternating blocks. Prints the median over --repeats runs.

    python scripts/bench_policy.py --seq-len 32768 --repeats 5 [--device cuda] [--policy madakv] [--threads 1]

On a shared CPU, a busy core stalls torch's thread barrier: compare with --threads 1 if numbers jump.

``measure_policy_ms(seq_len, repeats)`` returns the median (ms) so another script can relate it to
vLLM's prefill time.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from madakv_vllm.config import IMAGE, TEXT, MadaKVConfig  # noqa: E402
from madakv_vllm.policies import make_policy  # noqa: E402

NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM = 28, 12, 2, 128  # Qwen2-VL-2B


def _inputs(seq_len: int, window: int, device, dtype, distinct_layers: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    wq = min(window, seq_len)
    qs = [torch.randn(NUM_Q_HEADS, wq, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(distinct_layers)]
    ks = [torch.randn(NUM_KV_HEADS, seq_len, HEAD_DIM, generator=gen).to(device, dtype) for _ in range(distinct_layers)]
    block = max(1, seq_len // 16)  # 8 text blocks and 8 image blocks
    modality = torch.where((torch.arange(seq_len) // block) % 2 == 0, TEXT, IMAGE)
    return qs, ks, modality


def measure_policy_ms(
    seq_len: int = 32768,
    repeats: int = 5,
    policy: str = "madakv",
    budget: float | int = 0.2,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
    distinct_layers: int = 4,
) -> float:
    """Median wall time (ms) of begin + select_layer for all 28 layers on one prompt.

    Layer inputs cycle over ``distinct_layers`` random tensors (keeps memory small; cost is the same).
    One untimed warm-up run first.
    """
    cfg = MadaKVConfig(policy=policy, budget=budget)
    pol = make_policy(cfg)
    qs, ks, modality = _inputs(seq_len, cfg.window, device, dtype, distinct_layers)
    b = cfg.budget_tokens(seq_len)
    sync = torch.cuda.synchronize if str(device).startswith("cuda") else (lambda: None)

    def once() -> float:
        sync()
        t0 = time.perf_counter()
        state = pol.begin(
            num_layers=NUM_LAYERS, num_kv_heads=NUM_KV_HEADS, seq_len=seq_len, modality=modality, budget=b
        )
        for layer in range(NUM_LAYERS):
            i = layer % distinct_layers
            pol.select_layer(state, layer=layer, query=qs[i], key=ks[i])
        sync()
        elapsed = (time.perf_counter() - t0) * 1e3
        assert int(state.kept_counts.sum()) == state.total_budget
        return elapsed

    once()
    return statistics.median(once() for _ in range(repeats))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--policy", default="madakv")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    ms = measure_policy_ms(
        args.seq_len, args.repeats, args.policy, args.budget, args.device, getattr(torch, args.dtype)
    )
    print(
        f"policy={args.policy} seq_len={args.seq_len} layers={NUM_LAYERS} q_heads={NUM_Q_HEADS} "
        f"kv_heads={NUM_KV_HEADS} head_dim={HEAD_DIM} device={args.device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()} repeats={args.repeats}: median {ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
