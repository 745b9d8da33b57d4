"""Tiny Qwen3-VL MoE (``Qwen3VLMoeForConditionalGeneration``): images and videos.

The dense tiny Qwen3-VL (:mod:`madakv_eval.zoo.qwen3_vl`: same vision tower, tokenizer,
processor and placeholder counts, 16 tokens per 64 x 64 image, 32 per 4-frame video) with every
decoder layer's MLP a sparse MoE block: 4 experts of intermediate size 64, top-2 routing. All
decoder layers are full attention.

Checkpoint layout: transformers 5 holds the fused expert weights as ``gate_up_proj``
[experts, 2 * intermediate, hidden] and ``down_proj`` [experts, hidden, intermediate], while
Qwen3-VL MoE checkpoints (and vLLM's loader, ``is_fused_checkpoint_transposed``) store them
transposed; transformers converts on load, so the build writes the checkpoint layout. The text
config also carries ``norm_topk_prob: true``, which transformers 5 no longer defines and vLLM's
MoE layer requires.
"""

from __future__ import annotations

import os
from pathlib import Path

from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import build_qwen_vl, qwen_vision_token_ids
# Same tokenizer, placeholders, processor and video encoding as the dense Qwen3-VL.
from madakv_eval.zoo.qwen3_vl import (  # noqa: F401
    embed_token_ids,
    processor,
    prompt,
    qwen3_text_config,
    video_data_url,
    vision_config,
)

FAMILY = TinyFamily(
    name="qwen3_vl_moe",
    architecture="Qwen3VLMoeForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

EXPERTS = 4
EXPERTS_PER_TOKEN = 2
EXPERT_INTERMEDIATE = 64  # 2 * 64 != hidden 256, so a gate_up_proj left untransposed fails to load


def _configs(tokenizer):
    import transformers as tf

    cfg = tf.Qwen3VLMoeConfig(
        text_config=qwen3_text_config(
            tokenizer,
            num_experts=EXPERTS,
            num_experts_per_tok=EXPERTS_PER_TOKEN,
            moe_intermediate_size=EXPERT_INTERMEDIATE,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            # transformers 5 dropped this field (its router always renormalises the top-k
            # weights) but vLLM's Qwen3-MoE layer still reads it; released checkpoints carry it.
            norm_topk_prob=True,
        ),
        vision_config=vision_config(),
        **qwen_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return cfg, tf.Qwen3VLMoeForConditionalGeneration


def _to_checkpoint(sd: dict) -> dict:
    fused = (".mlp.experts.gate_up_proj", ".mlp.experts.down_proj")
    return {k: (v.transpose(1, 2).contiguous() if k.endswith(fused) else v) for k, v in sd.items()}


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    return build_qwen_vl(FAMILY, _configs, processor, out_dir, seed,
                         {"image_tokens_64x64": 16, "video_tokens_4x64x64": 32},
                         to_checkpoint=_to_checkpoint)
