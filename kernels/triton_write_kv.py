"""Triton scatter of new tokens' k/v into the paged cache (exact copy, in place)."""

from __future__ import annotations

import triton
import triton.language as tl

from kernels.checks import check_write
from kernels.triton_launch import check_launchable, launch, next_pow2

ELEMENTS_PER_PROGRAM = 4096   # tokens x padded (H_kv x D) copied by one program


@triton.jit
def _write_kv_kernel(k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, num_tokens, num_slots,
                     stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
                     stride_kcb, stride_kcs, stride_kch, stride_kcd,
                     stride_vcb, stride_vcs, stride_vch, stride_vcd,
                     NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                     D_PAD: tl.constexpr, HD_PAD: tl.constexpr, BLOCK_T: tl.constexpr):
    # Row = one token; column = (head, dim) flattened, padded to HD_PAD = H_PAD * D_PAD.
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    slots = tl.load(slots_ptr + tokens, mask=tokens < num_tokens, other=-1).to(tl.int64)
    ok = (slots >= 0) & (slots < num_slots)          # -1 (and past the pool): skip
    blocks, offsets = slots // BLOCK_SIZE, slots % BLOCK_SIZE
    cols = tl.arange(0, HD_PAD)
    h, d = cols // D_PAD, cols % D_PAD
    mask = ok[:, None] & ((h < NUM_KV_HEADS) & (d < HEAD_DIM))[None, :]
    t = tokens.to(tl.int64)[:, None]
    k = tl.load(k_ptr + t * stride_kt + (h * stride_kh + d * stride_kd)[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + (h * stride_vh + d * stride_vd)[None, :], mask=mask)
    k_dst = blocks[:, None] * stride_kcb + offsets[:, None] * stride_kcs
    v_dst = blocks[:, None] * stride_vcb + offsets[:, None] * stride_vcs
    tl.store(k_cache_ptr + k_dst + (h * stride_kch + d * stride_kcd)[None, :], k, mask=mask)
    tl.store(v_cache_ptr + v_dst + (h * stride_vch + d * stride_vcd)[None, :], v, mask=mask)


def write_kv(k, v, k_cache, v_cache, slot_mapping, validate: bool = True):
    """Copies k, v [N, H_kv, D] into k_cache, v_cache [num_blocks, block_size, H_kv, D] at
    slot_mapping [N] int64 (slot = block * block_size + offset; -1 = skip), in place.

    Slots past the pool are skipped too (the kernel cannot raise; the torch backend does)."""
    if validate:
        check_write(k, v, k_cache, v_cache, slot_mapping)
    check_launchable(_write_kv_kernel, k.device, "write_kv")
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    d_pad = next_pow2(head_dim)
    hd_pad = next_pow2(num_kv_heads) * d_pad
    block_t = max(1, min(ELEMENTS_PER_PROGRAM // hd_pad, next_pow2(num_tokens)))
    launch(
        _write_kv_kernel, (triton.cdiv(num_tokens, block_t),),
        k, v, k_cache, v_cache, slot_mapping, num_tokens, k_cache.shape[0] * k_cache.shape[1],
        *k.stride(), *v.stride(), *k_cache.stride(), *v_cache.stride(),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, BLOCK_SIZE=k_cache.shape[1],
        D_PAD=d_pad, HD_PAD=hd_pad, BLOCK_T=block_t)
