"""MadaKV configuration: one pydantic model holding every knob of the method.

Server-wide values come from ``--additional-config '{"madakv": {...}}'`` or a
YAML file (``MADAKV_CONFIG=path`` or ``{"madakv": {"config_file": path}}``);
per-request overrides come from ``SamplingParams.extra_args`` /
OpenAI ``vllm_xargs`` (keys prefixed ``madakv_``). Unknown keys are errors.

Readings kept only to rerun the dev-split ablations live in one block, ``experimental``
(:class:`ExperimentalConfig`; per request ``madakv_experimental_<field>``). A config that still
sets one of them at the top level fails naming where it moved.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Union, get_args

from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError, field_validator, model_validator

PolicyName = Literal["madakv", "full", "streamingllm", "h2o", "snapkv", "pyramidkv", "adakv", "lookm"]
POLICIES: tuple[str, ...] = get_args(PolicyName)

# Modality ids used everywhere (policies, provenance, tests).
TEXT, IMAGE, VIDEO, AUDIO = 0, 1, 2, 3
MODALITY_IDS = {"text": TEXT, "image": IMAGE, "video": VIDEO, "audio": AUDIO}
NUM_MODALITIES = 4
MODALITY_NAMES = tuple(MODALITY_IDS)  # by id

#: StreamingLLM's attention sinks (Xiao et al. 2024; kvpress StreamingLLMPress n_sink).
STREAMINGLLM_SINKS = 4

#: Readings moved from the top level into ``experimental`` (and the hcc_mode values that moved).
EXPERIMENTAL_FIELDS = ("mpa_mix", "mpa_split", "hcc_min_scale")
EXPERIMENTAL_HCC_MODES = ("global", "layer", "pyramid")
#: Flat spelling of an experimental field (per-request args: ``madakv_experimental_mpa_mix``).
EXPERIMENTAL_PREFIX = "experimental_"


def moved_to_experimental(key: str, value: Any = None) -> bool:
    """A top-level ``key: value`` that now belongs in the ``experimental`` block."""
    return key in EXPERIMENTAL_FIELDS or (key == "hcc_mode" and value in EXPERIMENTAL_HCC_MODES)


class ExperimentalConfig(BaseModel):
    """Readings of MPA and HCC kept only so the dev-split ablations can be rerun
    (``scripts/eval_proxy.py --variant``). Each lost to the default on the accuracy proxy's dev
    splits, and none is the paper's ablation (those are ``mpa``, ``hcc`` and ``hcc_mode``):
    docs/results.md, docs/data/proxy-dev-ablation*.json. Not for serving."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    mpa_mix: float = Field(
        1.0, ge=0.0, le=1.0, description="MPA: weight of the modality-mass split in each head's per-modality "
        "quota; the rest follows the head's own top scores (0: top-k, no modality split)"
    )
    mpa_split: Literal["mass", "demand", "capped"] = Field(
        "mass", description="MPA: what each head's per-modality quota follows: its attention mass on each "
        "modality ('mass'), the fewest tokens covering theta of that mass ('demand'), or the mass with no "
        "modality above that demand while another is below its own ('capped')"
    )
    hcc_mode: Literal["global", "layer", "pyramid"] | None = Field(
        None, description="HCC reading that replaces madakv.hcc_mode when set: over all layers at once, per "
        "(layer, head) 'global' or per layer 'layer'; 'pyramid': PyramidKV's layer schedule, heads by demand"
    )
    hcc_min_scale: float = Field(
        0.0, ge=0.0, le=1.0, description="HCC streamed: every layer keeps at least this fraction of the uniform "
        "share H*B, so early layers cannot starve later ones below it (0: no floor; 1: uniform layers)"
    )


class MadaKVConfig(BaseModel):
    """Every knob of MadaKV and its baselines (the readings kept for evaluation only are in
    ``experimental``). See docs/method.md for each reading."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    policy: PolicyName = "madakv"
    # float in (0, 1]: fraction of the prompt kept per KV head (on average);
    # int >= 1: absolute number of tokens kept per KV head (on average).
    budget: Union[StrictInt, float] = 0.2
    window: int = Field(32, ge=1, description="observation window W: last W prompt tokens; always kept")
    kernel_size: int = Field(5, ge=1, description="1-D pooling kernel over scores (SnapKV); 1 disables")
    pooling: Literal["avg", "max"] = "avg"
    sink_tokens: int | None = Field(
        None, ge=0, description="first tokens always kept (attention sinks); None: 4 for streamingllm, as its "
        "paper and kvpress use, 0 for every other policy"
    )
    # theta 0.99 and hcc_max_scale 1.5: chosen on the accuracy proxy's dev split (docs/results.md)
    theta: float = Field(0.99, gt=0.0, le=1.0, description="HCC: attention mass a head's demand must cover")
    min_per_head: int | None = Field(None, ge=1, description="lower bound on tokens per head; default = window")
    mpa: bool = Field(True, description="MadaKV: modality preference adaptation on/off (ablation)")
    hcc: bool = Field(True, description="MadaKV: hierarchical compression compensation on/off (ablation)")
    # pyramid_uniform: chosen on the dev splits of both proxies (docs/results.md)
    hcc_mode: Literal["pyramid_uniform", "streamed"] = Field(
        "pyramid_uniform", description="HCC: 'streamed' is the paper's (budget moves by demand layer by layer); "
        "'pyramid_uniform' (default, not the paper's reading): PyramidKV's layer schedule, split evenly over "
        "each layer's heads; docs/method.md"
    )
    hcc_max_scale: float = Field(
        1.5, ge=1.0, description="HCC streamed: a layer keeps at most this multiple of its fair share phi (inf: uncapped)"
    )
    # Default 32: a long generation stays within budget + 32 tokens per head (bounded memory by
    # default); with 0 every generated token is kept, which cost ~10% capacity in bench_capacity.
    recompress_interval: int = Field(
        32, ge=0, description="re-compress every N generated tokens (0 = only once, after the prompt)"
    )
    # On by default: retained KV then fills whole pages, so a compressed request holds exactly
    # P packed pages plus its tail (madakv_vllm/accounting.py); off: exact token budgets, one
    # more page of packing slack.
    page_aligned: bool = Field(
        True, description="round each head's budget to whole KV pages (at most +15% over the budget)"
    )
    min_prompt_len: int = Field(0, ge=0, description="prompts shorter than this are never compressed")
    # "end": the prompt is compressed once, when its last chunk has run. "chunked": also after every
    # prefill chunk that would free a page, to the budget of the tokens seen so far, so a request
    # holds about its budget plus one chunk while it prefills (madakv_vllm/accounting.py).
    prefill_eviction: Literal["end", "chunked"] = Field(
        "end", description="compress when the prompt is done ('end') or after every prefill chunk ('chunked')"
    )
    pyramid_beta: float = Field(20.0, gt=0.0, description="PyramidKV: top/bottom layer budget ratio parameter")
    adakv_alpha: float = Field(0.2, ge=0.0, le=1.0, description="AdaKV: safeguard share of the per-head budget")
    h2o_recent_ratio: float = Field(0.5, ge=0.0, le=1.0, description="H2O, LOOK-M: share of the budget for recent tokens")
    experimental: ExperimentalConfig = Field(
        default_factory=ExperimentalConfig, description="readings kept for evaluation only (ExperimentalConfig)"
    )

    @model_validator(mode="before")
    @classmethod
    def _moved_fields(cls, data: Any) -> Any:
        """A reading that moved to ``experimental`` fails naming where it went."""
        if isinstance(data, dict):
            moved = [
                f"madakv.{k}: {data[k]!r} moved to madakv.experimental.{k}" if k == "hcc_mode"
                else f"madakv.{k}: moved to madakv.experimental.{k}"
                for k in (*EXPERIMENTAL_FIELDS, "hcc_mode") if k in data and moved_to_experimental(k, data[k])
            ]
            if moved:
                raise ValueError("; ".join(moved) + " (kept for evaluation only: docs/results.md)")
        return data

    @field_validator("experimental", mode="before")
    @classmethod
    def _empty_block(cls, v: Any) -> Any:
        return {} if v is None else v  # ``experimental:`` with every line commented out

    @field_validator("budget")
    @classmethod
    def _check_budget(cls, v: Union[int, float]) -> Union[int, float]:
        if isinstance(v, bool):
            raise ValueError("budget must be a fraction in (0, 1] or a token count >= 1")
        if isinstance(v, int):
            if v < 1:
                raise ValueError("budget as a token count must be >= 1")
        elif not (0.0 < v <= 1.0):
            raise ValueError("budget as a fraction must be in (0, 1]; give an int for a token count")
        return v

    @model_validator(mode="after")
    def _check_chunked(self) -> "MadaKVConfig":
        if self.prefill_eviction == "chunked" and not self.page_aligned:
            raise ValueError("madakv.prefill_eviction: 'chunked' needs madakv.page_aligned: true")
        return self

    @property
    def chunked(self) -> bool:
        """Evicts during chunked prefill (a policy that evicts, in 'chunked' mode)."""
        return self.prefill_eviction == "chunked" and self.policy != "full"

    @property
    def sinks(self) -> int:
        """Sink tokens in effect: ``sink_tokens``, or the policy's own default when it is None."""
        if self.sink_tokens is not None:
            return self.sink_tokens
        return STREAMINGLLM_SINKS if self.policy == "streamingllm" else 0

    @property
    def hcc_reading(self) -> str:
        """The HCC reading in effect: ``experimental.hcc_mode`` when set, else ``hcc_mode``."""
        return self.experimental.hcc_mode or self.hcc_mode

    @property
    def head_floor(self) -> int:
        return self.min_per_head if self.min_per_head is not None else self.window

    def budget_tokens(self, prompt_len: int) -> int:
        """Average tokens kept per (layer, KV head) for a prompt of ``prompt_len``.

        The window (and sinks) always fit: the result is clamped to
        [min(prompt_len, window + sinks), prompt_len]. ``full`` keeps all.
        """
        if self.policy == "full" or prompt_len < self.min_prompt_len:
            return prompt_len
        if isinstance(self.budget, int):
            b = self.budget
        else:
            b = int(round(self.budget * prompt_len))
        lo = min(prompt_len, self.window + self.sinks)
        return max(lo, min(prompt_len, b))

    def with_overrides(self, overrides: dict[str, Any] | None) -> "MadaKVConfig":
        """A copy with per-request overrides, validated (raises ValueError naming the field).
        ``experimental_<field>`` (flat, as per-request args spell it) sets ``experimental.<field>``."""
        if not overrides:
            return self
        top = {k: v for k, v in overrides.items() if not k.startswith(EXPERIMENTAL_PREFIX)}
        experimental = {k[len(EXPERIMENTAL_PREFIX):]: v for k, v in overrides.items() if k.startswith(EXPERIMENTAL_PREFIX)}
        if experimental:
            top = _layered(top, {"experimental": experimental})
        return parse_config(_layered(self.model_dump(), top))


REQUEST_PREFIX = "madakv_"


def request_overrides(extra_args: dict[str, Any] | None) -> dict[str, Any]:
    """Pick ``madakv_*`` keys out of SamplingParams.extra_args (prefix stripped)."""
    if not extra_args:
        return {}
    return {k[len(REQUEST_PREFIX):]: v for k, v in extra_args.items() if k.startswith(REQUEST_PREFIX)}


class MadaKVConfigError(ValueError):
    pass


_RESOLVED: dict[tuple[MadaKVConfig, str], MadaKVConfig] = {}


def resolve(server: MadaKVConfig, extra_args: dict[str, Any] | None) -> MadaKVConfig:
    """A request's effective config: the server config with the request's ``madakv_*`` overrides
    (``SamplingParams.extra_args`` / OpenAI ``vllm_xargs``). Raises ValueError naming the field.
    Parsed once per process for each distinct server config and overrides."""
    overrides = request_overrides(extra_args)
    if not overrides:
        return server
    import json

    key = (server, json.dumps(overrides, sort_keys=True, default=repr))
    if key not in _RESOLVED:
        if len(_RESOLVED) > 4096:  # distinct override sets are few in practice; bound it anyway
            _RESOLVED.clear()
        _RESOLVED[key] = server.with_overrides(overrides)
    return _RESOLVED[key]


def _layered(base: dict[str, Any], top: dict[str, Any]) -> dict[str, Any]:
    """``top`` over ``base``; the ``experimental`` block is merged field by field."""
    out = {**base, **top}
    if isinstance(base.get("experimental"), dict) and isinstance(top.get("experimental"), dict):
        out["experimental"] = {**base["experimental"], **top["experimental"]}
    return out


def parse_config(data: dict[str, Any] | None) -> MadaKVConfig:
    """Validate a dict; errors name the offending field, e.g. ``madakv.budget: ...``."""
    data = dict(data or {})
    path = data.pop("config_file", None)
    if path is not None:
        data = _layered(load_yaml(path), data)
    try:
        return MadaKVConfig(**data)
    except ValidationError as e:
        msgs = []
        for err in e.errors():
            loc = ".".join(str(x) for x in err["loc"])
            if loc:
                msgs.append(f"madakv.{loc}: {err['msg']} (got {err.get('input')!r})")
            else:  # a rule over several fields: its message names them
                msgs.append(err["msg"].removeprefix("Value error, "))
        raise MadaKVConfigError("invalid MadaKV config: " + "; ".join(msgs)) from None


def load_yaml(path: str | os.PathLike) -> dict[str, Any]:
    import yaml

    text = Path(path).read_text()
    data = yaml.safe_load(text) or {}
    if not isinstance(data, dict):
        raise MadaKVConfigError(f"{path}: expected a mapping at the top level")
    # Accept both a bare mapping and one nested under "madakv".
    if set(data) == {"madakv"}:
        data = data["madakv"] or {}
    return data


def config_from_vllm(additional_config: dict[str, Any] | None) -> MadaKVConfig:
    """Server-wide config: MADAKV_CONFIG file, then ``additional_config['madakv']`` on top."""
    base: dict[str, Any] = {}
    env_path = os.environ.get("MADAKV_CONFIG")
    if env_path:
        base.update(load_yaml(env_path))
    sub = (additional_config or {}).get("madakv") or {}
    if not isinstance(sub, dict):
        raise MadaKVConfigError("additional_config.madakv must be a mapping")
    return parse_config(_layered(base, sub))
