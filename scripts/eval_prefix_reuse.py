#!/usr/bin/env python3
"""Fidelity across turns: does per-request KV eviction stay as accurate when a request reuses an
earlier request's prefix KV from vLLM's prefix cache?

    .venv/bin/python scripts/eval_prefix_reuse.py --split dev  --n-per-kind 20  --naive --out docs/data/prefix-reuse-dev.json
    .venv/bin/python scripts/eval_prefix_reuse.py --split test --n-per-kind 100 --naive --out docs/data/prefix-reuse-test.json
    # the needle-task groups (both proxies answer the code to every question; see shared_prefix.py)
    .venv/bin/python scripts/eval_prefix_reuse.py --split dev --kinds code+strip code+pair --configs full --n-per-kind 20

Prompts: madakv_eval/shared_prefix.py -- by default the ``labels`` groups: one shared context
(grey images, filler text, 6 labelled coloured images) and two questions, each a second user turn
naming 3 different labels ("Find the dog, cat and bus pictures. Name each of those pictures and
its colour."), answered by proxy v2 (models/proxy-vlm2, rebuilt from scripts/assets/proxy_vlm2 if
missing). The token ids of a group's requests are identical up to the question, and each
question needs different cache entries (its own labelled images), so each request has to
compress its KV for its OWN question (with its own observation window), after reusing the shared
prefix's uncompressed pages. Caveat: v2 was trained with the instruction before the context and
answers only ~35% of these questions exactly with the full cache (dev split).

Two runs of the same requests, each answered in *rounds* (round r: the r-th question of every
group, one ``generate`` call), with the policies of ``--configs`` (per-request
``SamplingParams.extra_args``; server default policy ``madakv``, exact budgets:
``page_aligned: false``, as scripts/eval_proxy.py):

* ``reuse``: one engine with ``enable_prefix_caching=True``; the prefix cache is reset before each
  config, then round 0 primes it and the later rounds hit it;
* ``fresh``: no reuse -- ``--fresh engine`` (default): a second engine with prefix caching off;
  ``--fresh reset``: the reuse engine, its prefix cache reset before every round.

Reported per question type and pooled, for all requests and for the *reusing* ones (round >= 1,
the requests that could hit): exact match of the K-token answer (reuse, fresh), the paired
difference reuse - fresh with a 95% bootstrap interval (groups resampled within each kind), the
fraction of requests whose generated tokens are identical in both runs, and the prefix-cache hit
tokens actually obtained: per request (``RequestOutput.num_cached_tokens``) and from the engine's
counters (``vllm:prefix_cache_queries`` / ``vllm:prefix_cache_hits``, ``llm.get_metrics()``). If
the reuse run got no hits, the report says "NO PREFIX REUSE HAPPENED" and its equality proves
nothing (e.g. a server started with prefix caching off).

``--naive`` (Hugging Face, same weights, as eval_proxy.py's ``retained_mass``): for each reusing
request, which fraction of ITS needle tokens a policy keeps when it selects with its own
observation window (what the plugin does) versus a NAIVE reuse that keeps the entries the group's
FIRST question's compression selected (the first prompt's window, keys and budget). Mean
needle_kept of both and the paired difference with a 95% bootstrap interval, per budget of
``--naive-configs``.

Outputs a markdown table on stdout and JSON at ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from madakv_eval import proxy_tasks as pt  # noqa: E402
from madakv_eval import shared_prefix as sp  # noqa: E402

CONFIGS = ("full", "madakv:0.5", "madakv:0.2", "snapkv:0.2")
NAIVE_CONFIGS = ("madakv:0.2", "snapkv:0.2")
HIT_METRICS = {"queries": "vllm:prefix_cache_queries", "hits": "vllm:prefix_cache_hits"}


def parse_config(text: str) -> tuple[str, float | None]:
    """``policy`` or ``policy:budget`` -> (policy, budget or None)."""
    name, _, b = text.partition(":")
    return name, (float(b) if b else None)


def config_key(name: str, budget: float | None) -> str:
    return name if budget is None else f"{name}@{budget:g}"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help="proxy VLM dir; default models/proxy-vlm2 (v2, trained on labelled_images) for the "
                        "'labels' groups, else models/proxy-vlm (v1); rebuilt from scripts/assets if missing")
    p.add_argument("--split", default="dev", choices=["dev", "test"],
                   help="'dev' while building the study, 'test' for the report")
    p.add_argument("--seed", type=int, default=0, help="base seed of the split")
    p.add_argument("--kinds", nargs="+", default=["labels"], choices=list(sp.GROUP_KINDS),
                   help="group kinds (madakv_eval/shared_prefix.py); only 'labels' is answered well by a proxy")
    p.add_argument("--n-per-kind", type=int, default=40, help="groups per kind")
    p.add_argument("--images", type=int, nargs=2, default=(24, 64), metavar=("LO", "HI"))
    p.add_argument("--configs", nargs="+", default=list(CONFIGS), metavar="POLICY[:BUDGET]")
    p.add_argument("--fresh", choices=["engine", "reset"], default="engine",
                   help="how the no-reuse run avoids the prefix cache: a second engine with prefix caching "
                        "off, or the reuse engine with its prefix cache reset before every round")
    p.add_argument("--skip-vllm", action="store_true", help="only the --naive part")
    p.add_argument("--naive", action="store_true", help="also the naive-reuse needle_kept study (HF)")
    p.add_argument("--naive-configs", nargs="+", default=list(NAIVE_CONFIGS), metavar="POLICY:BUDGET")
    p.add_argument("--bootstrap", type=int, default=2000)
    p.add_argument("--max-num-batched-tokens", type=int, default=4096)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=REPO / "models" / "prefix-reuse.json")
    args = p.parse_args(argv)
    args.version = "v2" if "labels" in args.kinds else "v1"
    if args.model is None:
        args.model = REPO / "models" / pt.PROXY_VERSIONS[args.version]["model"]
    return args


# ----------------------------------------------------------------------------- vLLM part
def make_llm(args, prefix_caching: bool):
    from vllm import LLM

    return LLM(
        model=str(args.model),
        attention_backend="madakv",
        additional_config={"madakv": {"policy": "madakv", "page_aligned": False}},
        enable_prefix_caching=prefix_caching,
        disable_log_stats=False,  # llm.get_metrics() needs the stat loggers
        enforce_eager=True,
        block_size=32,
        dtype="float32",
        seed=0,
        max_model_len=4096,
        max_num_batched_tokens=args.max_num_batched_tokens,
        limit_mm_per_prompt={"image": args.images[1]},
    )


def prefix_caching_enabled(llm) -> bool:
    """What the engine actually runs with (a plugin may have turned it off at startup)."""
    return bool(llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)


def hit_counters(llm) -> dict[str, int]:
    """Cumulative prefix-cache counters of the engine (0 where the engine has none)."""
    out = {k: 0 for k in HIT_METRICS}
    for m in llm.get_metrics():
        for k, name in HIT_METRICS.items():
            if m.name in (name, name + "_total") and hasattr(m, "value"):
                out[k] += int(m.value)
    return out


def run_rounds(llm, groups, configs, reset_each_round: bool) -> dict:
    """{config key: {"tokens": [[ids] per request], "cached": [int per request], "counters": {...},
    "reset_ok": bool}}; requests in flat order (group by group, question by question)."""
    from vllm import SamplingParams

    rounds = max(len(g.questions) for g in groups)
    flat = {(gi, r): i for i, (gi, r) in enumerate((gi, r) for gi, g in enumerate(groups)
                                                     for r in range(len(g.questions)))}
    prompts = {key: pt.vllm_prompt(groups[key[0]].questions[key[1]]) for key in flat}
    results = {}
    for name, budget in configs:
        extra = {"madakv_policy": name}
        if budget is not None:
            extra["madakv_budget"] = budget
        toks: list = [None] * len(flat)
        cached = [0] * len(flat)
        reset_ok = bool(llm.reset_prefix_cache())
        before = hit_counters(llm)
        t0 = time.time()
        for r in range(rounds):
            keys = [(gi, r) for gi, g in enumerate(groups) if r < len(g.questions)]
            if reset_each_round and r > 0:
                reset_ok &= bool(llm.reset_prefix_cache())
            sps = [SamplingParams(max_tokens=pt.CODE_LEN[groups[gi].questions[r].task] + 1, temperature=0.0,
                                  ignore_eos=True, extra_args=extra) for gi, r in keys]
            outs = llm.generate([prompts[k] for k in keys], sps, use_tqdm=False)
            for k, o in zip(keys, outs):
                toks[flat[k]] = list(o.outputs[0].token_ids)
                cached[flat[k]] = int(o.num_cached_tokens or 0)
        after = hit_counters(llm)
        if not reset_ok:
            print(f"  WARNING {config_key(name, budget)}: llm.reset_prefix_cache() failed; earlier requests' "
                  "prefixes may have been reused where none should be", flush=True)
        results[config_key(name, budget)] = {
            "tokens": toks, "cached": cached, "reset_ok": reset_ok,
            "counters": {k: after[k] - before[k] for k in after}, "seconds": round(time.time() - t0, 1),
        }
        print(f"  {config_key(name, budget)}: {len(flat)} requests in {time.time() - t0:.1f} s, "
              f"cached tokens {sum(cached)}, counters {results[config_key(name, budget)]['counters']}", flush=True)
    return results


# ----------------------------------------------------------------------------- scoring
def flat_requests(groups):
    """[(group index, round, Sample)] in the flat order of run_rounds."""
    return [(gi, r, q) for gi, g in enumerate(groups) for r, q in enumerate(g.questions)]


def cluster_draws(groups, resamples: int, seed: int = 0) -> list[list[int]]:
    """Bootstrap resamples of group indices, stratified by kind."""
    by_kind: dict[str, list[int]] = {}
    for gi, g in enumerate(groups):
        by_kind.setdefault(g.kind, []).append(gi)
    rng = random.Random(seed)
    return [[rng.choice(ix) for ix in by_kind.values() for _ in ix] for _ in range(resamples)]


def _ci95(values: list[float]) -> list[float] | None:
    v = sorted(x for x in values if not math.isnan(x))
    n = len(v)
    return [v[int(0.025 * n)], v[int(0.975 * n) - 1]] if n else None


def _mean(v):
    v = list(v)
    return sum(v) / len(v) if v else float("nan")


def score(groups, reuse: dict, fresh: dict, tokenizer, draws) -> dict:
    """Per config: per cell (task or "pooled") x subset ("all", "reusing"): n, acc_reuse,
    acc_fresh, diff (reuse - fresh) with a cluster-bootstrap CI, identical, cached tokens."""
    reqs = flat_requests(groups)
    targets = [pt.target_token_ids(q, tokenizer)[1:] for _, _, q in reqs]
    members: dict[int, list[int]] = {}
    for i, (gi, _, _) in enumerate(reqs):
        members.setdefault(gi, []).append(i)
    tasks = sorted({q.task for _, _, q in reqs})
    out = {}
    for key in reuse:
        ru, fr = reuse[key], fresh[key]
        acc_r = [float(t[1:] == y) for t, y in zip(ru["tokens"], targets)]
        acc_f = [float(t[1:] == y) for t, y in zip(fr["tokens"], targets)]
        tok_r = [_mean(float(a == b) for a, b in zip(t[1:], y)) for t, y in zip(ru["tokens"], targets)]
        tok_f = [_mean(float(a == b) for a, b in zip(t[1:], y)) for t, y in zip(fr["tokens"], targets)]
        same = [float(a == b) for a, b in zip(ru["tokens"], fr["tokens"])]
        cells = {}
        for subset in ("all", "reusing"):
            for cell in tasks + ["pooled"]:
                def keep(i, cell=cell, subset=subset):
                    _, r, q = reqs[i]
                    return (cell == "pooled" or q.task == cell) and (subset == "all" or r > 0)

                idx = [i for i in range(len(reqs)) if keep(i)]
                if not idx:
                    continue
                diffs = []
                for d in draws:
                    pick = [i for gi in d for i in members[gi] if keep(i)]
                    if pick:
                        diffs.append(_mean(acc_r[i] - acc_f[i] for i in pick))
                cells[f"{subset}/{cell}"] = {
                    "n": len(idx),
                    "acc_reuse": _mean(acc_r[i] for i in idx),
                    "acc_fresh": _mean(acc_f[i] for i in idx),
                    "tok_reuse": _mean(tok_r[i] for i in idx),
                    "tok_fresh": _mean(tok_f[i] for i in idx),
                    "diff": _mean(acc_r[i] - acc_f[i] for i in idx),
                    "ci95": _ci95(diffs),
                    "only_reuse_right": sum(acc_r[i] > acc_f[i] for i in idx),
                    "only_fresh_right": sum(acc_f[i] > acc_r[i] for i in idx),
                    "identical": _mean(same[i] for i in idx),
                    "cached_tokens_reuse": sum(ru["cached"][i] for i in idx),
                    "cached_tokens_fresh": sum(fr["cached"][i] for i in idx),
                    "requests_with_hits": sum(ru["cached"][i] > 0 for i in idx),
                }
        out[key] = {
            "cells": cells,
            "answers_reuse": [tokenizer.decode(t) for t in ru["tokens"]],
            "answers_fresh": [tokenizer.decode(t) for t in fr["tokens"]],
            "acc_reuse_per_request": acc_r, "acc_fresh_per_request": acc_f, "identical_per_request": same,
            "cached_reuse_per_request": ru["cached"], "cached_fresh_per_request": fr["cached"],
            "counters_reuse": ru["counters"], "counters_fresh": fr["counters"],
            "reset_ok": {"reuse": ru["reset_ok"], "fresh": fr["reset_ok"]},
            "seconds": {"reuse": ru["seconds"], "fresh": fr["seconds"]},
        }
    return out


# ----------------------------------------------------------------------------- naive reuse (HF)
def naive_reuse(args, groups, configs, draws) -> dict:
    """{config key: {per task and pooled: n, kept_own, kept_naive, diff (naive - own), ci95}}."""
    import torch
    from transformers import AttentionInterface, AutoProcessor, Qwen2VLForConditionalGeneration

    from madakv_vllm.config import IMAGE, TEXT, MadaKVConfig
    from madakv_vllm.policies import make_policy

    er = _load_eval_proxy()
    AttentionInterface.register("madakv_capture", er._capture_attention)
    processor = AutoProcessor.from_pretrained(str(args.model))
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(args.model), dtype=torch.float32, attn_implementation="madakv_capture")
    model.eval()
    batcher = pt.HFBatcher(processor)

    def capture(sample):
        er._CAPTURED.clear()
        inputs = batcher([sample], with_answer=False)
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        layers = sorted(er._CAPTURED, key=lambda x: x[0])
        ids = inputs["input_ids"][0]
        return [q for _, q, _ in layers], [k for _, _, k in layers], ids

    def select(cfg, qs, ks, ids):
        n = ids.numel()
        w = min(cfg.window, n)
        modality = torch.where(ids == batcher.image_token_id, IMAGE, TEXT)
        return make_policy(cfg).select_all([q[:, n - w:] for q in qs], ks, modality, cfg.budget_tokens(n))

    def kept_fraction(kept, needle, n):
        vals = []
        for kept_l in kept:
            for idx in kept_l:
                keep = torch.zeros(n, dtype=torch.bool)
                keep[idx] = True
                vals.append(float(keep[needle].float().mean()))
        return sum(vals) / len(vals)

    rows = {config_key(*c): [] for c in configs}  # (group index, task, own, naive)
    for gi, g in enumerate(groups):
        first = capture(g.questions[0])
        n0 = first[2].numel()
        for r in range(1, len(g.questions)):
            q = g.questions[r]
            qs, ks, ids = capture(q)
            n = ids.numel()
            L = sp.shared_prefix_len([first[2].tolist(), ids.tolist()])
            # the needle tokens in the shared prefix (a labels question's instruction, in the
            # suffix, names its labels again: recomputed by every request, not a reuse question)
            needle = torch.tensor([i for i in pt.needle_token_positions(q, processor.tokenizer) if i < L])
            if needle.numel() == 0:
                raise AssertionError(f"group {gi}: no needle of {q.task} in the shared prefix")
            for name, budget in configs:
                cfg = MadaKVConfig().with_overrides({"policy": name, "budget": budget})
                own = kept_fraction(select(cfg, qs, ks, ids), needle, n)
                naive = kept_fraction(select(cfg, *first), needle, n0)
                rows[config_key(name, budget)].append((gi, q.task, own, naive))
    out = {}
    for key, rs in rows.items():
        tasks = sorted({t for _, t, _, _ in rs})
        cells = {}
        for cell in tasks + ["pooled"]:
            sel = [x for x in rs if cell == "pooled" or x[1] == cell]
            by_group: dict[int, list] = {}
            for x in sel:
                by_group.setdefault(x[0], []).append(x)
            diffs = []
            for d in draws:
                pick = [x for gi in d for x in by_group.get(gi, [])]
                if pick:
                    diffs.append(_mean(x[3] - x[2] for x in pick))
            cells[cell] = {"n": len(sel), "kept_own": _mean(x[2] for x in sel), "kept_naive": _mean(x[3] for x in sel),
                           "diff": _mean(x[3] - x[2] for x in sel), "ci95": _ci95(diffs)}
        out[key] = cells
    return out


def _load_eval_proxy():
    import importlib.util

    spec = importlib.util.spec_from_file_location("eval_proxy", REPO / "scripts" / "eval_proxy.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------- report
def markdown(report: dict) -> str:
    lines = []
    head = (f"split `{report['split']}`, seed {report['seed']}, {report['n_groups']} groups "
            f"({report['n_per_kind']} per kind: {', '.join(report['kinds'])}), {report['n_requests']} requests "
            f"({report['n_reusing']} reusing); model {Path(report['model']).name}; fresh = {report['fresh']}")
    lines.append(head)
    if report.get("vllm"):
        v = report["vllm"]
        lines.append("")
        lines.append(f"prefix caching as the reuse engine runs it: {v['reuse_engine_prefix_caching']}; "
                     f"prefix-cache hit tokens (reuse run, all configs): {v['reuse_hit_tokens']} "
                     f"(engine counters: {v['reuse_counters']}); fresh run: {v['fresh_hit_tokens']}")
        if not v["reuse_happened"]:
            lines.append("")
            lines.append("**NO PREFIX REUSE HAPPENED**: the reuse run got 0 prefix-cache hit tokens, so "
                         "'reuse' below is just a second fresh run; its equality with fresh proves nothing.")
        if v["fresh_hit_tokens"]:
            lines.append("")
            lines.append(f"**WARNING**: the fresh run got {v['fresh_hit_tokens']} prefix-cache hit tokens.")
        for subset in ("all", "reusing"):
            lines.append("")
            lines.append(f"#### {subset} requests" + (" (round >= 1: the requests that could hit)" if subset == "reusing" else ""))
            lines.append("")
            lines.append("| config | question | n | acc fresh | acc reuse | reuse - fresh [95% CI] | tok fresh | tok reuse | identical tokens | hit tokens (reuse) | requests with hits |")
            lines.append("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
            for key, row in report["table"].items():
                for cell, d in row["cells"].items():
                    sub, name = cell.split("/")
                    if sub != subset:
                        continue
                    ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
                    lines.append(f"| {key} | {name} | {d['n']} | {d['acc_fresh']:.3f} | {d['acc_reuse']:.3f} | "
                                 f"{d['diff']:+.3f}{ci} | {d['tok_fresh']:.3f} | {d['tok_reuse']:.3f} | "
                                 f"{d['identical']:.3f} | {d['cached_tokens_reuse']} | "
                                 f"{d['requests_with_hits']}/{d['n']} |")
    if report.get("naive"):
        lines.append("")
        lines.append("#### naive reuse: needle tokens kept for a reusing request's OWN question (HF, offline selection)")
        lines.append("")
        lines.append("| config | question | n | own window | first question's selection | naive - own [95% CI] |")
        lines.append("|---|---|---:|---:|---:|---:|")
        for key, cells in report["naive"].items():
            for cell, d in cells.items():
                ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
                lines.append(f"| {key} | {cell} | {d['n']} | {d['kept_own']:.3f} | {d['kept_naive']:.3f} | {d['diff']:+.3f}{ci} |")
    return "\n".join(lines)


def _rel(path: Path) -> str:
    """``path`` relative to the repository where it lies inside it."""
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def main(argv=None) -> None:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    if not (args.model / "model.safetensors").is_file():
        print(f"{args.model} missing: rebuilding from {pt.default_assets_dir(args.version)}", flush=True)
        pt.rebuild_proxy_model(args.model, pt.default_assets_dir(args.version))
    info_path = args.model / pt.MODEL_INFO
    trained_on = json.loads(info_path.read_text()).get("tasks") if info_path.is_file() else None
    needed = {t for k in args.kinds for t in sp.GROUP_KINDS[k][1]}
    if not trained_on or not needed <= set(trained_on):
        sys.exit(f"{args.model} lists tasks {trained_on}; the groups need {sorted(needed)}")
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    groups = sp.make_groups(args.kinds, args.n_per_kind, args.split, args.seed, tuple(args.images))
    reqs = flat_requests(groups)
    prefix = [sp.shared_prefix_len([pt.prompt_token_ids(q, tok) for q in g.questions]) for g in groups]
    lengths = [len(pt.prompt_token_ids(q, tok)) for _, _, q in reqs]
    print(f"{len(groups)} groups, {len(reqs)} requests (split {args.split!r}, seed {args.seed}); prompt tokens "
          f"{min(lengths)}-{max(lengths)}, shared prefix {min(prefix)}-{max(prefix)} tokens", flush=True)
    draws = cluster_draws(groups, args.bootstrap)
    configs = [parse_config(c) for c in args.configs]
    report = {
        "model": _rel(args.model), "split": args.split, "seed": args.seed, "kinds": args.kinds,
        "n_per_kind": args.n_per_kind, "images": list(args.images), "n_groups": len(groups),
        "n_requests": len(reqs), "n_reusing": sum(r > 0 for _, r, _ in reqs), "fresh": args.fresh,
        "configs": args.configs, "prompt_tokens": {"min": min(lengths), "max": max(lengths), "mean": _mean(lengths)},
        "shared_prefix_tokens": {"min": min(prefix), "max": max(prefix), "mean": _mean(prefix)},
        "requests": [{"group": gi, "kind": groups[gi].kind, "round": r, "task": q.task, "answer": list(q.answer)}
                     for gi, r, q in reqs],
        "seconds": {},
    }
    if not args.skip_vllm:
        t0 = time.time()
        llm = make_llm(args, prefix_caching=True)
        pc_on = prefix_caching_enabled(llm)
        print(f"reuse engine: prefix caching {'ON' if pc_on else 'OFF (turned off at startup)'}", flush=True)
        reuse = run_rounds(llm, groups, configs, reset_each_round=False)
        if args.fresh == "reset":
            fresh = run_rounds(llm, groups, configs, reset_each_round=True)
            pc_fresh = pc_on
        del llm
        if args.fresh == "engine":
            import gc

            gc.collect()
            llm = make_llm(args, prefix_caching=False)
            pc_fresh = prefix_caching_enabled(llm)
            fresh = run_rounds(llm, groups, configs, reset_each_round=False)
            del llm
        report["seconds"]["vllm"] = round(time.time() - t0, 1)
        table = score(groups, reuse, fresh, tok, draws)
        hit_tokens = sum(sum(r["cached"]) for r in reuse.values())
        counters = {k: sum(r["counters"][k] for r in reuse.values()) for k in HIT_METRICS}
        report["vllm"] = {
            "reuse_engine_prefix_caching": pc_on, "fresh_engine_prefix_caching": pc_fresh,
            "reuse_hit_tokens": hit_tokens, "reuse_counters": counters,
            "fresh_hit_tokens": sum(sum(r["cached"]) for r in fresh.values()),
            "fresh_counters": {k: sum(r["counters"][k] for r in fresh.values()) for k in HIT_METRICS},
            "reuse_happened": hit_tokens > 0 and counters["hits"] > 0,
        }
        report["table"] = table
        report["full_cache_accuracy"] = {
            cell: {"fresh": d["acc_fresh"], "reuse": d["acc_reuse"], "n": d["n"]}
            for cell, d in table.get("full", {}).get("cells", {}).items() if cell.startswith("all/")}
        if not report["vllm"]["reuse_happened"]:
            print("\n" + "!" * 78 + "\nNO PREFIX REUSE HAPPENED: the reuse run got 0 prefix-cache hits "
                  f"(engine prefix caching {'on' if pc_on else 'off'}); reuse == fresh below proves nothing.\n"
                  + "!" * 78, flush=True)
    if args.naive:
        t1 = time.time()
        report["naive"] = naive_reuse(args, groups, [parse_config(c) for c in args.naive_configs], draws)
        report["seconds"]["naive"] = round(time.time() - t1, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print()
    print(markdown(report))
    print(f"\nwrote {args.out} (seconds: {report['seconds']})")


if __name__ == "__main__":
    main()
