"""Reading vLLM's CPU KV layouts back without knowing them (madakv_vllm/integration/block_layout.py).

vLLM's own writer is probed for every ISA the vLLM kernel library loaded here accepts, in every dtype;
layouts it cannot produce are emulated by Python writers; deliberately broken writers must fail loudly.

Which writers exist is a property of the vLLM library, which vLLM picks by the CPU's features
(``CpuPlatform.import_kernels``, x86: ``vllm._C`` with AVX-512 BF16, ``vllm._C_AVX512`` with AVX-512
only, ``vllm._C_AVX2`` otherwise). Tried with vLLM 0.32 on an AMD EPYC (AVX-512 BF16, no AMX tiles):
``vllm._C`` is loaded and its ``amx`` writer works (it is plain code: only the amx *attention kernel*
executes AMX tile instructions); ``vllm._C_AVX512`` and ``vllm._C_AVX2``, loaded by hand, refuse
``amx`` ("Unsupported CPU attention configuration"). So a skip here names the library, not the CPU.
"""

import math
import platform

import pytest
import torch

from madakv_vllm.integration.block_layout import (
    LayoutError,
    Strided,
    kernel_layout,
    probe,
    strided_form,
)

DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# Which vLLM 0.32 libraries compile each CPU attention ISA's KV writer (a skip names it).
ISA_BUILDS = {
    "vec": "every x86 library of vLLM",
    "vec16": "every x86 library of vLLM",
    "amx": "vllm._C only, the library vLLM loads on x86 CPUs with AVX-512 BF16 (vllm._C_AVX512 and "
           "vllm._C_AVX2 refuse it); the writer needs no AMX tiles, only the amx attention kernel does",
    "neon": "vLLM's Arm (aarch64) builds",
    "vsx": "vLLM's POWER builds",
    "vxe": "vLLM's IBM Z (s390x) builds",
    "rvv": "vLLM's RISC-V builds",
}


def cpu_name() -> str:
    from madakv_vllm.integration.cpu_backend import cpu_description

    return cpu_description()


def kernel_library() -> str:
    """The vLLM kernel library this process loaded (vllm._C, vllm._C_AVX512, ...)."""
    import vllm._custom_ops  # noqa: F401  (loads it)

    try:
        with open("/proc/self/maps") as f:
            names = {line.split("/")[-1].split(".")[0] for line in f if "/vllm/_C" in line}
    except OSError:
        names = set()
    return ", ".join(f"vllm.{n}" for n in sorted(names)) or "vLLM's kernel library"


def written_layout_or_skip(isa, bs, d, dtype):
    """The layout of vLLM's writer for ``isa``; skips if the loaded vLLM library refuses it."""
    try:
        return kernel_layout(isa, bs, d, dtype)
    except LayoutError as e:
        if "refuses" in str(e):
            pytest.skip(f"the vLLM library loaded here ({kernel_library()}, {platform.machine()}) has no {isa!r} KV "
                        f"writer for block size {bs}, head size {d}, {dtype}; {isa!r} is compiled into "
                        f"{ISA_BUILDS[isa]}. vLLM's refusal: {str(e).split('): ', 1)[-1].strip()} "
                        f"(CPU: {cpu_name()})")
        raise


# --- vLLM's own writers -----------------------------------------------------------------------


SHAPES = [(32, 64), (32, 80), (64, 128), (128, 112), (256, 512)]  # (block size, head size)
X86_ISAS = ("vec", "vec16", "amx")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("isa, bs, d", [(isa, bs, d) for isa in ISA_BUILDS
                                        for bs, d in (SHAPES if isa in X86_ISAS else SHAPES[:1])])
def test_every_writer_this_cpu_runs_is_probed_and_reads_back(isa, dtype, bs, d):
    """The probe's own round trip is checked inside; here also a multi-layer, multi-head buffer
    through FlatKVCache, as the engine uses it (layer views at non-zero storage offsets)."""
    from madakv_vllm.integration.paged import FlatKVCache

    written_layout_or_skip(isa, bs, d, dtype)
    L, NB, H = 2, 3, 2
    buf = torch.zeros(L, NB, H, bs, 2 * d, dtype=dtype)
    cache = FlatKVCache([buf[l] for l in range(L)], isa)
    gen = torch.Generator().manual_seed(1)
    slots = torch.randperm(cache.num_subblocks * bs, generator=gen)[:200]
    k = torch.randn(len(slots), d, generator=gen).to(dtype)
    v = torch.randn(len(slots), d, generator=gen).to(dtype)
    cache.write(k, v, slots)
    rk, rv = cache.read(slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)


def same_bytes_as_vec(isa, bs, d, dtype) -> bool:
    """Whether vLLM's ``isa`` writer lays out a page exactly as its ``vec`` writer (a library without
    an ``isa`` writer of its own may serve it with vec's: vLLM 0.32's ``amx`` at head sizes 80, 112)."""
    from madakv_vllm.integration.block_layout import kernel_writer

    gen = torch.Generator().manual_seed(5)
    k, v = torch.randn(bs, 1, d, generator=gen).to(dtype), torch.randn(bs, 1, d, generator=gen).to(dtype)
    pages = []
    for name in (isa, "vec"):
        buf = torch.zeros(1, 1, 2 * bs, d, dtype=dtype)
        kernel_writer(name)(k, v, *buf.chunk(2, dim=2), torch.arange(bs))
        pages.append(buf)
    return torch.equal(*pages)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("bs, d", [(32, 64), (64, 128), (256, 512)])
def test_amx_writer_round_trips_through_the_reader(bs, d, dtype):
    """What is checked without AMX tiles, and independently of any formula: arbitrary values written
    by vLLM's own ``amx`` writer into EVERY slot of a multi-layer, multi-head buffer (starting at a
    non-zero storage offset, viewed per layer as the engine's) read back exactly through FlatKVCache,
    both through the strided view and through the raw gather tables; read with ``vec``'s layout
    instead they do not (so the round trip depends on the probed layout). This checks the reader
    against the writer. It does NOT check that vLLM's amx attention kernel reads that layout: only
    test_cpu_isa.py::test_kernel_on_the_per_head_view_equals_dense_attention[amx-...] does, on a CPU
    with AMX tiles."""
    from madakv_vllm.integration.paged import FlatKVCache

    layout = written_layout_or_skip("amx", bs, d, dtype)
    vec = kernel_layout("vec", bs, d, dtype)
    if same_bytes_as_vec("amx", bs, d, dtype):  # asked of the writers themselves, not of the probe
        pytest.skip(f"the vLLM library loaded here ({kernel_library()}) serves ISA 'amx' with vec's writer for "
                    f"head size {d}: no amx layout of its own to check")
    assert layout.key_form is not None and layout.value_form is not None  # read through strided views
    L, NB, H = 2, 3, 2
    pad = 3 * d  # the buffer starts inside a larger allocation: reads must honour its storage offset
    buf = torch.zeros(pad + L * NB * H * bs * 2 * d, dtype=dtype)[pad:].view(L, NB, H, bs, 2 * d)
    cache = FlatKVCache([buf[l] for l in range(L)], "amx")
    gen = torch.Generator().manual_seed(7)
    slots = torch.randperm(cache.num_subblocks * bs, generator=gen)  # every slot, in scattered order
    k = (torch.randn(len(slots), d, generator=gen) * 100).to(dtype)
    v = (torch.randn(len(slots), d, generator=gen) * 100).to(dtype)
    cache.write(k, v, slots)  # vLLM's cpu_attn_reshape_and_cache, ISA 'amx'
    rk, rv = cache.read(slots)
    assert torch.equal(rk, k) and torch.equal(rv, v)
    sub_elems = 2 * bs * d
    flat, sb, off = cache.flat.reshape(-1), slots // bs, slots % bs  # (flat starts at the view's offset)
    assert torch.equal(flat[(sb * sub_elems).unsqueeze(1) + layout.key_index[off]], k)  # the gather tables
    assert torch.equal(flat[(sb * sub_elems).unsqueeze(1) + layout.value_index[off]], v)
    wk, wv = vec.read(cache.flat, slots)
    assert not torch.equal(wk, k) and not torch.equal(wv, v)


def test_amx_bf16_layout_matches_a_hand_reading_of_vllms_writer():
    """NOT an independent check of the amx kernel: the formula below is a hand reading of the same
    writer the probe asks (``AttentionImpl<ISA::AMX>::reshape_and_cache`` in vLLM's
    csrc/cpu/cpu_attn_amx.hpp: K in groups of 16 slots of 2-element dim pairs, V in groups of 16 dims
    of 2-slot pairs; o: slot offset, j: dim). Checked: the probe decodes the writer the way a human
    reads its source, and reads it through a strided view rather than a gather table; a vLLM whose amx
    writer changes layout fails here (then run the amx kernel test on a CPU with AMX tiles). Not
    checked: that vLLM's amx attention kernel reads this layout (test_cpu_isa.py's kernel test does,
    with AMX tiles only); that the reader reads it back (test_amx_writer_round_trips_through_the_reader)."""
    bs, d = 64, 128
    layout = written_layout_or_skip("amx", bs, d, torch.bfloat16)
    o, j = torch.arange(bs).view(-1, 1), torch.arange(d).view(1, -1)
    assert torch.equal(layout.key_index, (o // 16) * 16 * d + (j // 2) * 32 + (o % 16) * 2 + j % 2)
    assert torch.equal(layout.value_index, bs * d + (j // 16) * bs * 16 + (o // 2) * 32 + (j % 16) * 2 + o % 2)
    assert layout.key_form is not None and layout.value_form is not None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_vec_layout_is_k_transposed_and_v_plain(dtype):
    bs, d = 32, 64
    layout = written_layout_or_skip("vec", bs, d, dtype)
    o, j = torch.arange(bs).view(-1, 1), torch.arange(d).view(1, -1)
    assert torch.equal(layout.key_index, j * bs + o)
    assert torch.equal(layout.value_index, bs * d + o * d + j)


# --- emulated writers: layouts this CPU cannot produce -------------------------------------------


def table_writer(key_index, value_index):
    """A writer that stores entry (o, j) of a sub-block at the given element offsets."""

    def write(key, value, key_cache, value_cache, slots):
        bs, sub_elems = key_cache.shape[2], key_cache.stride(0)
        flat = torch.as_strided(key_cache, (key_cache.shape[0] * sub_elems,), (1,), key_cache.storage_offset())
        base = (slots // bs * sub_elems).view(-1, 1)
        flat[base + key_index[slots % bs]] = key[:, 0]
        flat[base + value_index[slots % bs]] = value[:, 0]

    return write


def layouts(bs, d):
    o, j = torch.arange(bs).view(-1, 1), torch.arange(d).view(1, -1)
    gen = torch.Generator().manual_seed(3)
    perm = torch.randperm(2 * bs * d, generator=gen)
    return {
        # both halves plain [bs, D]
        "plain": (o * d + j, bs * d + o * d + j),
        # a 16-slot x 2-dim interleave shaped like vLLM's amx layout (as read by hand from its
        # source): exercises the probe's multi-digit strided forms; says nothing about vLLM's writer
        "amx-formula": ((o // 16) * 16 * d + (j // 2) * 32 + (o % 16) * 2 + j % 2,
                        bs * d + (j // 16) * bs * 16 + (o // 2) * 32 + (j % 16) * 2 + o % 2),
        # an 8-slot x 4-dim tiling with V before K: another ISA's blocking
        "tiled-v-first": (bs * d + (o // 8) * 8 * d + (j // 4) * 32 + (o % 8) * 4 + j % 4,
                          (j // 8) * bs * 8 + o * 8 + j % 8),
        # no strided form at all: read through the gather tables
        "scrambled": (perm[: bs * d].view(bs, d), perm[bs * d :].view(bs, d)),
    }


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["plain", "amx-formula", "tiled-v-first", "scrambled"])
@pytest.mark.parametrize("bs, d", [(32, 64), (64, 128), (256, 512)])
def test_emulated_layouts_are_recovered_exactly(name, dtype, bs, d):
    """The probe has no ISA names in it: any deterministic layout inside one sub-block reads back."""
    key_index, value_index = layouts(bs, d)[name]
    layout = probe(table_writer(key_index, value_index), f"emulated-{name}", bs, d, dtype)
    assert torch.equal(layout.key_index, key_index) and torch.equal(layout.value_index, value_index)
    assert (layout.key_form is None) == (name == "scrambled")


# --- broken writers must fail loudly -------------------------------------------------------------


def broken(kind, bs, d):
    key_index, value_index = layouts(bs, d)["plain"]
    plain, other = table_writer(key_index, value_index), table_writer(*layouts(bs, d)["tiled-v-first"])
    calls = []

    def write(key, value, key_cache, value_cache, slots):
        calls.append(1)
        if kind == "missing":  # entry (0, 1) is never stored
            key = key.clone()
            key[0, 0, 1] = 0
        elif kind == "duplicated":  # entry (0, 0) also lands where (0, 1) belongs
            key = key.clone()
            key[0, 0, 1] = key[0, 0, 0]
        elif kind == "lossy":  # values are not stored as given
            key, value = key * 0.5, value * 0.5
        elif kind == "out-of-block":  # the last slot's entries spill into the next sub-block
            slots = slots.clone()
            slots[-1] += bs
        elif kind == "moving":  # a different place on every other write
            if len(calls) % 2 == 0:
                return other(key, value, key_cache, value_cache, slots)
        elif kind == "round-trip":  # fine for the codes, wrong for scattered slots (reversed offsets)
            if len(slots) != bs or not torch.equal(slots, slots[0] + torch.arange(bs)):
                slots = (slots // bs) * bs + (bs - 1 - slots % bs)
        plain(key, value, key_cache, value_cache, slots)

    return write


@pytest.mark.parametrize("kind, message", [
    ("missing", r"missing"),
    ("duplicated", r"more than one position"),
    ("lossy", r"does not store the entries"),
    ("out-of-block", r"outside the sub-block"),
    ("moving", r"different places"),
    ("round-trip", r"do not read back"),
])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_broken_writers_fail_loudly(kind, message, dtype):
    with pytest.raises(LayoutError, match=message) as err:
        probe(broken(kind, 32, 64), "broken", 32, 64, dtype)
    assert "'broken'" in str(err.value) and str(dtype) in str(err.value)


def test_a_writer_that_refuses_the_configuration_is_a_layout_error():
    """An ISA the loaded vLLM library does not compile: a LayoutError naming the ISA, not a crash later."""
    with pytest.raises(LayoutError, match="'no-such-isa'"):
        kernel_layout("no-such-isa", 32, 64, torch.bfloat16)


# --- the strided form -----------------------------------------------------------------------------


def expand(form: Strided, n: int) -> torch.Tensor:
    i = torch.arange(n)
    return sum((dig * s for dig, s in zip(form.digits(i), form.strides)), torch.full((n,), form.offset))


@pytest.mark.parametrize("positions", [
    torch.arange(64) * 3 + 5,
    (torch.arange(64) // 16) * 1000 + (torch.arange(64) % 16) * 2,
    (torch.arange(96) // 2) * 32 + torch.arange(96) % 2,
    torch.tensor([7]),
])
def test_strided_form_reproduces_the_positions(positions):
    form = strided_form(positions)
    assert form is not None and math.prod(form.sizes) == positions.numel()
    assert torch.equal(expand(form, positions.numel()), positions)


def test_strided_form_refuses_what_is_not_strided():
    assert strided_form(torch.tensor([0, 1, 2, 4, 5])) is None  # a run of 3 does not divide 5
    assert strided_form(torch.tensor([0, 2, 1, 3, 9, 4])) is None


# --- the choice at startup --------------------------------------------------------------------------


def test_an_unreadable_isa_falls_back_to_the_portable_one_with_a_warning(monkeypatch, caplog):
    from madakv_vllm.integration import cpu_backend

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip(f"the fallback ISA (vec/vec16) is x86's; this CPU is {cpu_name()} ({platform.machine()})")
    real = cpu_backend.kernel_layout

    def fake(isa, *args):
        if isa == "amx":
            raise LayoutError("madakv: emulated unreadable layout")
        return real(isa, *args)

    monkeypatch.setattr(cpu_backend, "kernel_layout", fake)
    with caplog.at_level("WARNING", logger="vllm.madakv"):
        assert cpu_backend.readable_isa("amx", torch.bfloat16, 32, 64, "auto") == "vec"
        assert cpu_backend.readable_isa("amx", torch.bfloat16, 32, 80, "auto") == "vec16"
    warning = caplog.records[0].getMessage()
    assert "'amx'" in warning and "'vec'" in warning and cpu_name() in warning


def test_no_readable_isa_stops_startup_naming_isa_dtype_and_cpu(monkeypatch):
    from madakv_vllm.integration import cpu_backend

    def fake(isa, *args):
        raise LayoutError(f"madakv: emulated unreadable layout of {isa}")

    monkeypatch.setattr(cpu_backend, "kernel_layout", fake)
    with pytest.raises(LayoutError) as err:
        cpu_backend.readable_isa("amx", torch.bfloat16, 32, 64, "auto")
    msg = str(err.value)
    assert "'amx'" in msg and "torch.bfloat16" in msg and cpu_name() in msg
