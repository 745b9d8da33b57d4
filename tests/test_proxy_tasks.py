"""Synthetic proxy tasks (madakv_eval/proxy_tasks.py) and, when the trained assets are present,
the proxy VLM rebuilt from them (scripts/assets/proxy_vlm/) answering through vLLM.

Generators: determinism, where the needles are (never inside the observation window), answers
(K distinct single-token words, consistent with the pictures), prompt lengths, and that the token
count the generators predict is what the model's processor produces. Trained model (skipped
unless the assets were trained on the current task set): compact deterministic rebuild, and,
through vLLM, answers that depend on what the compressed cache still holds.
"""

from __future__ import annotations

import hashlib
from collections import Counter

import pytest

from madakv_eval import proxy_tasks as pt

EVAL_IMAGES = (24, 64)  # scripts/eval_proxy.py


@pytest.fixture(scope="module")
def proxy_skeleton(tmp_path_factory):
    """A random-weight model with the proxy geometry: the same tokenizer and processor."""
    from madakv_eval.tiny_models import build_model

    return build_model(pt.PROXY_KIND, tmp_path_factory.mktemp("proxy") / "skeleton", seed=0,
                       **pt.PROXY_GEOMETRY)


@pytest.fixture(scope="module")
def tokenizer(proxy_skeleton):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(proxy_skeleton))


def _key(s: pt.Sample):
    return (s.task, s.seed, s.n_images, s.parts, s.answer, s.needle_slots, s.needle_part)


# --------------------------------------------------------------------------- generators
def test_samples_are_deterministic():
    a = pt.make_dataset(pt.TASKS, 5, EVAL_IMAGES, split="eval")
    b = pt.make_dataset(pt.TASKS, 5, EVAL_IMAGES, split="eval")
    assert [_key(x) for x in a] == [_key(x) for x in b]
    train = pt.make_dataset(pt.TASKS, 5, EVAL_IMAGES, split="train")
    assert not {s.seed for s in a} & {s.seed for s in train}
    assert [s.task for s in a[: len(pt.TASKS)]] == list(pt.TASKS)
    assert pt.sample_seed("eval", "comparison", 3) == pt.sample_seed("eval", "comparison", 3)
    assert pt.sample_seed("eval", "comparison", 3) != pt.sample_seed("eval", "comparison", 4)
    # images: same spec -> same pixels (rendered, not cached, the second time)
    spec = pt.ImageSpec("blue", 1, "checker")
    img = pt.render_image(spec)
    pt.render_image.cache_clear()
    assert img.tobytes() == pt.render_image(spec).tobytes()
    assert img.size == (pt.IMAGE_SIZE, pt.IMAGE_SIZE)


@pytest.mark.parametrize("task", pt.TASKS)
def test_needles_and_answers(task):
    import numpy as np

    k = pt.CODE_LEN[task]
    for i in range(40):
        n = 8 + i % 30
        s = pt.make_sample(task, pt.sample_seed("unit", task, i), n)
        assert len(s.answer) == k and set(s.answer) <= set(pt.ANSWERS[task])
        if task != "comparison":
            assert len(set(s.answer)) == k  # distinct words
        assert len(s.images) == n
        assert all(0 <= j < n - pt.PROTECTED_TAIL for j in s.needle_slots)
        assert s.parts[-1] == "\n" + pt.QUESTIONS[task]
        coloured = [j for j, im in enumerate(s.images) if im.is_colour]
        if task == "text_needle":
            assert coloured == [] and len(s.needle_slots) == 1
            assert s.parts[s.needle_part] == pt.NEEDLE_TEMPLATE.format(value=" ".join(s.answer)) + " "
            # the needle sentence comes right before image slot needle_slots[0]
            before = sum(isinstance(p, pt.ImageSpec) for p in s.parts[: s.needle_part])
            assert before == s.needle_slots[0]
            text = "".join(p for p in s.parts if isinstance(p, str))
            assert all(text.count(" " + w) == 1 for w in s.answer)  # the code appears nowhere else
        elif task == "comparison":
            # two coloured images, not adjacent; answer: their colours in order, then the verdict
            assert tuple(coloured) == s.needle_slots and len(coloured) == 2
            assert s.needle_slots[1] - s.needle_slots[0] >= 2
            assert s.parts[s.needle_part] is s.images[s.needle_slots[0]]
            assert tuple(s.images[j].colour for j in coloured) == s.answer[:2]
            assert s.answer[2] == (pt.SAME if s.answer[0] == s.answer[1] else pt.NOT_SAME)
            assert s.answer[0] in pt.COLOURS and s.answer[1] in pt.COLOURS
        else:
            # a contiguous strip of K coloured images (no text between them), colours in order
            assert tuple(coloured) == s.needle_slots == tuple(range(s.needle_slots[0], s.needle_slots[0] + k))
            assert s.parts[s.needle_part] is s.images[s.needle_slots[0]]
            strip = s.parts[s.needle_part: s.needle_part + k]
            assert all(isinstance(p, pt.ImageSpec) for p in strip)
            assert tuple(p.colour for p in strip) == s.answer
        for im in s.images:  # grey images have r == g == b; coloured ones do not
            px = np.asarray(pt.render_image(im)).reshape(-1, 3).astype(int)
            grey = bool((px[:, 0] == px[:, 1]).all() and (px[:, 1] == px[:, 2]).all())
            assert grey == (not im.is_colour)


def test_answer_balance():
    ds = pt.make_dataset(pt.TASKS, 120, EVAL_IMAGES, split="eval")
    for task in pt.TASKS:
        first = Counter(s.answer[0] for s in ds if s.task == task)
        first_words = pt.COLOURS if task == "comparison" else pt.ANSWERS[task]
        assert set(first) == set(first_words)  # every word can come first (uniform draws)
        assert max(first.values()) / 120 < 0.4
        words = Counter(w for s in ds if s.task == task for w in s.answer)
        assert set(words) == set(pt.ANSWERS[task])
    verdicts = Counter(s.answer[2] for s in ds if s.task == "comparison")
    assert min(verdicts.values()) / 120 > 0.35  # "same" about half the time
    gaps = [s.needle_slots[1] - s.needle_slots[0] for s in ds if s.task == "comparison"]
    assert min(gaps) >= 2 and max(gaps) > 20  # far apart, at random depths
    depth = [s.needle_slots[0] / s.n_images for s in ds]
    assert min(depth) < 0.1 and max(depth) > 0.75  # needles at every depth


def test_bad_arguments():
    with pytest.raises(ValueError):
        pt.make_sample("nope", 0, 10)
    with pytest.raises(ValueError):
        pt.make_sample("image_needle", 0, pt.PROTECTED_TAIL + pt.CODE_LEN["image_needle"] - 1)
    pt.make_sample("image_needle", 0, pt.CODE_LEN["image_needle"], protected_tail=0)  # curriculum
    pt.make_sample("text_needle", 0, 1, protected_tail=0)
    with pytest.raises(ValueError):
        pt.make_sample("image_needle", 0, 30, code_len=len(pt.COLOURS) + 1)  # colours are distinct
    assert len(pt.make_sample("text_needle", 0, 30, code_len=12).answer) == 12  # training lengths
    with pytest.raises(ValueError):
        pt.make_sample("comparison", 0, 30, code_len=2)  # always 2 colours + verdict
    with pytest.raises(ValueError):
        pt.make_sample("comparison", 0, 2, protected_tail=0)  # needs a gap between the images
    assert pt.make_sample("comparison", 0, 3, protected_tail=0).needle_slots == (0, 2)


def test_answers_are_single_tokens(tokenizer):
    ids = pt.answer_token_ids(tokenizer)
    words = {w for v in pt.ANSWERS.values() for w in v}  # comparison reuses the colours
    assert len(set(ids.values())) == len(ids) == len(words)
    s = pt.make_sample("text_needle", 3, 30)
    assert pt.target_token_ids(s, tokenizer) == [pt.sep_token_id(tokenizer)] + [ids[w] for w in s.answer]


def test_lengths_and_positions(tokenizer):
    ds = pt.make_dataset(pt.TASKS, 10, EVAL_IMAGES, split="eval")
    lens = []
    for s in ds:
        ids = pt.prompt_token_ids(s, tokenizer)
        n = len(ids)
        lens.append(n)
        pos = pt.needle_token_positions(s, tokenizer)
        assert pos, s.task
        assert max(pos) < n - 32  # outside the default 32-token observation window
        assert min(pos) > 10  # after the system prompt
        if s.task == "text_needle":
            assert len(pos) == pt.CODE_LEN[s.task]
            assert pos == list(range(pos[0], pos[0] + len(pos)))  # the code is contiguous
        else:
            img = tokenizer.convert_tokens_to_ids("<|image_pad|>")
            assert len(pos) == pt.TOKENS_PER_IMAGE * pt.needle_images(s.task)
            assert all(ids[p] == img for p in pos)
        assert tokenizer.decode(ids[-8:]).endswith("assistant\nAnswer")
        assert pt.prompt_token_ids(s, tokenizer, with_answer=True) == ids + pt.target_token_ids(s, tokenizer)
        assert sum(t == tokenizer.convert_tokens_to_ids("<|image_pad|>") for t in ids) == 9 * s.n_images
    # several hundred to a few thousand tokens, so budgets 0.5 ... 0.05 all evict
    assert 400 <= min(lens) and max(lens) <= 2000 and max(lens) > 1000


def test_token_count_matches_processor(proxy_skeleton, tokenizer):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(str(proxy_skeleton))
    s = pt.make_sample("image_needle", 7, 12)
    enc = proc(text=[pt.prompt_text(s)], images=[pt.render_image(x) for x in s.images], return_tensors="pt")
    assert enc["input_ids"][0].tolist() == pt.prompt_token_ids(s, tokenizer)
    batch = pt.HFBatcher(proc)([s], with_answer=False)
    assert batch["input_ids"].tolist() == enc["input_ids"].tolist()
    assert batch["pixel_values"].shape == enc["pixel_values"].shape
    assert (batch["pixel_values"] == enc["pixel_values"]).all()


# --------------------------------------------------------------------------- trained model
ASSETS = pt.default_assets_dir()
needs_assets = pytest.mark.skipif(
    not (ASSETS / pt.ASSET_WEIGHTS).is_file(), reason="no trained proxy assets (scripts/train_proxy_vlm.py)"
)


def _assets_tasks():
    import json

    try:
        return json.loads((ASSETS / pt.ASSET_INFO).read_text()).get("tasks")
    except OSError:
        return None


#: The vLLM answer check needs assets trained on the current task set (proxy_vlm.json "tasks").
needs_current_assets = pytest.mark.skipif(
    _assets_tasks() != list(pt.TASKS), reason="proxy assets missing or trained on another task set"
)


@pytest.fixture(scope="module")
def proxy_model(tmp_path_factory):
    return pt.rebuild_proxy_model(tmp_path_factory.mktemp("proxy") / "proxy-vlm", ASSETS)


@needs_assets
def test_assets_are_compact_and_rebuild_is_deterministic(proxy_model, tmp_path):
    assert (ASSETS / pt.ASSET_WEIGHTS).stat().st_size < 6 * 2**20
    again = pt.rebuild_proxy_model(tmp_path / "again", ASSETS)
    digest = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(again) == digest(proxy_model)


@needs_assets
@needs_current_assets
def test_rebuilt_model_through_vllm_reads_the_compressed_cache(proxy_model):
    """End to end through vLLM with the madakv backend: ``:`` comes from the prefill pass under
    every policy; with the full cache the trained model answers every held-out prompt exactly
    (all K answer tokens, greedy); a per-request StreamingLLM at budget 0.05 (needles evicted)
    changes the answer tokens of most samples, i.e. the decode steps really read the compressed
    cache."""
    from vllm import LLM, SamplingParams

    samples = pt.make_dataset(pt.TASKS, 6, (24, 40), split="test")
    llm = LLM(model=str(proxy_model), attention_backend="madakv",
              additional_config={"madakv": {"policy": "full"}}, enforce_eager=True, block_size=32,
              dtype="float32", seed=0, max_model_len=4096, max_num_batched_tokens=4096,
              limit_mm_per_prompt={"image": 40})
    try:
        tok = llm.get_tokenizer()
        prompts = [pt.vllm_prompt(s) for s in samples]

        def greedy(**x):
            return [SamplingParams(max_tokens=pt.CODE_LEN[s.task] + 1, temperature=0.0, ignore_eos=True,
                                   extra_args=x or None) for s in samples]

        full = llm.generate(prompts, greedy(), use_tqdm=False)
        evicted = llm.generate(prompts, greedy(madakv_policy="streamingllm", madakv_budget=0.05), use_tqdm=False)
    finally:
        del llm
    exact, changed = 0, 0
    for s, o, e in zip(samples, full, evicted):
        target = pt.target_token_ids(s, tok)
        assert o.outputs[0].token_ids[0] == target[0] == e.outputs[0].token_ids[0]  # ':' from prefill
        exact += list(o.outputs[0].token_ids) == target
        changed += list(o.outputs[0].token_ids[1:]) != list(e.outputs[0].token_ids[1:])
    assert exact == len(samples), exact  # full cache: every answer right
    assert changed >= len(samples) // 2, changed


# --------------------------------------------------------------------------- labelled images (v2)
LT = pt.LABEL_TASK


def test_labelled_task_is_deterministic_and_leaves_the_other_tasks_alone():
    a = pt.make_dataset(pt.ALL_TASKS, 5, EVAL_IMAGES, split="eval")
    b = pt.make_dataset(pt.ALL_TASKS, 5, EVAL_IMAGES, split="eval")
    assert [_key(x) for x in a] == [_key(x) for x in b]
    assert [s.task for s in a[: len(pt.ALL_TASKS)]] == list(pt.ALL_TASKS)
    assert pt.ALL_TASKS[: len(pt.TASKS)] == pt.TASKS and LT not in pt.TASKS
    old = pt.make_dataset(pt.TASKS, 5, EVAL_IMAGES, split="eval")
    assert [_key(x) for x in a if x.task != LT] == [_key(x) for x in old]  # same draws as before
    assert pt.CODE_LEN[LT] == 6 and set(pt.ANSWERS[LT]) == set(pt.LABEL_WORDS) | set(pt.COLOURS)


def test_labelled_needles_and_answers():
    k = pt.CODE_LEN[LT]
    for i in range(60):
        n = 8 + i % 40
        s = pt.make_sample(LT, pt.sample_seed("unit", LT, i), n)
        labels, colours, slots = s.meta["labels"], s.meta["colours"], s.meta["labelled_slots"]
        n_lab = k // 2 + pt.LABEL_DISTRACTORS
        assert len(s.answer) == k and len(labels) == len(set(labels)) == n_lab == len(slots)
        assert len(s.images) == n and list(slots) == sorted(slots)
        assert all(0 <= j < n - pt.PROTECTED_TAIL for j in slots)  # never in the protected tail
        assert s.parts[0] == s.meta["instruction"] and s.parts[-1] == "\n" + pt.QUESTIONS[LT]
        coloured = [j for j, im in enumerate(s.images) if im.is_colour]
        assert tuple(coloured) == slots  # exactly the labelled images have colour
        assert tuple(s.images[j].colour for j in slots) == colours
        asked, answer_colours = s.answer[0::2], s.answer[1::2]
        assert len(set(asked)) == k // 2 and set(asked) <= set(labels)
        assert set(answer_colours) <= set(pt.COLOURS)
        # each label right before its image; the answer colour is that image's colour
        for lab, slot in zip(labels, slots):
            idx = s.parts.index(pt.LABEL_TEMPLATE.format(label=lab))
            assert s.parts[idx + 1] is s.images[slot]
        for lab, col, slot in zip(asked, answer_colours, s.needle_slots):
            assert s.images[slot].colour == col and labels[slots.index(slot)] == lab
        assert s.parts[s.needle_part] == pt.LABEL_TEMPLATE.format(label=asked[0])
        # the instruction names the asked labels in answer order; labels occur nowhere else
        instr = s.meta["instruction"]
        assert [instr.index(" " + w) for w in asked] == sorted(instr.index(" " + w) for w in asked)
        text = "".join(p for p in s.parts if isinstance(p, str))
        for w in pt.LABEL_WORDS:
            assert text.count(" " + w + " ") + text.count(" " + w + ",") == (w in asked) + (w in labels)


def test_labelled_answer_balance():
    ds = [s for s in pt.make_dataset(pt.ALL_TASKS, 120, EVAL_IMAGES, split="eval") if s.task == LT]
    assert set(w for s in ds for w in s.answer[0::2]) == set(pt.LABEL_WORDS)
    assert set(w for s in ds for w in s.answer[1::2]) == set(pt.COLOURS)
    # the asked order is not the prompt order; colours may repeat (no elimination shortcut)
    in_order = sum(list(s.needle_slots) == sorted(s.needle_slots) for s in ds)
    assert 0.05 < in_order / len(ds) < 0.35
    assert any(len(set(s.answer[1::2])) < len(s.answer[1::2]) for s in ds)
    depth = [min(s.needle_slots) / s.n_images for s in ds] + [max(s.needle_slots) / s.n_images for s in ds]
    assert min(depth) < 0.1 and max(depth) > 0.75


def test_labelled_bad_arguments():
    with pytest.raises(ValueError):
        pt.make_sample(LT, 0, 30, code_len=5)  # label + colour pairs
    with pytest.raises(ValueError):
        pt.make_sample(LT, 0, 30, code_len=2 * len(pt.LABEL_WORDS))  # not enough distinct labels
    n_lab = pt.CODE_LEN[LT] // 2 + pt.LABEL_DISTRACTORS
    with pytest.raises(ValueError):
        pt.make_sample(LT, 0, n_lab + pt.PROTECTED_TAIL - 1)
    assert pt.needle_room(LT) == n_lab and pt.needle_images(LT) == pt.CODE_LEN[LT] // 2
    s = pt.make_sample(LT, 0, 3, protected_tail=0, code_len=2)  # the shortest training sample
    assert len(s.answer) == 2 and s.meta["labelled_slots"] == (0, 1, 2)


def test_labelled_tokens_and_positions(tokenizer):
    ids_of = pt.answer_token_ids(tokenizer, LT)  # raises unless every label / colour is one token
    assert set(ids_of) == set(pt.LABEL_WORDS) | set(pt.COLOURS)
    img = tokenizer.convert_tokens_to_ids("<|image_pad|>")
    ds = [s for s in pt.make_dataset(pt.ALL_TASKS, 15, EVAL_IMAGES, split="eval") if s.task == LT]
    for s in ds:
        ids = pt.prompt_token_ids(s, tokenizer)
        n = len(ids)
        assert 400 <= n <= 2000
        pos = pt.needle_token_positions(s, tokenizer)
        n_ask = len(s.answer) // 2
        assert len(pos) == n_ask * (2 + pt.TOKENS_PER_IMAGE)  # label in instruction + before image, image
        assert max(pos) < n - 32  # label and image both outside the 32-token observation window
        assert min(pos) > 10  # after the system prompt
        text_pos = [p for p in pos if ids[p] != img]
        assert sorted(ids[p] for p in text_pos) == sorted(2 * [ids_of[w] for w in s.answer[0::2]])
        assert sum(ids[p] == img for p in pos) == pt.TOKENS_PER_IMAGE * n_ask
        assert tokenizer.decode(ids[-8:]).endswith("assistant\nAnswer")
        target = pt.target_token_ids(s, tokenizer)
        assert target == [pt.sep_token_id(tokenizer)] + [ids_of[w] for w in s.answer]
        assert pt.prompt_token_ids(s, tokenizer, with_answer=True) == ids + target
        tail = tokenizer.decode(ids[-32:])
        assert not any(" " + w in tail for w in pt.LABEL_WORDS)  # no label inside the window


ASSETS_V2 = pt.default_assets_dir("v2")


@pytest.mark.skipif(not (ASSETS_V2 / pt.ASSET_WEIGHTS).is_file(), reason="no proxy v2 assets")
def test_v2_assets_are_compact_and_rebuild_is_deterministic(tmp_path):
    import json

    info = json.loads((ASSETS_V2 / pt.ASSET_INFO).read_text())
    assert info["tasks"] == list(pt.ALL_TASKS) and info["geometry"] == pt.PROXY_GEOMETRY_V2
    assert (ASSETS_V2 / pt.ASSET_WEIGHTS).stat().st_size < 15 * 2**20
    a = pt.rebuild_proxy_model(tmp_path / "a", ASSETS_V2)
    b = pt.rebuild_proxy_model(tmp_path / "b", ASSETS_V2)
    digest = lambda d: hashlib.sha256((d / "model.safetensors").read_bytes()).hexdigest()  # noqa: E731
    assert digest(a) == digest(b)
    assert json.loads((a / pt.MODEL_INFO).read_text())["tasks"] == list(pt.ALL_TASKS)


@pytest.mark.skipif(not (ASSETS_V2 / pt.ASSET_WEIGHTS).is_file(), reason="no proxy v2 assets")
def test_v2_assets_are_what_their_recorded_step_based_run_wrote():
    """The committed weights are the last stage's checkpoint of the run logged beside them, and
    that run is step-based (no wall-time limit decided where a stage ended), so rerunning its
    command reproduces them; every stage's sha256 is logged for comparing a rerun stage by stage."""
    import json

    info = json.loads((ASSETS_V2 / pt.ASSET_INFO).read_text())
    training = info["training"]
    assert "init_from" not in training and "previous_phases" not in info  # one run, from scratch
    # stopped_early may be set: there the step limit (not the clock) cut a const stage
    assert training["max_steps"] is not None and training["finished"]
    assert "--max-steps" in training["command"] and "--geometry v2" in training["command"]
    stages = training["stages"]
    assert sum(s["steps"] for s in stages) == training["steps"] <= training["max_steps"]
    assert all(len(s["weights_sha256"]) == 64 for s in stages)
    weights = (ASSETS_V2 / pt.ASSET_WEIGHTS).read_bytes()
    assert hashlib.sha256(weights).hexdigest() == stages[-1]["weights_sha256"]
