"""The README's demo over many prompts: how many answers are right with the full cache and at each
budget, through one `vllm serve --attention-backend madakv` (the demo's server and requests).

    .venv/bin/python scripts/demo_seeds.py [--seeds 0 25] [--budgets 0.5 0.2] [--out docs/data/demo_seeds.json]

Each seed is one prompt of ``madakv_eval.demo`` (``--seed``); the full-cache run and the compressed
runs of a seed are the requests the demo sends for it.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor()


def main(argv=None) -> int:
    from madakv_eval import demo
    from madakv_eval import proxy_tasks as pt
    from madakv_eval.serve import free_port, serve

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", nargs=2, type=int, default=[0, 25], metavar=("FIRST", "LAST"))
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.2])
    ap.add_argument("--policy", default="madakv")
    ap.add_argument("--images", type=int, default=48)
    ap.add_argument("--out", default=str(ROOT / "docs" / "data" / "demo_seeds.json"))
    args = ap.parse_args(argv)
    model = demo.ensure_proxy_model()
    k = pt.CODE_LEN[demo.PROXY_TASK]
    runs = [("full", {"madakv_policy": "full"})]
    runs += [(f"{args.policy}@{b:g}", {"madakv_policy": args.policy, "madakv_budget": b}) for b in args.budgets]
    port = free_port()
    rows = []
    with serve(model, port, "--attention-backend", "madakv", "--max-model-len", "4096", "--block-size", "32",
               "--limit-mm-per-prompt", json.dumps({"image": args.images}), "--enforce-eager",
               log=ROOT / "models" / "demo-seeds-serve.log"):
        for seed in range(*args.seeds):
            sample = pt.make_sample(demo.PROXY_TASK, seed, args.images)
            expected = " ".join(sample.answer)
            row = {"seed": seed, "expected": expected}
            for label, xargs in runs:
                row[label] = demo.ask(port, str(model), demo.proxy_messages(sample), xargs, k)["answer"] == expected
            rows.append(row)
            print(json.dumps(row), flush=True)
    totals = {label: sum(r[label] for r in rows) for label, _ in runs}
    result = {"command": "scripts/demo_seeds.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "cpu": cpu_name(), "prompts": len(rows), "correct": totals, "rows": rows}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"{len(rows)} prompts, correct: " + ", ".join(f"{label} {n}" for label, n in totals.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
