"""Where vLLM's CPU KV writer puts each entry inside a page, learned from the writer itself.

vLLM's CPU attention ISAs (``vec``, ``vec16``, ``amx``, ``neon``, ``vsx``, ``vxe``, ``rvv``)
each pack a page's K and V in their own order, and a new ISA may bring a new order. Compaction
must read retained entries back, so instead of knowing each ISA we ask its writer: one probe per
(ISA, block size, head size, dtype, KV-cache dtype) writes integer codes that name every
(slot offset, dim) through the writer into one per-head sub-block ``[2*bs, D]`` (the view
paged.FlatKVCache uses, ``num_kv_heads=1``) and reads where they landed. The result is one gather
table for K and one for V; a probe fails loudly (LayoutError) unless the writer stays inside its
sub-block, puts every (offset, dim) at exactly one position, and a round trip of random entries
reads back exactly. Nothing here knows an ISA by name, so any ISA whose writer is deterministic
reads back by construction, including those this CPU cannot run.

An fp8 KV cache (``fp8``/``fp8_e4m3``, ``fp8_e5m2``) is a uint8 buffer the writer fills with fp8
bytes, quantizing each value as ``value / scale``; its pages are probed the same way, in bytes,
with codes the fp8 format holds exactly (digits 1..16 in e4m3, 1..8 in e5m2, so more writes).
Tables then count bytes, and reading through them gives the stored bytes: compaction moves those
(``BlockLayout.write``) and never quantizes again.

Reading through a table is an int64 gather per element; where a table is a mixed-radix strided
pattern (``vec``: K ``[D, bs]``, V ``[bs, D]``; ``amx``: 16-slot and 2-dim interleaves) the same
positions are read through a strided view instead, which is several times faster. That form is
derived from the table and checked against it, never assumed.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

#: writer(key, value, key_cache, value_cache, slots): key/value [n, 1, D]; the caches are
#: ``[S, 1, bs, D]`` views of a ``[S, 1, 2*bs, D]`` buffer (K then V half of each sub-block);
#: flat slot = sub-block * bs + offset.
Writer = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]

# Codes are digits 1..RADIX (K) and -1..-RADIX (V): integers every float dtype (bf16: 8
# significant bits) holds exactly; a (offset, dim) code takes ceil(log_RADIX(bs*D)) writes. An
# fp8 cache holds fewer integers exactly: its radix is lowered to them (format_radix).
RADIX = 128

#: The fp8 KV cache formats of vLLM's CPU kernels (``is_quantized_kv_cache``), as torch's element
#: types of the bytes they store; vLLM allocates these caches as uint8 (``fp8`` is e4m3).
FP8_FORMATS = {"fp8": torch.float8_e4m3fn, "fp8_e4m3": torch.float8_e4m3fn, "fp8_e5m2": torch.float8_e5m2}


def cache_storage(dtype: torch.dtype, kv_cache_dtype: str | None = "auto") -> tuple[torch.dtype, torch.dtype]:
    """(the buffer's torch dtype, the format of its elements) of a KV cache for model dtype ``dtype``:
    ``(dtype, dtype)`` unquantized, ``(uint8, float8_*)`` for an fp8 cache."""
    fmt = FP8_FORMATS.get(kv_cache_dtype or "auto")
    return (dtype, dtype) if fmt is None else (torch.uint8, fmt)


def format_radix(fmt: torch.dtype) -> int:
    """RADIX, or fewer: the integers 1..radix that ``fmt`` holds exactly (2**(mantissa bits + 1))."""
    return min(RADIX, round(2 / torch.finfo(fmt).eps))


class LayoutError(RuntimeError):
    """The writer's layout cannot be read back: compaction would corrupt the KV cache."""


@dataclass(frozen=True)
class Strided:
    """Positions ``offset + sum(digit_i * stride_i)`` of a mixed-radix index, outer digit first."""

    offset: int
    sizes: tuple[int, ...]
    strides: tuple[int, ...]

    def digits(self, i: torch.Tensor) -> list[torch.Tensor]:
        out, inner = [], math.prod(self.sizes)
        for size in self.sizes:
            inner //= size
            out.append(i // inner % size)
        return out


def strided_form(positions: torch.Tensor) -> Strided | None:
    """``positions[i]`` (int64 [n]) as a mixed-radix strided pattern, or None if it is none."""
    offset = int(positions[0])
    g = positions - offset
    sizes: list[int] = []
    strides: list[int] = []
    while g.numel() > 1:
        n, stride = g.numel(), int(g[1])
        run = 2
        while run < n and int(g[run]) == run * stride:
            run += 1
        if n % run or not torch.equal(g.view(n // run, run), g[::run].view(-1, 1) + g[:run].view(1, -1)):
            return None
        sizes.insert(0, run)
        strides.insert(0, stride)
        g = g[::run]
    return Strided(offset, tuple(sizes), tuple(strides))


@dataclass(frozen=True)
class BlockLayout:
    """Element offsets, within one per-head sub-block ``[2*bs, D]``, of every K and V entry."""

    isa: str
    block_size: int
    head_size: int
    key_index: torch.Tensor  # [bs, D] int64
    value_index: torch.Tensor  # [bs, D] int64
    # (slot part, dim part) when the table is separable and each part is strided, else None
    key_form: tuple[Strided, Strided] | None
    value_form: tuple[Strided, Strided] | None

    @classmethod
    def from_tables(cls, isa: str, key_index: torch.Tensor, value_index: torch.Tensor) -> "BlockLayout":
        bs, d = key_index.shape
        return cls(isa, bs, d, key_index, value_index, _separable_form(key_index), _separable_form(value_index))

    @property
    def description(self) -> str:
        def one(form):
            if form is None:
                return "gather table"
            slot, dim = form
            return f"slots {list(zip(slot.sizes, slot.strides))} dims {list(zip(dim.sizes, dim.strides))}"

        return f"K: {one(self.key_form)}; V: {one(self.value_form)}"

    def read(self, buffer: torch.Tensor, slots: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V ([n, D] each) at flat ``slots`` (sub-block * bs + offset) of ``buffer``, a
        contiguous ``[S, 1, 2*bs, D]`` tensor of sub-blocks."""
        sb, off = slots // self.block_size, slots % self.block_size
        return (self._read(buffer, sb, off, self.key_index, self.key_form),
                self._read(buffer, sb, off, self.value_index, self.value_form))

    def write(self, buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K and V ([n, D] each, the buffer's dtype: stored elements, e.g. what ``read``
        gave) at flat ``slots`` of ``buffer``, element for element: a move, bit for bit."""
        sb, off = slots // self.block_size, slots % self.block_size
        self._write(buffer, sb, off, self.key_index, self.key_form, k)
        self._write(buffer, sb, off, self.value_index, self.value_form, v)

    def _read(self, buffer, sb, off, index, form) -> torch.Tensor:
        where = self._where(buffer, sb, off, index, form)
        if form is None:
            return buffer.view(-1)[where]
        view, digits = where
        return view[digits].reshape(-1, self.head_size)

    def _write(self, buffer, sb, off, index, form, values) -> None:
        where = self._where(buffer, sb, off, index, form)
        if form is None:
            buffer.view(-1)[where] = values
        else:
            view, digits = where
            dim = form[1]
            view[digits] = values.reshape(-1, *dim.sizes)

    def _where(self, buffer, sb, off, index, form):
        """The elements of entries (sub-block ``sb``, offset ``off``): flat positions ([n, D]) for a
        gather table, else a strided view of ``buffer`` and the index that picks them from it."""
        sub_elems = 2 * self.block_size * self.head_size
        if form is None:
            return (sb * sub_elems).unsqueeze(1) + index[off]
        slot, dim = form
        view = torch.as_strided(
            buffer,
            size=(buffer.shape[0], *slot.sizes, *dim.sizes),
            stride=(sub_elems, *slot.strides, *dim.strides),
            storage_offset=buffer.storage_offset() + slot.offset + dim.offset,
        )
        return view, (sb, *slot.digits(off))


def _separable_form(index: torch.Tensor) -> tuple[Strided, Strided] | None:
    slot_part, dim_part = index[:, 0] - index[0, 0], index[0, :]
    if not torch.equal(index, slot_part.view(-1, 1) + dim_part.view(1, -1)):
        return None
    slot, dim = strided_form(slot_part), strided_form(dim_part)
    return None if slot is None or dim is None else (slot, dim)


# --- the probe ------------------------------------------------------------------------------


def probe(writer: Writer, isa: str, block_size: int, head_size: int, dtype: torch.dtype,
          kv_cache_dtype: str = "auto") -> BlockLayout:
    """The layout ``writer`` uses, checked; raises LayoutError naming what is wrong. ``dtype`` is
    what the writer is given (the model's); an fp8 ``kv_cache_dtype`` is probed in bytes."""
    bs, d = block_size, head_size
    n_entries, sub_elems = bs * d, 2 * bs * d
    storage, fmt = cache_storage(dtype, kv_cache_dtype)
    cache = "" if fmt is dtype else f", {kv_cache_dtype} KV cache"
    where = f"CPU attention ISA {isa!r} (block size {bs}, head size {d}, {dtype}{cache})"
    radix = format_radix(fmt)
    # three sub-blocks, entries written to the middle one: a write outside it shows in the others
    buffer = torch.zeros(3, 1, 2 * bs, d, dtype=storage)
    key_cache, value_cache = buffer.chunk(2, dim=2)
    slots = bs + torch.arange(bs)
    code = torch.arange(n_entries).view(bs, d)  # entry (offset o, dim j) has code o*D + j
    n_digits = 1
    while radix**n_digits < n_entries:
        n_digits += 1
    decoded = torch.zeros(sub_elems, dtype=torch.long)
    written = None
    for i in range(n_digits):
        digit = (code // radix**i % radix + 1).to(dtype)
        buffer.zero_()
        writer(digit.unsqueeze(1), (-digit).unsqueeze(1), key_cache, value_cache, slots)
        if buffer[0].any() or buffer[2].any():
            raise LayoutError(f"madakv: the KV writer of {where} writes outside the sub-block of its slots")
        got = buffer[1].reshape(-1).view(fmt).double()
        mask = got.sign().long()  # +1: a K entry, -1: a V entry, 0: untouched
        if written is None:
            written = mask
        elif not torch.equal(mask, written):
            raise LayoutError(f"madakv: the KV writer of {where} puts entries in different places per write")
        if not torch.equal(got.abs(), got.abs().round()) or bool((got.abs() > radix).any()):
            raise LayoutError(f"madakv: the KV writer of {where} does not store the entries it was given")
        decoded += (got.abs().long() - 1).clamp(min=0) * radix**i
    key_index = _positions(decoded, written == 1, n_entries, "K", where)
    value_index = _positions(decoded, written == -1, n_entries, "V", where)
    layout = BlockLayout.from_tables(isa, key_index.view(bs, d), value_index.view(bs, d))
    _round_trip(writer, layout, dtype, storage, fmt, where)
    return layout


def _positions(decoded: torch.Tensor, mask: torch.Tensor, n_entries: int, what: str, where: str) -> torch.Tensor:
    """[n_entries] position of each code among the masked positions: each exactly once."""
    pos = mask.nonzero().view(-1)
    codes = decoded[pos]
    counts = torch.bincount(codes, minlength=n_entries)
    if pos.numel() != n_entries or not bool((counts == 1).all()):
        missing = int((counts == 0).sum())
        doubled = int((counts > 1).sum())
        raise LayoutError(
            f"madakv: the KV writer of {where} puts {pos.numel()} {what} elements for {n_entries} "
            f"(offset, dim) entries ({missing} missing, {doubled} at more than one position)")
    index = torch.empty(n_entries, dtype=torch.long)
    index[codes] = pos
    return index


def _round_trip(writer: Writer, layout: BlockLayout, dtype: torch.dtype, storage: torch.dtype, fmt: torch.dtype,
                where: str) -> None:
    """Random entries written to scattered slots of several sub-blocks read back exactly: in an fp8
    cache, random non-zero values of the format (stored unchanged; vLLM's writer stores -0 as +0
    and rounds other values its own way), compared byte for byte."""
    bs, d = layout.block_size, layout.head_size
    gen = torch.Generator().manual_seed(0)
    buffer = torch.zeros(4, 1, 2 * bs, d, dtype=storage)
    key_cache, value_cache = buffer.chunk(2, dim=2)
    slots = torch.randperm(4 * bs, generator=gen)[: 2 * bs]
    k, v = (_exactly_stored(torch.randn(len(slots), 1, d, generator=gen), dtype, fmt) for _ in range(2))
    writer(k, v, key_cache, value_cache, slots)
    rk, rv = layout.read(buffer, slots)
    if not (torch.equal(rk, k[:, 0].to(fmt).view(storage)) and torch.equal(rv, v[:, 0].to(fmt).view(storage))):
        raise LayoutError(f"madakv: entries written by the KV writer of {where} do not read back")


def _exactly_stored(x: torch.Tensor, dtype: torch.dtype, fmt: torch.dtype) -> torch.Tensor:
    """``x`` in ``dtype``, rounded to values of ``fmt`` other than zero when that is narrower."""
    if fmt is dtype:
        return x.to(dtype)
    x = x.to(fmt).float()
    return torch.where(x == 0, 1.0, x).to(dtype)


# --- vLLM's writer ------------------------------------------------------------------------------


def kernel_writer(isa: str, kv_cache_dtype: str = "auto", k_scale: float = 1.0, v_scale: float = 1.0) -> Writer:
    """vLLM's own CPU KV writer for ``isa``; an fp8 cache stores ``key / k_scale``, ``value / v_scale``."""
    from vllm import _custom_ops as ops

    def write(key, value, key_cache, value_cache, slots):
        ops.cpu_attn_reshape_and_cache(key, value, key_cache, value_cache, slots, isa,
                                       k_scale=k_scale, v_scale=v_scale, kv_cache_dtype=kv_cache_dtype)

    return write


@functools.lru_cache(maxsize=None)
def kernel_layout(isa: str, block_size: int, head_size: int, dtype: torch.dtype,
                  kv_cache_dtype: str = "auto") -> BlockLayout:
    """The layout of vLLM's writer, probed once per process and configuration (``dtype``: the
    model's). A writer that refuses the configuration (an ISA this CPU or build lacks, or an ISA
    without fp8 pages) is a LayoutError too."""
    try:
        return probe(kernel_writer(isa, kv_cache_dtype), isa, block_size, head_size, dtype, kv_cache_dtype)
    except LayoutError:
        raise
    except RuntimeError as e:
        cache = "" if cache_storage(dtype, kv_cache_dtype)[1] is dtype else f", {kv_cache_dtype} KV cache"
        raise LayoutError(f"madakv: vLLM's KV writer refuses CPU attention ISA {isa!r} "
                          f"(block size {block_size}, head size {head_size}, {dtype}{cache}): {e}") from None
