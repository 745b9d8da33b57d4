"""Write a tiny fake MileBench dataset (same layout and JSON schema as the real one).

    python scripts/make_fake_milebench.py OUT_DIR [--samples 3]

Three tasks, named after real MileBench tasks so that scoring dispatch and categories behave as
on the real data:

* ``ObjectShuffle``          -- multi-choice (accuracy), Realistic Temporal
* ``IEdit``                  -- open-ended (ROUGE-L), Realistic Semantic
* ``TextNeedleInAHaystack``  -- needle (exact token match), Diagnostic

Each task gets ``OUT_DIR/<Task>/<Task>.json`` and ``OUT_DIR/<Task>/images/sample_<i>/<k>.png``
(small deterministic PNGs, 2 to 4 per sample). The text is made up; nothing here is MileBench data.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

TASKS = ("ObjectShuffle", "IEdit", "TextNeedleInAHaystack")

_COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
_PLACES = ["left cup", "middle box", "right bowl", "back tray"]


def _png(path: Path, seed: int, w: int = 48, h: int = 40) -> None:
    from PIL import Image

    img = Image.new("RGB", (w, h))
    px = img.load()
    for x in range(w):
        for y in range(h):
            px[x, y] = ((x * 9 + seed * 37) % 256, (y * 11 + seed * 23) % 256, ((x ^ y) * 5 + seed) % 256)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG")


def _level(n_images: int) -> str:
    return "Few" if n_images <= 2 else "Medium" if n_images <= 3 else "Many"


def _write(root: Path, task: str, question_type: str, instructions: list[str], samples: list[dict]) -> Path:
    d = root / task
    d.mkdir(parents=True, exist_ok=True)
    ann = {
        "meta_data": {
            "dataset": task,
            "split": "test",
            "num_sample": len(samples),
            "task_instruction": instructions,
            "question_type": question_type,
            "note": "fake data written by scripts/make_fake_milebench.py",
        },
        "data": samples,
    }
    p = d / f"{task}.json"
    p.write_text(json.dumps(ann, indent=2) + "\n")
    return p


def _images(root: Path, task: str, sid: int, n: int, seed: int) -> list[str]:
    rel = [f"sample_{sid}/{k}.png" for k in range(n)]
    for k, r in enumerate(rel):
        _png(root / task / "images" / r, seed=seed * 10 + k)
    return rel


def make_fake_milebench(out_dir: str | Path, samples: int = 3) -> Path:
    """Write the three fake tasks under ``out_dir``; returns ``out_dir``."""
    root = Path(out_dir)
    root.mkdir(parents=True, exist_ok=True)

    # multi-choice: the response is one of choice_list (MileBench's evaluate.py asserts it)
    mc = []
    for i in range(samples):
        n = 3 + i % 2
        ctx = "".join("Frame %d: {image#%d} " % (k + 1, k + 1) for k in range(n))
        ctx += "After the cups are shuffled, where is the ball?"
        mc.append({
            "sample_id": i,
            "task_instruction_id": i % 2,
            "task_instance": {
                "context": ctx,
                "images_path": _images(root, "ObjectShuffle", i, n, seed=i),
                "choice_list": list(_PLACES),
            },
            "response": _PLACES[(i * 3 + 1) % len(_PLACES)],
            "image_quantity_level": _level(n),
        })
    _write(root, "ObjectShuffle", "multi-choice", [
        "You are given frames of a video in which a ball is hidden under one of several containers.",
        "Watch the frames in order and pick the container that holds the ball at the end.",
    ], mc)

    # open-ended: ROUGE-L against a short sentence
    oe = []
    for i in range(samples):
        a, b = _COLORS[i % len(_COLORS)], _COLORS[(i + 2) % len(_COLORS)]
        oe.append({
            "sample_id": i,
            "task_instruction_id": 0,
            "task_instance": {
                "context": "Source image: {image#1} Edited image: {image#2} "
                           "Describe the edit that turns the source image into the edited one.",
                "images_path": _images(root, "IEdit", i, 2, seed=100 + i),
            },
            "response": f"change the {a} square to {b}",
            "image_quantity_level": "Few",
        })
    _write(root, "IEdit", "open-ended", [
        "Given a source image and an edited image, describe the edit in one short sentence.",
    ], oe)

    # needle: the password is hidden in the text between images; one-word answer
    nd = []
    filler = "The hills were green and the rivers ran to the sea. "
    for i in range(samples):
        n = 2 + i % 3
        password = str(4000 + 137 * i)
        parts = []
        for k in range(n):
            parts.append(filler * 2 + "{image#%d} " % (k + 1))
            if k == n // 2:
                parts.append(f"The secret password is {password}. ")
        nd.append({
            "sample_id": i,
            "task_instruction_id": 0,
            "task_instance": {
                "context": "".join(parts) + "What is the secret password?",
                "images_path": _images(root, "TextNeedleInAHaystack", i, n, seed=200 + i),
            },
            "response": password,
            "image_quantity_level": _level(n),
        })
    _write(root, "TextNeedleInAHaystack", "open-ended", [
        "Read the interleaved text and images and answer the question with the exact value asked for.",
    ], nd)
    return root


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir")
    ap.add_argument("--samples", type=int, default=3, help="samples per task")
    args = ap.parse_args(argv)
    root = make_fake_milebench(args.out_dir, args.samples)
    print(f"wrote {', '.join(TASKS)} under {root}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
