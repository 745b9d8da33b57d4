"""Shared fixtures: tiny local models (built once per session) and in-process vLLM engines
(one per configuration, shared across tests; ~4 s each to load)."""

import os

# Before vllm is imported anywhere: in-process engine core, small fixed KV pool.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

_ENGINES: dict = {}


def load_script(name: str):
    """scripts/<name>.py as a module (scripts are not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory):
    from madakv_eval.tiny_models import build_model

    root = tmp_path_factory.mktemp("models")
    built: dict[str, Path] = {}

    def get(kind: str) -> Path:
        if kind not in built:
            built[kind] = build_model(kind, root / f"tiny-{kind}", seed=0)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def engine(model_dir):
    """engine(kind, madakv: dict | None, **llm_kwargs) -> LLM, cached per arguments."""

    def get(kind: str, madakv: dict | None = None, **kw):
        key = (kind, repr(sorted((madakv or {}).items())) if madakv is not None else None, repr(sorted(kw.items())))
        if key not in _ENGINES:
            from vllm import LLM

            args = dict(
                model=str(model_dir(kind)),
                enforce_eager=True,
                max_model_len=8192,
                block_size=32,
                dtype="float32",
                seed=0,
                max_num_batched_tokens=512,
                limit_mm_per_prompt={"image": 8},
            )
            if kind in ("llama", "qwen2"):
                args.pop("limit_mm_per_prompt")
            if madakv is not None:
                args.update(attention_backend="madakv", additional_config={"madakv": madakv})
            args.update(kw)
            _ENGINES[key] = LLM(**args)
        return _ENGINES[key]

    yield get
    _ENGINES.clear()


def ensure_expert_parallel_group() -> None:
    """In-process engines share the process's distributed groups, made by its first engine; vLLM
    makes the expert-parallel group only when that first model is MoE, so an MoE model built after
    a dense one finds none. Make it as vLLM would for one rank (a no-op once it exists)."""
    import torch.distributed as dist
    from vllm.distributed import parallel_state as ps

    if ps.model_parallel_is_initialized() and ps._EP is None:
        world = ps.get_world_group()
        ps._EP = ps.init_model_parallel_group([[world.rank]], world.local_rank,
                                              dist.get_backend(world.device_group), group_name="ep")


def close_engine(llm) -> None:
    """Shut an in-process engine down now, without vLLM's process-wide teardown:
    ``EngineCore.shutdown`` also destroys the distributed groups that every other in-process
    engine of this session (the cached ones above) goes on using, and a finalizer run later (a
    failed test's traceback holds the engine) would do the same under whatever engine runs then."""
    import gc

    client = llm.llm_engine.engine_core
    client._finalizer.detach()
    core = client.engine_core
    core.model_executor.shutdown()
    core.scheduler.shutdown()
    gc.unfreeze()  # what EngineCore.__init__ froze: the engine's objects become collectable


def run_requests(llm, reqs: dict, on_step=None, max_steps: int = 10_000) -> dict:
    """reqs: {name: (prompt, params)} added at once; steps an in-process engine to the end, calling
    ``on_step(step)`` after every step; returns {name: RequestOutput} of the finished ones."""
    for name, (prompt, params) in reqs.items():
        llm.llm_engine.add_request(name, prompt, params)
    outs, step = {}, 0
    while llm.llm_engine.has_unfinished_requests():
        for o in llm.llm_engine.step():
            if o.finished:
                outs[o.request_id] = o
        step += 1
        if on_step:
            on_step(step)
        assert step < max_steps
    return outs


def preempt(llm, request) -> None:
    """Preempt a running request between two steps of an in-process engine, as vLLM's scheduler
    does when its pool runs out (``Scheduler.reset_prefix_cache(reset_running_requests=True)`` does
    the same for every running request)."""
    import time

    sched = llm.llm_engine.engine_core.engine_core.scheduler
    sched.running.remove(request)
    sched._preempt_request(request, time.monotonic())
    sched.prev_step_scheduled_req_ids.discard(request.request_id)


def assert_same_tokens(got, expected, dtype: str) -> None:
    """Greedy tokens equal, but for a first difference where ``expected``'s two best tokens tie
    within the dtype's rounding (bf16 recomputes a prompt in other chunks to other last bits:
    stock vLLM's own preempted bf16 requests differ there), ``got`` taking the other one."""
    tie = 1e-3 if dtype == "float32" else 3e-2
    for i, (x, y) in enumerate(zip(got.token_ids, expected.token_ids)):
        if x != y:
            best = sorted(expected.logprobs[i].items(), key=lambda kv: -kv[1].logprob)[:2]
            assert len(best) == 2 and x in dict(best) and best[0][1].logprob - best[1][1].logprob < tie, \
                (i, x, y, best)
            return
    assert len(got.token_ids) == len(expected.token_ids)


from madakv_eval.prompts import IMAGE_PROMPT, IMAGE_TOKEN, make_image, mm_prompt, words  # noqa: E402,F401
