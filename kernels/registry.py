"""Attention backends by name, imported on first use (`import kernels` never needs triton).

A backend is a module defining `paged_attention_partial`, `paged_prefill_partial`,
`merge_attention_states` and `write_kv` with the signatures of the `kernels` package, less
`backend` (`validate` is passed by keyword).
"""

from __future__ import annotations

import importlib
import warnings
from types import ModuleType

import torch

_BACKENDS: dict[str, str] = {
    "torch": "kernels.reference",
    "triton": "kernels.triton_backend",
}
_fallback_warned = False


def register(name: str, module_path: str) -> None:
    """Makes `backend=name` load `module_path` (imported lazily, on first use)."""
    _BACKENDS[name] = module_path


def available() -> list[str]:
    return sorted(_BACKENDS)


def load(name: str) -> ModuleType:
    """The module implementing backend `name`; ImportError says how to get its dependency."""
    if name not in _BACKENDS:
        raise ValueError(f"unknown kernel backend {name!r}; choose 'auto' or one of {available()}")
    try:
        return importlib.import_module(_BACKENDS[name])
    except ImportError as exc:
        raise ImportError(f"kernel backend {name!r} could not be imported ({exc}); "
                          f"for 'triton' install it with `pip install triton`") from exc


def resolve(name: str, device: torch.device) -> ModuleType:
    """`auto` = triton for CUDA tensors (torch if triton will not import), torch otherwise."""
    if name != "auto":
        return load(name)
    if device.type != "cuda":
        return load("torch")
    try:
        return load("triton")
    except ImportError as exc:
        _warn_fallback(exc)
        return load("torch")


def _warn_fallback(exc: ImportError) -> None:
    global _fallback_warned
    if not _fallback_warned:
        warnings.warn(f"{exc}; using the torch attention backend on CUDA", stacklevel=3)
        _fallback_warned = True
