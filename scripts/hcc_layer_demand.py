#!/usr/bin/env python3
"""Where each policy puts the budget on the proxy VLM, per layer and KV head, and what of the
needle it keeps there, by modality.

    .venv/bin/python scripts/hcc_layer_demand.py [--assets scripts/assets/proxy_vlm] [--n-per-task 4]
        [--split dev] [--budget 0.2] [--theta 0.9] [--tasks labelled_images ...] [--out-json F]

In Hugging Face transformers with the proxy's weights (as scripts/eval_proxy.py's retained-mass
part), the post-RoPE q/k of every layer are captured for ``--n-per-task`` prompts per task of
``--split``; the script prints, averaged over the prompts, each (layer, KV head)'s HCC demand
(forced tokens + the fewest tokens covering theta of each modality's pooled window-attention mass,
as a fraction of the prompt), its share of that mass on image tokens (what MPA splits by), and
the fraction of the prompt each policy keeps there, with the fraction of the needle's tokens
kept, overall and split into the needle's text tokens and its image tokens (the labelled-image
task's needle has both: the asked labels and their images). Policies: MadaKV as configured by
default, its MPA split replaced by each head's top-k (``mpa_mix`` 0) or by the demand readings
(``mpa_split`` demand, capped), MPA alone (uniform layers), each HCC reading of the paper, and
PyramidKV.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--assets", type=Path, default=None, help="proxy assets (default: the committed v1 proxy)")
    ap.add_argument("--n-per-task", type=int, default=4)
    ap.add_argument("--split", default="dev")
    ap.add_argument("--budget", type=float, default=0.2)
    ap.add_argument("--theta", type=float, default=0.9, help="theta of the printed demand")
    ap.add_argument("--tasks", nargs="+", default=None, help="tasks to use (default: all of the proxy's)")
    ap.add_argument("--out-json", type=Path, default=None, help="also write the averages here")
    args = ap.parse_args(argv)

    import tempfile

    import torch
    from transformers import AttentionInterface, AutoProcessor, Qwen2VLForConditionalGeneration

    import eval_proxy as ep
    from madakv_eval import proxy_tasks as pt
    from madakv_vllm.config import IMAGE, NUM_MODALITIES, TEXT, MadaKVConfig
    from madakv_vllm.policies import FORCED, Ranking, make_policy, window_scores

    torch.set_num_threads(1)
    model_dir = pt.rebuild_proxy_model(Path(tempfile.mkdtemp()) / "proxy", args.assets)
    AttentionInterface.register("madakv_capture", ep._capture_attention)
    processor = AutoProcessor.from_pretrained(str(model_dir))
    model = Qwen2VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32, attn_implementation="madakv_capture").eval()
    batcher = pt.HFBatcher(processor)
    import json

    tasks = args.tasks or json.loads((model_dir / pt.MODEL_INFO).read_text())["tasks"]
    samples = pt.make_dataset(tasks, args.n_per_task, (24, 64), split=args.split)
    configs = {
        "MadaKV (default)": MadaKVConfig(budget=args.budget),
        "MadaKV, top-k split (mpa_mix 0)": MadaKVConfig(experimental={"mpa_mix": 0.0}, budget=args.budget),
        "MadaKV, demand split (mpa_split demand)": MadaKVConfig(experimental={"mpa_split": "demand"}, budget=args.budget),
        "MadaKV, capped split (mpa_split capped)": MadaKVConfig(experimental={"mpa_split": "capped"}, budget=args.budget),
        "MPA only": MadaKVConfig(hcc=False, budget=args.budget),
        "HCC streamed": MadaKVConfig(hcc_mode="streamed", budget=args.budget),
        "HCC global": MadaKVConfig(experimental={"hcc_mode": "global"}, budget=args.budget),
        "HCC layer": MadaKVConfig(experimental={"hcc_mode": "layer"}, budget=args.budget),
        "PyramidKV": MadaKVConfig(policy="pyramidkv", budget=args.budget),
    }
    sums: dict[str, list] = {}
    for s in samples:
        ep._CAPTURED.clear()
        inputs = batcher([s], with_answer=False)
        with torch.no_grad():
            model(**inputs, logits_to_keep=1)
        layers = sorted(ep._CAPTURED, key=lambda x: x[0])
        ids = inputs["input_ids"][0]
        n = ids.numel()
        modality = torch.where(ids == batcher.image_token_id, IMAGE, TEXT)
        needle = torch.tensor(pt.needle_token_positions(s, processor.tokenizer))
        w = min(32, n)
        qs = [q[:, n - w:] for _, q, _ in layers]
        ks = [k for _, _, k in layers]
        group = torch.where(torch.arange(n) >= n - w, FORCED, modality)
        demand, image_share = [], []
        for q, k in zip(qs, ks):
            mass, d = Ranking.of(window_scores(q, k, 5), group).mass_and_demand(NUM_MODALITIES, args.theta)
            demand.append((d.sum(1).double() + w) / n)
            image_share.append(mass[:, IMAGE] / mass.sum(1).clamp_min(1e-30))
        sums.setdefault("demand", []).append(torch.stack(demand))
        sums.setdefault("image share", []).append(torch.stack(image_share))
        parts = {"needle": needle, "needle text": needle[modality[needle] == TEXT],
                 "needle image": needle[modality[needle] == IMAGE]}
        for name, cfg in configs.items():
            pol = make_policy(cfg)
            kept = pol.select_all(qs, ks, modality, cfg.budget_tokens(n))
            sums.setdefault(name, []).append(pol.last_state.kept_counts.double() / n)
            for part, pos in parts.items():
                if pos.numel():
                    sums.setdefault(f"{name} {part}", []).append(torch.tensor(
                        [[float(torch.isin(pos, idx).float().mean()) for idx in layer] for layer in kept]))
    print(f"{len(samples)} prompts ({args.split} split, tasks {' '.join(tasks)}); rows: layers, columns: KV heads")
    table = {}
    for name, v in sums.items():
        what = ("HCC demand, theta %g" % args.theta) if name == "demand" else (
            "share of the head's window-attention mass on image tokens" if name == "image share" else (
                "tokens of it kept" if " needle" in name else f"kept, budget {args.budget:g}"))
        table[name] = torch.stack(v).double().mean(0).numpy().round(3).tolist()
        print(f"{name} ({what}): {table[name]}")
    if args.out_json is not None:
        args.out_json.write_text(json.dumps({
            "command": " ".join(["scripts/hcc_layer_demand.py", *(argv if argv is not None else sys.argv[1:])]),
            "prompts": len(samples), "split": args.split, "tasks": tasks, "budget": args.budget,
            "theta": args.theta, "rows": "layers", "columns": "KV heads", "table": table}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
