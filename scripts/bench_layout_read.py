"""Cost of reading KV entries back through a probed layout: the strided view derived from the
writer's tables against the plain gather through the same tables, for each ISA whose writer runs
on this CPU (bf16, the dtype users run).

    python scripts/bench_layout_read.py [--entries 32768] [--head-size 128] [--repeats 9]

Prints the median time per read and the ratio to the ``vec`` strided read, measured in one run.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from madakv_vllm.integration.block_layout import LayoutError, kernel_layout


def median_seconds(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--entries", type=int, default=32768)
    ap.add_argument("--head-size", type=int, default=128)
    ap.add_argument("--block-size", type=int, default=32)
    ap.add_argument("--subblocks", type=int, default=32000)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    bs, d, dtype = args.block_size, args.head_size, torch.bfloat16
    buffer = torch.randn(args.subblocks, 1, 2 * bs, d).to(dtype)
    slots = torch.randint(0, args.subblocks * bs, (args.entries,), generator=torch.Generator().manual_seed(0))
    rows = []
    for isa in ("vec", "vec16", "amx"):
        try:
            layout = kernel_layout(isa, bs, d, dtype)
        except LayoutError as e:
            print(f"{isa}: skipped ({e})")
            continue
        gather = dataclasses.replace(layout, key_form=None, value_form=None)
        assert all(torch.equal(a, b) for a, b in zip(layout.read(buffer, slots), gather.read(buffer, slots)))
        rows.append((isa, "strided view" if layout.key_form else "gather table",
                     median_seconds(lambda: layout.read(buffer, slots), args.repeats)))
        rows.append((isa, "gather table (forced)", median_seconds(lambda: gather.read(buffer, slots), args.repeats)))
    ref = next(t for isa, how, t in rows if isa == "vec" and how == "strided view")
    print(f"{args.entries} entries, head size {d}, block size {bs}, bf16, {args.threads} thread(s)")
    print(f"{'ISA':6} {'read through':24} {'median ms':>10} {'vs vec view':>12}")
    for isa, how, t in rows:
        print(f"{isa:6} {how:24} {t * 1e3:10.2f} {t / ref:11.2f}x")


if __name__ == "__main__":
    main()
