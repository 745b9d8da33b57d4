"""Modality provenance: which modality each prompt token belongs to.

Built from vLLM's multimodal placeholders (``MultiModalFeatureSpec.mm_position``,
a ``PlaceholderRange(offset, length, is_embed)``), but kept free of vLLM types so
it is testable with plain tuples. Tokens inside a placeholder whose ``is_embed``
mask is False (e.g. separators a processor puts around an image) count as text,
as do all tokens outside placeholders.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch

from madakv_vllm.config import MODALITY_IDS, TEXT


def modality_id(name: str) -> int:
    """Map a vLLM modality name ('image', 'video', 'audio', 'image_embeds', ...) to an id."""
    for key, mid in MODALITY_IDS.items():
        if name == key or name.startswith(key):
            return mid
    raise ValueError(f"unknown modality {name!r}; known: {sorted(MODALITY_IDS)}")


def modality_array(num_tokens: int, spans: Iterable[Any]) -> torch.Tensor:
    """int8 tensor [num_tokens] of modality ids.

    ``spans``: vLLM ``MultiModalFeatureSpec`` objects, or tuples
    ``(modality, offset, length[, is_embed])``.
    """
    out = torch.full((num_tokens,), TEXT, dtype=torch.int8)
    for span in spans:
        if isinstance(span, tuple):
            name, offset, length, *rest = span
            is_embed = rest[0] if rest else None
        else:
            name, pos = span.modality, span.mm_position
            offset, length, is_embed = pos.offset, pos.length, pos.is_embed
        mid = modality_id(name)
        end = min(offset + length, num_tokens)
        if offset >= end:
            continue
        if is_embed is None:
            out[offset:end] = mid
        else:
            mask = torch.as_tensor(is_embed, dtype=torch.bool)[: end - offset]
            seg = out[offset:end]
            seg[mask] = mid
    return out
