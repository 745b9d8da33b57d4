"""The front end's multimodal sender cache (P0) must hold only what the engine core (P1) received:
a render whose request is cancelled while it runs is rolled back once it finishes."""

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace

import pytest

from madakv_vllm.integration import patches, rules


class SenderCache:
    """Stands in for vLLM's LRU sender cache: the set of image hashes P0 believes P1 holds."""

    def __init__(self) -> None:
        self.keys: set[str] = set()

    def invalidate(self, mm_hash: str) -> None:
        self.keys.discard(mm_hash)


def _renderer():
    return SimpleNamespace(config=SimpleNamespace(attention_config=SimpleNamespace(backend=SimpleNamespace(
        name=rules.BACKEND_NAME))), mm_processor_cache=SenderCache(), _mm_executor=ThreadPoolExecutor(max_workers=1))


def _render_on_the_mm_thread(renderer, release: threading.Event, rendered: threading.Event | None = None):
    """vLLM's ``_process_tokens_async``: the render runs on the renderer's one multimodal thread,
    notes the new image in the sender cache, and returns the input with the image's data."""
    async def process_tokens_async(self, prompt, *, skip_mm_cache=False):
        def render():
            release.wait(10)
            self.mm_processor_cache.keys.add("new-image")
            if rendered is not None:
                rendered.set()
            return {"type": "multimodal", "mm_kwargs": {"image": [b"pixels"]}, "mm_hashes": {"image": ["new-image"]}}

        return await asyncio.get_running_loop().run_in_executor(self._mm_executor, render)

    return patches._process_tokens_async(process_tokens_async)


def test_a_render_cancelled_while_it_runs_is_rolled_back_when_it_finishes():
    renderer, release, rendered = _renderer(), threading.Event(), threading.Event()
    wrapped = _render_on_the_mm_thread(renderer, release, rendered)

    async def client_goes_away():
        task = asyncio.create_task(wrapped(renderer, {"prompt_token_ids": [1]}))
        await asyncio.sleep(0.05)  # the render is running on the multimodal thread
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        release.set()  # the thread goes on and notes the image
        for _ in range(100):  # the rollback is queued on the same thread, behind the render
            await asyncio.sleep(0.02)
            if rendered.is_set() and "new-image" not in renderer.mm_processor_cache.keys:
                break

    asyncio.run(client_goes_away())
    assert rendered.is_set() and renderer.mm_processor_cache.keys == set()


def test_a_render_whose_request_goes_on_keeps_its_entry():
    renderer, release = _renderer(), threading.Event()
    release.set()
    engine_input = asyncio.run(_render_on_the_mm_thread(renderer, release)(renderer, {"prompt_token_ids": [1]}))
    assert engine_input["mm_hashes"] == {"image": ["new-image"]}
    assert renderer.mm_processor_cache.keys == {"new-image"}
