"""Shared-prefix question groups (madakv_eval/shared_prefix.py, scripts/eval_prefix_reuse.py): the
requests of a group have identical token ids up to their question (image placeholders included),
the same images, and needles that lie in the shared prefix and differ between questions. Fast: no
engine, the proxy tokenizer of a random-weight skeleton."""

from __future__ import annotations

import pytest

from madakv_eval import proxy_tasks as pt
from madakv_eval import shared_prefix as sp


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from transformers import AutoTokenizer

    from madakv_eval.tiny_models import build_model

    path = build_model(pt.PROXY_KIND, tmp_path_factory.mktemp("proxy") / "skeleton", seed=0, **pt.PROXY_GEOMETRY)
    return AutoTokenizer.from_pretrained(str(path))


def test_groups_are_deterministic_and_splits_differ():
    a = sp.make_groups(sp.GROUP_KINDS, 3, "dev")
    b = sp.make_groups(sp.GROUP_KINDS, 3, "dev")
    assert [(g.kind, g.seed, g.context, [q.answer for q in g.questions]) for g in a] == \
           [(g.kind, g.seed, g.context, [q.answer for q in g.questions]) for g in b]
    test = sp.make_groups(sp.GROUP_KINDS, 3, "test")
    assert not {g.seed for g in a} & {g.seed for g in test}


@pytest.mark.parametrize("kind", list(sp.GROUP_KINDS))
def test_token_prefix_is_shared_up_to_the_question(tokenizer, kind):
    img = tokenizer.convert_tokens_to_ids(pt.IMAGE_TOKEN[pt.PROXY_KIND])
    vision_end = tokenizer.convert_tokens_to_ids("<|vision_end|>")
    for g in sp.make_groups([kind], 6, "dev"):
        assert len(g.questions) >= 2
        ids = [pt.prompt_token_ids(q, tokenizer) for q in g.questions]
        L = sp.shared_prefix_len(ids)
        # the prefix is the chat header + the whole context, which ends with an image
        header = tokenizer.encode(pt.prompt_text(g.questions[0]).split("<|im_start|>user\n")[0] + "<|im_start|>user\n")
        context = "".join(pt.IMAGE_PROMPT[pt.PROXY_KIND].replace("<|image_pad|>", "<|image_pad|>" * pt.TOKENS_PER_IMAGE)
                          if isinstance(p, pt.ImageSpec) else p for p in g.context)
        expected = header + tokenizer.encode(context)
        assert ids[0][:len(expected)] == expected
        # ... and maybe the first tokens of the question's boilerplate ("\n", "Find the")
        assert len(expected) <= L < min(map(len, ids)), (L, len(expected))
        assert expected[-1] == vision_end
        assert all(sum(t == img for t in x[:L]) == pt.TOKENS_PER_IMAGE * len(g.questions[0].images) for x in ids)
        assert all(img not in x[L:] for x in ids)  # every image is in the shared prefix
        # the same images (vLLM's multimodal hashes, hence its prefix-cache block hashes, agree)
        assert len({tuple(q.images) for q in g.questions}) == 1
        # each question's needle lies in the shared prefix, and the questions need different tokens
        needles = []
        for q, x in zip(g.questions, ids):
            pos = [i for i in pt.needle_token_positions(q, tokenizer) if i < L]
            assert pos and (q.task == pt.LABEL_TASK or max(pt.needle_token_positions(q, tokenizer)) < L)
            needles.append(set(pos))
        assert needles[0] != needles[1]
        if kind == "labels":
            assert not set(g.questions[0].needle_slots) & set(g.questions[1].needle_slots)
            assert not set(g.questions[0].answer[0::2]) & set(g.questions[1].answer[0::2])


def test_question_order_rotates():
    firsts = [g.questions[0].task for g in sp.make_groups(["code+strip"], 4, "dev")]
    assert firsts == ["text_needle", "image_needle"] * 2


def test_shared_prefix_len():
    assert sp.shared_prefix_len([[1, 2, 3], [1, 2, 4], [1, 2]]) == 2
    assert sp.shared_prefix_len([[5], [6]]) == 0
