"""Tiny InternVL in Hugging Face format (``InternVLForConditionalGeneration``, which vLLM 0.32
serves with its InternS1 implementation): images and videos.

Text: 2 Qwen2 decoder layers (InternVL3's language model), all full attention, 4 query / 2 KV
heads of head_dim 64, hidden 256, plain RoPE. Vision: the InternViT tower (CLS token, absolute
position embeddings, layer scale, LayerNorm) at hidden 64 with 2 heads and 2 layers, tiles of
64 x 64 pixels cut into 8 x 8 patches; pixel shuffle (downsample 0.5) merges 2 x 2 patches, so a
tile gives (64 / 8) ** 2 / 4 = 16 ``<IMG_CONTEXT>`` tokens. Images are tiled dynamically (up to 4
tiles plus a thumbnail, InternVL's ``crop_to_patches``); ``make_image``'s 64 x 64 images are one
tile, 16 tokens, written ``<img>`` + 16 x ``<IMG_CONTEXT>`` + ``</img>``.

Videos: each frame is one tile; vLLM writes frame ``i`` as ``Frame{i}: <img>`` + 16 x ``<video>``
+ ``</img>`` (lines joined by newlines), so ``make_video``'s 4 frames give 64 ``<video>`` tokens.
The prompt marks an image with ``<IMG_CONTEXT>`` and a video with ``<video>``, as
InternVL3's Hugging Face chat template does; the processor expands them. Offline videos are bare
frame arrays (no metadata needed); :func:`video_data_url` gives the mp4 for the OpenAI API.
"""

from __future__ import annotations

import os
from pathlib import Path

from madakv_eval.tiny_models import _CHATML_TEMPLATE, _CLIP_MEAN, _CLIP_STD
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    ENDOFTEXT,
    IM_END,
    IMAGE_PART_TYPES,
    ZOO_RECORD,
    build_model_dir,
    chatml_generation,
    chatml_prompt,
    embed_ids,
    make_tokenizer,
    qwen2_text_config,
    video_data_url,  # noqa: F401 (this family's too: the same mp4 encoding)
)

FAMILY = TinyFamily(
    name="internvl",
    architecture="InternVLForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

VISION_LAYERS = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
TILE = 64
PATCH = 8
DOWNSAMPLE = 0.5
TOKENS_PER_TILE = int((TILE // PATCH) ** 2 * DOWNSAMPLE ** 2)
MAX_TILES = 4

IMAGE_CONTEXT = "<IMG_CONTEXT>"
VIDEO = "<video>"
#: Tokens InternVL's processor looks up on the tokenizer by these attribute names.
NAMED_TOKENS = {
    "start_image_token": "<img>",
    "end_image_token": "</img>",
    "context_image_token": IMAGE_CONTEXT,
    "video_token": VIDEO,
}
#: What a media item is in the prompt (the processor expands it).
MEDIA_PROMPT = {"image": IMAGE_CONTEXT + "\n", "video": VIDEO + "\n"}


def chat_template() -> str:
    return (_CHATML_TEMPLATE.replace("IMAGE_TYPES", IMAGE_PART_TYPES)
            .replace("IMAGE", f"'{IMAGE_CONTEXT}\\n'").replace("VIDEO", f"'{VIDEO}\\n'"))


def _tokenizer():
    # Appended after the shared vocabulary, so the shared tokens keep their ids.
    return make_tokenizer(list(NAMED_TOKENS.values()), bos=None, eos=IM_END, pad=ENDOFTEXT,
                          named=NAMED_TOKENS, chat_template=chat_template())


def _processor(tokenizer):
    import transformers as tf

    size = {"height": TILE, "width": TILE}
    common = dict(size=size, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    return tf.InternVLProcessor(
        image_processor=tf.GotOcr2ImageProcessor(
            crop_to_patches=True, min_patches=1, max_patches=MAX_TILES, **common),
        video_processor=tf.InternVLVideoProcessor(**common),
        tokenizer=tokenizer,
        image_seq_length=TOKENS_PER_TILE,
        chat_template=chat_template(),
    )


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    text = tf.Qwen2Config(**qwen2_text_config(tokenizer))
    # vLLM builds the language model from text_config's own architecture.
    text.architectures = ["Qwen2ForCausalLM"]
    vision = tf.InternVLVisionConfig(
        hidden_size=VISION_HIDDEN,
        num_hidden_layers=VISION_LAYERS,
        num_attention_heads=VISION_HEADS,
        intermediate_size=2 * VISION_HIDDEN,
        image_size=[TILE, TILE],
        patch_size=[PATCH, PATCH],
        norm_type="layer_norm",
        use_qk_norm=False,
        use_mean_pooling=True,  # as InternVL3 is released: no LayerNorm after the last layer
    )
    config = tf.InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.InternVLForConditionalGeneration, config=config,
        tokenizer=tokenizer, processor=_processor(tokenizer), generation=chatml_generation(tokenizer),
        record=ZOO_RECORD,
        record_extra={"image_tokens_64x64": TOKENS_PER_TILE,
                      "video_tokens_4x64x64": 4 * TOKENS_PER_TILE},
    )


def prompt(parts: list) -> dict:
    return chatml_prompt(parts, MEDIA_PROMPT, system=True)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, {"image": IMAGE_CONTEXT, "video": VIDEO})
