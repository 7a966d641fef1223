"""Argument checks shared by every backend: shapes, dtypes and devices, with errors that name the
argument. None of them reads tensor values, so none forces a GPU synchronisation."""

from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_decode(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    """q [B, H, D]; caches [num_blocks, block_size, H_kv, D]; block_tables [B, M]; seq_lens [B]."""
    _check_dims("q", q, 3, "[B, H, D]")
    _check_attention(q, k_cache, v_cache, block_tables)
    _check_index("seq_lens", seq_lens, (q.shape[0],), "[B]")
    _check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   seq_lens=seq_lens)


def check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens) -> None:
    """q [T, H, D]; block_tables [B, M]; cu_seqlens_q [B + 1]; kv_lens [T]."""
    _check_dims("q", q, 3, "[T, H, D]")
    _check_attention(q, k_cache, v_cache, block_tables, rows="sequences")
    _check_index("cu_seqlens_q", cu_seqlens_q, (block_tables.shape[0] + 1,), "[B + 1]")
    _check_index("kv_lens", kv_lens, (q.shape[0],), "[T]")
    _check_devices(q=q, k_cache=k_cache, v_cache=v_cache, block_tables=block_tables,
                   cu_seqlens_q=cu_seqlens_q, kv_lens=kv_lens)


def check_merge(outs, lses) -> None:
    """outs [S, ..., D]; lses [S, ...] (the same leading dims)."""
    if outs.dim() < 2 or tuple(lses.shape) != tuple(outs.shape[:-1]):
        raise ValueError(f"merge_attention_states: outs [S, ..., D] and lses [S, ...] must agree, "
                         f"got outs {tuple(outs.shape)} and lses {tuple(lses.shape)}")
    if outs.shape[0] < 1:
        raise ValueError("merge_attention_states: need at least one partial (S >= 1), got S=0")
    _check_float("outs", outs)
    _check_float("lses", lses)
    _check_devices(outs=outs, lses=lses)


def check_write(k, v, k_cache, v_cache, slot_mapping) -> None:
    """k, v [N, H_kv, D]; caches [num_blocks, block_size, H_kv, D]; slot_mapping [N]."""
    _check_dims("k", k, 3, "[N, H_kv, D]")
    _check_cache(k_cache, v_cache)
    if tuple(v.shape) != tuple(k.shape):
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    if tuple(k.shape[1:]) != tuple(k_cache.shape[2:]):
        raise ValueError(f"k [N, H_kv, D] has (H_kv, D) = {tuple(k.shape[1:])} but the cache "
                         f"holds {tuple(k_cache.shape[2:])}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != k_cache.dtype:
            raise ValueError(f"{name} dtype {t.dtype} differs from the cache dtype "
                             f"{k_cache.dtype}; write_kv copies exactly and does not convert")
    _check_index("slot_mapping", slot_mapping, (k.shape[0],), "[N]")
    _check_devices(k=k, v=v, k_cache=k_cache, v_cache=v_cache, slot_mapping=slot_mapping)


def _check_attention(q, k_cache, v_cache, block_tables, rows: str = "B") -> None:
    _check_float("q", q)
    _check_cache(k_cache, v_cache)
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if head_dim != k_cache.shape[3]:
        raise ValueError(f"head dim D of q ({head_dim}) differs from the cache's "
                         f"({k_cache.shape[3]})")
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"number of query heads H={num_heads} is not a multiple of the number of "
                         f"KV heads H_kv={num_kv_heads}")
    if q.dtype != k_cache.dtype:
        raise ValueError(f"q dtype {q.dtype} differs from the KV cache dtype {k_cache.dtype}")
    _check_dims("block_tables", block_tables, 2, f"[{rows}, max_blocks]")
    if block_tables.dtype not in INDEX_DTYPES:
        raise ValueError(f"block_tables must be int32 (or int64), got {block_tables.dtype}")
    if rows == "B" and block_tables.shape[0] != q.shape[0]:
        raise ValueError(f"block_tables has {block_tables.shape[0]} rows but q has B={q.shape[0]}")


def _check_cache(k_cache, v_cache) -> None:
    _check_dims("k_cache", k_cache, 4, "[num_blocks, block_size, H_kv, D]")
    if tuple(v_cache.shape) != tuple(k_cache.shape) or v_cache.dtype != k_cache.dtype:
        raise ValueError(f"v_cache {tuple(v_cache.shape)} {v_cache.dtype} must match k_cache "
                         f"{tuple(k_cache.shape)} {k_cache.dtype}")
    _check_float("k_cache", k_cache)
    if k_cache.shape[1] < 1:
        raise ValueError(f"block_size (k_cache.shape[1]) must be >= 1, got {k_cache.shape[1]}")


def _check_dims(name: str, t: torch.Tensor, ndim: int, layout: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor {layout}, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must be {layout}, got shape {tuple(t.shape)}")


def _check_float(name: str, t: torch.Tensor) -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16 or float32, got {t.dtype}")


def _check_index(name: str, t, shape: tuple[int, ...], layout: str) -> None:
    _check_dims(name, t, len(shape), layout)
    if tuple(t.shape) != shape:
        raise ValueError(f"{name} must be {layout} = {shape}, got shape {tuple(t.shape)}")
    if t.dtype not in INDEX_DTYPES:
        raise ValueError(f"{name} must be int32 (or int64), got {t.dtype}")


def _check_devices(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name} on {dev}" for name, dev in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
