"""madakv-vllm: MadaKV modality-aware head-level KV-cache eviction for vLLM."""

__version__ = "0.1.0"


def register() -> None:
    """vLLM general-plugin entry point (runs in every vLLM process; idempotent)."""
    from madakv_vllm.integration.plugin import register as _register

    _register()
