"""The MADAKV attention backend on vLLM's CPU platform: Backend / MetadataBuilder / Impl.

A thin adapter: it runs vLLM's own CPU paged-attention kernels on a per-head
view of the KV buffer, one kernel sequence per (request, KV head), so each head
can hold its own token set, and delegates the choice of tokens to
madakv_vllm.policies through EvictionState.
"""

from __future__ import annotations

import json
import logging
import weakref
from dataclasses import dataclass

import torch
from vllm import _custom_ops as ops
from vllm import envs
from vllm.config import VllmConfig, get_current_vllm_config, get_layers_from_vllm_config
from vllm.model_executor.layers.attention import Attention
from vllm.model_executor.models.utils import extract_layer_index
from vllm.v1.attention.backend import AttentionType, CommonAttentionMetadata
from vllm.v1.attention.backends.cpu_attn import (
    CPUAttentionBackend,
    CPUAttentionBackendImpl,
    CPUAttentionMetadata,
    CPUAttentionMetadataBuilder,
)
from vllm.v1.kv_cache_interface import AttentionSpec, FullAttentionSpec

from madakv_vllm.integration import verify
from madakv_vllm.integration.eviction import EvictionState
from madakv_vllm.integration.kv_manager import MadaKVAttentionSpec
from madakv_vllm.integration.paged import FlatKVCache
from madakv_vllm.integration.plugin import server_config

logger = logging.getLogger("vllm.madakv")


# --- worker hook: which request is in which batch row ---------------------------

_RUNNER = None
# Server-wide config of the model built last in this process; customize_spec gets no config.
_CONFIG_JSON: str | None = None
_STATES: "weakref.WeakSet[EvictionState]" = weakref.WeakSet()


def _install_runner_hook() -> None:
    from vllm.v1.worker.gpu_model_runner import GPUModelRunner

    if getattr(GPUModelRunner, "_madakv_patched", False):
        return
    orig = GPUModelRunner._update_states

    def _update_states(self, scheduler_output):
        global _RUNNER
        _RUNNER = self
        gone = set(scheduler_output.finished_req_ids)
        gone |= set(scheduler_output.scheduled_cached_reqs.resumed_req_ids)
        gone |= set(getattr(scheduler_output, "preempted_req_ids", None) or ())
        if gone:
            for st in _STATES:
                st.drop(gone)
            if verify.ENABLED:
                verify.SHADOW.drop(gone)
        return orig(self, scheduler_output)

    GPUModelRunner._update_states = _update_states
    GPUModelRunner._madakv_patched = True


_install_runner_hook()


# --- backend --------------------------------------------------------------------


class MadaKVCPUBackend(CPUAttentionBackend):
    # We write K/V ourselves: slots are per (token, KV head) in the per-head view.
    forward_includes_kv_cache_update: bool = True

    @staticmethod
    def get_name() -> str:
        return "MADAKV"

    @staticmethod
    def get_impl_cls() -> type["MadaKVCPUImpl"]:
        return MadaKVCPUImpl

    @staticmethod
    def get_builder_cls() -> type["MadaKVCPUMetadataBuilder"]:
        return MadaKVCPUMetadataBuilder

    @classmethod
    def customize_spec(cls, spec: AttentionSpec) -> AttentionSpec:
        if type(spec) is not FullAttentionSpec:  # also called for page-size probes and other specs
            return spec
        if _CONFIG_JSON is None:
            raise RuntimeError("madakv: KV cache spec requested before the model was built")
        return MadaKVAttentionSpec.from_full(spec, _CONFIG_JSON)


@dataclass
class MadaKVMetadata(CPUAttentionMetadata):
    state: EvictionState | None = None
    flat_slots: list | None = None  # per layer: [H*T] slots, head-major
    ps_query_start_loc: torch.Tensor | None = None  # [H*R + 1]
    ps_seq_lens: list | None = None  # per layer: [H*R]
    ps_block_tables: list | None = None  # per layer: [H*R, max_blocks]
    ps_scheduler_metadata: list | None = None  # per layer
    query_rows: list | None = None  # (row, RequestKV, start, end) whose queries we keep
    events: list | None = None  # Event
    req_ids: list | None = None


class MadaKVCPUMetadataBuilder(CPUAttentionMetadataBuilder):
    def __init__(self, kv_cache_spec, layer_names, vllm_config: VllmConfig, device) -> None:
        super().__init__(kv_cache_spec, layer_names, vllm_config, device)
        if self.window_size != -1:
            raise ValueError("--attention-backend madakv does not support sliding-window attention layers")
        ordered = sorted(layer_names, key=extract_layer_index)
        self.state = EvictionState(
            server_config(vllm_config), ordered, self.num_kv_heads, self.num_heads, self.head_dim, self.block_size
        )
        _STATES.add(self.state)
        self._layers = ordered

    def _cache(self) -> FlatKVCache:
        st = self.state
        if st.cache is None:
            layers = get_layers_from_vllm_config(self.vllm_config, Attention, self._layers)
            caches = []
            for name in self._layers:
                kv = layers[name].kv_cache
                caches.append(kv[0] if isinstance(kv, (list, tuple)) else kv)
            st.cache = FlatKVCache(caches, self.isa, self.kv_cache_dtype)
        return st.cache

    def build(self, common_prefix_len: int, common_attn_metadata: CommonAttentionMetadata, fast_build: bool = False):
        base = super().build(common_prefix_len, common_attn_metadata, fast_build)
        cm = common_attn_metadata
        st, c = self.state, self._cache()
        R, T, H, L, bs = cm.num_reqs, cm.num_actual_tokens, self.num_kv_heads, st.num_layers, self.block_size
        qsl = cm.query_start_loc_cpu[: R + 1].to(torch.long)
        seq_lens = cm.seq_lens.cpu()[:R].to(torch.long)
        block_table = cm.block_table_tensor[:R].to(torch.long)
        slot_mapping = cm.slot_mapping[:T].to(torch.long)

        runner = _RUNNER
        req_ids = list(runner.input_batch.req_ids[:R]) if runner is not None else []
        real = len(req_ids) == R and all(r in runner.requests for r in req_ids)

        # Stock layout for every row: head h of page p is sub-block p*H + h.
        heads = torch.arange(H)
        page, off = slot_mapping // bs, slot_mapping % bs
        valid = slot_mapping >= 0
        flat_slots, tables, lens = [], [], []
        for l in range(L):
            s = c.subblock(l, page.unsqueeze(0), heads.unsqueeze(1)) * bs + off.unsqueeze(0)  # [H, T]
            flat_slots.append(torch.where(valid.unsqueeze(0), s, torch.full_like(s, -1)))
            tables.append(c.subblock(l, block_table.unsqueeze(0), heads.view(H, 1, 1)))  # [H, R, maxb]
            lens.append(seq_lens.unsqueeze(0).expand(H, R).clone())

        query_rows, events, compressed_rows = [], [], []
        if real:
            for i, rid in enumerate(req_ids):
                req_state = runner.requests[rid]
                rs = st.request(rid, req_state)
                length = int(seq_lens[i])
                block_ids = req_state.block_ids[0]
                ev = None
                if rs.compressed:
                    compressed_rows.append((i, rs, block_ids))
                else:
                    ev = st.plan_row(i, rs, length, block_ids)
                    if ev is not None:
                        events.append(ev)
                if rs.tracks_queries or ev is not None:
                    query_rows.append((i, rs, int(qsl[i]), int(qsl[i + 1])))

        # Compressed requests: their own per-(layer, head) tables and lengths.
        if compressed_rows:
            width = max([tables[0].shape[2]] + [int(rs.nsub.max()) + 1 for _, rs, _ in compressed_rows])
            tables = [torch.nn.functional.pad(t, (0, width - t.shape[2])) for t in tables]
            for i, rs, block_ids in compressed_rows:
                # Usually one decode token; a resumed request may replay several (causal, appended in order).
                t0, t1 = int(qsl[i]), int(qsl[i + 1])
                for t in range(t0, t1):
                    slots = st.append_slots(rs, block_ids, int(seq_lens[i]) - (t1 - t))  # [L, H]
                    for l in range(L):
                        flat_slots[l][:, t] = slots[l]
                for l in range(L):
                    n = int(rs.nsub.max())
                    tables[l][:, i, :n] = rs.sub[l, :, :n]
                    lens[l][:, i] = rs.lens[l]
                ev = st.plan_row(i, rs, int(seq_lens[i]), block_ids)
                if ev is not None:
                    events.append(ev)

        ps_qsl = torch.cat([qsl[:-1] + h * T for h in range(H)] + [torch.tensor([H * T])]).to(torch.int32)
        ps_lens = [x.reshape(-1).to(torch.int32) for x in lens]
        sched = []
        for l in range(L):
            if l > 0 and not compressed_rows:
                sched.append(sched[0])
                continue
            sched.append(
                ops.cpu_attn_get_scheduler_metadata(
                    num_reqs=H * R,
                    num_heads=self.num_heads // H,
                    num_kv_heads=1,
                    head_dim=self.head_dim,
                    seq_lens=ps_lens[l],
                    dtype=self.dtype,
                    query_start_loc=ps_qsl,
                    causal=base.causal,
                    sliding_window_size=-1,
                    isa=self.isa,
                    enable_kv_split=envs.VLLM_CPU_ATTN_SPLIT_KV,
                    dynamic_causal=None,
                    kv_cache_dtype=self.kv_cache_dtype,
                )
            )
        fields = {f: getattr(base, f) for f in base.__dataclass_fields__}
        return MadaKVMetadata(
            **fields,
            state=st,
            flat_slots=[s.reshape(-1) for s in flat_slots],
            ps_query_start_loc=ps_qsl,
            ps_seq_lens=ps_lens,
            ps_block_tables=[t.reshape(H * R, -1).to(torch.int32) for t in tables],
            ps_scheduler_metadata=sched,
            query_rows=query_rows,
            events=events,
            req_ids=req_ids if real else None,
        )


class MadaKVCPUImpl(CPUAttentionBackendImpl):
    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        global _CONFIG_JSON
        _CONFIG_JSON = server_config(get_current_vllm_config()).model_dump_json()
        if self.attn_type == AttentionType.DECODER:
            if self.sliding_window != -1 or self.sinks is not None or self.alibi_slopes is not None:
                raise ValueError("--attention-backend madakv supports plain causal attention layers only")
            if self.logits_soft_cap:
                raise ValueError("--attention-backend madakv does not support attention logit soft-capping")

    def do_kv_cache_update(self, layer, key, value, kv_cache, slot_mapping) -> None:
        if self.attn_type != AttentionType.DECODER:
            super().do_kv_cache_update(layer, key, value, kv_cache, slot_mapping)
        # DECODER: written in forward(), per head.

    def forward(self, layer, query, key, value, kv_cache, attn_metadata, output, output_scale=None, output_block_scale=None):
        if attn_metadata is None:
            return output
        if self.attn_type != AttentionType.DECODER or not isinstance(attn_metadata, MadaKVMetadata):
            if self.attn_type in (AttentionType.ENCODER_DECODER,):
                raise ValueError("--attention-backend madakv does not support encoder-decoder models")
            return super().forward(layer, query, key, value, kv_cache, attn_metadata, output, output_scale, output_block_scale)
        md = attn_metadata
        st = md.state
        c = st.cache
        l = st.layer_index[layer.layer_name]
        T = md.num_actual_tokens
        H, G, D = self.num_kv_heads, self.num_queries_per_kv, self.head_size

        if key is not None:
            k = key[:T].transpose(0, 1).reshape(H * T, 1, D)
            v = value[:T].transpose(0, 1).reshape(H * T, 1, D)
            ops.cpu_attn_reshape_and_cache(
                k, v, c.key, c.value, md.flat_slots[l], layer.isa,
                k_scale=layer._k_scale_float, v_scale=layer._v_scale_float, kv_cache_dtype=self.kv_cache_dtype,
            )
        q = query[:T].view(T, H, G, D).transpose(0, 1).reshape(H * T, G, D)
        out = torch.empty_like(q)
        ops.cpu_attention_with_kv_cache(
            query=q,
            key_cache=c.key,
            value_cache=c.value,
            output=out,
            query_start_loc=md.ps_query_start_loc,
            seq_lens=md.ps_seq_lens[l],
            scale=self.scale,
            causal=md.causal,
            alibi_slopes=None,
            sliding_window=-1,
            block_table=md.ps_block_tables[l],
            softcap=0,
            scheduler_metadata=md.ps_scheduler_metadata[l],
            s_aux=None,
            dynamic_causal=None,
            k_scale=layer._k_scale_float,
            v_scale=layer._v_scale_float,
            kv_cache_dtype=self.kv_cache_dtype,
        )
        output[:T].view(T, H, G, D).copy_(out.view(H, T, G, D).transpose(0, 1))
        if verify.ENABLED and key is not None:
            verify.SHADOW.record_and_check(md, l, query[:T], key[:T], value[:T], output[:T], self.scale)

        if md.query_rows:
            window = st.server_config.window
            for i, rs, start, end in md.query_rows:
                rs.push_queries(l, query[start:end], max(rs.cfg.window, window))
        for ev in md.events:
            st.select_layer(ev, l, layer)
        if md.events and l == st.num_layers - 1:
            for ev in md.events:
                st.compact(ev, layer)
        return output
