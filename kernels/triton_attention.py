"""Triton attention over paged KV: one kernel for decode and chunked prefill.

A program owns one tile of query tokens of one sequence, all query heads of one KV head (the GQA
group: each K/V tile is loaded once and used by every head of the group), and one split of the
KV sequence (flash-decoding). It walks its split in tiles of BLOCK_N tokens, gathering each token
from its page through the block table (so any block size works, powers of two or not), with an
online softmax in fp32. With several splits, the partial (out, lse) of each split are merged by
the merge kernel.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from kernels.checks import check_decode, check_prefill
from kernels.triton_launch import (
    check_cache_layout,
    check_launchable,
    dot_precision,
    is_interpreted,
    launch,
    next_pow2,
    num_sms,
)
from kernels.triton_merge import merge_into

# (query rows = tokens x heads of a group per prefill tile, KV tokens per inner-loop tile).
# fp32 takes smaller tiles: its full-precision dot runs on FMA units and would spill registers.
TILES = {torch.float16: (64, 64), torch.bfloat16: (64, 64), torch.float32: (16, 16)}
MIN_DOT_ROWS = 16         # tl.dot needs M >= 16: small GQA groups are padded up to it
MIN_SPLIT_TOKENS = 256    # a split shorter than this costs more to merge than it saves
MAX_SPLITS = 64
PROGRAMS_PER_SM = 8       # enough resident programs per SM to hide memory latency
SEARCH_WIDTH = tl.constexpr(128)  # sequences scanned per step when a tile finds its sequence
LN2 = tl.constexpr(0.6931471805599453)
LOG2E = 1.4426950408889634


@triton.jit
def _locate_tile(tile, cu_q_ptr, tile_starts_ptr, num_seqs,
                 BLOCK_Q: tl.constexpr, IS_DECODE: tl.constexpr):
    """-> (sequence, first query row, end of the sequence's rows) of query tile `tile`."""
    if IS_DECODE:   # tile b = sequence b = query row b; cu_q_ptr and tile_starts_ptr unused
        seq = tile
        q_start = tile
        q_end = tile + 1
    else:
        seq = tile * 0
        for j in range(0, num_seqs, SEARCH_WIDTH):
            offs = j + tl.arange(0, SEARCH_WIDTH)
            ends = tl.load(tile_starts_ptr + 1 + offs, mask=offs < num_seqs, other=2147483647)
            seq += tl.sum((ends <= tile).to(tl.int32), axis=0)
        seq = tl.minimum(seq, num_seqs - 1)  # tiles past the last are left with no rows
        q_start = tl.load(cu_q_ptr + seq) + (tile - tl.load(tile_starts_ptr + seq)) * BLOCK_Q
        q_end = tl.load(cu_q_ptr + seq + 1)
    return seq, q_start, q_end


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # The Triton interpreter multiplies bf16 operands as raw uint16 bits; it gets fp32 instead.
    if UPCAST:
        c = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        c = tl.dot(a, b, input_precision=DOT_PRECISION)
    return c


@triton.jit
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, tables_ptr, kv_lens_ptr, cu_q_ptr, tile_starts_ptr, out_ptr, lse_ptr,
        num_seqs, max_blocks, split_len, qk_scale,
        stride_qt, stride_qh, stride_qd, stride_kb, stride_ks, stride_kh,
        stride_vb, stride_vs, stride_vh, stride_tb,
        stride_os, stride_ot, stride_oh, stride_ls, stride_lt,
        GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
        D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_Q: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, IS_DECODE: tl.constexpr,
        DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    tile, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq, q_start, q_end = _locate_tile(tile, cu_q_ptr, tile_starts_ptr, num_seqs, BLOCK_Q,
                                       IS_DECODE)
    # Row r of the tile is query token q_start + r // GROUP_PAD, head (r % GROUP_PAD) of the group.
    rows = tl.arange(0, BLOCK_M)
    tok = (q_start + rows // GROUP_PAD).to(tl.int64)
    head = kv_head * GROUP + rows % GROUP_PAD
    row_ok = (rows % GROUP_PAD < GROUP) & (tok < q_end)
    d = tl.arange(0, D_PAD)
    d_ok = d < HEAD_DIM
    q_off = tok[:, None] * stride_qt + head[:, None] * stride_qh + d[None, :] * stride_qd
    q = tl.load(q_ptr + q_off, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    # Row r sees KV tokens [lo, row_hi): its own length, cut to this program's split.
    lo = split * split_len
    row_hi = tl.minimum(tl.load(kv_lens_ptr + tok, mask=row_ok, other=0), lo + split_len)
    hi = tl.max(row_hi, axis=0)

    m_i = tl.full((BLOCK_M,), float("-inf"), tl.float32)
    l_i = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, D_PAD), tl.float32)
    table_row = tables_ptr + seq.to(tl.int64) * stride_tb
    for start in range(lo, hi, BLOCK_N):
        n = start + tl.arange(0, BLOCK_N)
        column = n // BLOCK_SIZE
        page = tl.load(table_row + column, mask=(n < hi) & (column < max_blocks), other=-1)
        n_ok = page >= 0                     # never dereference -1 (or past the table)
        page = page.to(tl.int64)
        k_off = page * stride_kb + (n % BLOCK_SIZE) * stride_ks + kv_head * stride_kh
        kt = tl.load(k_ptr + k_off[None, :] + d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                     other=0.0)
        s = _dot(q, kt, DOT_PRECISION, UPCAST_DOT) * qk_scale    # log2 units
        s = tl.where(n[None, :] < row_hi[:, None], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)         # rows that see nothing yet
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v_off = page * stride_vb + (n % BLOCK_SIZE) * stride_vs + kv_head * stride_vh
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                    other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, DOT_PRECISION, UPCAST_DOT)
        m_i = m_new

    seen = l_i > 0
    l_safe = tl.where(seen, l_i, 1.0)
    out = acc / l_safe[:, None]
    lse = tl.where(seen, (m_i + tl.log2(l_safe)) * LN2, float("-inf"))
    out_off = split * stride_os + tok[:, None] * stride_ot + head[:, None] * stride_oh + d[None, :]
    tl.store(out_ptr + out_off, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + split * stride_ls + tok * stride_lt + head, lse, mask=row_ok)


def paged_attention_partial(q, k_cache, v_cache, block_tables, seq_lens, scale,
                            num_splits: int | None = None, validate: bool = True):
    """Decode attention of q [B, H, D] over the first seq_lens[b] tokens of block_tables[b].

    k_cache, v_cache [num_blocks, block_size, H_kv, D] (last dim contiguous); block_tables
    [B, max_blocks] int32 (-1 = unused); seq_lens [B] int32. Returns out [B, H, D] in q.dtype
    and lse [B, H] float32 (-inf and out 0 where seq_lens is 0). num_splits overrides the
    flash-decoding split count (default: enough programs to fill the device).
    """
    if validate:
        check_decode(q, k_cache, v_cache, block_tables, seq_lens)
    check_launchable(_paged_attention_kernel, q.device, "paged_attention_partial")
    check_cache_layout(k_cache, v_cache, "paged_attention_partial")
    # In decode mode the kernel maps tile b to row b itself: the two index tensors go unread.
    tiling = _Tiling(seq_lens, seq_lens, num_tiles=q.shape[0], block_q=1, is_decode=True)
    return _attend(q, k_cache, v_cache, block_tables, seq_lens, tiling, scale, num_splits)


def paged_prefill_partial(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale,
                          num_splits: int | None = None, validate: bool = True):
    """Chunked-prefill attention: query token t of q [T, H, D] sees the first kv_lens[t] tokens
    of its sequence's block table.

    cu_seqlens_q [B + 1] int32 (sequence b owns rows cu[b]:cu[b+1]); block_tables [B, max_blocks]
    int32; kv_lens [T] int32. Returns out [T, H, D] in q.dtype and lse [T, H] float32.
    """
    if validate:
        check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens)
    check_launchable(_paged_attention_kernel, q.device, "paged_prefill_partial")
    check_cache_layout(k_cache, v_cache, "paged_prefill_partial")
    group = q.shape[1] // k_cache.shape[2]
    block_q = max(1, TILES[q.dtype][0] // next_pow2(group))
    tiles = (cu_seqlens_q[1:] - cu_seqlens_q[:-1] + block_q - 1) // block_q
    tile_starts = torch.cat([tiles.new_zeros(1), torch.cumsum(tiles, 0)]).to(torch.int32)
    num_tiles = triton.cdiv(q.shape[0], block_q) + block_tables.shape[0]   # >= sum(tiles)
    tiling = _Tiling(cu_seqlens_q, tile_starts, num_tiles, block_q, is_decode=False)
    return _attend(q, k_cache, v_cache, block_tables, kv_lens, tiling, scale, num_splits)


class _Tiling(NamedTuple):
    """Query tiles: sequence b owns tiles tile_starts[b]:tile_starts[b+1], block_q tokens each."""
    cu_q: torch.Tensor          # [B + 1] first query row of each sequence
    tile_starts: torch.Tensor   # [B + 1]
    num_tiles: int              # grid size: at least tile_starts[B], no device sync to know it
    block_q: int
    is_decode: bool             # one token per sequence, tile b = sequence b


def _attend(q, k_cache, v_cache, tables, kv_lens, tiling: _Tiling, scale, num_splits):
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads, block_size = k_cache.shape[2], k_cache.shape[1]
    out = torch.empty((num_tokens, num_heads, head_dim), dtype=q.dtype, device=q.device)
    lse = torch.empty((num_tokens, num_heads), dtype=torch.float32, device=q.device)
    if num_tokens == 0:
        return out, lse
    max_kv = tables.shape[1] * block_size
    block_n = TILES[q.dtype][1]
    splits, split_len = _plan_splits(tiling.num_tiles * num_kv_heads, max_kv, q.device, block_n,
                                     num_splits)
    if splits == 1:
        part_out, part_lse = out[None], lse[None]
    else:
        part_out = torch.empty((splits, *out.shape), dtype=torch.float32, device=q.device)
        part_lse = torch.empty((splits, *lse.shape), dtype=torch.float32, device=q.device)
    group = num_heads // num_kv_heads
    group_pad = next_pow2(group)
    launch(
        _paged_attention_kernel, (tiling.num_tiles, num_kv_heads, splits),
        q, k_cache, v_cache, tables, kv_lens, tiling.cu_q, tiling.tile_starts, part_out, part_lse,
        tables.shape[0], tables.shape[1], split_len, scale * LOG2E,
        *q.stride(), *k_cache.stride()[:3], *v_cache.stride()[:3], tables.stride(0),
        *part_out.stride()[:3], *part_lse.stride()[:2],
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=head_dim, D_PAD=max(16, next_pow2(head_dim)),
        BLOCK_SIZE=block_size, BLOCK_Q=tiling.block_q,
        BLOCK_M=max(MIN_DOT_ROWS, tiling.block_q * group_pad), BLOCK_N=block_n,
        IS_DECODE=tiling.is_decode, DOT_PRECISION=dot_precision(q.dtype),
        UPCAST_DOT=q.dtype == torch.bfloat16 and is_interpreted(_paged_attention_kernel),
        num_warps=4, num_stages=3 if tiling.is_decode else 2)
    if splits > 1:
        merge_into(part_out.view(splits, -1, head_dim), part_lse.view(splits, -1),
                   out.view(-1, head_dim), lse.view(-1))
    return out, lse


def _plan_splits(num_programs: int, max_kv: int, device: torch.device, block_n: int,
                 num_splits: int | None) -> tuple[int, int]:
    """-> (splits, tokens per split). Splits the KV sequence until the device has about
    PROGRAMS_PER_SM programs per SM, but never below MIN_SPLIT_TOKENS per split."""
    if max_kv <= 0:
        return 1, 1
    if num_splits is not None:
        split_len = triton.cdiv(max_kv, max(1, num_splits))
        return triton.cdiv(max_kv, split_len), split_len
    wanted = triton.cdiv(PROGRAMS_PER_SM * num_sms(device), max(num_programs, 1))
    splits = max(1, min(wanted, triton.cdiv(max_kv, MIN_SPLIT_TOKENS), MAX_SPLITS))
    split_len = triton.cdiv(triton.cdiv(max_kv, splits), block_n) * block_n
    return triton.cdiv(max_kv, split_len), split_len
