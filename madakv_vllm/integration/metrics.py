"""MadaKV's Prometheus metrics, counted in the processes that know them and shown on vLLM's
``/metrics``.

| metric | counted in | meaning |
|---|---|---|
| ``madakv:kv_pages_freed_total`` | engine core (scheduler) | KV pages eviction returned to vLLM's pool |
| ``madakv:requests_compressed_total{policy}`` | engine core | requests whose prompt was compressed |
| ``madakv:tokens_kept_total{modality,event}`` | every worker | KV entries kept, summed over layers and the rank's KV heads |
| ``madakv:tokens_evicted_total{modality,event}`` | every worker | KV entries evicted, likewise |
| ``madakv:compression_seconds{event}`` | every worker | time in selection and compaction, one observation per rank and event |

``event`` is ``chunk`` (after a prefill chunk, ``prefill_eviction: chunked``), ``prompt`` (the
prompt's compression) or ``recompress`` (during decoding). Under
tensor parallelism each rank counts its own KV heads, so the token totals cover all heads.

vLLM's ``/metrics`` shows only the API server's own metrics unless vLLM's multiprocess
Prometheus mode is on, which vLLM turns on only for ``--api-server-count`` above 1. When the MADAKV
backend is selected in the OpenAI server, :func:`export_from_engine_processes` turns it on at
startup, before vLLM creates its own metrics and starts the engine processes, which inherit it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import threading

from madakv_vllm.config import MODALITY_NAMES

_lock = threading.Lock()
_metrics: dict | None = None
_multiproc_dir: tempfile.TemporaryDirectory | None = None

BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
API_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"


def export_from_engine_processes() -> bool:
    """Turn on vLLM's multiprocess Prometheus mode in the OpenAI server (before the engine starts).
    Elsewhere (offline ``LLM``), or where vLLM or the user turned it on already, nothing changes.
    True when it was turned on here: the caller (patches.py) then points prometheus_client's
    metric values at the directory."""
    global _multiproc_dir
    if "PROMETHEUS_MULTIPROC_DIR" in os.environ or API_SERVER_MODULE not in sys.modules:
        return False
    # What vLLM's setup_multiprocess_prometheus does, but holding the directory here: at shutdown
    # vLLM 0.32 passes its TemporaryDirectory object where a path is expected and logs an ERROR.
    _multiproc_dir = tempfile.TemporaryDirectory(prefix="madakv-prometheus-")  # removed at exit
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _multiproc_dir.name
    return True


def _get() -> dict:
    """This process's metric objects, made at first use (after the mode above is settled)."""
    global _metrics
    with _lock:
        if _metrics is None:
            from prometheus_client import Counter, Histogram

            _metrics = {
                "pages_freed": Counter("madakv:kv_pages_freed", "KV pages that MadaKV eviction returned to vLLM's pool"),
                "requests": Counter("madakv:requests_compressed", "Requests whose prompt KV was compressed",
                                    ["policy"]),
                "kept": Counter("madakv:tokens_kept", "KV entries kept, summed over layers and KV heads",
                                ["modality", "event"]),
                "evicted": Counter("madakv:tokens_evicted", "KV entries evicted, summed over layers and KV heads",
                                   ["modality", "event"]),
                "seconds": Histogram("madakv:compression_seconds",
                                     "Time in MadaKV selection and compaction per compression event and rank",
                                     ["event"], buckets=BUCKETS),
            }
        return _metrics


def pages_freed(n: int) -> None:
    if n:
        _get()["pages_freed"].inc(n)


def request_compressed(policy: str) -> None:
    _get()["requests"].labels(policy=policy).inc()


def compression(event: str, kept_by_modality, before_by_modality, seconds: float) -> None:
    """``kept_by_modality`` / ``before_by_modality``: entries per modality (index into
    MODALITY_NAMES) after and before the event, summed over this rank's layers and heads."""
    m = _get()
    for i, name in enumerate(MODALITY_NAMES):
        before, kept = int(before_by_modality[i]), int(kept_by_modality[i])
        if before:
            m["kept"].labels(modality=name, event=event).inc(kept)
            m["evicted"].labels(modality=name, event=event).inc(before - kept)
    m["seconds"].labels(event=event).observe(seconds)
