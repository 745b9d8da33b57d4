"""Tiny, deterministic, randomly initialised models that vLLM 0.32 loads from a local directory.

No model can be downloaded on the machines this project runs on, so tests and benchmarks build
their own models: seeded random weights saved as safetensors in Hugging Face layout, a small
byte-level BPE tokenizer trained from text shipped in the repository
(``scripts/assets/tiny_tokenizer_corpus.txt``), a chat template that renders OpenAI-style
multimodal messages (image parts become the model's image placeholder) and the
processor/preprocessor configs.

Kinds (see :data:`KINDS`):

* ``llava``   -- LLaVA-1.5 style: tiny CLIP vision tower + 2-layer MLP projector + tiny Llama.
  The image is resized/cropped to ``image_size`` (64) and cut into ``patch_size`` (8) patches:
  (64 / 8) ** 2 = 64 ``<image>`` placeholder tokens per image. As in LLaVA-1.5, features come
  from the second-to-last vision layer (``vision_feature_layer=-2``, CLS dropped).
* ``qwen2vl`` -- Qwen2-VL style: M-RoPE (``mrope_section``), GQA, Qwen2-VL vision tower with
  2x2 patch merging. Each placeholder token covers (patch_size * 2) ** 2 = 28 x 28 pixels;
  images are resized to between ``min_image_tokens`` (16) and ``max_image_tokens`` (64) tokens
  (a 224 x 224 image gives 64, a 112 x 112 image 16).
* ``llama``   -- text-only Llama.
* ``qwen2``   -- text-only Qwen2.

Default text geometry: 2 layers, 4 query heads, 2 KV heads, head_dim 32 (vLLM's CPU attention
kernel supports head sizes 32, 64, 80 and more), hidden 128, max_position_embeddings 32768,
float32 weights.

Usage::

    from madakv_eval.tiny_models import build_model
    path = build_model("llava", "models/tiny-llava", seed=0, layers=4)

Building a model takes well under a second (the tokenizer is trained once per process).

vLLM quirks handled here:

* transformers 5 saves a LLaVA vision tower as ``model.vision_tower.*``; vLLM 0.32 expects
  ``vision_tower.vision_model.*`` (a ``CLIPVisionModel``): keys are renamed to
  ``model.vision_tower.vision_model.*``.
* vLLM's Qwen2 derives head_dim as hidden_size // num_attention_heads, so for the Qwen kinds
  ``hidden`` must equal ``heads * head_dim``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields, replace
from functools import lru_cache
from pathlib import Path
from typing import Any

__all__ = [
    "KINDS",
    "Geometry",
    "build_model",
    "build_all",
    "corpus_path",
    "default_geometry",
    "image_token_count",
    "load_info",
    "train_tokenizer_json",
]

KINDS: tuple[str, ...] = ("llava", "qwen2vl", "llama", "qwen2")

#: Special tokens of the shared tokenizer, in id order (ids 0..len-1). One vocabulary serves all
#: kinds, so token ids are the same in every tiny model; only bos/eos/pad and the template differ.
SPECIAL_TOKENS: tuple[str, ...] = (
    "<unk>",
    "<s>",
    "</s>",
    "<pad>",
    "<image>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

#: Target vocabulary size of the BPE trainer (the real size is what the corpus supports; the
#: model's vocab_size is set to exactly the tokenizer's size).
TOKENIZER_VOCAB_TARGET = 1024

_CORPUS_ENV = "MADAKV_TINY_CORPUS"
_CORPUS_REL = Path("scripts") / "assets" / "tiny_tokenizer_corpus.txt"

_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


# --------------------------------------------------------------------------- geometry
@dataclass(frozen=True)
class Geometry:
    """Model shape. Every field can be overridden through ``build_model(**overrides)``."""

    layers: int = 2
    hidden: int | None = None  # default: heads * head_dim
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 32
    intermediate: int | None = None  # default: 2 * hidden
    max_pos: int = 32768
    rope_theta: float = 10000.0
    dtype: str = "bfloat16"  # what vLLM runs a float32 checkpoint in on CPU anyway
    # vision tower (VLM kinds)
    vision_layers: int = 2
    vision_hidden: int = 64
    vision_heads: int = 2
    # llava: square input side in pixels; qwen2vl: ignored
    image_size: int = 64
    # llava default 8; qwen2vl default 14 (one placeholder token = (2 * patch_size) ** 2 pixels)
    patch_size: int | None = None
    # qwen2vl: placeholder tokens per image after 2x2 merging, lower / upper bound
    min_image_tokens: int = 16
    max_image_tokens: int = 64

    @property
    def hidden_size(self) -> int:
        return self.hidden if self.hidden is not None else self.heads * self.head_dim

    @property
    def intermediate_size(self) -> int:
        return self.intermediate if self.intermediate is not None else 2 * self.hidden_size


def default_geometry(kind: str) -> Geometry:
    _check_kind(kind)
    if kind == "qwen2vl":
        return Geometry(patch_size=14, rope_theta=1_000_000.0)
    if kind == "qwen2":
        return Geometry(rope_theta=1_000_000.0)
    if kind == "llava":
        return Geometry(patch_size=8)
    return Geometry()


def _resolve_geometry(kind: str, overrides: Mapping[str, Any]) -> Geometry:
    names = {f.name for f in fields(Geometry)}
    unknown = sorted(set(overrides) - names)
    if unknown:
        raise TypeError(f"unknown geometry override(s) {unknown}; known: {sorted(names)}")
    g = replace(default_geometry(kind), **{k: v for k, v in overrides.items() if v is not None})
    if g.heads % g.kv_heads:
        raise ValueError(f"heads ({g.heads}) must be a multiple of kv_heads ({g.kv_heads})")
    if min(g.layers, g.heads, g.kv_heads, g.head_dim, g.max_pos) <= 0:
        raise ValueError(f"geometry values must be positive: {g}")
    if kind in ("qwen2", "qwen2vl") and g.hidden_size != g.heads * g.head_dim:
        raise ValueError(
            f"{kind}: vLLM derives head_dim = hidden // heads, so hidden ({g.hidden_size}) must "
            f"equal heads * head_dim ({g.heads * g.head_dim})"
        )
    if g.dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be float32, bfloat16 or float16, not {g.dtype!r}")
    if kind in ("llava", "qwen2vl"):
        if g.vision_hidden % g.vision_heads:
            raise ValueError("vision_hidden must be a multiple of vision_heads")
        assert g.patch_size is not None
        if kind == "llava" and g.image_size % g.patch_size:
            raise ValueError(f"image_size ({g.image_size}) must be a multiple of patch_size")
        if kind == "qwen2vl":
            if not 1 <= g.min_image_tokens <= g.max_image_tokens:
                raise ValueError("need 1 <= min_image_tokens <= max_image_tokens")
            if g.head_dim < 6:
                raise ValueError("qwen2vl needs head_dim >= 6 for M-RoPE")
    return g


def image_token_count(kind: str, image_width: int | None = None, image_height: int | None = None,
                      **geometry_overrides: Any) -> int:
    """Number of image placeholder tokens one image gets in the prompt.

    LLaVA: ``(image_size / patch_size) ** 2``, whatever the input size. Qwen2-VL: depends on
    the image size (Qwen2-VL's ``smart_resize`` between min and max image tokens).
    """
    g = _resolve_geometry(kind, geometry_overrides)
    if kind == "llava":
        return (g.image_size // g.patch_size) ** 2
    if kind == "qwen2vl":
        if image_width is None or image_height is None:
            raise ValueError("qwen2vl needs image_width and image_height")
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

        factor = 2 * g.patch_size
        h, w = smart_resize(image_height, image_width, factor=factor,
                            min_pixels=g.min_image_tokens * factor * factor,
                            max_pixels=g.max_image_tokens * factor * factor)
        return (h // factor) * (w // factor)
    raise ValueError(f"{kind} is a text-only model")


def load_info(model_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """What :func:`build_model` recorded in ``madakv_tiny_model.json`` (kind, seed, geometry,
    vocab_size, num_parameters, image_tokens_per_image, special_token_ids).

    ``image_token_count(info["kind"], w, h, **info["geometry"])`` gives a built VLM's count."""
    return json.loads((Path(model_dir) / "madakv_tiny_model.json").read_text())


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown model kind {kind!r}; expected one of {KINDS}")


# --------------------------------------------------------------------------- tokenizer
def corpus_path() -> Path:
    """The shipped tokenizer-training text (override with $MADAKV_TINY_CORPUS)."""
    env = os.environ.get(_CORPUS_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    for base in (here.parent, Path.cwd()):
        p = base / _CORPUS_REL
        if p.is_file():
            return p
    raise FileNotFoundError(
        f"tokenizer corpus {_CORPUS_REL} not found next to the madakv_vllm package (an "
        f"editable install of the repo is expected) nor in the current directory; set ${_CORPUS_ENV}"
    )


@lru_cache(maxsize=4)
def _train_tokenizer_cached(corpus_text: str) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_TARGET,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus_text.splitlines(), trainer=trainer)
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    return tok.to_str()


def train_tokenizer_json(corpus: str | os.PathLike[str] | None = None) -> str:
    """Train the shared byte-level BPE tokenizer; returns its tokenizer.json text (cached)."""
    path = Path(corpus) if corpus is not None else corpus_path()
    # Normalise line endings so a checkout with CRLF trains the same vocabulary.
    text = path.read_bytes().decode("utf-8").replace("\r\n", "\n")
    return _train_tokenizer_cached(text)


def _family(kind: str) -> str:
    return "llama" if kind in ("llava", "llama") else "qwen"


_IMAGE_PART_TYPES = "['image', 'image_url', 'input_image', 'image_pil', 'image_embeds']"

# Both templates iterate over message['content'] when it is a list, so vLLM detects the
# "openai" content format and passes image parts through; IMAGE / VIDEO are substituted with
# the model's placeholder string (or '' for text-only models).
_LLAMA_TEMPLATE = """{{- bos_token -}}
{%- for message in messages -%}
    {%- if message['role'] == 'system' -%}{{- 'SYSTEM: ' -}}
    {%- elif message['role'] == 'user' -%}{{- 'USER: ' -}}
    {%- elif message['role'] == 'assistant' -%}{{- 'ASSISTANT: ' -}}
    {%- else -%}{{- message['role'] | upper + ': ' -}}
    {%- endif -%}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] in IMAGE_TYPES -%}{{- IMAGE -}}
            {%- elif part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {%- if message['role'] == 'assistant' -%}{{- eos_token -}}{%- endif -%}
    {{- '\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}
"""

_CHATML_TEMPLATE = """{%- for message in messages -%}
    {%- if loop.first and message['role'] != 'system' -%}
        {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' -}}
    {%- endif -%}
    {{- '<|im_start|>' + message['role'] + '\\n' -}}
    {%- if message['content'] is string -%}
        {{- message['content'] -}}
    {%- else -%}
        {%- for part in message['content'] -%}
            {%- if part['type'] in IMAGE_TYPES -%}{{- IMAGE -}}
            {%- elif part['type'] in ['video', 'video_url'] -%}{{- VIDEO -}}
            {%- elif part['type'] in ['text', 'input_text'] -%}{{- part['text'] -}}
            {%- endif -%}
        {%- endfor -%}
    {%- endif -%}
    {{- '<|im_end|>\\n' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}
"""


def chat_template(kind: str) -> str:
    """Jinja chat template; image parts render as the model's image placeholder."""
    _check_kind(kind)
    if _family(kind) == "llama":
        image = "'<image>\\n'" if kind == "llava" else "''"
        return _LLAMA_TEMPLATE.replace("IMAGE_TYPES", _IMAGE_PART_TYPES).replace("IMAGE", image)
    image = "'<|vision_start|><|image_pad|><|vision_end|>'" if kind == "qwen2vl" else "''"
    video = "'<|vision_start|><|video_pad|><|vision_end|>'" if kind == "qwen2vl" else "''"
    return (_CHATML_TEMPLATE.replace("IMAGE_TYPES", _IMAGE_PART_TYPES)
            .replace("IMAGE", image).replace("VIDEO", video))


def _special(kind: str) -> dict[str, str | None]:
    if _family(kind) == "llama":
        return {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
    return {"bos": None, "eos": "<|im_end|>", "pad": "<|endoftext|>", "unk": None}


def _make_tokenizer(kind: str, corpus: str | os.PathLike[str] | None):
    from tokenizers import Tokenizer, processors
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer.from_str(train_tokenizer_json(corpus))
    sp = _special(kind)
    if sp["bos"] is not None:  # Llama family: prepend <s> when add_special_tokens=True
        bos = sp["bos"]
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B",
            special_tokens=[(bos, tok.token_to_id(bos))],
        )
    extra = [t for t in SPECIAL_TOKENS if t not in sp.values()]
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=sp["bos"],
        eos_token=sp["eos"],
        pad_token=sp["pad"],
        unk_token=sp["unk"],
        additional_special_tokens=extra,
        model_max_length=32768,
        clean_up_tokenization_spaces=False,
    )
    hf.chat_template = chat_template(kind)
    return hf


# --------------------------------------------------------------------------- configs
def _hf_configs(kind: str, g: Geometry, vocab_size: int, ids: Mapping[str, int]):
    import transformers as tf

    text_common: dict[str, Any] = dict(
        vocab_size=vocab_size,
        hidden_size=g.hidden_size,
        intermediate_size=g.intermediate_size,
        num_hidden_layers=g.layers,
        num_attention_heads=g.heads,
        num_key_value_heads=g.kv_heads,
        max_position_embeddings=g.max_pos,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    if _family(kind) == "llama":
        text_common.update(
            head_dim=g.head_dim,
            bos_token_id=ids["<s>"],
            eos_token_id=ids["</s>"],
            pad_token_id=ids["<pad>"],
            rope_parameters={"rope_type": "default", "rope_theta": g.rope_theta},
        )
    else:
        text_common.update(
            bos_token_id=ids["<|endoftext|>"],
            eos_token_id=ids["<|im_end|>"],
            pad_token_id=ids["<|endoftext|>"],
            use_sliding_window=False,
            sliding_window=None,
            max_window_layers=g.layers,
        )

    if kind == "llama":
        cfg = tf.LlamaConfig(**text_common)
        cfg.architectures = ["LlamaForCausalLM"]
        return cfg, tf.LlamaForCausalLM
    if kind == "qwen2":
        cfg = tf.Qwen2Config(
            **text_common, rope_parameters={"rope_type": "default", "rope_theta": g.rope_theta}
        )
        cfg.architectures = ["Qwen2ForCausalLM"]
        return cfg, tf.Qwen2ForCausalLM
    if kind == "llava":
        vision = tf.CLIPVisionConfig(
            hidden_size=g.vision_hidden,
            intermediate_size=2 * g.vision_hidden,
            num_hidden_layers=g.vision_layers,
            num_attention_heads=g.vision_heads,
            image_size=g.image_size,
            patch_size=g.patch_size,
            projection_dim=g.vision_hidden,
            hidden_act="quick_gelu",
        )
        cfg = tf.LlavaConfig(
            vision_config=vision,
            text_config=tf.LlamaConfig(**text_common),
            image_token_index=ids["<image>"],
            image_seq_length=(g.image_size // g.patch_size) ** 2,
            vision_feature_layer=-2,
            vision_feature_select_strategy="default",
            projector_hidden_act="gelu",
            multimodal_projector_bias=True,
            tie_word_embeddings=False,
            pad_token_id=ids["<pad>"],
        )
        cfg.architectures = ["LlavaForConditionalGeneration"]
        return cfg, tf.LlavaForConditionalGeneration
    # qwen2vl: M-RoPE sections (temporal, height, width) over head_dim // 2 frequencies
    half = g.head_dim // 2
    hw = (half * 3 // 8)  # real Qwen2-VL: [16, 24, 24] of 64
    section = [half - 2 * hw, hw, hw]
    text = dict(text_common)
    text["rope_parameters"] = {
        "rope_type": "default", "rope_theta": g.rope_theta, "mrope_section": section,
    }
    vision = tf.Qwen2VLVisionConfig(
        depth=g.vision_layers,
        embed_dim=g.vision_hidden,
        hidden_size=g.hidden_size,
        num_heads=g.vision_heads,
        mlp_ratio=2,
        in_channels=3,
        patch_size=g.patch_size,
        spatial_merge_size=2,
        temporal_patch_size=2,
        hidden_act="quick_gelu",
    )
    cfg = tf.Qwen2VLConfig(
        text_config=text,
        vision_config=vision.to_dict(),
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
    )
    cfg.architectures = ["Qwen2VLForConditionalGeneration"]
    return cfg, tf.Qwen2VLForConditionalGeneration


def _processor(kind: str, g: Geometry, tokenizer):
    import transformers as tf

    if kind == "llava":
        image_processor = tf.CLIPImageProcessor(
            size={"shortest_edge": g.image_size},
            crop_size={"height": g.image_size, "width": g.image_size},
            do_resize=True,
            do_center_crop=True,
            do_rescale=True,
            do_normalize=True,
            do_convert_rgb=True,
            image_mean=_CLIP_MEAN,
            image_std=_CLIP_STD,
        )
        return tf.LlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=g.patch_size,
            vision_feature_select_strategy="default",
            num_additional_image_tokens=1,  # CLIP's CLS token, dropped by the "default" strategy
            image_token="<image>",
            chat_template=chat_template(kind),
        )
    if kind == "qwen2vl":
        factor = 2 * g.patch_size
        size = {"shortest_edge": g.min_image_tokens * factor * factor,
                "longest_edge": g.max_image_tokens * factor * factor}
        image_processor = tf.Qwen2VLImageProcessor(
            size=size, patch_size=g.patch_size, temporal_patch_size=2, merge_size=2,
            image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        )
        video_processor = tf.Qwen2VLVideoProcessor(
            size=size, patch_size=g.patch_size, temporal_patch_size=2, merge_size=2,
            image_mean=_CLIP_MEAN, image_std=_CLIP_STD,
        )
        return tf.Qwen2VLProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            video_processor=video_processor,
            chat_template=chat_template(kind),
        )
    return None


# --------------------------------------------------------------------------- weights
def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"madakv-tiny:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _is_norm_weight(name: str, ndim: int) -> bool:
    if ndim != 1 or not name.endswith(".weight"):
        return False
    leaf = name.rsplit(".", 2)[-2]
    return "norm" in leaf or leaf.startswith("ln") or "layrnorm" in leaf


def _random_state_dict(model_cls, config, dtype: str, seed: int, std: float = 0.02):
    """One tensor per parameter, each from its own generator seeded by (seed, name), so values
    depend neither on module construction order nor on the transformers version."""
    import torch

    with torch.device("meta"):
        model = model_cls(config)
    out = {}
    for name, t in model.state_dict().items():
        shape = tuple(t.shape)
        if _is_norm_weight(name, len(shape)):
            v = torch.ones(shape)
        elif name.endswith(".bias"):
            v = torch.zeros(shape)
        else:
            g = torch.Generator().manual_seed(_tensor_seed(seed, name))
            v = torch.randn(shape, generator=g) * std
        out[name] = v.to(getattr(torch, dtype)).contiguous()
    return out


def _rename_for_vllm(kind: str, sd: dict) -> dict:
    if kind != "llava":
        return sd
    # transformers 5 saves the CLIP tower flat (model.vision_tower.embeddings...); vLLM 0.32's
    # LLaVA wraps a CLIPVisionModel and expects vision_tower.vision_model.*.
    old, new = "model.vision_tower.", "model.vision_tower.vision_model."
    return {
        (new + k[len(old):] if k.startswith(old) and not k.startswith(new) else k): v
        for k, v in sd.items()
    }


# --------------------------------------------------------------------------- build
def build_model(
    kind: str,
    out_dir: str | os.PathLike[str],
    *,
    seed: int = 0,
    corpus: str | os.PathLike[str] | None = None,
    **geometry_overrides: Any,
) -> Path:
    """Build a tiny ``kind`` model into ``out_dir`` (replaced if it exists); returns its path.

    ``geometry_overrides`` are :class:`Geometry` fields (layers, hidden, heads, kv_heads,
    head_dim, intermediate, max_pos, rope_theta, dtype, vision_layers, vision_hidden,
    vision_heads, image_size, patch_size, min_image_tokens, max_image_tokens); ``None`` values
    keep the default. Same arguments -> byte-identical weights and tokenizer.
    """
    _check_kind(kind)
    g = _resolve_geometry(kind, geometry_overrides)

    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tokenizer = _make_tokenizer(kind, corpus)
        ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
        vocab_size = len(tokenizer)
        config, model_cls = _hf_configs(kind, g, vocab_size, ids)
        config.dtype = g.dtype
        sd = _rename_for_vllm(kind, _random_state_dict(model_cls, config, g.dtype, seed))

        with torch.no_grad():
            save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config.save_pretrained(tmp)
        _write_generation_config(tmp, kind, ids)
        tokenizer.save_pretrained(tmp)
        processor = _processor(kind, g, tokenizer)
        if processor is not None:
            processor.save_pretrained(tmp)
        _write_json(tmp / "madakv_tiny_model.json", {
            "kind": kind,
            "seed": seed,
            "geometry": asdict(g),
            "hidden_size": g.hidden_size,
            "intermediate_size": g.intermediate_size,
            "vocab_size": vocab_size,
            "num_parameters": int(sum(t.numel() for t in sd.values())),
            "image_tokens_per_image": (
                (g.image_size // g.patch_size) ** 2 if kind == "llava"
                else [g.min_image_tokens, g.max_image_tokens] if kind == "qwen2vl" else None
            ),
            "special_token_ids": ids,
        })
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def build_all(out_root: str | os.PathLike[str], *, seed: int = 0,
              kinds: tuple[str, ...] = KINDS, **geometry_overrides: Any) -> dict[str, Path]:
    """Build each kind into ``out_root/tiny-<kind>``."""
    root = Path(out_root)
    return {k: build_model(k, root / f"tiny-{k}", seed=seed, **geometry_overrides) for k in kinds}


def _write_generation_config(d: Path, kind: str, ids: Mapping[str, int]) -> None:
    if _family(kind) == "llama":
        gen = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"], "pad_token_id": ids["<pad>"]}
    else:
        gen = {"bos_token_id": ids["<|endoftext|>"],
               "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]],
               "pad_token_id": ids["<|endoftext|>"]}
    _write_json(d / "generation_config.json", gen)


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
