"""Tiny Idefics3 (SmolVLM's architecture): SigLIP-style vision tower + pixel-shuffle connector +
Llama decoder.

vLLM architecture ``Idefics3ForConditionalGeneration``; takes images.

Image path: the processor resizes an image so its longest edge is ``LONGEST_EDGE`` (64; smaller
images are scaled up), splits it into ``TILE`` x ``TILE`` (32 x 32) tiles and adds a global view
(the whole image at 32 x 32). The vision tower cuts each view into 4 x 4 patches (8 x 8 = 64), the
connector's pixel shuffle (``scale_factor`` 2) folds those into 16 tokens. A square image
(``make_image``'s 64 x 64, or any smaller one) is a 2 x 2 grid plus the global view, 5 x 16 = 80
``<image>`` tokens; a 2:1 image is 2 x 1 tiles plus the global view, 48. In the prompt the
``<image>`` runs are framed by text tokens that stay text: ``<fake_token_around_image>``,
``<row_i_col_j>`` before each tile, ``\\n`` after each tile row and ``<global-img>`` before the
global view. vLLM replaces the prompt's single ``<image>`` with the whole framed sequence (one
placeholder range per image) and marks only the ``<image>`` positions ``is_embed``.

Decoder: Llama, 2 layers, 4 query heads, 2 KV heads, head_dim 64 (hidden 256), full attention,
float32.
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
    token_ids,
)

FAMILY = TinyFamily(
    name="idefics3",
    architecture="Idefics3ForConditionalGeneration",
    attention=("full",),
    modalities=("image",),
    dtype="float32",
)

TILE = 32  # the vision tower's image_size: one tile, and the global view
LONGEST_EDGE = 64  # images are resized to this longest edge before splitting
PATCH_SIZE = 4
SCALE_FACTOR = 2
IMAGE_SEQ_LEN = (TILE // PATCH_SIZE) ** 2 // SCALE_FACTOR**2

BOS = "<|im_start|>"
EOS = "<end_of_utterance>"
PAD = "<|endoftext|>"
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
# The processor looks up <row_i_col_j> for a grid of up to 6 x 6 tiles.
ROW_COL_TOKENS = tuple(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7))

# SmolVLM's format: "<|im_start|>User:...<end_of_utterance>\nAssistant:".
CHAT_TEMPLATE = (
    "{{- bos_token -}}\n"
    "{%- for message in messages -%}\n"
    "{{- message['role'] | capitalize + ':' -}}\n"
    "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
    "{%- else -%}{%- for part in message['content'] -%}\n"
    "{%- if part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}\n"
    f"{{%- elif part['type'] in {IMAGE_PART_TYPES} -%}}{{{{- '{IMAGE_TOKEN}' -}}}}\n"
    "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
    "{{- '<end_of_utterance>\\n' -}}\n"
    "{%- endfor -%}\n"
    "{%- if add_generation_prompt -%}{{- 'Assistant:' -}}{%- endif -%}"
)


def _tokenizer():
    return make_tokenizer(
        [BOS, "<|im_end|>", PAD, EOS, FAKE_IMAGE_TOKEN, IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN,
         *ROW_COL_TOKENS],
        bos=BOS, eos=EOS, pad=PAD, chat_template=CHAT_TEMPLATE,
    )


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, {"image": IMAGE_TOKEN})


def prompt(parts: list) -> dict:
    return render_prompt(parts, {"image": IMAGE_TOKEN}, BOS + "User:", EOS + "\nAssistant:")


def build(out_dir: Path, *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    ids = token_ids(tokenizer, (PAD, IMAGE_TOKEN))
    text = tf.LlamaConfig(**text_config(
        tokenizer, bos=BOS, eos=EOS, pad=PAD,
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 100_000.0},
    ))
    vision = tf.Idefics3VisionConfig(**VISION_TOWER, image_size=TILE, patch_size=PATCH_SIZE)
    config = tf.Idefics3Config(
        vision_config=vision,
        text_config=text,
        scale_factor=SCALE_FACTOR,
        image_token_id=ids[IMAGE_TOKEN],
        pad_token_id=ids[PAD],
        tie_word_embeddings=False,
    )

    image_processor = tf.Idefics3ImageProcessor(
        size={"longest_edge": LONGEST_EDGE},
        max_image_size={"longest_edge": TILE},
        do_image_splitting=True,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    processor = tf.Idefics3Processor(
        image_processor=image_processor, tokenizer=tokenizer, image_seq_len=IMAGE_SEQ_LEN,
        chat_template=CHAT_TEMPLATE,
    )
    assert len(tokenizer) == config.text_config.vocab_size, "the processor added tokens"
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Idefics3ForConditionalGeneration, config=config,
        tokenizer=tokenizer, processor=processor,
        generation=generation_config(tokenizer, bos=BOS, eos=EOS, pad=PAD), record=TINY_RECORD,
    )
