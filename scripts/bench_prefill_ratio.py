#!/usr/bin/env python3
"""Cost of MadaKV scoring + selection for one long prompt, as a ratio to vLLM's own prefill time.

Attention shape of Qwen2-VL-2B: 28 layers, 12 query heads, 2 KV heads, head_dim 128 (hidden 1536,
MLP 8960, bf16). The denominator is vLLM's real prefill of that shape on this machine: a text-only
Qwen2 with exactly that per-layer shape, run by vLLM (in-process, stock CPU_ATTN backend), timed as
``generate(max_tokens=1)`` wall time. The numerator is ``scripts/bench_policy.py``'s
``measure_policy_ms`` (all 28 layers), measured in the same run.

A full 28-layer 32K prefill takes ~10 min on a 2-core CPU, so by default the model has
``--layers 2`` and the prefill time is scaled by 28 / layers: every decoder layer has the same shape
and cost (embedding and the 1-token LM head are negligible at 32K; measured here, 4 layers take
1.95x the time of 2 at 8K), and the scaling is printed.
``--layers 28`` measures the full model (slow).

It also measures prefill end to end through ``--attention-backend madakv`` (budget 0.2: per-head
kernels, keeping window queries, reading keys, scoring, selection, compaction) vs stock for the same
prompt, interleaved, and prints that ratio and the time spent inside our eviction hooks.

On a shared 2-core machine a neighbour busy on one core stalls torch's 2-thread barriers: the policy
(many small ops) then slows ~8x, vLLM's prefill (large GEMMs) ~2x, so the ratio is pessimistic there.

    python scripts/bench_prefill_ratio.py                    # 32K, 2 layers, 3 repeats: ~8 min
    python scripts/bench_prefill_ratio.py --seq-len 4096     # ~1 min
    python scripts/bench_prefill_ratio.py --layers 28 --repeats 1   # the real depth (very slow)
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
if str(ROOT) not in sys.path:  # madakv_eval (the evaluation tools) is not installed: the checkout's
    sys.path.insert(0, str(ROOT))

SHAPE = dict(heads=12, kv_heads=2, head_dim=128, hidden=1536, intermediate=8960)  # Qwen2-VL-2B's LM
FULL_LAYERS = 28
BLOCK_SIZE = 32


def ensure_model(layers: int, max_pos: int) -> Path:
    from madakv_eval.tiny_models import build_model, load_info

    path = ROOT / "models" / f"bench-qwen2-2b-l{layers}"
    want = dict(SHAPE, layers=layers)
    if (path / "madakv_tiny_model.json").exists():
        g = load_info(path)["geometry"]
        if all(g.get(k) == v for k, v in want.items()) and g["max_pos"] >= max_pos:
            return path
    return build_model("qwen2", path, seed=0, max_pos=max_pos, **want)


class Hooks:
    """Wall time spent in our eviction hooks (in-process engine only)."""

    def __init__(self):
        from madakv_vllm.integration import cpu_backend, eviction

        self.t = {"build": 0.0, "select_layer": 0.0, "read_stock": 0.0, "compact": 0.0, "push_queries": 0.0}
        self.n = {k: 0 for k in self.t}
        self._undo = []
        for owner, name, key in [(cpu_backend.MadaKVCPUMetadataBuilder, "build", "build"),
                                 (eviction.WorkerKV, "select_layer", "select_layer"),
                                 (eviction.WorkerKV, "read_stock", "read_stock"),
                                 (eviction.WorkerKV, "compact", "compact"),
                                 (eviction.RequestKV, "push_queries", "push_queries")]:
            orig = getattr(owner, name)
            setattr(owner, name, self._wrap(orig, key))
            self._undo.append((owner, name, orig))

    def _wrap(self, fn, key):
        def timed(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.t[key] += time.perf_counter() - t0
                self.n[key] += 1

        return timed

    def reset(self):
        for k in self.t:
            self.t[k], self.n[k] = 0.0, 0

    def snapshot(self):
        return {k: {"ms": round(v * 1e3, 1), "calls": self.n[k]} for k, v in self.t.items()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seq-len", type=int, default=32768)
    p.add_argument("--layers", type=int, default=2, help="decoder layers of the vLLM model (28 = real depth)")
    p.add_argument("--repeats", type=int, default=3, help="prefills per engine (median)")
    p.add_argument("--policy-repeats", type=int, default=3, help="policy runs per repeat (median)")
    p.add_argument("--policy", default="madakv")
    p.add_argument("--budget", type=float, default=0.2)
    p.add_argument("--no-e2e", action="store_true", help="skip the madakv-backend prefill")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "bench_prefill_ratio.json")
    args = p.parse_args(argv)

    # In-process engines (one process: same threads for vLLM and the policy); explicit KV size.
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.pop("VLLM_CPU_KVCACHE_SPACE", None)  # would override kv_cache_memory_bytes
    import torch
    from bench_policy import HEAD_DIM, NUM_KV_HEADS, NUM_LAYERS, NUM_Q_HEADS, measure_policy_ms

    assert (NUM_LAYERS, NUM_Q_HEADS, NUM_KV_HEADS, HEAD_DIM) == (FULL_LAYERS, SHAPE["heads"], SHAPE["kv_heads"],
                                                                 SHAPE["head_dim"])
    t_start = time.monotonic()
    n = args.seq_len
    model = ensure_model(args.layers, max(n + 1024, 32768))
    threads0 = torch.get_num_threads()
    print(f"model {model.relative_to(ROOT)}: {args.layers} layers x (12 q / 2 kv heads, head_dim 128, hidden 1536, "
          f"MLP 8960), bf16; seq_len {n}; torch threads {threads0}; cpus {os.cpu_count()}", flush=True)

    from vllm import LLM, SamplingParams

    hooks = Hooks()
    per_token = args.layers * 2 * SHAPE["kv_heads"] * SHAPE["head_dim"] * 2
    kv_bytes = int((n + 4096) * per_token * 1.25)
    common = dict(model=str(model), max_model_len=n + 64, block_size=BLOCK_SIZE, seed=0, enforce_eager=True,
                  kv_cache_memory_bytes=kv_bytes)
    engines = {"stock": LLM(**common)}
    if not args.no_e2e:
        engines["madakv"] = LLM(**common, attention_backend="madakv",
                                additional_config={"madakv": {"policy": args.policy, "budget": args.budget}})
    mnbt = engines["stock"].llm_engine.vllm_config.scheduler_config.max_num_batched_tokens
    vocab = engines["stock"].get_tokenizer().vocab_size
    sp = SamplingParams(max_tokens=1, temperature=0)
    for llm in engines.values():  # warm-up (not timed)
        llm.generate([{"prompt_token_ids": [100 + i % 500 for i in range(512)]}], sp, use_tqdm=False)

    times = {k: [] for k in engines}
    times["policy"] = []
    hook_times = []
    for rep in range(args.repeats):
        rng = random.Random(rep)
        ids = [rng.randrange(16, vocab) for _ in range(n)]  # distinct per repeat: no prefix-cache hit
        order = list(engines) if rep % 2 == 0 else list(engines)[::-1]
        for name in order:
            hooks.reset()
            t0 = time.perf_counter()
            out = engines[name].generate([{"prompt_token_ids": ids}], sp, use_tqdm=False)
            dt = time.perf_counter() - t0
            assert len(out[0].prompt_token_ids) == n and len(out[0].outputs[0].token_ids) == 1
            times[name].append(dt * 1e3)
            msg = f"  rep {rep} {name:6s} prefill {dt * 1e3:9.0f} ms"
            if name == "madakv":
                snap = hooks.snapshot()
                hook_times.append(snap)
                assert snap["compact"]["calls"] == 1, snap  # the prompt was compressed once
                msg += "  (hooks: " + ", ".join(f"{k} {v['ms']:.0f} ms/{v['calls']}" for k, v in snap.items()) + ")"
            print(msg, flush=True)
        # Policy cost in the same repeat (same machine load), 28 layers, median of --policy-repeats.
        pol = measure_policy_ms(n, args.policy_repeats, args.policy, args.budget)
        times["policy"].append(pol)
        print(f"  rep {rep} policy (28 layers) {pol:9.0f} ms", flush=True)

    threads1 = torch.get_num_threads()
    scale = FULL_LAYERS / args.layers
    policy_ms = statistics.median(times["policy"])
    stock_ms = statistics.median(times["stock"])
    stock_full_ms = stock_ms * scale
    per_rep_ratio = [p / (s * scale) for p, s in zip(times["policy"], times["stock"])]
    ratio = statistics.median(per_rep_ratio)
    res = {
        "seq_len": n, "layers_measured": args.layers, "layer_scale": scale, "max_num_batched_tokens": mnbt,
        "torch_threads": [threads0, threads1], "policy": args.policy, "budget": args.budget,
        "policy_ms": times["policy"], "policy_ms_median": policy_ms,
        "stock_prefill_ms": times["stock"], "stock_prefill_ms_median": stock_ms,
        "stock_prefill_ms_28_layers": stock_full_ms, "policy_over_prefill_per_repeat": per_rep_ratio,
        "policy_over_prefill_median": ratio, "policy_over_prefill_of_medians": policy_ms / stock_full_ms,
    }
    print()
    print(f"## Prefill ratio, seq_len {n} (Qwen2-VL-2B attention shape; chunked prefill {mnbt} tokens/step)")
    print(f"policy scoring+selection, 28 layers (bench_policy.measure_policy_ms, median of {args.policy_repeats} "
          f"per repeat): median {policy_ms:.0f} ms of {[round(t) for t in times['policy']]}")
    print(f"vLLM stock prefill, {args.layers} layers: median {stock_ms:.0f} ms of "
          f"{[round(t) for t in times['stock']]}" + (f"; x {scale:g} -> 28 layers {stock_full_ms:.0f} ms"
                                                     if args.layers != FULL_LAYERS else ""))
    print(f"RATIO policy / vLLM prefill: median of per-repeat ratios {100 * ratio:.2f}% "
          f"({[round(100 * r, 2) for r in per_rep_ratio]}); ratio of medians {100 * policy_ms / stock_full_ms:.2f}% "
          f"(target < 5%)")
    if "madakv" in engines:
        mad_ms = statistics.median(times["madakv"])
        per_rep = [m / s for m, s in zip(times["madakv"], times["stock"])]
        hook_med = {k: statistics.median(h[k]["ms"] for h in hook_times) for k in hook_times[0]}
        res.update(madakv_prefill_ms=times["madakv"], madakv_prefill_ms_median=mad_ms,
                   e2e_ratio_of_medians=mad_ms / stock_ms, e2e_ratio_per_repeat=per_rep,
                   e2e_ratio_median=statistics.median(per_rep), hooks_ms_median=hook_med, hooks=hook_times)
        print(f"madakv backend prefill ({args.layers} layers, budget {args.budget}): median {mad_ms:.0f} ms of "
              f"{[round(t) for t in times['madakv']]}")
        print(f"RATIO madakv / stock prefill end to end: {mad_ms / stock_ms:.3f} (ratio of medians); per repeat "
              f"{[round(r, 3) for r in per_rep]}, median {statistics.median(per_rep):.3f}")
        in_policy = hook_med["select_layer"] + hook_med["compact"]
        print(f"inside madakv prefill: select_layer {hook_med['select_layer']:.0f} ms (of which read_stock "
              f"{hook_med['read_stock']:.0f} ms), "
              f"compact {hook_med['compact']:.0f} ms, metadata build {hook_med['build']:.0f} ms, push_queries "
              f"{hook_med['push_queries']:.0f} ms -> eviction {100 * in_policy / stock_ms:.2f}% of stock prefill "
              f"(same {args.layers} layers)")
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out} ({res['elapsed_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
