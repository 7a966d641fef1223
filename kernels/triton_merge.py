"""Triton merge of attention partials.

LSE = logsumexp_i(lse_i), out = sum_i exp(lse_i - LSE) * o_i, as one online pass over i.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.checks import check_merge
from kernels.triton_launch import check_launchable, launch, next_pow2

ELEMENTS_PER_PROGRAM = 2048   # rows x padded D held by one program


@triton.jit
def _merge_kernel(outs_ptr, lses_ptr, out_ptr, lse_ptr, num_parts, num_rows,
                  stride_ps, stride_pr, stride_pd, stride_ls, stride_lr, stride_or, stride_od,
                  HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_rows
    rows = rows.to(tl.int64)
    d = tl.arange(0, D_PAD)
    mask = row_ok[:, None] & (d < HEAD_DIM)[None, :]
    m = tl.full((BLOCK_R,), float("-inf"), tl.float32)
    total = tl.zeros((BLOCK_R,), tl.float32)
    acc = tl.zeros((BLOCK_R, D_PAD), tl.float32)
    for part in range(num_parts):
        lse_p = tl.load(lses_ptr + part * stride_ls + rows * stride_lr, mask=row_ok,
                        other=float("-inf")).to(tl.float32)
        o_off = part * stride_ps + rows[:, None] * stride_pr + d[None, :] * stride_pd
        o = tl.load(outs_ptr + o_off, mask=mask, other=0.0).to(tl.float32)
        m_new = tl.maximum(m, lse_p)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - m_safe)
        w = tl.exp(lse_p - m_safe)                 # 0 for a partial over no tokens
        acc = acc * alpha[:, None] + tl.where(w[:, None] > 0, w[:, None] * o, 0.0)
        total = total * alpha + w
        m = m_new
    seen = total > 0
    total_safe = tl.where(seen, total, 1.0)
    tl.store(out_ptr + rows[:, None] * stride_or + d[None, :] * stride_od,
             (acc / total_safe[:, None]).to(out_ptr.dtype.element_ty), mask=mask)
    tl.store(lse_ptr + rows, tl.where(seen, m + tl.log(total_safe), float("-inf")), mask=row_ok)


def merge_attention_states(outs, lses, validate: bool = True):
    """Merges S partials: outs [S, ..., D], lses [S, ...] -> out [..., D] (outs.dtype), lse [...]
    float32. A partial with lse -inf contributes nothing; all -inf gives out 0, lse -inf."""
    if validate:
        check_merge(outs, lses)
    check_launchable(_merge_kernel, outs.device, "merge_attention_states")
    num_parts, lead, head_dim = outs.shape[0], outs.shape[1:-1], outs.shape[-1]
    out = torch.empty((*lead, head_dim), dtype=outs.dtype, device=outs.device)
    lse = torch.empty(lead, dtype=torch.float32, device=outs.device)
    merge_into(outs.reshape(num_parts, -1, head_dim), lses.reshape(num_parts, -1),
               out.view(-1, head_dim), lse.view(-1))
    return out, lse


def merge_into(outs, lses, out, lse) -> None:
    """outs [S, R, D], lses [S, R] -> writes out [R, D] and lse [R] (contiguous float32)."""
    num_rows, head_dim = out.shape
    if num_rows == 0:
        return
    d_pad = next_pow2(head_dim)
    block_r = max(1, min(ELEMENTS_PER_PROGRAM // d_pad, next_pow2(num_rows)))
    launch(
        _merge_kernel, (triton.cdiv(num_rows, block_r),),
        outs, lses, out, lse, outs.shape[0], num_rows, *outs.stride(), *lses.stride(),
        *out.stride(), HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_R=block_r)
