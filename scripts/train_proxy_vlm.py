#!/usr/bin/env python3
"""Train the proxy VLM: a small Qwen2-VL-shaped model that solves the synthetic long-context tasks
of madakv_vllm/proxy_tasks.py, so eviction policies can be scored on accuracy without real weights.

    .venv/bin/python scripts/train_proxy_vlm.py                 # train (~10-20 min on 2 CPU cores)
    .venv/bin/python scripts/train_proxy_vlm.py --rebuild-only  # models/proxy-vlm from the assets

Training starts from madakv_vllm.tiny_models.build_model("qwen2vl", ...) with
proxy_tasks.PROXY_GEOMETRY (4 layers, hidden 256, 8 query / 2 KV heads of 32, 9 tokens per image),
so the result has the tokenizer, chat template and processor vLLM needs. The Hugging Face
Qwen2VLForConditionalGeneration is trained (vision tower included) with cross-entropy on the
single answer token, on freshly drawn samples of the three tasks (never the eval split), through a
curriculum of growing prompt lengths. A stage ends when every task's accuracy over its last
``--window`` training samples reaches ``--advance-acc`` (after ``min_steps``) or after
``max_steps``; ``--max-minutes`` is a hard stop for the whole run.

Outputs:
* ``scripts/assets/proxy_vlm/`` (committed): ``weights.fp16.safetensors`` (trained weights in
  float16, ~5 MB) and ``proxy_vlm.json`` (kind, seed, geometry, training log);
* ``models/proxy-vlm/`` (gitignored): the vLLM-loadable model, rebuilt from those assets with
  ``proxy_tasks.rebuild_proxy_model`` -- exactly what the eval and the tests use.

Deterministic: model init from ``--seed``, training samples from ``proxy_tasks.sample_seed``
("train" split, step and slot), torch seeded; CPU float32.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from madakv_vllm import proxy_tasks as pt  # noqa: E402

# (n_images lo, hi, batch size, min_steps, max_steps, lr scale). Prompt lengths: ~150-300,
# ~200-600, ~400-950, ~600-1400 tokens. The last stage matches the eval distribution (24-64).
STAGES = [
    (5, 10, 16, 40, 500, 1.0),
    (8, 24, 16, 20, 300, 1.0),
    (16, 40, 8, 20, 200, 0.7),
    (24, 64, 4, 30, 200, 0.4),
]
EVAL_IMAGES = (24, 64)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=REPO / "models" / "proxy-vlm")
    p.add_argument("--assets", type=Path, default=pt.default_assets_dir())
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--window", type=int, default=48, help="training samples per task in the running accuracy")
    p.add_argument("--advance-acc", type=float, default=0.95)
    p.add_argument("--max-minutes", type=float, default=25.0, help="hard stop for training")
    p.add_argument("--check-per-task", type=int, default=20,
                   help="held-out samples per task for the final HF check (eval lengths)")
    p.add_argument("--rebuild-only", action="store_true", help="only rebuild --out from --assets")
    return p.parse_args(argv)


def hf_accuracy(model, batcher, samples, batch_size=4):
    """Greedy exact match of the answer token (full vocabulary argmax), per task."""
    import torch

    hits: dict[str, list[int]] = {}
    model.eval()
    with torch.no_grad():
        for i in range(0, len(samples), batch_size):
            chunk = samples[i : i + batch_size]
            logits = model(**batcher(chunk), logits_to_keep=1).logits[:, -1]
            pred = logits.argmax(-1)
            for s, y, t in zip(chunk, batcher.labels(chunk), pred):
                hits.setdefault(s.task, []).append(int(y == t))
    model.train()
    return {t: sum(v) / len(v) for t, v in hits.items()}


def train(args) -> dict:
    import torch
    from safetensors.torch import save_file
    from tqdm import tqdm
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    from madakv_vllm.tiny_models import build_model

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        init_dir = build_model(pt.PROXY_KIND, Path(tmp) / "init", seed=args.seed, **pt.PROXY_GEOMETRY)
        processor = AutoProcessor.from_pretrained(str(init_dir))
        model = Qwen2VLForConditionalGeneration.from_pretrained(str(init_dir), dtype=torch.float32)
    model.train()
    batcher = pt.HFBatcher(processor)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"proxy VLM: {n_params / 1e6:.2f} M parameters, geometry {pt.PROXY_GEOMETRY}", flush=True)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.98),
    )
    t_start = time.time()
    deadline = t_start + 60 * args.max_minutes
    step = 0
    log = []
    stopped_early = False
    for si, (lo, hi, bs, min_steps, max_steps, lr_scale) in enumerate(STAGES):
        recent = {t: deque(maxlen=args.window) for t in pt.TASKS}
        bar = tqdm(range(max_steps), desc=f"stage {si} ({lo}-{hi} images, batch {bs})", mininterval=5)
        stage_steps = 0
        t_stage = time.time()
        for k in bar:
            samples = []
            for j in range(bs):
                task = pt.TASKS[(step * bs + j) % len(pt.TASKS)]
                seed = pt.sample_seed("train", task, step * 64 + j, args.seed)
                n = random.Random(seed ^ 0x5EED).randint(lo, hi)
                samples.append(pt.make_sample(task, seed, n))
            lr = args.lr * lr_scale * min(1.0, (step + 1) / args.warmup)
            for g in opt.param_groups:
                g["lr"] = lr
            inputs = batcher(samples)
            labels = batcher.labels(samples)
            logits = model(**inputs, logits_to_keep=1).logits[:, -1]
            loss = torch.nn.functional.cross_entropy(logits, labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            pred = logits.detach().argmax(-1)
            for s, y, t in zip(samples, labels, pred):
                recent[s.task].append(int(y == t))
            step += 1
            stage_steps += 1
            accs = {t: (sum(v) / len(v) if v else 0.0) for t, v in recent.items()}
            bar.set_postfix(loss=f"{loss.item():.3f}", len=inputs["input_ids"].shape[1],
                            **{t[:4]: f"{a:.2f}" for t, a in accs.items()})
            full = all(len(v) == args.window for v in recent.values())
            if stage_steps >= min_steps and full and min(accs.values()) >= args.advance_acc:
                break
            if time.time() > deadline:
                stopped_early = True
                break
        bar.close()
        entry = {"stage": si, "images": [lo, hi], "batch": bs, "steps": stage_steps,
                 "seconds": round(time.time() - t_stage, 1), "last_loss": round(loss.item(), 4),
                 "running_acc": {t: round(a, 3) for t, a in accs.items()}}
        log.append(entry)
        print(json.dumps(entry), flush=True)
        if stopped_early:
            print(f"hard stop: --max-minutes {args.max_minutes} reached in stage {si}", flush=True)
            break
    train_seconds = time.time() - t_start

    # Compact assets: float16 copy of the trained state dict (+ what is needed to rebuild).
    args.assets.mkdir(parents=True, exist_ok=True)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()}
    save_file(sd, str(args.assets / pt.ASSET_WEIGHTS), metadata={"format": "pt"})
    info = {
        "kind": pt.PROXY_KIND,
        "seed": args.seed,
        "geometry": pt.PROXY_GEOMETRY,
        "num_parameters": n_params,
        "training": {
            "steps": step, "seconds": round(train_seconds, 1), "stopped_early": stopped_early,
            "lr": args.lr, "warmup": args.warmup, "weight_decay": args.weight_decay,
            "threads": args.threads, "advance_acc": args.advance_acc, "window": args.window,
            "stages": log,
        },
        "eval_images": list(EVAL_IMAGES),
    }
    (args.assets / pt.ASSET_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return info


def check(args, info: dict | None) -> dict:
    """Rebuild models/proxy-vlm from the assets and measure HF accuracy on held-out samples."""
    import torch
    from transformers import AutoProcessor, Qwen2VLForConditionalGeneration

    torch.set_num_threads(args.threads)
    out = pt.rebuild_proxy_model(args.out, args.assets)
    print(f"rebuilt {out} from {args.assets}", flush=True)
    if args.check_per_task <= 0:
        return {}
    processor = AutoProcessor.from_pretrained(str(out))
    model = Qwen2VLForConditionalGeneration.from_pretrained(str(out), dtype=torch.float32)
    # "check" split: disjoint from both the training and the eval split.
    samples = pt.make_dataset(pt.TASKS, args.check_per_task, EVAL_IMAGES, split="check", base_seed=args.seed)
    t0 = time.time()
    acc = hf_accuracy(model, pt.HFBatcher(processor), samples)
    print(f"held-out HF accuracy (rebuilt fp16 weights, {args.check_per_task}/task, "
          f"{EVAL_IMAGES[0]}-{EVAL_IMAGES[1]} images): {json.dumps(acc)} [{time.time() - t0:.0f} s]", flush=True)
    if info is not None:
        info["check_accuracy"] = {"per_task": args.check_per_task, "images": list(EVAL_IMAGES), "accuracy": acc}
        (args.assets / pt.ASSET_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return acc


def main(argv=None) -> None:
    args = parse_args(argv)
    info = None if args.rebuild_only else train(args)
    check(args, info)


if __name__ == "__main__":
    main()
