"""Modality provenance from placeholder ranges."""

import pytest
import torch

from madakv_vllm.config import AUDIO, IMAGE, TEXT, VIDEO
from madakv_vllm.modality import modality_array, modality_id


def test_text_only():
    assert torch.equal(modality_array(5, []), torch.zeros(5, dtype=torch.int8))


@pytest.mark.parametrize("offset", [0, 7, 16])  # start, middle, end of a 20-token prompt
def test_one_image_anywhere(offset):
    m = modality_array(20, [("image", offset, 4)])
    expect = torch.zeros(20, dtype=torch.int8)
    expect[offset : offset + 4] = IMAGE
    assert torch.equal(m, expect)


def test_several_modalities_and_is_embed_mask():
    m = modality_array(
        16,
        [("image", 1, 3), ("video", 5, 4, [False, True, True, False]), ("audio", 12, 2), ("image", 14, 2)],
    )
    assert m.tolist() == [TEXT, IMAGE, IMAGE, IMAGE, TEXT, TEXT, VIDEO, VIDEO, TEXT, TEXT, TEXT, TEXT, AUDIO, AUDIO, IMAGE, IMAGE]


def test_names():
    assert modality_id("image_embeds") == IMAGE
    with pytest.raises(ValueError):
        modality_id("smell")
