#!/usr/bin/env python3
"""Pair two accuracy-proxy runs of the same prompts that differ in the KV cache's dtype (or the
model's), policy@budget by policy@budget: e.g. an fp8 KV cache against the unquantized one.

    .venv/bin/python scripts/eval_proxy.py --split test --n-per-task 100 --policies madakv \\
        --budgets 0.5 0.2 0.1 --mass-per-task 0 --dtype bfloat16 --out REF.json
    .venv/bin/python scripts/eval_proxy.py ... --dtype bfloat16 --kv-cache-dtype fp8 --out FP8.json
    .venv/bin/python scripts/compare_kv_dtypes.py REF.json FP8.json --out COMPARISON.json

For every row both files hold (the full cache and each policy@budget): the mean exact match of
each run (averaged over tasks, as eval_proxy's ``mean_acc``) with a 95% bootstrap interval, and
OTHER minus REFERENCE with a 95% paired bootstrap interval (prompts resampled within each task,
the same resample for both runs and for every row) and McNemar's exact test on the discordant
prompts. The two files must be of the same prompts (model, split, seed, tasks, prompts per task,
images); unlike ``eval_proxy.py --merge`` their full caches may answer differently, since that is
part of what is measured.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "scripts"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from eval_proxy import _ci95, _mcnemar_exact, report_samples  # noqa: E402

SAME_PROMPTS = ("split", "seed", "tasks", "n_per_task", "images")


def arm(report: dict) -> str:
    """A run's model and KV cache dtypes (files from before the options: float32, auto)."""
    return f"{report.get('dtype', 'float32')}/kv {report.get('kv_cache_dtype', 'auto')}"


def compare(ref: dict, other: dict, resamples: int, seed: int = 0) -> dict:
    for key in SAME_PROMPTS:
        if ref[key] != other[key]:
            raise ValueError(f"{key} differs ({ref[key]!r} vs {other[key]!r}): not the same prompts")
    if Path(ref["model"]).name != Path(other["model"]).name:
        raise ValueError(f"models differ ({ref['model']} vs {other['model']})")
    tasks = [s.task for s in report_samples(ref)]
    by_task = {t: [i for i, x in enumerate(tasks) if x == t] for t in sorted(set(tasks))}
    rng = random.Random(seed)
    draws = [{t: [rng.choice(ix) for _ in ix] for t, ix in by_task.items()} for _ in range(resamples)]

    def mean_acc(acc, picks):
        return sum(sum(acc[i] for i in ix) / len(ix) for ix in picks.values()) / len(picks)

    rows = {}
    for key, r in ref["table"].items():
        o = other["table"].get(key)
        if o is None:
            continue
        a, b = r["acc_per_sample"], o["acc_per_sample"]
        if len(a) != len(tasks) or len(b) != len(tasks):
            raise ValueError(f"{key}: {len(a)} / {len(b)} answers for {len(tasks)} prompts")
        ref_draws = [mean_acc(a, d) for d in draws]
        other_draws = [mean_acc(b, d) for d in draws]
        only_ref = sum(x > y for x, y in zip(a, b))
        only_other = sum(y > x for x, y in zip(a, b))
        rows[key] = {
            "policy": r["policy"], "budget": r["budget"],
            "reference_acc": mean_acc(a, by_task), "reference_ci95": _ci95(sorted(ref_draws)),
            "other_acc": mean_acc(b, by_task), "other_ci95": _ci95(sorted(other_draws)),
            "diff": mean_acc(b, by_task) - mean_acc(a, by_task),
            "diff_ci95": _ci95(sorted(y - x for x, y in zip(ref_draws, other_draws))),
            "only_reference_right": only_ref, "only_other_right": only_other,
            "mcnemar_p": _mcnemar_exact(only_ref, only_other),
            "per_task": {t: {"reference_acc": r["tasks"][t]["acc"], "other_acc": o["tasks"][t]["acc"]}
                         for t in by_task},
        }
    return rows


def markdown(result: dict) -> str:
    def ci(x):
        return f" [{x[0]:.3f}, {x[1]:.3f}]" if x else ""

    lines = [f"{result['model']}, split `{result['split']}`, seed {result['seed']}, {result['n_per_task']} prompts "
             f"per task x {len(result['tasks'])} tasks; reference {result['reference_arm']}, other "
             f"{result['other_arm']}; difference other - reference (95% paired bootstrap, {result['bootstrap']} "
             f"resamples), McNemar exact p on discordant prompts (only reference right / only other right)", "",
             "| row | reference | other | other - reference | discordant | McNemar p |",
             "|---|---:|---:|---:|---:|---:|"]
    for key, d in result["rows"].items():
        lo_hi = f" [{d['diff_ci95'][0]:+.3f}, {d['diff_ci95'][1]:+.3f}]" if d["diff_ci95"] else ""
        lines.append(f"| {key} | {d['reference_acc']:.3f}{ci(d['reference_ci95'])} | {d['other_acc']:.3f}"
                     f"{ci(d['other_ci95'])} | {d['diff']:+.3f}{lo_hi} | {d['only_reference_right']}/"
                     f"{d['only_other_right']} | {d['mcnemar_p']:.3g} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("reference", type=Path, help="eval_proxy.py --out of the reference arm (e.g. unquantized KV)")
    p.add_argument("other", type=Path, help="eval_proxy.py --out of the compared arm (e.g. fp8 KV)")
    p.add_argument("--bootstrap", type=int, default=2000, help="bootstrap resamples")
    p.add_argument("--seed", type=int, default=0, help="seed of the resamples")
    p.add_argument("--out", type=Path, help="write the comparison as JSON here")
    args = p.parse_args(argv)
    ref, other = (json.loads(path.read_text()) for path in (args.reference, args.other))
    try:
        rows = compare(ref, other, args.bootstrap, args.seed)
    except ValueError as e:
        sys.exit(f"{args.reference} vs {args.other}: {e}")
    result = {"model": Path(ref["model"]).name, **{k: ref[k] for k in SAME_PROMPTS},
              "reference": str(args.reference), "other": str(args.other),
              "reference_arm": arm(ref), "other_arm": arm(other),
              "bootstrap": args.bootstrap, "bootstrap_seed": args.seed, "rows": rows}
    print(markdown(result))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
