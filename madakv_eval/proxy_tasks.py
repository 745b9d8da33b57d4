"""Synthetic multimodal long-context tasks: an accuracy proxy for KV-cache eviction.

No real VLM can be fetched on the machines this project runs on, so ``scripts/train_proxy_vlm.py``
trains a small Qwen2-VL-shaped model on these tasks and ``scripts/eval_proxy.py`` measures how
each eviction policy changes its answers. The tasks are modelled on MileBench's diagnostic
(needle) tasks, with *multi-token* answers:

* ``text_needle``  -- a code of :data:`CODE_LEN` ``["text_needle"]`` (6) distinct words
  ("The secret code is dog tree bus ball car cat.") hidden at a random depth among many images
  and filler sentences; answer: the 6 words in order (12 possible words, one token each).
* ``image_needle`` -- a strip of :data:`CODE_LEN` ``["image_needle"]`` (4) adjacent coloured
  images (distinct colours) among many grey ones; answer: their colours in order (5 colours).
* ``comparison``   -- a multi-image comparison (after MileBench's): two coloured images, not
  adjacent, at random depths among many grey ones; answer (:data:`CODE_LEN` ``["comparison"]``,
  3 tokens): the colour of the first, the colour of the second, then ``same`` or ``not``
  (:data:`SAME` / :data:`NOT_SAME`; the two colours are equal half of the time). " different",
  " yes" and " no" are several tokens in the proxy tokenizer, " same" and " not" one each.
* ``labelled_images`` (:data:`LABEL_TASK`; second proxy only, which is trained on
  :data:`ALL_TASKS`) -- cross-modal: 3 + :data:`LABEL_DISTRACTORS` coloured images at random
  depths among the grey ones, each right after a text label (``The dog picture:`` <image>;
  labels from :data:`LABEL_WORDS`, distinct; colours drawn independently, so they may repeat and
  cannot be inferred by elimination). The prompt *starts* with an instruction naming 3 of the
  labels in a random order (``Find the dog, cat and bus pictures.``) and ends with the generic
  question ``Name each of those pictures and its colour.``; answer (:data:`CODE_LEN` 6 tokens):
  ``label colour`` per named picture, in the instruction's order (``dog red cat blue bus red``).
  Each colour needs the text label (which picture) *and* the image (its colour); each label
  after the first is read from the instruction. The instruction, the labels and the images all
  lie outside the observation window (the window holds only the generic question and the chat
  tail), so 5 of the 6 answer tokens have to be read from the cache at decode time (only the
  first, the first label, can be precomputed in the window). Why the instruction comes first:
  with the label names in the final question (inside the window) the prefill pass can fetch each
  named picture's colour into the question's label positions, which every policy keeps, and the
  answer would survive any eviction, as the single-token answers did (see below).

Why multi-token answers. In vLLM the policies evict *after* the prompt is fully prefilled, and
the prefill pass runs full attention. A model answering with one token right after the prompt
(or right after one fixed separator) computes the answer into the hidden states / KV of the last
prompt tokens, which lie in the 32-token observation window every policy keeps: the earlier,
single-token version of this proxy scored every policy at every budget (even StreamingLLM at 5%,
needle evicted) exactly like the full cache. Here the prompt ends with ``Answer``, the model
generates ``:`` (:data:`ANSWER_SEP`, from the prefill pass) and then the K answer tokens, each
from a decode step over the *compressed* cache. A small model trained with teacher forcing solves
the later tokens by copying (induction: the previous answer token is matched against the needle
and the token / image after it is read), not by storing the whole code in the last prompt
position, so tokens 2..K read the needle from the KV cache at decode time and fail when it was
evicted. (Only the first answer token can be precomputed in the window.) Scores: exact match of
the whole code and per-token accuracy.

A two-image "same colour or not" comparison task existed in the single-token version; it was
dropped: its answer is one bit, which the prefill pass always computes into the window, so it
cannot measure eviction in this setting. ``comparison`` brings it back with a multi-token answer:
the first colour comes from the decode step after ``:`` (which can still be precomputed in the
window), the second colour must be read from the second coloured image in the cache. The
verdict token could in principle be computed from the two colour tokens just generated (they
are in the cache's recent tail); whether the trained model does so was not measured.

Status: the trained proxy solves all three tasks. The two-task model (scripts/train_proxy_vlm.py:
33 min of CPU training from scratch, with a text-only copying warm-up that makes induction form)
was fine-tuned for 20 min with ``comparison`` added (``--init-from``, stages 1-6, see that
script). Held-out check (Hugging Face, teacher forcing, 24-64 images, "check" split, 40 samples
per task): exact match 1.00 and per-token 1.00 on all three tasks. Through vLLM with the full
cache (scripts/eval_proxy.py --n-per-task 40, "eval" split, 348 s): exact match 1.00 text
needle, 1.00 image needle, 0.975 comparison (39/40). Under eviction the answers degrade with
the budget and differ by policy: the current tables (dev split for tuning, test split for
reporting, both proxies) are in docs/results.md ("Fidelity").
Results and commands: docs/data/proxy-eval.json (v1) and proxy-eval-v2.json, docs/plots/accuracy_vs_budget.png.

Proxy v2 (:data:`PROXY_GEOMETRY_V2`: 8 layers, 4 KV heads; scripts/assets/proxy_vlm2, rebuilt
with ``rebuild_proxy_model(out, default_assets_dir("v2"))``) is trained on :data:`ALL_TASKS`
(scripts/train_proxy_vlm.py ``--geometry v2``: 95 min of CPU training). Held-out check (Hugging
Face, teacher forcing, 24-64 images, "check" split, 100 samples per task): exact match text
needle 1.00, image needle 0.99, comparison 0.96, labelled images 0.95 (per-token 0.99-1.00);
on the "eval" split, 40 per task, 0.975, 1.00, 0.875, 0.875 -- not fully solved, unlike v1;
with every prompt token outside the 32-token window and 4 sinks hidden from the answer steps,
exact match 0.00-0.10 on every task (details in that script's docstring). Its per-head
modality preference: scripts/plot_head_modality.py.

Every prompt has the same background: ``n_images`` grey distractor images (grey level x pattern),
most of them preceded by a short filler sentence. Images are ``IMAGE_SIZE`` x ``IMAGE_SIZE``
pixels, i.e. ``TOKENS_PER_IMAGE`` (9) placeholder tokens in a Qwen2-VL model with patch 14 and
2 x 2 merging, plus ``<|vision_start|>``/``<|vision_end|>``. Needles are never placed in the last
``PROTECTED_TAIL`` image slots, so they lie outside the observation window and eviction decides
whether they survive.

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
    "ALL_TASKS",
    "ANSWERS",
    "CODE_LEN",
    "COLOURS",
    "IMAGE_SIZE",
    "LABEL_TASK",
    "LABEL_WORDS",
    "MAX_CODE_LEN",
    "NOT_SAME",
    "PROTECTED_TAIL",
    "PROXY_GEOMETRY",
    "PROXY_GEOMETRY_V2",
    "PROXY_VERSIONS",
    "SAME",
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
    "target_token_ids",
    "vllm_prompt",
]

#: The tasks of the first proxy VLM (scripts/assets/proxy_vlm; what scripts/eval_proxy.py scores it on).
TASKS: tuple[str, ...] = ("text_needle", "image_needle", "comparison")
#: The cross-modal labelled-image task (proxy v2 only; see the module docstring).
LABEL_TASK = "labelled_images"
#: Every task: those of :data:`TASKS` plus :data:`LABEL_TASK` (the second proxy VLM's task set).
ALL_TASKS: tuple[str, ...] = TASKS + (LABEL_TASK,)
#: Answer length (tokens after ``:``) per task.
CODE_LEN: dict[str, int] = {"text_needle": 6, "image_needle": 4, "comparison": 3, LABEL_TASK: 6}
MAX_CODE_LEN = max(CODE_LEN.values())

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

#: Words of the text code (one token each with a leading space); never used in filler text.
SECRET_WORDS: tuple[str, ...] = (
    "ball", "bird", "book", "bus", "car", "cat", "clock", "dog", "door", "horse", "house", "tree",
)

#: Verdict words of the comparison task (single tokens with a leading space in the proxy
#: tokenizer; " different", " yes" and " no" are not): "same" colour or "not".
SAME, NOT_SAME = "same", "not"

#: Labels of the labelled-image task ("The dog picture:"): the secret words, the only whole
#: words (besides chat-template and question words) that are one token in the proxy tokenizer
#: and never occur in filler text. In a labelled-image prompt they occur only as labels and in
#: the instruction; the text needle uses them as code words (a different task, no labels).
LABEL_WORDS: tuple[str, ...] = SECRET_WORDS
LABEL_TEMPLATE = "The {label} picture: "  # right before its image
LABEL_INSTRUCTION = "Find the {labels} pictures. "  # the first part of the prompt
#: Labelled images per labelled-image prompt besides the asked ones (they are distractors).
LABEL_DISTRACTORS = 2

#: The vocabulary each task's answer tokens are drawn from.
ANSWERS: dict[str, tuple[str, ...]] = {
    "text_needle": SECRET_WORDS,
    "image_needle": tuple(COLOURS),
    "comparison": tuple(COLOURS) + (SAME, NOT_SAME),
    LABEL_TASK: LABEL_WORDS + tuple(COLOURS),
}

QUESTIONS = {
    "text_needle": "What is the secret code?",
    "image_needle": "Some images have colour. What are their colours?",
    "comparison": "Two images have colour. Name their colours, then compare them.",
    LABEL_TASK: "Name each of those pictures and its colour.",
}

# Filler vocabulary: no secret word, no colour word, no answer word.
FILLER_WORDS: tuple[str, ...] = tuple(
    "the a small large picture image shows sits next to with on under left model reads look at "
    "keeps most tokens cache head text sky sun river mountain park village old new people walk "
    "in front of and there are many objects table kitchen station beach photo woman girl child "
    "holding play big good first every".split()
)
NEEDLE_TEMPLATE = "The secret code is {value}."
ANSWER_CUE = "Answer"  # the prompt ends with this
ANSWER_SEP = ":"  # first generated token (from the prefill pass); the K answer tokens follow

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
    """One prompt. ``parts``: strings and :class:`ImageSpec` in prompt order; ``answer``: the
    answer words in order (the model's target tokens are ``" " + word`` each, after ``:``);
    ``needle_slots``: indices into the image list of the coloured strip (image needle), of the
    two coloured images (comparison) or, for the text needle, the index of the image the needle
    sentence precedes; ``needle_part``: index into ``parts`` of the needle sentence (text
    needle) or of the first coloured image."""

    task: str
    seed: int
    n_images: int
    parts: list[Any]
    question: str
    answer: tuple[str, ...]
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


def needle_images(task: str) -> int:
    """Image slots the needle occupies (the strip of the image needle; 1 for the text needle,
    whose sentence precedes one image; the asked images of the labelled-image task)."""
    if task == LABEL_TASK:
        return CODE_LEN[task] // 2
    return CODE_LEN[task] if task == "image_needle" else 2 if task == "comparison" else 1


def needle_room(task: str, code_len: int | None = None) -> int:
    """Image slots before the protected tail a sample of ``task`` needs: the strip (image needle),
    3 (comparison: two coloured images with at least one grey image between them), the labelled
    images (labelled-image task: asked + :data:`LABEL_DISTRACTORS`) or 1."""
    if task == "image_needle":
        return CODE_LEN[task] if code_len is None else code_len
    if task == LABEL_TASK:
        return (CODE_LEN[task] if code_len is None else code_len) // 2 + LABEL_DISTRACTORS
    return 3 if task == "comparison" else 1


def make_sample(task: str, seed: int, n_images: int, filler_prob: float = 0.7,
                protected_tail: int = PROTECTED_TAIL, code_len: int | None = None) -> Sample:
    """A deterministic sample of ``task`` with ``n_images`` images; needles go into the first
    ``n_images - protected_tail`` slots (which must leave room for them: ``needle_images(task)``).
    The defaults are the eval distribution; training curricula may start shorter and use other
    answer lengths (``code_len``, default ``CODE_LEN[task]``; at most the task's vocabulary;
    always 3 for ``comparison``). The image strip has no filler text between its images. The
    two existing tasks draw exactly what they drew before ``comparison`` was added."""
    if task not in ALL_TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {ALL_TASKS}")
    if task == LABEL_TASK:
        return _labelled_sample(seed, n_images, filler_prob, protected_tail, code_len)
    k = CODE_LEN[task] if code_len is None else code_len
    if task == "comparison" and k != CODE_LEN[task]:
        raise ValueError(f"comparison: code_len must be {CODE_LEN[task]}, got {k}")
    if not 1 <= k <= len(ANSWERS[task]):
        raise ValueError(f"{task}: code_len must be in [1, {len(ANSWERS[task])}], got {k}")
    need = needle_room(task, k)
    if protected_tail < 0 or n_images - protected_tail < need:
        raise ValueError(f"{task}: need n_images - protected_tail >= {need}, got {n_images} - {protected_tail}")
    rng = random.Random(seed)
    images = [_grey(rng) for _ in range(n_images)]
    fillers = [_filler(rng) if rng.random() < filler_prob else "" for _ in range(n_images)]
    free = n_images - protected_tail  # needles go into slots [0, free)
    if task == "comparison":
        # two coloured images, not adjacent, at random depths; same colour with probability 1/2
        colours = tuple(COLOURS)
        first = rng.choice(colours)
        second = first if rng.random() < 0.5 else rng.choice([c for c in colours if c != first])
        answer = (first, second, SAME if first == second else NOT_SAME)
        while True:
            a, b = sorted(rng.sample(range(free), 2))
            if b - a >= 2:
                break
        slots = (a, b)
    else:
        answer = tuple(rng.sample(ANSWERS[task], k))  # distinct, in order
        start = rng.randrange(free - need + 1)
        slots = tuple(range(start, start + need))
    needle_text = None
    if task == "comparison":
        for s, colour in zip(slots, answer):
            images[s] = _coloured(rng, colour)
    elif task == "text_needle":
        needle_text = NEEDLE_TEMPLATE.format(value=" ".join(answer)) + " "
    else:
        for s, colour in zip(slots, answer):
            images[s] = _coloured(rng, colour)
        for s in slots[1:]:
            fillers[s] = ""  # the strip is contiguous
    parts: list[Any] = []
    needle_part = -1
    for i in range(n_images):
        if fillers[i]:
            parts.append(fillers[i])
        if needle_text is not None and i == slots[0]:
            needle_part = len(parts)
            parts.append(needle_text)
        if needle_text is None and i == slots[0]:
            needle_part = len(parts)
        parts.append(images[i])
    parts.append("\n" + QUESTIONS[task])
    return Sample(task, seed, n_images, parts, QUESTIONS[task], answer, slots, needle_part,
                  meta={"filler_prob": filler_prob, "protected_tail": protected_tail, "code_len": k})


def _labelled_sample(seed: int, n_images: int, filler_prob: float, protected_tail: int,
                     code_len: int | None) -> Sample:
    """The labelled-image task (:data:`LABEL_TASK`): ``code_len // 2`` asked labelled images plus
    :data:`LABEL_DISTRACTORS` labelled ones not asked about, at random depths in the first
    ``n_images - protected_tail`` slots, each right after ``The <label> picture:``; labels
    distinct, colours drawn independently (repeats allowed). The prompt starts with the
    instruction naming the asked labels (in a random order) and ends with the generic
    :data:`QUESTIONS` entry; the answer is ``label colour`` per asked image, in the
    instruction's order."""
    k = CODE_LEN[LABEL_TASK] if code_len is None else code_len
    n_lab = k // 2 + LABEL_DISTRACTORS
    if k < 2 or k % 2 or n_lab > len(LABEL_WORDS):
        raise ValueError(f"{LABEL_TASK}: code_len must be even, in [2, {2 * (len(LABEL_WORDS) - LABEL_DISTRACTORS)}], got {k}")
    if protected_tail < 0 or n_images - protected_tail < n_lab:
        raise ValueError(f"{LABEL_TASK}: need n_images - protected_tail >= {n_lab}, got {n_images} - {protected_tail}")
    rng = random.Random(seed)
    images = [_grey(rng) for _ in range(n_images)]
    fillers = [_filler(rng) if rng.random() < filler_prob else "" for _ in range(n_images)]
    free = n_images - protected_tail
    slots = sorted(rng.sample(range(free), n_lab))  # labelled image slots, prompt order
    labels = rng.sample(LABEL_WORDS, n_lab)  # labels[i] introduces image slots[i]
    colours = [rng.choice(tuple(COLOURS)) for _ in range(n_lab)]
    for s, c in zip(slots, colours):
        images[s] = _coloured(rng, c)
    asked = rng.sample(range(n_lab), k // 2)  # instruction / answer order
    answer = tuple(x for i in asked for x in (labels[i], colours[i]))
    names = [labels[i] for i in asked]
    joined = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    instruction = LABEL_INSTRUCTION.format(labels=joined)
    label_of = dict(zip(slots, labels))
    parts: list[Any] = [instruction]
    label_part = {}
    for i in range(n_images):
        if fillers[i]:
            parts.append(fillers[i])
        if i in label_of:
            label_part[i] = len(parts)
            parts.append(LABEL_TEMPLATE.format(label=label_of[i]))
        parts.append(images[i])
    parts.append("\n" + QUESTIONS[LABEL_TASK])
    needle_slots = tuple(slots[i] for i in asked)
    return Sample(LABEL_TASK, seed, n_images, parts, QUESTIONS[LABEL_TASK], answer, needle_slots,
                  label_part[needle_slots[0]],
                  meta={"filler_prob": filler_prob, "protected_tail": protected_tail, "code_len": k,
                        "instruction": instruction, "labelled_slots": tuple(slots),
                        "labels": tuple(labels), "colours": tuple(colours)})


def make_dataset(
    tasks: Iterable[str], n_per_task: int, n_images: tuple[int, int], split: str = "eval",
    base_seed: int = 0,
) -> list[Sample]:
    """``n_per_task`` samples per task, ``n_images`` drawn uniformly from the inclusive range,
    interleaved task by task (sample i of every task, then i + 1, ...)."""
    lo, hi = n_images
    tasks = tuple(tasks)
    out = []
    for i in range(n_per_task):
        for task in tasks:
            s = sample_seed(split, task, i, base_seed)
            n = random.Random(s ^ 0x5EED).randint(lo, hi)
            out.append(make_sample(task, s, n))
    return out


# --------------------------------------------------------------------------- prompts
def prompt_text(sample: Sample, kind: str = "qwen2vl", with_answer: bool = False) -> str:
    """The prompt string (chat format of the tiny models), ending with ``Answer`` -- or, with
    ``with_answer`` (teacher forcing in training), with ``Answer: w1 ... wK``."""
    body = "".join(IMAGE_PROMPT[kind] if isinstance(p, ImageSpec) else p for p in sample.parts)
    tail = ANSWER_CUE + (ANSWER_SEP + "".join(" " + w for w in sample.answer) if with_answer else "")
    if kind == "llava":
        return "USER: " + body + "\nASSISTANT: " + tail
    return (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        + body + "<|im_end|>\n<|im_start|>assistant\n" + tail
    )


def vllm_prompt(sample: Sample, kind: str = "qwen2vl") -> dict:
    """Offline vLLM prompt dict: text plus the rendered images."""
    return {
        "prompt": prompt_text(sample, kind),
        "multi_modal_data": {"image": [render_image(s) for s in sample.images]},
    }


def prompt_token_ids(sample: Sample, tokenizer, kind: str = "qwen2vl",
                     tokens_per_image: int = TOKENS_PER_IMAGE, with_answer: bool = False) -> list[int]:
    """Token ids as the model sees them: each image placeholder expanded to
    ``tokens_per_image`` copies (what the processor does)."""
    text = prompt_text(sample, kind, with_answer)
    tok = IMAGE_TOKEN[kind]
    text = text.replace(tok, tok * tokens_per_image)
    return tokenizer.encode(text, add_special_tokens=kind == "llava")


def sep_token_id(tokenizer) -> int:
    """Id of :data:`ANSWER_SEP`, the first token the model generates."""
    ids = tokenizer.encode(ANSWER_SEP, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{ANSWER_SEP!r} is not one token")
    return ids[0]


def answer_token_ids(tokenizer, task: str | None = None) -> dict[str, int]:
    """Answer word -> token id of ``" " + word``; raises if any is not a single token."""
    tasks = ALL_TASKS if task is None else (task,)
    out = {}
    for t in tasks:
        for w in ANSWERS[t]:
            ids = tokenizer.encode(" " + w, add_special_tokens=False)
            if len(ids) != 1:
                raise ValueError(f"answer {w!r} is {len(ids)} tokens with this tokenizer")
            out[w] = ids[0]
    return out


def target_token_ids(sample: Sample, tokenizer) -> list[int]:
    """The K + 1 tokens the model should generate after the prompt: ``:`` and the answer."""
    ids = answer_token_ids(tokenizer, sample.task)
    return [sep_token_id(tokenizer)] + [ids[w] for w in sample.answer]


def needle_token_positions(sample: Sample, tokenizer, kind: str = "qwen2vl",
                           tokens_per_image: int = TOKENS_PER_IMAGE) -> list[int]:
    """Token positions of the needle: the K code tokens of the text needle, or the image
    placeholder tokens of the coloured strip / the two coloured images (comparison); for the
    labelled-image task the asked labels' tokens (in the instruction and before their images)
    and the asked images' placeholder tokens, in prompt order."""
    ids = prompt_token_ids(sample, tokenizer, kind, tokens_per_image)
    if sample.task == "text_needle":
        values = set(answer_token_ids(tokenizer, sample.task)[w] for w in sample.answer)
        return [i for i, t in enumerate(ids) if t in values]
    img_tok = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
    starts = [i for i, t in enumerate(ids) if t == img_tok and (i == 0 or ids[i - 1] != img_tok)]
    pos = [starts[s] + j for s in sample.needle_slots for j in range(tokens_per_image)]
    if sample.task == LABEL_TASK:
        word_ids = answer_token_ids(tokenizer, sample.task)
        values = {word_ids[w] for w in sample.answer[0::2]}  # the asked labels
        pos = sorted(pos + [i for i, t in enumerate(ids) if t in values])
    return pos


def summarize_lengths(samples: Sequence[Sample], tokenizer) -> dict[str, float]:
    lens = [len(prompt_token_ids(s, tokenizer)) for s in samples]
    return {"min": min(lens), "max": max(lens), "mean": sum(lens) / len(lens)}


# --------------------------------------------------------------------------- the proxy model
#: Geometry of the proxy VLM (madakv_eval.tiny_models.build_model overrides): Qwen2-VL shape,
#: 4 layers, 8 query heads / 2 KV heads of 32, hidden 256; 9 image tokens per 84 x 84 image.
PROXY_KIND = "qwen2vl"
PROXY_GEOMETRY: dict[str, Any] = dict(
    layers=4, heads=8, kv_heads=2, head_dim=32, intermediate=384,
    vision_layers=2, vision_hidden=64, vision_heads=2,
    min_image_tokens=TOKENS_PER_IMAGE, max_image_tokens=TOKENS_PER_IMAGE, dtype="float32",
)
#: Geometry of the second, deeper proxy VLM ("v2", scripts/assets/proxy_vlm2): 8 layers, 8 query
#: heads / 4 KV heads of 32 (GQA groups of 2), hidden 256; the same vision tower and image size.
#: Trained on :data:`ALL_TASKS`.
PROXY_GEOMETRY_V2: dict[str, Any] = dict(
    layers=8, heads=8, kv_heads=4, head_dim=32, intermediate=384,
    vision_layers=2, vision_hidden=64, vision_heads=2,
    min_image_tokens=TOKENS_PER_IMAGE, max_image_tokens=TOKENS_PER_IMAGE, dtype="float32",
)
#: Proxy versions: geometry, task set and assets folder (under scripts/assets/).
PROXY_VERSIONS: dict[str, dict[str, Any]] = {
    "v1": {"geometry": PROXY_GEOMETRY, "tasks": TASKS, "assets": "proxy_vlm", "model": "proxy-vlm"},
    "v2": {"geometry": PROXY_GEOMETRY_V2, "tasks": ALL_TASKS, "assets": "proxy_vlm2", "model": "proxy-vlm2"},
}
ASSET_WEIGHTS = "weights.fp16.safetensors"
ASSET_INFO = "proxy_vlm.json"
MODEL_INFO = "madakv_proxy_vlm.json"


def default_assets_dir(version: str = "v1"):
    """scripts/assets/proxy_vlm (v1, the default) or scripts/assets/proxy_vlm2 (v2)."""
    from pathlib import Path

    return Path(__file__).resolve().parents[1] / "scripts" / "assets" / PROXY_VERSIONS[version]["assets"]


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

    from madakv_eval.tiny_models import build_model

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
    """Builds Hugging Face Qwen2-VL inputs for samples, left-padded so the last positions line
    up, with each distinct image preprocessed once by the model's own image processor -- the
    same preprocessing vLLM applies. ``with_answer=True`` (training): the prompt ends with
    ``Answer: w1 ... wK``; with ``logits_to_keep=labels.shape[1] + 1``, ``logits[:, :-1]``
    predict ``:`` and the K answer tokens (see :meth:`labels`); ``with_answer=False``: exactly
    the vLLM prompt."""

    def __init__(self, processor, kind: str = PROXY_KIND):
        if kind != "qwen2vl":
            raise ValueError("HFBatcher supports the qwen2vl proxy only")
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.kind = kind
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[kind])
        self.answer_ids = answer_token_ids(self.tokenizer)
        self.sep_id = sep_token_id(self.tokenizer)
        self._pix: dict[ImageSpec, tuple[Any, Any]] = {}

    def _pixels(self, spec: ImageSpec):
        if spec not in self._pix:
            enc = self.processor.image_processor(images=[render_image(spec)], return_tensors="pt")
            self._pix[spec] = (enc["pixel_values"], enc["image_grid_thw"])
        return self._pix[spec]

    def __call__(self, samples: Sequence[Sample], with_answer: bool = True) -> dict[str, Any]:
        import torch

        ids = [prompt_token_ids(s, self.tokenizer, self.kind, with_answer=with_answer) for s in samples]
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
        """[B, L], L = 1 + the longest answer of the batch: targets of ``logits[:, :-1]`` of a
        ``with_answer`` batch run with ``logits_to_keep=L + 1`` -- ``:`` then the K answer tokens,
        right-aligned, -100 (ignored) before them for samples with shorter answers."""
        import torch

        width = 1 + max(len(s.answer) for s in samples)
        out = torch.full((len(samples), width), -100, dtype=torch.long)
        for i, s in enumerate(samples):
            y = [self.sep_id] + [self.answer_ids[w] for w in s.answer]
            out[i, width - len(y):] = torch.tensor(y)
        return out
