#!/usr/bin/env python3
"""Build tiny, deterministic, randomly initialised models that vLLM loads from disk.

    python scripts/build_tiny_models.py --kind all --out models/
    python scripts/build_tiny_models.py --kind llava --out models/ --layers 4 --image-size 128

Each kind goes to <out>/tiny-<kind>/ (replaced if it exists). The logic lives in
madakv_eval/tiny_models.py; this is a thin command-line wrapper over it. Then, e.g.:

    VLLM_CPU_KVCACHE_SPACE=1 vllm serve models/tiny-llava --max-model-len 4096
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # allow running without `pip install -e .`
    sys.path.insert(0, str(REPO))

from madakv_eval import tiny_models  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kind", default="all", choices=[*tiny_models.KINDS, "all"],
                   help="model kind, or 'all' (default)")
    p.add_argument("--out", default="models", type=Path, help="output root (default: models/)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("geometry (defaults: madakv_eval.tiny_models.Geometry)")
    g.add_argument("--layers", type=int)
    g.add_argument("--hidden", type=int, help="default heads * head_dim")
    g.add_argument("--heads", type=int)
    g.add_argument("--kv-heads", type=int)
    g.add_argument("--head-dim", type=int, help="CPU attention kernel: 32, 64, 80 or more")
    g.add_argument("--intermediate", type=int, help="default 2 * hidden")
    g.add_argument("--max-pos", type=int, help="max_position_embeddings")
    g.add_argument("--dtype", choices=["bfloat16", "float32", "float16"])
    g.add_argument("--vision-layers", type=int)
    g.add_argument("--vision-hidden", type=int)
    g.add_argument("--vision-heads", type=int)
    g.add_argument("--image-size", type=int, help="llava: image side in pixels (default 64)")
    g.add_argument("--patch-size", type=int, help="vision patch size (llava 8, qwen2vl 14)")
    g.add_argument("--min-image-tokens", type=int, help="qwen2vl: min placeholder tokens per image")
    g.add_argument("--max-image-tokens", type=int, help="qwen2vl: max placeholder tokens per image")
    return p.parse_args(argv)


_GEOMETRY_ARGS = ("layers", "hidden", "heads", "kv_heads", "head_dim", "intermediate", "max_pos",
                  "dtype", "vision_layers", "vision_hidden", "vision_heads", "image_size",
                  "patch_size", "min_image_tokens", "max_image_tokens")
_VISION_ONLY = ("vision_layers", "vision_hidden", "vision_heads", "image_size", "patch_size",
                "min_image_tokens", "max_image_tokens")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    overrides = {k: getattr(args, k) for k in _GEOMETRY_ARGS if getattr(args, k) is not None}
    kinds = tiny_models.KINDS if args.kind == "all" else (args.kind,)
    for kind in kinds:
        ov = dict(overrides)
        if kind in ("llama", "qwen2"):  # vision options don't apply to text-only models
            for k in _VISION_ONLY:
                ov.pop(k, None)
        t0 = time.perf_counter()
        try:
            path = tiny_models.build_model(kind, args.out / f"tiny-{kind}", seed=args.seed, **ov)
        except (TypeError, ValueError) as e:
            print(f"build_tiny_models: {kind}: {e}", file=sys.stderr)
            return 2
        info = json.loads((path / "madakv_tiny_model.json").read_text())
        geo = info["geometry"]
        print(
            f"{kind:8s} -> {path}  ({time.perf_counter() - t0:.2f}s) "
            f"params={info['num_parameters']:,} vocab={info['vocab_size']} layers={geo['layers']} "
            f"hidden={info['hidden_size']} heads={geo['heads']}/{geo['kv_heads']}kv "
            f"head_dim={geo['head_dim']} max_pos={geo['max_pos']} dtype={geo['dtype']}"
            + (f" image_tokens={info['image_tokens_per_image']}" if info["image_tokens_per_image"] else "")
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
