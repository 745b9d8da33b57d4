"""Soak `vllm serve --attention-backend madakv`: many random requests (images, lengths, policies,
budgets, streaming) from concurrent clients, some aborted mid-request, in a KV pool small enough
to preempt. Passes when no request fails, every page is back in the pool at the end and the
server's memory (RSS of all its processes) stays flat after warm-up.

    .venv/bin/python scripts/soak.py --requests 1000 --out docs/data/soak.json --plot docs/plots/soak_rss.png
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from madakv_eval.serve import free_port, image_data_url, metrics, serve  # noqa: E402
from madakv_vllm.config import POLICIES  # noqa: E402


def server_rss(pid: int) -> dict[str, int]:
    """Bytes resident per process of the server (API server, engine core, workers), by name."""
    root = psutil.Process(pid)
    out: dict[str, int] = {}
    for i, p in enumerate([root, *root.children(recursive=True)]):
        try:
            name = "api_server" if i == 0 else p.name()
            out[name] = out.get(name, 0) + p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return out


def random_request(rng: random.Random, model: str, stock: bool = False) -> tuple[dict, str]:
    """A valid chat request of a random shape, and what the client does: 'finish' or 'abort'."""
    content = [{"type": "image_url", "image_url": {"url": image_data_url(rng.randrange(40), rng.choice([32, 64, 128]))}}
               for _ in range(rng.randrange(4))]
    content.append({"type": "text", "text": " ".join(rng.choice(["red", "cat", "the", "image", "left"])
                                                     for _ in range(rng.randrange(1, 500)))})
    xargs = {"madakv_policy": rng.choice(POLICIES)}
    if rng.random() < 0.7:
        xargs["madakv_budget"] = rng.choice([0.05, 0.1, 0.2, 0.5, 1.0, 64, 200])
    body = {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": rng.randrange(1, 160),
            "temperature": rng.choice([0, 0.7]), "stream": rng.random() < 0.5, "vllm_xargs": xargs}
    if stock:
        del body["vllm_xargs"]
    return body, ("abort" if rng.random() < 0.15 else "finish")


async def one(client: httpx.AsyncClient, body: dict, action: str, rng: random.Random) -> str:
    """'ok', 'aborted' or 'error: ...'."""
    try:
        if body["stream"]:
            async with client.stream("POST", "/v1/chat/completions", json=body) as r:
                if r.status_code != 200:
                    return f"error: HTTP {r.status_code} {(await r.aread())[:200]!r}"
                stop_after = rng.randrange(1, 4) if action == "abort" else None
                n = 0
                async for line in r.aiter_lines():
                    if '"error"' in line:
                        return f"error: {line[:200]}"
                    n += line.startswith("data:")
                    if stop_after is not None and n >= stop_after:
                        return "aborted"  # leaving the block closes the connection mid-stream
            return "ok"
        request = client.post("/v1/chat/completions", json=body)
        if action == "abort":
            try:
                await asyncio.wait_for(request, timeout=rng.uniform(0.01, 0.3))
            except asyncio.TimeoutError:
                return "aborted"
            return "ok"
        r = await request
        return "ok" if r.status_code == 200 else f"error: HTTP {r.status_code} {r.text[:200]}"
    except (httpx.HTTPError, OSError) as e:
        return f"error: {type(e).__name__}: {e}"


async def drive(port: int, model: str, n: int, concurrency: int, seed: int, on_done, stock: bool) -> dict[str, int]:
    rng = random.Random(seed)
    outcomes: dict[str, int] = {}
    queue = [random_request(rng, model, stock) for _ in range(n)]
    done = 0

    async def worker(wid: int) -> None:
        nonlocal done
        wrng = random.Random(seed * 1000 + wid)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=300) as client:
            while queue:
                body, action = queue.pop()
                result = await one(client, body, action, wrng)
                key = result if not result.startswith("error") else "error"
                outcomes[key] = outcomes.get(key, 0) + 1
                if key == "error":
                    print(f"  {result}", flush=True)
                done += 1
                on_done(done)

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return outcomes


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", type=Path, help="a local VLM (default: a tiny Qwen2-VL built here)")
    ap.add_argument("--max-model-len", type=int, default=2048)
    ap.add_argument("--kv-cache-bytes", type=int, default=5 * 2**18,
                    help="small, so that requests preempt (the tiny model's KV is 512 bytes a token)")
    ap.add_argument("--warmup", type=int, default=100, help="requests before the RSS baseline")
    ap.add_argument("--max-rss-growth", type=float, default=0.10, help="allowed growth after warm-up (fraction)")
    ap.add_argument("--stock", action="store_true", help="the same load on stock vLLM (no madakv), for comparison")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--plot", type=Path)
    args = ap.parse_args(argv)

    work = Path(tempfile.mkdtemp(prefix="madakv-soak-"))
    model = args.model
    if model is None:
        from madakv_eval.tiny_models import build_model

        model = build_model("qwen2vl", work / "tiny-qwen2vl", seed=0)
    port = free_port()
    cfg = json.dumps({"madakv": {"policy": "madakv", "budget": 0.2, "recompress_interval": 16}})
    t0 = time.time()
    curve: list[tuple[int, float, dict]] = []  # (requests done, seconds, RSS bytes per process)
    plugin_args = [] if args.stock else ["--attention-backend", "madakv", "--additional-config", cfg]
    with serve(model, port, *plugin_args, "--max-model-len", str(args.max_model_len),
               "--block-size", "32", "--enforce-eager", "--max-num-seqs", "16", "--kv-cache-memory-bytes",
               str(args.kv_cache_bytes), "--limit-mm-per-prompt", json.dumps({"image": 3}),
               log=work / "serve.log") as proc:
        step = max(args.requests // 40, 1)
        curve.append((0, 0.0, server_rss(proc.pid)))

        def on_done(k: int) -> None:
            if k % step == 0 or k == args.requests:
                curve.append((k, time.time() - t0, server_rss(proc.pid)))
                rss = curve[-1][2]
                print(f"  {k:5d} requests  {curve[-1][1]:6.0f} s  RSS {sum(rss.values()) / 2**20:7.1f} MiB  "
                      + " ".join(f"{n}={b / 2**20:.0f}" for n, b in rss.items()), flush=True)

        outcomes = asyncio.run(drive(port, str(model), args.requests, args.concurrency, args.seed, on_done, args.stock))
        deadline = time.time() + 30
        while time.time() < deadline:
            m = metrics(port)
            if m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0:
                break
            time.sleep(0.5)
        m = metrics(port)
        preemptions = m.get("vllm:num_preemptions_total", 0.0)
        pages_freed = m.get("madakv:kv_pages_freed_total", 0.0)
        healthy = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200

    base = [sum(r.values()) for k, _, r in curve if k >= args.warmup]
    first, last = statistics.median(base[: max(len(base) // 4, 1)]), statistics.median(base[-max(len(base) // 4, 1):])
    growth = last / first - 1
    result = {
        "server": "stock vLLM" if args.stock else "madakv", "requests": args.requests, "concurrency": args.concurrency,
        "seed": args.seed, "outcomes": outcomes,
        "kv_cache_usage_perc_after": m["vllm:kv_cache_usage_perc"], "num_requests_running_after": m["vllm:num_requests_running"],
        "preemptions": preemptions, "madakv_pages_freed": pages_freed, "healthy_after": healthy,
        "rss_mib_first_quarter_after_warmup": round(first / 2**20, 1), "rss_mib_last_quarter": round(last / 2**20, 1),
        "rss_growth": round(growth, 4), "seconds": round(time.time() - t0, 1),
        "curve": [{"requests": k, "seconds": round(t, 1), "rss_mib": round(sum(r.values()) / 2**20, 1),
                   "rss_mib_by_process": {n: round(b / 2**20, 1) for n, b in r.items()}} for k, t, r in curve],
        "machine": f"{psutil.cpu_count()} CPUs, {psutil.virtual_memory().total / 2**30:.0f} GiB",
        "command": "python scripts/soak.py " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    ok = (outcomes.get("error", 0) == 0 and result["kv_cache_usage_perc_after"] == 0
          and result["num_requests_running_after"] == 0 and healthy and growth <= args.max_rss_growth
          and (args.stock or pages_freed > 0))
    result["passed"] = ok
    print(json.dumps({k: v for k, v in result.items() if k != "curve"}, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3))
        ax.plot([c["requests"] for c in result["curve"]], [c["rss_mib"] for c in result["curve"]], marker=".")
        ax.axvline(args.warmup, color="grey", ls=":", lw=1)
        ax.set_xlabel("requests completed or aborted")
        ax.set_ylabel("server RSS (MiB, all processes)")
        ax.set_title(f"soak: {args.requests} requests, {outcomes.get('error', 0)} errors, "
                     f"{outcomes.get('aborted', 0)} aborted", fontsize=9)
        ax.set_ylim(bottom=0)
        fig.tight_layout()
        args.plot.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(args.plot, dpi=120)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
