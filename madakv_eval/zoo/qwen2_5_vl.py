"""Tiny Qwen2.5-VL (``Qwen2_5_VLForConditionalGeneration``): images and videos.

Text: 2 Qwen2 decoder layers, all full attention, 4 query / 2 KV heads of head_dim 64, hidden
256, M-RoPE sections [8, 12, 12] (the real model's [16, 24, 24] at half the head_dim). Vision:
the Qwen2.5-VL tower (RMSNorm, gated SiLU MLP, windowed attention in block 0 and full attention
in block 1) at hidden 64 with 2 heads, patch 8 instead of 14 so that ``make_image``'s 64 x 64
images need no upscaling: one placeholder token covers (2 * 8) ** 2 = 16 x 16 pixels after
2 x 2 merging, so a 64 x 64 image gives 16 ``<|image_pad|>`` tokens and ``make_video``'s 4
frames of 64 x 64 give (4 / temporal_patch_size 2) * 16 = 32 ``<|video_pad|>`` tokens (videos
need an even frame count).

Videos go to vLLM as ``(frames, metadata)``: vLLM's Qwen2.5-VL parser refuses a bare frame array
("Video metadata is required"), since the processor derives ``second_per_grid_ts`` (the temporal
M-RoPE stride) from the frame rate. :func:`video_data_url` encodes the same frames as an mp4 data
URL for the OpenAI API.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
import tempfile
from pathlib import Path

from madakv_eval.prompts import make_image, make_video
from madakv_eval.tiny_models import (
    SPECIAL_TOKENS,
    _CLIP_MEAN,
    _CLIP_STD,
    _make_tokenizer,
    _random_state_dict,
    _write_generation_config,
    chat_template,
)
from madakv_eval.zoo import TinyFamily

FAMILY = TinyFamily(
    name="qwen2_5_vl",
    architecture="Qwen2_5_VLForConditionalGeneration",
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
MROPE_SECTION = [8, 12, 12]  # temporal, height, width frequencies; they sum to head_dim // 2
VISION_DEPTH = 2
VISION_HIDDEN = 64
VISION_HEADS = 2
PATCH = 8
MERGE = 2
TEMPORAL_PATCH = 2
# 32 pixels = 2 merged tokens per window side: a 64 x 64 image has 4 windows, so the windowed
# block attends within windows and the full-attention block across them.
WINDOW = 32
MIN_TOKENS = 16
MAX_TOKENS = 64
#: Frame rate stated for ``make_video`` clips (offline metadata and the mp4 container alike).
VIDEO_FPS = 2.0
#: The chat template's default system turn, spelt out so offline prompts tokenise as served ones.
SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"


def _configs(vocab_size: int, ids: dict[str, int]):
    import transformers as tf

    text = dict(
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
        rope_parameters={"rope_type": "default", "rope_theta": ROPE_THETA,
                         "mrope_section": MROPE_SECTION},
    )
    vision = dict(
        depth=VISION_DEPTH,
        hidden_size=VISION_HIDDEN,
        intermediate_size=2 * VISION_HIDDEN,
        num_heads=VISION_HEADS,
        out_hidden_size=HIDDEN,
        hidden_act="silu",
        in_channels=3,
        patch_size=PATCH,
        spatial_merge_size=MERGE,
        temporal_patch_size=TEMPORAL_PATCH,
        window_size=WINDOW,
        fullatt_block_indexes=[VISION_DEPTH - 1],
        tokens_per_second=2,
    )
    cfg = tf.Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.architectures = [FAMILY.architecture]
    return cfg, tf.Qwen2_5_VLForConditionalGeneration


def _processor(tokenizer):
    import transformers as tf

    factor = PATCH * MERGE
    size = {"shortest_edge": MIN_TOKENS * factor * factor,
            "longest_edge": MAX_TOKENS * factor * factor}
    common = dict(size=size, patch_size=PATCH, temporal_patch_size=TEMPORAL_PATCH,
                  merge_size=MERGE, image_mean=_CLIP_MEAN, image_std=_CLIP_STD)
    return tf.Qwen2_5_VLProcessor(
        image_processor=tf.Qwen2VLImageProcessor(**common),
        video_processor=tf.Qwen2VLVideoProcessor(**common),
        tokenizer=tokenizer,
        chat_template=chat_template("qwen2vl"),
    )


def build_qwen_vl(family: TinyFamily, configs, processor, out_dir: str | os.PathLike[str],
                  seed: int, info: dict, to_checkpoint=None) -> Path:
    """Write a Qwen-VL style model (shared ChatML tokenizer) into ``out_dir`` atomically.

    ``configs(vocab_size, ids) -> (hf_config, hf_model_class)``; ``processor(tokenizer)``;
    ``to_checkpoint(state_dict) -> state_dict`` turns transformers' in-memory layout into the
    one the family's checkpoints (and so vLLM's loader) use, where they differ."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _make_tokenizer("qwen2vl", None)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config, model_cls = configs(len(tokenizer), ids)
        config.dtype = family.dtype
        sd = _random_state_dict(model_cls, config, family.dtype, seed)
        if to_checkpoint is not None:
            sd = to_checkpoint(sd)
        with torch.no_grad():
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        _write_generation_config(tmp, "qwen2vl", ids)
        tokenizer.save_pretrained(tmp)
        processor(tokenizer).save_pretrained(tmp)
        (tmp / "madakv_zoo_model.json").write_text(json.dumps({
            "family": family.name, "seed": seed, "vocab_size": len(tokenizer),
            "num_parameters": int(sum(t.numel() for t in sd.values())), **info,
        }, indent=2, sort_keys=True) + "\n")
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build(out_dir: str | os.PathLike[str], *, seed: int = 0) -> Path:
    return build_qwen_vl(FAMILY, _configs, _processor, out_dir, seed,
                         {"image_tokens_64x64": 16, "video_tokens_4x64x64": 32})


def video_item(seed: int):
    """``make_video(seed)`` with the metadata vLLM's Qwen-VL parsers require."""
    frames = make_video(seed)
    n = int(frames.shape[0])
    return frames, {
        "fps": VIDEO_FPS,
        "duration": n / VIDEO_FPS,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }


def chatml_prompt(parts: list, video=video_item) -> dict:
    text, media = "", {"image": [], "video": []}
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        modality, seed = part
        if modality == "image":
            text += IMAGE_PLACEHOLDER
            media["image"].append(make_image(seed))
        elif modality == "video":
            text += VIDEO_PLACEHOLDER
            media["video"].append(video(seed))
        else:
            raise ValueError(f"Qwen-VL takes images and videos, not {modality!r}")
    out = {"prompt": SYSTEM + "<|im_start|>user\n" + text
           + "<|im_end|>\n<|im_start|>assistant\n"}
    if any(media.values()):
        out["multi_modal_data"] = {k: v for k, v in media.items() if v}
    return out


def prompt(parts: list) -> dict:
    return chatml_prompt(parts)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return {"image": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            "video": tokenizer.convert_tokens_to_ids("<|video_pad|>")}


def video_data_url(seed: int) -> str:
    """``make_video(seed)`` as an mp4 (MPEG-4 part 2) data URL for an OpenAI ``video_url`` part;
    vLLM decodes it with OpenCV to the same frame count (lossily)."""
    import cv2

    frames = make_video(seed)
    n, h, w, _ = frames.shape
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "clip.mp4")
        writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), VIDEO_FPS, (w, h))
        if not writer.isOpened():
            raise RuntimeError("OpenCV cannot open an mp4v VideoWriter")
        for frame in frames:
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
        writer.release()
        data = Path(path).read_bytes()
    return "data:video/mp4;base64," + base64.b64encode(data).decode("ascii")
