"""How the Triton wrappers launch: what they check first (where a kernel may run, the cache
layout), and a dry-run mode that records launches instead of running them (used by
`kernels.compile_check` to compile exactly what the wrappers would launch, without a GPU)."""

from __future__ import annotations

import contextlib
import functools
from contextvars import ContextVar
from typing import NamedTuple

import torch
import triton

_recorded: ContextVar[list | None] = ContextVar("recorded_launches", default=None)


class Launch(NamedTuple):
    kernel: object
    grid: tuple[int, ...]
    args: tuple
    meta: dict          # constexpr arguments and launch options (num_warps, num_stages)


def launch(kernel, grid: tuple[int, ...], *args, **meta) -> None:
    """`kernel[grid](*args, **meta)`, or only recorded inside `dry_run()`."""
    recorded = _recorded.get()
    if recorded is None:
        kernel[grid](*args, **meta)
    else:
        recorded.append(Launch(kernel, grid, args, meta))


@contextlib.contextmanager
def dry_run():
    """Inside, wrappers record their launches (on any device) into the yielded list; outputs
    of the wrappers are left unwritten."""
    token = _recorded.set([])
    try:
        yield _recorded.get()
    finally:
        _recorded.reset(token)


def is_interpreted(kernel) -> bool:
    """True when `kernel` was defined under TRITON_INTERPRET=1 (runs on CPU tensors)."""
    return type(kernel).__name__ == "InterpretedFunction"


def check_launchable(kernel, device: torch.device, op: str) -> None:
    """Compiled kernels need CUDA tensors; CPU tensors need the interpreter."""
    if device.type == "cuda" or is_interpreted(kernel) or _recorded.get() is not None:
        return
    raise ValueError(f"{op}: backend 'triton' got tensors on {device}; Triton kernels need CUDA "
                     f"tensors, or TRITON_INTERPRET=1 set before `kernels` loads its Triton "
                     f"modules (to interpret them on CPU); use backend='torch' on CPU")


def check_cache_layout(k_cache: torch.Tensor, v_cache: torch.Tensor, op: str) -> None:
    """The kernels read a token's D values of one head as one contiguous run."""
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must be contiguous in its last dim (D), got strides "
                             f"{cache.stride()}")


def next_pow2(n: int) -> int:
    return triton.next_power_of_2(max(int(n), 1))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs keep full precision ("ieee"), not TF32; 16-bit inputs ignore this."""
    return "ieee" if dtype == torch.float32 else "tf32"


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; 1 for the CPU interpreter."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count
