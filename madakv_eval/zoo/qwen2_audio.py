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

from pathlib import Path

from madakv_eval.zoo import TinyFamily
from madakv_eval.zoo.common import (
    CHATML_TOKENS,
    DEFAULT_SYSTEM,
    ENDOFTEXT,
    IM_END,
    TINY_RECORD,
    audio_data_url,  # noqa: F401 (this family's WAV encoding for the OpenAI API)
    build_model_dir,
    chatml_generation,
    chatml_prompt,
    chatml_template,
    embed_ids,
    make_tokenizer,
    qwen2_text_config,
    rename_prefix,
    wav_base64,  # noqa: F401 (likewise, for an input_audio part)
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

AUDIO_TOKEN = "<|AUDIO|>"
AUDIO_BOS = "<|audio_bos|>"
AUDIO_EOS = "<|audio_eos|>"
AUDIO_PROMPT = AUDIO_BOS + AUDIO_TOKEN + AUDIO_EOS
# transformers 5 nests everything under model.*; vLLM 0.32's Qwen2-Audio loads the layout the
# published checkpoints use (audio_tower.*, multi_modal_projector.*, language_model.*).
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


def _tokenizer():
    template = chatml_template({"audio": AUDIO_PROMPT}, default_system=DEFAULT_SYSTEM)
    return make_tokenizer([*CHATML_TOKENS, AUDIO_TOKEN, AUDIO_BOS, AUDIO_EOS], bos=None, eos=IM_END,
                          pad=ENDOFTEXT, chat_template=template)


def embed_token_ids(tokenizer) -> dict[str, int]:
    return embed_ids(tokenizer, {"audio": AUDIO_TOKEN})


def prompt(parts: list) -> dict:
    return chatml_prompt(parts, {"audio": AUDIO_PROMPT})


def _to_checkpoint(state: dict) -> dict:
    for old, new in _VLLM_PREFIXES:
        state = rename_prefix(state, old, new)
    return state


def build(out_dir: Path, *, seed: int = 0) -> Path:
    import transformers as tf

    tokenizer = _tokenizer()
    text = tf.Qwen2Config(**qwen2_text_config(tokenizer))
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
                                 audio_token_index=tokenizer.convert_tokens_to_ids(AUDIO_TOKEN))

    feature_extractor = tf.WhisperFeatureExtractor(
        feature_size=MEL_BINS, sampling_rate=SAMPLING_RATE, hop_length=HOP_LENGTH,
        chunk_length=CHUNK_SECONDS, n_fft=400, return_attention_mask=True,
    )
    processor = tf.Qwen2AudioProcessor(
        feature_extractor=feature_extractor, tokenizer=tokenizer,
        chat_template=tokenizer.chat_template,
        audio_token=AUDIO_TOKEN, audio_bos_token=AUDIO_BOS, audio_eos_token=AUDIO_EOS,
    )
    return build_model_dir(
        FAMILY, out_dir, seed=seed, model_cls=tf.Qwen2AudioForConditionalGeneration,
        config=config, tokenizer=tokenizer, processor=processor,
        generation=chatml_generation(tokenizer), to_checkpoint=_to_checkpoint, record=TINY_RECORD,
    )
