"""End-to-end demo: a trained VLM answers a long multimodal question through ``vllm serve
--attention-backend madakv``, with the full KV cache and compressed at two budgets.

    .venv/bin/python -m madakv_eval.demo [--budgets 0.5 0.2] [--policy madakv] [--images 48] [--seed 3]

Run from the checkout (``madakv_eval`` is the repository's evaluation tooling, not in the wheel).
The model is the small Qwen2-VL-shaped proxy VLM trained in this repository (rebuilt from
``scripts/assets/proxy_vlm`` if ``models/proxy-vlm`` is missing); it finds a 6-word code hidden
among dozens of images and filler text (``madakv_eval.proxy_tasks``, text-needle task). The demo
starts ``vllm serve`` on 127.0.0.1, asks the same question through the ``openai`` client with
policy ``full``, then with the chosen policy at each budget (per-request ``vllm_xargs``), and
prints a table: the answers and the expected one; the KV pages each request held after its prompt
was compressed and, for the full cache, before (the plugin's per-request DEBUG line
``madakv compressed request=... pages=before->after``, switched on for the ``vllm.madakv`` logger
only: written by the worker when it compresses the prompt, so it cannot be read too early); the
prompt's text and image tokens and how many each KV head kept (same line). vLLM's log goes to
``models/demo-serve.log``.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
from pathlib import Path

from madakv_eval.serve import free_port, serve

ROOT = Path(__file__).resolve().parents[1]  # the checkout


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


def ask(port: int, model: str, messages, xargs: dict, answer_tokens: int) -> dict:
    """One answer (greedy, the code's words after the ``:`` the model writes first)."""
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY")
    r = client.chat.completions.create(
        model=model, messages=messages, max_tokens=1 + answer_tokens, temperature=0,
        extra_body={"vllm_xargs": xargs, "continue_final_message": True, "add_generation_prompt": False},
    )
    words = (r.choices[0].message.content or "").lstrip(": ").split()
    return {"answer": " ".join(words[:answer_tokens])}


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


def wait_for_compression(log: Path, seen: int, timeout: float = 60) -> dict:
    """The plugin's line for the request just served: the first line after the ``seen`` earlier
    ones (requests run one at a time). The worker writes it when it compresses the prompt, before
    the answer's first token; a missing line is an error, never a page count of 0."""
    deadline = time.time() + timeout
    while True:
        lines = compression_lines(log)
        if len(lines) > seen:
            return lines[seen]
        if time.time() > deadline:
            raise RuntimeError(f"no compression was logged for the request within {timeout:.0f} s (see {log})")
        time.sleep(0.2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--policy", default="madakv")
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2], help="compressed runs, beside the full cache")
    ap.add_argument("--images", type=int, default=48, help="images in the prompt (~20 tokens each with filler)")
    ap.add_argument("--seed", type=int, default=3, help="which prompt (proxy_tasks.make_sample seed)")
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
    runs = [("full cache", {"madakv_policy": "full"})]
    runs += [(f"{args.policy} @ {b:g}", {"madakv_policy": args.policy, "madakv_budget": b}) for b in args.budgets]
    results = []
    with serve(model, port, "--attention-backend", "madakv", "--max-model-len", "4096", "--block-size", "32",
               "--limit-mm-per-prompt", json.dumps({"image": args.images}), "--enforce-eager", env=env, log=log):
        t_ready = time.time()
        messages = proxy_messages(sample)
        for label, xargs in runs:
            seen = len(compression_lines(log))
            r = ask(port, str(model), messages, xargs, k)
            r["compression"] = None if xargs["madakv_policy"] == "full" else wait_for_compression(log, seen)
            if r["compression"] and (r["compression"]["policy"], float(r["compression"]["budget"])) != (
                    xargs["madakv_policy"], xargs["madakv_budget"]):
                raise RuntimeError(f"the plugin logged {r['compression']} for the request {label}")
            results.append((label, r))
    comp = [r["compression"] for _, r in results if r["compression"]]
    if not comp:
        raise RuntimeError("no compressed run: give at least one budget below 1 and a policy other than full")
    before = {c["pages"][0] for c in comp}  # the prompt's pages before compression: what the full cache holds
    if len(before) != 1 or min(before) <= 0 or min(c["pages"][1] for c in comp) <= 0:
        raise RuntimeError(f"unexpected page counts in the plugin's log: {[c['pages'] for c in comp]}")
    full_pages = before.pop()
    expected = " ".join(sample.answer)
    c = comp[0]

    def pages(r):
        return full_pages if r["compression"] is None else r["compression"]["pages"][1]

    def kept(r, name):
        n_prompt, n_kept = c["kept"][name]
        if r["compression"] is None:
            return f"{n_prompt:.0f} of {n_prompt:.0f}"
        n_kept = r["compression"]["kept"][name][1]
        return f"{n_kept:.1f} of {n_prompt:.0f} ({n_kept / n_prompt:.0%})"

    rows = [("answer", [r["answer"] for _, r in results]),
            ("correct", [str(r["answer"] == expected) for _, r in results]),
            ("KV pages held", [str(pages(r)) for _, r in results])]
    rows += [(f"{name} tokens kept per head", [kept(r, name) for _, r in results]) for name in c["kept"]]
    print(f"\nprompt: {c['tokens']} tokens, {args.images} images, a 6-word code hidden at image "
          f"{sample.needle_slots[0] + 1}; expected answer: {expected}\n")
    widths = [max(len(r[0]) for r in rows) + 2]
    widths += [max(len(label), *(len(r[1][i]) for r in rows)) + 3 for i, (label, _) in enumerate(results)]
    print("".join(f"{text:<{w}}" for text, w in zip(["", *(label for label, _ in results)], widths)).rstrip())
    for name, cells in rows:
        print("".join(f"{text:<{w}}" for text, w in zip([name, *cells], widths)).rstrip())
    print()
    for label, r in results[1:]:
        n = pages(r)
        print(f"{label}: {n} KV pages instead of {full_pages} ({1 - n / full_pages:.0%} back in vLLM's pool), "
              f"answer {'right' if r['answer'] == expected else 'wrong'}")
    print(f"(pages: the plugin's per-request log line, pages=before->after; server start {t_ready - t0:.0f} s, "
          f"total {time.time() - t0:.0f} s)")
    return 0 if results[0][1]["answer"] == expected else 1


if __name__ == "__main__":
    sys.exit(main())
