"""Tiny Qwen2.5-Omni, its thinker only: images, videos and audio in, text out.

vLLM 0.32 serves ``Qwen2_5OmniForConditionalGeneration`` as
``Qwen2_5OmniThinkerForConditionalGeneration``: it reads the full ``Qwen2_5OmniConfig`` (its
``thinker_config``) and loads ``thinker.*`` weights, skipping ``talker.*`` and ``token2wav.*``.
The build says ``enable_audio_output: false``, so transformers' model (whose weights are drawn
here) holds the thinker alone and the checkpoint carries no talker or token2wav weights; their
configs are transformers' defaults, unused.

Text: 2 Qwen2 decoder layers, all full attention, 4 query / 2 KV heads of head_dim 64, hidden
256, M-RoPE sections [8, 12, 12]. Vision: the Qwen2.5-VL tower (as ``qwen2_5_vl``) at hidden 64
with 2 heads, patch 8: a 64 x 64 image gives 16 ``<|IMAGE|>`` tokens, ``make_video``'s 4 frames
of 64 x 64 give 32 ``<|VIDEO|>`` tokens. Audio: the Whisper feature extractor (128 mel bins,
100 frames a second) and the Omni audio encoder (d_model 64, 2 layers, chunks of
``2 * n_window`` frames, its own lengths: padding is cut off by the attention mask), so
``make_audio``'s 1 s clip gives 25 ``<|AUDIO|>`` tokens.

In the prompt an item is ``<|vision_bos|><|IMAGE|><|vision_eos|>``,
``<|vision_bos|><|VIDEO|><|vision_eos|>`` or ``<|audio_bos|><|AUDIO|><|audio_eos|>`` (the Omni
chat template's); vLLM expands the middle token to one per embedding, the markers stay text.
Videos carry no audio track (``use_audio_in_video`` off) and go to vLLM with their metadata
(``common.video_item``). Qwen2.5-Omni's processor resizes video frames to its own defaults (at
least 128 x 28 x 28 pixels, whatever its video processor says), so the family's
``engine_kwargs`` pass the tiny ``size`` as ``mm_processor_kwargs``.
"""

from __future__ import annotations

import os
from pathlib import Path

from madakv_eval.tiny_models import _CLIP_MEAN, _CLIP_STD
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    CHATML_TOKENS,
    DEFAULT_SYSTEM,
    ENDOFTEXT,
    HIDDEN,
    IM_END,
    ZOO_RECORD,
    audio_data_url,  # noqa: F401 (this family's WAV encoding for the OpenAI API)
    build_model_dir,
    chatml_generation,
    chatml_prompt,
    chatml_template,
    embed_ids,
    make_tokenizer,
    qwen2_text_config,
    video_data_url,  # noqa: F401 (its mp4 encoding)
    video_item,
    wav_base64,  # noqa: F401 (its WAV bytes for an input_audio part)
)
# Qwen2.5-Omni's vision tower, patching and M-RoPE sections are Qwen2.5-VL's
from madakv_eval.zoo.qwen2_5_vl import (MAX_TOKENS, MERGE, MIN_TOKENS, MROPE_SECTION, PATCH, TEMPORAL_PATCH,
                                        vision_config)

SIZE = {"shortest_edge": MIN_TOKENS * (PATCH * MERGE) ** 2,
        "longest_edge": MAX_TOKENS * (PATCH * MERGE) ** 2}

FAMILY = TinyFamily(
    name="qwen2_5_omni",
    architecture="Qwen2_5OmniForConditionalGeneration",
    attention=("full",),
    modalities=("image", "audio", "video"),
    dtype="float32",
    # Qwen2.5-Omni's processor passes its own video size defaults (at least 128 x 28 x 28 pixels a
    # frame) over its video processor's (800 tokens for a 4 x 64 x 64 clip); this passes the tiny
    # size at every call (``--mm-processor-kwargs`` when serving).
    engine_kwargs={"mm_processor_kwargs": {"size": SIZE}},
)

SAMPLING_RATE = 16000
HOP_LENGTH = 160
CHUNK_SECONDS = 30  # the feature extractor pads to this; the attention mask cuts the padding off
MEL_BINS = 128

#: Tokens Qwen2.5-Omni's processor looks up on the tokenizer by these attribute names.
NAMED_TOKENS = {
    "image_token": "<|IMAGE|>",
    "video_token": "<|VIDEO|>",
    "audio_token": "<|AUDIO|>",
    "vision_bos_token": "<|vision_bos|>",
    "vision_eos_token": "<|vision_eos|>",
    "audio_bos_token": "<|audio_bos|>",
    "audio_eos_token": "<|audio_eos|>",
}
PLACEHOLDERS = {
    "image": "<|vision_bos|><|IMAGE|><|vision_eos|>",
    "audio": "<|audio_bos|><|AUDIO|><|audio_eos|>",
    "video": "<|vision_bos|><|VIDEO|><|vision_eos|>",
}
EMBED_TOKENS = {"image": "<|IMAGE|>", "audio": "<|AUDIO|>", "video": "<|VIDEO|>"}


def _tokenizer():
    template = chatml_template(PLACEHOLDERS, default_system=DEFAULT_SYSTEM)
    return make_tokenizer([*CHATML_TOKENS, *NAMED_TOKENS.values()], bos=None, eos=IM_END,
                          pad=ENDOFTEXT, named=NAMED_TOKENS, chat_template=template)


def _config(tokenizer):
    import transformers as tf

    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in NAMED_TOKENS.items()}
    text = qwen2_text_config(
        tokenizer,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0,
                         "mrope_section": MROPE_SECTION},
    )
    vision = vision_config()
    audio = dict(
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        d_model=64,
        output_dim=HIDDEN,
    )
    thinker = tf.Qwen2_5OmniThinkerConfig(
        text_config=text,
        vision_config=vision,
        audio_config=audio,
        image_token_index=ids["image_token"],
        video_token_index=ids["video_token"],
        audio_token_index=ids["audio_token"],
        audio_start_token_id=ids["audio_bos_token"],
        audio_end_token_id=ids["audio_eos_token"],
        tie_word_embeddings=False,
    )
    return tf.Qwen2_5OmniConfig(thinker_config=thinker, enable_audio_output=False)


def _processor(tokenizer):
    import transformers as tf

    common = dict(size=SIZE, patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH,
                  merge_size=MERGE, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    feature_extractor = tf.WhisperFeatureExtractor(
        feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
        chunk_length=CHUNK_SECONDS, n_fft=400, return_attention_mask=True,
    )
    return tf.Qwen2_5OmniProcessor(
        image_processor=tf.Qwen2VLImageProcessor(**common),
        video_processor=tf.Qwen2VLVideoProcessor(**common),
        feature_extractor=feature_extractor,
        tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
    )


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Qwen2_5OmniForConditionalGeneration,
        config=_config(tokenizer), tokenizer=tokenizer, processor=_processor(tokenizer),
        generation=chatml_generation(tokenizer), record=ZOO_RECORD,
        record_extra={"image_tokens_64x64": 16, "video_tokens_4x64x64": 32, "audio_tokens_1s": 25},
    )


def prompt(parts: list) -> dict:
    return chatml_prompt(parts, PLACEHOLDERS, system=True, media_items={"video": video_item})


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, EMBED_TOKENS)
