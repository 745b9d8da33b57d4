"""Plugin registration, the top of ``madakv_vllm.integration``: ``register()`` (vLLM's general-plugin
entry point, through ``madakv_vllm.register``; every vLLM process: API server, engine core,
workers) installs the patches (``patches.py``), maps our KV cache spec to our manager
(``kv_manager.py``) and registers the backend name. The rules the patched entry points apply are
in ``rules.py``; without ``--attention-backend madakv`` vLLM runs as stock.

vLLM loads general plugins unguarded in every process, so ``register()`` never raises: on a vLLM
whose minor version is not ``VLLM_MINOR`` it changes nothing in vLLM and logs one WARNING naming
both versions; there, and wherever installing fails, the backend name is not registered, so vLLM
itself refuses ``--attention-backend madakv`` at startup as an unknown backend instead of serving
stock attention under that name (vLLM's CPU platform ignores a selected backend it does not know).
"""

from __future__ import annotations

import copyreg
import logging
import re

from madakv_vllm.integration import VLLM_MINOR

logger = logging.getLogger("vllm.madakv")

_registered = False

UNSUPPORTED_VLLM = (
    "madakv-vllm supports vLLM %s.x only, and vLLM %s is installed: madakv-vllm changed nothing in it and "
    "vLLM runs as stock. --attention-backend madakv is not available with this vLLM (vLLM refuses it at "
    "startup as an unknown attention backend); install vLLM %s.x to use it"
)
INSTALL_FAILED = (
    "madakv-vllm could not hook into vLLM %s (%s: %s): --attention-backend madakv is not available (vLLM "
    "refuses it at startup as an unknown attention backend); vLLM runs without it"
)


def minor_version(version: str) -> str | None:
    """``major.minor`` of a version string (``0.32.0``, ``0.32.1.dev3+gabc``, ``0.32.0+cpu``), or None."""
    m = re.match(r"\s*v?(\d+)\.(\d+)(?!\d)", str(version))
    return f"{int(m.group(1))}.{int(m.group(2))}" if m else None


def installed_vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001 - a plugin must not stop vLLM
        return "unknown"


def supported(version: str) -> bool:
    return minor_version(version) == VLLM_MINOR


def register() -> None:
    """Idempotent, and never raises (see the module docstring)."""
    global _registered
    if _registered:
        return
    _registered = True
    version = installed_vllm_version()
    if not supported(version):
        logger.warning(UNSUPPORTED_VLLM, VLLM_MINOR, version, VLLM_MINOR)
        return
    try:
        _install()
    except Exception as e:  # noqa: BLE001 - a plugin must not stop vLLM
        logger.warning(INSTALL_FAILED, version, type(e).__name__, e, exc_info=True)


def _install() -> None:
    from madakv_vllm.integration import kv_manager, patches  # kv_manager imports vLLM's scheduler modules

    patches.install()
    kv_manager.register_spec()
    # Last: the name exists only once everything it needs is in place, so a failure above leaves
    # --attention-backend madakv refused rather than silently served by stock attention.
    _register_backend_enum()


# --- the backend name ---------------------------------------------------------


def _restore_backend_enum(name: str):
    """Unpickling target: spawned processes unpickle the config before plugins load."""
    register()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    return AttentionBackendEnum[name]


def _reduce_backend_enum(member):
    from madakv_vllm.integration import rules

    if member.name == rules.BACKEND_NAME:
        return _restore_backend_enum, (member.name,)
    return type(member), (member.value,)  # Enum's own reduction for every other member


def _register_backend_enum() -> None:
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    from madakv_vllm.integration import rules

    if rules.BACKEND_NAME not in AttentionBackendEnum.__members__:
        AttentionBackendEnum.register(rules.BACKEND_NAME, rules.CPU_BACKEND_PATH)
    copyreg.pickle(AttentionBackendEnum, _reduce_backend_enum)
