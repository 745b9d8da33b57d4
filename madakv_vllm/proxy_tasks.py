"""Synthetic multimodal long-context tasks: an accuracy proxy for KV-cache eviction.

No real VLM can be fetched on the machines this project runs on, so ``scripts/train_proxy_vlm.py``
trains a small Qwen2-VL-shaped model on these tasks and ``scripts/eval_proxy.py`` measures how
each eviction policy changes its answers. The tasks are modelled on MileBench's diagnostic tasks:

* ``text_needle``  -- a key-value fact ("The secret word is dog.") hidden at a random depth among
  many images and filler sentences; question: the secret word (12 possible answers, chance 1/12).
* ``image_needle`` -- one coloured image among many grey ones; question: its colour
  (5 answers, chance 1/5).
* ``comparison``   -- two coloured images among many grey ones; question: are the two the same
  colour (answers ``same`` / ``not``, balanced, chance 1/2).

Every prompt has the same background: ``n_images`` grey distractor images (grey level x pattern),
most of them preceded by a short filler sentence. Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE``
pixels, i.e. ``TOKENS_PER_IMAGE`` (9) placeholder tokens in a Qwen2-VL model with patch 14 and
2 x 2 merging, plus ``<|vision_start|>``/``<|vision_end|>``. Needles are never placed in the last
``PROTECTED_TAIL`` image slots, so they lie outside the 32-token observation window that every
policy keeps and eviction decides whether they survive.

Answers are one token each (with a leading space: the prompt ends with ``Answer:``), so accuracy
is exact match on the first generated token.

Everything is a pure function of (task, seed, n_images): :func:`make_sample` draws from a
``random.Random`` seeded by a hash of its arguments, and images are rendered from a small finite
set of specs (cached).
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Iterable, Sequence

__all__ = [
    "ANSWERS",
    "COLOURS",
    "IMAGE_SIZE",
    "PROTECTED_TAIL",
    "SECRET_WORDS",
    "TASKS",
    "TOKENS_PER_IMAGE",
    "ImageSpec",
    "Sample",
    "answer_token_ids",
    "make_dataset",
    "make_sample",
    "prompt_text",
    "prompt_token_ids",
    "render_image",
    "sample_seed",
    "vllm_prompt",
]

TASKS: tuple[str, ...] = ("text_needle", "image_needle", "comparison")

IMAGE_SIZE = 84  # pixels: 6 x 6 patches of 14 -> 3 x 3 merged tokens
TOKENS_PER_IMAGE = 9
PROTECTED_TAIL = 3  # needles never go into the last 3 image slots

#: Hue of each colour word (RGB at full shade); every word is one token with a leading space.
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 40),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 30),
    "brown": (130, 75, 25),
}
SHADES = (1.0, 0.8, 0.62)
GREY_LEVELS = (40, 70, 100, 130, 160, 190, 220, 245)
PATTERNS = ("solid", "hstripes", "vstripes", "checker")

#: Values of the text needle (one token each with a leading space); never used in filler text.
SECRET_WORDS: tuple[str, ...] = (
    "ball", "bird", "book", "bus", "car", "cat", "clock", "dog", "door", "horse", "house", "tree",
)
SAME, DIFFERENT = "same", "not"

ANSWERS: dict[str, tuple[str, ...]] = {
    "text_needle": SECRET_WORDS,
    "image_needle": tuple(COLOURS),
    "comparison": (SAME, DIFFERENT),
}

QUESTIONS = {
    "text_needle": "What is the secret word?",
    "image_needle": "One image has colour. What colour is it?",
    "comparison": "Two images have colour. Is their colour the same or not?",
}

# Filler vocabulary: no secret word, no colour word, no answer word.
FILLER_WORDS: tuple[str, ...] = tuple(
    "the a small large picture image shows sits next to with on under left model reads look at "
    "keeps most tokens cache head text sky sun river mountain park village old new people walk "
    "in front of and there are many objects table kitchen station beach photo woman girl child "
    "holding play big good first every".split()
)
NEEDLE_TEMPLATE = "The secret word is {value}."

IMAGE_PROMPT = {"qwen2vl": "<|vision_start|><|image_pad|><|vision_end|>", "llava": "<image>\n"}
IMAGE_TOKEN = {"qwen2vl": "<|image_pad|>", "llava": "<image>"}


# --------------------------------------------------------------------------- images
@dataclass(frozen=True)
class ImageSpec:
    """A synthetic picture: grey (``colour`` None, ``level`` a grey level) or coloured (``colour``
    a key of :data:`COLOURS`, ``level`` an index into :data:`SHADES`), with a pattern."""

    colour: str | None
    level: int
    pattern: str

    @property
    def is_colour(self) -> bool:
        return self.colour is not None


@lru_cache(maxsize=512)
def render_image(spec: ImageSpec, size: int = IMAGE_SIZE):
    """PIL RGB image of ``spec``: the pattern alternates the base colour with a darker/lighter
    variant of the same hue (stripes 7 px wide, checker cells 14 px), so hue identifies colour."""
    import numpy as np
    from PIL import Image

    if spec.colour is None:
        base = np.array([spec.level] * 3, dtype=np.float32)
        alt = base + (-60.0 if spec.level >= 128 else 60.0)
    else:
        base = np.array(COLOURS[spec.colour], dtype=np.float32) * SHADES[spec.level]
        alt = base * 0.55
    yy, xx = np.mgrid[0:size, 0:size]
    if spec.pattern == "solid":
        mask = np.zeros((size, size), dtype=bool)
    elif spec.pattern == "hstripes":
        mask = (yy // 7) % 2 == 1
    elif spec.pattern == "vstripes":
        mask = (xx // 7) % 2 == 1
    elif spec.pattern == "checker":
        mask = ((yy // 14) + (xx // 14)) % 2 == 1
    else:
        raise ValueError(f"unknown pattern {spec.pattern!r}")
    arr = np.where(mask[..., None], alt, base).clip(0, 255).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    img.load()
    return img


def _grey(rng: random.Random) -> ImageSpec:
    return ImageSpec(None, rng.choice(GREY_LEVELS), rng.choice(PATTERNS))


def _coloured(rng: random.Random, colour: str) -> ImageSpec:
    return ImageSpec(colour, rng.randrange(len(SHADES)), rng.choice(PATTERNS))


# --------------------------------------------------------------------------- samples
@dataclass
class Sample:
    """One prompt. ``parts``: strings and :class:`ImageSpec` in prompt order; ``answer`` is the
    bare answer word (the model's target token is ``" " + answer``); ``needle_slots``: indices
    into the image list of the needle image(s), or, for the text needle, the index of the image
    the needle sentence precedes; ``needle_part``: index into ``parts`` of the needle sentence
    (text needle) or of the first needle image."""

    task: str
    seed: int
    n_images: int
    parts: list[Any]
    question: str
    answer: str
    needle_slots: tuple[int, ...]
    needle_part: int
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def images(self) -> list[ImageSpec]:
        return [p for p in self.parts if isinstance(p, ImageSpec)]


def sample_seed(split: str, task: str, index: int, base_seed: int = 0) -> int:
    """Stable 63-bit seed for sample ``index`` of ``task`` in ``split`` ("train", "eval", ...)."""
    d = hashlib.sha256(f"madakv-proxy:{base_seed}:{split}:{task}:{index}".encode()).digest()
    return int.from_bytes(d[:8], "little") & ((1 << 63) - 1)


def _filler(rng: random.Random) -> str:
    n = rng.randint(4, 10)
    words = [rng.choice(FILLER_WORDS) for _ in range(n)]
    return (" ".join(words)).capitalize() + ". "


def make_sample(task: str, seed: int, n_images: int, filler_prob: float = 0.7) -> Sample:
    """A deterministic sample of ``task`` with ``n_images`` images (>= PROTECTED_TAIL + 2)."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    if n_images < PROTECTED_TAIL + 2:
        raise ValueError(f"n_images must be >= {PROTECTED_TAIL + 2}")
    rng = random.Random(seed)
    images = [_grey(rng) for _ in range(n_images)]
    fillers = [_filler(rng) if rng.random() < filler_prob else "" for _ in range(n_images)]
    free = n_images - PROTECTED_TAIL  # needles go into slots [0, free)
    needle_text = None
    if task == "text_needle":
        answer = rng.choice(SECRET_WORDS)
        slots = (rng.randrange(free),)
        needle_text = NEEDLE_TEMPLATE.format(value=answer) + " "
    elif task == "image_needle":
        answer = rng.choice(tuple(COLOURS))
        slots = (rng.randrange(free),)
        images[slots[0]] = _coloured(rng, answer)
    else:
        same = rng.random() < 0.5
        a = rng.choice(tuple(COLOURS))
        b = a if same else rng.choice([c for c in COLOURS if c != a])
        slots = tuple(sorted(rng.sample(range(free), 2)))
        images[slots[0]], images[slots[1]] = _coloured(rng, a), _coloured(rng, b)
        answer = SAME if same else DIFFERENT
    parts: list[Any] = []
    needle_part = -1
    for i in range(n_images):
        if fillers[i]:
            parts.append(fillers[i])
        if needle_text is not None and i == slots[0]:
            needle_part = len(parts)
            parts.append(needle_text)
        if task != "text_needle" and i == slots[0]:
            needle_part = len(parts)
        parts.append(images[i])
    parts.append("\n" + QUESTIONS[task])
    return Sample(task, seed, n_images, parts, QUESTIONS[task], answer, slots, needle_part)


def make_dataset(
    tasks: Iterable[str], n_per_task: int, n_images: tuple[int, int], split: str = "eval",
    base_seed: int = 0,
) -> list[Sample]:
    """``n_per_task`` samples per task, ``n_images`` drawn uniformly from the inclusive range,
    interleaved task by task (sample i of every task, then i + 1, ...)."""
    lo, hi = n_images
    out = []
    for i in range(n_per_task):
        for task in tasks:
            s = sample_seed(split, task, i, base_seed)
            n = random.Random(s ^ 0x5EED).randint(lo, hi)
            out.append(make_sample(task, s, n))
    return out


# --------------------------------------------------------------------------- prompts
def prompt_text(sample: Sample, kind: str = "qwen2vl") -> str:
    """The full prompt string (chat format of the tiny models), ending with ``Answer:``."""
    body = "".join(IMAGE_PROMPT[kind] if isinstance(p, ImageSpec) else p for p in sample.parts)
    if kind == "llava":
        return "USER: " + body + "\nASSISTANT: Answer:"
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + body + "<|im_end|>\n<|im_start|>assistant\nAnswer:"
    )


def vllm_prompt(sample: Sample, kind: str = "qwen2vl") -> dict:
    """Offline vLLM prompt dict: text plus the rendered images."""
    return {
        "prompt": prompt_text(sample, kind),
        "multi_modal_data": {"image": [render_image(s) for s in sample.images]},
    }


def prompt_token_ids(sample: Sample, tokenizer, kind: str = "qwen2vl",
                     tokens_per_image: int = TOKENS_PER_IMAGE) -> list[int]:
    """Token ids as the model sees them: each image placeholder expanded to
    ``tokens_per_image`` copies (what the processor does)."""
    text = prompt_text(sample, kind)
    tok = IMAGE_TOKEN[kind]
    text = text.replace(tok, tok * tokens_per_image)
    return tokenizer.encode(text, add_special_tokens=kind == "llava")


def answer_token_ids(tokenizer, task: str | None = None) -> dict[str, int]:
    """Answer word -> token id of ``" " + word``; raises if any is not a single token."""
    tasks = TASKS if task is None else (task,)
    out = {}
    for t in tasks:
        for w in ANSWERS[t]:
            ids = tokenizer.encode(" " + w, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"answer {w!r} is {len(ids)} tokens with this tokenizer")
            out[w] = ids[0]
    return out


def needle_token_positions(sample: Sample, tokenizer, kind: str = "qwen2vl",
                           tokens_per_image: int = TOKENS_PER_IMAGE) -> list[int]:
    """Token positions of the needle: the value token of the text needle, or the image
    placeholder tokens of the needle image(s)."""
    ids = prompt_token_ids(sample, tokenizer, kind, tokens_per_image)
    if sample.task == "text_needle":
        value = answer_token_ids(tokenizer, sample.task)[sample.answer]
        return [i for i, t in enumerate(ids) if t == value]
    img_tok = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    starts = [i for i, t in enumerate(ids) if t == img_tok and (i == 0 or ids[i - 1] != img_tok)]
    return [starts[s] + j for s in sample.needle_slots for j in range(tokens_per_image)]


def summarize_lengths(samples: Sequence[Sample], tokenizer) -> dict[str, float]:
    lens = [len(prompt_token_ids(s, tokenizer)) for s in samples]
    return {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)}


# --------------------------------------------------------------------------- the proxy model
#: Geometry of the proxy VLM (madakv_vllm.tiny_models.build_model overrides): Qwen2-VL shape,
#: 4 layers, 8 query heads / 2 KV heads of 32, hidden 256; 9 image tokens per 84 x 84 image.
PROXY_KIND = "qwen2vl"
PROXY_GEOMETRY: dict[str, Any] = dict(
    layers=4, heads=8, kv_heads=2, head_dim=32, intermediate=384,
    vision_layers=2, vision_hidden=64, vision_heads=2,
    min_image_tokens=TOKENS_PER_IMAGE, max_image_tokens=TOKENS_PER_IMAGE, dtype="float32",
)
ASSET_WEIGHTS = "weights.fp16.safetensors"
ASSET_INFO = "proxy_vlm.json"
MODEL_INFO = "madakv_proxy_vlm.json"


def default_assets_dir():
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "scripts" / "assets" / "proxy_vlm"


def rebuild_proxy_model(out_dir, assets_dir=None):
    """Rebuild the trained proxy VLM into ``out_dir`` from the committed compact weights.

    Builds the tiny Qwen2-VL skeleton (tokenizer, chat template, processor, configs) with the
    geometry recorded in the assets, then replaces its random weights with the trained ones
    (stored in float16, loaded as float32). Deterministic: same assets -> same files.
    Returns the model directory.
    """
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import load_file, save_file

    from madakv_vllm.tiny_models import build_model

    assets = Path(assets_dir) if assets_dir is not None else default_assets_dir()
    info = json.loads((assets / ASSET_INFO).read_text())
    out = build_model(info["kind"], out_dir, seed=info["seed"], **info["geometry"])
    trained = load_file(str(assets / ASSET_WEIGHTS))
    skeleton = load_file(str(out / "model.safetensors"))
    if set(trained) != set(skeleton):
        missing, extra = sorted(set(skeleton) - set(trained)), sorted(set(trained) - set(skeleton))
        raise ValueError(f"proxy assets do not match the skeleton: missing {missing[:5]}, extra {extra[:5]}")
    sd = {}
    for k, v in skeleton.items():
        if tuple(trained[k].shape) != tuple(v.shape):
            raise ValueError(f"{k}: asset shape {tuple(trained[k].shape)} != {tuple(v.shape)}")
        sd[k] = trained[k].to(v.dtype).contiguous()
    with torch.no_grad():
        save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / MODEL_INFO).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
    return out


class HFBatcher:
    """Builds Hugging Face Qwen2-VL inputs for samples (left-padded, so the answer is always
    predicted at the last position), with each distinct image preprocessed once by the model's
    own image processor -- the same preprocessing vLLM applies."""

    def __init__(self, processor, kind: str = PROXY_KIND):
        if kind != "qwen2vl":
            raise ValueError("HFBatcher supports the qwen2vl proxy only")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.kind = kind
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
        self.answer_ids = answer_token_ids(self.tokenizer)
        self._pix: dict[ImageSpec, tuple[Any, Any]] = {}

    def _pixels(self, spec: ImageSpec):
        if spec not in self._pix:
            enc = self.processor.image_processor(images=[render_image(spec)], return_tensors="pt")
            self._pix[spec] = (enc["pixel_values"], enc["image_grid_thw"])
        return self._pix[spec]

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        import torch

        ids = [prompt_token_ids(s, self.tokenizer, self.kind) for s in samples]
        n = max(map(len, ids))
        input_ids = torch.full((len(ids), n), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(ids), n), dtype=torch.long)
        for i, x in enumerate(ids):
            input_ids[i, n - len(x):] = torch.tensor(x)
            mask[i, n - len(x):] = 1
        pv, thw = [], []
        for s in samples:
            for spec in s.images:
                p, g = self._pixels(spec)
                pv.append(p)
                thw.append(g)
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "mm_token_type_ids": (input_ids == self.image_token_id).int(),
            "pixel_values": torch.cat(pv),
            "image_grid_thw": torch.cat(thw),
        }

    def labels(self, samples: Sequence[Sample]):
        import torch

        return torch.tensor([self.answer_ids[s.answer] for s in samples])
