"""Shared-prefix question groups for the "fidelity across turns" study (scripts/eval_prefix_reuse.py).

A *group* is one context -- the same images and the same text, in the same order -- and several
questions about it, each needing DIFFERENT tokens from the cache. Each question is a separate
request: the chat header, the shared context, then the question's suffix, the chat tail and
``Answer``. Every shared context ends with an image (``<|vision_end|>``, a special token), so the
token ids of a group's requests are identical up to the question, image placeholder tokens and
images included (``tests/test_shared_prefix.py``).

Group kinds (:data:`GROUP_KINDS`):

* ``labels`` (the study's prompt set; proxy v2, the one trained on ``labelled_images``) -- the
  labelled-image task's context (grey images and filler sentences with
  :data:`LABELS_PER_CONTEXT` = 6 coloured images, each right after ``The <label> picture:``)
  WITHOUT its leading instruction, and two questions naming disjoint sets of 3 labels:
  ``<|im_end|>\n<|im_start|>user\nFind the dog, cat and bus pictures. Name each of those
  pictures and its colour.`` (a second user turn: :data:`LABEL_SUFFIX` ``"turn"``). Answer:
  ``label colour`` per named picture. Each question needs its own 3 labelled images.
* ``code+strip`` -- an ``image_needle`` sample (4 adjacent coloured images among grey ones) with
  the ``text_needle`` sentence ("The secret code is ...", 6 words) inserted before one of its
  grey images; questions: text needle, image needle.
* ``code+pair`` -- a ``comparison`` sample (2 non-adjacent coloured images) with the code
  sentence inserted the same way; questions: text needle, comparison.

What the proxies answer (dev split, full cache, through vLLM; scripts/eval_prefix_reuse.py
``--configs full``): neither proxy reads the question of the three needle tasks -- each was
trained on prompts with one needle, where the context alone tells the task. With a code sentence
in the context both answer the code to every question (dev, 20 groups per kind, exact match: v1
text needle 1.00, image needle 0.10, comparison 0.10; v2 0.825, 0.00, 0.00;
docs/data/prefix-reuse-dev-needles-v1.json, -v2.json). (An image strip plus a comparison pair
in one context fails the same way: v1 answers the strip's colours to both questions.) The
labelled-image task is the only one whose answer depends on text the request names (its
instruction), so ``labels`` is the prompt set; but the v2 proxy was trained with the
instruction FIRST (before the context), and with it after the shared context it answers only
~35-40% of the questions exactly (dev 0.35, test 0.385; ~60% of the answer tokens; 0.875 with
the instruction first), and eviction at 0.2 barely changes that (docs/data/prefix-reuse-*.json). An
instruction inline after the context (``"inline"``) or 5 labelled images instead of 6 did not do
better (30-50% on 20-40 dev prompts). A proxy trained with the instruction after the context
would make these accuracies informative; the reuse-versus-fresh comparison (identical tokens,
paired difference) does not need them to be high.

Everything is a pure function of (kind, split, index, base seed, image range).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Iterable, Sequence

from madakv_eval import proxy_tasks as pt

__all__ = ["GROUP_KINDS", "Group", "make_group", "make_groups", "shared_prefix_len"]

#: kind -> (the sample the context is built from, the tasks asked about it, in base order)
GROUP_KINDS: dict[str, tuple[str, tuple[str, ...]]] = {
    "code+strip": ("image_needle", ("text_needle", "image_needle")),
    "code+pair": ("comparison", ("text_needle", "comparison")),
    "labels": (pt.LABEL_TASK, (pt.LABEL_TASK, pt.LABEL_TASK)),
}
#: Labelled images in a ``labels`` context: two disjoint sets of 3 asked ones.
LABELS_PER_CONTEXT = 6
#: How a ``labels`` question follows the shared context (``{instruction}``: "Find the dog, cat and
#: bus pictures. "; ``{question}``: the task's generic question). "turn": a second user turn.
LABEL_SUFFIXES = {
    "inline": "\n{instruction}{question}",
    "turn": "<|im_end|>\n<|im_start|>user\n{instruction}{question}",
}
LABEL_SUFFIX = "turn"


@dataclass
class Group:
    """One shared context and its questions. ``questions``: one :class:`proxy_tasks.Sample` per
    asked task, in the order they are sent (the first one primes the prefix cache); each has the
    same ``parts`` up to its final question part."""

    kind: str
    index: int
    seed: int
    context: list
    questions: list[pt.Sample]

    @property
    def tasks(self) -> list[str]:
        return [q.task for q in self.questions]


def _needle_sentence(rng: random.Random) -> tuple[tuple[str, ...], str]:
    code = tuple(rng.sample(pt.SECRET_WORDS, pt.CODE_LEN["text_needle"]))
    return code, pt.NEEDLE_TEMPLATE.format(value=" ".join(code)) + " "


def make_group(kind: str, split: str, index: int, base_seed: int = 0,
               n_images: tuple[int, int] = (24, 64), rotate: bool = True) -> Group:
    """Group ``index`` of ``kind`` in ``split``. The base sample (image needle / comparison) is
    drawn as :func:`proxy_tasks.make_sample` draws it; the code sentence goes right before a
    grey image in the first ``n_images - PROTECTED_TAIL`` slots, never inside the strip (after its
    filler sentence, as in a text-needle prompt). With ``rotate`` the question order is rotated
    by ``index`` so every task is asked first (priming) and later (reusing) equally often."""
    if kind not in GROUP_KINDS:
        raise ValueError(f"unknown group kind {kind!r}; expected one of {sorted(GROUP_KINDS)}")
    base_task, tasks = GROUP_KINDS[kind]
    seed = pt.sample_seed(split, "shared:" + kind, index, base_seed)
    rng = random.Random(seed)
    lo, hi = n_images
    n = rng.randint(lo, hi)
    if kind == "labels":
        return _labels_group(rng, seed, index, n, rotate)
    base = pt.make_sample(base_task, rng.getrandbits(63), n)
    code, sentence = _needle_sentence(rng)
    free = n - base.meta["protected_tail"]
    inner = set(base.needle_slots[1:]) if base_task == "image_needle" else set()
    # the sentence precedes a grey image (never a coloured one) outside the strip's interior
    candidates = [i for i in range(free) if i not in base.needle_slots and i not in inner]
    text_slot = rng.choice(candidates)
    context: list = []
    img = 0
    text_part = -1
    for p in base.parts[:-1]:  # drop the question
        if isinstance(p, pt.ImageSpec):
            if img == text_slot:
                text_part = len(context)
                context.append(sentence)
            img += 1
        context.append(p)
    if not isinstance(context[-1], pt.ImageSpec):
        raise AssertionError("a shared context must end with an image")
    # the base sample's needle_part index shifts by one if the sentence went in before it
    shift = 1 if text_part <= base.needle_part else 0
    questions = []
    for task in tasks:
        q = "\n" + pt.QUESTIONS[task]
        if task == "text_needle":
            s = pt.Sample(task, seed, n, context + [q], pt.QUESTIONS[task], code, (text_slot,), text_part)
        else:
            s = replace(base, parts=context + [q], needle_part=base.needle_part + shift)
        s.meta = {**base.meta, "group": kind, "group_index": index, "code_len": pt.CODE_LEN[task]}
        questions.append(s)
    if rotate:
        r = index % len(questions)
        questions = questions[r:] + questions[:r]
    return Group(kind, index, seed, context, questions)


def _labels_group(rng: random.Random, seed: int, index: int, n_images: int, rotate: bool) -> Group:
    """A ``labels`` group: the labelled-image task's context (grey images, filler sentences,
    :data:`LABELS_PER_CONTEXT` coloured images each right after ``The <label> picture:``, none in
    the protected tail) WITHOUT its leading instruction; each question names 3 labels (disjoint
    sets) in its suffix: ``"\nFind the dog, cat and bus pictures. Name each of those pictures and
    its colour."``. (The trained v2 prompt has the instruction first; here it must come after the
    shared context, which the proxy never saw in training.)"""
    k = pt.CODE_LEN[pt.LABEL_TASK]
    n_lab = LABELS_PER_CONTEXT
    images = [pt._grey(rng) for _ in range(n_images)]
    fillers = [pt._filler(rng) if rng.random() < 0.7 else "" for _ in range(n_images)]
    free = n_images - pt.PROTECTED_TAIL
    slots = sorted(rng.sample(range(free), n_lab))
    labels = rng.sample(pt.LABEL_WORDS, n_lab)
    colours = [rng.choice(tuple(pt.COLOURS)) for _ in range(n_lab)]
    for s, c in zip(slots, colours):
        images[s] = pt._coloured(rng, c)
    label_of = dict(zip(slots, labels))
    context: list = []
    label_part = {}
    for i in range(n_images):
        if fillers[i]:
            context.append(fillers[i])
        if i in label_of:
            label_part[i] = len(context)
            context.append(pt.LABEL_TEMPLATE.format(label=label_of[i]))
        context.append(images[i])
    order = rng.sample(range(n_lab), n_lab)
    asked_sets = [order[j:j + k // 2] for j in range(0, n_lab - k // 2 + 1, k // 2)]
    questions = []
    for asked in asked_sets:
        answer = tuple(x for i in asked for x in (labels[i], colours[i]))
        names = [labels[i] for i in asked]
        instruction = pt.LABEL_INSTRUCTION.format(labels=", ".join(names[:-1]) + " and " + names[-1])
        suffix = LABEL_SUFFIXES[LABEL_SUFFIX].format(instruction=instruction, question=pt.QUESTIONS[pt.LABEL_TASK])
        needle_slots = tuple(slots[i] for i in asked)
        questions.append(pt.Sample(
            pt.LABEL_TASK, seed, n_images, context + [suffix], pt.QUESTIONS[pt.LABEL_TASK], answer, needle_slots,
            label_part[needle_slots[0]],
            meta={"filler_prob": 0.7, "protected_tail": pt.PROTECTED_TAIL, "code_len": k, "instruction": instruction,
                  "labelled_slots": tuple(slots), "labels": tuple(labels), "colours": tuple(colours),
                  "group": "labels", "group_index": index}))
    if rotate:
        r = index % len(questions)
        questions = questions[r:] + questions[:r]
    return Group("labels", index, seed, context, questions)


def make_groups(kinds: Iterable[str], n_per_kind: int, split: str, base_seed: int = 0,
                n_images: tuple[int, int] = (24, 64)) -> list[Group]:
    """``n_per_kind`` groups of each kind, interleaved (group i of every kind, then i + 1, ...)."""
    kinds = tuple(kinds)
    return [make_group(k, split, i, base_seed, n_images) for i in range(n_per_kind) for k in kinds]


def shared_prefix_len(token_lists: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of several token id lists."""
    n = min(map(len, token_lists))
    for i in range(n):
        if len({ids[i] for ids in token_lists}) != 1:
            return i
    return n
