"""Tiny LLaVA-OneVision: SigLIP vision tower + 2-layer MLP projector + Qwen2 decoder.

vLLM architecture ``LlavaOnevisionForConditionalGeneration``; takes images and videos.

Geometry: SigLIP at ``IMAGE_SIZE`` (96) pixels with ``PATCH_SIZE`` (16) patches, a 6 x 6 patch
grid. OneVision's "anyres" tiling gives an image the base view (36 tokens) plus its tiles at the
best of ``image_grid_pinpoints`` with the padding cropped off and one ``image_newline`` per row;
the pinpoints are kept to at most two tiles (96 x 96, 96 x 192, 192 x 96), so a square image
(``make_image``'s 64 x 64, resized up to 96 x 96) gives 36 + 36 + 6 = 78 ``<image>`` tokens, a 2:1
landscape image 36 + 72 + 6 = 114 and a 1:2 portrait one 36 + 72 + 12 = 120. A video frame is the
6 x 6 grid average-pooled 2 x 2 (9 tokens); a video gets frames * 9 + 1 ``<video>`` tokens (the
newline), 37 for ``make_video``'s 4 frames. Every one of those positions, newlines included, holds
a vision embedding: the separators are the chat text around ``<image>`` / ``<video>``.

Decoder: Qwen2, 2 layers, 4 query heads, 2 KV heads, head_dim 64 (vLLM's Qwen2 derives head_dim
as hidden // heads, so hidden is 256), full attention, float32.

Checkpoint quirk: transformers 5 saves the SigLIP tower flat; vLLM's ``SiglipVisionModel`` nests
it in ``vision_model``, so keys are renamed.
"""

from __future__ import annotations

from pathlib import Path

from madakv_eval.tiny_models import _CLIP_MEAN, _CLIP_STD
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    CHATML_TOKENS,
    DEFAULT_SYSTEM,
    ENDOFTEXT,
    IM_END,
    TINY_RECORD,
    VISION_TOWER,
    build_model_dir,
    chatml_generation,
    chatml_prompt,
    chatml_template,
    embed_ids,
    make_tokenizer,
    nest_vision_model,
    qwen2_text_config,
    token_ids,
)

FAMILY = TinyFamily(
    name="llava_onevision",
    architecture="LlavaOnevisionForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

IMAGE_SIZE = 96
PATCH_SIZE = 16

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# What a media item is in the prompt (OneVision puts a newline after each).
MEDIA_PROMPT = {"image": IMAGE_TOKEN + "\n", "video": VIDEO_TOKEN + "\n"}
EMBED_TOKENS = {"image": IMAGE_TOKEN, "video": VIDEO_TOKEN}


def _tokenizer():
    template = chatml_template(MEDIA_PROMPT, default_system=DEFAULT_SYSTEM)
    return make_tokenizer([*CHATML_TOKENS, IMAGE_TOKEN, VIDEO_TOKEN], bos=None, eos=IM_END,
                          pad=ENDOFTEXT, chat_template=template)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, EMBED_TOKENS)


def prompt(parts: list) -> dict:
    return chatml_prompt(parts, MEDIA_PROMPT)


def build(out_dir: Path, *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    ids = token_ids(tokenizer, EMBED_TOKENS.values())
    text = tf.Qwen2Config(**qwen2_text_config(tokenizer))
    vision = tf.SiglipVisionConfig(**VISION_TOWER, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    vision.vision_use_head = False  # OneVision reads patch features; no pooling head
    side = IMAGE_SIZE
    pinpoints = [[side, side], [side, 2 * side], [2 * side, side]]
    config = tf.LlavaOnevisionConfig(
        vision_config=vision,
        text_config=text,
        image_token_index=ids[IMAGE_TOKEN],
        video_token_index=ids[VIDEO_TOKEN],
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=pinpoints,
        multimodal_projector_bias=True,
        projector_hidden_act="gelu",
        tie_word_embeddings=False,
    )

    grid = IMAGE_SIZE // PATCH_SIZE
    square = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
    image_processor = tf.LlavaOnevisionImageProcessor(
        size=square, image_grid_pinpoints=pinpoints, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
    )
    video_processor = tf.LlavaOnevisionVideoProcessor(
        size=square, image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
    )
    processor = tf.LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        num_image_tokens=grid * grid,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        chat_template=tokenizer.chat_template,
    )
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.LlavaOnevisionForConditionalGeneration,
        config=config, tokenizer=tokenizer, processor=processor,
        generation=chatml_generation(tokenizer), to_checkpoint=nest_vision_model,
        record=TINY_RECORD,
    )
