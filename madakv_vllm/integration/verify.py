"""Self-check of the paged path (enabled by ``MADAKV_VERIFY=1``; tests only, slow).

Keeps a dense shadow copy of every K/V the model produced, per request and
layer, independent of the paged cache. After each layer's kernel call it
recomputes, in plain fp32 torch, attention of every query over exactly the
tokens its (layer, KV head) retains (all tokens for uncompressed requests,
``entry_position`` for compressed ones) and records the largest difference.
A request that starts with a prefix-cache hit takes its prefix from the shared pages.
"""

from __future__ import annotations

import os

import torch

ENABLED = os.environ.get("MADAKV_VERIFY", "0") == "1"


class Shadow:
    def __init__(self):
        self.kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.max_err = 0.0
        self.checked = 0  # (query token, query head) pairs compared
        self.compressed_checked = 0
        self.chunk_checked = 0  # of those, queries of a prefill chunk over a compressed request

    def drop(self, req_ids) -> None:
        for key in [k for k in self.kv if k[0] in req_ids]:
            del self.kv[key]

    def record_and_check(self, batch, layer: int, query, key, value, output, scale: float) -> None:
        """batch: per_head.PerHeadBatch; query/key/value/output: [T, heads, D] of this layer."""
        st = batch.state
        seq_lens = batch.seq_lens
        for i, rid in enumerate(batch.req_ids or []):
            start, end = int(batch.query_start_loc[i]), int(batch.query_start_loc[i + 1])
            n_q = end - start
            length = int(seq_lens[i])
            first = length - n_q
            k_sh, v_sh = self.kv.get((rid, layer), (None, None))
            H, D = key.shape[1], key.shape[2]
            if k_sh is None or k_sh.shape[1] < length:
                cap = max(length, 2 * (0 if k_sh is None else k_sh.shape[1]))
                nk, nv = torch.zeros(H, cap, D), torch.zeros(H, cap, D)
                if k_sh is not None:
                    nk[:, : k_sh.shape[1]], nv[:, : v_sh.shape[1]] = k_sh, v_sh
                elif first > 0:  # a prefix-cache hit: another request computed (and was checked on) these
                    pk, pv = st.read_stock(layer, batch.block_table[i].tolist(), first)
                    nk[:, :first], nv[:, :first] = pk.float(), pv.float()
                k_sh, v_sh = nk, nv
            k_sh[:, first:length] = key[start:end].transpose(0, 1).float()
            v_sh[:, first:length] = value[start:end].transpose(0, 1).float()
            self.kv[(rid, layer)] = (k_sh, v_sh)
            rs = st.requests.get(rid)
            compressed = rs is not None and rs.is_compressed and rs.lens is not None
            Hq = query.shape[1]
            G = Hq // H
            qpos = torch.arange(first, length)  # logical positions of this step's queries
            for h in range(H):
                if compressed:
                    pos = rs.entry_position[layer, h, : int(rs.lens[layer, h])].long()
                else:
                    pos = torch.arange(length)
                kk, vv = k_sh[h, pos], v_sh[h, pos]  # [n, D]
                q = query[start:end, h * G : (h + 1) * G].float()  # [n_q, G, D]
                scores = torch.einsum("qgd,nd->qgn", q, kk) * scale
                scores = scores.masked_fill((pos.view(1, 1, -1) > qpos.view(-1, 1, 1)), float("-inf"))
                ref = torch.einsum("qgn,nd->qgd", torch.softmax(scores, dim=-1), vv)
                got = output[start:end, h * G : (h + 1) * G].float()
                self.max_err = max(self.max_err, float((ref - got).abs().max()))
                self.checked += n_q * G
                if compressed:
                    self.compressed_checked += n_q * G
                    if n_q > 1:
                        self.chunk_checked += n_q * G


SHADOW = Shadow()
