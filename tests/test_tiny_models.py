"""Tiny local models (madakv_eval.tiny_models): deterministic builds that stock vLLM 0.32 loads.

vLLM tests use the session-wide in-process engines of tests/conftest.py (one per model kind,
enforce_eager, VLLM_ENABLE_V1_MULTIPROCESSING=0), so the file runs in well under a minute.
"""

from __future__ import annotations

import os

# Before vLLM is imported anywhere: in-process engine (fast) and an explicit KV pool size (the
# CPU worker's NUMA memory check fails without it). setdefault lets CI override both.
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import base64  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from madakv_eval import tiny_models  # noqa: E402
from madakv_eval.tiny_models import KINDS, build_model, image_token_count  # noqa: E402

VLMS = ("llava", "qwen2vl")
MAX_TOKENS = 8

# sha256 of the trained BPE model (vocab + merges) from scripts/assets/tiny_tokenizer_corpus.txt.
# If this fails, the corpus or the `tokenizers` trainer changed: vocabularies would differ
# between machines. Update the constant only on purpose.
GOLDEN_TOKENIZER_MODEL_SHA256 = "724f89684856df8f943c340ad09d7b0be9fdfe54ed3a3e0666e4c58cf05163c9"
GOLDEN_VOCAB_SIZE = 776


def _tokenizer_model_sha(tokenizer_json_text: str) -> str:
    model = json.loads(tokenizer_json_text)["model"]
    return hashlib.sha256(json.dumps(model, sort_keys=True).encode()).hexdigest()


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _image(w: int, h: int, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8))


def _data_url(img: Image.Image) -> str:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@pytest.fixture(scope="session")
def tiny_model_dirs(model_dir) -> dict[str, Path]:
    """kind -> directory, built once per session by tests/conftest.py (seed 0, defaults)."""
    return {k: model_dir(k) for k in KINDS}


# --------------------------------------------------------------------------- environment
def test_setup_fixes_applied():
    """scripts/setup.sh traps 1 and 2: torchvision imports beside torch+cpu; `vllm` metadata."""
    import importlib.metadata as md

    import torch
    import torchvision
    from torchvision.ops import nms

    boxes = torch.tensor([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60.0]])
    assert nms(boxes, torch.tensor([0.9, 0.8, 0.7]), 0.5).tolist() == [0, 2]
    assert torchvision.__version__
    version = md.version("vllm")  # PackageNotFoundError without the metadata-only dist-info
    if torch.version.cuda is None:
        assert "cpu" in version, version
    from transformers import Qwen2VLImageProcessor  # noqa: F401  (imports torchvision)

    import vllm.model_executor.models.llava  # noqa: F401  (imports torchvision)


# --------------------------------------------------------------------------- building
def test_tokenizer_vocabulary_is_pinned():
    text = tiny_models.train_tokenizer_json()
    assert _tokenizer_model_sha(text) == GOLDEN_TOKENIZER_MODEL_SHA256
    vocab = json.loads(text)["model"]["vocab"]
    assert len(vocab) == GOLDEN_VOCAB_SIZE
    for i, tok in enumerate(tiny_models.SPECIAL_TOKENS):
        assert vocab[tok] == i


@pytest.mark.parametrize("kind", KINDS)
def test_build_is_deterministic(kind, tiny_model_dirs, tmp_path):
    again = build_model(kind, tmp_path / "again", seed=0)
    assert _tree_digest(again) == _tree_digest(tiny_model_dirs[kind])

    other = _tree_digest(build_model(kind, tmp_path / "seed1", seed=1))
    ref = _tree_digest(tiny_model_dirs[kind])
    assert other["model.safetensors"] != ref["model.safetensors"]
    assert other["tokenizer.json"] == ref["tokenizer.json"]


@pytest.mark.parametrize("kind", KINDS)
def test_build_layout(kind, tiny_model_dirs):
    from safetensors import safe_open

    d = tiny_model_dirs[kind]
    info = json.loads((d / "madakv_tiny_model.json").read_text())
    cfg = json.loads((d / "config.json").read_text())
    text_cfg = cfg.get("text_config", cfg)
    assert text_cfg["num_attention_heads"] == 4 and text_cfg["num_key_value_heads"] == 2
    assert text_cfg["max_position_embeddings"] == 32768
    assert text_cfg["vocab_size"] == info["vocab_size"] == GOLDEN_VOCAB_SIZE
    assert info["geometry"]["head_dim"] == 32
    with safe_open(str(d / "model.safetensors"), "pt") as f:
        keys = list(f.keys())
    if kind == "llava":
        # trap 4: vLLM expects the CLIP tower under vision_tower.vision_model.*
        tower = [k for k in keys if "vision_tower" in k]
        assert tower and all(k.startswith("model.vision_tower.vision_model.") for k in tower)
    if kind == "qwen2vl":
        section = text_cfg["rope_parameters"]["mrope_section"]
        assert sum(section) == 32 // 2 and len(section) == 3
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "config.json"):
        assert (d / name).is_file(), name
    if kind in VLMS:
        assert (d / "processor_config.json").is_file()


def test_geometry_overrides(tmp_path):
    d = build_model("llama", tmp_path / "big", layers=3, heads=8, kv_heads=4, head_dim=64,
                    max_pos=8192, dtype="float32")
    cfg = json.loads((d / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["num_attention_heads"], cfg["num_key_value_heads"],
            cfg["head_dim"], cfg["hidden_size"], cfg["max_position_embeddings"]) == (
        3, 8, 4, 64, 512, 8192)
    with pytest.raises(TypeError):
        build_model("llama", tmp_path / "bad", no_such_field=1)
    with pytest.raises(ValueError):
        build_model("qwen2", tmp_path / "bad", hidden=100)  # vLLM: head_dim = hidden // heads
    with pytest.raises(ValueError):
        build_model("nope", tmp_path / "bad")
    assert image_token_count("llava", image_size=128, patch_size=8) == 256


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_renders_image_placeholder(kind, tiny_model_dirs):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dirs[kind])
    msgs = [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:,"}},
        {"type": "text", "text": "What is in the image?"},
    ]}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    placeholder = {"llava": "<image>", "qwen2vl": "<|vision_start|><|image_pad|><|vision_end|>"}
    if kind in placeholder:
        assert text.count(placeholder[kind]) == 1, text
    else:
        assert "<image>" not in text and "<|image_pad|>" not in text
    assert "What is in the image?" in text
    plain = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                    add_generation_prompt=True)
    assert "Hi" in plain


@pytest.mark.parametrize(("kind", "size", "expected"), [
    ("llava", (64, 64), 64), ("llava", (200, 120), 64),
    ("qwen2vl", (112, 112), 16), ("qwen2vl", (224, 224), 64), ("qwen2vl", (56, 56), 16),
])
def test_hf_processor_placeholder_count(kind, size, expected, tiny_model_dirs):
    from transformers import AutoProcessor

    proc = AutoProcessor.from_pretrained(tiny_model_dirs[kind])
    assert image_token_count(kind, *size) == expected
    prompt = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]}],
        tokenize=False, add_generation_prompt=True)
    enc = proc(text=[prompt], images=[_image(*size)], return_tensors="pt")
    image_id = json.loads((tiny_model_dirs[kind] / "config.json").read_text())[
        "image_token_index" if kind == "llava" else "image_token_id"]
    assert int((enc["input_ids"][0] == image_id).sum()) == expected


# --------------------------------------------------------------------------- vLLM
@pytest.fixture(scope="module", params=KINDS)
def vllm_engine(request, engine):
    """(kind, LLM): the session-wide in-process engine of tests/conftest.py for this kind
    (enforce_eager, float32, one per kind, shared with the other test files). float32 matters
    here: random weights put the top logits only ~0.02 apart, and greedy tokens are compared
    with transformers."""
    return request.param, engine(request.param)


def _greedy():
    from vllm import SamplingParams

    return SamplingParams(max_tokens=MAX_TOKENS, temperature=0.0, ignore_eos=True)


def test_vllm_generate(vllm_engine):
    kind, llm = vllm_engine
    prompts = ["Hello, the picture shows", "USER: How many cats are there? ASSISTANT:"]
    first = llm.generate(prompts, _greedy(), use_tqdm=False)
    again = llm.generate(prompts[:1], _greedy(), use_tqdm=False)
    for out in first:
        assert len(out.outputs[0].token_ids) == MAX_TOKENS
        assert all(0 <= t < GOLDEN_VOCAB_SIZE for t in out.outputs[0].token_ids)
    assert list(again[0].outputs[0].token_ids) == list(first[0].outputs[0].token_ids)


def test_vllm_matches_transformers(vllm_engine):
    """Greedy tokens from vLLM equal transformers' on the same checkpoint (text + image for
    VLMs): checks that every weight, the LLaVA key rename and Qwen2-VL's M-RoPE load right."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor

    kind, llm = vllm_engine
    d = Path(llm.llm_engine.model_config.model)
    vlm = kind in VLMS
    content = ([{"type": "image"}] if vlm else []) + [{"type": "text", "text": "Describe it."}]
    proc = AutoProcessor.from_pretrained(d)  # a tokenizer for the text-only kinds
    prompt = proc.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                      add_generation_prompt=True)
    img = _image(112, 112, seed=3)
    if vlm:
        enc = proc(text=[prompt], images=[img], return_tensors="pt")
        model = AutoModelForImageTextToText.from_pretrained(d, dtype=torch.float32)
        request = {"prompt": prompt, "multi_modal_data": {"image": img}}
    else:
        enc = proc([prompt], return_tensors="pt", add_special_tokens=False)
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32)
        request = {"prompt_token_ids": enc["input_ids"][0].tolist()}
    with torch.no_grad():
        ref = model.generate(**enc, max_new_tokens=MAX_TOKENS, do_sample=False,
                             min_new_tokens=MAX_TOKENS)[0, enc["input_ids"].shape[1]:].tolist()
    out = llm.generate([request], _greedy(), use_tqdm=False)[0]
    assert list(out.prompt_token_ids) == enc["input_ids"][0].tolist()
    assert list(out.outputs[0].token_ids) == ref


def test_vllm_chat(vllm_engine):
    kind, llm = vllm_engine
    if kind in VLMS:
        size = (64, 64) if kind == "llava" else (112, 112)
        content = [
            {"type": "image_pil", "image_pil": _image(*size, seed=1)},
            {"type": "text", "text": "What is in the image?"},
        ]
    else:
        content = [{"type": "text", "text": "What is in the image?"}]
    out = llm.chat([{"role": "user", "content": content}], _greedy(), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
    bos = tiny_models.SPECIAL_TOKENS.index("<s>")
    n_bos = list(out.prompt_token_ids).count(bos)
    assert n_bos == (1 if kind in ("llava", "llama") else 0)  # template's bos, not doubled
    if n_bos:
        assert out.prompt_token_ids[0] == bos
    if kind in VLMS:
        cfg = json.loads((Path(llm.llm_engine.model_config.model) / "config.json").read_text())
        image_id = cfg["image_token_index" if kind == "llava" else "image_token_id"]
        n_image = sum(1 for t in out.prompt_token_ids if t == image_id)
        assert n_image == image_token_count(kind, *size), (kind, n_image)


def test_vllm_chat_openai_image_url(vllm_engine):
    """The OpenAI request shape the server sees: image_url parts with base64 data URLs.

    VLMs get two images; text-only models must refuse an image instead of dropping it."""
    kind, llm = vllm_engine
    url = _data_url(_image(224, 224, seed=2))
    msgs = [{"role": "user", "content": [
        {"type": "text", "text": "Compare the two images."},
        {"type": "image_url", "image_url": {"url": url}},
        {"type": "image_url", "image_url": {"url": url}},
    ]}]
    if kind not in VLMS:
        with pytest.raises(ValueError, match="not a multimodal model"):
            llm.chat(msgs, _greedy(), use_tqdm=False)
        return
    out = llm.chat(msgs, _greedy(), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == MAX_TOKENS
    cfg = json.loads((Path(llm.llm_engine.model_config.model) / "config.json").read_text())
    image_id = cfg["image_token_index" if kind == "llava" else "image_token_id"]
    n_image = sum(1 for t in out.prompt_token_ids if t == image_id)
    assert n_image == 2 * image_token_count(kind, 224, 224)
