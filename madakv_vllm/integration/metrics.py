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

How the counts reach ``/metrics``, which the API server serves from its own process: vLLM's own
metrics stay as stock (single-process Prometheus registry: every ``vllm:*`` gauge at 0 from
startup, ``process_*`` / ``python_*`` collectors, ``_created`` samples). When the MADAKV backend
is selected in the OpenAI server, :func:`export_from_engine_processes` (before the engine
processes start) makes a private directory and names it in ``MADAKV_METRICS_DIR``, which the engine
core and the workers inherit; each of those processes writes its madakv counts into its own
file there, in prometheus_client's multiprocess file format (``counter_<pid>.db``,
``histogram_<pid>.db``), and a collector on the API server's default registry merges the files
at every scrape (prometheus_client's ``MultiProcessCollector.merge``). Only madakv's metrics go
through the directory; vLLM's multiprocess mode (``PROMETHEUS_MULTIPROC_DIR``) stays off.

Where vLLM's multiprocess mode is on anyway (``--api-server-count`` above 1, or the variable set
by the user), and where no OpenAI server runs (offline ``LLM``, a headless node), the metrics are
ordinary ``prometheus_client`` objects in the process that counts, as vLLM's own are.
"""

from __future__ import annotations

import atexit
import glob
import os
import shutil
import sys
import tempfile
import threading

from madakv_vllm.config import MODALITY_NAMES

#: The directory the engine processes write their madakv counts to (set by the API server).
ENV_DIR = "MADAKV_METRICS_DIR"
API_SERVER_MODULE = "vllm.entrypoints.launchers.api_server.entry"
BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)

#: (name, type, help, label names) of every madakv metric.
FAMILIES = (
    ("madakv:kv_pages_freed", "counter", "KV pages that MadaKV eviction returned to vLLM's pool", ()),
    ("madakv:requests_compressed", "counter", "Requests whose prompt KV was compressed", ("policy",)),
    ("madakv:tokens_kept", "counter", "KV entries kept, summed over layers and KV heads", ("modality", "event")),
    ("madakv:tokens_evicted", "counter", "KV entries evicted, summed over layers and KV heads",
     ("modality", "event")),
    ("madakv:compression_seconds", "histogram",
     "Time in MadaKV selection and compaction per compression event and rank", ("event",)),
)
_SPEC = {name: (typ, doc, labels) for name, typ, doc, labels in FAMILIES}

_lock = threading.Lock()
_sink = None  # this process's _FileSink or _PromSink, made at first use


def export_from_engine_processes() -> None:
    """In the OpenAI server (before the engine starts): a directory for the engine processes'
    counts and a collector that shows them on ``/metrics``. Elsewhere (offline ``LLM``, an engine
    process, vLLM's multiprocess mode already on) nothing changes."""
    if ENV_DIR in os.environ or "PROMETHEUS_MULTIPROC_DIR" in os.environ or API_SERVER_MODULE not in sys.modules:
        return
    from prometheus_client import REGISTRY

    path = tempfile.mkdtemp(prefix="madakv-metrics-")
    owner = os.getpid()
    atexit.register(lambda: os.getpid() == owner and shutil.rmtree(path, ignore_errors=True))
    os.environ[ENV_DIR] = path
    REGISTRY.register(FileCollector(path))


class FileCollector:
    """The madakv families merged from every process's files in ``path``; a family nothing wrote
    yet is shown as prometheus_client shows an unused metric (labelled: no samples; unlabelled
    counter: 0)."""

    def __init__(self, path: str):
        self.path = path

    def collect(self):
        from prometheus_client.metrics_core import Metric
        from prometheus_client.multiprocess import MultiProcessCollector

        merged = {m.name: m for m in MultiProcessCollector.merge(glob.glob(os.path.join(self.path, "*.db")))}
        for name, typ, doc, labels in FAMILIES:
            family = merged.get(name)
            if family is None:
                family = Metric(name, doc, typ)
                if typ == "counter" and not labels:
                    family.add_sample(name + "_total", {}, 0.0)
            yield family


class _FileSink:
    """This process's counts in ``<dir>/counter_<pid>.db`` and ``<dir>/histogram_<pid>.db``, in
    prometheus_client's multiprocess format (what its ``MmapedValue`` writes)."""

    def __init__(self, path: str):
        from prometheus_client.mmap_dict import MmapedDict

        self.pid = os.getpid()
        self.files = {typ: MmapedDict(os.path.join(path, f"{typ}_{self.pid}.db")) for typ in ("counter", "histogram")}
        self.values: dict[str, float] = {}

    def _add(self, name: str, sample: str, labels: dict, amount: float) -> None:
        from prometheus_client.mmap_dict import mmap_key

        typ, doc, _ = _SPEC[name]
        key = mmap_key(name, sample, list(labels), list(labels.values()), doc)
        value = self.values[key] = self.values.get(key, 0.0) + amount
        self.files[typ].write_value(key, value, 0.0)

    def inc(self, name: str, labels: dict, amount: float) -> None:
        self._add(name, name + "_total", labels, amount)

    def observe(self, name: str, labels: dict, value: float) -> None:
        from prometheus_client.utils import floatToGoString

        bound = next(b for b in (*BUCKETS, float("inf")) if value <= b)
        for b in (*BUCKETS, float("inf")):  # every bucket, as a histogram's child writes them all
            self._add(name, name + "_bucket", {**labels, "le": floatToGoString(b)}, float(b == bound))
        self._add(name, name + "_sum", labels, value)


class _PromSink:
    """Ordinary prometheus_client metrics in this process's default registry."""

    def __init__(self):
        from prometheus_client import Counter, Histogram

        self.metrics = {
            name: (Counter(name, doc, list(labels)) if typ == "counter"
                   else Histogram(name, doc, list(labels), buckets=BUCKETS))
            for name, typ, doc, labels in FAMILIES
        }

    def _child(self, name: str, labels: dict):
        m = self.metrics[name]
        return m.labels(**labels) if labels else m

    def inc(self, name: str, labels: dict, amount: float) -> None:
        self._child(name, labels).inc(amount)

    def observe(self, name: str, labels: dict, value: float) -> None:
        self._child(name, labels).observe(value)


def _get():
    """This process's sink (the file sink where the API server named a directory; a forked child
    gets its own file)."""
    global _sink
    path = os.environ.get(ENV_DIR)
    use_files = bool(path) and os.path.isdir(path) and "PROMETHEUS_MULTIPROC_DIR" not in os.environ
    if _sink is None or (isinstance(_sink, _FileSink) and _sink.pid != os.getpid()):
        _sink = _FileSink(path) if use_files else (_sink if isinstance(_sink, _PromSink) else _PromSink())
    return _sink


def pages_freed(n: int) -> None:
    if n:
        with _lock:
            _get().inc("madakv:kv_pages_freed", {}, n)


def request_compressed(policy: str) -> None:
    with _lock:
        _get().inc("madakv:requests_compressed", {"policy": policy}, 1)


def compression(event: str, kept_by_modality, before_by_modality, seconds: float) -> None:
    """``kept_by_modality`` / ``before_by_modality``: entries per modality (index into
    MODALITY_NAMES) after and before the event, summed over this rank's layers and heads."""
    with _lock:
        sink = _get()
        for i, name in enumerate(MODALITY_NAMES):
            before, kept = int(before_by_modality[i]), int(kept_by_modality[i])
            if before:
                sink.inc("madakv:tokens_kept", {"modality": name, "event": event}, kept)
                sink.inc("madakv:tokens_evicted", {"modality": name, "event": event}, before - kept)
        sink.observe("madakv:compression_seconds", {"event": event}, seconds)
