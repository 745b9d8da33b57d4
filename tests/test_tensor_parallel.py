"""Tensor parallelism with vLLM's multi-process executor on this machine's CPU: two worker ranks,
each compressing its own KV heads, against the same requests at TP=1."""

import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from madakv_eval.serve import chat_with_image, free_port, labelled_metrics, metrics, serve, stop

pytestmark = pytest.mark.slow

CONFIG = {"policy": "madakv", "budget": 0.2, "recompress_interval": 32}
#: name -> request args; heads are independent: TP=2 must give TP=1's greedy tokens. MadaKV's
#: default (MPA within PyramidKV's per-head layer schedule) couples no heads.
INDEPENDENT = {p: {"madakv_policy": p} for p in
               ("full", "snapkv", "streamingllm", "pyramidkv", "h2o", "lookm", "madakv")}
#: served and exact per rank, not token-identical to TP=1: AdaKV's per-layer pool and MadaKV's
#: streamed HCC move budget between the heads of a rank.
COUPLED = {"adakv": {"madakv_policy": "adakv"},
           "madakv-streamed": {"madakv_policy": "madakv", "madakv_hcc_mode": "streamed"}}


def _args(tp: int) -> list[str]:
    # float32: the tiny random model's next-token distribution is near uniform, and in bfloat16
    # its top two logprobs are often exactly equal, so TP's different summation order breaks
    # such ties either way; in float32 the margins are far above TP's rounding differences.
    return ["--dtype", "float32", "--attention-backend", "madakv", "--additional-config", json.dumps({"madakv": CONFIG}),
            "--max-model-len", "8192", "--block-size", "32", "--enforce-eager", "--seed", "0",
            "--tensor-parallel-size", str(tp)]


@contextlib.contextmanager
def _headless_node(model, args: list[str], log: Path):
    """Node rank 1 of a two-node deployment: its worker only, no API server."""
    vllm_bin = Path(sys.executable).with_name("vllm")
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_CPU_OMP_THREADS_BIND": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([str(vllm_bin), "serve", str(model), *args, "--node-rank", "1", "--headless"], env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            yield proc
        finally:
            stop(proc)


def _run(model, tp: int, log, policies=None, extra=(), env=None):
    policies = policies or {**INDEPENDENT, **COUPLED}
    port = free_port()
    # one OpenMP thread per rank, on its own core
    env = env or {"VLLM_CPU_OMP_THREADS_BIND": "0|1" if tp == 2 else "0-1"}
    with serve(model, port, *_args(tp), *extra, env=env, log=log):
        tokens = {}
        for policy, xargs in policies.items():
            r = chat_with_image(port, str(model), n_images=2, text="compare the images " * 120, max_tokens=40,
                                logprobs=True, extra_body={"vllm_xargs": xargs})
            tokens[policy] = [t.token for t in r.choices[0].logprobs.content]  # 40 > 32: re-compressed too
        deadline = time.time() + 10
        while metrics(port)["vllm:kv_cache_usage_perc"] != 0 and time.time() < deadline:
            time.sleep(0.5)
        return tokens, metrics(port)["vllm:kv_cache_usage_perc"], labelled_metrics(port, prefix="")


def _total(samples, name, **labels):
    return sum(v for (n, lab), v in samples.items() if n == name and set(labels.items()) <= set(lab))


def test_tp2_matches_tp1_where_heads_are_independent_and_keeps_exact_totals(model_dir, tmp_path):
    model = model_dir("qwen2vl")  # 2 KV heads: one per rank
    tp1, usage1, m1 = _run(model, 1, tmp_path / "tp1.log")
    tp2, usage2, m2 = _run(model, 2, tmp_path / "tp2.log")
    assert usage1 == usage2 == 0  # every page returned
    for policy in INDEPENDENT:
        assert len(tp1[policy]) == 40
        assert tp2[policy] == tp1[policy], policy
    for policy in COUPLED:  # served, with per-rank coupling (docs/integration.md)
        assert len(tp2[policy]) == 40
    # One block table for both ranks: the same pages are freed; each rank keeps exactly its heads'
    # share of L*H*B, so the kept entries summed over ranks equal TP=1's.
    assert _total(m2, "madakv:kv_pages_freed_total") == _total(m1, "madakv:kv_pages_freed_total") > 0
    for event in ("prompt", "recompress"):
        kept1 = _total(m1, "madakv:tokens_kept_total", event=event)
        assert _total(m2, "madakv:tokens_kept_total", event=event) == kept1 > 0, event
        # one observation per rank and event
        assert _total(m2, "madakv:compression_seconds_count", event=event) == 2 * _total(
            m1, "madakv:compression_seconds_count", event=event)
    # one prompt under every policy: from the second request on, each reuses the prompt pages of
    # the first from vLLM's prefix cache, on both ranks, and still compresses for itself
    assert _total(m2, "vllm:prefix_cache_hits_total") == _total(m1, "vllm:prefix_cache_hits_total") > 0
    assert "madakv" in (tmp_path / "tp2.log").read_text()


def test_two_node_ranks_on_localhost_match_tp1(model_dir, tmp_path):
    """vLLM's multi-node mode (multi-process executor, --nnodes 2) with both node ranks on
    127.0.0.1, one TP rank each: greedy tokens equal TP=1's and every page returns. Node 1's
    worker counts its madakv:* metrics in its own processes (no API server there), so node 0's
    /metrics shows node 0's KV heads and the scheduler's page counts only."""
    model = model_dir("qwen2vl")
    policies = {p: INDEPENDENT[p] for p in ("snapkv", "pyramidkv")}
    tp1, _, m1 = _run(model, 1, tmp_path / "tp1.log", policies)
    multi = ["--nnodes", "2", "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
             "--distributed-executor-backend", "mp"]
    with _headless_node(model, _args(2) + multi, tmp_path / "node1.log") as node1:
        nodes, usage, m2 = _run(model, 2, tmp_path / "node0.log", policies, ["--node-rank", "0", *multi],
                                env={"VLLM_CPU_OMP_THREADS_BIND": "0"})
        assert node1.poll() is None, (tmp_path / "node1.log").read_text()[-2000:]
    assert nodes == tp1
    assert usage == 0
    assert _total(m2, "madakv:kv_pages_freed_total") == _total(m1, "madakv:kv_pages_freed_total") > 0


def test_tp2_with_an_fp8_kv_cache_matches_tp1(model_dir, tmp_path):
    """An fp8 KV cache at TP=2: each rank quantizes, scores (dequantized keys) and compacts (moved
    bytes) its own KV heads; greedy tokens equal TP=1's with the same cache, the same pages are
    freed, the kept entries summed over ranks equal TP=1's, and every page returns."""
    from test_fp8 import stock_fp8_refusal

    why = stock_fp8_refusal("fp8")
    if why:
        pytest.skip(f"stock vLLM refuses an fp8 KV cache on this CPU: {why}")
    model = model_dir("qwen2vl")  # head size 32: vLLM's CPU fp8 kernels need multiples of 32
    policies = {p: INDEPENDENT[p] for p in ("full", "snapkv", "madakv")}
    fp8 = ["--kv-cache-dtype", "fp8"]
    tp1, usage1, m1 = _run(model, 1, tmp_path / "tp1.log", policies, fp8)
    tp2, usage2, m2 = _run(model, 2, tmp_path / "tp2.log", policies, fp8)
    assert usage1 == usage2 == 0
    assert tp2 == tp1
    assert all(len(t) == 40 for t in tp1.values())
    assert _total(m2, "madakv:kv_pages_freed_total") == _total(m1, "madakv:kv_pages_freed_total") > 0
    for event in ("prompt", "recompress"):
        assert _total(m2, "madakv:tokens_kept_total", event=event) == _total(
            m1, "madakv:tokens_kept_total", event=event) > 0, event
    assert "fp8" in (tmp_path / "tp2.log").read_text()


def _ray_on_cuda_reason() -> str | None:
    import importlib.util

    import torch

    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        return "needs 2 NVIDIA GPUs (vLLM's CPU platform does not support Ray, for stock vLLM too)"
    if importlib.util.find_spec("ray") is None:
        return "needs ray (pip install madakv-vllm[distributed])"
    if os.environ.get("MADAKV_EXPERIMENTAL_CUDA") != "1":
        return "the CUDA path is opt-in: MADAKV_EXPERIMENTAL_CUDA=1 (scripts/gpu_check.sh sets it)"
    return None


_RAY_REASON = _ray_on_cuda_reason()


@pytest.mark.cuda
@pytest.mark.skipif(_RAY_REASON is not None, reason=_RAY_REASON or "")
def test_tp2_over_ray_on_cuda_matches_tp1(model_dir, tmp_path):
    """On CUDA, where vLLM supports Ray: --distributed-executor-backend ray at TP=2 gives TP=1's
    greedy tokens for the policies whose heads are independent, and every page returns."""
    model = model_dir("qwen2vl")
    tp1, _, m1 = _run(model, 1, tmp_path / "tp1.log", INDEPENDENT)
    tp2, usage, m2 = _run(model, 2, tmp_path / "tp2.log", INDEPENDENT, ["--distributed-executor-backend", "ray"])
    assert tp2 == tp1 and usage == 0
    assert _total(m2, "madakv:kv_pages_freed_total") == _total(m1, "madakv:kv_pages_freed_total") > 0
