"""Tiny Qwen3.5 VLM (``Qwen3_5ForConditionalGeneration``): Qwen3.5 vision tower (2x2 patch merging)
in front of a hybrid decoder of Gated DeltaNet linear-attention layers and gated full-attention
layers with interleaved M-RoPE.

Geometry: LAYER_TYPES below (linear, linear, linear, full) x 2 -- Qwen3.5's own 3:1 pattern
(``full_attention_interval`` 4), twice, so that the full-attention KV cache group holds two
layers (one full layer alone would hide anything that differs between attention layers of one
group). Full attention: 4 query heads, 2 KV heads, head_dim 64, output gate, partial rotary 0.25
(16 rotary dims, M-RoPE sections [3, 3, 2]). Gated DeltaNet: 2 key heads and 4 value heads of
dim 64 (vLLM's CPU GDN kernels take head sizes 64 and 128 only), conv kernel 4. Hidden 256.

Vision: patch 16, 2x2 merge, so one placeholder token covers 32 x 32 pixels; images are resized to
between 16 and 64 tokens (a 64 x 64 ``make_image`` gives 16 ``<|image_pad|>``). Videos: frames are
paired (temporal patch 2) and each pair is resized to at least 16 tokens; a 4-frame 64 x 64
``make_video`` gives 2 x 16 = 32 ``<|video_pad|>``, in the prompt as
``<t seconds><|vision_start|><|video_pad|> * 16<|vision_end|>`` per frame pair. vLLM's Qwen3-VL
processor needs each video's metadata (fps, frame indices) for those timestamps, so ``prompt``
passes videos as ``(frames, metadata)``.

KV cache: vLLM makes the attention block size match the Gated DeltaNet state's page, so
``block_size=32`` becomes 160 tokens per block for every group of this model.

dtype: bfloat16 -- vLLM's CPU Gated DeltaNet refuses float32 ("CPU GDN attention requires BF16").
Tokenizer: transformers 5 loads ``Qwen3_5Tokenizer`` for this model type whatever
tokenizer_config.json names; it rebuilds the byte-level BPE from the saved vocab and merges with
Qwen's split regex, which the shared tiny tokenizer is compatible with.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from madakv_eval.zoo import TinyFamily

FAMILY = TinyFamily(
    name="qwen3_5",
    architecture="Qwen3_5ForConditionalGeneration",
    attention=("linear", "full"),
    modalities=("image", "video"),
    dtype="bfloat16",
)

LAYER_TYPES = (("linear_attention",) * 3 + ("full_attention",)) * 2
HIDDEN = 256
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
LINEAR_KEY_HEADS = 2
LINEAR_VALUE_HEADS = 4
LINEAR_HEAD_DIM = 64
PATCH_SIZE = 16
MERGE_SIZE = 2
TEMPORAL_PATCH_SIZE = 2
MIN_IMAGE_TOKENS = 16
MAX_IMAGE_TOKENS = 64
VIDEO_FPS = 2.0  # what the video metadata passed to vLLM claims

IM_START, IM_END, ENDOFTEXT = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
VISION_START, VISION_END = "<|vision_start|>", "<|vision_end|>"
IMAGE_PAD, VIDEO_PAD = "<|image_pad|>", "<|video_pad|>"

_MEAN = [0.5, 0.5, 0.5]
_STD = [0.5, 0.5, 0.5]


def _tokenizer():
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    from madakv_eval.tiny_models import SPECIAL_TOKENS, chat_template, train_tokenizer_json

    specials = {"eos_token": IM_END, "pad_token": ENDOFTEXT}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(train_tokenizer_json()),
        bos_token=None,
        unk_token=None,
        **specials,
        additional_special_tokens=[t for t in SPECIAL_TOKENS if t not in specials.values()],
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = chat_template("qwen2vl")  # ChatML with Qwen's vision placeholders
    return hf


def _config(vocab_size: int, ids: dict[str, int]):
    import transformers as tf

    text = dict(
        vocab_size=vocab_size,
        hidden_size=HIDDEN,
        intermediate_size=2 * HIDDEN,
        num_hidden_layers=len(LAYER_TYPES),
        layer_types=list(LAYER_TYPES),
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        head_dim=HEAD_DIM,
        linear_num_key_heads=LINEAR_KEY_HEADS,
        linear_num_value_heads=LINEAR_VALUE_HEADS,
        linear_key_head_dim=LINEAR_HEAD_DIM,
        linear_value_head_dim=LINEAR_HEAD_DIM,
        linear_conv_kernel_dim=4,
        max_position_embeddings=32768,
        rms_norm_eps=1e-6,
        rope_parameters={
            "rope_type": "default",
            "rope_theta": 10_000_000.0,
            "partial_rotary_factor": 0.25,
            # 64 * 0.25 = 16 rotary dims = 8 frequencies over (t, h, w), as Qwen3.5's [11, 11, 10]
            "mrope_section": [3, 3, 2],
            "mrope_interleaved": True,
        },
        bos_token_id=None,
        eos_token_id=ids[IM_END],
        pad_token_id=ids[ENDOFTEXT],
        tie_word_embeddings=False,
    )
    vision = dict(
        depth=2,
        hidden_size=64,
        intermediate_size=128,
        num_heads=2,
        in_channels=3,
        patch_size=PATCH_SIZE,
        spatial_merge_size=MERGE_SIZE,
        temporal_patch_size=TEMPORAL_PATCH_SIZE,
        out_hidden_size=HIDDEN,
        num_position_embeddings=64,  # an 8 x 8 grid of learned positions, interpolated
    )
    cfg = tf.Qwen3_5Config(
        text_config=text,
        vision_config=vision,
        image_token_id=ids[IMAGE_PAD],
        video_token_id=ids[VIDEO_PAD],
        vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END],
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen3_5ForConditionalGeneration"]
    return cfg


def _processor(tokenizer):
    import transformers as tf

    token_px = (PATCH_SIZE * MERGE_SIZE) ** 2
    image_processor = tf.Qwen2VLImageProcessor(
        size={"shortest_edge": MIN_IMAGE_TOKENS * token_px,
              "longest_edge": MAX_IMAGE_TOKENS * token_px},
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
        image_mean=_MEAN, image_std=_STD,
    )
    # The video budget counts all frames: each pair of frames gets >= MIN_IMAGE_TOKENS tokens for
    # a 4-frame clip.
    video_processor = tf.Qwen3VLVideoProcessor(
        size={"shortest_edge": 2 * TEMPORAL_PATCH_SIZE * MIN_IMAGE_TOKENS * token_px,
              "longest_edge": 2 * TEMPORAL_PATCH_SIZE * MAX_IMAGE_TOKENS * token_px},
        patch_size=PATCH_SIZE, temporal_patch_size=TEMPORAL_PATCH_SIZE, merge_size=MERGE_SIZE,
        image_mean=_MEAN, image_std=_STD, fps=VIDEO_FPS, min_frames=2, max_frames=64,
        do_sample_frames=False, cap_pixels_per_frame=False,
    )
    return tf.Qwen3VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=tokenizer.chat_template,
    )


def build(out_dir: Path, *, seed: int = 0) -> Path:
    """Build the tiny Qwen3.5 into ``out_dir`` (replaced if it exists); returns its path."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from madakv_eval.tiny_models import SPECIAL_TOKENS, _random_state_dict

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _tokenizer()
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        config = _config(len(tokenizer), ids)
        config.dtype = FAMILY.dtype
        sd = _random_state_dict(tf.Qwen3_5ForConditionalGeneration, config, FAMILY.dtype, seed)
        with torch.no_grad():
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        (tmp / "generation_config.json").write_text(json.dumps({
            "eos_token_id": [ids[IM_END], ids[ENDOFTEXT]],
            "pad_token_id": ids[ENDOFTEXT],
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


def _video_item(seed: int):
    """``make_video`` frames with the metadata vLLM's Qwen3-VL processor needs for timestamps."""
    from madakv_eval.prompts import make_media

    frames = make_media("video", seed)
    n = int(frames.shape[0])
    return frames, {
        "fps": VIDEO_FPS,
        "duration": n / VIDEO_FPS,
        "total_num_frames": n,
        "frames_indices": list(range(n)),
        "video_backend": "opencv",
        "do_sample_frames": False,
    }


def prompt(parts: list) -> dict:
    """A user turn in ChatML; images and videos as Qwen's vision placeholders."""
    from madakv_eval.prompts import make_media

    text, media = "", {"image": [], "video": []}
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        modality, seed = part
        if modality == "image":
            text += f"{VISION_START}{IMAGE_PAD}{VISION_END}"
            media["image"].append(make_media("image", seed))
        elif modality == "video":
            text += f"{VISION_START}{VIDEO_PAD}{VISION_END}"
            media["video"].append(_video_item(seed))
        else:
            raise ValueError(f"qwen3_5 takes images and videos, not {modality!r}")
    out = {"prompt": f"{IM_START}user\n{text}{IM_END}\n{IM_START}assistant\n"}
    if any(media.values()):
        out["multi_modal_data"] = {m: items for m, items in media.items() if items}
    return out


def embed_token_ids(tokenizer) -> dict[str, int]:
    return {"image": tokenizer.convert_tokens_to_ids(IMAGE_PAD),
            "video": tokenizer.convert_tokens_to_ids(VIDEO_PAD)}
