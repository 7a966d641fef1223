"""Wire format of the data plane: one message = `meta` (a small dict of plain values) plus a list
of tensors, laid out as one contiguous uint8 buffer so that it crosses the wire in one piece:

    [reserve (for the transport's frame header) | envelope | pad | tensor 0 | pad | tensor 1 ...]

The envelope is msgpack (never pickle: a peer can send data, not code):
`{"m": meta, "t": [[dtype, shape, offset, nbytes], ...]}`, offsets counted from the start of the
tensor region, which begins at the first multiple of ALIGN after the envelope. Every tensor starts
at a multiple of ALIGN, so `decode` returns views into the received buffer (no copy).

Surprises: tuples in `meta` come back as lists; decoded tensors are CPU views sharing one buffer;
`encode` accepts tensors on any device (they are copied into the CPU buffer).
"""

from __future__ import annotations

import msgpack
import torch

ALIGN = 64   # bytes; >= the itemsize of every dtype, and a cache line

_DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.complex64, torch.complex128,
    torch.uint8, torch.int8, torch.int16, torch.int32, torch.int64, torch.bool,
    torch.uint16, torch.uint32, torch.uint64,
    torch.float8_e4m3fn, torch.float8_e5m2)}


class WireError(ValueError):
    """A message that cannot be encoded (bad meta, unsupported tensor) or decoded (corrupt)."""


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _describe(tensors: list[torch.Tensor]) -> tuple[list[list], int]:
    descs, offset = [], 0
    for i, t in enumerate(tensors):
        if not isinstance(t, torch.Tensor):
            raise WireError(f"tensor {i} is a {type(t).__name__}, not a torch.Tensor")
        name = str(t.dtype).removeprefix("torch.")
        if name not in _DTYPES or t.layout != torch.strided:
            raise WireError(f"tensor {i}: dtype {t.dtype} / layout {t.layout} cannot travel")
        nbytes = t.numel() * t.element_size()
        descs.append([name, list(t.shape), offset, nbytes])
        offset = _align(offset + nbytes)
    return descs, offset


def pack_envelope(meta: dict, descs: list) -> bytes:
    if not isinstance(meta, dict):
        raise WireError(f"meta must be a dict, got {type(meta).__name__}")
    try:
        return msgpack.packb({"m": meta, "t": descs}, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise WireError(f"meta must hold plain values (int, float, str, bytes, bool, None, "
                        f"lists and dicts of them): {e}") from None


def encode(meta: dict, tensors: list[torch.Tensor], reserve: int = 0) -> tuple[torch.Tensor, int]:
    """Pack `meta` and `tensors` into one new CPU uint8 buffer whose first `reserve` bytes are
    left uninitialised for the caller. Returns (buffer, envelope length in bytes)."""
    descs, region_len = _describe(tensors)
    envelope = pack_envelope(meta, descs)
    start = reserve + _align(len(envelope))
    buf = torch.empty(start + region_len, dtype=torch.uint8)
    buf[reserve:reserve + len(envelope)] = torch.frombuffer(bytearray(envelope), dtype=torch.uint8)
    _fill(buf[start:], tensors, descs)
    return buf, len(envelope)


def decode(body: torch.Tensor, envelope_len: int) -> tuple[dict, list[torch.Tensor]]:
    """Inverse of `encode` for `body` = the buffer without its reserved prefix (uint8, CPU).
    The tensors are views into `body`."""
    meta, descs = unpack_envelope(body[:envelope_len].numpy().tobytes())
    return meta, _views(body[_align(envelope_len):], descs)


def encode_split(meta: dict, tensors: list[torch.Tensor]) -> tuple[bytes, torch.Tensor]:
    """Like `encode`, but the envelope and the tensor region come apart: (envelope, region)."""
    descs, region_len = _describe(tensors)
    region = torch.empty(region_len, dtype=torch.uint8)
    _fill(region, tensors, descs)
    return pack_envelope(meta, descs), region


def decode_split(envelope: bytes, region: torch.Tensor) -> tuple[dict, list[torch.Tensor]]:
    meta, descs = unpack_envelope(envelope)
    return meta, _views(region, descs)


def unpack_envelope(envelope: bytes) -> tuple[dict, list]:
    try:
        env = msgpack.unpackb(envelope, raw=False, strict_map_key=False)
        return env["m"], env["t"]
    except (ValueError, KeyError, TypeError, msgpack.UnpackException) as e:
        raise WireError(f"corrupt message envelope ({len(envelope)} bytes): {e}") from None


def _fill(region: torch.Tensor, tensors: list[torch.Tensor], descs: list) -> None:
    for t, (_, _, offset, nbytes) in zip(tensors, descs):
        if nbytes:
            # reshape(-1) copies only a non-contiguous tensor; copy_ also fetches from a GPU.
            region[offset:offset + nbytes].copy_(t.detach().reshape(-1).view(torch.uint8))


def _views(region: torch.Tensor, descs) -> list[torch.Tensor]:
    """Tensors over `region` as the peer described them; any description that does not fit
    exactly (types, bounds, alignment, size = prod(shape) * itemsize) is a `WireError`."""
    if not isinstance(descs, list):
        raise WireError(f"corrupt tensor list: expected a list, got {type(descs).__name__}")
    return [_view(region, desc) for desc in descs]


def _view(region: torch.Tensor, desc) -> torch.Tensor:
    bad = WireError(f"corrupt tensor description {desc!r} for a {region.numel()}-byte region")
    if not isinstance(desc, list) or len(desc) != 4:
        raise bad
    name, shape, offset, nbytes = desc
    if not isinstance(name, str) or name not in _DTYPES or not isinstance(shape, list) or not all(
            isinstance(v, int) and not isinstance(v, bool) for v in [*shape, offset, nbytes]):
        raise bad
    itemsize = torch.empty(0, dtype=_DTYPES[name]).element_size()
    numel = 1
    for d in shape:
        if d < 0:
            raise bad
        numel *= d
    if offset < 0 or nbytes != numel * itemsize or offset + nbytes > region.numel() \
            or offset % itemsize:
        raise bad
    return region[offset:offset + nbytes].view(_DTYPES[name]).reshape(shape)
