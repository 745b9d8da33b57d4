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

This module also holds the small builders the other zoo families share (tokenizer with extra
special tokens, atomic model-directory writer).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from madakv_eval.prompts import make_media
from madakv_eval.tiny_models import _CLIP_MEAN, _CLIP_STD, _random_state_dict, train_tokenizer_json
from madakv_eval.zoo import TinyFamily

FAMILY = TinyFamily(
    name="llava_onevision",
    architecture="LlavaOnevisionForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

IMAGE_SIZE = 96
PATCH_SIZE = 16
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
HIDDEN = HEADS * HEAD_DIM
MAX_POS = 32768

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
# What a media item is in the prompt (OneVision puts a newline after each).
MEDIA_PROMPT = {"image": IMAGE_TOKEN + "\n", "video": VIDEO_TOKEN + "\n"}
_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_MEDIA_PART_TYPES = {
    "image": "['image', 'image_url', 'input_image', 'image_pil', 'image_embeds']",
    "video": "['video', 'video_url']",
    "audio": "['audio', 'audio_url', 'input_audio', 'audio_embeds']",
}


# --------------------------------------------------------------------------- shared builders
def make_tokenizer(
    extra_special: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str | None,
    unk: str | None = None,
    add_bos: bool = False,
    chat_template: str | None = None,
):
    """The shared tiny BPE tokenizer (``tiny_models.train_tokenizer_json``) with ``extra_special``
    appended as special tokens (those it already holds keep their ids)."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(train_tokenizer_json())
    missing = [t for t in dict.fromkeys(extra_special) if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if add_bos:
        assert bos is not None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    named = {bos, eos, pad, unk}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        additional_special_tokens=[t for t in dict.fromkeys(extra_special) if t not in named],
        model_max_length=MAX_POS,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def chatml_template(media: Mapping[str, str], *, default_system: str | None = None) -> str:
    """ChatML chat template over OpenAI-style messages; a media part of modality ``m`` renders as
    ``media[m]`` (content lists are iterated, so vLLM detects the "openai" content format)."""
    branches = "".join(
        f"{{%- elif part['type'] in {_MEDIA_PART_TYPES[m]} -%}}{{{{- {json.dumps(s)} -}}}}\n"
        for m, s in media.items()
    )
    system = ""
    if default_system is not None:
        system = (
            "{%- if loop.first and message['role'] != 'system' -%}"
            f"{{{{- '<|im_start|>system\\n' + {json.dumps(default_system)} + '<|im_end|>\\n' -}}}}"
            "{%- endif -%}\n"
        )
    return (
        "{%- for message in messages -%}\n" + system
        + "{{- '<|im_start|>' + message['role'] + '\\n' -}}\n"
        "{%- if message['content'] is string -%}{{- message['content'] -}}\n"
        "{%- else -%}{%- for part in message['content'] -%}\n"
        "{%- if part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}\n"
        + branches
        + "{%- endif -%}{%- endfor -%}{%- endif -%}\n"
        "{{- '<|im_end|>\\n' -}}\n"
        "{%- endfor -%}\n"
        "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
    )


def render_parts(parts: list, placeholders: Mapping[str, str]) -> tuple[str, dict[str, list]]:
    """Text with each media item replaced by ``placeholders[modality]``, and the media items as
    vLLM's ``multi_modal_data`` (a list per modality, in prompt order)."""
    text, media = "", {}
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        modality, seed = part
        if modality not in placeholders:
            raise ValueError(f"this model takes {sorted(placeholders)}, not {modality!r}")
        text += placeholders[modality]
        media.setdefault(modality, []).append(make_media(modality, seed))
    return text, media


def vllm_prompt(text: str, media: dict[str, list]) -> dict:
    prompt: dict[str, Any] = {"prompt": text}
    if media:
        prompt["multi_modal_data"] = media
    return prompt


def write_model_dir(out_dir: Path, *, config, state_dict: Mapping[str, Any], tokenizer,
                    processor=None, generation: Mapping[str, Any] | None = None,
                    info: Mapping[str, Any] | None = None) -> Path:
    """Write a Hugging Face model directory atomically (built beside ``out_dir``, then renamed
    over it): config, one safetensors file, generation config, tokenizer, processor."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(dict(state_dict), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if generation is not None:
            (tmp / "generation_config.json").write_text(
                json.dumps(dict(generation), indent=2) + "\n")
        if info is not None:
            (tmp / "madakv_tiny_model.json").write_text(
                json.dumps(dict(info), indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def rename_prefix(state_dict: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """Keys under ``old`` moved under ``new`` (keys already under ``new`` are kept)."""
    return {
        (new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v
        for k, v in state_dict.items()
    }


# --------------------------------------------------------------------------- this family
def _tokenizer():
    template = chatml_template(MEDIA_PROMPT, default_system="You are a helpful assistant.")
    return make_tokenizer([*_CHATML, IMAGE_TOKEN, VIDEO_TOKEN], bos=None, eos="<|im_end|>",
                          pad="<|endoftext|>", chat_template=template)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return {"image": tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
            "video": tokenizer.convert_tokens_to_ids(VIDEO_TOKEN)}


def prompt(parts: list) -> dict:
    text, media = render_parts(parts, MEDIA_PROMPT)
    return vllm_prompt("<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n", media)


def build(out_dir: Path, *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*_CHATML, IMAGE_TOKEN, VIDEO_TOKEN)}
    text = tf.Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POS,
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=LAYERS,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
    )
    vision = tf.SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
    )
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
    config.architectures = [FAMILY.architecture]
    config.dtype = FAMILY.dtype
    state = _random_state_dict(
        tf.LlavaOnevisionForConditionalGeneration, config, FAMILY.dtype, seed)
    # transformers 5 saves the SigLIP tower flat; vLLM's SiglipVisionModel nests it in vision_model.
    state = rename_prefix(state, "model.vision_tower.", "model.vision_tower.vision_model.")

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
    return write_model_dir(
        out_dir, config=config, state_dict=state, tokenizer=tokenizer, processor=processor,
        generation={"bos_token_id": ids["<|endoftext|>"],
                    "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                    "pad_token_id": ids["<|endoftext|>"]},
        info={"family": FAMILY.name, "seed": seed, "vocab_size": len(tokenizer),
              "num_parameters": int(sum(t.numel() for t in state.values()))},
    )
