"""Per-head views of vLLM's paged KV buffer, and reading/writing single entries.

vLLM 0.32 allocates every layer's KV cache in ONE backing buffer, layer-major
(``allocate_kv_cache``). A page ``[H, bs, 2*D]`` of a layer is H sub-blocks of
single-head slots, so the whole buffer is viewed as ``[L*NB*H, 1, 2*bs, D]``:
sub-block ``(layer_slot*NB + page)*H + head``. The stock kernels accept that view
with ``num_kv_heads=1``; any (layer, head) may own any sub-block of its request's
pages, which lets retained KV be packed across layers.

New entries go through the kernel's own writer; reads go through the layout that writer was
seen to use (block_layout.py), probed at engine startup. Compaction moves stored elements
along that layout (``read``, then ``put``), never converting them: an fp8 cache (a uint8 buffer
of fp8 bytes, each ``value / scale`` of its layer) keeps every retained byte. Scoring reads
entries as the kernel sees them (``read_values``): fp8 values times the layer's scale.
"""

from __future__ import annotations

import torch

from madakv_vllm.integration.block_layout import BlockLayout, cache_storage, kernel_layout, kernel_writer


class FlatKVCache:
    """``layer_caches``: each layer's ``[NB, H, bs, 2*D]`` view, in the order ``layer`` counts;
    ``dtype``: the model's (what the writer is given), by default the caches' own (unquantized)."""

    def __init__(self, layer_caches: list[torch.Tensor], isa: str, kv_cache_dtype: str = "auto",
                 dtype: torch.dtype | None = None):
        c0 = layer_caches[0]
        nb, h, bs, two_d = c0.shape
        self.num_blocks, self.num_kv_heads, self.block_size, self.head_size = nb, h, bs, two_d // 2
        self.isa, self.kv_cache_dtype = isa, kv_cache_dtype
        self.dtype = dtype or c0.dtype
        storage, self.element_format = cache_storage(self.dtype, kv_cache_dtype)
        if c0.dtype != storage:
            raise RuntimeError(f"madakv: a {kv_cache_dtype} KV cache for {self.dtype} is {storage}, got {c0.dtype}")
        self.quantized = self.element_format != self.dtype
        # (k_scale, v_scale) the kernels used for each layer's entries (MadaKVCPUImpl.forward sets them)
        self.scales: list[tuple[float, float]] = [(1.0, 1.0)] * len(layer_caches)
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
        self.layout = self._layout(self.dtype)

    def _layout(self, dtype) -> BlockLayout | None:
        return kernel_layout(self.isa, self.block_size, self.head_size, dtype, self.kv_cache_dtype)

    def subblock(self, layer: int, page: torch.Tensor | int, head: torch.Tensor | int):
        """Flat sub-block id of (layer, page, head)."""
        return (self.layer_slot[layer] * self.num_blocks + page) * self.num_kv_heads + head

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_scale: float = 1.0,
              v_scale: float = 1.0) -> None:
        """New entries through vLLM's writer. k, v: [n, D] in the model's dtype; slots: flat
        slot = subblock * bs + offset; an fp8 cache stores ``k / k_scale``, ``v / v_scale``."""
        write = kernel_writer(self.isa, self.kv_cache_dtype, k_scale, v_scale)
        write(k.unsqueeze(1), v.unsqueeze(1), self.key, self.value, slots)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([n, D] each) stored at flat slots, as stored (an fp8 cache: its uint8 bytes)."""
        return self.layout.read(self.flat, slots)

    def put(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """Store what ``read`` gave at other flat slots, unchanged. An fp8 cache: its bytes, moved
        along the layout (vLLM's writer would quantize them again). Unquantized: through vLLM's
        writer, which copies them and is faster here than the layout's scatter."""
        if self.quantized:
            self.layout.write(self.flat, slots, k, v)
        else:
            self.write(k, v, slots)

    def read_values(self, layer: int, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V of ``layer`` at flat slots as vLLM's kernel reads them: an fp8 cache's stored
        values times the layer's scales (float32); unquantized, as stored."""
        k, v = self.read(slots)
        if not self.quantized:
            return k, v
        k_scale, v_scale = self.scales[layer]
        return (k.view(self.element_format).float() * k_scale, v.view(self.element_format).float() * v_scale)


class TorchFlatKVCache(FlatKVCache):
    """The same per-head view for devices without vLLM's CPU kernels (CUDA): entries are
    stored plainly (K rows then V rows of each sub-block) and moved with torch indexing;
    ``key4``/``value4`` are the ``[S, bs, 1, D]`` paged views FlashAttention reads.

    An fp8 cache (a uint8 buffer) stores what vLLM's CUDA writer (``reshape_and_cache_flash``)
    stores: ``value / scale`` saturated to the format's largest finite value and rounded to
    nearest even, as the fp8 bytes. ``read`` gives those bytes and ``put`` stores them
    unchanged, so compaction never quantizes twice."""

    def __init__(self, layer_caches: list[torch.Tensor], kv_cache_dtype: str = "auto",
                 dtype: torch.dtype | None = None):
        super().__init__(layer_caches, isa="torch", kv_cache_dtype=kv_cache_dtype, dtype=dtype)
        self.key4, self.value4 = self.key.transpose(1, 2), self.value.transpose(1, 2)
        self.entries = self.flat.view(self.num_subblocks * 2 * self.block_size, self.head_size)

    def _layout(self, dtype) -> None:
        return None  # entries are moved with torch indexing below

    def _rows(self, slots: torch.Tensor) -> torch.Tensor:
        slots = slots.to(self.flat.device, torch.long)
        return slots // self.block_size * (2 * self.block_size) + slots % self.block_size

    def _stored(self, x: torch.Tensor, scale) -> torch.Tensor:
        if not self.quantized:
            return x.to(self.flat.dtype)
        # torch's cast to fp8 rounds to nearest even, but older torch gives NaN from 480 up instead of
        # saturating: clamp first, as the CUDA writer's __NV_SATFINITE conversion does.
        finite = torch.finfo(self.element_format).max
        return (x.float() / scale).clamp(-finite, finite).to(self.element_format).view(torch.uint8)

    def write(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor, k_scale=1.0, v_scale=1.0) -> None:
        """k, v: [n, D] in the model's dtype; slots below 0 are skipped (padding), as vLLM's writer
        skips them; an fp8 cache's scales: floats or the layer's scale tensors."""
        keep = slots.to(self.flat.device) >= 0
        rows = self._rows(slots)[keep]
        self.entries[rows] = self._stored(k[keep], k_scale)
        self.entries[rows + self.block_size] = self._stored(v[keep], v_scale)

    def read(self, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self._rows(slots)
        return self.entries[rows], self.entries[rows + self.block_size]

    def put(self, k: torch.Tensor, v: torch.Tensor, slots: torch.Tensor) -> None:
        """What ``read`` gave, stored at other flat slots as it is (an fp8 cache: its bytes)."""
        rows = self._rows(slots)
        self.entries[rows] = k
        self.entries[rows + self.block_size] = v
