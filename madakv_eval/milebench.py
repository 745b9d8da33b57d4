"""MileBench runner: any task subset, any KV-cache policy and budget, MileBench's own scoring.

MileBench (COLM 2024, "MileBench: Benchmarking MLLMs in Long Context", github.com/MileBench/MileBench)
ships as one folder per task under a data root::

    DATA_ROOT/<Task>/<Task>.json        # annotation file
    DATA_ROOT/<Task>/images/...         # paths in the annotation are relative to this folder

``<Task>.json`` is ``{"meta_data": {"dataset", "split", "num_sample", "task_instruction": [str, ...],
"question_type": "multi-choice" | "open-ended"}, "data": [sample, ...]}`` and each sample is
``{"sample_id", "task_instruction_id", "task_instance": {"context": "... {image#1} ... {image#2} ...",
"images_path": [...], "choice_list": [...] (multi-choice only)}, "response", "image_quantity_level":
"Few" | "Medium" | "Many"}`` (``{table#N}`` placeholders occur too and are treated like images).

Usage (a GPU server with ``vllm serve <vlm> --attention-backend madakv`` running, or offline)::

    python -m madakv_eval.milebench --data-root data/MileBench --tasks ObjectShuffle,IEdit \\
        --policy madakv --budget 0.2 --api-base http://127.0.0.1:8000/v1 --out results.json
    python -m madakv_eval.milebench --data-root data/MileBench --tasks all \\
        --policy snapkv --budget 0.1 --model /models/Qwen2-VL-7B-Instruct --out results.json --limit 50

``--policy``/``--budget`` travel per request (OpenAI ``extra_body={"vllm_xargs": {"madakv_policy",
"madakv_budget"}}``, offline ``SamplingParams(extra_args=...)``); leave both out to use the server's
configuration. ``--budget 0.2`` is a fraction of the prompt, ``--budget 512`` a token count.

What follows MileBench, and where (files of github.com/MileBench/MileBench):

* Prompt (``utils.py``, ``MileBenchDataset.__getitem__``): ``task_instruction[task_instruction_id]
  + "\\n" + context``; multi-choice samples append ``"\\nChoice list: \\n" + "A. ...\\nB. ..." +
  "\\nYour answer is: "`` (GPR1200: options without letters, it has more than 26); ``{image#i}`` and
  ``{table#i}`` for i = 1..len(images_path) become image slots, and the k-th slot in the text gets
  the k-th entry of ``images_path`` (positional, as MileBench's LLaVA worker feeds them). Here each
  slot becomes an ``image_url`` part of one OpenAI user message, in text order (:func:`to_openai_content`).
* Optional left truncation (``--max-context-len``/``--tokens-per-image``, the later ``utils.py``):
  instruction kept whole, context walked back from its end text fragment by text fragment, each
  followed by the image before it, until ``max_context_len - len(instruction)`` tokens are used
  (:func:`truncate_context`).
* Generation (``configs/model_configs.yaml``): greedy, ``max_new_tokens=512``, ``min_new_tokens=1``;
  the answer is stripped (``workers/model_workers.py``).
* Scoring (``evaluate.py``, ``main`` and ``Eval``): tasks whose name contains ``NeedleInAHaystack``
  are scored by exact token match (ground truth is one of the whitespace-split words of the
  prediction), ``MMCoQA`` by containment, other ``open-ended`` tasks by ROUGE-L F, ``multi-choice``
  tasks by accuracy after option extraction (:func:`match_choice`). Prediction and ground truth are
  first normalised by :func:`normalize` (``Eval.process``). ROUGE-L is that of the ``rouge`` PyPI
  package (1.0.x) MileBench calls, re-implemented in :func:`rouge_l` (summary-level union LCS over
  "."-split sentences, counted over *distinct* words, F = 2PR / (P + R + 1e-8), so a perfect
  answer scores 0.99999999, not 1).
* Summary (``score.py``): one metric per task (``Accuracy`` or ``Rouge-L f``) plus the
  ``image_quantity_level`` breakdown, grouped into Realistic Temporal / Realistic Semantic /
  Diagnostic. The overall number here is the macro mean over the tasks that were run.

MileBench quirks kept on purpose, so numbers stay comparable: an empty multi-choice answer is read
as option C; options past Z (GPR1200) lose their "letter" to normalisation and can be misread; an
option containing a regex special character (e.g. "3.5 kg") is never found by the option-text rule;
a needle answer of several words can never match; at most 32 periods are stripped.

Deviations, all deliberate: a request that fails (prompt too long, server error) is recorded with
its error and scores 0 (MileBench would crash); ``image_quantity_level`` for ROUGE-L tasks is
grouped by each sample's own level (MileBench's ``evaluate_rouge`` files every score under the last
sample's level); the ``combine_image`` variant (``<Task>_combined_N.json``) is not supported;
images surplus to the placeholders go right after the instruction, and a sample with more image
placeholders than images is an error.
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import mimetypes
import re
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CATEGORIES",
    "IMAGE_SLOT",
    "Sample",
    "Task",
    "Prediction",
    "list_tasks",
    "load_task",
    "load_tasks",
    "eval_type",
    "build_prompt",
    "truncate_context",
    "to_openai_content",
    "build_messages",
    "request_args",
    "run_openai",
    "run_offline",
    "normalize",
    "rouge_l",
    "match_choice",
    "score_multi_choice",
    "score_open_ended",
    "score_needle",
    "score_sample",
    "score_task",
    "summarize",
    "run",
    "main",
]

#: MileBench's image placeholder after ``{image#i}``/``{table#i}`` substitution (``utils.py``).
IMAGE_SLOT = "<ImageHere>"

#: Task taxonomy of MileBench's ``score.py``, with the task folder names of the released data.
CATEGORIES: dict[str, tuple[str, ...]] = {
    "Realistic Temporal": (
        "ActionLocalization", "ActionPrediction", "ActionSequence", "CharacterOrder",
        "CounterfactualInference", "EgocentricNavigation", "MovingAttribute", "MovingDirection",
        "ObjectExistence", "ObjectInteraction", "ObjectShuffle", "SceneTransition", "StateChange",
    ),
    "Realistic Semantic": (
        "ALFRED", "CLEVR-Change", "DocVQA", "IEdit", "MMCoQA", "MultiModalQA", "nuscenes",
        "OCR-VQA", "SlideVQA", "Spot-the-Diff", "TQA", "WebQA", "WikiVQA",
    ),
    "Diagnostic": ("GPR1200", "ImageNeedleInAHaystack", "TextNeedleInAHaystack"),
}

LEVELS = ("Few", "Medium", "Many")

#: MileBench's generation settings (configs/model_configs.yaml).
DEFAULT_MAX_TOKENS = 512


# ============================================================================ data
@dataclass
class Sample:
    task: str
    sample_id: Any
    instruction: str
    context: str  # raw, with {image#N} placeholders
    images: list[Path]
    response: str
    choices: list[str] | None = None
    image_quantity_level: str | None = None


@dataclass
class Task:
    name: str
    root: Path
    question_type: str
    eval_type: str  # "multi-choice" | "open-ended" | "needle" | "contains"
    samples: list[Sample]
    meta: dict = field(default_factory=dict)

    @property
    def max_images(self) -> int:
        return max((len(s.images) for s in self.samples), default=0)


def list_tasks(data_root: str | Path) -> list[str]:
    """Task folders under ``data_root`` (those holding ``<Task>/<Task>.json``), sorted."""
    root = Path(data_root)
    return sorted(p.name for p in root.iterdir() if p.is_dir() and (p / f"{p.name}.json").is_file())


def eval_type(task: str, question_type: str) -> str:
    """The scorer MileBench's ``evaluate.py`` ``main`` picks: the task name decides first
    (``NeedleInAHaystack`` -> exact token match, ``MMCoQA`` -> containment), then the
    annotation's ``question_type``."""
    if "NeedleInAHaystack" in task:
        return "needle"
    if "MMCoQA" in task:
        return "contains"
    if question_type in ("open-ended", "multi-choice"):
        return question_type
    raise ValueError(f"{task}: unsupported question_type {question_type!r} "
                     "(MileBench knows 'multi-choice' and 'open-ended')")


def load_task(data_root: str | Path, name: str, limit: int | None = None) -> Task:
    """Load ``data_root/name/name.json``; ``limit`` keeps the first N samples.

    Checks what MileBench's scorers assert (non-empty ground truth; for multi-choice, the
    normalised ground truth is one of the normalised choices) and that every image exists, so
    a broken annotation fails before any generation."""
    root = Path(data_root) / name
    ann_path = root / f"{name}.json"
    if not ann_path.is_file():
        have = list_tasks(data_root) if Path(data_root).is_dir() else []
        raise FileNotFoundError(f"{ann_path} not found; tasks under {data_root}: {have or 'none'}")
    ann = json.loads(ann_path.read_text())
    meta = ann["meta_data"]
    instructions = meta["task_instruction"]
    qtype = meta["question_type"]
    etype = eval_type(name, qtype)
    samples = []
    data = ann["data"] if limit is None else ann["data"][:limit]
    for d in data:
        inst = d["task_instance"]
        sid = d["sample_id"]
        iid = d["task_instruction_id"]
        if not 0 <= int(iid) < len(instructions):
            raise ValueError(f"{name} sample {sid}: task_instruction_id {iid} out of range")
        images = [root / "images" / p for p in inst["images_path"]]
        missing = [str(p) for p in images if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{name} sample {sid}: missing image(s) {missing[:3]}")
        s = Sample(
            task=name, sample_id=sid, instruction=instructions[int(iid)], context=inst["context"],
            images=images, response=str(d["response"]),
            choices=[str(c) for c in inst["choice_list"]] if "choice_list" in inst else None,
            image_quantity_level=d.get("image_quantity_level"),
        )
        if normalize(s.response) == "":
            raise ValueError(f"{name} sample {sid}: empty ground truth")
        if etype == "multi-choice":
            if not s.choices:
                raise ValueError(f"{name} sample {sid}: multi-choice sample without choice_list")
            if normalize(s.response) not in [normalize(c) for c in s.choices]:
                raise ValueError(f"{name} sample {sid}: response {s.response!r} not in choice_list")
        samples.append(s)
    return Task(name=name, root=root, question_type=qtype, eval_type=etype, samples=samples,
                meta={k: v for k, v in meta.items() if k != "task_instruction"})


def load_tasks(data_root: str | Path, tasks: str | Sequence[str], limit: int | None = None) -> list[Task]:
    """``tasks``: names, a comma-separated string, or ``"all"``."""
    if isinstance(tasks, str):
        tasks = list_tasks(data_root) if tasks.strip() == "all" else [t.strip() for t in tasks.split(",") if t.strip()]
    if not tasks:
        raise ValueError("no tasks given")
    return [load_task(data_root, t, limit) for t in tasks]


# ============================================================================ prompts
def _choice_block(sample: Sample) -> str:
    if sample.choices is None:
        return ""
    lettered = sample.task != "GPR1200"  # MileBench: GPR1200 has > 26 options, listed bare
    lines = [(f"{chr(65 + i)}. " if lettered else "") + c for i, c in enumerate(sample.choices)]
    return "\nChoice list: \n" + "\n".join(lines) + "\nYour answer is: "


def _slotted_context(sample: Sample) -> str:
    """Context + choice block with ``{image#i}``/``{table#i}`` (i <= number of images) replaced
    by :data:`IMAGE_SLOT`; other placeholders stay literal text, as in MileBench."""
    ctx = sample.context + _choice_block(sample)
    for i in range(1, len(sample.images) + 1):
        ctx = ctx.replace("{image#%d}" % i, IMAGE_SLOT).replace("{table#%d}" % i, IMAGE_SLOT)
    return ctx


def truncate_context(context: str, images: list, instruction: str, tokenizer, max_context_len: int,
                     n_tokens_per_image: int) -> tuple[str, list, bool]:
    """MileBench's left truncation (later ``utils.py``): keep the end of ``context``.

    Walks the :data:`IMAGE_SLOT`-separated text fragments from the last one backwards; each
    fragment is kept if it fits in ``max_context_len - len(instruction tokens)``, then the image
    before it if ``n_tokens_per_image`` more fit. The first fragment that does not fit ends the
    walk (if nothing was kept yet, its last tokens are kept). Returns the kept context (fragments
    decoded back from tokens, rejoined with slots), the kept images, and whether the kept part
    starts with an image (a slot to put before the context)."""
    budget = max_context_len - len(tokenizer(instruction, add_special_tokens=False).input_ids)
    budget = max(budget, 0)
    remaining = list(images)
    chunks: list[list[int]] = []
    kept: list = []
    used = 0
    image_start = False
    for fragment in reversed(context.split(IMAGE_SLOT)):
        ids = tokenizer(fragment, add_special_tokens=False).input_ids
        if len(ids) + used > budget:
            if not chunks:
                chunks.insert(0, ids[len(ids) - budget:] if budget else [])
            break
        image_start = False
        chunks.insert(0, ids)
        used += len(ids)
        if n_tokens_per_image + used > budget:
            break
        if remaining:
            image_start = True
            kept.insert(0, remaining.pop())
            used += n_tokens_per_image
    text = IMAGE_SLOT.join(tokenizer.decode(c) for c in chunks)
    return text, kept, image_start


def build_prompt(sample: Sample, tokenizer=None, max_context_len: int | None = None,
                 n_tokens_per_image: int | None = None) -> tuple[str, list[Path]]:
    """MileBench's prompt text (with :data:`IMAGE_SLOT` slots) and its images in slot order.

    Without ``max_context_len`` nothing is truncated (the server rejects what does not fit,
    recorded as that sample's error); with it, ``tokenizer`` and ``n_tokens_per_image`` are needed.
    """
    ctx = _slotted_context(sample)
    images = list(sample.images)
    if max_context_len is not None:
        if tokenizer is None or n_tokens_per_image is None:
            raise ValueError("truncation needs a tokenizer and n_tokens_per_image")
        ctx, images, image_start = truncate_context(ctx, images, sample.instruction, tokenizer,
                                                    max_context_len, n_tokens_per_image)
        if image_start:
            ctx = IMAGE_SLOT + ctx
    extra = len(images) - ctx.count(IMAGE_SLOT)
    if extra > 0:  # images without a placeholder: right after the instruction
        ctx = IMAGE_SLOT * extra + ctx
    return sample.instruction + "\n" + ctx, images


def _data_url(path: Path) -> str:
    mime = mimetypes.guess_type(path.name)[0]
    if not mime or not mime.startswith("image/"):
        from PIL import Image

        with Image.open(path) as im:
            mime = Image.MIME.get(im.format or "", "image/png")
    return f"data:{mime};base64," + base64.b64encode(path.read_bytes()).decode()


def to_openai_content(text: str, images: Sequence[Path | str],
                      image_url: Callable[[Path], str] = _data_url) -> list[dict]:
    """One OpenAI user-message ``content`` list: text parts and ``image_url`` parts interleaved
    in the order of the :data:`IMAGE_SLOT` slots in ``text``; the k-th slot gets ``images[k]``.
    Images beyond the slots go first; more slots than images raise ``ValueError``."""
    pieces = text.split(IMAGE_SLOT)
    n_slots = len(pieces) - 1
    images = [Path(p) for p in images]
    if n_slots > len(images):
        raise ValueError(f"{n_slots} image placeholders but {len(images)} images")
    content: list[dict] = []

    def add_text(t: str) -> None:
        if not t:
            return
        if content and content[-1]["type"] == "text":
            content[-1]["text"] += t
        else:
            content.append({"type": "text", "text": t})

    def add_image(p: Path) -> None:
        content.append({"type": "image_url", "image_url": {"url": image_url(p)}})

    for p in images[: len(images) - n_slots]:
        add_image(p)
    add_text(pieces[0])
    for p, piece in zip(images[len(images) - n_slots:], pieces[1:]):
        add_image(p)
        add_text(piece)
    return content


def build_messages(sample: Sample, **prompt_kw) -> list[dict]:
    """The chat request for one sample: a single user message (see :func:`build_prompt`)."""
    text, images = build_prompt(sample, **prompt_kw)
    return [{"role": "user", "content": to_openai_content(text, images)}]


# ============================================================================ runners
@dataclass
class Prediction:
    task: str
    sample_id: Any
    pred_response: str
    gt_response: str
    n_images: int
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    error: str | None = None
    score: float | None = None
    image_quantity_level: str | None = None


def request_args(policy: str | None = None, budget: int | float | None = None) -> dict[str, Any]:
    """Per-request MadaKV arguments (``vllm_xargs`` / ``SamplingParams.extra_args``), validated
    here with the plugin's own config model so a typo fails before any request is sent."""
    out: dict[str, Any] = {}
    if policy is not None:
        out["madakv_policy"] = policy
    if budget is not None:
        out["madakv_budget"] = budget
    if out:
        from madakv_vllm.config import parse_config

        parse_config({k[len("madakv_"):]: v for k, v in out.items()})
    return out


def _prediction(sample: Sample, n_images: int, **kw) -> Prediction:
    return Prediction(task=sample.task, sample_id=sample.sample_id, gt_response=sample.response,
                      n_images=n_images, image_quantity_level=sample.image_quantity_level, **kw)


def _prompt_kw(tokenizer, max_context_len, n_tokens_per_image) -> dict:
    if max_context_len is None:
        return {}
    return {"tokenizer": tokenizer, "max_context_len": max_context_len, "n_tokens_per_image": n_tokens_per_image}


def run_openai(samples: Sequence[Sample], *, api_base: str, model: str | None = None,
               xargs: dict | None = None, max_tokens: int = DEFAULT_MAX_TOKENS, concurrency: int = 8,
               api_key: str = "EMPTY", timeout: float = 600.0, tokenizer=None,
               max_context_len: int | None = None, n_tokens_per_image: int | None = None,
               progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """Chat-completion requests through the ``openai`` client, ``concurrency`` in flight; greedy,
    ``min_tokens=1``; per-request MadaKV args in ``extra_body["vllm_xargs"]``. ``model`` defaults
    to the server's first model. Returns one :class:`Prediction` per sample, in order."""
    from openai import OpenAI

    client = OpenAI(base_url=api_base, api_key=api_key, timeout=timeout)
    if model is None:
        model = client.models.list().data[0].id
    extra_body: dict[str, Any] = {"min_tokens": 1}
    if xargs:
        extra_body["vllm_xargs"] = dict(xargs)
    pkw = _prompt_kw(tokenizer, max_context_len, n_tokens_per_image)
    done = [0]

    def one(sample: Sample) -> Prediction:
        n_img = len(sample.images)
        try:
            text, images = build_prompt(sample, **pkw)
            n_img = len(images)
            resp = client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": to_openai_content(text, images)}],
                max_tokens=max_tokens, temperature=0, extra_body=extra_body,
            )
            usage = resp.usage
            pred = _prediction(sample, n_img, pred_response=(resp.choices[0].message.content or "").strip(),
                               prompt_tokens=usage.prompt_tokens if usage else None,
                               completion_tokens=usage.completion_tokens if usage else None)
        except Exception as e:  # one failed request must not end the run
            pred = _prediction(sample, n_img, pred_response="", error=f"{type(e).__name__}: {e}"[:2000])
        done[0] += 1
        if progress:
            progress(done[0], len(samples))
        return pred

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(pool.map(one, samples))


def run_offline(samples: Sequence[Sample], llm, *, xargs: dict | None = None,
                max_tokens: int = DEFAULT_MAX_TOKENS, batch_size: int = 16,
                max_context_len: int | None = None, n_tokens_per_image: int | None = None,
                progress: Callable[[int, int], None] | None = None) -> list[Prediction]:
    """``LLM.chat`` over batches of ``batch_size`` conversations (vLLM schedules each batch
    together); greedy, ``min_tokens=1``, ``SamplingParams(extra_args=xargs)``. A batch that fails
    is retried one sample at a time so only the failing samples get an error."""
    from vllm import SamplingParams

    sp = SamplingParams(temperature=0, max_tokens=max_tokens, min_tokens=1, extra_args=dict(xargs) if xargs else None)
    pkw = _prompt_kw(llm.get_tokenizer() if max_context_len is not None else None, max_context_len, n_tokens_per_image)
    out: list[Prediction] = []

    def prepare(s: Sample):
        text, images = build_prompt(s, **pkw)
        return [{"role": "user", "content": to_openai_content(text, images)}], len(images)

    def finish(s: Sample, n_img: int, r) -> Prediction:
        o = r.outputs[0]
        return _prediction(s, n_img, pred_response=o.text.strip(), prompt_tokens=len(r.prompt_token_ids or []),
                           completion_tokens=len(o.token_ids))

    def fail(s: Sample, e: Exception) -> Prediction:
        return _prediction(s, len(s.images), pred_response="", error=f"{type(e).__name__}: {e}"[:2000])

    for start in range(0, len(samples), max(1, batch_size)):
        batch = samples[start:start + batch_size]
        prepared: list[tuple[Sample, Any]] = []
        for s in batch:
            try:
                prepared.append((s, prepare(s)))
            except Exception as e:
                prepared.append((s, e))
        ok = [(s, p) for s, p in prepared if not isinstance(p, Exception)]
        results: dict[int, Prediction] = {}
        try:
            outs = llm.chat([p[0] for _, p in ok], sp, use_tqdm=False) if ok else []
            for (s, p), r in zip(ok, outs):
                results[id(s)] = finish(s, p[1], r)
        except Exception:
            for s, p in ok:
                try:
                    results[id(s)] = finish(s, p[1], llm.chat(p[0], sp, use_tqdm=False)[0])
                except Exception as e:
                    results[id(s)] = fail(s, e)
        for s, p in prepared:
            out.append(fail(s, p) if isinstance(p, Exception) else results[id(s)])
        if progress:
            progress(len(out), len(samples))
    return out


# ============================================================================ scoring
# Eval.process / Eval.processPunctuation of MileBench's evaluate.py (VQA-style normalisation).
_PUNCT = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")
# evaluate.py compiles "(?!<=\d)(\.)(?!\d)" (its "(?!<=\d)" is a look-ahead that never fails before
# a ".") and calls .sub("", text, re.UNICODE), where re.UNICODE lands in `count`: at most 32 periods
# not followed by a digit are removed.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_PERIOD_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    out = text
    has_comma_number = _COMMA_STRIP.search(text) is not None
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or has_comma_number:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_COUNT)


def normalize(answer: str) -> str:
    """MileBench's ``Eval.process``: newlines/tabs to spaces, strip, punctuation removed (deleted
    when it touches a space or the text has a digit,digit group, else turned into a space),
    periods not before a digit removed, quotes stripped, lower-cased."""
    a = answer.replace("\n", " ").replace("\t", " ").strip()
    a = _process_punctuation(a)
    return a.strip("'").strip('"').strip().lower()


def _lcs_words(x: list[str], y: list[str]) -> list[str]:
    """One longest common subsequence of word lists x (reference) and y (candidate), with the
    ``rouge`` package's back-tracking tie-break (diagonal on a match, else up only if strictly
    longer, else left)."""
    n, m = len(x), len(y)
    t = [[0] * (m + 1) for _ in range(n + 1)]
    for i in range(1, n + 1):
        xi, row, prev = x[i - 1], t[i], t[i - 1]
        for j in range(1, m + 1):
            row[j] = prev[j - 1] + 1 if xi == y[j - 1] else max(prev[j], row[j - 1])
    out = []
    i, j = n, m
    while i > 0 and j > 0:
        if x[i - 1] == y[j - 1]:
            out.append(x[i - 1])
            i, j = i - 1, j - 1
        elif t[i - 1][j] > t[i][j - 1]:
            i -= 1
        else:
            j -= 1
    return out[::-1]


def _sentences(text: str) -> list[str]:
    return [" ".join(s.split()) for s in text.split(".") if len(s) > 0]


def rouge_l(hypothesis: str, reference: str) -> dict[str, float]:
    """ROUGE-L as ``rouge.Rouge().get_scores(hyp, ref)[0]["rouge-l"]`` (rouge 1.0.x, the package
    MileBench's evaluate.py uses): texts split into sentences on ".", words on single spaces;
    LCS_u = number of distinct words in the union of the LCSs of every (reference sentence,
    candidate sentence) pair; R = LCS_u / distinct reference words, P = LCS_u / distinct candidate
    words, F = 2PR / (P + R + 1e-8). Raises ``ValueError`` on a text without any sentence."""
    hyp, ref = _sentences(hypothesis), _sentences(reference)
    if not hyp or not ref:
        raise ValueError("Collections must contain at least 1 sentence.")
    m = len({w for s in ref for w in s.split(" ")})
    n = len({w for s in hyp for w in s.split(" ")})
    union: set[str] = set()
    for r in ref:
        rw = r.split(" ")
        for h in hyp:
            union.update(_lcs_words(rw, h.split(" ")))
    lcs = len(union)
    r_lcs, p_lcs = lcs / m, lcs / n
    return {"f": 2.0 * (p_lcs * r_lcs) / (p_lcs + r_lcs + 1e-8), "p": p_lcs, "r": r_lcs}


_REGEX_SPECIALS = frozenset("\\.^$*+?{}[]|()")


def _option_pattern(option: str) -> str:
    """``preprocess_option_string`` of evaluate.py: normalise, then backslash-escape its list of
    regex special characters."""
    return "".join("\\" + c if c in _REGEX_SPECIALS else c for c in normalize(option))


def match_choice(text: str, options: dict[str, str]) -> str:
    """The option letter MileBench's ``Eval.match_choice`` reads from a (normalised) answer.

    In order: an empty answer is ``"C"``; the leftmost "letter option-text" (e.g. ``b green pear``)
    gives its letter; else the leftmost option text, spaces ignored on both sides, gives the
    letter of the option whose escaped text equals the match; else a one-character answer that is
    a letter; else every character of the answer whose upper case is an option letter, joined."""
    if text == "":
        return "C"
    try:
        pattern = "(" + "|".join(_option_pattern(f"{k} {v}") for k, v in options.items()) + ")"
        m = re.search(pattern, text, re.S)
        if m:
            return m.group(0)[0].upper()
        bare = {k: _option_pattern(v).replace(" ", "") for k, v in options.items()}
        m = re.search("(" + "|".join(bare.values()) + ")", text.replace(" ", ""), re.S)
        if m:
            for k, v in bare.items():
                if m[0].strip() == v:
                    return k.upper()
        if len(text) == 1 and text.upper() in options:
            return text.upper()
    except Exception:  # evaluate.py returns the text itself when matching throws
        return text
    return "".join(c.upper() for c in text if c.upper() in options)


def score_multi_choice(pred: str, gt: str, choices: Sequence[str]) -> int:
    """``Eval.judge_multi_choice`` after ``process_sample``: 1 if the extracted letter is that of
    the ground truth (options lettered ``chr(65 + i)``, also past Z as in MileBench)."""
    gt_n, pred_n = normalize(gt), normalize(pred)
    ch = [normalize(c) for c in choices]
    if gt_n not in ch:
        raise ValueError(f"ground truth {gt!r} is not one of the choices")
    options = {chr(65 + i): c for i, c in enumerate(ch)}
    return int(match_choice(pred_n, options) == chr(65 + ch.index(gt_n)))


def score_open_ended(pred: str, gt: str) -> float:
    """``Eval.evaluate_rouge``: ROUGE-L F of the normalised texts; an empty prediction scores 0
    (so does one with no word left after sentence splitting, where rouge would raise)."""
    gt_n, pred_n = normalize(gt), normalize(pred)
    if gt_n == "":
        raise ValueError("empty ground truth")
    if pred_n == "":
        return 0.0
    try:
        return rouge_l(pred_n, gt_n)["f"]
    except ValueError:
        return 0.0


def score_needle(pred: str, gt: str, exact_token: bool = True) -> int:
    """``Eval.evaluate_needle``: needle tasks need the normalised ground truth to be one of the
    prediction's whitespace-separated words; ``exact_token=False`` (MMCoQA) only containment."""
    gt_n, pred_n = normalize(gt), normalize(pred)
    return int(gt_n in pred_n.split()) if exact_token else int(gt_n in pred_n)


def score_sample(etype: str, pred: str, gt: str, choices: Sequence[str] | None = None) -> float:
    if etype == "multi-choice":
        return float(score_multi_choice(pred, gt, choices or []))
    if etype == "open-ended":
        return score_open_ended(pred, gt)
    if etype in ("needle", "contains"):
        return float(score_needle(pred, gt, exact_token=etype == "needle"))
    raise ValueError(f"unknown eval type {etype!r}")


def _mean(xs: Sequence[float]) -> float:
    return float(sum(xs) / len(xs)) if xs else 0.0


def score_task(task: Task, predictions: Sequence[Prediction]) -> dict[str, Any]:
    """Score ``predictions`` (one per sample of ``task``, matched by sample_id; each gets its
    ``score``) and summarise like MileBench's eval.json: the task metric (``Accuracy`` or
    ``Rouge-L f``) and ``image_quantity_level-Accuracy`` (0 for an empty level), plus counts."""
    by_id = {str(p.sample_id): p for p in predictions}
    if len(by_id) != len(task.samples) or any(str(s.sample_id) not in by_id for s in task.samples):
        raise ValueError(f"{task.name}: predictions do not cover the task's samples one to one")
    scores: list[float] = []
    levels: dict[str, list[float]] = {k: [] for k in LEVELS}
    for s in task.samples:
        p = by_id[str(s.sample_id)]
        p.score = 0.0 if p.error else score_sample(task.eval_type, p.pred_response, s.response, s.choices)
        scores.append(p.score)
        if s.image_quantity_level is not None:
            levels.setdefault(s.image_quantity_level, []).append(p.score)
    metric = "Rouge-L f" if task.eval_type == "open-ended" else "Accuracy"
    return {
        "task": task.name,
        "category": next((c for c, names in CATEGORIES.items() if task.name in names), None),
        "question_type": task.question_type,
        "eval_type": task.eval_type,
        "metric": metric,
        "score": _mean(scores),
        metric: _mean(scores),
        "image_quantity_level-Accuracy": {k: _mean(v) for k, v in levels.items()},
        "n": len(scores),
        "n_errors": sum(1 for p in predictions if p.error),
        "mean_prompt_tokens": _mean([p.prompt_tokens for p in predictions if p.prompt_tokens is not None]),
    }


def summarize(task_results: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Overall: macro mean of the task scores, and per ``score.py`` category (only categories
    with a task that was run)."""
    cats: dict[str, list[float]] = {}
    for r in task_results:
        if r.get("category"):
            cats.setdefault(r["category"], []).append(r["score"])
    return {
        "score": _mean([r["score"] for r in task_results]),
        "categories": {c: _mean(v) for c, v in cats.items()},
        "n_tasks": len(task_results),
        "n_samples": sum(r["n"] for r in task_results),
        "n_errors": sum(r["n_errors"] for r in task_results),
    }


# ============================================================================ driver
def run(tasks: Sequence[Task], generate: Callable[[list[Sample]], list[Prediction]],
        config: dict | None = None, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Generate and score every task; returns the results document (see :func:`main`)."""
    results, preds_out = [], {}
    t_all = time.time()
    for task in tasks:
        t0 = time.time()
        preds = generate(task.samples)
        summary = score_task(task, preds)
        summary["seconds"] = round(time.time() - t0, 3)
        results.append(summary)
        preds_out[task.name] = [asdict(p) for p in preds]
        if log:
            log(f"{task.name:28s} {summary['metric']:10s} {100 * summary['score']:7.2f}  "
                f"n={summary['n']} errors={summary['n_errors']} ({summary['seconds']:.1f}s)")
    overall = summarize(results)
    overall["seconds"] = round(time.time() - t_all, 3)
    return {"config": dict(config or {}), "tasks": {r["task"]: r for r in results}, "overall": overall,
            "predictions": preds_out}


def _budget(text: str) -> int | float:
    """``0.2`` -> a fraction of the prompt; ``512`` -> a token count (the plugin's convention)."""
    try:
        return int(text)
    except ValueError:
        v = float(text)
        if not math.isfinite(v):
            raise argparse.ArgumentTypeError(f"bad budget {text!r}") from None
        return v


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m madakv_eval.milebench",
        description="Run MileBench tasks through vLLM (OpenAI API or offline LLM) with a MadaKV "
                    "policy/budget and score them with MileBench's metrics.")
    ap.add_argument("--data-root", required=True, help="folder with one <Task>/<Task>.json + images/ per task")
    ap.add_argument("--tasks", default="all", help="comma-separated task names, or 'all' (default)")
    ap.add_argument("--policy", default=None, help="per-request madakv_policy (madakv, snapkv, full, ...); "
                    "default: the server's")
    ap.add_argument("--budget", type=_budget, default=None,
                    help="per-request madakv_budget: a fraction in (0, 1] (0.2) or a token count (512)")
    ap.add_argument("--api-base", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1")
    ap.add_argument("--model", default=None,
                    help="with --api-base: served model name (default: the server's first); "
                         "without: model path/name for the offline LLM")
    ap.add_argument("--out", required=True, help="results JSON to write")
    ap.add_argument("--limit", type=int, default=None, help="first N samples of each task")
    ap.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS, help="max new tokens (MileBench: 512)")
    ap.add_argument("--concurrency", type=int, default=8, help="API: requests in flight")
    ap.add_argument("--api-key", default="EMPTY")
    ap.add_argument("--timeout", type=float, default=600.0, help="API: seconds per request")
    ap.add_argument("--batch-size", type=int, default=16, help="offline: conversations per LLM.chat call")
    ap.add_argument("--max-model-len", type=int, default=None, help="offline: LLM(max_model_len=...)")
    ap.add_argument("--madakv-config", default=None,
                    help="offline: JSON for additional_config['madakv'] (server-wide defaults)")
    ap.add_argument("--stock", action="store_true",
                    help="offline: stock vLLM attention (no --attention-backend madakv); no policy/budget")
    ap.add_argument("--llm-kwargs", default=None, help="offline: JSON of extra LLM(...) arguments")
    ap.add_argument("--max-context-len", type=int, default=None,
                    help="truncate contexts from the left to this many tokens, as MileBench does")
    ap.add_argument("--tokens-per-image", type=int, default=None,
                    help="with --max-context-len: tokens one image counts for (LLaVA-1.5: 576)")
    ap.add_argument("--tokenizer", default=None,
                    help="API + --max-context-len: tokenizer to count with (default: --model)")
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if (args.max_context_len is None) != (args.tokens_per_image is None):
        raise SystemExit("--max-context-len and --tokens-per-image go together")
    if args.stock and (args.policy or args.budget is not None or args.madakv_config):
        raise SystemExit("--stock takes no --policy/--budget/--madakv-config")
    if args.api_base is None and args.model is None:
        raise SystemExit("give --api-base (OpenAI API) or --model (offline LLM)")
    xargs = request_args(args.policy, args.budget)
    tasks = load_tasks(args.data_root, args.tasks, args.limit)

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def progress(done: int, total: int) -> None:
        if done == total or done % max(1, total // 10) == 0:
            log(f"  {done}/{total}")

    config = {k: v for k, v in vars(args).items() if k not in ("api_key",)}
    config["request_args"] = xargs
    config["mode"] = "api" if args.api_base else "offline"

    if args.api_base:
        tok = None
        if args.max_context_len is not None:
            from transformers import AutoTokenizer

            name = args.tokenizer or args.model
            if not name:
                raise SystemExit("--max-context-len with --api-base needs --tokenizer or --model")
            tok = AutoTokenizer.from_pretrained(name)

        def generate(samples):
            return run_openai(samples, api_base=args.api_base, model=args.model, xargs=xargs,
                              max_tokens=args.max_tokens, concurrency=args.concurrency, api_key=args.api_key,
                              timeout=args.timeout, tokenizer=tok, max_context_len=args.max_context_len,
                              n_tokens_per_image=args.tokens_per_image, progress=progress)
    else:
        from vllm import LLM

        kw: dict[str, Any] = {"model": args.model,
                              "limit_mm_per_prompt": {"image": max(1, max(t.max_images for t in tasks))}}
        if args.max_model_len:
            kw["max_model_len"] = args.max_model_len
        if not args.stock:
            kw["attention_backend"] = "madakv"
            kw["additional_config"] = {"madakv": json.loads(args.madakv_config) if args.madakv_config else {}}
        kw.update(json.loads(args.llm_kwargs) if args.llm_kwargs else {})
        llm = LLM(**kw)

        def generate(samples):
            return run_offline(samples, llm, xargs=xargs, max_tokens=args.max_tokens, batch_size=args.batch_size,
                               max_context_len=args.max_context_len, n_tokens_per_image=args.tokens_per_image,
                               progress=progress)

    res = run(tasks, generate, config=config, log=log)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(res, indent=2, default=str) + "\n")
    o = res["overall"]
    cats = "  ".join(f"{c}: {100 * v:.2f}" for c, v in o["categories"].items())
    log(f"overall (macro mean over {o['n_tasks']} tasks): {100 * o['score']:.2f}  {cats}  "
        f"samples={o['n_samples']} errors={o['n_errors']} -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
