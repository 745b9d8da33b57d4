"""Config validation: every knob, errors that name the field, YAML and additional_config sources."""

from pathlib import Path

import pytest

from madakv_vllm.config import (
    EXPERIMENTAL_FIELDS,
    EXPERIMENTAL_HCC_MODES,
    MadaKVConfig,
    MadaKVConfigError,
    config_from_vllm,
    load_yaml,
    parse_config,
    request_overrides,
    resolve,
)

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
    # every user-facing knob appears in the documented default file; the experimental block does not
    user_fields = set(MadaKVConfig.model_fields) - {"experimental"}
    assert set(data) == user_fields, user_fields ^ set(data)
    assert cfg == MadaKVConfig()
    assert path.read_text().count("#") >= len(data)
    assert not set(EXPERIMENTAL_FIELDS) & set(data) and data["hcc_mode"] not in EXPERIMENTAL_HCC_MODES


#: Every default as it was before the evaluation readings moved into ``experimental``.
DEFAULTS = {
    "policy": "madakv", "budget": 0.2, "window": 32, "kernel_size": 5, "pooling": "avg", "sink_tokens": None,
    "theta": 0.99, "min_per_head": None, "mpa": True, "hcc": True, "hcc_mode": "pyramid_uniform",
    "hcc_max_scale": 1.5, "recompress_interval": 32, "page_aligned": True, "min_prompt_len": 0,
    "prefill_eviction": "end", "pyramid_beta": 20.0, "adakv_alpha": 0.2, "h2o_recent_ratio": 0.5,
    "experimental": {"mpa_mix": 1.0, "mpa_split": "mass", "hcc_mode": None, "hcc_min_scale": 0.0},
}


def test_default_config_and_policy_unchanged():
    from madakv_vllm.policies import MadaKVPolicy, WindowAttention, make_policy

    cfg = MadaKVConfig()
    assert cfg.model_dump() == DEFAULTS
    assert cfg.hcc_reading == "pyramid_uniform"
    assert make_policy(cfg) == MadaKVPolicy(
        window=32, sink_tokens=0, scorer=WindowAttention(5, "avg"), mpa=True, hcc=True, theta=0.99, min_per_head=32,
        max_scale=1.5, min_scale=0.0, hcc_mode="pyramid_uniform", pyramid_beta=20.0, mpa_mix=1.0, mpa_split="mass")


@pytest.mark.parametrize("key, value", [("mpa_mix", 0.75), ("mpa_split", "capped"), ("mpa_split", "mass"),
                                        ("hcc_min_scale", 0.5), ("hcc_mode", "global"), ("hcc_mode", "layer"),
                                        ("hcc_mode", "pyramid")])
def test_a_reading_set_at_the_top_level_fails_naming_where_it_moved(key, value):
    with pytest.raises(MadaKVConfigError, match=f"madakv.{key}: .*moved to madakv.experimental.{key}"):
        parse_config({key: value})
    assert getattr(parse_config({"experimental": {key: value}}).experimental, key) == value


def test_an_old_full_config_file_fails_at_startup_naming_every_moved_field(tmp_path, monkeypatch):
    """The default file as shipped before the move set every reading; it fails naming each of them
    (and not hcc_mode, whose value there, pyramid_uniform, stays a user setting)."""
    old = {**{k: v for k, v in DEFAULTS.items() if k != "experimental"}, **DEFAULTS["experimental"]}
    old["hcc_mode"] = "pyramid_uniform"
    f = tmp_path / "old.yaml"
    f.write_text("madakv:\n" + "".join(f"  {k}: {'null' if v is None else str(v).lower()}\n" for k, v in old.items()))
    monkeypatch.setenv("MADAKV_CONFIG", str(f))
    with pytest.raises(MadaKVConfigError) as e:
        config_from_vllm({})
    msg = str(e.value)
    for key in EXPERIMENTAL_FIELDS:
        assert f"madakv.{key}: moved to madakv.experimental.{key}" in msg
    assert "madakv.hcc_mode" not in msg


def test_experimental_block_layers_over_the_file_and_is_validated(tmp_path, monkeypatch):
    f = tmp_path / "c.yaml"
    f.write_text("madakv:\n  hcc_mode: streamed\n  experimental:\n    mpa_split: demand\n    hcc_mode: layer\n")
    monkeypatch.setenv("MADAKV_CONFIG", str(f))
    cfg = config_from_vllm({"madakv": {"experimental": {"mpa_mix": 0.5}}})
    assert (cfg.experimental.mpa_split, cfg.experimental.mpa_mix, cfg.hcc_mode) == ("demand", 0.5, "streamed")
    assert cfg.hcc_reading == "layer"  # the experimental reading replaces hcc_mode
    assert parse_config({"experimental": None}) == MadaKVConfig()  # a YAML block left empty
    for bad, field in [({"mpa_mix": 1.5}, "madakv.experimental.mpa_mix"), ({"hcc_mode": "streamed"},
                       "madakv.experimental.hcc_mode"), ({"mpa_spilt": "mass"}, "madakv.experimental.mpa_spilt")]:
        with pytest.raises(MadaKVConfigError, match=field):
            config_from_vllm({"madakv": {"experimental": bad}})


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


def test_request_experimental_args_and_moved_ones():
    server = parse_config({"experimental": {"mpa_split": "demand"}})
    cfg = resolve(server, {"madakv_experimental_mpa_mix": 0.5, "madakv_experimental_hcc_mode": "global"})
    assert (cfg.experimental.mpa_split, cfg.experimental.mpa_mix, cfg.hcc_reading) == ("demand", 0.5, "global")
    assert resolve(server, {"madakv_budget": 0.1}).experimental == server.experimental
    with pytest.raises(ValueError, match="madakv.mpa_mix: moved to madakv.experimental.mpa_mix"):
        resolve(server, {"madakv_mpa_mix": 0.5})
    with pytest.raises(ValueError, match="madakv.experimental.mpa_mix"):
        resolve(server, {"madakv_experimental_mpa_mix": 2.0})


@pytest.mark.parametrize("xargs, named", [
    ({"madakv_mpa_mix": 0.5}, "madakv_mpa_mix: moved to madakv_experimental_mpa_mix"),
    ({"madakv_hcc_mode": "layer"}, "madakv_hcc_mode: 'layer' moved to madakv_experimental_hcc_mode"),
    ({"madakv_experimental_mpa_split": "tokens"}, "madakv_experimental_mpa_split: "),
    ({"madakv_budget": 2.0}, "madakv_budget: "),
])
def test_front_end_names_request_args_as_the_request_spells_them(xargs, named):
    from types import SimpleNamespace

    from vllm.exceptions import VLLMValidationError

    from madakv_vllm.integration.rules import validate_request_args

    vllm_config = SimpleNamespace(additional_config={"madakv": {"budget": 0.3}})
    with pytest.raises(VLLMValidationError) as e:
        validate_request_args(vllm_config, xargs)
    assert named in str(e.value)
    ok = validate_request_args(vllm_config, {"madakv_experimental_mpa_split": "capped"})
    assert (ok.budget, ok.experimental.mpa_split) == (0.3, "capped")
