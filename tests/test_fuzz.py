"""API fuzzing of `vllm serve --attention-backend madakv`: chat requests with odd, broken and huge
images, zero or too many images, empty content, prompts over max_model_len and every
``madakv_*`` key with wrong types and out-of-range values. Every answer is a 2xx or a 4xx, never a
5xx, and the engine keeps serving."""

import base64
import io
import json
import random

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from madakv_eval.random_mix import draw_xargs
from madakv_eval.serve import chat_with_image, free_port, metrics, serve

pytestmark = pytest.mark.slow

MAX_MODEL_LEN = 1024
MAX_IMAGES = 3
MADAKV_KEYS = ["madakv_policy", "madakv_budget", "madakv_window", "madakv_pooling", "madakv_theta", "madakv_mpa",
               "madakv_hcc", "madakv_sinks", "madakv_recompress_interval", "madakv_page_aligned", "madakv_min_prompt_len",
               "madakv_hcc_mode", "madakv_hcc_max_scale", "madakv_min_per_head", "madakv_nope", "madakv_"]


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    model = model_dir("qwen2vl")
    port = free_port()
    log = tmp_path_factory.mktemp("fuzz") / "serve.log"
    cfg = json.dumps({"madakv": {"policy": "madakv", "budget": 0.3, "recompress_interval": 16}})
    with serve(model, port, "--attention-backend", "madakv", "--additional-config", cfg, "--max-model-len",
               str(MAX_MODEL_LEN), "--block-size", "32", "--enforce-eager", "--limit-mm-per-prompt",
               json.dumps({"image": MAX_IMAGES}), log=log):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield port, str(model), client, log


def _png(width: int, height: int, mode: str, fmt: str) -> bytes:
    from PIL import Image

    img = Image.new(mode, (width, height), color=(width * 7 % 256) if mode in ("L", "I;16") else (width % 256, 9, 200))
    if fmt == "JPEG" and mode not in ("RGB", "L"):
        img = img.convert("RGB")
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


valid_images = st.builds(lambda w, h, mode, fmt: _data_url(_png(w, h, mode, fmt), f"image/{fmt.lower()}"),
                         st.integers(1, 700), st.integers(1, 700), st.sampled_from(["RGB", "L", "P"]),
                         st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP"]))
images = st.one_of(
    valid_images, valid_images, valid_images,
    st.builds(lambda: _data_url(_png(4000, 3000, "RGB", "PNG"))),  # 12 megapixels
    st.builds(lambda b: _data_url(b), st.binary(max_size=64)),  # not an image
    st.builds(lambda n: _data_url(_png(32, 32, "RGB", "PNG")[:n]), st.integers(0, 60)),  # truncated
    st.sampled_from(["data:image/png;base64,!!!notbase64", "data:image/png;base64,", "data:,", "", "not a url",
                     "file:///etc/passwd", "data:text/plain;base64,aGVsbG8=", "data:,", "data:image/png,%89PNG"]),
    # Not here: an http(s) URL the server cannot reach. vLLM answers a failed fetch (connection
    # refused, DNS, timeout, a 5xx upstream) with a 5xx on purpose, as a transient error a client
    # may retry; a 4xx upstream is a 422.
)
texts = st.one_of(st.text(max_size=40), st.just(""), st.builds(lambda n: "word " * n, st.sampled_from([1, 300, 3000])))
content_parts = st.one_of(
    st.builds(lambda t: {"type": "text", "text": t}, texts),
    st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, images),
    st.just({"type": "image_url", "image_url": {}}),
    st.just({"type": "nope"}),
)
odd_values = st.one_of(st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.floats(allow_nan=False),
                       st.text(max_size=12), st.sampled_from(["madakv", "snapkv", "full", "global", "streamed", "lru"]),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
user_turn = st.fixed_dictionaries({  # mostly well formed, so that many requests are served and compressed
    "role": st.just("user"),
    "content": st.lists(st.one_of(st.builds(lambda u: {"type": "image_url", "image_url": {"url": u}}, images),
                                  st.builds(lambda t: {"type": "text", "text": t}, texts)), min_size=1, max_size=MAX_IMAGES + 1)})
odd_turn = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "x"]),
                                  "content": st.one_of(texts, st.lists(content_parts, max_size=MAX_IMAGES + 2))})
requests = st.fixed_dictionaries(
    {"messages": st.one_of(st.lists(user_turn, min_size=1, max_size=1), st.lists(user_turn, min_size=1, max_size=1),
                           st.lists(st.one_of(user_turn, odd_turn), min_size=0, max_size=3))},
    optional={
        "max_tokens": st.one_of(st.integers(-2, 24), st.sampled_from([10**7, "8", 2.5])),
        "temperature": st.one_of(st.floats(-5, 5, allow_nan=False), st.sampled_from([None, "hot"])),
        "vllm_xargs": st.one_of(st.dictionaries(st.sampled_from(MADAKV_KEYS), odd_values, max_size=4),
                                st.sampled_from([None, [], "x"]),
                                # legal extremes, drawn as the engine-level random mixes draw them
                                st.builds(lambda seed, n: draw_xargs(random.Random(seed), n),
                                          st.integers(0, 10**6), st.integers(1, MAX_MODEL_LEN))),
        "stream": st.booleans(),
    },
)


@settings(max_examples=600, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large])
@given(body=requests)
def test_fuzzed_chat_requests_never_get_a_5xx(server, body):
    port, model, client, _ = server
    body = {"model": model, **body}
    body.setdefault("max_tokens", 8)  # without it, every example would generate up to max_model_len
    r = client.post("/v1/chat/completions", content=json.dumps(body, allow_nan=True),
                    headers={"content-type": "application/json"})
    text = r.text  # a streamed answer: the whole stream
    assert r.status_code < 500, (r.status_code, text[:500], json.dumps(body)[:800])
    if r.status_code == 200 and body.get("stream"):  # an error after the status is an event in the stream
        assert "InternalServerError" not in text, (text[:500], json.dumps(body)[:800])


@pytest.mark.parametrize("n,xargs", [(1000, {"madakv_page_aligned": False, "madakv_budget": 0.998}),
                                     (1000, {"madakv_budget": 1, "madakv_window": 1}),
                                     (MAX_MODEL_LEN - 24, {"madakv_budget": MAX_MODEL_LEN, "madakv_recompress_interval": 1}),
                                     (100, {"madakv_page_aligned": False, "madakv_budget": 0.9})])
def test_legal_extreme_completions_are_served(server, n, xargs):
    """Token-id prompts up to max_model_len with legal extreme settings: a 200 with every token
    (1,000 tokens at 0.998 unaligned once killed the engine: its plan outgrew the block table)."""
    port, model, client, _ = server
    body = {"model": model, "prompt": [100 + i % 300 for i in range(n)], "max_tokens": 24, "ignore_eos": True,
            "temperature": 0, "vllm_xargs": xargs}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text[:500]
    assert r.json()["usage"]["completion_tokens"] == 24


def test_server_survives_the_fuzzing_and_returns_every_page(server):
    """After the fuzzing (same module): a normal request works, and no page is held."""
    port, model, _, log = server
    assert chat_with_image(port, model, n_images=2, text="compare " * 50).usage.completion_tokens >= 1
    assert metrics(port)["vllm:kv_cache_usage_perc"] == 0
    assert "EngineDeadError" not in log.read_text()
