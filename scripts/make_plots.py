#!/usr/bin/env python3
"""Plots of docs/results.md (matplotlib PNG) from the benchmark JSONs.

    python scripts/make_plots.py [--data docs/data] [--out docs/plots]

Reads whichever of these exist in ``--data`` (copies of the files the benchmarks write to
models/, committed so the plots can be redrawn):

* ``proxy-eval-r4.json`` (scripts/eval_proxy.py, proxy v1 test split) -> accuracy_vs_budget.png
* ``proxy-eval-v2-r7.json`` (scripts/eval_proxy.py, proxy v2 test split) -> accuracy_vs_budget_v2.png
* ``bench_decode.json`` (scripts/bench_decode.py)  -> memory_decode_vs_budget.png
* ``bench_serve.json``  (scripts/bench_serve.py)   -> capacity_vs_budget.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _budget(b) -> float:
    return 1.0 if b in (None, "full") else float(b)


def _budget_axis(ax, ticks=(0.05, 0.1, 0.2, 0.5, 1.0)) -> None:
    from matplotlib.ticker import NullFormatter

    ax.set_xscale("log")
    ax.set_xticks(list(ticks))
    ax.set_xticklabels([f"{t:g}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("KV budget (fraction of prompt)")
    ax.grid(alpha=0.3)


def _save(fig, path: Path, plt) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_accuracy(data: dict, out: Path, plt, png: str = "accuracy_vs_budget.png") -> Path:
    """Mean exact match, per-token accuracy per task, then agreement with and KL to the full cache
    (mean over tasks)."""
    table = data["table"]
    tasks = sorted({t for row in table.values() for t in row["tasks"]})
    full = next((r for r in table.values() if r["policy"] == "full"), None)
    names = sorted({k.rsplit("@", 1)[0] for k in table} - {"full"})

    def mean(r, k):
        return sum(r["tasks"][t][k] for t in tasks) / len(tasks)

    panels = [("exact match, mean over tasks", lambda r: r["mean_acc"], (-0.02, 1.02))]
    panels += [(f"{t}: per-token accuracy", lambda r, t=t: r["tasks"][t]["tok"], (0, None)) for t in tasks]
    panels += [("answer = full cache's (agree)", lambda r: mean(r, "agree"), (-0.02, 1.02)),
               ("KL(full || policy), answer steps", lambda r: mean(r, "kl"), (0, None))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.9))
    for ax, (title, get, ylim) in zip(axes, panels):
        for name in names:
            rows = sorted((_budget(r["budget"]), get(r)) for k, r in table.items()
                          if k.rsplit("@", 1)[0] == name and r["budget"] is not None)
            if not rows:
                continue
            style = dict(lw=2.4, color="black") if name == "madakv" else dict(lw=1.2, alpha=0.85)
            if name.startswith("madakv-"):
                style["ls"] = "--"
            ax.plot([b for b, _ in rows], [a for _, a in rows], marker="o", ms=3.5, label=name, **style)
        if full is not None:
            ax.axhline(get(full), ls=":", color="grey", lw=1, label="full cache")
        _budget_axis(ax, (0.05, 0.1, 0.2, 0.5))
        ax.set_title(title, fontsize=10)
        ax.set_ylim(*ylim)
    axes[-1].legend(fontsize=7, loc="upper right")
    fig.suptitle(f"Proxy VLM {Path(data.get('model', '?')).name} through vLLM, split "
                 f"{data.get('split', '?')}, {data.get('n_per_task', '?')} prompts per task: "
                 "answers vs budget per policy")
    return _save(fig, out / png, plt)


def plot_decode(data: dict, out: Path, plt) -> Path:
    rows = data["rows"]
    lengths = sorted({r["prompt_tokens"] for r in rows})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8))
    for n in lengths:
        rs = sorted((_budget(r["budget"]), r) for r in rows if r["prompt_tokens"] == n)
        b = [x for x, _ in rs]
        a1.plot(b, [r["kv_ratio"] for _, r in rs], marker="o", label=f"{n} tokens")
        line = a2.plot(b, [r["decode_speedup"] for _, r in rs], marker="o", label=f"{n} tokens: measured")[0]
        a2.plot(b, [r["physical_bound_speedup"] for _, r in rs], ls="--", color=line.get_color(),
                label=f"{n} tokens: bound")
    a1.plot([0.05, 1], [0.05, 1], ls=":", color="grey", label="= budget")
    a1.set_ylabel("KV bytes held / stock")
    a2.set_ylabel("decode speed-up vs stock (ms/token)")
    a2.axhline(1.0, color="grey", lw=0.8)
    for ax in (a1, a2):
        _budget_axis(ax)
        ax.legend(fontsize=7)
    fig.suptitle("Per-request KV memory and decode latency vs budget (madakv / stock vLLM, one run)")
    return _save(fig, out / "memory_decode_vs_budget.png", plt)


def plot_capacity(data: dict, out: Path, plt) -> Path:
    rows = [r for r in data["rows"] if r["engine"] != "stock"]
    rs = sorted((_budget(r["engine"]), r) for r in rows)
    b = [x for x, _ in rs]
    fig, ax = plt.subplots(figsize=(5.6, 3.8))
    ax.plot(b, [r["running_max_ratio"] for _, r in rs], marker="o", label="running requests (max)")
    ax.plot(b, [r["running_avg_ratio"] for _, r in rs], marker="o", label="running requests (time avg)")
    ax.plot(b, [r["output_throughput_ratio"] for _, r in rs], marker="s", label="output tokens/s")
    ax.plot(b, [1 / x for x in b], ls=":", color="grey", label="1 / budget")
    ax.axhline(1.0, color="grey", lw=0.8)
    _budget_axis(ax)
    ax.set_yscale("log")
    ax.set_yticks([1, 2, 4, 8, 16])
    ax.set_yticklabels(["1", "2", "4", "8", "16"])
    ax.set_ylabel("madakv / stock, same KV pool")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    ax.set_title(f"Capacity and throughput vs budget (vllm bench serve,\n"
                 f"{data['args']['num_prompts']} requests: running counts cap at that)", fontsize=10)
    return _save(fig, out / "capacity_vs_budget.png", plt)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=ROOT / "docs" / "data")
    ap.add_argument("--out", type=Path, default=ROOT / "docs" / "plots")
    args = ap.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    args.out.mkdir(parents=True, exist_ok=True)
    made = []
    for name, fn, extra in (("proxy-eval-r4.json", plot_accuracy, ()),
                            ("proxy-eval-v2-r7.json", plot_accuracy, ("accuracy_vs_budget_v2.png",)),
                            ("bench_decode.json", plot_decode, ()), ("bench_serve.json", plot_capacity, ())):
        src = args.data / name
        if src.exists():
            made.append(fn(json.loads(src.read_text()), args.out, plt, *extra))
        else:
            print(f"skip: {src} not found")
    for p in made:
        print("wrote", p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
