"""Tiny Mistral 3 (Mistral-Small-3.1's architecture): Pixtral vision tower + patch merger + Mistral
decoder, in Hugging Face format.

vLLM architecture ``Mistral3ForConditionalGeneration``; takes images.

This is the transformers layout (``config.json``, ``tokenizer.json``, ``PixtralProcessor``), not
Mistral's own (``params.json``, ``tekken.json``): vLLM's default ``tokenizer_mode="auto"`` loads
the Hugging Face tokenizer from the directory, as for any other family.

Image path: the Pixtral processor keeps images whose longest edge is at most ``LONGEST_EDGE``
(64) at their size (larger ones are scaled down to it), the tower embeds ``PATCH_SIZE`` (4)
pixel patches with 2D RoPE and the projector's patch merger folds 2 x 2 of them, so one image
token covers 8 x 8 pixels: ``make_image``'s 64 x 64 image is an 8 x 8 grid, 64 ``[IMG]`` tokens.
In the prompt each grid row ends with ``[IMG_BREAK]``, the last with ``[IMG_END]`` (8 more
tokens, text); vLLM replaces the prompt's single ``[IMG]`` with that sequence as one placeholder
range and marks only the ``[IMG]`` positions ``is_embed``.

Decoder: Mistral, 2 layers, 4 query heads, 2 KV heads, head_dim 64 (hidden 256), full attention
(no sliding window), float32.
"""

from __future__ import annotations

from pathlib import Path

from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    HEAD_DIM,
    IMAGE_PART_TYPES,
    TINY_RECORD,
    VISION_TOWER,
    build_model_dir,
    embed_ids,
    generation_config,
    make_tokenizer,
    render_prompt,
    text_config,
)

FAMILY = TinyFamily(
    name="mistral3",
    architecture="Mistral3ForConditionalGeneration",
    attention=("full",),
    modalities=("image",),
    dtype="float32",
)

LONGEST_EDGE = 64
PATCH_SIZE = 4
SPATIAL_MERGE = 2

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"
INST, INST_END = "[INST]", "[/INST]"
IMAGE_TOKEN = "[IMG]"
IMAGE_BREAK = "[IMG_BREAK]"
IMAGE_END = "[IMG_END]"

# Mistral's instruct format: "<s>[INST]user[/INST]assistant</s>[INST]...".
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{%- if message['role'] == 'assistant' -%}{%- set close = eos_token -%}"
    "{%- else -%}{{- '[INST]' -}}{%- set close = '[/INST]' -%}{%- endif -%}\n"
    "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
    "{%- else -%}{%- for part in message['content'] -%}\n"
    "{%- if part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}\n"
    f"{{%- elif part['type'] in {IMAGE_PART_TYPES} -%}}{{{{- '{IMAGE_TOKEN}' -}}}}\n"
    "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    "{{- close -}}\n"
    "{%- endfor -%}"
)


def _tokenizer():
    return make_tokenizer(
        [UNK, BOS, EOS, PAD, INST, INST_END, IMAGE_TOKEN, IMAGE_BREAK, IMAGE_END],
        bos=BOS, eos=EOS, pad=PAD, unk=UNK, add_bos=True, chat_template=CHAT_TEMPLATE,
    )


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, {"image": IMAGE_TOKEN})


def prompt(parts: list) -> dict:
    # No "<s>": the tokenizer prepends it (vLLM tokenizes text prompts with special tokens).
    return render_prompt(parts, {"image": IMAGE_TOKEN}, INST, INST_END)


def build(out_dir: Path, *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    text = tf.MistralConfig(**text_config(
        tokenizer, bos=BOS, eos=EOS, pad=PAD,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        sliding_window=None,
    ))
    vision = tf.PixtralVisionConfig(
        **VISION_TOWER,
        image_size=LONGEST_EDGE,
        patch_size=PATCH_SIZE,
        hidden_act="silu",
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )
    config = tf.Mistral3Config(
        vision_config=vision,
        text_config=text,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        spatial_merge_size=SPATIAL_MERGE,
        vision_feature_layer=-1,
        projector_hidden_act="gelu",
        multimodal_projector_bias=False,
        tie_word_embeddings=False,
    )

    image_processor = tf.PixtralImageProcessor(
        size={"longest_edge": LONGEST_EDGE},
        patch_size={"height": PATCH_SIZE, "width": PATCH_SIZE},
    )
    processor = tf.PixtralProcessor(
        image_processor=image_processor, tokenizer=tokenizer, patch_size=PATCH_SIZE,
        spatial_merge_size=SPATIAL_MERGE, chat_template=CHAT_TEMPLATE,
        image_token=IMAGE_TOKEN, image_break_token=IMAGE_BREAK, image_end_token=IMAGE_END,
    )
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Mistral3ForConditionalGeneration, config=config,
        tokenizer=tokenizer, processor=processor,
        generation=generation_config(tokenizer, bos=BOS, eos=EOS, pad=PAD), record=TINY_RECORD,
    )
