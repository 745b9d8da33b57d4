"""Tiny random-weight builds of the VLM families vLLM users serve, one module per family.

No weights can be downloaded where this project runs, so each family is built locally the way
``madakv_eval.tiny_models`` builds ours: its Hugging Face config at a tiny geometry, seeded random
weights, a tokenizer trained here that holds every special token its processor looks up, and its
processor config. The model matrix (tests/test_model_matrix.py) runs each through vLLM, stock and
with ``--attention-backend madakv``.

Every family module provides:

* ``build(out_dir: Path, *, seed: int = 0) -> Path``: the model directory (deterministic);
* ``prompt(parts: list) -> dict``: a vLLM prompt (``{"prompt": ..., "multi_modal_data": ...}``) in
  the model's chat format; ``parts`` holds text (``str``) and media items ``("image", seed)``,
  ``("video", seed)`` or ``("audio", seed)`` (``madakv_eval.prompts`` makes them), in order;
* ``embed_token_ids(tokenizer) -> dict[str, int]``: per modality, the placeholder token id whose
  positions the media's embeddings fill (what madakv counts as that modality; separators around
  them are text).
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from types import ModuleType


@dataclass(frozen=True)
class TinyFamily:
    name: str  # short name, also the module's: madakv_eval.zoo.<name>
    architecture: str  # the vLLM architecture the build loads as
    attention: tuple[str, ...]  # its decoder layers' kinds: "full", "sliding_window", "chunked_local", "linear"
    modalities: tuple[str, ...]  # what it takes besides text: "image", "video", "audio"
    dtype: str = "float32"  # the dtype vLLM's CPU platform serves it in
    engine_kwargs: dict = field(default_factory=dict)  # extra ``vllm.LLM`` arguments it needs
    stock_cpu_error: str | None = None  # stock vLLM 0.32's own error where its CPU platform cannot serve it

    @property
    def module(self) -> ModuleType:
        return importlib.import_module(f"{__name__}.{self.name}")

    @property
    def is_hybrid(self) -> bool:
        return self.attention != ("full",)


#: Every family built here, in the README's model table order.
FAMILY_NAMES = ("qwen2_5_vl", "qwen3_vl", "qwen3_vl_moe", "internvl", "llava_onevision", "idefics3", "mistral3",
                "qwen2_audio", "qwen2_5_omni", "gemma3", "qwen3_5", "llama4")


def family(name: str) -> TinyFamily:
    return importlib.import_module(f"{__name__}.{name}").FAMILY
