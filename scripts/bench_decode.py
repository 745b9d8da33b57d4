"""Decode latency, prefill overhead and KV bytes per request: stock vLLM (CPU_ATTN) vs madakv.

    python scripts/bench_decode.py [--layers 4] [--lengths 4096,16384] [--budgets full,0.5,0.2,0.1,0.05]
                                   [--images 8] [--decode 48] [--repeats 3] [--prefix-caching]
                                   [--kv-cache-dtype auto,fp8] [--out models/bench_decode.json]
    # docs/results.md: --layers 2 --lengths 4096,16384,32768 --images 16 --decode 48 --repeats 2

Model: Qwen2-VL-2B's attention geometry (12 query heads, 2 KV heads, head dim 128, hidden 1536,
MLP 8960) with few layers and random weights (madakv_eval.tiny_models), bf16 as vLLM runs it on
CPU. Both engines live in one process and are measured interleaved, one request at a time (each
repeat: stock, then madakv at every budget); for each prompt length and budget: prefill time (wall
time of the steps until the first token), decode ms/token (median step time after the prompt's
compression), and the KV bytes the request holds (its non-null blocks x page bytes). Beside each decode ratio: the physical bound
(weight bytes + KV bytes) / (weight bytes + budget x KV bytes) that a memory-bound decoder reaches.

``--kv-cache-dtype`` (vLLM's; default ``auto``, the model's bf16) goes to both engines; several,
comma-separated (``auto,fp8``), give a stock and a madakv engine per dtype, all in one process and
interleaved within each repeat (stock then every budget, dtype after dtype). Each dtype's rows compare
madakv with the stock of that dtype; a further table gives every engine's decode ms/token (and KV
bytes) over each dtype's stock, per repeat, then the median. Each engine allocates its own KV pool
(``VLLM_CPU_KVCACHE_SPACE``, default 4 GiB here): with several dtypes set it lower, e.g. 1.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "4")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def prompt_of(n_tokens: int, tok, images: int):
    from madakv_eval.prompts import mm_prompt, words

    per_image = 64
    text_tokens = max(16, n_tokens - images * per_image)
    body = words(text_tokens)
    ids = tok(body).input_ids[:text_tokens]
    body = tok.decode(ids)
    parts = []
    chunk = len(body) // (images + 1)
    for i in range(images):
        parts += [body[i * chunk : (i + 1) * chunk], i]
    parts.append(body[images * chunk :])
    return mm_prompt("qwen2vl", parts)


def text_weight_bytes(model: Path) -> int:
    """Bytes of the language model's weights in the checkpoint: what one decode step reads
    (the vision tower runs only at prefill). Taken from the file, since vLLM's CPU path may
    repack linear weights into buffers that are not module parameters."""
    from safetensors import safe_open

    total = 0
    with safe_open(str(model / "model.safetensors"), "pt") as f:
        for k in f.keys():
            if "visual" not in k:
                sl = f.get_slice(k)
                n = 1
                for d in sl.get_shape():
                    n *= d
                total += n * {"BF16": 2, "F16": 2, "F32": 4}[sl.get_dtype()]
    return total


def page_bytes_of(llm) -> int:
    """Bytes of one KV page over every layer, as the engine allocated it (an fp8 page: one byte per element)."""
    group = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager.kv_cache_config.kv_cache_groups[0]
    return group.kv_cache_spec.page_size_bytes * len(group.layer_names)


def run_one(llm, prompt, params):
    """Returns (prefill_s, decode step times, held blocks after compression, computed tokens)."""
    eng = llm.llm_engine
    core = eng.engine_core.engine_core
    mgr = core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
    eng.add_request("bench", prompt, params)
    t0 = time.perf_counter()
    first = None
    steps = []
    held = None
    while eng.has_unfinished_requests():
        ts = time.perf_counter()
        outs = eng.step()
        te = time.perf_counter()
        if first is None:
            for o in outs:
                if o.outputs and len(o.outputs[0].token_ids) >= 1:
                    first = te - t0
        else:
            steps.append(te - ts)
            if held is None:
                rid = next(iter(mgr.req_to_blocks), None)
                if rid is not None:
                    held = sum(not b.is_null for b in mgr.req_to_blocks[rid])
    return first, steps, held


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--lengths", default="4096,16384")
    ap.add_argument("--budgets", default="full,0.5,0.2,0.1,0.05")
    ap.add_argument("--images", type=int, default=8)
    ap.add_argument("--decode", type=int, default=48)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--policy", default="madakv")
    ap.add_argument("--prefix-caching", action="store_true",
                    help="both engines with vLLM's prefix caching on (its default), emptied before every run")
    ap.add_argument("--kv-cache-dtype", default="auto",
                    help="vLLM's --kv-cache-dtype of both engines; comma-separated for several (auto,fp8)")
    ap.add_argument("--out", default=str(ROOT / "models" / "bench_decode.json"))
    args = ap.parse_args(argv)
    kv_dtypes = args.kv_cache_dtype.split(",")
    if len(set(kv_dtypes)) != len(kv_dtypes):
        ap.error("--kv-cache-dtype: each dtype once")

    from tqdm import tqdm
    from vllm import LLM, SamplingParams

    from madakv_eval.tiny_models import build_model

    model = ROOT / "models" / f"bench-qwen2vl-2b-l{args.layers}"
    if not (model / "config.json").exists():
        build_model("qwen2vl", model, layers=args.layers, heads=12, kv_heads=2, head_dim=128, hidden=1536,
                    intermediate=8960, max_pos=40000, min_image_tokens=64, max_image_tokens=64)
    lengths = [int(x) for x in args.lengths.split(",")]
    common = dict(model=str(model), enforce_eager=True, max_model_len=max(lengths) + args.decode + 64,
                  block_size=32, seed=0, max_num_batched_tokens=4096, limit_mm_per_prompt={"image": args.images},
                  enable_prefix_caching=args.prefix_caching)  # on: emptied before every run (no hit)
    engines = {}  # kv cache dtype -> (stock, madakv)
    for kv_dtype in kv_dtypes:
        per_dtype = {} if kv_dtype == "auto" else {"kv_cache_dtype": kv_dtype}
        engines[kv_dtype] = (LLM(**common, **per_dtype),
                             LLM(**common, **per_dtype, attention_backend="madakv",
                                 additional_config={"madakv": {"policy": "full"}}))
    stock = engines[kv_dtypes[0]][0]
    tok = stock.get_tokenizer()
    weight_bytes = text_weight_bytes(model)
    page_bytes = {kv_dtype: page_bytes_of(s) for kv_dtype, (s, _) in engines.items()}

    warm = prompt_of(min(lengths), tok, args.images)
    for llm in (llm for pair in engines.values() for llm in pair):  # first runs pay one-off costs (allocation, JIT warm-up)
        run_one(llm, warm, SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    budgets = args.budgets.split(",")
    rows, engine_rows = [], []
    for n in lengths:
        prompt = prompt_of(n, tok, args.images)
        # Interleaved: each repeat runs stock once, then madakv at every budget (each KV cache dtype in
        # turn), so a slow spell on the shared machine hits every configuration of that repeat alike.
        configs = [(kv_dtype, name) for kv_dtype in kv_dtypes for name in ["stock"] + budgets]
        meas_all: dict[tuple[str, str], list] = {c: [] for c in configs}
        runs = [c for _ in range(args.repeats) for c in configs]
        for kv_dtype, name in tqdm(runs, desc=f"{n} tokens", unit="run"):
            llm = engines[kv_dtype][0 if name == "stock" else 1]
            extra = None
            if name not in ("stock", "full"):
                extra = {"madakv_policy": args.policy, "madakv_budget": float(name)}
            sp = SamplingParams(max_tokens=args.decode, temperature=0, ignore_eos=True, extra_args=extra)
            if args.prefix_caching:  # a repeated prompt must not hit the prefix cache
                assert llm.reset_prefix_cache()
            meas_all[kv_dtype, name].append(run_one(llm, prompt, sp))
        for kv_dtype in kv_dtypes:
            rows += dtype_rows(n, kv_dtype, {name: meas_all[kv_dtype, name] for name in ["stock"] + budgets},
                               budgets, page_bytes[kv_dtype], weight_bytes, len(kv_dtypes) > 1)
        if len(kv_dtypes) > 1:
            engine_rows += cross_rows(n, kv_dtypes, meas_all, configs, page_bytes)
    result = {"args": vars(args), "weight_bytes": weight_bytes,
              "page_bytes": page_bytes if len(kv_dtypes) > 1 else page_bytes[kv_dtypes[0]], "rows": rows,
              "machine": os.uname().machine, "cpus": os.cpu_count()}
    if engine_rows:
        result["engines"] = engine_rows
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    dtype_col = len(kv_dtypes) > 1
    print("\n| prompt |" + (" kv cache dtype |" if dtype_col else "") + " budget | prefill madakv/stock | "
          "decode ms/tok stock | madakv | speedup | bound | KV ratio |")
    print("|---|" + ("---|" if dtype_col else "") + "---|---|---|---|---|---|---|")
    for r in rows:
        d = r["decode_ms_per_token"]
        print(f"| {r['prompt_tokens']} |" + (f" {r['kv_cache_dtype']} |" if dtype_col else "") +
              f" {r['budget']} | {r['prefill_ratio']} | {d['stock']} | {d['madakv']} | "
              f"{r['decode_speedup']} | {r['physical_bound_speedup']} | {r['kv_ratio']} |")
    if engine_rows:
        refs = " | ".join(f"ms / stock {k}" for k in kv_dtypes)
        kv_refs = " | ".join(f"KV / stock {k}" for k in kv_dtypes)
        print(f"\n| prompt | engine | kv cache dtype | decode ms/tok | {refs} | KV bytes | {kv_refs} | prefill ms |")
        print("|---|---|---|---|" + "---|" * len(kv_dtypes) + "---|" + "---|" * len(kv_dtypes) + "---|")
        for r in engine_rows:
            print(f"| {r['prompt_tokens']} | {r['engine']} | {r['kv_cache_dtype']} | {r['decode_ms_per_token']} | "
                  + " | ".join(str(r["decode_ms_ratio_to_stock"][k]) for k in kv_dtypes)
                  + f" | {r['kv_bytes']} | " + " | ".join(str(r["kv_bytes_ratio_to_stock"][k]) for k in kv_dtypes)
                  + f" | {r['prefill_ms']} |")
    return 0


def dtype_rows(n: int, kv_dtype: str, meas: dict, budgets: list[str], page_bytes: int, weight_bytes: int,
               tag: bool) -> list[dict]:
    """madakv at every budget against stock, both with ``kv_dtype`` caches (``tag``: rows say which)."""
    rows = []
    pre = {k: [m[0] for m in v] for k, v in meas.items()}
    dec = {k: [statistics.median(m[1][2:]) for m in v] for k, v in meas.items()}
    held = {k: v[0][2] for k, v in meas.items()}
    kv_stock = held["stock"] * page_bytes
    for budget in budgets:
        frac = 1.0 if budget == "full" else float(budget)
        # ratios per repeat (stock and madakv of the same repeat), then the median over repeats
        pre_ratio = statistics.median(a / b for a, b in zip(pre[budget], pre["stock"]))
        speedup = statistics.median(b / a for a, b in zip(dec[budget], dec["stock"]))
        row = {
            "prompt_tokens": n, "budget": budget,
            "prefill_ms": {"stock": round(statistics.median(pre["stock"]) * 1e3, 1),
                           "madakv": round(statistics.median(pre[budget]) * 1e3, 1)},
            "prefill_ratio": round(pre_ratio, 3),
            "decode_ms_per_token": {"stock": round(statistics.median(dec["stock"]) * 1e3, 2),
                                    "madakv": round(statistics.median(dec[budget]) * 1e3, 2)},
            "decode_speedup": round(speedup, 3),
            "kv_bytes": {"stock": kv_stock, "madakv": held[budget] * page_bytes},
            "kv_ratio": round(held[budget] / held["stock"], 3),
            "physical_bound_speedup": round((weight_bytes + kv_stock) / (weight_bytes + frac * kv_stock), 3),
        }
        if tag:
            row["kv_cache_dtype"] = kv_dtype
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def cross_rows(n: int, kv_dtypes: list[str], meas: dict, configs: list[tuple[str, str]], page_bytes: dict) -> list[dict]:
    """Every engine (each dtype's stock and madakv budgets) against each dtype's stock: decode ms/token
    over the reference's in the same repeat, then the median over repeats; KV bytes held over the
    reference's."""
    dec = {c: [statistics.median(m[1][2:]) for m in v] for c, v in meas.items()}
    kv = {c: v[0][2] * page_bytes[c[0]] for c, v in meas.items()}
    out = []
    for c in configs:
        row = {"prompt_tokens": n, "kv_cache_dtype": c[0], "engine": "stock" if c[1] == "stock" else f"madakv {c[1]}",
               "decode_ms_per_token": round(statistics.median(dec[c]) * 1e3, 2),
               "decode_ms_per_repeat": [round(x * 1e3, 2) for x in dec[c]],
               "prefill_ms": round(statistics.median(m[0] for m in meas[c]) * 1e3, 1),
               "kv_bytes": kv[c],
               "decode_ms_ratio_to_stock": {k: round(statistics.median(a / b for a, b in zip(dec[c], dec[k, "stock"])), 3)
                                            for k in kv_dtypes},
               "kv_bytes_ratio_to_stock": {k: round(kv[c] / kv[k, "stock"], 3) for k in kv_dtypes}}
        out.append(row)
        print(json.dumps(row), flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
