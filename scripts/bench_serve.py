#!/usr/bin/env python3
"""End-to-end serving throughput under load: ``vllm bench serve`` against ``vllm serve`` on
127.0.0.1, stock vLLM (CPU_ATTN) vs ``--attention-backend madakv`` at several budgets, all with
the SAME fixed KV pool, one after the other in one run.

    python scripts/bench_serve.py [--layers 2] [--budgets full,0.5,0.2,0.1,0.05] [--num-prompts 24]
                                  [--concurrency 24] [--input-len 3584] [--images 8] [--output-len 128]
                                  [--stock-fit 4] [--out models/bench_serve.json]

Model: Qwen2-VL-2B's layer geometry with ``--layers`` layers and random weights (the model of
scripts/bench_decode.py), 224x224 images -> 64 placeholder tokens each. Load: vLLM's own client
(``vllm bench serve --backend openai-chat --dataset-name random-mm``): ``--num-prompts`` chat
requests of ``--input-len`` random text tokens plus ``--images`` random images, ``--output-len``
generated tokens with ``ignore_eos``, at most ``--concurrency`` in flight, all sent at t=0. The KV
pool (``--kv-cache-memory-bytes``) is sized so stock fits ``--stock-fit`` whole requests. While the
client runs, ``/metrics`` is polled for ``vllm:num_requests_running`` (max and time average).

Printed and saved per engine: request and output-token throughput, mean TTFT / TPOT, running
requests, and each throughput's ratio to stock. ``full`` runs madakv with nothing evicted (the
backend's own cost). Throughput only rises where more concurrent requests make a step cheaper per
token (weights read once per step for the whole batch); on a compute-bound CPU it may not.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # madakv_eval (the evaluation tools) is not installed: the checkout's
    sys.path.insert(0, str(ROOT))

from madakv_eval.serve import free_port, metrics, serve  # noqa: E402

BLOCK_SIZE = 32
IMAGE_SIDE = 224  # 224 / 28 = 8 -> 64 placeholder tokens per image


def build(layers: int) -> Path:
    from madakv_eval.tiny_models import build_model

    model = ROOT / "models" / f"bench-qwen2vl-2b-l{layers}"
    if not (model / "config.json").exists():  # same geometry as scripts/bench_decode.py
        build_model("qwen2vl", model, layers=layers, heads=12, kv_heads=2, head_dim=128, hidden=1536,
                    intermediate=8960, max_pos=40000, min_image_tokens=64, max_image_tokens=64)
    return model


def poll_running(port: int, stop: threading.Event, out: list) -> None:
    while not stop.is_set():
        try:
            out.append(metrics(port).get("vllm:num_requests_running", 0.0))
        except OSError:
            pass
        stop.wait(0.5)


def run_engine(name: str, model: Path, args, kv_bytes: int) -> dict:
    port = free_port()
    log = ROOT / "models" / f"bench_serve_{name}.log"
    common = ["--max-model-len", str(args.input_len + args.images * 64 + args.output_len + 256),
              "--block-size", str(BLOCK_SIZE), "--enforce-eager", "--kv-cache-memory-bytes", str(kv_bytes),
              "--max-num-seqs", str(args.concurrency), "--limit-mm-per-prompt", json.dumps({"image": args.images}),
              "--seed", "0"] + ([] if args.prefix_caching else ["--no-enable-prefix-caching"])
    if name != "stock":
        cfg = {"policy": "full"} if name == "full" else {"policy": args.policy, "budget": float(name)}
        common += ["--attention-backend", "madakv", "--additional-config", json.dumps({"madakv": cfg})]
    result_file = ROOT / "models" / f"bench_serve_{name}.json"
    result_file.unlink(missing_ok=True)
    client = [
        str(Path(sys.executable).with_name("vllm")), "bench", "serve", "--backend", "openai-chat",
        "--endpoint", "/v1/chat/completions", "--base-url", f"http://127.0.0.1:{port}", "--model", str(model),
        "--tokenizer", str(model), "--dataset-name", "random-mm", "--num-prompts", str(args.num_prompts),
        "--max-concurrency", str(args.concurrency), "--request-rate", "inf", "--random-input-len",
        str(args.input_len), "--random-output-len", str(args.output_len), "--random-range-ratio", "0",
        "--random-mm-base-items-per-request", str(args.images), "--random-mm-num-mm-items-range-ratio", "0",
        "--random-mm-limit-mm-per-prompt", json.dumps({"image": args.images, "video": 0}),
        "--random-mm-bucket-config", str({(IMAGE_SIDE, IMAGE_SIDE, 1): 1.0}), "--ignore-eos", "--seed", "0",
        "--save-result", "--result-dir", str(result_file.parent), "--result-filename", result_file.name,
    ]
    print(f"[{name}] vllm serve on 127.0.0.1:{port} (log {log.relative_to(ROOT)})", flush=True)
    with serve(model, port, *common, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, log=log, timeout=400):
        running: list = []
        stop = threading.Event()
        poller = threading.Thread(target=poll_running, args=(port, stop, running), daemon=True)
        poller.start()
        t0 = time.monotonic()
        # the client's own progress bar (stderr) goes to the console; its report (stdout) is kept
        proc = subprocess.run(client, stdout=subprocess.PIPE, text=True)
        wall = time.monotonic() - t0
        stop.set()
        poller.join()
    if proc.returncode != 0 or not result_file.exists():
        raise RuntimeError(f"vllm bench serve failed for {name}:\n{proc.stdout[-3000:]}")
    r = json.loads(result_file.read_text())
    busy = [x for x in running if x > 0]
    row = {
        "engine": name,
        "completed": r.get("completed"),
        "failed": r.get("failed", 0),
        "request_throughput": r.get("request_throughput"),
        "output_throughput": r.get("output_throughput"),
        "total_token_throughput": r.get("total_token_throughput"),
        "mean_ttft_ms": r.get("mean_ttft_ms"),
        "mean_tpot_ms": r.get("mean_tpot_ms"),
        "duration_s": r.get("duration"),
        "client_wall_s": round(wall, 1),
        "running_max": max(running, default=0.0),
        "running_avg": round(statistics.fmean(busy), 2) if busy else 0.0,
    }
    print(f"[{name}] " + json.dumps(row), flush=True)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--budgets", default="full,0.5,0.2,0.1,0.05")
    ap.add_argument("--policy", default="madakv")
    ap.add_argument("--num-prompts", type=int, default=24)
    ap.add_argument("--concurrency", type=int, default=24)
    ap.add_argument("--input-len", type=int, default=3584, help="random text tokens per request")
    ap.add_argument("--images", type=int, default=8, help="images per request (64 tokens each)")
    ap.add_argument("--output-len", type=int, default=128)
    ap.add_argument("--stock-fit", type=int, default=4, help="KV pool = this many whole stock requests")
    ap.add_argument("--prefix-caching", action="store_true", help="vLLM's prefix caching on (its default) in every engine")
    ap.add_argument("--out", default=str(ROOT / "models" / "bench_serve.json"))
    args = ap.parse_args(argv)

    model = build(args.layers)
    cfg = json.loads((model / "config.json").read_text())
    text = cfg.get("text_config", cfg)
    head_dim = text.get("head_dim") or text["hidden_size"] // text["num_attention_heads"]
    page_bytes = BLOCK_SIZE * text["num_key_value_heads"] * head_dim * 2 * 2 * text["num_hidden_layers"]  # K,V bf16
    # chat template + image markers add ~40 tokens per request on top of text and image tokens
    request_pages = -(-(args.input_len + args.images * 66 + 40 + args.output_len) // BLOCK_SIZE)
    kv_bytes = args.stock_fit * request_pages * page_bytes
    print(f"KV pool {kv_bytes} bytes = {kv_bytes // page_bytes} pages of {BLOCK_SIZE} tokens "
          f"(~{request_pages} pages per stock request)", flush=True)
    rows = []
    for name in ["stock"] + args.budgets.split(","):
        rows.append(run_engine(name, model, args, kv_bytes))
    stock = rows[0]
    for row in rows:
        for k in ("request_throughput", "output_throughput", "running_max", "running_avg"):
            row[k + "_ratio"] = round(row[k] / stock[k], 3) if stock[k] else None
    out = {"args": vars(args), "kv_bytes": kv_bytes, "page_bytes": page_bytes, "rows": rows,
           "cpus": os.cpu_count(), "machine": os.uname().machine}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))
    print("\n| engine | req/s | out tok/s | ratio | TTFT ms | TPOT ms | running max | running avg | ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['engine']} | {r['request_throughput']:.3f} | {r['output_throughput']:.1f} | "
              f"{r['output_throughput_ratio']} | {r['mean_ttft_ms']:.0f} | {r['mean_tpot_ms']:.1f} | "
              f"{r['running_max']:.0f} | {r['running_avg']} | {r['running_avg_ratio']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
