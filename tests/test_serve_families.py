"""``vllm serve --attention-backend madakv`` with today's families, through the OpenAI API: image
chats on a hybrid (Gemma 3: sliding-window layers beside global ones) and on a plain family
(Qwen2.5-VL), a video chat (Qwen2.5-VL: an mp4 data URL that vLLM decodes with OpenCV) and audio
chats (Qwen2-Audio: a WAV as an ``input_audio`` part and as an ``audio_url`` data URL). Each answers
200, is compressed at budget 0.2 (pages go back to the pool) and its medium's tokens are counted
as that modality in madakv's metrics."""

import json

import pytest

from madakv_eval import zoo
from madakv_eval.prompts import words
from madakv_eval.serve import free_port, image_data_url, labelled_metrics, serve

pytestmark = pytest.mark.slow


def media_parts(family, modality: str, seed: int) -> list[dict]:
    """Every way the OpenAI API takes one item of ``modality``."""
    if modality == "image":
        return [{"type": "image_url", "image_url": {"url": image_data_url(seed)}}]
    if modality == "video":
        return [{"type": "video_url", "video_url": {"url": family.module.video_data_url(seed)}}]
    if modality == "audio":
        return [{"type": "input_audio", "input_audio": {"data": family.module.wav_base64(seed), "format": "wav"}},
                {"type": "audio_url", "audio_url": {"url": family.module.audio_data_url(seed)}}]
    raise ValueError(modality)


@pytest.fixture(scope="module", params=["gemma3", "qwen2_5_vl", "qwen2_audio"])
def server(request, tmp_path_factory):
    family = zoo.family(request.param)
    root = tmp_path_factory.mktemp(f"serve-{family.name}")
    path = family.module.build(root / f"tiny-{family.name}", seed=0)
    port = free_port()
    args = ["--attention-backend", "madakv", "--additional-config", json.dumps({"madakv": {"budget": 0.2}}),
            "--max-model-len", "4096", "--block-size", "32", "--enforce-eager", "--dtype", family.dtype,
            "--limit-mm-per-prompt", json.dumps({m: 2 for m in family.modalities})]
    with serve(path, port, *args, env={"VLLM_ENABLE_V1_MULTIPROCESSING": "1"}, log=root / "serve.log"):
        yield family, port, str(path)


def test_every_medium_is_served_compressed_and_counted_as_its_modality(server):
    from openai import OpenAI

    family, port, model = server
    client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="EMPTY", max_retries=0)
    for modality in family.modalities:
        for i, part in enumerate(media_parts(family, modality, seed=3)):
            before = labelled_metrics(port)
            content = [{"type": "text", "text": words(300, i)}, part, {"type": "text", "text": words(300, i + 1)}]
            resp = client.chat.completions.create(model=model, messages=[{"role": "user", "content": content}],
                                                  max_tokens=8, temperature=0)
            assert resp.usage.completion_tokens == 8 or resp.choices[0].finish_reason == "stop"
            assert resp.usage.prompt_tokens > 600
            after = labelled_metrics(port)

            def delta(name, **labels):
                key = (name, frozenset(labels.items()))
                return after.get(key, 0.0) - before.get(key, 0.0)

            assert delta("madakv:kv_pages_freed_total") > 0, part["type"]
            seen = sum(delta(f"madakv:tokens_{what}_total", event="prompt", modality=modality)
                       for what in ("kept", "evicted"))
            assert seen > 0, f"no {modality} tokens counted for a {part['type']} part"
