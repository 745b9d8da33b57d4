#!/usr/bin/env python3
"""Accuracy proxy for KV-cache eviction: every policy at every budget, end to end through vLLM,
on the synthetic long-context tasks of madakv_eval/proxy_tasks.py, with the trained proxy VLM.

    .venv/bin/python scripts/train_proxy_vlm.py --rebuild-only   # models/proxy-vlm from the assets
    .venv/bin/python scripts/eval_proxy.py [--n-per-task 40] [--out models/proxy-eval.json]

One in-process vLLM engine (``--attention-backend madakv``, server policy ``full``, exact rather
than page-aligned budgets: ``page_aligned: false``, see docs/integration.md); each request
carries its policy and budget in ``SamplingParams.extra_args``. Held-out set: ``--n-per-task``
samples of each task from the "eval" split (24-64 images, ~600-1400 prompt tokens), never seen in
training. Prompts end with ``Answer``; every request generates K + 1 tokens greedily (K = 6 for the
text needle, 4 for the image needle, 3 for the comparison) -- ``:``, which the prefill pass
computes over the full prompt (before eviction), then the K answer tokens, each from a decode
step over the compressed cache -- with the log-probabilities of the whole vocabulary. (A
single-token answer measures no eviction: the prefill pass computes it into the observation
window every policy keeps, so every policy tied with full cache; see
madakv_eval/proxy_tasks.py.) For each policy x budget x task:

* ``acc``      -- exact match of the whole K-token answer;
* ``tok``      -- per-token accuracy of the K answer tokens (position by position);
* ``tok1`` / ``tok_rest`` -- the same for the first answer token only (which the prefill pass can
  precompute into the window) and for tokens 2..K (which must be read from the cache by decode);
* ``agree``    -- the K + 1 generated tokens equal the full-cache ones;
* ``dlogp``    -- mean |log p_policy(t*) - log p_full(t*)|, t* = the full-cache token, and
* ``kl``       -- mean KL(p_full || p_policy) over the vocabulary, both averaged over the answer
  steps whose generated prefix still equals the full-cache one (same context; the first step
  that diverges is included);
* ``sep_ok``   -- the first generated token is ``:`` (a sanity check: it never sees eviction).

Retained attention mass (``--mass-per-task`` samples per task, in Hugging Face transformers with
the same weights): the model's own post-RoPE q/k of every layer are captured, each policy selects
with ``make_policy(cfg).select_all`` exactly as the plugin does, and the script reports, averaged
over samples, layers and KV heads:

* ``mass``        -- fraction of the observation window's attention mass (unpooled window
  attention, GQA-averaged: ``window_scores``) that falls on the kept tokens;
* ``mass_outside`` -- the same restricted to tokens before the window (the part eviction decides);
* ``needle_kept`` -- fraction of the needle tokens (text-needle value token, needle image tokens)
  kept, over layers and heads.

``--dtype`` (default float32) and ``--kv-cache-dtype`` (default auto; fp8 variants on x86 CPUs with
AVX-512 or AMX) set the engine's model and KV cache dtypes; both are recorded in the JSON, and
scripts/compare_kv_dtypes.py pairs two such files prompt by prompt.

Outputs a table on stdout and JSON at ``--out``. The model must have been trained on the current
task set (``"tasks"`` in its madakv_proxy_vlm.json); otherwise the script exits without scoring.
Timing (2-core CPU, 40 prompts per task, 37 configs, K + 1 tokens each): ~5 min.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from madakv_eval import proxy_tasks as pt  # noqa: E402
from madakv_vllm.config import EXPERIMENTAL_PREFIX, IMAGE, POLICIES, TEXT, moved_to_experimental  # noqa: E402

EVAL_IMAGES = (24, 64)
BUDGETS = (0.5, 0.2, 0.1, 0.05)
#: MadaKV ablations (the paper's two switches), run beside the policies by default.
VARIANTS = {
    "madakv-mpa": {"policy": "madakv", "hcc": False},  # MPA only
    "madakv-hcc": {"policy": "madakv", "mpa": False},  # HCC only
}


def config_fields(name: str) -> dict:
    """MadaKVConfig fields of a policy name or a VARIANTS name, flat as per-request args spell them
    (``experimental_mpa_mix``; ``MadaKVConfig().with_overrides`` reads them)."""
    return dict(VARIANTS[name]) if name in VARIANTS else {"policy": name}


def parse_variant(text: str) -> tuple[str, dict]:
    """``NAME:key=value,key=value`` (values as JSON where they parse) -> (NAME, fields). A reading
    kept for evaluation only may be named as before it moved (``mpa_mix=0.75``, ``hcc_mode=global``):
    it is set in the config's experimental block (``experimental_mpa_mix``), so the dev-split
    commands in docs/results.md still run."""
    name, _, body = text.partition(":")
    fields = {}
    for item in filter(None, body.split(",")):
        key, _, value = item.partition("=")
        key = key.strip()
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            value = value.strip()
        fields[EXPERIMENTAL_PREFIX + key if moved_to_experimental(key, value) else key] = value
    fields.setdefault("policy", "madakv")
    return name, fields


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=REPO / "models" / "proxy-vlm",
                   help="model dir (rebuilt from scripts/assets/proxy_vlm if missing)")
    p.add_argument("--n-per-task", type=int, default=40)
    p.add_argument("--images", type=int, nargs=2, default=EVAL_IMAGES, metavar=("LO", "HI"))
    p.add_argument("--policies", nargs="+", default=[q for q in POLICIES if q != "full"] + list(VARIANTS),
                   help=f"policies and/or MadaKV ablations {sorted(VARIANTS)}")
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--mass-per-task", type=int, default=4, help="samples per task for retained mass (0: skip)")
    p.add_argument("--seed", type=int, default=0, help="base seed of the split")
    p.add_argument("--split", default="eval", choices=["eval", "dev", "test"],
                   help="prompt split: 'dev' for tuning, 'test' for reporting only (never tuned on); "
                        "'eval' is the older, undivided split (tuned on; not for reporting)")
    p.add_argument("--variant", action="append", default=[], metavar="NAME:key=value,...",
                   help="an extra MadaKVConfig variant to run as a policy NAME (e.g. "
                        "'hccg:hcc_mode=global,theta=0.7'; readings of the experimental block by their own "
                        "name or as experimental_<name>); repeatable")
    p.add_argument("--reference", default="madakv",
                   help="paired bootstrap intervals of every other policy against this one, per budget")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples (0: skip the intervals)")
    p.add_argument("--report", type=Path, nargs="+", metavar="JSON",
                   help="only print markdown tables (exact match per policy x budget, paired intervals) of "
                        "earlier --out files; runs no model")
    p.add_argument("--pooled", action="store_true",
                   help="with --report: also each policy's mean exact match over every file and budget "
                        "(the dev splits' selection rule), with a paired bootstrap interval of --reference "
                        "minus the policy")
    p.add_argument("--merge", type=Path, nargs="+", metavar="JSON",
                   help="combine earlier --out files of the same prompts (same model, split, seed, prompts per "
                        "task; the full cache's answers must match exactly) into --out, with paired intervals "
                        "against --reference across them; the first file wins a policy@budget that repeats (a "
                        "policy whose defaults changed between runs); runs no model")
    p.add_argument("--max-num-batched-tokens", type=int, default=4096,
                   help="vLLM's token budget per step: the prefill chunk (small values split the prompts into "
                        "chunks, for prefill_eviction=chunked variants)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32",
                   help="the model's dtype in vLLM (float32: the proxies' reference; bfloat16 for 'fp8 against "
                        "bf16' KV cache comparisons). The retained-mass part always runs in float32")
    p.add_argument("--kv-cache-dtype", default="auto",
                   help="vLLM's kv_cache_dtype: auto (the model's dtype) or fp8 / fp8_e4m3 / fp8_e5m2 (CPU: x86 "
                        "with AVX-512 or AMX; the proxies carry no KV scales, so every layer's scale is 1.0)")
    p.add_argument("--max-minutes", type=float, default=40.0, help="stop starting new configs after this")
    p.add_argument("--out", type=Path, default=REPO / "models" / "proxy-eval.json")
    args = p.parse_args(argv)
    for text in args.variant:
        name, fields = parse_variant(text)
        VARIANTS[name] = fields
        if name not in args.policies:
            args.policies.append(name)
    return args


# ----------------------------------------------------------------------------- vLLM part
def _logprob_vector(lp: dict, vocab: int):
    import torch

    v = torch.full((vocab,), -math.inf, dtype=torch.float64)
    for tid, x in lp.items():
        if tid < vocab:
            v[tid] = x.logprob
    return v


def run_vllm(args, samples, configs, vocab: int):
    """configs: list of (name, budget). Returns {(name, budget): [(generated token ids,
    [logprob vector per step])]}, one per sample."""
    from vllm import LLM, SamplingParams

    llm = LLM(
        model=str(args.model),
        attention_backend="madakv",
        # Exact budgets: page-aligned ones move in steps of 32 tokens per head, coarse on these
        # ~600-1400-token prompts, and the retained-mass part below selects with exact budgets.
        additional_config={"madakv": {"policy": "full", "page_aligned": False}},
        enforce_eager=True,
        block_size=32,
        dtype=args.dtype,
        kv_cache_dtype=args.kv_cache_dtype,
        seed=0,
        max_model_len=4096,
        max_num_batched_tokens=args.max_num_batched_tokens,
        limit_mm_per_prompt={"image": args.images[1]},
        max_logprobs=-1,
    )
    prompts = [pt.vllm_prompt(s) for s in samples]
    results = {}
    t0 = time.time()
    for ci, (name, budget) in enumerate(configs):
        if time.time() - t0 > 60 * args.max_minutes:
            print(f"--max-minutes reached: skipping {configs[ci:]}", flush=True)
            break
        extra = {"madakv_" + k: v for k, v in config_fields(name).items()}
        if budget is not None:
            extra["madakv_budget"] = budget
        sps = [SamplingParams(max_tokens=pt.CODE_LEN[s.task] + 1, temperature=0.0, logprobs=-1,
                              ignore_eos=True, extra_args=extra) for s in samples]
        tc = time.time()
        outs = llm.generate(prompts, sps, use_tqdm=False)
        results[(name, budget)] = [
            (list(o.outputs[0].token_ids), [_logprob_vector(lp, vocab) for lp in o.outputs[0].logprobs])
            for o in outs
        ]
        print(f"[{ci + 1}/{len(configs)}] {name} budget={budget}: {len(prompts)} prompts in "
              f"{time.time() - tc:.1f} s", flush=True)
    del llm
    return results


def score(samples, results, tokenizer):
    full = results[("full", None)]
    sep_id = pt.sep_token_id(tokenizer)
    table = {}
    for (name, budget), outs in results.items():
        per_task: dict[str, dict[str, list[float]]] = {}
        for s, (toks, lps), (ftoks, flps) in zip(samples, outs, full):
            d = per_task.setdefault(s.task, {k: [] for k in (
                "acc", "tok", "tok1", "tok_rest", "agree", "dlogp", "kl", "sep_ok")})
            target = pt.target_token_ids(s, tokenizer)[1:]
            ans = toks[1:]
            hit = [float(a == t) for a, t in zip(ans, target)]
            d["sep_ok"].append(float(toks[0] == sep_id))
            d["acc"].append(float(ans == target))
            d["tok"].append(sum(hit) / len(target))
            d["tok1"].append(hit[0])
            d["tok_rest"].append(sum(hit[1:]) / (len(target) - 1))
            d["agree"].append(float(toks == ftoks))
            dl, kl = [], []
            for j in range(1, len(ftoks)):  # answer steps with the full-cache prefix
                if toks[:j] != ftoks[:j]:
                    break
                lp, flp = lps[j], flps[j]
                dl.append(abs(float(lp[ftoks[j]] - flp[ftoks[j]])))
                pf = flp.exp()
                ok = pf > 0
                kl.append(float((pf[ok] * (flp[ok] - lp[ok].clamp_min(-1e4))).sum()))
            d["dlogp"].append(sum(dl) / len(dl) if dl else float("nan"))
            d["kl"].append(sum(kl) / len(kl) if kl else float("nan"))
        table[f"{name}@{budget}"] = {
            "policy": name, "config": config_fields(name), "budget": budget,
            "tasks": {t: {k: _mean(v) for k, v in d.items()} | {"n": len(d["acc"])}
                      for t, d in per_task.items()},
            # exact match of every prompt, in sample order (for paired comparisons)
            "acc_per_sample": [float(a == b) for a, b in (
                (toks[1:], pt.target_token_ids(s, tokenizer)[1:]) for s, (toks, _) in zip(samples, outs))],
        }
        row = table[f"{name}@{budget}"]
        row["mean_acc"] = _mean([row["tasks"][t]["acc"] for t in per_task])
        row["mean_tok"] = _mean([row["tasks"][t]["tok"] for t in per_task])
    return table


def paired_intervals(samples, table, reference: str, resamples: int, seed: int = 0) -> dict:
    """Per budget, for every policy P other than ``reference``: the difference in mean exact match
    (reference - P, averaged over tasks as ``mean_acc``) with a 95% paired bootstrap interval
    (prompts resampled within each task, the same resample for both policies) and the discordant
    pair counts of McNemar's test with its exact two-sided p-value."""
    import random

    tasks = sorted({s.task for s in samples})
    by_task = {t: [i for i, s in enumerate(samples) if s.task == t] for t in tasks}
    rng = random.Random(seed)
    draws = [{t: [rng.choice(ix) for _ in ix] for t, ix in by_task.items()} for _ in range(resamples)]

    def mean_acc(acc, pick):
        return sum(sum(acc[i] for i in pick[t]) / len(pick[t]) for t in tasks) / len(tasks)

    out = {}
    for key, row in table.items():
        b = row["budget"]
        ref = table.get(f"{reference}@{b}")
        if ref is None or row["policy"] == reference:
            continue
        a, c = ref["acc_per_sample"], row["acc_per_sample"]
        diffs = sorted(mean_acc(a, d) - mean_acc(c, d) for d in draws)
        only_ref = sum(x > y for x, y in zip(a, c))
        only_other = sum(y > x for x, y in zip(a, c))
        out[key] = {
            "reference": f"{reference}@{b}", "diff": mean_acc(a, by_task) - mean_acc(c, by_task),
            "ci95": _ci95(diffs),
            "only_reference_right": only_ref, "only_other_right": only_other,
            "mcnemar_p": _mcnemar_exact(only_ref, only_other),
        }
    return out


def pooled_means(reports: list[dict], sample_tasks: list[list[str]], reference: str, resamples: int,
                 seed: int = 0) -> dict:
    """Over several runs (e.g. both proxies' dev splits), for every policy with a row at every
    budget of every run: its mean exact match averaged over all (run, budget) cells equally, and
    ``reference`` minus it, with a 95% paired bootstrap interval (each run's prompts resampled
    within each task, one resample per run shared by its budgets and by both policies).
    ``sample_tasks[r][i]``: the task of prompt i of run r, in ``acc_per_sample`` order."""
    import random

    cells = [(r, b) for r, rep in enumerate(reports) for b in rep["budgets"]]
    names = [n for n in dict.fromkeys(row["policy"] for rep in reports for row in rep["table"].values()
                                      if row["budget"] is not None)
             if all(f"{n}@{b}" in reports[r]["table"] for r, b in cells)]
    if reference not in names:
        raise ValueError(f"reference {reference!r} lacks a row at some budget of some run")
    by_task = [{t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))} for tasks in sample_tasks]
    rng = random.Random(seed)
    draws = [[{t: [rng.choice(ix) for _ in ix] for t, ix in bt.items()} for bt in by_task] for _ in range(resamples)]

    def mean(name, picks):  # picks[r]: task -> prompt indices
        total = 0.0
        for r, b in cells:
            acc = reports[r]["table"][f"{name}@{b}"]["acc_per_sample"]
            total += sum(sum(acc[i] for i in ix) / len(ix) for ix in picks[r].values()) / len(picks[r])
        return total / len(cells)

    ref_draws = [mean(reference, d) for d in draws]
    out = {}
    for name in names:
        diffs = sorted(r - mean(name, d) for r, d in zip(ref_draws, draws))
        out[name] = {"mean": mean(name, by_task), "diff": mean(reference, by_task) - mean(name, by_task),
                     "ci95": _ci95(diffs)}
    return out


def _ci95(sorted_diffs: list[float]) -> list[float] | None:
    """The 2.5th and 97.5th percentiles of sorted bootstrap differences (None without resamples)."""
    n = len(sorted_diffs)
    return [sorted_diffs[int(0.025 * n)], sorted_diffs[int(0.975 * n) - 1]] if n else None


def report_samples(report: dict) -> list:
    """The prompts an --out file was run on, in ``acc_per_sample`` order."""
    return pt.make_dataset(tuple(report["tasks"]), report["n_per_task"], tuple(report["images"]),
                           split=report["split"], base_seed=report["seed"])


def _mcnemar_exact(b: int, c: int) -> float:
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    tail = sum(math.comb(n, i) for i in range(k + 1)) / 2**n
    return min(1.0, 2 * tail)


def _mean(v):
    v = [x for x in v if not math.isnan(x)]
    return sum(v) / len(v) if v else float("nan")


# ----------------------------------------------------------------------------- HF part
_CAPTURED: list = []


def _capture_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if type(module).__name__ == "Qwen2VLAttention":  # text layers only (not the vision tower)
        _CAPTURED.append((module.layer_idx, query.detach()[0].float(), key.detach()[0].float()))
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def retained_mass(args, samples, configs):
    """{(name, budget): {task: {mass, mass_outside, needle_kept}}} over the samples."""
    import torch
    from transformers import AttentionInterface, AutoProcessor, Qwen2VLForConditionalGeneration

    from madakv_vllm.config import MadaKVConfig
    from madakv_vllm.policies import make_policy, window_scores

    AttentionInterface.register("madakv_capture", _capture_attention)
    processor = AutoProcessor.from_pretrained(str(args.model))
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(args.model), dtype=torch.float32, attn_implementation="madakv_capture")
    model.eval()
    batcher = pt.HFBatcher(processor)
    acc: dict = {}
    for s in samples:
        _CAPTURED.clear()
        inputs = batcher([s], with_answer=False)  # the vLLM prompt, ending with "Answer"
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        layers = sorted(_CAPTURED, key=lambda x: x[0])
        qs = [q for _, q, _ in layers]  # [Hq, N, D] post-RoPE
        ks = [k for _, _, k in layers]  # [H, N, D]
        ids = inputs["input_ids"][0]
        n = ids.numel()
        modality = torch.where(ids == batcher.image_token_id, IMAGE, TEXT)
        needle = torch.tensor(pt.needle_token_positions(s, processor.tokenizer))
        for name, budget in configs:
            cfg = MadaKVConfig().with_overrides({**config_fields(name), "budget": budget if budget is not None else 1.0})
            w = min(cfg.window, n)
            qw = [q[:, n - w:] for q in qs]
            kept = make_policy(cfg).select_all(qw, ks, modality, cfg.budget_tokens(n))
            m, mo, nk = [], [], []
            for q, k, kept_l in zip(qw, ks, kept):
                psi = window_scores(q, k, kernel_size=1)  # [H, N], each row sums to w
                for h, idx in enumerate(kept_l):
                    keep = torch.zeros(n, dtype=torch.bool)
                    keep[idx] = True
                    m.append(float(psi[h][keep].sum() / psi[h].sum()))
                    outside = psi[h][: n - w]
                    mo.append(float(outside[keep[: n - w]].sum() / outside.sum()))
                    nk.append(float(keep[needle].float().mean()))
            d = acc.setdefault((name, budget), {}).setdefault(s.task, {"mass": [], "mass_outside": [], "needle_kept": []})
            d["mass"].append(sum(m) / len(m))
            d["mass_outside"].append(sum(mo) / len(mo))
            d["needle_kept"].append(sum(nk) / len(nk))
    return {key: {t: {k: sum(v) / len(v) for k, v in d.items()} for t, d in per_task.items()}
            for key, per_task in acc.items()}


# ----------------------------------------------------------------------------- main
def markdown_report(report: dict) -> str:
    """Markdown: mean exact match per policy (rows) and budget (columns), each cell with the paired
    95% interval of reference - policy; then the full-cache accuracy."""
    table, paired = report["table"], report.get("paired", {})
    budgets = report["budgets"]
    ref = next((d["reference"].split("@")[0] for d in paired.values()), None)
    rows = ["| policy | " + " | ".join(f"{b:g}" for b in budgets) + " |", "|---|" + "---:|" * len(budgets)]
    names = [report["table"][k]["policy"] for k in table if table[k]["budget"] is not None]
    for name in dict.fromkeys(names):
        cells = []
        for b in budgets:
            row = table.get(f"{name}@{b}")
            if row is None:
                cells.append("")
                continue
            d = paired.get(f"{name}@{b}")
            ci = f" ({ref} {d['diff']:+.2f} [{d['ci95'][0]:+.2f}, {d['ci95'][1]:+.2f}])" if d and d["ci95"] else ""
            cells.append(f"{row['mean_acc']:.3f}{ci}")
        rows.append(f"| {name} | " + " | ".join(cells) + " |")
    full = table.get("full@None", {}).get("mean_acc")
    n = report["n_per_task"]
    head = (f"split `{report.get('split', 'eval')}`, seed {report.get('seed', 0)}, {n} prompts per task x "
            f"{len(report.get('tasks', []))} tasks; full cache {full:.3f}")
    return head + "\n\n" + "\n".join(rows)


def merge_runs(args) -> dict:
    """One report from runs over the same prompts (checked), so that a policy run later pairs with
    the ones run before."""
    runs = [json.loads(path.read_text()) for path in args.merge]
    first = runs[0]
    for path, run in zip(args.merge[1:], runs[1:]):
        for key in ("model", "split", "seed", "tasks", "n_per_task", "images"):
            same = (Path(run[key]).name == Path(first[key]).name if key == "model"  # run from another checkout
                    else run[key] == first[key])
            if not same:
                sys.exit(f"{path}: {key} {run[key]!r} differs from {args.merge[0]}'s {first[key]!r}")
        for key, default in (("dtype", "float32"), ("kv_cache_dtype", "auto")):  # absent: files from before
            if run.get(key, default) != first.get(key, default):
                sys.exit(f"{path}: {key} {run.get(key, default)!r} differs from {args.merge[0]}'s "
                         f"{first.get(key, default)!r} (compare such runs with scripts/compare_kv_dtypes.py)")
        if run["table"]["full@None"]["acc_per_sample"] != first["table"]["full@None"]["acc_per_sample"]:
            sys.exit(f"{path}: the full cache answered differently: not the same prompts or model")
    table, variants = {}, {}
    for path, run in zip(args.merge, runs):
        variants.update(run.get("variants") or {})
        for key, row in run["table"].items():
            if key in table and table[key]["acc_per_sample"] != row["acc_per_sample"]:
                print(f"{path}: {key} answered differently than in an earlier file (kept the earlier one)")
            table.setdefault(key, row)
    samples = report_samples(first)
    budgets = sorted({b for run in runs for b in run["budgets"]}, reverse=True)
    policies = list(dict.fromkeys(p for run in runs for p in run["policies"]))
    return {**first, "variants": variants, "budgets": budgets, "policies": policies, "merged_from": [str(p) for p in args.merge],
            "table": table, "paired": paired_intervals(samples, table, args.reference, args.bootstrap)}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.merge:
        report = merge_runs(args)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(markdown_report(report))
        print(f"\nwrote {args.out}")
        return
    if args.report:
        reports = [json.loads(path.read_text()) for path in args.report]
        for path, report in zip(args.report, reports):
            print(f"### {path}\n\n" + markdown_report(report) + "\n")
        if args.pooled:
            tasks = [[s.task for s in report_samples(r)] for r in reports]
            pooled = pooled_means(reports, tasks, args.reference, args.bootstrap)
            print(f"### mean over {sum(len(r['budgets']) for r in reports)} (file, budget) cells; "
                  f"{args.reference} minus the policy, 95% paired bootstrap interval\n")
            print("| policy | mean | difference |\n|---|---:|---:|")
            for name, d in sorted(pooled.items(), key=lambda kv: -kv[1]["mean"]):
                ci = f" [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]" if d["ci95"] else ""
                print(f"| {name} | {d['mean']:.4f} | {d['diff']:+.4f}{ci} |")
        return
    import torch

    torch.set_num_threads(args.threads)
    if not (args.model / "model.safetensors").is_file():
        print(f"{args.model} missing: rebuilding from {pt.default_assets_dir()}", flush=True)
        pt.rebuild_proxy_model(args.model)
    info_path = args.model / pt.MODEL_INFO
    trained_on = json.loads(info_path.read_text()).get("tasks") if info_path.is_file() else None
    known = getattr(pt, "ALL_TASKS", pt.TASKS)
    if not trained_on or not set(trained_on) <= set(known):
        sys.exit(f"{args.model} lists tasks {trained_on}, not a subset of {list(known)} "
                 "(retrain with scripts/train_proxy_vlm.py); refusing to score it")
    tasks = tuple(trained_on)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(args.model))
    pt.answer_token_ids(tok)  # checks every answer word is one token
    samples = pt.make_dataset(tasks, args.n_per_task, tuple(args.images), split=args.split, base_seed=args.seed)
    lengths = pt.summarize_lengths(samples, tok)
    print(f"{len(samples)} held-out prompts ({args.n_per_task}/task, split {args.split!r}, seed {args.seed}), "
          f"prompt tokens {lengths}", flush=True)
    configs = [("full", None)] + [(p, b) for p in args.policies for b in args.budgets]

    t0 = time.time()
    results = run_vllm(args, samples, configs, len(tok))
    vllm_s = time.time() - t0
    table = score(samples, results, tok)

    mass = {}
    mass_s = 0.0
    if args.mass_per_task > 0:
        t1 = time.time()
        seen: dict[str, int] = {}
        msamples = []
        for s in samples:  # the first --mass-per-task samples of each task
            seen[s.task] = seen.get(s.task, 0) + 1
            if seen[s.task] <= args.mass_per_task:
                msamples.append(s)
        mass = retained_mass(args, msamples, configs)
        mass_s = time.time() - t1
        for (name, budget), per_task in mass.items():
            row = table.get(f"{name}@{budget}")
            if row is None:
                continue
            for t, d in per_task.items():
                row["tasks"][t].update(d)

    paired = paired_intervals(samples, table, args.reference, args.bootstrap) if args.bootstrap > 0 else {}
    report = {
        "model": str(args.model), "split": args.split, "seed": args.seed, "tasks": list(tasks),
        "variants": {k: v for k, v in VARIANTS.items() if k in args.policies},
        "assets": json.loads((args.model / pt.MODEL_INFO).read_text()) if (args.model / pt.MODEL_INFO).is_file() else None,
        "n_per_task": args.n_per_task, "images": list(args.images), "prompt_tokens": lengths,
        "mass_per_task": args.mass_per_task, "max_num_batched_tokens": args.max_num_batched_tokens, "budgets": args.budgets, "policies": args.policies,
        "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype,
        "seconds": {"vllm": round(vllm_s, 1), "mass": round(mass_s, 1)},
        "table": table,
        "paired": paired,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print_table(table, tasks)
    print_paired(paired)
    print(f"\nwrote {args.out} (vLLM {vllm_s:.0f} s, retained mass {mass_s:.0f} s)")


def print_paired(paired) -> None:
    if not paired:
        return
    print("\npaired vs reference (mean exact match, reference - policy; 95% bootstrap CI; McNemar p)")
    for key, d in paired.items():
        lo, hi = d["ci95"]
        print(f"  {d['reference']:>18} - {key:<22} {d['diff']:+.3f} [{lo:+.3f}, {hi:+.3f}]  "
              f"discordant {d['only_reference_right']}/{d['only_other_right']}  p={d['mcnemar_p']:.3g}")


def print_table(table, tasks=None) -> None:
    tasks = tasks or pt.TASKS
    short = {"text_needle": "TN", "image_needle": "IN", "comparison": "CMP"}
    head = (f"{'policy':<13}{'budget':>7} | " + " ".join(f"{'acc ' + short.get(t, t[:3].upper()):>7}" for t in tasks)
            + f" {'mean':>6} | " + " ".join(f"{'tok ' + short.get(t, t[:3].upper()):>7}" for t in tasks)
            + f" {'rest':>6} | {'agree':>6} {'|dlogp|':>8} {'KL':>7} | {'mass':>6} {'out':>6} {'needle':>7}"
            + f" | {'sep':>4}")
    print(head)
    print("-" * len(head))
    for key, row in table.items():
        ts = row["tasks"]
        avg = lambda k: sum(ts[t].get(k, float("nan")) for t in tasks) / len(tasks)  # noqa: E731
        b = "-" if row["budget"] is None else f"{row['budget']:g}"
        print(f"{row['policy']:<13}{b:>7} | " + " ".join(f"{ts[t]['acc']:>7.3f}" for t in tasks)
              + f" {row['mean_acc']:>6.3f} | " + " ".join(f"{ts[t]['tok']:>7.3f}" for t in tasks)
              + f" {avg('tok_rest'):>6.3f} | {avg('agree'):>6.3f} {avg('dlogp'):>8.4f} {avg('kl'):>7.4f} | "
              + f"{avg('mass'):>6.3f} {avg('mass_outside'):>6.3f} {avg('needle_kept'):>7.3f}"
              + f" | {avg('sep_ok'):>4.2f}")
    print("acc: exact match of the whole answer (TN text needle, 6 words; IN image needle, 4 colours; "
          "CMP comparison, 2 colours + same/not); "
          "tok: per-token accuracy; rest: answer tokens 2..K (read from the cache at decode); "
          "agree/|dlogp|/KL: vs full cache, over answer steps with the full-cache prefix; mass: "
          "observation-window attention on kept tokens (out: before the window); needle: needle "
          "tokens kept; sep: first token ':' (computed before eviction)")


if __name__ == "__main__":
    main()
