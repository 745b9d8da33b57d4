"""What the zoo's family modules share: the build scaffolding, the tokenizer builder, ChatML and
prompt rendering, checkpoint key renames and the Qwen-VL pieces four families have in common.

A family module keeps what is its own (config, processor, placeholders, quirks) and calls these:

* :func:`make_tokenizer`: the shared tiny BPE tokenizer (``tiny_models.train_tokenizer_json``)
  plus the family's special tokens;
* :func:`render_prompt` / :func:`chatml_prompt`: a vLLM prompt from ``(text, media)`` parts;
* :func:`build_model_dir`: seeded random weights for the family's config, written with its
  tokenizer, processor and generation config as one model directory, atomically.

Every build is deterministic: the same arguments give byte-identical files.
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from madakv_eval.prompts import make_media
from madakv_eval.tiny_models import (
    _IMAGE_PART_TYPES,
    _make_tokenizer,
    _random_state_dict,
    train_tokenizer_json,
)
from madakv_eval.zoo import TinyFamily

#: The tiny decoder most families use: 2 layers, 4 query / 2 KV heads of head_dim 64 (vLLM's CPU
#: attention wants head sizes in multiples of 32), hidden 256 (vLLM's Qwen2 derives head_dim as
#: hidden // heads, so hidden is exactly heads * head_dim).
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
HIDDEN = HEADS * HEAD_DIM
MAX_POSITIONS = 32768

#: The tiny vision tower (SigLIP, Idefics3, Pixtral configs name their fields alike).
VISION_TOWER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2)

ENDOFTEXT, IM_START, IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
CHATML_TOKENS = (ENDOFTEXT, IM_START, IM_END)
DEFAULT_SYSTEM = "You are a helpful assistant."
#: The default system turn ChatML templates add, spelt out so offline prompts tokenise as served ones.
SYSTEM_TURN = f"{IM_START}system\n{DEFAULT_SYSTEM}{IM_END}\n"

#: OpenAI-style content part types per modality, as a Jinja list literal.
IMAGE_PART_TYPES = _IMAGE_PART_TYPES
MEDIA_PART_TYPES = {
    "image": IMAGE_PART_TYPES,
    "video": "['video', 'video_url']",
    "audio": "['audio', 'audio_url', 'input_audio', 'audio_embeds']",
}

#: Build record file names: the Qwen-VL and InternVL builds write the zoo's, the others
#: ``tiny_models``' name (kept as they were, so that every build's files stay the same).
ZOO_RECORD = "madakv_zoo_model.json"
TINY_RECORD = "madakv_tiny_model.json"


# --------------------------------------------------------------------------- tokenizer
def make_tokenizer(
    special: Sequence[str],
    *,
    bos: str | None,
    eos: str,
    pad: str | None,
    unk: str | None = None,
    add_bos: bool = False,
    named: Mapping[str, str] | None = None,
    plain: Sequence[str] = (),
    chat_template: str | None = None,
):
    """The shared tiny BPE tokenizer with ``special`` appended as special tokens (those it already
    holds keep their ids) and ``plain`` as ordinary ones.

    ``named`` are special tokens a processor reads off the tokenizer by attribute name (e.g.
    ``{"image_token": "<image_soft_token>"}``); the other specials besides bos/eos/pad/unk are
    ``additional_special_tokens``. ``add_bos``: encoding prepends ``bos``."""
    from tokenizers import AddedToken, Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    named = dict(named or {})
    tok = Tokenizer.from_str(train_tokenizer_json())
    specials = list(dict.fromkeys(special))
    missing = [t for t in specials if tok.token_to_id(t) is None]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
    if plain:
        tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in plain])
    if add_bos:
        assert bos is not None
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    reserved = {bos, eos, pad, unk, *named.values()}
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token=eos,
        pad_token=pad,
        unk_token=unk,
        **named,
        additional_special_tokens=[t for t in specials if t not in reserved],
        model_max_length=MAX_POSITIONS,
        clean_up_tokenization_spaces=False,
    )
    if chat_template is not None:
        hf.chat_template = chat_template
    return hf


def token_ids(tokenizer, tokens: Iterable[str]) -> dict[str, int]:
    """``{token: id}`` for each of ``tokens``."""
    return {t: tokenizer.convert_tokens_to_ids(t) for t in tokens}


def embed_ids(tokenizer, tokens: Mapping[str, str]) -> dict[str, int]:
    """``{modality: id}`` of each modality's placeholder token (``embed_token_ids``' answer)."""
    return {m: tokenizer.convert_tokens_to_ids(t) for m, t in tokens.items()}


# --------------------------------------------------------------------------- chat templates
def chatml_template(media: Mapping[str, str], *, default_system: str | None = None) -> str:
    """ChatML chat template over OpenAI-style messages; a media part of modality ``m`` renders as
    ``media[m]`` (content lists are iterated, so vLLM detects the "openai" content format)."""
    branches = "".join(
        f"{{%- elif part['type'] in {MEDIA_PART_TYPES[m]} -%}}{{{{- {json.dumps(s)} -}}}}\n"
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


# --------------------------------------------------------------------------- prompts
MediaItems = Mapping[str, Callable[[int], Any]]


def render_parts(parts: list, placeholders: Mapping[str, str],
                 media_items: MediaItems | None = None) -> tuple[str, dict[str, list]]:
    """Text with each media item replaced by ``placeholders[modality]``, and the media items as
    vLLM's ``multi_modal_data``: a list per modality in prompt order, the modalities in
    ``placeholders``' order. An item is ``media_items[modality](seed)`` where given, else
    ``make_media(modality, seed)``."""
    media_items = media_items or {}
    text, media = "", {}
    for part in parts:
        if isinstance(part, str):
            text += part
            continue
        modality, seed = part
        if modality not in placeholders:
            raise ValueError(f"this model takes {sorted(placeholders)}, not {modality!r}")
        text += placeholders[modality]
        make = media_items.get(modality)
        media.setdefault(modality, []).append(make(seed) if make else make_media(modality, seed))
    return text, {m: media[m] for m in placeholders if m in media}


def render_prompt(parts: list, placeholders: Mapping[str, str], prefix: str, suffix: str,
                  media_items: MediaItems | None = None) -> dict:
    """A vLLM prompt: ``prefix`` + the rendered parts + ``suffix``, with its media."""
    text, media = render_parts(parts, placeholders, media_items)
    prompt: dict[str, Any] = {"prompt": prefix + text + suffix}
    if media:
        prompt["multi_modal_data"] = media
    return prompt


def chatml_prompt(parts: list, placeholders: Mapping[str, str], *, system: bool = False,
                  media_items: MediaItems | None = None) -> dict:
    """A ChatML user turn and the assistant's opening; ``system``: the default system turn first
    (as the family's chat template adds it)."""
    prefix = (SYSTEM_TURN if system else "") + f"{IM_START}user\n"
    return render_prompt(parts, placeholders, prefix, f"{IM_END}\n{IM_START}assistant\n", media_items)


#: Frame rate stated for ``make_video`` clips (offline metadata and the mp4 container alike).
VIDEO_FPS = 2.0


def video_item(seed: int):
    """``make_video(seed)`` with the metadata vLLM's Qwen-VL parsers require: they refuse a bare
    frame array ("Video metadata is required"), since the processor derives the temporal M-RoPE
    stride and timestamps from the frame rate."""
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


def video_data_url(seed: int) -> str:
    """``make_video(seed)`` as an mp4 (MPEG-4 part 2) data URL for an OpenAI ``video_url`` part;
    vLLM decodes it with OpenCV to the same frame count (lossily)."""
    import cv2

    frames = make_media("video", seed)
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


def audio_data_url(seed: int) -> str:
    """``make_audio(seed)`` as a ``data:audio/wav;base64,...`` URL (16-bit mono PCM WAV)."""
    return "data:audio/wav;base64," + wav_base64(seed)


def wav_base64(seed: int) -> str:
    """``make_audio(seed)`` as base64 WAV bytes (an OpenAI ``input_audio`` part's ``data``)."""
    import wave

    import numpy as np

    samples, rate = make_media("audio", seed)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return base64.b64encode(buf.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- configs
def _ids(tokenizer, tokens: str | Sequence[str] | None):
    """A token's id, a list of tokens' ids, or None."""
    if tokens is None:
        return None
    if isinstance(tokens, str):
        return tokenizer.convert_tokens_to_ids(tokens)
    return [tokenizer.convert_tokens_to_ids(t) for t in tokens]


def text_config(tokenizer, *, bos: str | None, eos: str | Sequence[str], pad: str,
                **extra) -> dict:
    """The tiny decoder's config arguments: its geometry (``LAYERS``, ``HEADS``, ``KV_HEADS``,
    ``HIDDEN``, ``MAX_POSITIONS``), untied embeddings, the vocabulary size and bos/eos/pad ids of
    ``tokenizer``; ``extra`` adds or replaces any."""
    return {
        "vocab_size": len(tokenizer),
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": LAYERS,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "tie_word_embeddings": False,
        "bos_token_id": _ids(tokenizer, bos),
        "eos_token_id": _ids(tokenizer, eos),
        "pad_token_id": _ids(tokenizer, pad),
        **extra,
    }


def qwen2_text_config(tokenizer, **extra) -> dict:
    """The tiny Qwen2 decoder (ChatML ids, RoPE theta 1e6, no sliding window); ``extra`` adds or
    replaces any argument."""
    qwen2 = dict(
        rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
        use_sliding_window=False,
        sliding_window=None,
        max_window_layers=LAYERS,
    )
    return text_config(tokenizer, bos=ENDOFTEXT, eos=IM_END, pad=ENDOFTEXT, **{**qwen2, **extra})


def generation_config(tokenizer, *, bos: str | None, eos: str | Sequence[str], pad: str) -> dict:
    """``generation_config.json``'s token ids (no bos entry for ``bos=None``); ``eos`` may list
    several stop tokens."""
    gen = {} if bos is None else {"bos_token_id": _ids(tokenizer, bos)}
    return {**gen, "eos_token_id": _ids(tokenizer, eos), "pad_token_id": _ids(tokenizer, pad)}


def chatml_generation(tokenizer) -> dict:
    """A ChatML model's generation config: stops at ``<|im_end|>`` or ``<|endoftext|>``."""
    return generation_config(tokenizer, bos=ENDOFTEXT, eos=[IM_END, ENDOFTEXT], pad=ENDOFTEXT)


# --------------------------------------------------------------------------- weights
def random_weights(family: TinyFamily, model_cls, config, seed: int) -> dict[str, Any]:
    """Seeded random weights of ``model_cls(config)`` in the family's dtype (``tiny_models``'
    per-tensor seeding). ``config`` is stamped with the family's architecture and dtype first, as
    the saved config must say them."""
    config.architectures = [family.architecture]
    config.dtype = family.dtype
    return _random_state_dict(model_cls, config, family.dtype, seed)


def rename_prefix(state_dict: Mapping[str, Any], old: str, new: str) -> dict[str, Any]:
    """Keys under ``old`` moved under ``new`` (keys already under ``new`` are kept)."""
    return {
        (new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v
        for k, v in state_dict.items()
    }


def nest_vision_model(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """transformers 5 saves a SigLIP tower flat (``model.vision_tower.embeddings...``); vLLM 0.32
    wraps a ``SiglipVisionModel`` and expects ``model.vision_tower.vision_model.*``."""
    return rename_prefix(state_dict, "model.vision_tower.", "model.vision_tower.vision_model.")


# --------------------------------------------------------------------------- writing
def write_model_dir(out_dir: str | os.PathLike[str], *, config, state_dict: Mapping[str, Any],
                    tokenizer, processor=None, generation: Mapping[str, Any] | None = None,
                    record: str | None = None, record_data: Mapping[str, Any] | None = None) -> Path:
    """Write a Hugging Face model directory atomically (built beside ``out_dir``, then renamed
    over it): one safetensors file, config, generation config, tokenizer, processor, and
    ``record_data`` as JSON in the file named ``record``."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        save_file(dict(state_dict), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        if generation is not None:
            _write_json(tmp / "generation_config.json", generation)
        tokenizer.save_pretrained(tmp)
        if processor is not None:
            processor.save_pretrained(tmp)
        if record is not None:
            _write_json(tmp / record, record_data or {})
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_model_dir(family: TinyFamily, out_dir: str | os.PathLike[str], *, seed: int, model_cls,
                    config, tokenizer, processor, generation: Mapping[str, Any],
                    to_checkpoint: Callable[[dict], dict] | None = None,
                    record: str | None = None, record_extra: Mapping[str, Any] | None = None) -> Path:
    """Build ``family``: random weights for ``config`` (:func:`random_weights`), turned into the
    layout the family's checkpoints (and so vLLM's loader) use by ``to_checkpoint`` where
    transformers' in-memory one differs, written with the rest by :func:`write_model_dir`.

    ``record``: also write a build record of that name (family, seed, vocab_size,
    num_parameters and ``record_extra``)."""
    state = random_weights(family, model_cls, config, seed)
    if to_checkpoint is not None:
        state = to_checkpoint(state)
    record_data = None
    if record is not None:
        record_data = {"family": family.name, "seed": seed, "vocab_size": len(tokenizer),
                       "num_parameters": int(sum(t.numel() for t in state.values())),
                       **(record_extra or {})}
    return write_model_dir(out_dir, config=config, state_dict=state, tokenizer=tokenizer,
                           processor=processor, generation=generation, record=record,
                           record_data=record_data)


def _write_json(path: Path, obj: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(dict(obj), indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- Qwen-VL pieces
#: Qwen's vision placeholders (the processor expands each pad to the item's tokens).
QWEN_PLACEHOLDERS = {"image": "<|vision_start|><|image_pad|><|vision_end|>",
                     "video": "<|vision_start|><|video_pad|><|vision_end|>"}
QWEN_EMBED_TOKENS = {"image": "<|image_pad|>", "video": "<|video_pad|>"}


def qwen_vision_token_ids(tokenizer) -> dict[str, int]:
    """A Qwen-VL config's vision token id arguments."""
    return {"image_token_id": tokenizer.convert_tokens_to_ids("<|image_pad|>"),
            "video_token_id": tokenizer.convert_tokens_to_ids("<|video_pad|>"),
            "vision_start_token_id": tokenizer.convert_tokens_to_ids("<|vision_start|>"),
            "vision_end_token_id": tokenizer.convert_tokens_to_ids("<|vision_end|>")}


def qwen_tokenizer():
    """``tiny_models``' Qwen2-VL tokenizer: its vocabulary already holds Qwen's special tokens,
    and its chat template is ChatML with Qwen's vision placeholders."""
    return _make_tokenizer("qwen2vl", None)


def qwen_vl_prompt(parts: list, *, system: bool = True) -> dict:
    """A ChatML user turn with Qwen's vision placeholders; videos carry their metadata."""
    return chatml_prompt(parts, QWEN_PLACEHOLDERS, system=system, media_items={"video": video_item})


def build_qwen_vl(family: TinyFamily, configs, processor, out_dir: str | os.PathLike[str],
                  seed: int, record_extra: Mapping[str, Any],
                  to_checkpoint: Callable[[dict], dict] | None = None) -> Path:
    """A Qwen-VL style model (``qwen_tokenizer``, ChatML generation config, the zoo record).

    ``configs(tokenizer) -> (hf_config, hf_model_class)``; ``processor(tokenizer)``."""
    tokenizer = qwen_tokenizer()
    config, model_cls = configs(tokenizer)
    return build_model_dir(
        family, out_dir, seed=seed, model_cls=model_cls, config=config, tokenizer=tokenizer,
        processor=processor(tokenizer), generation=chatml_generation(tokenizer),
        to_checkpoint=to_checkpoint, record=ZOO_RECORD, record_extra=record_extra,
    )
