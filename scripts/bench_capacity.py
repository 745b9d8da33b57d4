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


def chat_parts(tm: TextMaker, k: int, prompt_tokens: int, n_images: int) -> list:
    """[str | ('image', seed)]: a unique head, then text and images interleaved."""
    text_tokens = max(16, prompt_tokens - n_images * IMAGE_TOKENS - 40)
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
        for p in chat_parts(tm, k, args.prompt_tokens, args.images):
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


def run_capacity(name: str, model: Path, args, kv_bytes: int, tm: TextMaker, urls: list[str]) -> dict:
    port = free_port()
    log = ROOT / "models" / f"bench_capacity_{name}.log"
    common = ["--max-model-len", str(args.max_model_len), "--block-size", str(BLOCK_SIZE), "--enforce-eager",
              "--kv-cache-memory-bytes", str(kv_bytes), "--max-num-seqs", str(args.max_num_seqs),
              "--limit-mm-per-prompt", json.dumps({"image": args.images}), "--seed", "0"]
    if args.max_num_batched_tokens:  # the same chunks for every engine
        common += ["--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    extra = []
    if name.startswith("madakv"):
        mode = "chunked" if name.endswith("-chunked") else "end"
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
    res.update(_parse_log(log), startup_s=round(started, 1))
    print(f"[{name}] running max {res['running_max']:.0f}, time-avg {res['running_time_avg']:.2f}; "
          f"kv usage max {res['kv_usage_max']:.3f}, time-avg {res['kv_usage_time_avg']:.3f}; "
          f"waiting time-avg {res['waiting_time_avg']:.1f}; completed {res['completed']}; errors {res['errors']}",
          flush=True)
    return res


# --- Part 2: held pages per request, in-process ------------------------------------------------


def run_memory(model: Path, args, tm: TextMaker) -> list[dict]:
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

    print(f"[memory] stock engine, prompt lengths {lengths}", flush=True)
    stock = LLM(**common)
    s_info = run(stock, {f"s{n}": (prompts[n], params()) for n in lengths})
    del stock
    print("[memory] madakv engine", flush=True)
    ours = LLM(**common, attention_backend="madakv",
               additional_config={"madakv": {"policy": args.policy, "budget": 0.2}})
    m_info = run(ours, {f"m{n}_{b}_{a}": (prompts[n], params(madakv_budget=b, madakv_page_aligned=a))
                        for n in lengths for b in BUDGETS for a in (True, False)})
    del ours

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
    p.add_argument("--prompt-tokens", type=int, default=3600, help="target prompt length of a capacity request")
    p.add_argument("--images", type=int, default=6, help="images per capacity request (256 tokens each)")
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
                   help="Part 2 prompt lengths (default 1024 2048 4096 8192; quick: 2048 8192)")
    p.add_argument("--memory-decode", type=int, default=8, help="Part 2: tokens generated after compression")
    p.add_argument("--out", type=Path, default=ROOT / "models" / "bench_capacity.json")
    args = p.parse_args(argv)
    if args.warmup is None:
        args.warmup = 12.0 if args.quick else 25.0
    if args.duration is None:
        args.duration = 25.0 if args.quick else 90.0
    if args.memory_lengths is None:
        args.memory_lengths = [2048, 8192] if args.quick else [1024, 2048, 4096, 8192]
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
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
        cap = {}
        names = ["stock"] + [("madakv" if mode == "end" else f"madakv-{mode}") for mode in args.prefill_eviction]
        for name in names:
            cap[name] = run_capacity(name, model, args, kv_bytes, tm, urls)
        s = cap["stock"]
        ratios = {name: (cap[name]["running_time_avg"] / s["running_time_avg"], cap[name]["running_max"] / s["running_max"])
                  for name in names[1:]}
        result["capacity"] = {"kv_cache_memory_bytes": kv_bytes, "kv_pool_tokens": kv_tokens, **cap,
                              "ratios": {n: {"running_time_avg": a, "running_max": m} for n, (a, m) in ratios.items()}}
        if "madakv" in ratios:  # the keys earlier results have
            result["capacity"].update(ratio_running_time_avg=ratios["madakv"][0], ratio_running_max=ratios["madakv"][1])
        print()
        print(f"## Capacity (budget {args.budget}, policy {args.policy}, same KV pool {kv_bytes} B = "
              f"{kv_tokens // BLOCK_SIZE} blocks; window {args.warmup:.0f}s..{args.warmup + args.duration:.0f}s)")
        print("| engine | prompt tok (mean) | running max | running time-avg | kv usage max | kv usage time-avg "
              "| waiting time-avg | preemptions | gen tok/s | completed |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for name, r in cap.items():
            print(f"| {name} | {r['mean_prompt_tokens']:.0f} | {r['running_max']:.0f} | {r['running_time_avg']:.2f} | "
                  f"{r['kv_usage_max']:.3f} | {r['kv_usage_time_avg']:.3f} | {r['waiting_time_avg']:.1f} | "
                  f"{r['preemptions_in_window']:.0f} | {r['generation_tok_per_s']:.0f} | {r['completed']} |")
        for name, (ratio_avg, ratio_max) in ratios.items():
            target = 0.95 / args.budget if name.endswith("-chunked") else 4.0
            print(f"RATIO {name}/stock running: time-avg {ratio_avg:.2f}x, max {ratio_max:.2f}x (target >= {target:.2f}x)")
        print(flush=True)

    if not args.capacity_only:
        rows = run_memory(model, args, tm)
        result["memory"] = rows
        print()
        print(f"## Held KV blocks per request after compression (policy {args.policy}, block {BLOCK_SIZE}, "
              f"{args.memory_decode} tokens decoded)")
        print(memory_table(rows))
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
