"""Config validation: every knob, errors that name the field, YAML and additional_config sources."""

from pathlib import Path

import pytest

from madakv_vllm.config import MadaKVConfig, MadaKVConfigError, config_from_vllm, load_yaml, parse_config, request_overrides

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_match_method_note():
    c = MadaKVConfig()
    assert (c.policy, c.budget, c.window, c.kernel_size, c.theta, c.sinks) == ("madakv", 0.2, 32, 5, 0.99, 0)
    assert MadaKVConfig(policy="streamingllm").sinks == 4 and MadaKVConfig(policy="streamingllm", sink_tokens=0).sinks == 0
    assert c.mpa and c.hcc and c.head_floor == c.window


@pytest.mark.parametrize(
    "bad, field",
    [
        ({"budget": 1.5}, "madakv.budget"),
        ({"budget": 0}, "madakv.budget"),
        ({"budget": -3}, "madakv.budget"),
        ({"policy": "lru"}, "madakv.policy"),
        ({"window": 0}, "madakv.window"),
        ({"theta": 0.0}, "madakv.theta"),
        ({"theta": 1.5}, "madakv.theta"),
        ({"recompress_interval": -1}, "madakv.recompress_interval"),
        ({"budgt": 0.2}, "madakv.budgt"),
        ({"mpa": "maybe"}, "madakv.mpa"),
        ({"prefill_eviction": "early"}, "madakv.prefill_eviction"),
        ({"prefill_eviction": "chunked", "page_aligned": False}, "madakv.prefill_eviction"),
    ],
)
def test_invalid_values_name_the_field(bad, field):
    with pytest.raises(MadaKVConfigError) as e:
        parse_config(bad)
    assert field in str(e.value)


def test_budget_fraction_and_tokens():
    assert parse_config({"budget": 0.25}).budget_tokens(1000) == 250
    assert parse_config({"budget": 300}).budget_tokens(1000) == 300
    # the observation window always fits; a budget above the prompt keeps it all
    assert parse_config({"budget": 0.01}).budget_tokens(1000) == 32
    assert parse_config({"budget": 5000}).budget_tokens(1000) == 1000
    assert parse_config({"policy": "full", "budget": 0.1}).budget_tokens(1000) == 1000
    assert parse_config({"budget": 1.0}).budget_tokens(77) == 77


def test_shipped_default_yaml_is_valid_and_documented():
    path = ROOT / "configs" / "madakv.yaml"
    data = load_yaml(path)
    cfg = parse_config(data)
    # every knob appears in the documented default file
    assert set(data) == set(MadaKVConfig.model_fields), set(MadaKVConfig.model_fields) ^ set(data)
    assert cfg == MadaKVConfig()
    assert path.read_text().count("#") >= len(data)


def test_sources_layer_file_then_additional_config(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("madakv:\n  policy: snapkv\n  budget: 0.3\n")
    monkeypatch.setenv("MADAKV_CONFIG", str(f))
    cfg = config_from_vllm({"madakv": {"budget": 0.1}})
    assert (cfg.policy, cfg.budget) == ("snapkv", 0.1)
    cfg = config_from_vllm({"madakv": {"config_file": str(f), "window": 8}})
    assert (cfg.policy, cfg.window) == ("snapkv", 8)
    with pytest.raises(MadaKVConfigError, match="madakv.windw"):
        config_from_vllm({"madakv": {"windw": 8}})


def test_request_overrides():
    base = MadaKVConfig()
    ov = request_overrides({"madakv_policy": "snapkv", "madakv_budget": 0.1, "other_plugin_key": 1})
    assert ov == {"policy": "snapkv", "budget": 0.1}
    assert base.with_overrides(ov).policy == "snapkv"
    with pytest.raises(ValueError, match="budget"):
        base.with_overrides({"budget": 2.0})
