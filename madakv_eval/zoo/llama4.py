"""Tiny Llama 4 VLM (``Llama4ForConditionalGeneration``): Llama 4 vision tower (unfold patches,
pixel shuffle) and projector in front of a Llama 4 text decoder whose RoPE layers use chunked
local attention and whose NoPE layers attend globally.

Geometry: LAYER_TYPES below -- Llama 4's own pattern (``no_rope_layer_interval`` 4: three chunked
RoPE layers, then a global NoPE layer), twice, so that every KV cache group vLLM forms holds
more than one layer. ``attention_chunk_size`` 64, 4 query heads, 2 KV heads, head_dim 64,
hidden 256, QK L2-norm on the RoPE layers, attention temperature tuning on the NoPE layers (as in
Llama 4; it only changes positions >= ``floor_scale``). The feed-forward layers are all dense
(no mixture of experts: ``moe_layers`` empty, ``interleave_moe_layer_step`` 0), which keeps the
build to what the attention work needs.

Vision: a tile is 32 x 32 pixels in 4 x 4 patches (64 patches), pixel-shuffled 2 x 2 into 16
``<|patch|>`` tokens. A ``make_image`` (64 x 64) becomes 2 x 2 tiles plus the global view, 5 x 16
= 80 ``<|patch|>`` per image, in the prompt as ``<|image_start|>``, the tiles' patches with
``<|tile_x_separator|>`` / ``<|tile_y_separator|>`` between them, ``<|image|>``, the global view's
16 patches, ``<|image_end|>`` (87 tokens in all); only the patch tokens carry embeddings.

Why several tiles: stock vLLM 0.32 on CPU fails when the vision encoder gets exactly one tile in a
batch (one small image alone): ``Llama4UnfoldConvolution`` feeds a permuted (non-contiguous)
tensor to the oneDNN GEMM, which reshapes it to a strided view and stops with "Expected
a.stride(-1) == 1 to be true, but got false". Two or more tiles force a contiguous copy, so
images here are cut into several tiles; images of 32 x 32 pixels or less still hit the bug.
"""

from __future__ import annotations

from pathlib import Path

from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    HEAD_DIM,
    HIDDEN,
    IMAGE_PART_TYPES,
    build_model_dir,
    embed_ids,
    generation_config,
    make_tokenizer,
    render_prompt,
    text_config,
)

FAMILY = TinyFamily(
    name="llama4",
    architecture="Llama4ForConditionalGeneration",
    attention=("chunked_local", "full"),
    modalities=("image",),
    dtype="float32",
)

LAYER_TYPES = (("chunked_attention",) * 3 + ("full_attention",)) * 2
ATTENTION_CHUNK_SIZE = 64
TILE_SIZE = 32
PATCH_SIZE = 4
PIXEL_SHUFFLE_RATIO = 0.5
MAX_TILES = 4
PATCHES_PER_TILE = (TILE_SIZE // PATCH_SIZE) ** 2 // int(round(1 / PIXEL_SHUFFLE_RATIO ** 2))

BOS, EOS, PAD = "<|begin_of_text|>", "<|end_of_text|>", "<|finetune_right_pad|>"
HEADER_START, HEADER_END, EOT = "<|header_start|>", "<|header_end|>", "<|eot|>"
IMAGE_START, IMAGE_END, IMAGE, PATCH = "<|image_start|>", "<|image_end|>", "<|image|>", "<|patch|>"
TILE_X, TILE_Y = "<|tile_x_separator|>", "<|tile_y_separator|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, HEADER_START, HEADER_END, EOT,
                  IMAGE_START, IMAGE_END, IMAGE, PATCH, TILE_X, TILE_Y)

CHAT_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
    {{- '<|header_start|>' + message['role'] + '<|header_end|>\\n\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] in IMAGE_TYPES -%}{{- '<|image|>' -}}
            {%- elif part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|eot|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|header_start|>assistant<|header_end|>\\n\\n' -}}{%- endif -%}
""".replace("IMAGE_TYPES", IMAGE_PART_TYPES)


def _tokenizer():
    return make_tokenizer(SPECIAL_TOKENS, bos=BOS, eos=EOS, pad=PAD, add_bos=True,
                          chat_template=CHAT_TEMPLATE)


def _config(tokenizer):
    import transformers as tf

    text = text_config(
        tokenizer, bos=BOS, eos=[EOS, EOT], pad=PAD,
        intermediate_size=2 * HIDDEN,  # experts' size; unused without MoE layers
        intermediate_size_mlp=2 * HIDDEN,
        num_hidden_layers=len(LAYER_TYPES),
        head_dim=HEAD_DIM,
        rms_norm_eps=1e-5,
        rope_parameters={"rope_type": "default", "rope_theta": 500_000.0},
        # 1 = RoPE + chunked local attention, 0 = NoPE + global attention.
        no_rope_layers=[int(t == "chunked_attention") for t in LAYER_TYPES],
        layer_types=list(LAYER_TYPES),
        attention_chunk_size=ATTENTION_CHUNK_SIZE,
        moe_layers=[],
        interleave_moe_layer_step=0,  # vLLM decides MoE layers from this alone
        num_local_experts=1,
        num_experts_per_tok=1,
        use_qk_norm=True,
        attn_temperature_tuning=True,
    )
    vision_hidden = 64
    vision = dict(
        hidden_size=vision_hidden,
        # the MLP after pixel shuffle takes vision_hidden / ratio ** 2 features
        intermediate_size=vision_hidden * int(round(1 / PIXEL_SHUFFLE_RATIO ** 2)),
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=TILE_SIZE,
        patch_size=PATCH_SIZE,
        pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO,
        projector_input_dim=128,
        projector_output_dim=128,
        vision_output_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10_000.0},
    )
    return tf.Llama4Config(
        text_config=text,
        vision_config=vision,
        boi_token_index=tokenizer.convert_tokens_to_ids(IMAGE_START),
        eoi_token_index=tokenizer.convert_tokens_to_ids(IMAGE_END),
        image_token_index=tokenizer.convert_tokens_to_ids(PATCH),
        tie_word_embeddings=False,
    )


def _processor(tokenizer):
    import transformers as tf

    image_processor = tf.Llama4ImageProcessor(
        size={"height": TILE_SIZE, "width": TILE_SIZE},
        max_patches=MAX_TILES,
        resize_to_max_canvas=False,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
    )
    return tf.Llama4Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        pixel_shuffle_ratio=PIXEL_SHUFFLE_RATIO,
        chat_template=CHAT_TEMPLATE,
    )


def build(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the tiny Llama 4 into ``out_dir`` (replaced if it exists); returns its path."""
    import transformers as tf

    tokenizer = _tokenizer()
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Llama4ForConditionalGeneration,
        config=_config(tokenizer), tokenizer=tokenizer, processor=_processor(tokenizer),
        generation=generation_config(tokenizer, bos=BOS, eos=[EOS, EOT], pad=PAD),
    )


def prompt(parts: list) -> dict:
    """A user turn in Llama 4's chat format; each image is one ``<|image|>``."""
    # No <|begin_of_text|> here: the tokenizer prepends it.
    return render_prompt(parts, {"image": IMAGE}, f"{HEADER_START}user{HEADER_END}\n\n",
                         f"{EOT}{HEADER_START}assistant{HEADER_END}\n\n")


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, {"image": PATCH})
