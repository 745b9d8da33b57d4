"""Self-check of the paged path (enabled by ``MADAKV_VERIFY=1``; tests only, slow).

Keeps a dense shadow copy of every K/V the model produced, per request and
layer, independent of the paged cache. After each layer's kernel call it
recomputes, in plain fp32 torch, attention of every query over exactly the
tokens its (layer, KV head) retains (all tokens for uncompressed requests,
``entry_position`` for compressed ones) and records the largest difference.

Prefix-cache hits. A request that starts with a hit never computes its first
``first`` tokens: their K/V sit in pages another request wrote. The shadow does
NOT take them from those pages (a corrupted shared page would then be copied
into the reference and go unnoticed). Every full page-sized block an
uncompressed request writes in the stock layout is recorded, per engine (its
WorkerKV) and layer, under (chain key of the block's token ids and multimodal
identities, the way vLLM's block hashes chain, page id). A hit takes each of
its blocks from that record, and the shared pages' bytes must equal it
exactly; a hit block with no record (computed while the shadow was off, or by
a vLLM that served a page for other tokens) or a page that differs from its
record is an error. Errors are collected in ``Shadow.errors``; reading
``Shadow.max_err`` then raises AssertionError naming them, so a test asserting
on ``max_err`` fails loudly. Tests start the check with ``start(llm)``, which
empties the engine's prefix cache (pages computed while the check was off
have no record).

Token ids are the worker's own (``batch.runner.requests[rid]``: prompt and output
token ids, multimodal features), never the KV buffer's.
"""

from __future__ import annotations

import hashlib
import os
import weakref

import torch

ENABLED = os.environ.get("MADAKV_VERIFY", "0") == "1"

# WorkerKV -> {(block key, page, layer): (K, V) [H, bs, D] fp32}: K/V of every full stock block the
# shadow saw an uncompressed request write, kept as long as the engine (a page outlives a test).
_RECORDS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
MAX_ERRORS = 50


def block_keys(req_state, n_blocks: int, bs: int, keys: list[bytes]) -> list[bytes]:
    """Chain keys of the first ``n_blocks`` full blocks of a request, extending ``keys`` (those
    computed before) in place: block j's key hashes block j-1's key, its token ids and the
    (identifier, offset, length) of every multimodal item overlapping it. Fewer keys when token ids
    are unknown (prompt embeddings, placeholders)."""
    if req_state is None or req_state.prompt_token_ids is None:
        return keys
    tokens = list(req_state.prompt_token_ids) + list(req_state.output_token_ids)
    lora = getattr(req_state.lora_request, "lora_name", None)
    items = [(f.identifier, int(f.mm_position.offset), int(f.mm_position.length)) for f in req_state.mm_features or []]
    while len(keys) < n_blocks:
        j = len(keys)
        s, e = j * bs, (j + 1) * bs
        block = tokens[s:e]
        if len(block) < bs or min(block) < 0:
            break
        mm = [it for it in items if it[1] < e and it[1] + it[2] > s]
        h = hashlib.sha256(keys[-1] if keys else repr(lora).encode())
        h.update(torch.tensor(block, dtype=torch.int64).numpy().tobytes())
        h.update(repr(mm).encode())
        keys.append(h.digest())
    return keys


class Shadow:
    def __init__(self):
        self.kv: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
        self.keys: dict[str, list[bytes]] = {}  # request -> its block keys so far
        self.recorded: dict[tuple[str, int], int] = {}  # (request, layer) -> full blocks recorded
        self._max_err = 0.0
        self.errors: list[str] = []
        self.checked = 0  # (query token, query head) pairs compared
        self.compressed_checked = 0
        self.chunk_checked = 0  # of those, queries of a prefill chunk over a compressed request
        self.hit_tokens = 0  # (token, layer) pairs of prefix-cache hits taken from records, pages compared

    @property
    def max_err(self) -> float:
        """The largest difference seen; raises AssertionError if the shadow recorded an error."""
        if self.errors:
            raise AssertionError("madakv verify: " + "\n".join(self.errors))
        return self._max_err

    def error(self, msg: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(msg)

    def drop(self, req_ids) -> None:
        for key in [k for k in self.kv if k[0] in req_ids]:
            del self.kv[key]
        for key in [k for k in self.recorded if k[0] in req_ids]:
            del self.recorded[key]
        for rid in req_ids:
            self.keys.pop(rid, None)

    def _block_keys(self, batch, rid: str, n_blocks: int) -> list[bytes]:
        req_state = batch.runner.requests.get(rid) if batch.runner is not None else None
        return block_keys(req_state, n_blocks, batch.state.bs, self.keys.setdefault(rid, []))

    def prefix_kv(self, batch, i: int, rid: str, layer: int, first: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K, V ([H, first, D] fp32) of the ``first`` tokens request row ``i`` got from a prefix-cache
        hit: from the records of the requests that computed them, never from the shared pages, which
        must hold exactly the same values."""
        st = batch.state
        bs, H, D = st.bs, st.H, st.D
        k, v = torch.zeros(H, first, D), torch.zeros(H, first, D)
        where = f"request {rid}, layer {layer}: prefix-cache hit of {first} tokens"
        if first % bs:
            self.error(f"{where}: not a whole number of {bs}-token pages")
            return k, v
        n = first // bs
        pages = batch.block_table[i, :n].tolist()
        keys = self._block_keys(batch, rid, n)
        records = _RECORDS.get(st, {})
        missing = []
        for j, page in enumerate(pages):
            rec = records.get((keys[j], page, layer)) if j < len(keys) else None
            if rec is None:
                missing.append((j, page))
            else:
                k[:, j * bs : (j + 1) * bs], v[:, j * bs : (j + 1) * bs] = rec
        if missing:
            self.error(f"{where}: no independent copy of (block, page) {missing} (the shadow records the K/V of "
                       f"requests it saw compute them; token ids known: {len(keys)} blocks)")
            return k, v
        pk, pv = st.read_stock(layer, pages, first)
        pk, pv = pk.float().cpu(), pv.float().cpu()  # (CUDA caches: compared on the host)
        for j, page in enumerate(pages):
            blk = slice(j * bs, (j + 1) * bs)
            if not (torch.equal(pk[:, blk], k[:, blk]) and torch.equal(pv[:, blk], v[:, blk])):
                dk, dv = float((pk[:, blk] - k[:, blk]).abs().max()), float((pv[:, blk] - v[:, blk]).abs().max())
                self.error(f"{where}: shared page {page} (block {j}) differs from the K/V recorded when it was "
                           f"computed (max |diff| K {dk:.3g}, V {dv:.3g})")
        self.hit_tokens += first
        return k, v

    def _record_blocks(self, batch, rid: str, layer: int, length: int, k_sh, v_sh, block_row) -> None:
        """Record the full blocks of an uncompressed (stock layout) request not recorded yet."""
        st = batch.state
        bs = st.bs
        done = self.recorded.get((rid, layer), 0)
        n_full = length // bs
        if n_full <= done:
            return
        keys = self._block_keys(batch, rid, n_full)
        records = _RECORDS.setdefault(st, {})
        for j in range(done, min(n_full, len(keys))):
            blk = slice(j * bs, (j + 1) * bs)
            records[(keys[j], int(block_row[j]), layer)] = (k_sh[:, blk].clone(), v_sh[:, blk].clone())
            done = j + 1
        self.recorded[(rid, layer)] = done

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
                    self.recorded[(rid, layer)] = first // st.bs
                    nk[:, :first], nv[:, :first] = self.prefix_kv(batch, i, rid, layer, first)
                k_sh, v_sh = nk, nv
            k_sh[:, first:length] = key[start:end].transpose(0, 1).float()
            v_sh[:, first:length] = value[start:end].transpose(0, 1).float()
            self.kv[(rid, layer)] = (k_sh, v_sh)
            rs = st.requests.get(rid)
            compressed = rs is not None and rs.is_compressed and rs.lens is not None
            if not compressed and st.prefix_caching:  # this step's tokens went to the stock layout
                self._record_blocks(batch, rid, layer, length, k_sh, v_sh, batch.block_table[i])
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
                self._max_err = max(self._max_err, float((ref - got).abs().max()))
                self.checked += n_q * G
                if compressed:
                    self.compressed_checked += n_q * G
                    if n_q > 1:
                        self.chunk_checked += n_q * G


SHADOW = Shadow()


def start(llm=None) -> Shadow:
    """Install a fresh ``SHADOW`` and enable the check; returns it. ``llm`` (an idle offline
    ``vllm.LLM``): its prefix cache is emptied first, since a hit on pages computed while the shadow
    was off has no independent copy and is an error. Engines are shared between tests: pass it."""
    global SHADOW, ENABLED
    if llm is not None and not llm.reset_prefix_cache():
        raise RuntimeError("madakv verify: could not empty the prefix cache (are requests still running?)")
    SHADOW, ENABLED = Shadow(), True
    return SHADOW
