#!/usr/bin/env python3
"""Multi-turn chat and shared images through ``vllm serve``: what vLLM's prefix caching is worth,
with stock attention and with ``--attention-backend madakv`` (which keeps prefix caching on and
compresses every request for its own question).

    python scripts/bench_multiturn.py [--setups stock-pc,madakv-nopc,madakv-pc] [--budget 0.2]
                                      [--policy madakv] [--turns 4] [--conversations 10]
                                      [--questions 16] [--images 96] [--seed 0]
                                      [--model models/proxy-vlm] [--out-json models/bench_multiturn.json]

One ``vllm serve`` at a time on 127.0.0.1 (block size 32, eager), talked to with the ``openai``
client (streaming chat completions, greedy). Setups (``--setups``):

* ``stock-pc``     stock vLLM, prefix caching on (vLLM's default, passed explicitly);
* ``madakv-nopc``  ``--attention-backend madakv`` with ``--no-enable-prefix-caching``;
* ``madakv-pc``    ``--attention-backend madakv`` with ``--enable-prefix-caching``. The server's
  own answer is reported, not the flag: ``vllm:cache_config_info{enable_prefix_caching=...}``
  on /metrics, and whether ``vllm:prefix_cache_queries_total`` moved. Where the plugin turned
  caching off, the table says so.

madakv setups run ``--additional-config {"madakv": {"policy": --policy, "budget": --budget}}``.

Model: the accuracy proxy VLM (``models/proxy-vlm``, rebuilt from ``scripts/assets/proxy_vlm`` if
missing, as the demo does; 84x84 images -> 9 image tokens + 2 markers each, ~20 tokens per
image with its filler sentence; 4 layers of hidden 256, so its prefill is cheap). ``--model``
takes any local Qwen2-VL-style chat model instead, or ``qwen2vl-2b-l<N>``: the random-weight model
of scripts/bench_serve.py (N layers of Qwen2-VL-2B's geometry, built into models/ if missing;
images resized to 64 tokens each, so use fewer ``--images``), where prefill dominates TTFT.
Prompts are proxy text-needle prompts (``madakv_eval.proxy_tasks.make_sample``): ``--images``
images interleaved with filler text, ending with a question; every turn continues the assistant
message from ``Answer`` (``continue_final_message``), the format the proxy answers in.

Workload A, multi-turn (sequential: one request in flight): ``--conversations`` conversations of
``--turns`` turns, each over its own images. Turn k's prompt is turn k-1's prompt, the model's
answer to it and a new question, so every turn after the first repeats the whole previous prompt.
Workload B, shared images (concurrent: all ``--questions`` requests sent at once): independent
questions over one image set (the same prefix, a different question at the end); throughput is
requests/s and prompt tokens/s over the wall time of the batch.

Measured per request: TTFT (time from sending the request to the first streamed content token)
and /metrics deltas around it (after each request the script waits until
``vllm:request_success_total`` has counted it): ``vllm:prompt_tokens_total`` (prompt tokens),
``vllm:prompt_tokens_cached_total`` (served from the prefix cache; computed = prompt - cached),
``vllm:prefix_cache_queries_total`` / ``vllm:prefix_cache_hits_total`` (hit rate = hits /
queries, in tokens), ``madakv:kv_pages_freed_total``. KV pages held: the pages of the request's
prompt and answer, ceil((prompt + completion tokens) / block size), plus, with prefix caching,
the fresh pages madakv's compression packs into (the scheduler's own pure rule,
``madakv_vllm.accounting.RequestPlan.extra_pages``), minus the pages madakv's eviction returned
to the pool for it (``madakv:kv_pages_freed_total`` delta): what the request holds when it
finishes, shared prefix pages included. Workload A is reported per turn as medians
over conversations, with the ratio of each setup's median TTFT to stock-pc's for the same turn,
and for turns 2+ pooled. A warm-up request on other images runs first on every server.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # madakv_eval (the evaluation tools) is not installed: the checkout's
    sys.path.insert(0, str(ROOT))

from madakv_eval.serve import free_port, serve  # noqa: E402

BLOCK_SIZE = 32
SETUPS = ("stock-pc", "madakv-nopc", "madakv-pc")
ANSWER_CUE = "Answer"  # madakv_eval.proxy_tasks.ANSWER_CUE: each assistant turn continues from it
#: follow-up questions of workload A (turn 2, 3, ...) and the questions of workload B, in turn
FOLLOW_UPS = (
    "What is the secret code?",
    "Some images have colour. What are their colours?",
    "Two images have colour. Name their colours, then compare them.",
    "Say the secret code once more, word by word.",
    "Which picture comes right after the secret code?",
    "How many pictures are grey?",
)
COUNTERS = {  # short name -> Prometheus sample name (summed over labels)
    "prompt": "vllm:prompt_tokens_total",
    "cached": "vllm:prompt_tokens_cached_total",
    "queries": "vllm:prefix_cache_queries_total",
    "hits": "vllm:prefix_cache_hits_total",
    "freed": "madakv:kv_pages_freed_total",
    "finished": "vllm:request_success_total",
}


# --------------------------------------------------------------------------- /metrics
def parse_metrics(text: str) -> dict[tuple[str, frozenset], float]:
    """Prometheus text -> {(sample name, labels): value}."""
    from prometheus_client.parser import text_string_to_metric_families

    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def read_metrics(port: int) -> dict[tuple[str, frozenset], float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        return parse_metrics(r.read().decode())


def total(samples: dict, name: str) -> float:
    """A sample name's value summed over its label sets (0 if absent)."""
    return sum(v for (n, _), v in samples.items() if n == name)


def counter_deltas(before: dict, after: dict) -> dict[str, float]:
    """The :data:`COUNTERS` deltas between two /metrics reads; a counter missing from both is
    None (e.g. madakv:* on stock vLLM)."""
    out = {}
    for short, name in COUNTERS.items():
        present = any(n == name for n, _ in before) or any(n == name for n, _ in after)
        out[short] = total(after, name) - total(before, name) if present else None
    return out


def cache_config(samples: dict) -> dict[str, str]:
    """The labels of ``vllm:cache_config_info`` (how the engine was actually configured)."""
    for (name, labels), _ in samples.items():
        if name == "vllm:cache_config_info":
            return dict(labels)
    return {}


def wait_finished(port: int, before: dict, n: int, timeout: float = 10.0) -> dict:
    """/metrics once ``vllm:request_success_total`` has counted ``n`` more finished requests."""
    deadline = time.monotonic() + timeout
    while True:
        after = read_metrics(port)
        if total(after, COUNTERS["finished"]) - total(before, COUNTERS["finished"]) >= n or time.monotonic() > deadline:
            return after
        time.sleep(0.02)


# --------------------------------------------------------------------------- prompts
def image_parts(sample, data_url=None) -> list[dict]:
    """A proxy sample's user content as OpenAI content parts: text and image_url data URLs."""
    from madakv_eval import proxy_tasks as pt

    if data_url is None:
        from madakv_eval.demo import png_data_url

        cache: dict = {}

        def data_url(spec):
            if spec not in cache:
                cache[spec] = png_data_url(pt.render_image(spec))
            return cache[spec]

    content = []
    for part in sample.parts:
        if isinstance(part, pt.ImageSpec):
            content.append({"type": "image_url", "image_url": {"url": data_url(part)}})
        elif part:
            content.append({"type": "text", "text": part})
    return content


class Conversation:
    """A multi-turn chat over one set of images. ``messages()`` is the next request: the first user
    message (images and text), then per earlier turn the assistant's answer and the next question,
    ending with the assistant message opened at :data:`ANSWER_CUE` (continued by the model). Each
    turn's prompt therefore starts with the whole previous prompt."""

    def __init__(self, first_content: list[dict], follow_ups):
        self.first = first_content
        self.follow_ups = list(follow_ups)
        self.answers: list[str] = []

    @property
    def turn(self) -> int:  # 1-based number of the next request
        return len(self.answers) + 1

    def messages(self) -> list[dict]:
        msgs = [{"role": "user", "content": self.first}]
        for i, answer in enumerate(self.answers):
            msgs.append({"role": "assistant", "content": ANSWER_CUE + answer})
            msgs.append({"role": "user", "content": self.follow_ups[i % len(self.follow_ups)]})
        msgs.append({"role": "assistant", "content": ANSWER_CUE})
        return msgs

    def add_answer(self, text: str) -> None:
        self.answers.append(text)


def shared_image_requests(content: list[dict], questions) -> list[list[dict]]:
    """Workload B: one message list per question, all with the same images and text up to the
    question, which replaces the last text part (the sample's own question)."""
    if not content or content[-1]["type"] != "text":
        raise ValueError("the content must end with its question (a text part)")
    return [[{"role": "user", "content": content[:-1] + [{"type": "text", "text": "\n" + q}]},
             {"role": "assistant", "content": ANSWER_CUE}] for q in questions]


def questions_for(n: int) -> list[str]:
    """``n`` distinct questions (FOLLOW_UPS, numbered past the first round)."""
    return [q if i < len(FOLLOW_UPS) else f"{q} (question {i + 1})"
            for i, q in ((i, FOLLOW_UPS[i % len(FOLLOW_UPS)]) for i in range(n))]


# --------------------------------------------------------------------------- requests
def stream_chat(client, model: str, messages: list[dict], max_tokens: int) -> dict:
    """One streaming greedy request: TTFT (first content token), total time, answer, usage."""
    t0 = time.perf_counter()
    ttft = None
    text = []
    usage = None
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True},
        extra_body={"continue_final_message": True, "add_generation_prompt": False},
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            if ttft is None:
                ttft = time.perf_counter() - t0
            text.append(chunk.choices[0].delta.content)
        if chunk.usage is not None:
            usage = chunk.usage
    e2e = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the server sent no usage (stream_options include_usage)")
    return {"ttft_s": ttft if ttft is not None else e2e, "e2e_s": e2e, "answer": "".join(text),
            "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}


def pages_held(prompt_tokens: int, completion_tokens: int, freed: float | None, block_size: int = BLOCK_SIZE,
               fresh: int = 0) -> int:
    return math.ceil((prompt_tokens + completion_tokens) / block_size) + fresh - int(freed or 0)


def fresh_pages(madakv: dict | None, prompt_tokens: int, block_size: int) -> int:
    """The fresh pages a madakv request's compression takes with prefix caching on: the same pure
    rule the server's scheduler applies (madakv_vllm.accounting). ``madakv``: the server's madakv
    config, or None (stock, or prefix caching off)."""
    if madakv is None:
        return 0
    from madakv_vllm.accounting import RequestPlan
    from madakv_vllm.config import MadaKVConfig

    plan = RequestPlan(cfg=MadaKVConfig(**madakv), num_prompt_tokens=prompt_tokens, prefix_caching=True)
    return plan.extra_pages(prompt_tokens, block_size)


def request_row(r: dict, d: dict, block_size: int = BLOCK_SIZE, fresh: int = 0) -> dict:
    """A request's result with its /metrics deltas (see the module docstring)."""
    cached = d["cached"] or 0.0
    return {**r, "metric_prompt_tokens": d["prompt"], "cached_tokens": cached,
            "computed_tokens": (d["prompt"] or 0.0) - cached, "prefix_queries": d["queries"],
            "prefix_hits": d["hits"], "pages_freed": d["freed"], "fresh_pages": fresh,
            "pages_held": pages_held(r["prompt_tokens"], r["completion_tokens"], d["freed"], block_size, fresh)}


def hit_rate(rows) -> float | None:
    q = sum(r["prefix_queries"] or 0 for r in rows)
    return (sum(r["prefix_hits"] or 0 for r in rows) / q) if q else None


def med(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


# --------------------------------------------------------------------------- one setup
def madakv_config(setup: str, args) -> dict | None:
    """The madakv server config of a setup (None: stock)."""
    return None if setup == "stock-pc" else {"policy": args.policy, "budget": args.budget}


def server_args(setup: str, args, max_len: int) -> list[str]:
    out = ["--max-model-len", str(max_len), "--block-size", str(BLOCK_SIZE), "--enforce-eager", "--seed", "0",
           "--limit-mm-per-prompt", json.dumps({"image": args.images})]
    if setup == "stock-pc":
        return out + ["--enable-prefix-caching"]
    madakv = ["--attention-backend", "madakv", "--additional-config", json.dumps({"madakv": madakv_config(setup, args)})]
    if setup == "madakv-nopc":
        return out + madakv + ["--no-enable-prefix-caching"]
    if setup == "madakv-pc":
        return out + madakv + ["--enable-prefix-caching"]
    raise ValueError(f"unknown setup {setup!r}; expected one of {SETUPS}")


def run_setup(setup: str, model: Path, args, contents: dict) -> dict:
    from openai import OpenAI

    port = free_port()
    log = Path(args.log_dir) / f"bench_multiturn_{setup}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    srv_args = server_args(setup, args, args.max_model_len)
    print(f"[{setup}] vllm serve on 127.0.0.1:{port} (log {log})", flush=True)
    t_start = time.monotonic()
    with serve(model, port, *srv_args, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, log=log, timeout=args.server_timeout):
        startup_s = time.monotonic() - t_start
        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0, timeout=600)
        name = str(model)
        cfg = cache_config(read_metrics(port))
        block_size = int(cfg.get("block_size") or BLOCK_SIZE)
        fresh_rule = madakv_config(setup, args) if cfg.get("enable_prefix_caching") == "True" else None

        def one(messages):
            before = read_metrics(port)
            r = stream_chat(client, name, messages, args.max_tokens)
            return request_row(r, counter_deltas(before, wait_finished(port, before, 1)), block_size,
                               fresh_pages(fresh_rule, r["prompt_tokens"], block_size))

        warm = Conversation(contents["warmup"], FOLLOW_UPS)  # first-request costs, on other images
        for _ in range(2):
            warm.add_answer(one(warm.messages())["answer"])

        turns: list[list[dict]] = []  # [conversation][turn]
        for c, content in enumerate(contents["conversations"]):
            conv = Conversation(content, FOLLOW_UPS)
            rows = []
            for t in range(args.turns):
                row = one(conv.messages())
                row["turn"] = t + 1
                conv.add_answer(row["answer"])
                rows.append(row)
            turns.append(rows)
            print(f"[{setup}] conversation {c + 1}: TTFT ms " + " ".join(f"{r['ttft_s'] * 1e3:.0f}" for r in rows)
                  + " | cached " + " ".join(f"{r['cached_tokens']:.0f}/{r['prompt_tokens']}" for r in rows), flush=True)

        b_msgs = shared_image_requests(contents["shared"], questions_for(args.questions))
        before = read_metrics(port)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(max_workers=len(b_msgs)) as pool:
            b_results = list(pool.map(lambda m: stream_chat(client, name, m, args.max_tokens), b_msgs))
        wall = time.perf_counter() - t0
        d = counter_deltas(before, wait_finished(port, before, len(b_msgs)))
        after = read_metrics(port)
        cfg = cache_config(after)

    a_rows = [r for conv in turns for r in conv]
    queried = sum(r["prefix_queries"] or 0 for r in a_rows) + (d["queries"] or 0)
    pc_label = cfg.get("enable_prefix_caching")
    requested = "--enable-prefix-caching" in srv_args
    pc_on = pc_label == "True" and queried > 0
    note = None
    if requested and not pc_on:
        note = (f"started with --enable-prefix-caching; the server ran with prefix caching OFF "
                f"(cache_config_info enable_prefix_caching={pc_label}, prefix-cache queries {queried:.0f})")
        print(f"[{setup}] NOTE: {note}", flush=True)
    per_turn = []
    for t in range(args.turns):
        rows = [conv[t] for conv in turns]
        per_turn.append({
            "turn": t + 1, "prompt_tokens": med(r["prompt_tokens"] for r in rows),
            "computed_tokens": med(r["computed_tokens"] for r in rows), "cached_tokens": med(r["cached_tokens"] for r in rows),
            "hit_rate": hit_rate(rows), "pages_held": med(r["pages_held"] for r in rows),
            "pages_freed": med(r["pages_freed"] for r in rows), "ttft_ms": med(r["ttft_s"] * 1e3 for r in rows),
            "e2e_ms": med(r["e2e_s"] * 1e3 for r in rows)})
    b_prompt = sum(r["prompt_tokens"] for r in b_results)
    shared = {
        "mode": "concurrent", "questions": len(b_results), "wall_s": wall,
        "requests_per_s": len(b_results) / wall, "prompt_tokens_per_s": b_prompt / wall,
        "output_tokens_per_s": sum(r["completion_tokens"] for r in b_results) / wall,
        "ttft_ms_median": med(r["ttft_s"] * 1e3 for r in b_results),
        "prompt_tokens": d["prompt"], "cached_tokens": d["cached"], "computed_tokens": (d["prompt"] or 0) - (d["cached"] or 0),
        "hit_rate": (d["hits"] / d["queries"]) if d["queries"] else None, "pages_freed": d["freed"],
        "pages_held_median": med(pages_held(r["prompt_tokens"], r["completion_tokens"], None, block_size,
                                            fresh_pages(fresh_rule, r["prompt_tokens"], block_size))
                                 for r in b_results) - (d["freed"] or 0) / len(b_results),
        "requests": b_results}
    return {"setup": setup, "server_args": srv_args, "startup_s": startup_s, "block_size": block_size,
            "prefix_caching_requested": requested, "cache_config_enable_prefix_caching": pc_label,
            "prefix_caching_effective": pc_on, "note": note,
            "kv_pool_pages": int(cfg["num_gpu_blocks"]) if cfg.get("num_gpu_blocks", "None") != "None" else None,
            "multiturn": {"per_turn": per_turn, "conversations": turns}, "shared_images": shared}


# --------------------------------------------------------------------------- report
def add_ratios(results: list[dict], turns: int) -> dict:
    """Per-turn median TTFT ratios vs stock-pc and the pooled turn-2+ ratio (median TTFT of every
    turn >= 2 of every conversation), when stock-pc ran."""
    stock = next((r for r in results if r["setup"] == "stock-pc"), None)

    def pooled(res):
        return med(row["ttft_s"] for conv in res["multiturn"]["conversations"] for row in conv if row["turn"] >= 2)

    summary = {}
    for res in results:
        pt = res["multiturn"]["per_turn"]
        res["multiturn"]["ttft_ms_turn2plus"] = pooled(res) * 1e3 if turns >= 2 else None
        for t, row in enumerate(pt):
            row["ttft_ratio_vs_stock_pc"] = (row["ttft_ms"] / stock["multiturn"]["per_turn"][t]["ttft_ms"]) if stock else None
        ratio = pooled(res) / pooled(stock) if (stock and turns >= 2) else None
        res["multiturn"]["ttft_ratio_turn2plus_vs_stock_pc"] = ratio
        b = res["shared_images"]
        b["requests_per_s_ratio_vs_stock_pc"] = b["requests_per_s"] / stock["shared_images"]["requests_per_s"] if stock else None
        summary[res["setup"]] = ratio
    return summary


def fmt(x, spec=".0f", none="-"):
    return none if x is None else format(x, spec)


def print_tables(results: list[dict], args) -> None:
    print(f"\nWorkload A: {args.conversations} conversations x {args.turns} turns, one request at a time; "
          f"medians over conversations; pages = ceil(tokens/{BLOCK_SIZE}) + madakv fresh pages - madakv pages freed")
    print("| setup | prefix caching | turn | prompt tok | computed | cached | hit rate | KV pages held | TTFT ms | vs stock-pc |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        pc = "on" if res["prefix_caching_effective"] else ("off (requested)" if res["prefix_caching_requested"] else "off")
        for row in res["multiturn"]["per_turn"]:
            print(f"| {res['setup']} | {pc} | {row['turn']} | {fmt(row['prompt_tokens'])} | {fmt(row['computed_tokens'])} | "
                  f"{fmt(row['cached_tokens'])} | {fmt(row['hit_rate'], '.0%')} | {fmt(row['pages_held'])} | "
                  f"{fmt(row['ttft_ms'])} | {fmt(row['ttft_ratio_vs_stock_pc'], '.2f')}x |")
    print("\n| setup | TTFT ms, turns 2+ (median) | vs stock-pc |")
    print("|---|---:|---:|")
    for res in results:
        m = res["multiturn"]
        print(f"| {res['setup']} | {fmt(m['ttft_ms_turn2plus'])} | {fmt(m['ttft_ratio_turn2plus_vs_stock_pc'], '.2f')}x |")
    print(f"\nWorkload B: {args.questions} questions over one image set, all sent at once (concurrent)")
    print("| setup | prefix caching | req/s | vs stock-pc | prompt tok/s | TTFT ms (median) | computed | cached | hit rate | KV pages held (median) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for res in results:
        b = res["shared_images"]
        pc = "on" if res["prefix_caching_effective"] else ("off (requested)" if res["prefix_caching_requested"] else "off")
        print(f"| {res['setup']} | {pc} | {b['requests_per_s']:.2f} | {fmt(b['requests_per_s_ratio_vs_stock_pc'], '.2f')}x | "
              f"{b['prompt_tokens_per_s']:.0f} | {fmt(b['ttft_ms_median'])} | {fmt(b['computed_tokens'])} | "
              f"{fmt(b['cached_tokens'])} | {fmt(b['hit_rate'], '.0%')} | {fmt(b['pages_held_median'])} |")
    for res in results:
        if res["note"]:
            print(f"\n{res['setup']}: {res['note']}")


def build_contents(args) -> dict:
    from madakv_eval import proxy_tasks as pt

    def content(seed):
        return image_parts(pt.make_sample("text_needle", seed, args.images))

    base = 1_000_003 * (args.seed + 1)  # away from the proxy's train/eval seeds
    return {"warmup": content(base), "shared": content(base + 1),
            "conversations": [content(base + 2 + c) for c in range(args.conversations)]}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setups", default=",".join(SETUPS), help=f"comma-separated, from {', '.join(SETUPS)}")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--policy", default="madakv")
    ap.add_argument("--turns", type=int, default=4)
    ap.add_argument("--conversations", type=int, default=10)
    ap.add_argument("--questions", type=int, default=16, help="workload B: questions over one image set")
    ap.add_argument("--images", type=int, default=96, help="images per prompt (~20 tokens each with filler)")
    ap.add_argument("--max-tokens", type=int, default=8, help="answer tokens per turn at most")
    ap.add_argument("--max-model-len", type=int, default=8192)
    ap.add_argument("--seed", type=int, default=0, help="which prompts")
    ap.add_argument("--model", default=None, help="local model folder (default: the proxy VLM, models/proxy-vlm)")
    ap.add_argument("--server-timeout", type=float, default=400)
    ap.add_argument("--log-dir", default=str(ROOT / "models"))
    ap.add_argument("--out-json", default=str(ROOT / "models" / "bench_multiturn.json"))
    args = ap.parse_args(argv)
    setups = [s.strip() for s in args.setups.split(",") if s.strip()]
    for s in setups:
        if s not in SETUPS:
            ap.error(f"unknown setup {s!r}; expected some of {', '.join(SETUPS)}")
    if args.turns < 1 or args.conversations < 1 or args.questions < 1:
        ap.error("--turns, --conversations and --questions must be >= 1")
    if args.model and args.model.startswith("qwen2vl-2b-l"):  # scripts/bench_serve.py's model
        import importlib.util

        spec = importlib.util.spec_from_file_location("bench_serve", ROOT / "scripts" / "bench_serve.py")
        bench_serve = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(bench_serve)
        model = bench_serve.build(int(args.model.removeprefix("qwen2vl-2b-l")))
    elif args.model:
        model = Path(args.model).resolve()
    else:
        from madakv_eval.demo import ensure_proxy_model

        model = ensure_proxy_model()
    contents = build_contents(args)
    t0 = time.time()
    results = [run_setup(s, model, args, contents) for s in setups]
    summary = add_ratios(results, args.turns)
    print_tables(results, args)
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), None) \
        if os.path.exists("/proc/cpuinfo") else None
    out = {"args": vars(args), "model": str(model), "cpu_model": cpu, "cpus": os.cpu_count(),
           "ttft_ratio_turn2plus_vs_stock_pc": summary, "wall_s": time.time() - t0, "results": results}
    Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out_json).write_text(json.dumps(out, indent=1))
    print(f"\nwritten {args.out_json} ({time.time() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
