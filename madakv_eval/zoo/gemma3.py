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
expects ``model.vision_tower.vision_model.*``, so keys are renamed.

Tokenizer quirk: vLLM's Gemma 3 processor looks up ``"\\n"``, ``"\\n\\n"``, ``"\\n\\n\\n"`` and
``"\\n\\n\\n\\n"`` by their literal text in the vocabulary (the real Gemma vocabulary is not
byte-level), so they are added tokens here, which also makes runs of newlines tokenize the way
vLLM's placeholder bookkeeping assumes (a run of 3 or 4 newlines is one token).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from madakv_eval.tiny_models import _IMAGE_PART_TYPES
from madakv_eval.zoo import TinyFamily

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
HEADS = 4
KV_HEADS = 2
HIDDEN = 256
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
""".replace("IMAGE_TYPES", _IMAGE_PART_TYPES)


def _tokenizer():
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    from madakv_eval.tiny_models import train_tokenizer_json

    tok = Tokenizer.from_str(train_tokenizer_json())
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in NEWLINE_TOKENS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B",
        special_tokens=[(BOS, tok.token_to_id(BOS))],
    )
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=None,
        # Gemma3Processor reads these three off the tokenizer.
        boi_token=BOI,
        eoi_token=EOI,
        image_token=IMAGE_SOFT,
        additional_special_tokens=[START_OF_TURN, END_OF_TURN],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf


def _config(vocab_size: int, ids: dict[str, int]):
    import transformers as tf

    text = tf.Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=len(LAYER_TYPES),
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        query_pre_attn_scalar=HEAD_DIM,
        max_position_embeddings=32768,
        sliding_window=SLIDING_WINDOW,
        layer_types=list(LAYER_TYPES),
        # madakv refuses attention soft-capping; Gemma 3 has none, set explicitly all the same.
        attn_logit_softcapping=None,
        final_logit_softcapping=None,
        rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1_000_000.0},
            "sliding_attention": {"rope_type": "default", "rope_theta": 10_000.0},
        },
        bos_token_id=ids[BOS],
        eos_token_id=ids[EOS],
        pad_token_id=ids[PAD],
        tie_word_embeddings=True,
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        vision_use_head=False,
    )
    cfg = tf.Gemma3Config(
        text_config=text,
        vision_config=vision,
        mm_tokens_per_image=MM_TOKENS_PER_IMAGE,
        boi_token_index=ids[BOI],
        eoi_token_index=ids[EOI],
        image_token_index=ids[IMAGE_SOFT],
        tie_word_embeddings=True,
    )
    cfg.architectures = ["Gemma3ForConditionalGeneration"]
    return cfg


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


def _siglip_keys_for_vllm(sd: dict) -> dict:
    # transformers 5 saves the SigLIP tower flat (model.vision_tower.embeddings...); vLLM 0.32's
    # Gemma 3 wraps a SiglipVisionModel and expects vision_tower.vision_model.*.
    old, new = "model.vision_tower.", "model.vision_tower.vision_model."
    return {
        (new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v
        for k, v in sd.items()
    }


def build(out_dir: Path, *, seed: int = 0, layer_types: tuple[str, ...] | None = None,
          sliding_window: int | None = None, max_position_embeddings: int | None = None) -> Path:
    """Build the tiny Gemma 3 into ``out_dir`` (replaced if it exists); returns its path.

    The keyword arguments change the text decoder's geometry (the defaults: ``LAYER_TYPES``,
    ``SLIDING_WINDOW``, 32768 positions), e.g. Gemma 3's own 5:1 pattern of sliding-window and
    global layers at a window that matters next to a few thousand tokens (scripts/bench_capacity.py);
    ``layer_types`` holds ``"sliding_attention"`` / ``"full_attention"`` per layer.
    """
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from madakv_eval.tiny_models import _random_state_dict

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _tokenizer()
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = _config(len(tokenizer), ids)
        config.dtype = FAMILY.dtype
        text = config.text_config
        if layer_types is not None:
            text.layer_types = list(layer_types)
            text.num_hidden_layers = len(layer_types)
        if sliding_window is not None:
            text.sliding_window = sliding_window
        if max_position_embeddings is not None:
            text.max_position_embeddings = max_position_embeddings
        sd = _random_state_dict(tf.Gemma3ForConditionalGeneration, config, FAMILY.dtype, seed)
        sd.pop("lm_head.weight", None)  # tied to the input embeddings
        sd = _siglip_keys_for_vllm(sd)
        with torch.no_grad():
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ids[BOS],
            "eos_token_id": [ids[EOS], ids[END_OF_TURN]],
            "pad_token_id": ids[PAD],
        }, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        _processor(tokenizer).save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prompt(parts: list) -> dict:
    """A user turn in Gemma's chat format; each image is one ``<start_of_image>``."""
    from madakv_eval.prompts import make_media

    text, images = "", []
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        modality, seed = part
        if modality != "image":
            raise ValueError(f"gemma3 takes images only, not {modality!r}")
        text += BOI
        images.append(make_media("image", seed))
    # No <bos> here: the tokenizer prepends it.
    out = {"prompt": f"{START_OF_TURN}user\n{text}{END_OF_TURN}\n{START_OF_TURN}model\n"}
    if images:
        out["multi_modal_data"] = {"image": images}
    return out


def embed_token_ids(tokenizer) -> dict[str, int]:
    return {"image": tokenizer.convert_tokens_to_ids(IMAGE_SOFT)}
