"""Tiny Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and videos.

Text: 2 Qwen2 decoder layers, all full attention, 4 query / 2 KV heads of head_dim 64, hidden
256, M-RoPE sections [8, 12, 12] (the real model's [16, 24, 24] at half the head_dim). Vision:
the Qwen2.5-VL tower (RMSNorm, gated SiLU MLP, windowed attention in block 0 and full attention
in block 1) at hidden 64 with 2 heads, patch 8 instead of 14 so that ``make_image``'s 64 x 64
images need no upscaling: one placeholder token covers (2 * 8) ** 2 = 16 x 16 pixels after
2 x 2 merging, so a 64 x 64 image gives 16 ``<|image_pad|>`` tokens and ``make_video``'s 4
frames of 64 x 64 give (4 / temporal_patch_size 2) * 16 = 32 ``<|video_pad|>`` tokens (videos
need an even frame count).

Videos go to vLLM as ``(frames, metadata)`` (``common.video_item``): vLLM's Qwen2.5-VL parser
refuses a bare frame array ("Video metadata is required"), since the processor derives
``second_per_grid_ts`` (the temporal M-RoPE stride) from the frame rate. :func:`video_data_url`
encodes the same frames as an mp4 data URL for the OpenAI API.
"""

from __future__ import annotations

import os
from pathlib import Path

from madakv_eval.tiny_models import _CLIP_MEAN, _CLIP_STD, chat_template
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    HIDDEN,
    QWEN_EMBED_TOKENS,
    build_qwen_vl,
    embed_ids,
    qwen2_text_config,
    qwen_vision_token_ids,
    qwen_vl_prompt,
    video_data_url,  # noqa: F401 (this family's mp4 encoding for the OpenAI API)
)

FAMILY = TinyFamily(
    name="qwen2_5_vl",
    architecture="Qwen2_5_VLForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

ROPE_THETA = 1_000_000.0
MROPE_SECTION = [8, 12, 12]  # temporal, height, width frequencies; they sum to head_dim // 2
VISION_DEPTH = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
PATCH = 8
MERGE = 2
TEMPORAL_PATCH = 2
# 32 pixels = 2 merged tokens per window side: a 64 x 64 image has 4 windows, so the windowed
# block attends within windows and the full-attention block across them.
WINDOW = 32
MIN_TOKENS = 16
MAX_TOKENS = 64


def vision_config() -> dict:
    """The tiny Qwen2.5-VL vision tower (also Qwen2.5-Omni's): block 0 windowed, block 1 full."""
    return dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_heads=VISION_HEADS,
        out_hidden_size=HIDDEN,
        hidden_act="silu",
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        window_size=WINDOW,
        fullatt_block_indexes=[VISION_DEPTH - 1],
    )


def _configs(tokenizer):
    import transformers as tf

    text = qwen2_text_config(
        tokenizer,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                         "mrope_section": MROPE_SECTION},
    )
    vision = {**vision_config(), "tokens_per_second": 2}
    cfg = tf.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        **qwen_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return cfg, tf.Qwen2_5_VLForConditionalGeneration


def _processor(tokenizer):
    import transformers as tf

    factor = PATCH * MERGE
    size = {"shortest_edge": MIN_TOKENS * factor * factor,
            "longest_edge": MAX_TOKENS * factor * factor}
    common = dict(size=size, patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH,
                  merge_size=MERGE, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    return tf.Qwen2_5_VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(**common),
        video_processor=tf.Qwen2VLVideoProcessor(**common),
        tokenizer=tokenizer,
        chat_template=chat_template("qwen2vl"),
    )


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    return build_qwen_vl(FAMILY, _configs, _processor, out_dir, seed,
                         {"image_tokens_64x64": 16, "video_tokens_4x64x64": 32})


def prompt(parts: list) -> dict:
    return qwen_vl_prompt(parts)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, QWEN_EMBED_TOKENS)
