"""Prompt builders for the tiny models: interleaved text and media (images, videos, audio clips),
a filler-word generator."""

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


def make_video(seed: int, frames: int = 4, size: int = 64):
    """uint8 [frames, size, size, 3]: ``make_image``'s pattern drifting one pixel per frame."""
    import numpy as np

    base = np.asarray(make_image(seed, size + frames))
    return np.stack([base[t : t + size, t : t + size] for t in range(frames)])


def make_audio(seed: int, seconds: float = 1.0, rate: int = 16000):
    """(float32 samples in [-1, 1], sample rate): two tones and seeded noise."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    noise = np.random.default_rng(seed).standard_normal(t.size)
    wave = 0.4 * np.sin(2 * np.pi * (220 + 20 * seed) * t) + 0.2 * np.sin(2 * np.pi * 660 * t) + 0.05 * noise
    return wave.astype(np.float32), rate


def make_media(modality: str, seed: int):
    """One item of ``modality`` ("image", "video", "audio") as vLLM's ``multi_modal_data`` takes it."""
    return {"image": make_image, "video": make_video, "audio": make_audio}[modality](seed)
