"""Prompt builders for the tiny models: interleaved text and images, a filler-word generator."""

from __future__ import annotations


IMAGE_PROMPT = {"llava": "<image>\n", "qwen2vl": "<|vision_start|><|image_pad|><|vision_end|>"}
IMAGE_TOKEN = {"llava": "<image>", "qwen2vl": "<|image_pad|>"}


def make_image(seed: int, size: int = 64):
    from PIL import Image

    img = Image.new("RGB", (size, size))
    px = img.load()
    for x in range(size):
        for y in range(size):
            px[x, y] = ((x * 7 + seed * 31) % 256, (y * 5 + seed * 17) % 256, (x * y + seed) % 256)
    return img


def words(n: int, seed: int = 0) -> str:
    vocab = "the cat sat on a mat while red birds sang over green hills and blue rivers ran to sea".split()
    return " ".join(vocab[(i * 7 + seed * 3) % len(vocab)] for i in range(n))


def mm_prompt(kind: str, parts: list) -> dict:
    """parts: strings (text) and ints (an image with that seed), in order."""
    text, images = "", []
    for p in parts:
        if isinstance(p, int):
            text += IMAGE_PROMPT[kind]
            images.append(make_image(p))
        else:
            text += p
    if kind == "llava":
        text = "USER: " + text + "\nASSISTANT:"
    else:
        text = "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
    prompt = {"prompt": text}
    if images:
        prompt["multi_modal_data"] = {"image": images}
    return prompt
