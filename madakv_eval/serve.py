"""Run ``vllm serve`` on 127.0.0.1 for tests, benchmarks and the demo; small OpenAI-client helpers."""

from __future__ import annotations

import base64
import io
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def image_data_url(seed: int = 0, size: int = 64) -> str:
    from PIL import Image

    img = Image.new("RGB", (size, size))
    px = img.load()
    for x in range(size):
        for y in range(size):
            px[x, y] = ((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, ((x + y) * 3) % 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@contextmanager
def serve(model: Path, port: int, *args: str, env: dict | None = None, log: Path | None = None, timeout: float = 240):
    """Run ``vllm serve`` on 127.0.0.1:port until the block exits."""
    vllm_bin = Path(sys.executable).with_name("vllm")
    cmd = [str(vllm_bin), "serve", str(model), "--host", "127.0.0.1", "--port", str(port), *args]
    full_env = {**os.environ, **(env or {})}
    if "--kv-cache-memory-bytes" in args:  # vLLM's CPU platform lets the variable override the flag
        full_env.pop("VLLM_CPU_KVCACHE_SPACE", None)
    else:
        full_env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(cmd, env=full_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                tail = Path(log).read_text()[-3000:] if log else ""
                raise RuntimeError(f"vllm serve exited with {proc.returncode}\n{tail}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline:
                raise TimeoutError(f"vllm serve not ready after {timeout}s")
            time.sleep(1)
        yield proc
    finally:
        stop(proc)
        if log:
            out.close()


def stop(proc: subprocess.Popen) -> None:
    """SIGINT to the process group (vLLM shuts down cleanly), SIGKILL after 30 s."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def metrics(port: int) -> dict[str, float]:
    """The unlabelled-by-value numbers of vLLM's Prometheus endpoint, summed per metric name."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        name, value = line.rsplit(" ", 1)
        name = name.split("{", 1)[0]
        try:
            out[name] = out.get(name, 0.0) + float(value)
        except ValueError:
            pass
    return out


def labelled_metrics(port: int, prefix: str = "madakv:") -> dict[tuple[str, frozenset], float]:
    """Samples of the metrics whose name starts with ``prefix``: (name, labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {(s.name, frozenset(s.labels.items())): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples if s.name.startswith(prefix)}


def chat_with_image(port: int, model: str, text: str = "Describe the image.", n_images: int = 1, first_image: int = 0,
                    **extra):
    from openai import OpenAI

    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)  # see every 5xx
    content = [{"type": "image_url", "image_url": {"url": image_data_url(first_image + i)}}
               for i in range(n_images)]
    content.append({"type": "text", "text": text})
    return client.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": content}],
        max_tokens=extra.pop("max_tokens", 16),
        temperature=extra.pop("temperature", 0),
        **extra,
    )
