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

import json
import os
import shutil
import tempfile
from pathlib import Path

from madakv_eval.prompts import make_image, make_video
from madakv_eval.tiny_models import (
    _CHATML_TEMPLATE,
    _CLIP_MEAN,
    _CLIP_STD,
    _IMAGE_PART_TYPES,
    _random_state_dict,
    train_tokenizer_json,
)
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.qwen2_5_vl import video_data_url  # noqa: F401 (same mp4 encoding here)

FAMILY = TinyFamily(
    name="internvl",
    architecture="InternVLForConditionalGeneration",
    attention=("full",),
    modalities=("image", "video"),
    dtype="float32",
)

LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
HIDDEN = HEADS * HEAD_DIM  # vLLM's Qwen2 derives head_dim as hidden // heads
MAX_POSITIONS = 32768
ROPE_THETA = 1_000_000.0
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
CHATML_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


def chat_template() -> str:
    return (_CHATML_TEMPLATE.replace("IMAGE_TYPES", _IMAGE_PART_TYPES)
            .replace("IMAGE", f"'{IMAGE_CONTEXT}\\n'").replace("VIDEO", f"'{VIDEO}\\n'"))


def _tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(train_tokenizer_json())
    # Appended after the shared vocabulary, so the shared tokens keep their ids.
    tok.add_special_tokens(list(NAMED_TOKENS.values()))
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        extra_special_tokens=dict(NAMED_TOKENS),
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = chat_template()
    return hf


def _configs(vocab_size: int, ids: dict[str, int]):
    import transformers as tf

    text = tf.Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=LAYERS,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=MAX_POSITIONS,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
        bos_token_id=ids["<|endoftext|>"],
        eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"],
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=LAYERS,
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA},
    )
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
    cfg = tf.InternVLConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=ids[IMAGE_CONTEXT],
        image_seq_length=TOKENS_PER_TILE,
        downsample_ratio=DOWNSAMPLE,
        projector_hidden_act="gelu",
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=False,
    )
    cfg.architectures = [FAMILY.architecture]
    return cfg, tf.InternVLForConditionalGeneration


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
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _tokenizer()
        ids = {t: tokenizer.convert_tokens_to_ids(t)
               for t in (*CHATML_TOKENS, *NAMED_TOKENS.values())}
        config, model_cls = _configs(len(tokenizer), ids)
        config.dtype = FAMILY.dtype
        sd = _random_state_dict(model_cls, config, FAMILY.dtype, seed)
        with torch.no_grad():
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({
            "bos_token_id": ids["<|endoftext|>"],
            "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
            "pad_token_id": ids["<|endoftext|>"],
        }, indent=2, sort_keys=True) + "\n")
        tokenizer.save_pretrained(tmp)
        _processor(tokenizer).save_pretrained(tmp)
        (tmp / "madakv_zoo_model.json").write_text(json.dumps({
            "family": FAMILY.name, "seed": seed, "vocab_size": len(tokenizer),
            "num_parameters": int(sum(t.numel() for t in sd.values())),
            "image_tokens_64x64": TOKENS_PER_TILE, "video_tokens_4x64x64": 4 * TOKENS_PER_TILE,
        }, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def prompt(parts: list) -> dict:
    text, media = "", {"image": [], "video": []}
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        modality, seed = part
        if modality == "image":
            text += IMAGE_CONTEXT + "\n"
            media["image"].append(make_image(seed))
        elif modality == "video":
            text += VIDEO + "\n"
            media["video"].append(make_video(seed))
        else:
            raise ValueError(f"InternVL takes images and videos, not {modality!r}")
    out = {"prompt": SYSTEM + "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n"}
    if any(media.values()):
        out["multi_modal_data"] = {k: v for k, v in media.items() if v}
    return out


def embed_token_ids(tokenizer) -> dict[str, int]:
    return {"image": tokenizer.convert_tokens_to_ids(IMAGE_CONTEXT),
            "video": tokenizer.convert_tokens_to_ids(VIDEO)}
