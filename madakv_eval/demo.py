"""End-to-end demo: a trained VLM answers a long multimodal question through ``vllm serve
--attention-backend madakv``, once with the full KV cache and once compressed.

    python -m madakv_vllm.demo [--budget 0.2] [--policy madakv] [--images 48] [--seed 7] [--port 0]

The model is the small Qwen2-VL-shaped proxy VLM trained in this repository (rebuilt from
``scripts/assets/proxy_vlm`` if ``models/proxy-vlm`` is missing); it finds a 6-word code hidden
among dozens of images and filler text (``madakv_eval.proxy_tasks``, text-needle task). The demo
starts ``vllm serve`` on 127.0.0.1, asks the same question twice through the ``openai`` client
(per-request ``vllm_xargs``: policy ``full``, then the chosen policy and budget), and prints a
table: both answers and the expected one; the KV pages the request held after its prompt was
compressed, read from vLLM's own ``vllm:kv_cache_usage_perc`` while it decodes; the prompt's text
and image tokens and how many each KV head kept (from the plugin's per-compression DEBUG line,
switched on for the ``vllm.madakv`` logger only); the wall time. vLLM's log goes to a file.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
import urllib.request
from pathlib import Path

from madakv_eval.serve import free_port, serve

ROOT = Path(__file__).resolve().parents[1]


PROXY_TASK = "text_needle"


def ensure_proxy_model(root: Path = ROOT / "models") -> Path:
    from madakv_eval import proxy_tasks as pt

    out = root / "proxy-vlm"
    if not (out / "model.safetensors").is_file() or not (out / pt.MODEL_INFO).is_file():
        pt.rebuild_proxy_model(out)
    return out


def png_data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def proxy_messages(sample) -> list[dict]:
    """The proxy prompt as OpenAI chat messages: the user turn interleaves text and images; the
    assistant turn is continued from ``Answer`` (vLLM's ``continue_final_message``), which is how
    the model was trained to answer."""
    from madakv_eval import proxy_tasks as pt

    content = []
    for part in sample.parts:
        if isinstance(part, pt.ImageSpec):
            content.append({"type": "image_url", "image_url": {"url": png_data_url(pt.render_image(part))}})
        elif part:
            content.append({"type": "text", "text": part})
    return [{"role": "user", "content": content}, {"role": "assistant", "content": pt.ANSWER_CUE}]


def logging_config(path: Path) -> Path:
    """vLLM at INFO, the plugin's logger at DEBUG (one line per prompt compression)."""
    cfg = {
        "version": 1, "disable_existing_loggers": False,
        "formatters": {"plain": {"format": "%(levelname)s %(asctime)s [%(filename)s:%(lineno)d] %(message)s"}},
        "handlers": {"out": {"class": "logging.StreamHandler", "formatter": "plain", "level": "DEBUG",
                             "stream": "ext://sys.stdout"}},
        "loggers": {"vllm": {"handlers": ["out"], "level": "INFO", "propagate": False},
                    "vllm.madakv": {"level": "DEBUG"}},
    }
    path.write_text(json.dumps(cfg))
    return path


def held_pages(port: int) -> int:
    """KV pages in use now, from vLLM's own gauges (usage x pool size, the null block excluded)."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    usage, blocks = None, None
    for line in text.splitlines():
        if line.startswith("vllm:kv_cache_usage_perc"):
            usage = float(line.rsplit(" ", 1)[1])
        elif line.startswith("vllm:cache_config_info"):
            for item in line[line.index("{") + 1 : line.index("}")].split(","):
                key, _, value = item.partition("=")
                if key == "num_gpu_blocks":
                    blocks = int(value.strip('"'))
    if usage is None or blocks is None:
        raise RuntimeError("vLLM's /metrics has no kv_cache_usage_perc or cache_config_info")
    return round(usage * (blocks - 1))


#: Tokens generated after the answer (``ignore_eos``), so the page reads happen while the request runs.
DECODE_EXTRA = 400


def ask(port: int, model: str, messages, xargs: dict, answer_tokens: int, extra_tokens: int = DECODE_EXTRA) -> dict:
    """Stream one answer; once the answer tokens are out (the prompt is compressed by then), read
    the KV pages the request holds while it keeps decoding (``ignore_eos``; the extra tokens keep
    it running for a second or two, so the reads happen while it is in flight)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
    t0 = time.time()
    stream = client.chat.completions.create(
        model=model, messages=messages, max_tokens=1 + answer_tokens + extra_tokens, temperature=0, stream=True,
        extra_body={"vllm_xargs": xargs, "continue_final_message": True, "add_generation_prompt": False,
                    "ignore_eos": True},
    )
    pieces, reads = [], []
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            pieces.append(chunk.choices[0].delta.content)
            if 1 + answer_tokens + 2 <= len(pieces) <= 1 + answer_tokens + 12:
                reads.append(held_pages(port))
    pages = max(reads) if reads else None  # the only running request: what it holds
    text = "".join(pieces)
    words = text.lstrip(": ").split()
    return {"answer": " ".join(words[:answer_tokens]), "pages": pages, "seconds": time.time() - t0}


def compression_lines(log: Path) -> list[dict]:
    """The plugin's DEBUG lines "madakv compressed request=... kept_per_head: text=N->k ... pages=a->b"."""
    out = []
    for line in log.read_text().splitlines():
        if "madakv compressed request=" not in line:
            continue
        fields = dict(item.split("=", 1) for item in line.split("madakv compressed ", 1)[1].split() if "=" in item)
        kept = {name: tuple(float(x) for x in fields[name].split("->"))
                for name in ("text", "image", "video", "audio") if name in fields}
        before, after = (int(x) for x in fields["pages"].split("->"))
        out.append({"policy": fields["policy"], "budget": fields["budget"], "tokens": int(fields["tokens"]),
                    "kept": kept, "pages": (before, after)})
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="madakv")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--images", type=int, default=48, help="images in the prompt (~20 tokens each with filler)")
    ap.add_argument("--seed", type=int, default=7, help="which prompt (proxy_tasks.make_sample seed)")
    ap.add_argument("--port", type=int, default=0)
    args = ap.parse_args(argv)
    from madakv_eval import proxy_tasks as pt

    t0 = time.time()
    model = ensure_proxy_model()
    sample = pt.make_sample(PROXY_TASK, args.seed, args.images)
    k = pt.CODE_LEN[PROXY_TASK]
    port = args.port or free_port()
    log = ROOT / "models" / "demo-serve.log"
    print(f"serving {model.name} (a small VLM trained here) with --attention-backend madakv on 127.0.0.1:{port}"
          f"\nvLLM log: {log}", flush=True)
    env = {"VLLM_LOGGING_CONFIG_PATH": str(logging_config(ROOT / "models" / "demo-logging.json"))}
    with serve(model, port, "--attention-backend", "madakv", "--max-model-len", "4096", "--block-size", "32",
               "--limit-mm-per-prompt", json.dumps({"image": args.images}), "--enforce-eager", env=env, log=log):
        t_ready = time.time()
        messages = proxy_messages(sample)
        full = ask(port, str(model), messages, {"madakv_policy": "full"}, k)
        ours = ask(port, str(model), messages, {"madakv_policy": args.policy, "madakv_budget": args.budget}, k)
    comp = compression_lines(log)
    if not comp:
        raise RuntimeError(f"no compression was logged (see {log})")
    c = comp[-1]
    expected = " ".join(sample.answer)
    label = f"{args.policy} @ {args.budget:g}"
    rows = [
        ("answer", full["answer"], ours["answer"]),
        ("correct", str(full["answer"] == expected), str(ours["answer"] == expected)),
        ("KV pages held (vLLM's usage)", str(full["pages"]), str(ours["pages"])),
    ]
    for name, (n_prompt, kept) in c["kept"].items():
        rows.append((f"{name} tokens kept per head", f"{n_prompt:.0f} of {n_prompt:.0f}",
                     f"{kept:.1f} of {n_prompt:.0f} ({kept / n_prompt:.0%})"))
    rows.append((f"request time ({1 + k + DECODE_EXTRA} tokens out)", f"{full['seconds']:.2f} s", f"{ours['seconds']:.2f} s"))
    print(f"\nprompt: {c['tokens']} tokens, {args.images} images, a 6-word code hidden at image "
          f"{sample.needle_slots[0] + 1}; expected answer: {expected}\n")
    width = max(len(r[0]) for r in rows) + 2
    print(f"{'':<{width}}{'full cache':<34}{label}")
    for name, a, b in rows:
        print(f"{name:<{width}}{a:<34}{b}")
    saved = 1 - ours["pages"] / full["pages"] if full["pages"] else float("nan")
    print(f"\nKV cache after compression: {ours['pages']} pages instead of {full['pages']} ({saved:.0%} freed, "
          f"back in vLLM's pool); plugin: pages {c['pages'][0]} -> {c['pages'][1]}")
    print(f"server start {t_ready - t0:.0f} s, total {time.time() - t0:.0f} s")
    return 0 if full["answer"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
