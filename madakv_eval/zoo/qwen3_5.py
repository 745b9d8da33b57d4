"""Tiny Qwen3.5 VLM (``Qwen3_5ForConditionalGeneration``): Qwen3.5 vision tower (2x2 patch merging)
in front of a hybrid decoder of Gated DeltaNet linear-attention layers and gated full-attention
layers with interleaved M-RoPE.

Geometry: LAYER_TYPES below (linear, linear, linear, full) x 2 -- Qwen3.5's own 3:1 pattern
(``full_attention_interval`` 4), twice, so that the full-attention KV cache group holds two
layers (one full layer alone would hide anything that differs between attention layers of one
group). Full attention: 4 query heads, 2 KV heads, head_dim 64, output gate, partial rotary 0.25
(16 rotary dims, M-RoPE sections [3, 3, 2]). Gated DeltaNet: 2 key heads and 4 value heads of
dim 64 (vLLM's CPU GDN kernels take head sizes 64 and 128 only), conv kernel 4. Hidden 256.

Vision: patch 16, 2x2 merge, so one placeholder token covers 32 x 32 pixels; images are resized to
between 16 and 64 tokens (a 64 x 64 ``make_image`` gives 16 ``<|image_pad|>``). Videos: frames are
paired (temporal patch 2) and each pair is resized to at least 16 tokens; a 4-frame 64 x 64
``make_video`` gives 2 x 16 = 32 ``<|video_pad|>``, in the prompt as
``<t seconds><|vision_start|><|video_pad|> * 16<|vision_end|>`` per frame pair. vLLM's Qwen3-VL
processor needs each video's metadata (fps, frame indices) for those timestamps, so ``prompt``
passes videos as ``(frames, metadata)``.

KV cache: vLLM makes the attention block size match the Gated DeltaNet state's page, so
``block_size=32`` becomes 160 tokens per block for every group of this model.

dtype: bfloat16 -- vLLM's CPU Gated DeltaNet refuses float32 ("CPU GDN attention requires BF16").
Tokenizer: transformers 5 loads ``Qwen3_5Tokenizer`` for this model type whatever
tokenizer_config.json names; it rebuilds the byte-level BPE from the saved vocab and merges with
Qwen's split regex, which the shared tiny tokenizer is compatible with.
"""

from __future__ import annotations

from pathlib import Path

from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    ENDOFTEXT,
    HEAD_DIM,
    HIDDEN,
    IM_END,
    QWEN_EMBED_TOKENS,
    VIDEO_FPS,
    build_model_dir,
    embed_ids,
    generation_config,
    qwen_tokenizer,
    qwen_vision_token_ids,
    qwen_vl_prompt,
    text_config,
)

FAMILY = TinyFamily(
    name="qwen3_5",
    architecture="Qwen3_5ForConditionalGeneration",
    attention=("linear", "full"),
    modalities=("image", "video"),
    dtype="bfloat16",
)

LAYER_TYPES = (("linear_attention",) * 3 + ("full_attention",)) * 2
LINEAR_KEY_HEADS = 2
LINEAR_VALUE_HEADS = 4
LINEAR_HEAD_DIM = 64
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_IMAGE_TOKENS = 16
MAX_IMAGE_TOKENS = 64

_MEAN = [0.5, 0.5, 0.5]
_STD = [0.5, 0.5, 0.5]


def _config(tokenizer):
    import transformers as tf

    text = text_config(
        tokenizer, bos=None, eos=IM_END, pad=ENDOFTEXT,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        head_dim=HEAD_DIM,
        linear_num_key_heads=LINEAR_KEY_HEADS,
        linear_num_value_heads=LINEAR_VALUE_HEADS,
        linear_key_head_dim=LINEAR_HEAD_DIM,
        linear_value_head_dim=LINEAR_HEAD_DIM,
        linear_conv_kernel_dim=4,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            # 64 * 0.25 = 16 rotary dims = 8 frequencies over (t, h, w), as Qwen3.5's [11, 11, 10]
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=HIDDEN,
        num_position_embeddings=64,  # an 8 x 8 grid of learned positions, interpolated
    )
    return tf.Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        **qwen_vision_token_ids(tokenizer),
        tie_word_embeddings=False,
    )


def _processor(tokenizer):
    import transformers as tf

    token_px = (PATCH_SIZE * MERGE_SIZE) ** 2
    image_processor = tf.Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_IMAGE_TOKENS * token_px,
              "longest_edge": MAX_IMAGE_TOKENS * token_px},
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
        image_mean=_MEAN, image_std=_STD,
    )
    # The video budget counts all frames: each pair of frames gets >= MIN_IMAGE_TOKENS tokens for
    # a 4-frame clip.
    video_processor = tf.Qwen3VLVideoProcessor(
        size={"shortest_edge": 2 * TEMPORAL_PATCH_SIZE * MIN_IMAGE_TOKENS * token_px,
              "longest_edge": 2 * TEMPORAL_PATCH_SIZE * MAX_IMAGE_TOKENS * token_px},
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
        image_mean=_MEAN, image_std=_STD, fps=VIDEO_FPS, min_frames=2, max_frames=64,
        do_sample_frames=False, cap_pixels_per_frame=False,
    )
    return tf.Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def build(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the tiny Qwen3.5 into ``out_dir`` (replaced if it exists); returns its path."""
    import transformers as tf

    tokenizer = qwen_tokenizer()  # ChatML with Qwen's vision placeholders
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Qwen3_5ForConditionalGeneration,
        config=_config(tokenizer), tokenizer=tokenizer, processor=_processor(tokenizer),
        generation=generation_config(tokenizer, bos=None, eos=[IM_END, ENDOFTEXT], pad=ENDOFTEXT),
    )


def prompt(parts: list) -> dict:
    """A user turn in ChatML (no system turn); images and videos as Qwen's vision placeholders,
    videos with the metadata vLLM's Qwen3-VL processor needs for their timestamps."""
    return qwen_vl_prompt(parts, system=False)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, QWEN_EMBED_TOKENS)
