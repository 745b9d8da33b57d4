"""Keeps vLLM's mirrored multimodal caches in step when a request is rejected (vLLM 0.32).

The front end's renderer (P0) notes each new image in its sender cache while it processes it,
before the request's parameters are validated; the engine core (P1) stores the image when the
request arrives. A request rejected in between (HTTP 400: a bad ``madakv_budget``,
``max_tokens: -1``, ``temperature: -5``) leaves P0 believing that P1 holds the image. The next
request with that image is then sent as a bare reference, P1 misses it ("P0/P1 cache drift") and
the client gets HTTP 500. Stock vLLM 0.32 does the same. The upstream fix, rolling back the
rejected request's new sender entries (vllm-project/vllm pull request 51897), was closed unmerged,
so the plugin does it while the MADAKV backend is selected (the wrappers are in patches.py):

* the renderer's ``_process_tokens`` notes the sender entries a rendered input added: the items
  whose data it still carries (P0 strips the data of items it believes P1 holds);
* ``InputProcessor.process_inputs`` submits them when it builds the engine request (which goes to
  P1, and P1 stores the data), and rolls them back when it raises;
* a request scope (one HTTP request; one offline ``LLM`` call) rolls back what it rendered and
  never submitted: before an error response starts, and when the scope ends;
* a render whose request is cancelled while it runs (the client disconnected; the renderer's
  thread goes on) is rolled back when it finishes (``roll_back_finished``). Without this the
  soak's client aborts left an image in P0's cache only, now and then, and the next request with
  it got HTTP 500.

A rollback removes only entries the rejected request added, so P0's keys again equal P1's. It runs
on the renderer's multimodal thread, the one that updates the cache. (The rejected request also
moved the items it shared with earlier requests to the front of P0's LRU order, which P1 never
sees; under cache pressure that can still evict in a different order, which vLLM answers with a
retryable miss, as stock.)
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from dataclasses import dataclass, field

logger = logging.getLogger("vllm.madakv")


def added_entries(engine_input) -> list[str]:
    """Hashes of the sender-cache entries that rendering ``engine_input`` added: its multimodal
    items that still carry data (P0 strips the data of every item already in its cache)."""
    if not isinstance(engine_input, dict) or engine_input.get("type") != "multimodal":
        return []
    kwargs, hashes = engine_input["mm_kwargs"], engine_input["mm_hashes"]
    return [h for modality, hs in hashes.items() for i, h in enumerate(hs) if kwargs[modality][i] is not None]


def _rolls_back(cache) -> bool:
    """Only a sender cache that mirrors P1 (the LRU one) can drift; it overrides ``invalidate``."""
    from vllm.multimodal.cache.base import BaseMultiModalProcessorCache

    return cache is not None and type(cache).invalidate is not BaseMultiModalProcessorCache.invalidate


@dataclass
class _Rendered:
    renderer: object
    engine_input: dict  # held, so that its id stays unique while it is pending
    hashes: list[str]


@dataclass
class RequestScope:
    """The rendered inputs of one request (or offline call) whose new sender-cache entries P1 has
    not received yet, by ``id(engine_input)``."""

    pending: dict[int, _Rendered] = field(default_factory=dict)

    def note(self, renderer, engine_input, skip_mm_cache: bool) -> None:
        cache = renderer.mm_processor_cache
        if skip_mm_cache or not _rolls_back(cache):
            return  # rendered without the mirrored cache: nothing to undo
        hashes = added_entries(engine_input)
        if hashes:
            self.pending[id(engine_input)] = _Rendered(renderer, engine_input, hashes)

    def submit(self, keys) -> None:
        for key in keys:
            self.pending.pop(key, None)

    def roll_back(self, keys=None) -> int:
        """Remove the pending entries (all, or those of ``keys``) from their sender caches."""
        keys = list(self.pending) if keys is None else [k for k in keys if k in self.pending]
        by_renderer: dict[int, tuple[object, list[str]]] = {}
        for key in keys:
            rendered = self.pending.pop(key)
            by_renderer.setdefault(id(rendered.renderer), (rendered.renderer, []))[1].extend(rendered.hashes)
        for renderer, hashes in by_renderer.values():
            _invalidate(renderer, hashes)
        return sum(len(h) for _, h in by_renderer.values())


def roll_back_finished(renderer, render, skip_mm_cache: bool) -> None:
    """Done-callback of a render whose request was cancelled while it ran (the renderer's thread
    cannot be stopped): remove the sender-cache entries it added, which P1 will never receive."""
    if render.cancelled() or render.exception() is not None or skip_mm_cache:
        return
    if _rolls_back(renderer.mm_processor_cache):
        hashes = added_entries(render.result())
        if hashes:
            _invalidate(renderer, hashes)


def _invalidate(renderer, hashes: list[str]) -> None:
    cache = renderer.mm_processor_cache

    def drop() -> None:
        for h in hashes:
            cache.invalidate(h)
        logger.debug("madakv: rolled back %d multimodal sender-cache entries of a rejected request", len(hashes))

    # The renderer's one multimodal thread updates the cache: queue behind it, so a later
    # request's processing (queued after this) finds the entries gone. Off an event loop
    # (offline), rendering runs in the caller's thread: wait.
    done = renderer._mm_executor.submit(drop)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        done.result()


_current: contextvars.ContextVar[RequestScope | None] = contextvars.ContextVar("madakv_mm_scope", default=None)


def current() -> RequestScope | None:
    return _current.get()


@contextlib.contextmanager
def request_scope():
    """The current scope, or a new one that rolls back whatever is still pending when it ends."""
    scope = _current.get()
    if scope is not None:
        yield scope
        return
    scope = RequestScope()
    token = _current.set(scope)
    try:
        yield scope
    finally:
        _current.reset(token)
        scope.roll_back()


class RejectedRequestRollback:
    """ASGI middleware: one request scope per HTTP request, rolled back before an error response
    starts (the client may send its next request as soon as it reads the status)."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        with request_scope() as pending:
            async def send_after_rollback(message) -> None:
                if message["type"] == "http.response.start" and message["status"] >= 400:
                    pending.roll_back()
                await send(message)

            await self.app(scope, receive, send_after_rollback)
