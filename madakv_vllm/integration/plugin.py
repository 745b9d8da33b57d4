"""Plugin registration, the top of ``madakv_vllm.integration``: ``register()`` (vLLM's general-plugin
entry point, through ``madakv_vllm.register``; every vLLM process: API server, engine core,
workers) registers the backend name, installs the patches (``patches.py``) and maps our KV cache
spec to our manager (``kv_manager.py``). The rules the patched entry points apply are in
``rules.py``; without ``--attention-backend madakv`` vLLM runs as stock.
"""

from __future__ import annotations

import copyreg
import logging

from madakv_vllm.integration import VLLM_MINOR, patches, rules

logger = logging.getLogger("vllm.madakv")

_registered = False


def register() -> None:
    global _registered
    if _registered:
        return
    _registered = True
    import vllm

    if not vllm.__version__.startswith(VLLM_MINOR):
        logger.warning("madakv-vllm was checked against vLLM %s.x; found %s", VLLM_MINOR, vllm.__version__)
    _register_backend_enum()
    from madakv_vllm.integration import kv_manager  # imports vLLM's scheduler modules

    patches.install()
    kv_manager.register_spec()


# --- the backend name ---------------------------------------------------------


def _restore_backend_enum(name: str):
    """Unpickling target: spawned processes unpickle the config before plugins load."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


def _reduce_backend_enum(member):
    if member.name == rules.BACKEND_NAME:
        return _restore_backend_enum, (member.name,)
    return type(member), (member.value,)  # Enum's own reduction for every other member


def _register_backend_enum() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    if rules.BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(rules.BACKEND_NAME, rules.CPU_BACKEND_PATH)
    copyreg.pickle(AttentionBackendEnum, _reduce_backend_enum)
