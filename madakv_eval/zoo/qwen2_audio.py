"""Tiny Qwen2-Audio: Whisper-style audio encoder + linear projector + Qwen2 decoder.

vLLM architecture ``Qwen2AudioForConditionalGeneration``; takes audio.

Audio path: the Whisper feature extractor turns 16 kHz audio into 80-bin log-mel frames (hop 160,
100 frames a second) padded to 30 s (3000 frames; longer clips are truncated); the encoder's
conv stem halves them, its average pool halves them again, so one second of audio gives 25
``<|AUDIO|>`` tokens (``make_audio``'s 1 s clip: 25; at most 750). In the prompt an item is
``<|audio_bos|><|AUDIO|><|audio_eos|>``; vLLM expands the single ``<|AUDIO|>`` to one token per
embedding, the bos/eos markers stay text.

The 30 s chunk cannot be shortened: transformers' ``Qwen2AudioEncoder`` (which vLLM runs as is)
requires exactly ``max_source_positions * 2`` mel frames, and vLLM 0.32's input schema fixes the
frame count at 3000, so ``max_source_positions`` stays Whisper's 1500. The encoder therefore runs
over 1500 positions per clip whatever its length (cheap at d_model 64).

Decoder: Qwen2, 2 layers, 4 query heads, 2 KV heads, head_dim 64 (hidden 256), full attention,
float32.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from madakv_eval.prompts import make_audio
from madakv_eval.tiny_models import _random_state_dict
from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.llava_onevision import (
    chatml_template,
    make_tokenizer,
    rename_prefix,
    render_parts,
    vllm_prompt,
    write_model_dir,
)

FAMILY = TinyFamily(
    name="qwen2_audio",
    architecture="Qwen2AudioForConditionalGeneration",
    attention=("full",),
    modalities=("audio",),
    dtype="float32",
)

SAMPLING_RATE = 16000
HOP_LENGTH = 160
CHUNK_SECONDS = 30  # fixed: vLLM's Qwen2-Audio input schema wants 3000 mel frames
MEL_BINS = 80
LAYERS = 2
HEADS = 4
KV_HEADS = 2
HEAD_DIM = 64
HIDDEN = HEADS * HEAD_DIM
MAX_POS = 32768

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_PROMPT = AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS
_CHATML = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
_VLLM_PREFIXES = (
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
)


def audio_tokens(samples: int, rate: int = SAMPLING_RATE) -> int:
    """``<|AUDIO|>`` tokens one clip of ``samples`` samples at ``rate`` Hz gets (after resampling
    to 16 kHz and truncation to ``CHUNK_SECONDS``)."""
    frames = min(samples * SAMPLING_RATE // rate, CHUNK_SECONDS * SAMPLING_RATE) // HOP_LENGTH
    return (((frames - 1) // 2 + 1) - 2) // 2 + 1


def audio_data_url(seed: int) -> str:
    """``make_audio(seed)`` as a ``data:audio/wav;base64,...`` URL (16-bit mono PCM WAV)."""
    return "data:audio/wav;base64," + wav_base64(seed)


def wav_base64(seed: int) -> str:
    """``make_audio(seed)`` as base64 WAV bytes (an OpenAI ``input_audio`` part's ``data``)."""
    import wave

    import numpy as np

    samples, rate = make_audio(seed)
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).astype("<i2").tobytes()
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(pcm)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _tokenizer():
    template = chatml_template({"audio": AUDIO_PROMPT},
                               default_system="You are a helpful assistant.")
    return make_tokenizer([*_CHATML, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS], bos=None, eos="<|im_end|>",
                          pad="<|endoftext|>", chat_template=template)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return {"audio": tokenizer.convert_tokens_to_ids(AUDIO_TOKEN)}


def prompt(parts: list) -> dict:
    text, media = render_parts(parts, {"audio": AUDIO_PROMPT})
    return vllm_prompt("<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n", media)


def build(out_dir: Path, *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (*_CHATML, AUDIO_TOKEN)}
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
    mel_frames = CHUNK_SECONDS * SAMPLING_RATE // HOP_LENGTH
    audio = tf.Qwen2AudioEncoderConfig(
        num_mel_bins=MEL_BINS,
        encoder_layers=2,
        encoder_attention_heads=2,
        encoder_ffn_dim=128,
        d_model=64,
        max_source_positions=mel_frames // 2,  # the conv stem's stride 2
    )
    config = tf.Qwen2AudioConfig(audio_config=audio, text_config=text,
                                 audio_token_index=ids[AUDIO_TOKEN])
    config.architectures = [FAMILY.architecture]
    config.dtype = FAMILY.dtype
    state = _random_state_dict(tf.Qwen2AudioForConditionalGeneration, config, FAMILY.dtype, seed)
    # transformers 5 nests everything under model.*; vLLM 0.32's Qwen2-Audio loads the layout
    # the published checkpoints use (audio_tower.*, multi_modal_projector.*, language_model.*).
    for old, new in _VLLM_PREFIXES:
        state = rename_prefix(state, old, new)

    feature_extractor = tf.WhisperFeatureExtractor(
        feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
        chunk_length=CHUNK_SECONDS, n_fft=400, return_attention_mask=True,
    )
    processor = tf.Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        audio_token=AUDIO_TOKEN, audio_bos_token=AUDIO_BOS, audio_eos_token=AUDIO_EOS,
    )
    return write_model_dir(
        out_dir, config=config, state_dict=state, tokenizer=tokenizer, processor=processor,
        generation={"bos_token_id": ids["<|endoftext|>"],
                    "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
                    "pad_token_id": ids["<|endoftext|>"]},
        info={"family": FAMILY.name, "seed": seed, "vocab_size": len(tokenizer),
              "num_parameters": int(sum(t.numel() for t in state.values()))},
    )
