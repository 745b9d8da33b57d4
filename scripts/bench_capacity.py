#!/usr/bin/env python3
"""Capacity and per-request KV memory of ``--attention-backend madakv`` vs stock vLLM.

Part 1 (capacity, ``vllm serve``): the same tiny Qwen2-VL is served twice on 127.0.0.1, stock
first, then with MadaKV at ``--budget``, each with the SAME fixed KV pool (``--kv-cache-memory-bytes``,
sized so stock fits only ``--stock-fit`` long requests); with ``--prefill-eviction end chunked``, once
per mode (``chunked``: compressed after every prefill chunk too, so a request being prefilled holds
about its budget plus one chunk, not its whole prompt; target 0.95 / budget). ``--clients`` closed-loop OpenAI clients
each send long multimodal chat requests (``--images`` images of 256 placeholder tokens plus text,
``--prompt-tokens`` in all, unique per request so stock's prefix cache shares nothing) back to back,
with ``ignore_eos`` and ``max_tokens=--max-tokens``. vLLM's own ``/metrics`` is polled; the script
prints max and time-averaged ``vllm:num_requests_running`` and ``vllm:kv_cache_usage_perc`` (after
``--warmup`` seconds, over ``--duration`` seconds) for both engines and the ratio madakv / stock.

Part 2 (memory per request, offline, in-process): for budgets 0.5, 0.2, 0.1, 0.05 and a few
prompt lengths, the pages a request holds after compression (non-null blocks in the scheduler
manager's ``req_to_blocks``) right after compression vs what stock vLLM holds for the same request
at the same length, and whether ``held <= 1.15 * budget * stock + 1`` (one partly filled page, one KV
cache group); with page-aligned budgets (the default) and without (``page_aligned: false``), each
checked against madakv_vllm/accounting.py's prediction.

    python scripts/bench_capacity.py                 # both parts, ~6 min on 2 cores
    python scripts/bench_capacity.py --quick         # ~2.5 min
    python scripts/bench_capacity.py --memory-only   # Part 2 only
    python scripts/bench_capacity.py --capacity-only --stock-fit 10 --recompress-interval 0
    # stock, then madakv compressing at the prompt's end, then after every prefill chunk (chunks of 512)
    python scripts/bench_capacity.py --capacity-only --prefill-eviction end chunked --max-num-batched-tokens 512

Without re-compression (``recompress_interval`` 0; the default is 32) generated tokens are kept for every
(layer, KV head), so with long outputs a MadaKV request holds ~budget x prompt + its output; and a
request being prefilled holds its whole prompt until compression. Both bound the capacity ratio.

Results also go, as JSON, to ``--out`` (default models/bench_capacity.json). The model is built
once into models/bench-qwen2vl (tiny Qwen2-VL, 448x448 images -> 256 tokens each).

``--family NAME`` measures a tiny build of madakv_eval.zoo instead, e.g. a hybrid whose other KV cache
groups (sliding window, linear attention state) stay stock's while only its full-attention group(s)
evict. Its Part 2 counts EVERY group: the pages a request holds in each group times that group's page
bytes (page size x its layers), stock vs madakv at ``--budget``, at one prompt length or a few; its
Part 1 sizes the fixed pool from stock's measured pages per request (so Part 2's stock engine runs
first, in-process). ``gemma3`` is built at ``--layers`` text layers in Gemma 3's own pattern of
``--sliding-per-global`` sliding-window layers (window ``--sliding-window``) per global one (default
6 layers, 5:1, window 512: a 512-token window next to ~4000-token prompts weighs what Gemma 3's
1024-token window does next to ~8000 tokens). Results go to docs/data/bench_capacity_<family>.json.

    python scripts/bench_capacity.py --family gemma3 --quick                 # both parts
    python scripts/bench_capacity.py --family gemma3 --memory-only           # Part 2 at 2000, 4000, 8000 tokens
    python scripts/bench_capacity.py --family qwen3_5 --quick

``--kv-cache-dtype`` (vLLM's, default ``auto``: the model's dtype) goes to every engine; given several
(e.g. ``--kv-cache-dtype auto fp8``), both parts run once per KV cache dtype in that order, every
capacity engine in the SAME pool (sized, whatever the dtypes, for ``--stock-fit`` stock requests at the
model's dtype, ``kv_bytes_per_token``, so an fp8 stock fits twice as many), ratios to the first dtype's
stock and to the stock of the engine's own dtype; engines of a dtype other than ``auto`` are named ``<engine>-<dtype>``.
Part 2 then also gives bytes per request: pages held x page bytes (an fp8 page is half a bf16 page).
``--family`` takes one dtype (its pool is sized from that dtype's stock).

    python scripts/bench_capacity.py --quick --kv-cache-dtype auto fp8 --out docs/data/bench_capacity_fp8.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import itertools
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # madakv_eval (the evaluation tools) is not installed: the checkout's
    sys.path.insert(0, str(ROOT))

from madakv_vllm.accounting import cdiv, plan_compression  # noqa: E402
from madakv_vllm.config import MadaKVConfig  # noqa: E402
from madakv_eval.serve import free_port, metrics, serve  # noqa: E402
from madakv_eval.zoo import FAMILY_NAMES  # noqa: E402

MODEL_DIR = ROOT / "models" / "bench-qwen2vl"
GEOMETRY = {"max_image_tokens": 256}  # otherwise the tiny default: 2 layers, 4 q / 2 KV heads, head_dim 32, bf16
IMAGE_SIDE = 448  # 448 / 28 = 16 -> 16 x 16 = 256 placeholder tokens per image
IMAGE_TOKENS = 256
BLOCK_SIZE = 32
BUDGETS = (0.5, 0.2, 0.1, 0.05)
WORDS = "the cat sat on a mat while red birds sang over green hills and blue rivers ran to sea".split()
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"


# --- model and inputs ---------------------------------------------------------------


def ensure_model(path: Path = MODEL_DIR) -> Path:
    from madakv_eval.tiny_models import build_model, image_token_count, load_info

    info_file = path / "madakv_tiny_model.json"
    if info_file.exists():
        geo = load_info(path)["geometry"]
        if all(geo.get(k) == v for k, v in GEOMETRY.items()):
            return path
    build_model("qwen2vl", path, seed=0, **GEOMETRY)
    assert image_token_count("qwen2vl", IMAGE_SIDE, IMAGE_SIDE, **GEOMETRY) == IMAGE_TOKENS
    return path


def kv_bytes_per_token(model: Path) -> int:
    from madakv_eval.tiny_models import load_info

    g = load_info(model)["geometry"]
    elem = {"bfloat16": 2, "float16": 2, "float32": 4}[g["dtype"]]
    return g["layers"] * 2 * g["kv_heads"] * g["head_dim"] * elem


def make_image(seed: int, side: int = IMAGE_SIDE):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    a, b, c = (int(x) for x in rng.integers(1, 9, size=3))
    y, x = np.mgrid[0:side, 0:side]
    px = np.stack([(x * a + seed * 31) % 256, (y * b + seed * 17) % 256, ((x + y) * c + seed) % 256], -1)
    return Image.fromarray(px.astype(np.uint8))


def image_url(seed: int) -> str:
    buf = io.BytesIO()
    make_image(seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def words(n: int, seed: int) -> str:
    return " ".join(WORDS[(i * 7 + seed * 3 + i // 11) % len(WORDS)] for i in range(n))


class TextMaker:
    """Text of about n tokens for the bench model's tokenizer."""

    def __init__(self, model: Path):
        from transformers import AutoTokenizer

        self.tok = AutoTokenizer.from_pretrained(str(model))
        sample = words(4000, 0)
        self.per_word = len(self.tok(sample, add_special_tokens=False).input_ids) / 4000

    def text(self, n_tokens: int, seed: int) -> str:
        return words(max(1, int(n_tokens / self.per_word)), seed)


def chat_parts(tm: TextMaker, k: int, prompt_tokens: int, n_images: int, image_tokens: int = IMAGE_TOKENS) -> list:
    """[str | ('image', seed)]: a unique head, then text and images interleaved."""
    text_tokens = max(16, prompt_tokens - n_images * image_tokens - 40)
    chunk = text_tokens // (n_images + 1)
    parts: list = [f"request {k} {k * 7919 % 10007}: " + tm.text(chunk, k)]
    for j in range(n_images):
        parts.append(("image", k * 16 + j))
        parts.append(" " + tm.text(chunk, k + j + 1))
    parts.append(" Describe the images.")
    return parts


# --- Part 1: capacity through vllm serve -------------------------------------------------


def _time_avg(samples: list[tuple[float, float]], t_from: float, t_to: float) -> float:
    """Step-wise time average of (t, value) samples over [t_from, t_to]."""
    pts = [(t, v) for t, v in samples if t_from <= t <= t_to]
    if len(pts) < 2:
        return float("nan") if not pts else pts[0][1]
    area = sum(v * (pts[i + 1][0] - t) for i, (t, v) in enumerate(pts[:-1]))
    return area / (pts[-1][0] - pts[0][0])


async def _drive(port: int, model: str, args, tm: TextMaker, urls: list[str]) -> dict:
    from openai import AsyncOpenAI

    client = AsyncOpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0,
                         timeout=args.warmup + args.duration + 300)
    t0 = time.monotonic()
    deadline = t0 + args.warmup + args.duration
    counter = itertools.count()
    done, errors, samples = [], [], []

    def messages(k: int) -> list:
        content = []
        for p in chat_parts(tm, k, args.prompt_tokens, args.images, args.image_tokens):
            if isinstance(p, tuple):
                content.append({"type": "image_url", "image_url": {"url": urls[p[1] % len(urls)]}})
            else:
                content.append({"type": "text", "text": p})
        return [{"role": "user", "content": content}]

    async def worker() -> None:
        while time.monotonic() < deadline:
            k = next(counter)
            if k >= args.max_requests:
                return
            ts = time.monotonic() - t0
            try:
                r = await client.chat.completions.create(
                    model=model, messages=messages(k), max_tokens=args.max_tokens, temperature=0,
                    extra_body={"ignore_eos": True, "min_tokens": args.max_tokens},
                )
                done.append((ts, time.monotonic() - t0, r.usage.prompt_tokens, r.usage.completion_tokens))
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - recorded and reported
                errors.append(repr(e)[:300])
                await asyncio.sleep(0.5)

    async def poller() -> None:
        while True:
            try:
                m = await asyncio.to_thread(metrics, port)
                samples.append((time.monotonic() - t0, m))
            except OSError:
                pass
            await asyncio.sleep(args.poll)

    tasks = [asyncio.create_task(worker()) for _ in range(args.clients)]
    poll = asyncio.create_task(poller())
    await asyncio.wait(tasks, timeout=max(0.0, deadline - time.monotonic()))
    t_end = time.monotonic() - t0
    for t in tasks + [poll]:
        t.cancel()
    await asyncio.gather(*tasks, poll, return_exceptions=True)
    await client.close()

    def series(name: str) -> list[tuple[float, float]]:  # polls that missed the metric are left out
        return [(t, m[name]) for t, m in samples if name in m and m[name] == m[name]]

    w0, w1 = float(args.warmup), t_end
    running, usage, waiting = series("vllm:num_requests_running"), series("vllm:kv_cache_usage_perc"), series(
        "vllm:num_requests_waiting")
    in_win = [m for t, m in samples if w0 <= t <= w1]

    def delta(name: str) -> float:
        return in_win[-1].get(name, 0.0) - in_win[0].get(name, 0.0) if len(in_win) >= 2 else float("nan")

    win_span = (samples[-1][0] if samples else w1) - w0
    return {
        "window_s": [round(w0, 1), round(w1, 1)],
        "samples": len(samples),
        "running_max": max((v for t, v in running), default=float("nan")),
        "running_max_in_window": max((v for t, v in running if w0 <= t <= w1), default=float("nan")),
        "running_time_avg": _time_avg(running, w0, w1),
        "running_median": statistics.median([v for t, v in running if w0 <= t <= w1] or [float("nan")]),
        "kv_usage_max": max((v for t, v in usage), default=float("nan")),
        "kv_usage_time_avg": _time_avg(usage, w0, w1),
        "waiting_time_avg": _time_avg(waiting, w0, w1),
        "waiting_min_in_window": min((v for t, v in waiting if w0 <= t <= w1), default=float("nan")),
        "preemptions_in_window": delta("vllm:num_preemptions_total"),
        "generation_tok_per_s": delta("vllm:generation_tokens_total") / win_span if win_span > 0 else float("nan"),
        "completed": len(done),
        "completed_in_window": sum(1 for ts, te, _, _ in done if w0 <= te <= w1),
        "mean_prompt_tokens": statistics.mean([p for _, _, p, _ in done]) if done else float("nan"),
        "mean_completion_tokens": statistics.mean([c for _, _, _, c in done]) if done else float("nan"),
        "sent": min(next(counter), args.max_requests),
        "errors": len(errors),
        "first_errors": errors[:3],
        "timeline": [(round(t, 2), m.get("vllm:num_requests_running"), m.get("vllm:num_requests_waiting"),
                      round(m.get("vllm:kv_cache_usage_perc", float("nan")), 4)) for t, m in samples],
    }


def _parse_log(log: Path) -> dict:
    text = log.read_text(errors="replace")
    out = {}
    m = re.search(r"KV cache size: ([\d,]+) tokens", text)
    if m:
        out["kv_cache_tokens"] = int(m.group(1).replace(",", ""))
    out["madakv_in_log"] = "madakv:" in text
    return out


def dtype_name(engine: str, kv_cache_dtype: str) -> str:
    """``stock``, ``madakv``, ``madakv-chunked`` as they were; with another KV cache dtype, ``<engine>-<dtype>``."""
    return engine if kv_cache_dtype == "auto" else f"{engine}-{kv_cache_dtype}"


def run_capacity(name: str, model: Path, args, kv_bytes: int, tm: TextMaker, urls: list[str],
                 engine_flags: tuple[str, ...] = (), engine: str | None = None, kv_cache_dtype: str = "auto") -> dict:
    """``engine`` (``stock``, ``madakv``, ``madakv-chunked``; default ``name``) served with ``kv_cache_dtype``."""
    engine = engine or name
    port = free_port()
    log = ROOT / "models" / f"bench_capacity_{args.family + '_' if args.family else ''}{name}.log"
    common = ["--max-model-len", str(args.max_model_len), "--block-size", str(BLOCK_SIZE), "--enforce-eager",
              "--kv-cache-memory-bytes", str(kv_bytes), "--max-num-seqs", str(args.max_num_seqs),
              "--limit-mm-per-prompt", json.dumps({"image": args.images}), "--seed", "0", *engine_flags]
    if args.max_num_batched_tokens:  # the same chunks for every engine
        common += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if kv_cache_dtype != "auto":
        common += ["--kv-cache-dtype", kv_cache_dtype]
    extra = []
    if engine.startswith("madakv"):
        mode = "chunked" if engine.endswith("-chunked") else "end"
        cfg = {"madakv": {"policy": args.policy, "budget": args.budget,
                          "recompress_interval": args.recompress_interval, "prefill_eviction": mode}}
        extra = ["--attention-backend", "madakv", "--additional-config", json.dumps(cfg)]
    print(f"[{name}] starting vllm serve on 127.0.0.1:{port} (log {log.relative_to(ROOT)})", flush=True)
    t = time.monotonic()
    with serve(model, port, *common, *extra, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, log=log, timeout=400):
        started = time.monotonic() - t
        print(f"[{name}] ready after {started:.0f}s; {args.clients} clients for {args.warmup}+{args.duration}s",
              flush=True)
        res = asyncio.run(_drive(port, str(model), args, tm, urls))
    res.update(_parse_log(log), startup_s=round(started, 1), kv_cache_dtype=kv_cache_dtype)
    print(f"[{name}] running max {res['running_max']:.0f}, time-avg {res['running_time_avg']:.2f}; "
          f"kv usage max {res['kv_usage_max']:.3f}, time-avg {res['kv_usage_time_avg']:.3f}; "
          f"waiting time-avg {res['waiting_time_avg']:.1f}; completed {res['completed']}; errors {res['errors']}",
          flush=True)
    return res


# --- Part 2: held pages per request, in-process ------------------------------------------------


def run_memory(model: Path, args, tm: TextMaker, kv_cache_dtype: str = "auto") -> list[dict]:
    import gc

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    from vllm import LLM, SamplingParams

    lengths = args.memory_lengths
    images_for = {n: max(1, min(args.images, n // 1024)) for n in lengths}

    def prompt(n: int, seed: int) -> dict:
        text, imgs = "", []
        for p in chat_parts(tm, 1000 + seed, n, images_for[n]):
            if isinstance(p, tuple):
                text += IMAGE_PLACEHOLDER
                imgs.append(make_image(p[1]))
            else:
                text += p
        text = "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
        return {"prompt": text, "multi_modal_data": {"image": imgs}}

    prompts = {n: prompt(n, i) for i, n in enumerate(lengths)}
    common = dict(model=str(model), enforce_eager=True, max_model_len=max(lengths) + 1024, block_size=BLOCK_SIZE,
                  seed=0, limit_mm_per_prompt={"image": args.images})
    if kv_cache_dtype != "auto":
        common["kv_cache_dtype"] = kv_cache_dtype

    def run(llm, reqs: dict) -> dict:
        """reqs: name -> (prompt, params). Returns name -> {prompt_tokens, trace: [(computed, held)]}."""
        core = llm.llm_engine.engine_core.engine_core
        mgr = core.scheduler.kv_cache_manager.coordinator.single_type_managers[0]
        for name, (p, sp) in reqs.items():
            llm.llm_engine.add_request(name, p, sp)
        info = {name: {"trace": []} for name in reqs}
        steps = 0
        while llm.llm_engine.has_unfinished_requests():
            llm.llm_engine.step()
            steps += 1
            for name in reqs:
                rids = [r for r in core.scheduler.requests if r.startswith(name + "-") or r == name]
                if not rids:
                    continue
                req = core.scheduler.requests[rids[0]]
                held = sum(not b.is_null for b in mgr.req_to_blocks.get(rids[0], []))
                info[name]["prompt_tokens"] = req.num_prompt_tokens
                info[name]["trace"].append((req.num_computed_tokens, held))
            assert steps < 100_000
        return info

    def params(**extra):
        return SamplingParams(max_tokens=args.memory_decode, temperature=0, ignore_eos=True, extra_args=extra or None)

    print(f"[memory] stock engine, prompt lengths {lengths}, kv cache dtype {kv_cache_dtype}", flush=True)
    stock = LLM(**common)
    s_page = kv_groups(stock)["groups"][0]["bytes_per_page"]  # one page of every layer, as the engine allocates it
    s_info = run(stock, {f"s{n}": (prompts[n], params()) for n in lengths})
    del stock
    print("[memory] madakv engine", flush=True)
    ours = LLM(**common, attention_backend="madakv",
               additional_config={"madakv": {"policy": args.policy, "budget": 0.2}})
    m_page = kv_groups(ours)["groups"][0]["bytes_per_page"]
    m_info = run(ours, {f"m{n}_{b}_{a}": (prompts[n], params(madakv_budget=b, madakv_page_aligned=a))
                        for n in lengths for b in BUDGETS for a in (True, False)})
    del ours
    gc.collect()

    rows = []
    for n in lengths:
        s = s_info[f"s{n}"]
        s_at = dict(s["trace"])  # computed tokens -> held
        for b in BUDGETS:
            for aligned in (True, False):
                m = m_info[f"m{n}_{b}_{aligned}"]
                c = m["prompt_tokens"]
                peak = max(range(len(m["trace"])), key=lambda i: m["trace"][i][1])
                # first step after compression (the scheduler frees pages when it next schedules)
                computed, held = next(((t, h) for t, h in m["trace"][peak:] if h < m["trace"][peak][1]), m["trace"][-1])
                last_computed, last_held = m["trace"][-1]
                stock_held = s_at.get(computed, cdiv(computed, BLOCK_SIZE))
                bound = 1.15 * b * stock_held + 1
                plan = plan_compression(MadaKVConfig(policy=args.policy, budget=b, page_aligned=aligned), c, BLOCK_SIZE)
                rows.append({
                    "prompt_tokens": c, "images": images_for[n], "budget": b, "page_aligned": aligned,
                    "retained_per_head": plan.budget, "keep_pages": plan.keep_pages,
                    "computed_tokens": computed, "stock_blocks": stock_held,
                    "stock_blocks_max": max(h for _, h in s["trace"]), "madakv_blocks": held,
                    "madakv_blocks_max": m["trace"][peak][1],
                    "ratio_to_budget_x_stock": held / (b * stock_held),
                    "bound_1_15_budget_stock_plus_1": bound, "ok": held <= bound,
                    "expected_by_accounting": plan.keep_pages + cdiv(computed, BLOCK_SIZE) - c // BLOCK_SIZE,
                    "last_computed_tokens": last_computed, "last_madakv_blocks": last_held,
                    "last_expected_by_accounting": plan.keep_pages + cdiv(last_computed, BLOCK_SIZE) - c // BLOCK_SIZE,
                    "kv_cache_dtype": kv_cache_dtype, "page_bytes": {"stock": s_page, "madakv": m_page},
                    "stock_bytes": stock_held * s_page, "madakv_bytes": held * m_page,
                })
    return rows


def memory_table(rows: list[dict]) -> str:
    lines = ["| prompt tokens | budget | page-aligned | kept / head | stock blocks | madakv blocks | predicted "
             "| held / (budget x stock) | bound 1.15 x budget x stock + 1 | ok |",
             "|---:|---:|:---:|---:|---:|---:|---:|---:|---:|:---:|"]
    for r in rows:
        lines.append(f"| {r['prompt_tokens']} | {r['budget']} | {'yes' if r['page_aligned'] else 'no'} | "
                     f"{r['retained_per_head']} | {r['stock_blocks']} | {r['madakv_blocks']} | "
                     f"{r['expected_by_accounting']} | {r['ratio_to_budget_x_stock']:.3f} | "
                     f"{r['bound_1_15_budget_stock_plus_1']:.2f} | {'yes' if r['ok'] else 'NO'} |")
    return "\n".join(lines)


def memory_bytes_table(rows: list[dict], budget: float) -> str:
    """Stock and madakv (page-aligned, ``budget``) bytes per request right after compression, every KV
    cache dtype; ratios to the first dtype's stock at the same prompt."""
    lines = ["| prompt tokens | engine | kv cache dtype | pages | page bytes | KV bytes per request | / stock (first dtype) |",
             "|---:|---|---|---:|---:|---:|---:|"]
    picked = [r for r in rows if r["page_aligned"] and r["budget"] == budget]
    ref = {}
    for r in picked:
        ref.setdefault(r["prompt_tokens"], r["stock_bytes"])
    for r in sorted(picked, key=lambda r: r["prompt_tokens"]):  # stable: dtypes in run order
        for w, pages, nbytes in (("stock", r["stock_blocks"], r["stock_bytes"]),
                                 (f"madakv {budget}", r["madakv_blocks"], r["madakv_bytes"])):
            page = r["page_bytes"]["stock" if w == "stock" else "madakv"]
            lines.append(f"| {r['prompt_tokens']} | {w} | {r['kv_cache_dtype']} | {pages} | {page} | {nbytes} | "
                         f"{nbytes / ref[r['prompt_tokens']]:.3f} |")
    return "\n".join(lines)


# --- zoo families (--family): every KV cache group's bytes per request ------------------------------

#: Geometry options of families whose build takes them, and their defaults.
FAMILY_GEOMETRY = {"gemma3": {"layers": 6, "sliding_per_global": 5, "sliding_window": 512}}


def family_build_kwargs(name: str, args) -> dict:
    """``build()`` keyword arguments of ``--family`` at the requested geometry (filled into ``args``)."""
    defaults = FAMILY_GEOMETRY.get(name, {})
    for key in ("layers", "sliding_per_global", "sliding_window"):
        if getattr(args, key) is not None and key not in defaults:
            raise SystemExit(f"--{key.replace('_', '-')} does not apply to --family {name}")
        if getattr(args, key) is None and key in defaults:
            setattr(args, key, defaults[key])
    if name != "gemma3":
        return {}
    period = args.sliding_per_global + 1  # Gemma 3: layer i is global when (i + 1) % period == 0
    types = tuple("full_attention" if (i + 1) % period == 0 else "sliding_attention" for i in range(args.layers))
    if "full_attention" not in types:
        raise SystemExit(f"--layers {args.layers} with {args.sliding_per_global} sliding per global: no global layer")
    return {"layer_types": types, "sliding_window": args.sliding_window}


def ensure_family_model(fam, build_kwargs: dict) -> Path:
    """models/bench-<family>, rebuilt when its build arguments differ from the last build's."""
    path = ROOT / "models" / f"bench-{fam.name}"
    marker = path / "bench_capacity_build.json"
    want = json.dumps({"seed": 0, **build_kwargs}, sort_keys=True)
    if marker.exists() and marker.read_text() == want:
        return path
    fam.module.build(path, seed=0, **build_kwargs)
    marker.write_text(want)
    return path


def family_image_tokens(fam, model: Path) -> int:
    """Placeholder tokens one ``make_image`` item takes, as the model's own HF processor expands it."""
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(model))
    p = fam.module.prompt(["a", ("image", 0), "b"])
    ids = proc(text=[p["prompt"]], images=p["multi_modal_data"]["image"])["input_ids"][0]
    embed = fam.module.embed_token_ids(proc.tokenizer)["image"]
    return sum(int(t) == embed for t in ids)


def family_image_url(seed: int) -> str:
    from madakv_eval.prompts import make_media

    buf = io.BytesIO()
    make_media("image", seed).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def family_engine_flags(fam) -> list[str]:
    flags = ["--dtype", fam.dtype]
    for k, v in fam.engine_kwargs.items():
        flags += [f"--{k.replace('_', '-')}", json.dumps(v) if isinstance(v, (dict, list)) else str(v)]
    return flags


def lscpu_model() -> str:
    import subprocess

    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    m = re.search(r"^Model name:\s*(.+)$", out, re.M)
    return m.group(1).strip() if m else "unknown"


def kv_groups(llm) -> dict:
    """The engine's KV cache groups as its scheduler holds them, and the shared pool's block cost.

    Every group allocates from one block pool, and the groups' tensors alias the same bytes: a block
    costs ``pool_bytes_per_block`` (the largest group's pages of one block, padding layers included)
    whichever group holds it, so a group's ``bytes_per_page`` (page size x its layers) is what its
    layers store and ``pool_bytes_per_block`` what the pool gives up."""
    import dataclasses

    from madakv_vllm.integration.kv_manager import MadaKVManager

    kcm = llm.llm_engine.engine_core.engine_core.scheduler.kv_cache_manager
    cfg = kcm.kv_cache_config
    groups = []
    for g, m in zip(cfg.kv_cache_groups, kcm.coordinator.single_type_managers):
        spec = g.kv_cache_spec
        groups.append({
            "spec": type(spec).__name__, "manager": type(m).__name__, "evicts": isinstance(m, MadaKVManager),
            "layers": len(g.layer_names), "layer_names": list(g.layer_names), "block_size": spec.block_size,
            "page_size_bytes": spec.page_size_bytes, "bytes_per_page": spec.page_size_bytes * len(g.layer_names),
            # a state page (Mamba) is padded to the attention page: what it would take unpadded
            "page_size_unpadded_bytes": (dataclasses.replace(spec, page_size_padded=None).page_size_bytes
                                         if getattr(spec, "page_size_padded", None) else spec.page_size_bytes),
            "sliding_window": getattr(spec, "sliding_window", None),
        })
    pool_bytes = cfg.kv_cache_tensors[0].size if cfg.kv_cache_tensors else 0
    return {"groups": groups, "num_blocks": cfg.num_blocks, "pool_bytes": pool_bytes,
            "pool_bytes_per_block": pool_bytes // cfg.num_blocks if cfg.num_blocks else 0}


def _point(trace: list[tuple[int, list[int]]], i: int, geo: dict) -> dict:
    computed, pages = trace[i]
    per_group = [n * g["bytes_per_page"] for n, g in zip(pages, geo["groups"])]
    return {"computed_tokens": computed, "pages": pages, "bytes": per_group, "total_bytes": sum(per_group),
            "pool_bytes": sum(pages) * geo["pool_bytes_per_block"],
            "token_layers": [n * g["block_size"] * g["layers"] for n, g in zip(pages, geo["groups"])]}


def run_memory_family(fam, model: Path, args, tm: TextMaker, stock_only: bool = False) -> dict:
    """Pages each request holds in every KV cache group, step by step, stock then madakv at ``--budget``."""
    import gc

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_KVCACHE_SPACE"] = "1"
    from vllm import LLM, SamplingParams

    lengths = sorted(set(args.memory_lengths) | {args.prompt_tokens})
    prompts = {n: fam.module.prompt(chat_parts(tm, 1000 + i, n, args.images, args.image_tokens))
               for i, n in enumerate(lengths)}
    common = dict(model=str(model), enforce_eager=True, max_model_len=max(max(lengths) + 1024, args.max_model_len),
                  block_size=BLOCK_SIZE, dtype=fam.dtype, seed=0, limit_mm_per_prompt={"image": args.images},
                  **fam.engine_kwargs)
    if args.kv_cache_dtype[0] != "auto":
        common["kv_cache_dtype"] = args.kv_cache_dtype[0]
    if args.max_num_batched_tokens:
        common["max_num_batched_tokens"] = args.max_num_batched_tokens
    sp = SamplingParams(max_tokens=args.memory_decode, temperature=0, ignore_eos=True)

    def run(llm) -> dict:
        """length -> {prompt_tokens, trace: [(computed tokens, [pages held in each group])]}."""
        core = llm.llm_engine.engine_core.engine_core
        managers = core.scheduler.kv_cache_manager.coordinator.single_type_managers
        got = {}
        for n in lengths:  # one at a time: a request's pages alone, not its neighbours' chunking
            name = f"len{n}"
            llm.llm_engine.add_request(name, prompts[n], sp)
            info = {"trace": []}
            steps = 0
            while llm.llm_engine.has_unfinished_requests():
                llm.llm_engine.step()
                steps += 1
                rid = next((r for r in core.scheduler.requests if r == name or r.startswith(name + "-")), None)
                if rid is not None:
                    req = core.scheduler.requests[rid]
                    info["prompt_tokens"] = req.num_prompt_tokens
                    info["trace"].append((req.num_computed_tokens,
                                          [sum(not b.is_null for b in m.req_to_blocks.get(rid, [])) for m in managers]))
                assert steps < 100_000
            got[n] = info
        return got

    out = {}
    engines = [("stock", {})]
    if not stock_only:
        engines.append(("madakv", dict(attention_backend="madakv", additional_config={
            "madakv": {"policy": args.policy, "budget": args.budget}})))
    for which, extra in engines:
        print(f"[memory] {which} engine ({fam.name}), prompt lengths {lengths}", flush=True)
        llm = LLM(**common, **extra)
        out[which] = {"geometry": kv_groups(llm), "requests": run(llm)}
        del llm
        gc.collect()
    return out


def family_memory_rows(mem: dict, budget: float) -> list[dict]:
    """Per prompt length: stock vs madakv bytes in every group after prefill (madakv: right after its
    compression, stock at the same length) and at the last step (both at the same length)."""
    geo_s, geo_m = mem["stock"]["geometry"], mem["madakv"]["geometry"]
    rows = []
    for n, s in mem["stock"]["requests"].items():
        m = mem["madakv"]["requests"][n]
        c = s["prompt_tokens"]
        evicting = [i for i, g in enumerate(geo_m["groups"]) if g["evicts"]]

        def full_pages(pages):
            return sum(pages[i] for i in evicting)

        s_at = {t: i for i, (t, _) in enumerate(s["trace"])}
        peak = max(range(len(m["trace"])), key=lambda i: full_pages(m["trace"][i][1]))
        after = next((i for i in range(peak, len(m["trace"]))
                      if full_pages(m["trace"][i][1]) < full_pages(m["trace"][peak][1])), len(m["trace"]) - 1)
        t_after = m["trace"][after][0]
        s_after = s_at.get(t_after, next(i for i, (t, _) in enumerate(s["trace"]) if t >= c))
        total_peak = {w: max(range(len(r["trace"])), key=lambda i: sum(
            k * g["bytes_per_page"] for k, g in zip(r["trace"][i][1], geo["groups"])))
            for w, r, geo in (("stock", s, geo_s), ("madakv", m, geo_m))}
        rows.append({
            "prompt_tokens": c, "budget": budget,
            "after_compression": {"stock": _point(s["trace"], s_after, geo_s),
                                  "madakv": _point(m["trace"], after, geo_m)},
            "last": {"stock": _point(s["trace"], len(s["trace"]) - 1, geo_s),
                     "madakv": _point(m["trace"], len(m["trace"]) - 1, geo_m)},
            "peak": {"stock": _point(s["trace"], total_peak["stock"], geo_s),
                     "madakv": _point(m["trace"], total_peak["madakv"], geo_m)},
        })
    return rows


def family_memory_table(rows: list[dict], geo: dict, point: str) -> str:
    kinds = [f"g{i} {g['spec'].removesuffix('Spec')}{'/madakv' if g['evicts'] else ''} x{g['layers']}"
             for i, g in enumerate(geo["groups"])]
    lines = ["| prompt tokens | engine | computed | " + " | ".join(kinds) + " | total KiB | total / stock |",
             "|---:|---|---:|" + "---:|" * len(kinds) + "---:|---:|"]
    for r in rows:
        s_total = r[point]["stock"]["total_bytes"]
        for w in ("stock", "madakv"):
            p = r[point][w]
            cells = " | ".join(f"{n} p = {b / 1024:.0f} KiB" for n, b in zip(p["pages"], p["bytes"]))
            lines.append(f"| {r['prompt_tokens']} | {w} | {p['computed_tokens']} | {cells} | "
                         f"{p['total_bytes'] / 1024:.0f} | {p['total_bytes'] / s_total:.3f} |")
    return "\n".join(lines)


def stock_request_blocks(mem: dict, prompt_len: int, request_tokens: int) -> int:
    """Pool blocks one stock request of ``request_tokens`` holds once past its prefill: each
    full-attention group ``cdiv(request_tokens, block)`` pages, every other group what stock held in
    the first step after the prompt in Part 2's run of a ``prompt_len`` prompt (a window's pages, a
    state's)."""
    geo = mem["stock"]["geometry"]
    r = mem["stock"]["requests"][prompt_len]
    steady = next((pages for t, pages in r["trace"] if t > r["prompt_tokens"]), r["trace"][-1][1])
    return sum(cdiv(request_tokens, g["block_size"]) if g["spec"] == "FullAttentionSpec" else n
               for n, g in zip(steady, geo["groups"]))


def print_capacity(cap: dict, ratios: dict, args, pool_desc: str) -> None:
    print()
    print(f"## Capacity (budget {args.budget}, policy {args.policy}, same KV pool {pool_desc}; "
          f"window {args.warmup:.0f}s..{args.warmup + args.duration:.0f}s)")
    print("| engine | prompt tok (mean) | running max | running time-avg | kv usage max | kv usage time-avg "
          "| waiting time-avg | preemptions | gen tok/s | completed |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in cap.items():
        print(f"| {name} | {r['mean_prompt_tokens']:.0f} | {r['running_max']:.0f} | {r['running_time_avg']:.2f} | "
              f"{r['kv_usage_max']:.3f} | {r['kv_usage_time_avg']:.3f} | {r['waiting_time_avg']:.1f} | "
              f"{r['preemptions_in_window']:.0f} | {r['generation_tok_per_s']:.0f} | {r['completed']} |")
    ref = dtype_name("stock", args.kv_cache_dtype[0])
    for name, (ratio_avg, ratio_max) in ratios.items():
        if cap[name].get("kv_cache_dtype", "auto") == args.kv_cache_dtype[0] and name.startswith("madakv"):
            target = 0.95 / args.budget if name.endswith("-chunked") else 4.0
            print(f"RATIO {name}/{ref} running: time-avg {ratio_avg:.2f}x, max {ratio_max:.2f}x (target >= {target:.2f}x)")
        else:  # another KV cache dtype than the pool was sized for, or its own stock
            print(f"RATIO {name}/{ref} running: time-avg {ratio_avg:.2f}x, max {ratio_max:.2f}x")
    print(flush=True)


def run_capacity_all(model: Path, args, kv_bytes: int, tm: TextMaker, urls: list[str],
                     engine_flags: tuple[str, ...] = ()) -> tuple[dict, dict]:
    """Every engine at every KV cache dtype, in one pool; ratios to the first dtype's stock."""
    cap = {}
    engines = ["stock"] + [("madakv" if mode == "end" else f"madakv-{mode}") for mode in args.prefill_eviction]
    for kv_dtype in args.kv_cache_dtype:
        for engine in engines:
            name = dtype_name(engine, kv_dtype)
            cap[name] = run_capacity(name, model, args, kv_bytes, tm, urls, engine_flags, engine, kv_dtype)
    ref = dtype_name("stock", args.kv_cache_dtype[0])
    s = cap[ref]
    ratios = {name: (cap[name]["running_time_avg"] / s["running_time_avg"], cap[name]["running_max"] / s["running_max"])
              for name in cap if name != ref}
    return cap, ratios


def same_dtype_ratios(cap: dict) -> dict:
    """Each madakv engine's running requests over those of the stock engine of its own KV cache dtype."""
    out = {}
    for name, r in cap.items():
        s = cap[dtype_name("stock", r["kv_cache_dtype"])]
        if r is not s:
            out[name] = {"running_time_avg": r["running_time_avg"] / s["running_time_avg"],
                         "running_max": r["running_max"] / s["running_max"]}
    return out


def main_family(args) -> int:
    from madakv_eval import zoo

    t_start = time.monotonic()
    fam = zoo.family(args.family)
    build_kwargs = family_build_kwargs(fam.name, args)
    model = ensure_family_model(fam, build_kwargs)
    tm = TextMaker(model)
    args.image_tokens = family_image_tokens(fam, model)
    cpu = lscpu_model()
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "family": fam.name, "architecture": fam.architecture, "dtype": fam.dtype,
              "build_kwargs": build_kwargs, "model": str(model.relative_to(ROOT)),
              "image_tokens_per_image": args.image_tokens, "cpu": cpu, "cpu_count": os.cpu_count()}
    print(f"{fam.name} ({fam.architecture}, {fam.dtype}) at {model.relative_to(ROOT)}: "
          f"{build_kwargs or 'zoo default'}; {args.image_tokens} tokens per image; CPU {cpu} x {os.cpu_count()}",
          flush=True)

    mem = run_memory_family(fam, model, args, tm, stock_only=args.capacity_only)  # at args.kv_cache_dtype[0]
    result["geometry"] = {w: mem[w]["geometry"] for w in mem}
    result["traces"] = {w: {str(n): r for n, r in mem[w]["requests"].items()} for w in mem}
    geo = mem["stock"]["geometry"]
    print("KV cache groups (stock): " + "; ".join(
        f"g{i} {g['spec']} x{g['layers']} layers, block {g['block_size']}, page {g['page_size_bytes']} B"
        + (f" (unpadded {g['page_size_unpadded_bytes']} B)" if g["page_size_unpadded_bytes"] != g["page_size_bytes"]
           else "") + (f", window {g['sliding_window']}" if g["sliding_window"] else "") for i, g in enumerate(geo["groups"]))
        + f"; pool block {geo['pool_bytes_per_block']} B", flush=True)
    if not args.capacity_only:
        rows = family_memory_rows(mem, args.budget)
        result["memory_groups"] = rows
        for point, what in (("after_compression", "right after madakv's compression (stock at the same length)"),
                            ("last", f"at the last step ({args.memory_decode} tokens decoded)"),
                            ("peak", "at each engine's own peak (a prefill step)")):
            print()
            print(f"## KV bytes per request in every group, {what}; budget {args.budget}")
            print(family_memory_table(rows, mem["madakv"]["geometry"], point))

    if not args.memory_only:
        request_tokens = args.prompt_tokens + args.max_tokens
        per_req = stock_request_blocks(mem, args.prompt_tokens, request_tokens)
        blocks = int(args.stock_fit * per_req)
        kv_bytes = blocks * geo["pool_bytes_per_block"]
        print(f"KV pool {kv_bytes} bytes = {blocks} blocks of {geo['pool_bytes_per_block']} B (stock fits "
              f"{args.stock_fit} requests of {args.prompt_tokens} + {args.max_tokens} tokens, {per_req} blocks each)",
              flush=True)
        urls = [family_image_url(s) for s in range(64)]
        cap, ratios = run_capacity_all(model, args, kv_bytes, tm, urls, tuple(family_engine_flags(fam)))
        result["capacity"] = {"kv_cache_memory_bytes": kv_bytes, "kv_pool_blocks": blocks,
                              "stock_request_blocks": per_req, **cap,
                              "ratios": {n: {"running_time_avg": a, "running_max": m} for n, (a, m) in ratios.items()}}
        print_capacity(cap, ratios, args, f"{kv_bytes} B = {blocks} blocks")

    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['elapsed_s']}s)")
    return 0


# --- main -------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="shorter windows and fewer prompt lengths (~3 min)")
    p.add_argument("--capacity-only", action="store_true")
    p.add_argument("--memory-only", action="store_true")
    p.add_argument("--budget", type=float, default=0.2, help="MadaKV budget of the capacity run")
    p.add_argument("--policy", default="madakv")
    p.add_argument("--recompress-interval", type=int, default=32,
                   help="server-wide recompress_interval (the config default, 32; 0: off)")
    p.add_argument("--family", default=None, choices=FAMILY_NAMES,
                   help="a tiny build of madakv_eval.zoo instead of the Qwen2-VL (every KV cache group counted)")
    p.add_argument("--layers", type=int, default=None, help="--family gemma3: text layers (default 6)")
    p.add_argument("--sliding-per-global", type=int, default=None,
                   help="--family gemma3: sliding-window layers per global one, Gemma 3's pattern (default 5)")
    p.add_argument("--sliding-window", type=int, default=None, help="--family gemma3: window, tokens (default 512)")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="target prompt length of a capacity request (default 3600; --family: 4000)")
    p.add_argument("--images", type=int, default=None,
                   help="images per capacity request (default 6 of 256 tokens; --family: 4 of the family's size)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--prefill-eviction", nargs="+", choices=["end", "chunked"], default=["end"],
                   help="madakv engines to run after stock, one per mode (e.g. end chunked)")
    p.add_argument("--max-num-batched-tokens", type=int, default=None,
                   help="vLLM's token budget per step, the longest prefill chunk (every engine; default vLLM's)")
    p.add_argument("--stock-fit", type=float, default=6.0,
                   help="KV pool = this many full stock requests (prompt + max_tokens)")
    p.add_argument("--clients", type=int, default=64, help="closed-loop concurrent clients")
    p.add_argument("--max-requests", type=int, default=2000, help="stop sending after this many requests")
    p.add_argument("--warmup", type=float, default=None, help="seconds before the measured window (default 25)")
    p.add_argument("--duration", type=float, default=None, help="measured window, seconds (default 90)")
    p.add_argument("--poll", type=float, default=0.5, help="/metrics polling interval, seconds")
    p.add_argument("--max-num-seqs", type=int, default=256)
    p.add_argument("--max-model-len", type=int, default=8192)
    p.add_argument("--memory-lengths", type=int, nargs="+", default=None,
                   help="Part 2 prompt lengths (default 1024 2048 4096 8192; quick: 2048 8192; "
                        "--family: 2000 8000 and --prompt-tokens; quick: --prompt-tokens)")
    p.add_argument("--memory-decode", type=int, default=8, help="Part 2: tokens generated after compression")
    p.add_argument("--kv-cache-dtype", nargs="+", default=["auto"],
                   help="vLLM's --kv-cache-dtype of every engine (auto: the model's dtype); several (e.g. auto fp8): "
                        "both parts once per dtype, every capacity engine in one pool, sized for stock at the model's dtype")
    p.add_argument("--out", type=Path, default=None,
                   help="default models/bench_capacity.json; --family: docs/data/bench_capacity_<family>.json")
    args = p.parse_args(argv)
    if len(set(args.kv_cache_dtype)) != len(args.kv_cache_dtype):
        p.error("--kv-cache-dtype: each dtype once")
    if args.family and len(args.kv_cache_dtype) > 1:
        p.error("--family takes one --kv-cache-dtype")
    if args.prompt_tokens is None:
        args.prompt_tokens = 4000 if args.family else 3600
    if args.images is None:
        args.images = 4 if args.family else 6
    if args.out is None:
        args.out = (ROOT / "docs" / "data" / f"bench_capacity_{args.family}.json" if args.family
                    else ROOT / "models" / "bench_capacity.json")
    if args.warmup is None:
        args.warmup = 12.0 if args.quick else 25.0
    if args.duration is None:
        args.duration = 25.0 if args.quick else 90.0
    if args.memory_lengths is None and args.family:
        args.memory_lengths = [] if args.quick else [2000, 8000]
    if args.memory_lengths is None:
        args.memory_lengths = [2048, 8192] if args.quick else [1024, 2048, 4096, 8192]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.family:
        return main_family(args)
    for key in ("layers", "sliding_per_global", "sliding_window"):
        if getattr(args, key) is not None:
            raise SystemExit(f"--{key.replace('_', '-')} needs --family")
    args.image_tokens = IMAGE_TOKENS
    t_start = time.monotonic()
    model = ensure_model()
    tm = TextMaker(model)
    per_tok = kv_bytes_per_token(model)
    request_tokens = args.prompt_tokens + args.max_tokens
    kv_tokens = cdiv(int(args.stock_fit * request_tokens), BLOCK_SIZE) * BLOCK_SIZE
    kv_bytes = kv_tokens * per_tok
    result = {"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
              "model": str(model.relative_to(ROOT)), "kv_bytes_per_token": per_tok}
    print(f"model {model.relative_to(ROOT)}: {per_tok} KV bytes/token; cpu count {os.cpu_count()}", flush=True)

    if not args.memory_only:
        print(f"KV pool {kv_bytes} bytes = {kv_tokens} tokens = {kv_tokens // BLOCK_SIZE} blocks of {BLOCK_SIZE} "
              f"(stock fits {args.stock_fit} requests of {args.prompt_tokens} + {args.max_tokens} tokens)", flush=True)
        urls = [image_url(s) for s in range(64)]
        cap, ratios = run_capacity_all(model, args, kv_bytes, tm, urls)
        result["capacity"] = {"kv_cache_memory_bytes": kv_bytes, "kv_pool_tokens": kv_tokens, **cap,
                              "ratios": {n: {"running_time_avg": a, "running_max": m} for n, (a, m) in ratios.items()}}
        if "madakv" in ratios:  # the keys earlier results have
            result["capacity"].update(ratio_running_time_avg=ratios["madakv"][0], ratio_running_max=ratios["madakv"][1])
        if len(args.kv_cache_dtype) > 1:
            result["capacity"]["ratios_to_own_dtype_stock"] = same_dtype_ratios(cap)
        print_capacity(cap, ratios, args, f"{kv_bytes} B = {kv_tokens // BLOCK_SIZE} blocks")
        if len(args.kv_cache_dtype) > 1:
            for name, r in result["capacity"]["ratios_to_own_dtype_stock"].items():
                print(f"RATIO {name}/{dtype_name('stock', cap[name]['kv_cache_dtype'])} running: "
                      f"time-avg {r['running_time_avg']:.2f}x, max {r['running_max']:.2f}x")

    if not args.capacity_only:
        rows = []
        for kv_dtype in args.kv_cache_dtype:
            dtype_rows = run_memory(model, args, tm, kv_dtype)
            rows += dtype_rows
            print()
            print(f"## Held KV blocks per request after compression (policy {args.policy}, block {BLOCK_SIZE}, "
                  f"{args.memory_decode} tokens decoded)" + ("" if kv_dtype == "auto" else f", kv cache dtype {kv_dtype}"))
            print(memory_table(dtype_rows))
        result["memory"] = rows
        print()
        print(f"## KV bytes per request right after compression (page-aligned, budget {args.budget})")
        print(memory_bytes_table(rows, args.budget))
        print(f"page-aligned rows all within 1.15 x budget x stock + 1: {all(r['ok'] for r in rows if r['page_aligned'])}; "
              f"unaligned: {sum(r['ok'] for r in rows if not r['page_aligned'])}/{sum(not r['page_aligned'] for r in rows)}")
        print("every count as accounting.py predicts (right after compression and at the last step): "
              f"{all(r['madakv_blocks'] == r['expected_by_accounting'] and r['last_madakv_blocks'] == r['last_expected_by_accounting'] for r in rows)}")

    result["elapsed_s"] = round(time.monotonic() - t_start, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out} ({result['elapsed_s']}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
