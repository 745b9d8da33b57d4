"""Tiny Qwen3-VL, dense (``Qwen3VLForConditionalGeneration``): images and videos.

Text: 2 Qwen3 decoder layers (q/k RMSNorm), all full attention, 4 query / 2 KV heads of head_dim
64, hidden 256, interleaved M-RoPE with sections [12, 10, 10] (the real model's [24, 20, 20] at
half the head_dim). Vision: the Qwen3-VL tower at hidden 64 with 2 heads and 2 blocks, learned
position embeddings on a 16 x 16 grid (bilinearly interpolated to the image's grid), one
DeepStack merger (block 0's features added to the first decoder layer's image positions).
Patch 8 instead of 16 so that ``make_image``'s 64 x 64 images need no upscaling: 16
``<|image_pad|>`` tokens per 64 x 64 image.

Videos: ``make_video``'s 4 frames at 64 x 64 give 2 temporal groups of 16 ``<|video_pad|>``
tokens; the processor writes each group as ``<t seconds><|vision_start|>`` + 16 pads +
``<|vision_end|>``, so a video's placeholder range also holds timestamp text, which vLLM marks
as not embedded (``is_embed``). Only the pads are the video modality.
"""

from __future__ import annotations

import os
from pathlib import Path

from madakv_eval.tiny_models import _CLIP_MEAN, _CLIP_STD, chat_template
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    ENDOFTEXT,
    HEAD_DIM,
    HIDDEN,
    IM_END,
    QWEN_EMBED_TOKENS,
    build_qwen_vl,
    embed_ids,
    qwen_vision_token_ids,
    qwen_vl_prompt,
    text_config,
    video_data_url,  # noqa: F401 (this family's mp4 encoding for the OpenAI API)
)

FAMILY = TinyFamily(
    name="qwen3_vl",
    architecture="Qwen3VLForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

ROPE_THETA = 5_000_000.0
MROPE_SECTION = [12, 10, 10]  # temporal, height, width frequencies; they sum to head_dim // 2
VISION_DEPTH = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
POSITION_GRID = 16  # learned vision position embeddings: POSITION_GRID ** 2 of them
PATCH = 8
MERGE = 2
TEMPORAL_PATCH = 2
MIN_TOKENS = 16
MAX_TOKENS = 64
#: Longest video the processor keeps at full size, in frames of MAX_TOKENS (the video size
#: bounds count pixels over all frames).
MAX_VIDEO_FRAMES = 4


def qwen3_text_config(tokenizer, **extra) -> dict:
    """The Qwen3 decoder's config arguments (the MoE variant adds its expert settings)."""
    return text_config(
        tokenizer, bos=ENDOFTEXT, eos=IM_END, pad=ENDOFTEXT,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                         "mrope_section": MROPE_SECTION, "mrope_interleaved": True},
        **extra,
    )


def vision_config() -> dict:
    return dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_heads=VISION_HEADS,
        out_hidden_size=HIDDEN,
        hidden_act="gelu_pytorch_tanh",
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        num_position_embeddings=POSITION_GRID ** 2,
        deepstack_visual_indexes=[0],
    )


def _configs(tokenizer):
    import transformers as tf

    cfg = tf.Qwen3VLConfig(
        text_config=qwen3_text_config(tokenizer),
        vision_config=vision_config(),
        **qwen_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )
    return cfg, tf.Qwen3VLForConditionalGeneration


def processor(tokenizer):
    import transformers as tf

    factor = PATCH * MERGE
    common = dict(patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH, merge_size=MERGE,
                  image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    return tf.Qwen3VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(
            size={"shortest_edge": MIN_TOKENS * factor * factor,
                  "longest_edge": MAX_TOKENS * factor * factor},
            **common),
        video_processor=tf.Qwen3VLVideoProcessor(
            size={"shortest_edge": MIN_TOKENS * factor * factor,
                  "longest_edge": MAX_VIDEO_FRAMES * MAX_TOKENS * factor * factor},
            **common),
        tokenizer=tokenizer,
        chat_template=chat_template("qwen2vl"),
    )


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    return build_qwen_vl(FAMILY, _configs, processor, out_dir, seed,
                         {"image_tokens_64x64": 16, "video_tokens_4x64x64": 32})


def prompt(parts: list) -> dict:
    return qwen_vl_prompt(parts)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, QWEN_EMBED_TOKENS)
