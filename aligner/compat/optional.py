"""Guarded imports of the GPU-only extras (transformer-engine, apex, tensorrt-llm).

None of these can be installed on a CPU machine, so nothing in aligner imports them at module
level. A config that asks for one that is missing stops at start-up with a message that names
the config key and how to install it, instead of failing deep inside a run.
"""
from __future__ import annotations

import importlib
import importlib.util

_INSTALL_HINTS = {
    "transformer_engine": "pip install 'aligner[gpu]' (needs CUDA; see README 'GPU extras')",
    "apex": "build NVIDIA apex from source: see README 'GPU extras' (PyPI's 'apex' is unrelated)",
    "tensorrt_llm": "use the NGC container in Dockerfile, or pip install tensorrt-llm on a CUDA machine",
}


class MissingOptionalDependency(ImportError):
    """A config asked for a GPU extra that is not installed here."""


def is_available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def require(module: str, config_key: str):
    """Import `module` or raise an error naming the config key that asked for it."""
    if not is_available(module):
        raise MissingOptionalDependency(
            f"{config_key}=True needs the optional package '{module}', which is not installed. "
            f"Install it ({_INSTALL_HINTS.get(module, 'pip install ' + module)}) "
            f"or set {config_key}=False."
        )
    try:
        return importlib.import_module(module)
    except Exception as exc:  # installed but broken (e.g. no CUDA driver)
        raise MissingOptionalDependency(
            f"{config_key}=True: '{module}' is installed but failed to import: {exc}"
        ) from exc


def transformer_engine_usable() -> bool:
    """TE's layer spec is only worth using where TE imports and CUDA is present."""
    import torch

    return torch.cuda.is_available() and is_available("transformer_engine")
