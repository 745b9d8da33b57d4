"""Tiny Gemma 3 VLM (``Gemma3ForConditionalGeneration``): SigLIP vision tower, avg-pooled and
projected into a Gemma 3 text decoder whose layers alternate sliding-window and global attention.

Geometry: 4 text layers -- 0 and 2 sliding-window (window 64), 1 and 3 global --, 4 query heads,
2 KV heads, head_dim 64, hidden 256, no attention or final logit soft-capping. Vision: SigLIP,
64 x 64 input, 8 x 8 patches (64 patches), average-pooled 2 x 2 into ``mm_tokens_per_image`` =
16 ``<image_soft_token>`` per image, whatever the input size (the processor resizes to 64 x 64;
pan-and-scan is off). An image in the prompt is ``<start_of_image>``, which vLLM expands to
``"\\n\\n" <start_of_image> <image_soft_token> * 16 <end_of_image> "\\n\\n"``; only the soft tokens
carry image embeddings.

Checkpoint quirk: transformers 5 saves the SigLIP tower as ``model.vision_tower.*``; vLLM 0.32
expects ``model.vision_tower.vision_model.*``, so keys are renamed (``common.nest_vision_model``).
The LM head is tied to the input embeddings and not saved.

Tokenizer quirk: vLLM's Gemma 3 processor looks up ``"\\n"``, ``"\\n\\n"``, ``"\\n\\n\\n"`` and
``"\\n\\n\\n\\n"`` by their literal text in the vocabulary (the real Gemma vocabulary is not
byte-level), so they are added tokens here, which also makes runs of newlines tokenize the way
vLLM's placeholder bookkeeping assumes (a run of 3 or 4 newlines is one token).
"""

from __future__ import annotations

from pathlib import Path

from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    IMAGE_PART_TYPES,
    MAX_POSITIONS,
    VISION_TOWER,
    build_model_dir,
    embed_ids,
    generation_config,
    make_tokenizer,
    nest_vision_model,
    render_prompt,
    text_config,
)

FAMILY = TinyFamily(
    name="gemma3",
    architecture="Gemma3ForConditionalGeneration",
    attention=("sliding_window", "full"),
    modalities=("image",),
    dtype="float32",
)

LAYER_TYPES = ("sliding_attention", "full_attention", "sliding_attention", "full_attention")
SLIDING_WINDOW = 64
HEAD_DIM = 64
IMAGE_SIZE = 64
PATCH_SIZE = 8
MM_TOKENS_PER_IMAGE = 16  # (64 / 8) ** 2 = 64 patches, pooled 2 x 2

BOS, EOS, PAD = "<bos>", "<eos>", "<pad>"
START_OF_TURN, END_OF_TURN = "<start_of_turn>", "<end_of_turn>"
BOI, IMAGE_SOFT, EOI = "<start_of_image>", "<image_soft_token>", "<end_of_image>"
SPECIAL_TOKENS = (BOS, EOS, PAD, START_OF_TURN, END_OF_TURN, BOI, IMAGE_SOFT, EOI)
# Single tokens in Gemma's vocabulary that vLLM's Gemma 3 processor looks up by text.
NEWLINE_TOKENS = tuple("\n" * n for n in range(1, 5))

_SIGLIP_MEAN = [0.5, 0.5, 0.5]
_SIGLIP_STD = [0.5, 0.5, 0.5]

CHAT_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
    {%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}
    {{- '<start_of_turn>' + role + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] in IMAGE_TYPES -%}{{- '<start_of_image>' -}}
            {%- elif part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<end_of_turn>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}
""".replace("IMAGE_TYPES", IMAGE_PART_TYPES)


def _tokenizer():
    return make_tokenizer(
        SPECIAL_TOKENS, bos=BOS, eos=EOS, pad=PAD, add_bos=True,
        # Gemma3Processor reads these three off the tokenizer.
        named={"boi_token": BOI, "eoi_token": EOI, "image_token": IMAGE_SOFT},
        plain=NEWLINE_TOKENS, chat_template=CHAT_TEMPLATE,
    )


def _config(tokenizer, layer_types: tuple[str, ...], sliding_window: int, max_positions: int):
    import transformers as tf

    text = tf.Gemma3TextConfig(**text_config(
        tokenizer, bos=BOS, eos=EOS, pad=PAD,
        num_hidden_layers=len(layer_types),
        max_position_embeddings=max_positions,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        sliding_window=sliding_window,
        layer_types=list(layer_types),
        # madakv refuses attention soft-capping; Gemma 3 has none, set explicitly all the same.
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        tie_word_embeddings=True,
    ))
    vision = tf.SiglipVisionConfig(
        **VISION_TOWER, image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, vision_use_head=False,
    )
    return tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=tokenizer.convert_tokens_to_ids(BOI),
        eoi_token_index=tokenizer.convert_tokens_to_ids(EOI),
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_SOFT),
        tie_word_embeddings=True,
    )


def _processor(tokenizer):
    import transformers as tf

    image_processor = tf.Gemma3ImageProcessor(
        size={"height": IMAGE_SIZE, "width": IMAGE_SIZE},
        do_resize=True,
        do_rescale=True,
        do_normalize=True,
        do_convert_rgb=True,
        do_pan_and_scan=False,
        image_mean=_SIGLIP_MEAN,
        image_std=_SIGLIP_STD,
    )
    return tf.Gemma3Processor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        image_seq_length=MM_TOKENS_PER_IMAGE,
        chat_template=CHAT_TEMPLATE,
    )


def _to_checkpoint(state: dict) -> dict:
    state.pop("lm_head.weight", None)  # tied to the input embeddings
    return nest_vision_model(state)


def build(out_dir: Path, *, seed: int = 0, layer_types: tuple[str, ...] | None = None,
          sliding_window: int | None = None, max_position_embeddings: int | None = None) -> Path:
    """Build the tiny Gemma 3 into ``out_dir`` (replaced if it exists); returns its path.

    The keyword arguments change the text decoder's geometry (the defaults: ``LAYER_TYPES``,
    ``SLIDING_WINDOW``, 32768 positions), e.g. Gemma 3's own 5:1 pattern of sliding-window and
    global layers at a window that matters next to a few thousand tokens (scripts/bench_capacity.py);
    ``layer_types`` holds ``"sliding_attention"`` / ``"full_attention"`` per layer.
    """
    import transformers as tf

    tokenizer = _tokenizer()
    config = _config(tokenizer, LAYER_TYPES if layer_types is None else layer_types,
                     SLIDING_WINDOW if sliding_window is None else sliding_window,
                     MAX_POSITIONS if max_position_embeddings is None else max_position_embeddings)
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Gemma3ForConditionalGeneration, config=config,
        tokenizer=tokenizer, processor=_processor(tokenizer),
        generation=generation_config(tokenizer, bos=BOS, eos=[EOS, END_OF_TURN], pad=PAD),
        to_checkpoint=_to_checkpoint,
    )


def prompt(parts: list) -> dict:
    """A user turn in Gemma's chat format; each image is one ``<start_of_image>``."""
    # No <bos> here: the tokenizer prepends it.
    return render_prompt(parts, {"image": BOI}, f"{START_OF_TURN}user\n",
                         f"{END_OF_TURN}\n{START_OF_TURN}model\n")


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, {"image": IMAGE_SOFT})
