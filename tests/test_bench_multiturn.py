"""scripts/bench_multiturn.py: the conversation builder and the /metrics delta parsing (no
server), and one end-to-end run on a tiny model (slow)."""

import json

import pytest

from conftest import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_multiturn")


def test_each_turn_repeats_the_previous_prompt(bench):
    content = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
               {"type": "text", "text": "filler"}, {"type": "text", "text": "\nWhat is the secret code?"}]
    conv = bench.Conversation(content, ["Q2", "Q3"])
    m1 = conv.messages()
    assert m1 == [{"role": "user", "content": content}, {"role": "assistant", "content": "Answer"}]
    conv.add_answer(": dog tree")
    m2 = conv.messages()
    conv.add_answer(": red")
    m3 = conv.messages()
    assert conv.turn == 3
    # turn k = turn k-1's messages up to its open assistant message + the answer + a new question
    assert m2[:1] == m1[:1] and m3[:3] == m2[:3]
    assert m2[1:] == [{"role": "assistant", "content": "Answer: dog tree"}, {"role": "user", "content": "Q2"},
                      {"role": "assistant", "content": "Answer"}]
    assert m3[3:] == [{"role": "assistant", "content": "Answer: red"}, {"role": "user", "content": "Q3"},
                      {"role": "assistant", "content": "Answer"}]
    # the same content object (same images) in every turn
    assert all(m[0]["content"] is content for m in (m1, m2, m3))


def test_shared_image_requests_differ_only_in_the_question(bench):
    content = [{"type": "text", "text": "a"}, {"type": "image_url", "image_url": {"url": "x"}},
               {"type": "text", "text": "\nold question"}]
    qs = bench.questions_for(9)
    assert len(set(qs)) == 9
    reqs = bench.shared_image_requests(content, qs)
    assert len(reqs) == 9
    for q, msgs in zip(qs, reqs):
        user = msgs[0]["content"]
        assert user[:-1] == content[:-1] and user[-1] == {"type": "text", "text": "\n" + q}
        assert msgs[1] == {"role": "assistant", "content": "Answer"}
    with pytest.raises(ValueError):
        bench.shared_image_requests(content[:2], qs)


def test_proxy_prompt_is_long_and_multimodal(bench):
    from madakv_eval import proxy_tasks as pt

    parts = bench.image_parts(pt.make_sample("text_needle", 5, 40), data_url=lambda spec: f"img:{spec}")
    assert sum(p["type"] == "image_url" for p in parts) == 40
    assert parts[-1] == {"type": "text", "text": "\n" + pt.QUESTIONS["text_needle"]}


def metrics_text(prompt, cached, queries, hits, finished_length):
    return f"""\
# HELP vllm:prompt_tokens_total Number of prefill tokens processed.
# TYPE vllm:prompt_tokens_total counter
vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}
# TYPE vllm:prompt_tokens_cached_total counter
vllm:prompt_tokens_cached_total{{engine="0",model_name="m"}} {cached}
# TYPE vllm:prefix_cache_queries_total counter
vllm:prefix_cache_queries_total{{engine="0",model_name="m"}} {queries}
# TYPE vllm:prefix_cache_hits_total counter
vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}
# TYPE vllm:request_success_total counter
vllm:request_success_total{{engine="0",finished_reason="stop",model_name="m"}} 1.0
vllm:request_success_total{{engine="0",finished_reason="length",model_name="m"}} {finished_length}
# TYPE vllm:cache_config_info gauge
vllm:cache_config_info{{block_size="32",enable_prefix_caching="True",engine="0",num_gpu_blocks="4096"}} 1.0
"""


def test_metric_deltas(bench):
    before = bench.parse_metrics(metrics_text(1000.0, 100.0, 1000.0, 96.0, 2.0))
    after = bench.parse_metrics(metrics_text(2010.0, 1060.0, 2010.0, 1056.0, 3.0))
    d = bench.counter_deltas(before, after)
    assert d == {"prompt": 1010.0, "cached": 960.0, "queries": 1010.0, "hits": 960.0, "freed": None, "finished": 1.0}
    req = {"ttft_s": 0.1, "e2e_s": 0.2, "answer": "", "prompt_tokens": 1010, "completion_tokens": 8}
    row = bench.request_row(req, d)
    assert row["computed_tokens"] == 50 and row["cached_tokens"] == 960 and row["pages_held"] == 32  # ceil(1018/32)
    assert bench.hit_rate([row]) == pytest.approx(960 / 1010)
    cfg = bench.cache_config(after)
    assert cfg["enable_prefix_caching"] == "True" and cfg["num_gpu_blocks"] == "4096"
    # madakv's counter, when present, is subtracted from the pages held
    d2 = bench.counter_deltas({**before, **bench.parse_metrics("madakv:kv_pages_freed_total 0.0\n")},
                              {**after, **bench.parse_metrics("madakv:kv_pages_freed_total 25.0\n")})
    assert d2["freed"] == 25.0 and bench.request_row(req, d2)["pages_held"] == 7


def test_server_args_per_setup(bench):
    class A:
        images, policy, budget = 12, "madakv", 0.2

    stock = bench.server_args("stock-pc", A, 4096)
    assert "--enable-prefix-caching" in stock and "madakv" not in " ".join(stock)
    nopc = bench.server_args("madakv-nopc", A, 4096)
    assert "--no-enable-prefix-caching" in nopc and nopc[nopc.index("--attention-backend") + 1] == "madakv"
    assert json.loads(nopc[nopc.index("--additional-config") + 1]) == {"madakv": {"policy": "madakv", "budget": 0.2}}
    assert "--enable-prefix-caching" in bench.server_args("madakv-pc", A, 4096)
    with pytest.raises(ValueError):
        bench.server_args("nope", A, 4096)


@pytest.mark.slow
def test_end_to_end_on_a_tiny_model(bench, model_dir, tmp_path):
    """Two servers, one short conversation and two shared-image questions each: both hit their
    prefix cache on turn 2 (madakv leaves its observation window to recompute) and on the second
    shared-image question; madakv holds fewer pages, counting the fresh pages it packs into."""
    from madakv_vllm.accounting import plan_compression
    from madakv_vllm.config import MadaKVConfig

    out = tmp_path / "out.json"
    assert bench.main(["--model", str(model_dir("qwen2vl")), "--setups", "stock-pc,madakv-pc", "--turns", "2",
                       "--conversations", "1", "--questions", "2", "--images", "24", "--max-tokens", "2",
                       "--max-model-len", "4096", "--log-dir", str(tmp_path), "--out-json", str(out)]) == 0
    res = {r["setup"]: r for r in json.loads(out.read_text())["results"]}
    stock, madakv = res["stock-pc"], res["madakv-pc"]
    for r in (stock, madakv):
        assert r["prefix_caching_effective"] and r["cache_config_enable_prefix_caching"] == "True" and not r["note"]
    t1, t2 = stock["multiturn"]["per_turn"]
    assert t1["cached_tokens"] == 0 and t2["cached_tokens"] > 0.5 * t2["prompt_tokens"]
    assert t2["prompt_tokens"] > t1["prompt_tokens"]
    m1, m2 = madakv["multiturn"]["per_turn"]
    assert m1["cached_tokens"] == 0 and 0.5 * m2["prompt_tokens"] < m2["cached_tokens"] <= m2["prompt_tokens"] - 32
    for row in madakv["multiturn"]["conversations"][0]:  # every full prompt page went back; P fresh pages + the rest
        n, c = row["prompt_tokens"], row["completion_tokens"]
        plan = plan_compression(MadaKVConfig(policy="madakv", budget=0.2), n, 32)
        assert row["pages_freed"] == n // 32 and row["fresh_pages"] == plan.keep_pages
        assert row["pages_held"] == plan.keep_pages + -(-(n + c) // 32) - n // 32
    assert m1["pages_held"] < t1["pages_held"]
    assert stock["shared_images"]["cached_tokens"] > 0 and madakv["shared_images"]["cached_tokens"] > 0
