"""Torch backend: the reference implementation, and the CPU product path.

Vectorised: blocks are gathered with index ops, attention runs in float32 through torch's fused
CPU attention (one pass with an online softmax, returning its log-sum-exp; the mask is an
additive 0 / -inf bias), or as batched matmul + softmax where that is missing or on another
device. A decode step's gathers, masks and write slots are planned once and reused by every
layer (`_Plans`). Unlike the Triton backend it also checks tensor *values* (block tables cover the
lengths, slots lie in the pool), which costs a host synchronisation on CUDA tensors; with
`validate=False` it checks nothing (the caller checked once per step).
"""

from __future__ import annotations

import threading
from itertools import pairwise

import torch

from kernels.checks import check_decode, check_merge, check_prefill, check_write

NEG_INF = float("-inf")
# KV is attended in chunks of whole blocks: at most this many gathered K elements (float32)
# and score elements at once, so long contexts never materialise their whole KV again.
GATHER_BUDGET = 1 << 21
SCORE_BUDGET = 1 << 23


def paged_attention_partial(q, k_cache, v_cache, block_tables, seq_lens, scale, validate=True):
    """Decode attention over paged KV; shapes as in `kernels.paged_attention_partial`."""
    if validate:
        check_decode(q, k_cache, v_cache, block_tables, seq_lens)
        _check_tables(block_tables, seq_lens.long(), k_cache, "seq_lens[{}]")
    if k_cache.is_contiguous() and v_cache.is_contiguous() and q.shape[0]:
        return _attend_planned(q, k_cache, v_cache, _decode_plan(block_tables, seq_lens, k_cache),
                               scale)
    return _attend_tokens(q, k_cache, v_cache, block_tables, seq_lens.long(), scale)


def paged_prefill_partial(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens, scale,
                          validate=True):
    """Chunked-prefill attention over paged KV; shapes as in `kernels.paged_prefill_partial`."""
    if validate:
        check_prefill(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens)
        _check_prefill_values(cu_seqlens_q.tolist(), block_tables, kv_lens.long(), k_cache,
                              q.shape[0])
    group = q.shape[1] // k_cache.shape[2]
    singles, sequences = _prefill_plan(block_tables, cu_seqlens_q, kv_lens, group)
    out = q.new_zeros(q.shape)
    lse = torch.full(q.shape[:2], NEG_INF, dtype=torch.float32, device=q.device)
    if singles is not None:      # sequences with one query token (decode rows), in one batch
        rows, tables, lens = singles
        out[rows], lse[rows] = paged_attention_partial(q[rows], k_cache, v_cache, tables, lens,
                                                       scale, validate=False)
    for rows, table, row_lens, max_len in sequences:
        out[rows], lse[rows] = _attend_sequence(q[rows], k_cache, v_cache, table, row_lens, scale,
                                                max_len)
    return out, lse


def _prefill_plan(block_tables, cu_seqlens_q, kv_lens, group: int):
    """A mixed step's split, once per step (the only host syncs): the single-token sequences
    (their rows, tables and lengths, or None) and, per longer sequence, its rows, its table
    [1, M], its rows' lengths per (token, group row) [1, T * group] and their maximum."""
    def build():
        cu = cu_seqlens_q.tolist()
        lens = kv_lens.long()
        dev = kv_lens.device
        ones = [b for b in range(len(cu) - 1) if cu[b + 1] - cu[b] == 1]
        singles = None
        if ones:
            rows = torch.tensor([cu[b] for b in ones], device=dev)
            singles = (rows, block_tables[torch.tensor(ones, device=dev)], kv_lens[rows])
        sequences = []
        for b in range(len(cu) - 1):
            if cu[b + 1] - cu[b] > 1:
                row_lens = lens[cu[b]:cu[b + 1]]
                sequences.append((slice(cu[b], cu[b + 1]), block_tables[b][None],
                                  row_lens.repeat_interleave(group)[None], int(row_lens.max())))
        return singles, sequences
    return _plans.get("prefill", (block_tables, cu_seqlens_q, kv_lens), (group,), build)


def merge_attention_states(outs, lses, validate=True):
    """Exact merge of partials; shapes as in `kernels.merge_attention_states`."""
    if validate:
        check_merge(outs, lses)
    lses = lses.float()
    lse = torch.logsumexp(lses, dim=0)
    weights = torch.exp(lses - lse.masked_fill(lse == NEG_INF, 0.0))  # exactly 0 where lse_i=-inf
    terms = (outs.float() * weights.unsqueeze(-1)).masked_fill((weights == 0).unsqueeze(-1), 0.0)
    return terms.sum(dim=0).to(outs.dtype), lse


def write_kv(k, v, k_cache, v_cache, slot_mapping, validate=True):
    """Scatters k, v [N, H_kv, D] into the caches at `slot_mapping` [N] (-1 = skip), in place."""
    if validate:
        check_write(k, v, k_cache, v_cache, slot_mapping)
    if not validate and k_cache.is_contiguous() and v_cache.is_contiguous():
        keep, slots = _write_plan(slot_mapping)
        kk, vv = (k, v) if keep is None else (k.index_select(0, keep), v.index_select(0, keep))
        rows = k_cache.shape[2:]
        k_cache.view(-1, *rows).index_copy_(0, slots, kk.to(k_cache.dtype))
        v_cache.view(-1, *rows).index_copy_(0, slots, vv.to(v_cache.dtype))
        return
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    num_slots = k_cache.shape[0] * k_cache.shape[1]
    if validate and slots.numel() and int(slots.max()) >= num_slots:
        raise ValueError(f"slot_mapping holds slot {int(slots.max())} but the pool has only "
                         f"{num_slots} slots ({k_cache.shape[0]} blocks x {k_cache.shape[1]})")
    blocks, offsets = slots // k_cache.shape[1], slots % k_cache.shape[1]
    k_cache[blocks, offsets] = k[keep]
    v_cache[blocks, offsets] = v[keep]


class _Plans(threading.local):
    """What the layers of one step share, built by the step's first call on each thread: the
    same block tables and lengths come back for every layer. Keyed by the tensors themselves
    (identity and in-place version), so a changed or new table is planned again."""
    MAX = 8

    def __init__(self):
        self.entries: list = []

    def get(self, kind: str, tensors: tuple, extra: tuple, build):
        try:
            key = (kind, extra, tuple(t._version for t in tensors))
        except RuntimeError:         # inference-mode tensors keep no version: never reused
            return build()
        for i, (k, ts, plan) in enumerate(self.entries):
            if k == key and all(a is b for a, b in zip(ts, tensors)):
                if i:
                    self.entries.insert(0, self.entries.pop(i))
                return plan
        plan = build()
        self.entries.insert(0, (key, tensors, plan))
        del self.entries[self.MAX:]
        return plan


_plans = _Plans()


def _decode_plan(tables, seq_lens, cache):
    """Per chunk of whole blocks (as `_attend_paged`): its length L (whole blocks), the pages to
    gather [N, L / block_size], the additive mask [N, 1, 1, L] (0 where a query sees the key,
    -inf past its length), and the queries that see none of it ([N, 1, 1], or None when all see
    some). One host sync, per step."""
    block_size = cache.shape[1]

    def build():
        lens = seq_lens.long()
        num_rows = tables.shape[0]
        max_len = int(lens.max())
        chunk = _chunk_tokens(num_rows, cache.shape[2], 1, cache.shape[3], block_size)
        chunks = []
        for start in range(0, max_len, chunk):
            end = min(start + chunk, max_len)
            pages = _pages(tables, start, end, block_size)                     # [N, L / bs]
            positions = torch.arange(start, start + pages.shape[1] * block_size,
                                     device=cache.device)
            seen = positions < lens[:, None]                                    # [N, L]
            bias = torch.zeros(seen.shape, device=cache.device).masked_fill_(~seen, NEG_INF)
            none_seen = (lens <= start)[:, None, None]                          # [N, 1, 1]
            chunks.append((pages, bias[:, None, None, :],
                           none_seen if bool(none_seen.any()) else None))
        return chunks
    return _plans.get("decode", (tables, seq_lens), (tuple(cache.shape[1:]), cache.device),
                      build)


def _write_plan(slot_mapping):
    """(indices of the rows to write, or None for all; their flat slots), once per step."""
    def build():
        keep = slot_mapping >= 0
        slots = slot_mapping[keep].long()
        return (None if bool(keep.all()) else keep.nonzero().flatten()), slots
    return _plans.get("write", (slot_mapping,), (), build)


def _attend_planned(q, k_cache, v_cache, chunks, scale):
    """`_attend_tokens` with the step's plan (contiguous caches): per chunk two gathers of whole
    blocks, the masked attention partial; chunks merged exactly."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    grouped = q.reshape(num_rows, num_kv_heads, num_heads // num_kv_heads, head_dim).float()
    out = lse = None
    for pages, bias, none_seen in chunks:
        k, v = (_gather_pages(cache, pages) for cache in (k_cache, v_cache))
        part_out, part_lse = _partial(grouped, k, v, bias, none_seen, scale)
        out, lse = (part_out, part_lse) if out is None else _merge_two(out, lse, part_out,
                                                                        part_lse)
    if out is None:                  # no query sees any key
        return q.new_zeros(q.shape), q.new_full((num_rows, num_heads), NEG_INF,
                                                dtype=torch.float32)
    return out.reshape(num_rows, num_heads, head_dim).to(q.dtype), lse.reshape(num_rows, num_heads)


def _attend_tokens(q, k_cache, v_cache, tables, lens, scale):
    """One query token per row: q [N, H, D], tables [N, M], lens [N] -> out, lse."""
    num_rows, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    grouped = q.reshape(num_rows, num_kv_heads, group, head_dim).float()
    out, lse = _attend_paged(grouped, k_cache, v_cache, tables, lens[:, None].expand(-1, group),
                             scale)
    return out.reshape(num_rows, num_heads, head_dim).to(q.dtype), lse.reshape(num_rows, num_heads)


def _attend_sequence(q, k_cache, v_cache, table, row_lens, scale, max_len):
    """Query tokens of one sequence: q [T, H, D], table [1, M], row_lens [1, T * group] (per
    token and group row, as `_prefill_plan`), their maximum -> out, lse [T, H]."""
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    group = num_heads // num_kv_heads
    rows = q.float().reshape(num_tokens, num_kv_heads, group, head_dim).transpose(0, 1)
    rows = rows.reshape(1, num_kv_heads, num_tokens * group, head_dim)       # row = (token, g)
    out, lse = _attend_paged(rows, k_cache, v_cache, table, row_lens, scale, max_len)
    out = out.reshape(num_kv_heads, num_tokens, group, head_dim).transpose(0, 1)
    lse = lse.reshape(num_kv_heads, num_tokens, group).transpose(0, 1)
    return out.reshape(num_tokens, num_heads, head_dim).to(q.dtype), lse.reshape(num_tokens, -1)


def _attend_paged(q, k_cache, v_cache, tables, row_lens, scale, max_len=None):
    """q [N, H_kv, R, D] float32; row r of n sees the first row_lens[n, r] tokens of tables[n]
    (`max_len`: their maximum, when the caller knows it).

    Walks the KV in chunks (whole blocks) so that gathered K/V and scores stay within their
    budgets, merging chunk partials exactly. -> out [N, H_kv, R, D], lse [N, H_kv, R]."""
    num_rows, num_kv_heads, rows_per, head_dim = q.shape
    block_size = k_cache.shape[1]
    if max_len is None:
        max_len = int(row_lens.max()) if row_lens.numel() else 0
    chunk = _chunk_tokens(num_rows, num_kv_heads, rows_per, head_dim, block_size)
    out = q.new_zeros(q.shape)
    lse = q.new_full(q.shape[:3], NEG_INF)
    for start in range(0, max_len, chunk):
        end = min(start + chunk, max_len)
        k, v = (_gather(cache, tables, start, end) for cache in (k_cache, v_cache))
        part = _attend(q, k, v, row_lens - start, scale)
        out, lse = part if start == 0 else _merge_two(out, lse, *part)
    return out, lse


def _chunk_tokens(num_rows, num_kv_heads, rows_per, head_dim, block_size) -> int:
    """KV tokens attended at once (whole blocks) within the gather and score budgets."""
    per_token = max(1, num_rows * num_kv_heads * max(head_dim, rows_per))
    return max(1, min(GATHER_BUDGET, SCORE_BUDGET) // per_token // block_size) * block_size


def _attend(q, k, v, row_lens, scale):
    """q [N, H_kv, R, D], k/v [N, H_kv, L, D] float32; row r sees keys [0, row_lens[n, r]).

    Returns out [N, H_kv, R, D] (0 where a row sees nothing) and lse [N, H_kv, R] (-inf there)."""
    positions = torch.arange(k.shape[2], device=q.device)
    hidden = positions >= row_lens[:, None, :, None]                           # [N, 1, R, L]
    bias = torch.zeros(hidden.shape, device=q.device).masked_fill_(hidden, NEG_INF)
    return _partial(q, k, v, bias, (row_lens <= 0)[:, None, :], scale)


_FLASH = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)


def _partial(q, k, v, bias, empty, scale):
    """Attention of q [N, H_kv, R, D] over k/v [N, H_kv, L, D] (float32) with an additive mask
    `bias` (0 / -inf, broadcast to [N, H_kv, R, L]) -> out, lse [N, H_kv, R]. The rows in
    `empty` (broadcast to [N, H_kv, R]; None: there are none) see nothing: out 0, lse -inf.

    On CPU torch's fused attention (one pass, online softmax, its log-sum-exp); elsewhere, or
    where torch lacks it, matmul and an exact softmax."""
    if _FLASH is not None and q.device.type == "cpu":
        out, lse = _FLASH(q, k, v, 0.0, False, attn_mask=bias, scale=scale)
        if empty is not None:
            out.masked_fill_(empty[..., None], 0.0)
            lse.masked_fill_(empty, NEG_INF)
        return out, lse
    scores = torch.matmul(q, k.transpose(-1, -2)).mul_(scale).add_(bias)     # [N, H_kv, R, L]
    lse = torch.logsumexp(scores, dim=-1)
    shift = lse if empty is None else lse.masked_fill(lse == NEG_INF, 0.0)
    return torch.matmul(torch.exp(scores.sub_(shift.unsqueeze(-1))), v), lse


def _merge_two(out_a, lse_a, out_b, lse_b):
    """Exact merge of two partials of the same rows (either may be over no tokens)."""
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(lse == NEG_INF, 0.0)
    w_a, w_b = torch.exp(lse_a - safe).unsqueeze(-1), torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a.mul_(w_a).add_(out_b.mul_(w_b)), lse


def _gather(cache, tables, start, end):
    """Tokens [start, end) of each table, `start` on a block boundary: cache [num_blocks, bs,
    H_kv, D], tables [N, M] -> float32 [N, H_kv, L, D], L = end - start rounded up to whole
    blocks (a contiguous cache) or exactly (one that is not); positions past a table's use read
    block 0. Either way the caller masks every position past a row's length."""
    block_size = cache.shape[1]
    if cache.is_contiguous():
        return _gather_pages(cache, _pages(tables, start, end, block_size))
    positions = torch.arange(start, end, device=cache.device)
    pages = tables[:, positions // block_size].long().clamp_min(0)            # [N, L]
    tokens = cache[pages, positions % block_size]                              # [N, L, H_kv, D]
    return tokens.transpose(1, 2).to(torch.float32, memory_format=torch.contiguous_format)


def _pages(tables, start, end, block_size):
    """The blocks holding tokens [start, end) of each table (`start` on a block boundary), -1
    (unused) read as block 0: [N, ceil(end / bs) - start / bs]."""
    first, stop = start // block_size, -(-end // block_size)
    return tables[:, first:stop].long().clamp_min(0)


def _gather_pages(cache, pages):
    """Whole blocks `pages` [N, P] of a contiguous cache [num_blocks, bs, H_kv, D] in one
    index_select of block-sized rows -> float32 [N, H_kv, P * bs, D], head-major as a strided view
    (the attention kernels read strides; only the last dimension must be dense)."""
    num_blocks, block_size, num_kv_heads, head_dim = cache.shape
    blocks = cache.view(num_blocks, -1).index_select(0, pages.reshape(-1))
    tokens = blocks.view(pages.shape[0], pages.shape[1] * block_size, num_kv_heads, head_dim)
    return tokens.transpose(1, 2).float()


def _check_tables(tables, lens, cache, what: str) -> None:
    """Every block a length needs must be a real block of the pool (not -1, not past its end)."""
    num_blocks, block_size = cache.shape[0], cache.shape[1]
    needed = (lens + block_size - 1) // block_size
    if needed.numel() and int(needed.max()) > tables.shape[1]:
        row = int(needed.argmax())
        raise ValueError(f"{what.format(row)}={int(lens[row])} needs {int(needed[row])} blocks of "
                         f"{block_size} tokens but block_tables has only {tables.shape[1]} columns")
    used = torch.arange(tables.shape[1], device=tables.device)[None, :] < needed[:, None]
    bad = used & ((tables < 0) | (tables >= num_blocks))
    if bool(bad.any()):
        row, col = (int(i) for i in bad.nonzero()[0])
        raise ValueError(f"block_tables[{row}, {col}] = {int(tables[row, col])} is not a block "
                         f"of the pool (0..{num_blocks - 1}) but {what.format(row)}="
                         f"{int(lens[row])} uses it")


def _check_prefill_values(cu: list[int], tables, lens, cache, num_tokens: int) -> None:
    """cu_seqlens_q rises from 0 to T; each sequence's table covers its longest kv_lens."""
    if cu[0] != 0 or cu[-1] != num_tokens or any(b < a for a, b in pairwise(cu)):
        raise ValueError(f"cu_seqlens_q must rise from 0 to T={num_tokens}, got {cu}")
    q_lens = torch.tensor([b - a for a, b in pairwise(cu)], device=lens.device)
    seq_ids = torch.repeat_interleave(torch.arange(len(q_lens), device=lens.device), q_lens)
    seq_max = torch.zeros_like(q_lens).scatter_reduce_(0, seq_ids, lens, "amax")
    _check_tables(tables, seq_max, cache, "the longest kv_lens of sequence {}")
