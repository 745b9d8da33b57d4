"""Device-independent half of the MADAKV backends.

Turns vLLM's per-request batch (CommonAttentionMetadata) into one kernel sequence
per (request, KV head) over the per-head view of the KV buffer, and runs the
eviction hooks after each layer's attention. The CPU and CUDA backends differ
only in the kernels they call.
"""

from __future__ import annotations

import contextlib
import weakref
from dataclasses import dataclass

import torch

from madakv_vllm.integration import verify
from madakv_vllm.integration.eviction import WorkerKV
from madakv_vllm.integration.kv_manager import MadaKVAttentionSpec
from madakv_vllm.integration.rules import no_full_attention_layer, selected_in, server_config

# --- worker hook: which request is in which batch row ---------------------------
#
# Fail closed: the scheduler frees a compressed request's pages without asking the workers, so
# a worker must never run our attention backend under a model runner whose batches it cannot map
# to requests (it would never compact, and the block table would point at freed pages). Only
# vLLM's V1 runner (``vllm.v1.worker.gpu_model_runner.GPUModelRunner``, which the CPU runner
# subclasses) is hooked (patches.py); vLLM is steered away from Model Runner V2 when madakv is
# selected, and a metadata builder that is not built by a hooked runner refuses to start.

# Server-wide config (JSON) and the scheduler's token budget per step, of the model built last in
# this process; customize_spec gets no config.
_SPEC_FIELDS: tuple[str, int] | None = None
STATES: "weakref.WeakSet[WorkerKV]" = weakref.WeakSet()
# (the hooked runner initializing its KV cache right now, the builders it has built so far)
_BUILDING_RUNNER: tuple | None = None

RUNNER_NOT_HOOKED = (
    "madakv: the attention backend is being built by a model runner madakv-vllm does not hook ({}); "
    "refusing to start, since the scheduler would free KV pages the worker never compacts. "
    "madakv needs vLLM's V1 model runner (GPUModelRunner in vllm.v1.worker.gpu_model_runner): "
    "unset VLLM_USE_V2_MODEL_RUNNER and features that require Model Runner V2"
)


def remember_engine_config(vllm_config) -> None:
    """Called as each attention layer is built (vLLM's current config is set then)."""
    global _SPEC_FIELDS
    _SPEC_FIELDS = (server_config(vllm_config).model_dump_json(), vllm_config.scheduler_config.max_num_batched_tokens)


def customize_spec(spec):
    from vllm.v1.kv_cache_interface import FullAttentionSpec

    if type(spec) is not FullAttentionSpec:  # also called for page-size probes and other specs
        return spec
    if _SPEC_FIELDS is None:
        raise RuntimeError("madakv: KV cache spec requested before the model was built")
    return MadaKVAttentionSpec.from_full(spec, *_SPEC_FIELDS)


def hooked_runner(builder):
    """The V1 model runner building ``builder`` (one of our metadata builders); raises if there is
    none. The builder's ``bind_kv_cache()`` runs once the runner has allocated the KV cache."""
    if _BUILDING_RUNNER is None:
        raise RuntimeError(RUNNER_NOT_HOOKED.format(
            f"{type(builder).__name__} built outside GPUModelRunner.initialize_kv_cache"))
    runner, built = _BUILDING_RUNNER
    built.append(builder)
    return runner


def drop_requests(req_ids) -> None:
    """Forget finished, preempted and resumed requests (patches: GPUModelRunner._update_states)."""
    for st in STATES:
        st.drop(req_ids)
    if verify.ENABLED:
        verify.SHADOW.drop(req_ids)


@contextlib.contextmanager
def initializing_kv_cache(runner):
    """While the hooked V1 runner builds its attention metadata builders and allocates the KV
    cache (patches: GPUModelRunner.initialize_kv_cache); then our builders bind their per-head
    views of it, so a cache they cannot view stops startup rather than the first request."""
    global _BUILDING_RUNNER
    built: list = []
    _BUILDING_RUNNER = (runner, built)
    try:
        yield
    finally:
        _BUILDING_RUNNER = None
    if not built and selected_in(runner.vllm_config):
        raise no_full_attention_layer(runner.model_config)  # every layer went to stock's backends
    for builder in built:
        builder.state.group_id = kv_cache_group_of(runner, builder.state.layer_names)
        builder.bind_kv_cache()


def kv_cache_group_of(runner, layer_names: list[str]) -> int:
    """Index of the KV cache group holding ``layer_names`` in the runner's KV cache config: a
    request's block ids on the workers are per group (``CachedRequestState.block_ids[group]``)."""
    groups = runner.kv_cache_config.kv_cache_groups
    found = [i for i, g in enumerate(groups) if set(layer_names) <= set(g.layer_names)]
    if len(found) != 1:
        raise RuntimeError(f"madakv: layers {layer_names} are not one KV cache group of {groups}")
    return found[0]


# --- one step's batch, per (request, KV head) --------------------------------------


@dataclass
class PerHeadBatch:
    state: WorkerKV
    num_tokens: int
    query_start_loc: torch.Tensor  # [R + 1] per request (cpu, int64)
    seq_lens: torch.Tensor  # [R] (cpu, int64)
    block_table: torch.Tensor  # [R, max_blocks] vLLM's pages per request (cpu, int64)
    flat_slots: list  # per layer: [H*T] write slots, head-major (-1: skip)
    ps_query_start_loc: torch.Tensor  # [H*R + 1] int32, sequence (h, r) at h*R + r
    ps_seq_lens: list  # per layer: [H*R] int32
    ps_block_tables: list  # per layer: [H*R, max_blocks] int32
    has_compressed: bool
    query_rows: list  # (row, RequestKV, start, end) whose queries are kept
    events: list  # eviction.Event
    req_ids: list | None  # None for dummy/profiling batches
    runner: object = None  # the hooked V1 model runner (its requests' token ids: verify.py); None for dummy batches


def build_batch(state: WorkerKV, cm, block_size: int, runner) -> PerHeadBatch:
    """``runner``: the hooked V1 model runner whose ``input_batch`` holds this step's requests."""
    c = state.cache
    R, T, H, L, bs = cm.num_reqs, cm.num_actual_tokens, state.H, state.num_layers, block_size
    qsl = cm.query_start_loc_cpu[: R + 1].to(torch.long)
    seq_lens = cm.seq_lens.cpu()[:R].to(torch.long)
    block_table = cm.block_table_tensor[:R].cpu().to(torch.long)
    slot_mapping = cm.slot_mapping[:T].cpu().to(torch.long)

    # Dummy and profiling batches carry no request of the runner's.
    req_ids = list(runner.input_batch.req_ids[:R])
    real = len(req_ids) == R and all(r in runner.requests for r in req_ids)

    # Stock layout for every row: head h of page p is sub-block p*H + h. Tensors are [L, H, ...]
    # so a compressed request is written with one assignment, whatever the number of layers.
    layers = torch.tensor([c.layer_slot[l] for l in range(L)]).view(L, 1, 1)
    heads = torch.arange(H).view(1, H, 1)
    page, off = slot_mapping // bs, slot_mapping % bs
    flat_slots = ((layers * c.num_blocks + page.view(1, 1, T)) * H + heads) * bs + off.view(1, 1, T)
    flat_slots = torch.where((slot_mapping >= 0).view(1, 1, T), flat_slots, torch.full_like(flat_slots, -1))
    tables = (layers.unsqueeze(-1) * c.num_blocks + block_table.view(1, 1, R, -1)) * H + heads.unsqueeze(-1)
    lens = seq_lens.view(1, 1, R).expand(L, H, R).clone()

    query_rows, events, compressed_rows = [], [], []
    if real:
        for i, rid in enumerate(req_ids):
            req_state = runner.requests[rid]
            rs = state.request(rid, req_state)
            block_ids = req_state.block_ids[state.group_id]
            ev = None
            if rs.is_compressed:
                compressed_rows.append((i, rs, block_ids))
            else:
                ev = state.plan_row(rs, int(seq_lens[i]), block_ids)
                if ev is not None:
                    events.append(ev)
            if rs.tracks_queries or ev is not None:
                query_rows.append((i, rs, int(qsl[i]), int(qsl[i + 1])))

    # Compressed requests: their own per-(layer, head) tables and lengths.
    if compressed_rows:
        width = max([tables.shape[3]] + [int(rs.used_subblocks(bs).max()) + 1 for _, rs, _ in compressed_rows])
        tables = torch.nn.functional.pad(tables, (0, width - tables.shape[3]))
        for i, rs, block_ids in compressed_rows:
            # One decode token, or a prefill chunk after a compression during prefill (chunked mode).
            t0, t1 = int(qsl[i]), int(qsl[i + 1])
            flat_slots[:, :, t0:t1] = state.append_slots(rs, block_ids, int(seq_lens[i]) - (t1 - t0), t1 - t0)
            n = int(rs.used_subblocks(bs).max())
            tables[:, :, i, :n] = rs.subblocks[:, :, :n]
            lens[:, :, i] = rs.lens
            ev = state.plan_row(rs, int(seq_lens[i]), block_ids)
            if ev is not None:
                events.append(ev)

    return PerHeadBatch(
        state=state,
        num_tokens=T,
        query_start_loc=qsl,
        seq_lens=seq_lens,
        block_table=block_table,
        flat_slots=list(flat_slots.reshape(L, H * T)),
        ps_query_start_loc=torch.cat([qsl[:-1] + h * T for h in range(H)] + [torch.tensor([H * T])]).to(torch.int32),
        ps_seq_lens=list(lens.reshape(L, H * R).to(torch.int32)),
        ps_block_tables=list(tables.reshape(L, H * R, -1).to(torch.int32)),
        has_compressed=bool(compressed_rows),
        query_rows=query_rows,
        events=events,
        req_ids=req_ids if real else None,
        runner=runner if real else None,
    )


def to_heads(x: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """[T, H*G, D] -> [H*T, G, D]: rows of sequence (h, r) contiguous, h-major."""
    t, hq, d = x.shape
    return x.view(t, num_kv_heads, hq // num_kv_heads, d).transpose(0, 1).reshape(num_kv_heads * t, -1, d)


def from_heads(out: torch.Tensor, dst: torch.Tensor, num_kv_heads: int) -> None:
    """Inverse of to_heads, written into dst [T, H*G, D]."""
    t = dst.shape[0]
    dst.view(t, num_kv_heads, -1, dst.shape[-1]).copy_(out.view(num_kv_heads, t, -1, out.shape[-1]).transpose(0, 1))


def after_attention(batch: PerHeadBatch, layer_idx: int, layer, query, key, value, output, scale: float) -> None:
    """Eviction hooks of one layer, right after its attention (query/key/value/output: [T, heads, D])."""
    st = batch.state
    if verify.ENABLED and key is not None:
        verify.SHADOW.record_and_check(batch, layer_idx, query, key, value, output, scale)
    for i, rs, start, end in batch.query_rows:
        rs.push_queries(layer_idx, query[start:end], rs.cfg.window)
    for ev in batch.events:
        st.select_layer(ev, layer_idx)
    if batch.events and layer_idx == st.num_layers - 1:
        for ev in batch.events:  # all layers have run: pack every layer's retained KV
            st.compact(ev)
