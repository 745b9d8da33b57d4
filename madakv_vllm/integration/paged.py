"""Per-head views of vLLM's paged KV buffer, and reading/writing single entries.

vLLM 0.32 allocates every layer's KV cache in ONE backing buffer, layer-major
(``allocate_kv_cache``). A page ``[H, bs, 2*D]`` of a layer is H sub-blocks of
single-head slots, so the whole buffer is viewed as ``[L*NB*H, 1, 2*bs, D]``:
sub-block ``(layer_slot*NB + page)*H + head``. The stock kernels accept that view
with ``num_kv_heads=1``; any (layer, head) may own any sub-block of its request's
pages, which lets retained KV be packed across layers.

Writes go through the kernel's own writer. Reads need the ISA's block interior
layout, which is probed once against the writer: an unknown layout fails loudly.
"""

from __future__ import annotations

import torch
from vllm import _custom_ops as ops


class FlatKVCache:
    def __init__(self, layer_caches: list[torch.Tensor], isa: str, kv_cache_dtype: str = "auto"):
        c0 = layer_caches[0]
        nb, h, bs, two_d = c0.shape
        self.num_blocks, self.num_kv_heads, self.block_size, self.head_size = nb, h, bs, two_d // 2
        self.isa, self.kv_cache_dtype = isa, kv_cache_dtype
        page_elems = h * bs * two_d
        for c in layer_caches:
            if c.shape != c0.shape or c.stride() != (page_elems, bs * two_d, two_d, 1) or c.dtype != c0.dtype:
                raise RuntimeError(f"madakv: unexpected KV cache view {tuple(c.shape)} stride {c.stride()}")
        base = min(c.storage_offset() for c in layer_caches)
        layer_elems = nb * page_elems
        self.layer_slot: list[int] = []
        for c in layer_caches:
            off = c.storage_offset() - base
            if off % layer_elems:
                raise RuntimeError("madakv: layers' KV caches are not layer-major in one buffer")
            self.layer_slot.append(off // layer_elems)
        if len(set(self.layer_slot)) != len(layer_caches):
            raise RuntimeError("madakv: two layers share one KV cache")
        num_slots = max(self.layer_slot) + 1
        self.num_subblocks = num_slots * nb * h
        self.flat = torch.as_strided(
            c0,
            size=(self.num_subblocks, 1, 2 * bs, self.head_size),
            stride=(2 * bs * self.head_size, 2 * bs * self.head_size, self.head_size, 1),
            storage_offset=base,
        )
        self.key, self.value = self.flat.chunk(2, dim=2)
        self.rows = self.flat.view(self.num_subblocks, 2 * bs * self.head_size)
        self.k_transposed = self._key_layout(c0.dtype)

    def _key_layout(self, dtype) -> bool:
        return probe_key_layout(self.isa, self.block_size, self.head_size, dtype, self.kv_cache_dtype)

    def subblock(self, layer: int, page: torch.Tensor | int, head: torch.Tensor | int):
        """Flat sub-block id of (layer, page, head)."""
        return (self.layer_slot[layer] * self.num_blocks + page) * self.num_kv_heads + head

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [n, D]; slots: flat slot = subblock * bs + offset. Unquantized caches only
        (plugin.configure_engine refuses the others), so the scales are 1."""
        ops.cpu_attn_reshape_and_cache(
            k.unsqueeze(1),
            v.unsqueeze(1),
            self.key,
            self.value,
            slots,
            self.isa,
            k_scale=1.0,
            v_scale=1.0,
            kv_cache_dtype=self.kv_cache_dtype,
        )

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([n, D] each) stored at flat slots."""
        return read_entries(self.rows, slots, self.block_size, self.head_size, self.k_transposed)


def read_entries(rows: torch.Tensor, slots: torch.Tensor, bs: int, d: int, k_transposed: bool):
    sb, off = slots // bs, slots % bs
    k_area, v_area = rows[:, : bs * d], rows[:, bs * d :]
    if k_transposed:
        k = k_area.view(-1, d, bs)[sb, :, off]
    else:
        k = k_area.view(-1, bs, d)[sb, off]
    v = v_area.view(-1, bs, d)[sb, off]
    return k, v


_LAYOUTS: dict[tuple, bool] = {}


def probe_key_layout(isa: str, bs: int, d: int, dtype: torch.dtype, kv_cache_dtype: str = "auto") -> bool:
    """Write known entries with the kernel and find the reader that gets them back.

    Returns True when K is stored transposed per (block, head) ([D, bs], the "vec"
    ISA), False when plain ([bs, D]). Raises if neither reads back exactly.
    """
    key = (isa, bs, d, dtype, kv_cache_dtype)
    if key in _LAYOUTS:
        return _LAYOUTS[key]
    gen = torch.Generator().manual_seed(0)
    n_sub = 3
    flat = torch.zeros(n_sub, 1, 2 * bs, d, dtype=dtype)
    kc, vc = flat.chunk(2, dim=2)
    slots = torch.tensor([0, 1, bs - 1, bs + 3, 2 * bs + bs // 2, 3 * bs - 1])
    k = torch.randn(len(slots), 1, d, generator=gen).to(dtype)
    v = torch.randn(len(slots), 1, d, generator=gen).to(dtype)
    ops.cpu_attn_reshape_and_cache(k, v, kc, vc, slots, isa, k_scale=1.0, v_scale=1.0, kv_cache_dtype=kv_cache_dtype)
    rows = flat.view(n_sub, 2 * bs * d)
    for transposed in (True, False):
        rk, rv = read_entries(rows, slots, bs, d, transposed)
        if torch.equal(rk, k[:, 0]) and torch.equal(rv, v[:, 0]):
            _LAYOUTS[key] = transposed
            return transposed
    raise RuntimeError(
        f"madakv: unknown KV block layout for CPU attention ISA {isa!r} (dtype {dtype}); "
        "compaction cannot read entries back. Please report this with your CPU model."
    )


class TorchFlatKVCache(FlatKVCache):
    """The same per-head view for devices without vLLM's CPU kernels (CUDA): entries are
    stored plainly (K rows then V rows of each sub-block) and moved with torch indexing;
    ``key4``/``value4`` are the ``[S, bs, 1, D]`` paged views FlashAttention reads."""

    def __init__(self, layer_caches: list[torch.Tensor]):
        super().__init__(layer_caches, isa="torch")
        self.key4, self.value4 = self.key.transpose(1, 2), self.value.transpose(1, 2)
        self.entries = self.flat.view(self.num_subblocks * 2 * self.block_size, self.head_size)

    def _key_layout(self, dtype) -> bool:
        return False

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.to(self.flat.device, torch.long)
        return slots // self.block_size * (2 * self.block_size) + slots % self.block_size

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        keep = slots.to(self.flat.device) >= 0
        rows = self._rows(slots)[keep]
        self.entries[rows] = k[keep].to(self.flat.dtype)
        self.entries[rows + self.block_size] = v[keep].to(self.flat.dtype)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(slots)
        return self.entries[rows], self.entries[rows + self.block_size]
