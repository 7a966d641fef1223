"""Linear layers on the CPU through oneDNN with weights packed once.

torch's `F.linear` on the CPU calls MKL's sgemm on the weight as stored ([out, in]). At the
row counts of decoding (1 to a few dozen rows) that reads the weights well below the memory
rate, and on AMD CPUs MKL takes a slower code path still. oneDNN, which torch ships as well,
runs an inner product on a copy of the weight reordered once into its blocked layout; on the
2-core machine of `docs/performance.md` that is 1.2-3.7x faster for the large weights at every
row count. A oneDNN call costs about 10 us more than an `F.linear` call, so alone, with its
weight in cache, a small weight is slower packed at few rows; in the model, where each weight
comes from memory once a step, packing every weight was faster, so all of them are. The copy
costs as much memory as the weight.

`Linear` is `nn.Linear` with that copy attached by `pack_linears`. The copy is used only while
it still describes the weight: the same storage and version and the input's dtype; a weight
replaced or changed in place, or a model cast to another dtype, falls back to `F.linear` until
packed again. The packed tensor is a plain attribute, never in `state_dict()`: checkpoints and
published weights carry only the dense weights.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

KERNELS = ("auto", "onednn", "torch")
PACKED_DTYPES = (torch.float32, torch.bfloat16)


def _key(w: torch.Tensor) -> tuple:
    """What identifies a weight's current values: its storage, its version, its dtype."""
    try:
        version = w._version
    except RuntimeError:           # an inference tensor: it cannot be changed in place
        version = None
    return w.data_ptr(), version, w.dtype


def _current(key: tuple | None, weight: torch.Tensor, x: torch.Tensor) -> bool:
    """Whether a copy packed when `weight` had `key` still describes it, for input `x`."""
    return key is not None and x.dtype == weight.dtype and _key(weight) == key


def _pack(w: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(w.detach(), None)


_LINEAR_POINTWISE = getattr(getattr(torch.ops.mkldnn, "_linear_pointwise", None), "default", None)


def bucket_rows(rows: int) -> int:
    """The row count a packed call runs at: a power of two up to 64, a multiple of 64 up to
    512, of 256 beyond. oneDNN builds (and keeps) a primitive, code and buffers, for every row
    count it meets, about half a megabyte each; serving meets every count from 1 to the step's
    token budget, and one engine grew by 650 MB over 400 of them. Padded to these buckets a
    step of up to 4096 tokens meets at most 28 per weight shape, for a few percent more
    arithmetic on rows that are mostly memory-bound anyway."""
    if rows <= 64:
        return 1 << max(rows - 1, 0).bit_length()
    step = 64 if rows <= 512 else 256
    return -(-rows // step) * step


def _packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    lead = x.shape[:-1]
    x = x.reshape(-1, x.shape[-1])
    rows = x.shape[0]
    padded = bucket_rows(rows)
    if padded != rows:
        x = F.pad(x, (0, 0, 0, padded - rows))
    out = _LINEAR_POINTWISE(x, packed, bias, "none", [], "")
    return (out if padded == rows else out[:rows]).reshape(*lead, out.shape[-1])


@functools.cache
def onednn_works(dtype: torch.dtype) -> bool:
    """Whether this torch and CPU run a packed linear of `dtype` and get `F.linear`'s values
    (probed once per process on a small random layer)."""
    if dtype not in PACKED_DTYPES or not torch.backends.mkldnn.is_available() or \
            _LINEAR_POINTWISE is None:
        return False
    try:
        g = torch.Generator().manual_seed(0)
        w = torch.randn(48, 40, generator=g).to(dtype)
        b = torch.randn(48, generator=g).to(dtype)
        x = torch.randn(5, 40, generator=g).to(dtype)
        got = _packed_linear(x, _pack(w), b)
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return got.shape == (5, 48) and torch.allclose(got.float(), F.linear(x, w, b).float(),
                                                       rtol=tol, atol=tol)
    except Exception:
        return False


class Linear(nn.Linear):
    """`nn.Linear` that runs through its packed oneDNN copy while that copy is current."""

    packed: torch.Tensor | None = None
    packed_key: tuple | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        packed = self.packed
        if packed is not None and _current(self.packed_key, self.weight, x):
            return _packed_linear(x, packed, self.bias)
        return F.linear(x, self.weight, self.bias)


class PackedWeight:
    """A packed copy of a weight used outside a `Linear` (the lm_head, which may be the
    embedding's weight): `linear(x, weight)` uses it while `weight` is still what was packed."""

    def __init__(self, weight: torch.Tensor):
        self.key, self.packed = _key(weight), _pack(weight)
        self.nbytes = weight.numel() * weight.element_size()

    def linear(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        if _current(self.key, weight, x):
            return _packed_linear(x, self.packed, None)
        return F.linear(x, weight)


def resolve(kernel: str, device: torch.device | str, dtype: torch.dtype) -> str:
    """"onednn" or "torch" for `model.linear_kernel` on this device and dtype. "auto" takes
    oneDNN on the CPU where it works for the dtype; "onednn" where it cannot run is an error."""
    works = torch.device(device).type == "cpu" and onednn_works(dtype)
    if kernel == "onednn" and not works:
        raise ValueError(f"model.linear_kernel: 'onednn' needs the CPU and float32 or bfloat16 "
                         f"weights with torch's oneDNN (got {torch.device(device).type}, "
                         f"{str(dtype).removeprefix('torch.')})")
    if kernel == "torch":
        return "torch"
    return "onednn" if works else "torch"


def pack_linears(model: nn.Module, use: bool) -> int:
    """Attach a packed copy to every `Linear` in `model` (itself one, or holding them) when
    `use`, else drop them; returns the bytes the copies take."""
    total = 0
    for m in model.modules():
        if isinstance(m, Linear):
            if use:
                m.packed, m.packed_key = _pack(m.weight), _key(m.weight)
                total += m.weight.numel() * m.weight.element_size()
            else:
                m.packed = m.packed_key = None
    return total
