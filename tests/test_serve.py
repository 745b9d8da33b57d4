"""Real multi-process paths: `vllm serve --attention-backend madakv` (OpenAI API) and the
offline LLM class with spawned engine-core / worker processes."""

import collections
import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import openai
import pytest

from madakv_eval.serve import chat_with_image, free_port, labelled_metrics, metrics, serve
from madakv_vllm.accounting import cdiv

pytestmark = pytest.mark.slow


SERVER_CONFIG = {"policy": "madakv", "budget": 0.2, "recompress_interval": 32}


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    model = model_dir("qwen2vl")
    port = free_port()
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    cfg = json.dumps({"madakv": SERVER_CONFIG})
    with serve(model, port, "--attention-backend", "madakv", "--additional-config", cfg, "--max-model-len", "8192",
               "--block-size", "32", "--enforce-eager", env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, log=log):
        yield port, str(model), log


def test_multimodal_chat(server):
    port, model, log = server
    resp = chat_with_image(port, model, n_images=3, text="compare the images " * 40, max_tokens=20)
    assert resp.choices[0].finish_reason in ("length", "stop")
    assert resp.usage.completion_tokens >= 1
    assert resp.usage.prompt_tokens > 3 * 16  # three images' placeholders were expanded
    m = metrics(port)
    assert "vllm:num_requests_running" in m and "vllm:kv_cache_usage_perc" in m
    assert "madakv" in log.read_text().lower()


def test_per_request_override_and_http_400(server):
    port, model, _ = server
    ok = chat_with_image(port, model, extra_body={"vllm_xargs": {"madakv_policy": "snapkv", "madakv_budget": 0.1}})
    assert ok.usage.completion_tokens >= 1
    for bad, field in [({"madakv_budget": 4.0}, "madakv_budget"), ({"madakv_policy": "lru"}, "madakv_policy"),
                       ({"madakv_nope": 1}, "madakv_nope"), ({"madakv_mpa_mix": 0.5}, "madakv_experimental_mpa_mix")]:
        with pytest.raises(openai.BadRequestError) as e:
            chat_with_image(port, model, extra_body={"vllm_xargs": bad})
        assert e.value.status_code == 400 and field in str(e.value)
    # the engine is still serving
    assert chat_with_image(port, model).usage.completion_tokens >= 1


def test_metrics_count_what_the_page_contract_says(server):
    """madakv:* on vLLM's /metrics (counted in the engine core and the worker) after requests with
    known policies and budgets: pages freed, entries kept and evicted, requests per policy and
    compression events equal what accounting.py says those requests do."""
    from madakv_vllm.accounting import RequestPlan, plan_compression
    from madakv_vllm.config import config_from_vllm, resolve

    port, model, _ = server
    text_cfg = json.loads((Path(model) / "config.json").read_text())["text_config"]
    heads = text_cfg["num_hidden_layers"] * text_cfg["num_key_value_heads"]  # (layer, KV head) pairs
    server_cfg = config_from_vllm({"madakv": SERVER_CONFIG})
    before = labelled_metrics(port)
    pages = kept = entries = 0
    policies = collections.Counter()
    for xargs, n_images, words in [({}, 2, 300), ({"madakv_policy": "snapkv", "madakv_budget": 0.1}, 1, 500),
                                   ({"madakv_policy": "streamingllm", "madakv_budget": 0.3}, 3, 200),
                                   ({"madakv_policy": "full"}, 1, 300)]:
        r = chat_with_image(port, model, n_images=n_images, text="compare the images " * (words // 3), max_tokens=8,
                            extra_body={"vllm_xargs": xargs})  # 8 tokens: no re-compression (every 32)
        cfg = resolve(server_cfg, xargs)
        plan = plan_compression(cfg, r.usage.prompt_tokens, 32)
        if plan is None:
            continue
        policies[cfg.policy] += 1
        # every page before the tail goes back but the P it packs into; with prefix caching (on, as
        # vLLM's default) those P are fresh pages taken at compression, so every full prompt page goes
        fresh = RequestPlan(cfg=cfg, num_prompt_tokens=r.usage.prompt_tokens, prefix_caching=True)
        pages += r.usage.prompt_tokens // 32 - plan.keep_pages + fresh.extra_pages(r.usage.prompt_tokens, 32)
        kept += heads * plan.budget
        entries += heads * r.usage.prompt_tokens
    after = labelled_metrics(port)

    def delta(name, **labels):
        return metric_delta(before, after, name, **labels)

    assert policies == {"madakv": 1, "snapkv": 1, "streamingllm": 1}
    assert delta("madakv:kv_pages_freed_total") == pages > 0
    for policy, n in policies.items():
        assert delta("madakv:requests_compressed_total", policy=policy) == n
    assert delta("madakv:requests_compressed_total", policy="full") == 0
    assert delta("madakv:tokens_kept_total", event="prompt") == kept
    assert delta("madakv:tokens_kept_total", event="prompt") + delta("madakv:tokens_evicted_total", event="prompt") == entries
    for modality in ("text", "image"):
        assert delta("madakv:tokens_kept_total", modality=modality) > 0
        assert delta("madakv:tokens_evicted_total", modality=modality) > 0
    assert delta("madakv:compression_seconds_count", event="prompt") == 3
    assert delta("madakv:compression_seconds_sum", event="prompt") > 0
    assert "vllm:kv_cache_usage_perc" in metrics(port)  # vLLM's own metrics are still there


def metric_delta(before: dict, after: dict, name: str, **labels) -> float:
    return sum(v - before.get(k, 0.0) for k, v in after.items() if k[0] == name and set(labels.items()) <= set(k[1]))


def test_prefix_cache_serves_a_second_question_over_the_same_images(server):
    """Prefix caching stays on: a second question over the same images and text is served from the
    first one's prompt pages, up to the observation window it recomputes, and is compressed for
    its own question; vLLM's counters show the hit."""
    port, model, _ = server
    context = "look closely at every picture and remember what you see " * 40
    chat_with_image(port, model, n_images=3, first_image=20, text=context + "What is in the first?", max_tokens=4)
    time.sleep(1)  # the engine publishes its counters after the response
    before = labelled_metrics(port, prefix="")
    r = chat_with_image(port, model, n_images=3, first_image=20, text=context + "And in the last one?", max_tokens=4)
    deadline = time.time() + 10
    while (metric_delta(before, after := labelled_metrics(port, prefix=""), "vllm:request_success_total") < 1
           and time.time() < deadline):
        time.sleep(0.2)
    cached = metric_delta(before, after, "vllm:prompt_tokens_cached_total")
    n = r.usage.prompt_tokens
    assert metric_delta(before, after, "vllm:prefix_cache_hits_total") == cached
    assert n - 32 - 64 <= cached <= n - 32 and cached % 32 == 0, (cached, n)  # all but the window and question
    assert metric_delta(before, after, "madakv:requests_compressed_total", policy="madakv") == 1
    assert metric_delta(before, after, "madakv:tokens_kept_total", event="prompt") > 0


def _families(port) -> dict:
    """/metrics as {family: (type, {(sample name, sorted labels): value})}."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    return {f.name: (f.type, {(s.name, tuple(sorted(s.labels.items()))): s.value for s in f.samples})
            for f in text_string_to_metric_families(text)}


def test_metrics_families_are_stocks_plus_madakv_from_startup(model_dir, tmp_path):
    """Stock `vllm serve` and `vllm serve --attention-backend madakv` on the same model and settings
    (prefix caching off in both: madakv turns it off): /metrics has the same families, types and
    sample label sets, plus madakv:*, on the idle server and after one request; on the idle server
    every vllm:* sample has stock's value (the gauges at 0, not missing) but the _created times."""
    model = model_dir("qwen2vl")
    args = ["--max-model-len", "4096", "--block-size", "32", "--enforce-eager", "--no-enable-prefix-caching"]
    madakv_args = ["--attention-backend", "madakv", "--additional-config", json.dumps({"madakv": SERVER_CONFIG})]
    seen = {}
    for name, extra in [("stock", []), ("madakv", madakv_args)]:
        port = free_port()
        with serve(model, port, *extra, *args, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, log=tmp_path / f"{name}.log"):
            idle = _families(port)
            r = chat_with_image(port, str(model), n_images=2, text="compare the images " * 100, max_tokens=8)
            assert r.usage.completion_tokens == 8
            seen[name] = idle, _families(port)
    from madakv_vllm.integration.metrics import FAMILIES

    ours = {name for name, *_ in FAMILIES}
    for phase in (0, 1):
        stock, madakv = seen["stock"][phase], seen["madakv"][phase]
        assert set(madakv) == set(stock) | ours, (phase, set(madakv) ^ (set(stock) | ours))
        for family, (typ, samples) in stock.items():
            assert madakv[family][0] == typ, family
            assert set(madakv[family][1]) == set(samples), (phase, family, set(madakv[family][1]) ^ set(samples))
            if phase == 0 and family.startswith("vllm:"):
                assert {k: v for k, v in madakv[family][1].items() if not k[0].endswith("_created")} == {
                    k: v for k, v in samples.items() if not k[0].endswith("_created")}, family
    idle, after = seen["madakv"]
    assert idle["vllm:num_requests_waiting"][1] and not any(idle["vllm:num_requests_waiting"][1].values())
    assert idle["madakv:kv_pages_freed"][1] == {("madakv:kv_pages_freed_total", ()): 0.0}
    assert after["madakv:requests_compressed"][1] == {
        ("madakv:requests_compressed_total", (("policy", "madakv"),)): 1.0}
    assert after["madakv:kv_pages_freed"][1][("madakv:kv_pages_freed_total", ())] > 0
    assert after["madakv:compression_seconds"][1][("madakv:compression_seconds_count", (("event", "prompt"),))] == 1
    assert "process_resident_memory_bytes" in after and "python_info" in after


@pytest.mark.parametrize("url", ["file:///etc/passwd", "data:,", "data:image/png,%89PNG%0D%0A"])
def test_image_urls_vllm_answered_with_a_5xx_are_a_400(server, url):
    """Stock vLLM 0.32: a file URL without --allowed-local-media-path is a 500, a data URL without
    ;base64 a 501."""
    import httpx

    port, model, _ = server
    body = {"model": model, "max_tokens": 4,
            "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]}
    r = httpx.post(f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=60)
    assert r.status_code == 400, r.text


def _stream_error(port, model, **kw):
    """A streamed chat whose request the engine rejects: HTTP 200, then an error event."""
    try:
        chunks = list(chat_with_image(port, model, stream=True, **kw))
    except openai.APIError as e:
        return str(e)
    return " ".join(str(c) for c in chunks)


REJECTED = [  # (request arguments, what the 400 names); each is rejected after its image was processed
    ({"extra_body": {"vllm_xargs": {"madakv_budget": 4.0}}}, "madakv_budget"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"temperature": -5}, "temperature"),
    ({"max_tokens": 10**7}, "max_tokens"),
]


def test_a_rejected_request_never_poisons_a_later_one(server):
    """vLLM 0.32's front end caches an image before it validates the request; a 400 left the image
    in the sender cache only, and the next request with it got HTTP 500 (P0/P1 cache drift)."""
    port, model, log = server
    hits = metrics(port).get("vllm:mm_cache_hits_total", 0.0)
    for i, (bad, field) in enumerate(REJECTED):
        image = 100 + i  # an image no earlier request sent
        with pytest.raises(openai.BadRequestError) as e:
            chat_with_image(port, model, first_image=image, text=f"request {i}", **bad)
        assert e.value.status_code == 400 and field in str(e.value)
        assert chat_with_image(port, model, first_image=image, text=f"request {i}").usage.completion_tokens >= 1
    image = 200  # the engine rejects a streamed request after the 200 status: rolled back there
    assert "madakv_budget" in _stream_error(port, model, first_image=image, extra_body={"vllm_xargs": {"madakv_budget": 0}})
    assert chat_with_image(port, model, first_image=image).usage.completion_tokens >= 1
    # accepted requests keep their entries: the same image again is a cache hit, not resent
    assert chat_with_image(port, model, first_image=image).usage.completion_tokens >= 1
    assert metrics(port).get("vllm:mm_cache_hits_total", 0.0) > hits
    assert "cache drift" not in log.read_text()


def test_invalid_server_config_fails_at_startup_naming_the_field(model_dir):
    vllm_bin = os.path.join(os.path.dirname(sys.executable), "vllm")
    r = subprocess.run(
        [vllm_bin, "serve", str(model_dir("llama")), "--attention-backend", "madakv", "--port", str(free_port()),
         "--host", "127.0.0.1", "--additional-config", json.dumps({"madakv": {"budget": 7.5}})],
        capture_output=True, text=True, timeout=240, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert r.returncode != 0
    assert "madakv.budget" in r.stdout + r.stderr


CHUNKED_CONFIG = {"policy": "madakv", "budget": 0.1, "prefill_eviction": "chunked"}
POOL_BLOCKS = 40  # 1,280 tokens of 32 (one is vLLM's null block)


def test_chunked_eviction_serves_a_prompt_three_times_the_pool(model_dir, engine, tmp_path):
    """prefill_eviction 'chunked': `vllm serve` starts with --max-model-len 6000 over a 1,248-token
    KV pool (stock refuses it), answers an image chat of at least 3x the pool through the OpenAI API
    with the text the same config gives in a pool large enough, refuses with a 400 what would not fit
    (the same prompt in 'end' mode or with policy full, or a budget too large), and gets every page
    back."""
    from vllm import SamplingParams

    model = str(model_dir("qwen2vl"))
    text = "compare the red and the blue images " * 540
    args = ["--enforce-eager", "--block-size", "32", "--max-num-batched-tokens", "256", "--dtype", "float32",
            "--num-gpu-blocks-override", str(POOL_BLOCKS), "--max-model-len", "6000", "--seed", "0",
            "--additional-config", json.dumps({"madakv": CHUNKED_CONFIG})]
    stock_log = tmp_path / "stock.log"
    with pytest.raises(RuntimeError, match="exited"):  # stock vLLM: max_model_len above the pool
        with serve(Path(model), free_port(), *args[:-2], log=stock_log, timeout=120):
            pass
    assert "max seq len" in stock_log.read_text()
    port = free_port()
    with serve(Path(model), port, "--attention-backend", "madakv", *args, log=tmp_path / "serve.log",
               env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}):
        r = chat_with_image(port, model, n_images=2, text=text, max_tokens=16)
        assert r.usage.prompt_tokens >= 3 * (POOL_BLOCKS - 1) * 32, r.usage.prompt_tokens
        assert r.usage.completion_tokens == 16
        for xargs in [{"madakv_prefill_eviction": "end"}, {"madakv_policy": "full"}, {"madakv_budget": 0.9}]:
            with pytest.raises(openai.BadRequestError) as e:
                chat_with_image(port, model, n_images=2, text=text, max_tokens=16, extra_body={"vllm_xargs": xargs})
            assert e.value.status_code == 400 and "does not fit the KV cache" in str(e.value)
        short = chat_with_image(port, model, text="compare the images", max_tokens=4,
                                extra_body={"vllm_xargs": {"madakv_prefill_eviction": "end"}})
        assert short.usage.completion_tokens == 4  # what fits is served in any mode
        usage = metrics(port)["vllm:kv_cache_usage_perc"]
        freed = metrics(port)["madakv:kv_pages_freed_total"]
    assert usage == 0.0
    assert freed >= cdiv(r.usage.prompt_tokens, 32) * 0.8
    # the same chat with the same config and chunks, in a pool that holds it whole
    llm = engine("qwen2vl", CHUNKED_CONFIG, max_num_batched_tokens=256, max_model_len=6000)
    from madakv_eval.serve import image_data_url

    content = [{"type": "image_url", "image_url": {"url": image_data_url(i)}} for i in range(2)]
    content.append({"type": "text", "text": text})
    ref = llm.chat([{"role": "user", "content": content}], SamplingParams(max_tokens=16, temperature=0), use_tqdm=False)[0]
    assert len(ref.prompt_token_ids) == r.usage.prompt_tokens
    assert r.choices[0].message.content == ref.outputs[0].text


def test_offline_llm_with_spawned_processes_matches_in_process(model_dir, engine):
    """LLM(attention_backend='madakv') through spawned engine-core and worker processes."""
    from conftest import mm_prompt, words
    from vllm import SamplingParams

    model = model_dir("qwen2vl")
    cfg = {"policy": "madakv", "budget": 0.2}
    script = textwrap.dedent(f"""
        import json, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        from conftest import mm_prompt, words
        from vllm import LLM, SamplingParams
        if __name__ == "__main__":
            llm = LLM(model={str(model)!r}, attention_backend="madakv", additional_config={{"madakv": {cfg!r}}},
                      enforce_eager=True, max_model_len=8192, block_size=32, dtype="float32", seed=0,
                      max_num_batched_tokens=512, limit_mm_per_prompt={{"image": 8}})
            p = [mm_prompt("qwen2vl", [0, words(600), 1]), mm_prompt("qwen2vl", [words(50, 1)])]
            out = llm.generate(p, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)
            print("RESULT" + json.dumps([list(o.outputs[0].token_ids) for o in out]))
    """)
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    r = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=400, env=env)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT")]
    assert r.returncode == 0 and lines, r.stderr[-3000:]
    spawned = json.loads(lines[0][len("RESULT"):])
    llm = engine("qwen2vl", cfg)
    p = [mm_prompt("qwen2vl", [0, words(600), 1]), mm_prompt("qwen2vl", [words(50, 1)])]
    local = [list(o.outputs[0].token_ids) for o in llm.generate(p, SamplingParams(max_tokens=12, temperature=0), use_tqdm=False)]
    assert spawned == local


def test_readme_demo_runs_from_the_checkout_as_written():
    """README command 1, as written (the interpreter of the environment setup.sh builds, from the
    checkout's root, where madakv_eval is): the trained proxy VLM through `vllm serve
    --attention-backend madakv`, the same long multimodal question with the full cache and at
    budgets 0.5 and 0.2. The full-cache answer is right (exit 0); every column's page count (from
    the plugin's per-request log line) is a positive number, fewer at the smaller budget; the
    plugin's per-modality kept counts are printed."""
    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert "bash scripts/setup.sh && .venv/bin/python -m madakv_eval.demo\n" in readme
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}  # as a user runs it
    r = subprocess.run([sys.executable, "-m", "madakv_eval.demo"], cwd=root, capture_output=True, text=True,
                       timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    lines = r.stdout.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("full cache"))
    assert header.split() == ["full", "cache", "madakv", "@", "0.5", "madakv", "@", "0.2"]
    full, half, fifth = (int(x) for x in next(line for line in lines if line.startswith("KV pages held")).split()[-3:])
    assert full > half > fifth > 0
    assert "image tokens kept per head" in r.stdout and "text tokens kept per head" in r.stdout
    assert "nan" not in r.stdout
