"""Per-head views of vLLM's paged KV buffer, and reading/writing single entries.

vLLM 0.32 allocates every layer's KV cache in ONE backing buffer, layer-major
(``allocate_kv_cache``). A page ``[H, bs, 2*D]`` of a layer is H sub-blocks of
single-head slots, so the whole buffer is viewed as ``[L*NB*H, 1, 2*bs, D]``:
sub-block ``(layer_slot*NB + page)*H + head``. The stock kernels accept that view
with ``num_kv_heads=1``; any (layer, head) may own any sub-block of its request's
pages, which lets retained KV be packed across layers.

Writes go through the kernel's own writer; reads go through the layout that writer was
seen to use (block_layout.py), probed at engine startup.
"""

from __future__ import annotations

import torch

from madakv_vllm.integration.block_layout import BlockLayout, kernel_layout, kernel_writer


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
        self.layout = self._layout(c0.dtype)
        self._write = kernel_writer(isa, kv_cache_dtype)

    def _layout(self, dtype) -> BlockLayout | None:
        return kernel_layout(self.isa, self.block_size, self.head_size, dtype, self.kv_cache_dtype)

    def subblock(self, layer: int, page: torch.Tensor | int, head: torch.Tensor | int):
        """Flat sub-block id of (layer, page, head)."""
        return (self.layer_slot[layer] * self.num_blocks + page) * self.num_kv_heads + head

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """k, v: [n, D]; slots: flat slot = subblock * bs + offset. Unquantized caches only
        (rules.configure_engine refuses the others), so the scales are 1."""
        self._write(k.unsqueeze(1), v.unsqueeze(1), self.key, self.value, slots)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([n, D] each) stored at flat slots."""
        return self.layout.read(self.flat, slots)


class TorchFlatKVCache(FlatKVCache):
    """The same per-head view for devices without vLLM's CPU kernels (CUDA): entries are
    stored plainly (K rows then V rows of each sub-block) and moved with torch indexing;
    ``key4``/``value4`` are the ``[S, bs, 1, D]`` paged views FlashAttention reads."""

    def __init__(self, layer_caches: list[torch.Tensor]):
        super().__init__(layer_caches, isa="torch")
        self.key4, self.value4 = self.key.transpose(1, 2), self.value.transpose(1, 2)
        self.entries = self.flat.view(self.num_subblocks * 2 * self.block_size, self.head_size)

    def _layout(self, dtype) -> None:
        return None  # entries are moved with torch indexing below

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
