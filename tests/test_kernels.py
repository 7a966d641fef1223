"""Kernels vs torch SDPA in float64, on random paged pools with permuted block tables.

Both backends run every case: "torch" directly, "triton" under TRITON_INTERPRET=1 on CPU (or
compiled on CUDA when run with TRITON_INTERPRET=0 on a GPU machine). Copies are checked
bit-exactly, maths with a tolerance per dtype.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

import kernels

# `import kernels` defines no Triton kernel yet (they load on first use), so this still counts.
os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = torch.device("cuda" if torch.cuda.is_available()
                      and os.environ["TRITON_INTERPRET"] != "1" else "cpu")
BACKENDS = ["torch", pytest.param("triton", marks=pytest.mark.skipif(
    not HAS_TRITON, reason="triton is not installed: the Triton backend cannot be tested"))]
TOL = {torch.float32: 1e-5, torch.float16: 3e-3, torch.bfloat16: 3e-2}
NUM_HEADS = 8
RATIOS = [1, 2, 4, 8]
BLOCK_SIZES = [1, 8, 16, 32]
HEAD_DIMS = [16, 64, 80, 128]
GRID = [(r, bs, d) for r in RATIOS for bs in BLOCK_SIZES for d in HEAD_DIMS]
DECODE_LENS = [37, 0, 97, 1, 64]


@dataclass
class Pool:
    k_cache: torch.Tensor      # [num_blocks, block_size, H_kv, D]
    v_cache: torch.Tensor
    tables: torch.Tensor       # [B, width] int32, -1 padded

    def contiguous(self, b: int, num_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """float64 k, v [num_tokens, H_kv, D] of sequence b, in table order."""
        bs = self.k_cache.shape[1]
        blocks = self.tables[b, :-(-num_tokens // bs)].long()
        k, v = (c[blocks].flatten(0, 1)[:num_tokens].double() for c in (self.k_cache, self.v_cache))
        return k, v


def make_pool(lens, block_size, num_kv_heads, head_dim, dtype=torch.float32, spare=3) -> Pool:
    """Random K/V; each sequence's blocks are a random, non-sorted subset of the pool."""
    needed = [-(-n // block_size) for n in lens]
    num_blocks = sum(needed) + spare
    perm = torch.randperm(num_blocks)
    tables = torch.full((len(lens), max(needed, default=0) + 1), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(needed):
        tables[b, :n] = perm[start:start + n].int()
        start += n
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k, v = torch.randn(shape).to(dtype), torch.randn(shape).to(dtype)
    return Pool(k.to(DEVICE), v.to(DEVICE), tables.to(DEVICE))


def sdpa_reference(q, k, v, scale, mask=None):
    """q [H, T, D], k/v [n, H_kv, D] -> float64 out [T, H, D] and lse [T, H] (SDPA, GQA).

    mask [T, n] bool (True = attend); rows that attend nothing get out 0, lse -inf."""
    q, k, v = q.double(), k.double().transpose(0, 1), v.double().transpose(0, 1)
    num_heads, num_q, _ = q.shape
    if mask is None:
        mask = torch.ones(num_q, k.shape[1], dtype=torch.bool, device=q.device)
    scores = q @ k.repeat_interleave(num_heads // k.shape[0], 0).transpose(1, 2) * scale
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)   # [H, T]
    empty = ~mask.any(-1)
    if k.shape[1] == 0:
        out = torch.zeros_like(q)
    else:
        mask = mask.clone()
        mask[empty] = True        # SDPA would give NaN for a row that sees nothing
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    out[:, empty] = 0
    return out.transpose(0, 1), lse.transpose(0, 1)


def decode_reference(q, pool: Pool, lens, scale):
    outs, lses = [], []
    for b, n in enumerate(lens):
        k, v = pool.contiguous(b, n)
        out, lse = sdpa_reference(q[b][:, None], k, v, scale)
        outs.append(out[0])
        lses.append(lse[0])
    return torch.stack(outs), torch.stack(lses)


def assert_attention_close(out, lse, ref_out, ref_lse, dtype):
    tol = TOL[dtype]
    assert out.dtype == dtype and lse.dtype == torch.float32
    torch.testing.assert_close(out.double(), ref_out, rtol=tol, atol=tol)
    torch.testing.assert_close(lse.double(), ref_lse, rtol=tol, atol=tol)


def run_decode(backend, ratio, block_size, head_dim, lens, dtype=torch.float32, **kw):
    pool = make_pool(lens, block_size, NUM_HEADS // ratio, head_dim, dtype)
    q = torch.randn(len(lens), NUM_HEADS, head_dim).to(dtype).to(DEVICE)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    scale = head_dim ** -0.5
    if kw:   # Triton-only knobs (num_splits) go to the backend function itself
        from kernels.triton_attention import paged_attention_partial
        out, lse = paged_attention_partial(q, pool.k_cache, pool.v_cache, pool.tables, seq_lens,
                                           scale, **kw)
    else:
        out, lse = kernels.paged_attention_partial(q, pool.k_cache, pool.v_cache, pool.tables,
                                                   seq_lens, scale, backend=backend)
    ref_out, ref_lse = decode_reference(q, pool, lens, scale)
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    return out, lse


# ---------------------------------------------------------------- decode

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio,block_size,head_dim", GRID)
def test_decode_matches_sdpa(backend, ratio, block_size, head_dim):
    torch.manual_seed(1000 * ratio + 10 * block_size + head_dim)
    out, lse = run_decode(backend, ratio, block_size, head_dim, DECODE_LENS)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))   # seq_len 0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_low_precision(backend, dtype):
    torch.manual_seed(7)
    run_decode(backend, 4, 16, 128, [97, 3, 0], dtype)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("num_splits", [2, 3, 7])
def test_decode_triton_splits(num_splits):
    torch.manual_seed(num_splits)
    run_decode("triton", 2, 16, 64, [300, 0, 129, 5, 17], num_splits=num_splits)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_llama_shape(backend):
    """The benchmark's head layout (H=32, H_kv=8, D=128, block 16) at a longer context."""
    torch.manual_seed(3)
    pool = make_pool([1000, 0, 333], 16, 8, 128)
    q = torch.randn(3, 32, 128, device=DEVICE)
    seq_lens = torch.tensor([1000, 0, 333], dtype=torch.int32, device=DEVICE)
    out, lse = kernels.paged_attention_partial(q, pool.k_cache, pool.v_cache, pool.tables,
                                               seq_lens, 128 ** -0.5, backend=backend)
    ref_out, ref_lse = decode_reference(q, pool, [1000, 0, 333], 128 ** -0.5)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float32)


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_block_size_not_power_of_two(backend):
    torch.manual_seed(5)
    run_decode(backend, 2, 5, 96, [23, 5, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_empty_batch(backend):
    pool = make_pool([], 16, 2, 16)
    q = torch.randn(0, 4, 16, device=DEVICE)
    seq_lens = torch.zeros(0, dtype=torch.int32, device=DEVICE)
    out, lse = kernels.paged_attention_partial(q, pool.k_cache, pool.v_cache, pool.tables,
                                               seq_lens, 0.25, backend=backend)
    assert out.shape == (0, 4, 16) and lse.shape == (0, 4)


def test_torch_backend_walks_kv_in_chunks(monkeypatch):
    """Long contexts are attended chunk by chunk (exact merge); force one block per chunk."""
    monkeypatch.setattr("kernels.reference.GATHER_BUDGET", 1)
    torch.manual_seed(4)
    run_decode("torch", 4, 8, 64, [37, 0, 97, 1])
    run_prefill("torch", 2, 8, 32, [(37, 20), (0, 1), (9, 5)])


def test_torch_backend_without_fused_cpu_attention(monkeypatch):
    """Where torch's fused CPU attention is missing (or on another device) the backend's own
    matmul-softmax path gives the same partials; chunks too."""
    monkeypatch.setattr("kernels.reference._FLASH", None)
    torch.manual_seed(6)
    run_decode("torch", 4, 8, 64, [37, 0, 97, 1])
    run_prefill("torch", 2, 8, 32, [(37, 20), (0, 1), (9, 5)])
    monkeypatch.setattr("kernels.reference.GATHER_BUDGET", 1)
    run_decode("torch", 2, 16, 32, [50, 0, 3])
    run_prefill("torch", 4, 8, 64, [(20, 17), (0, 3)])


def test_torch_backend_step_plan_is_shared_by_layers_and_redone_for_new_tables():
    """The torch backend plans a step's gathers once per block table and reuses the plan for
    every layer (another cache, the same tables); a table changed in place is planned again."""
    torch.manual_seed(5)
    lens = [29, 0, 64, 3]
    pools = [make_pool(lens, 8, 2, 32) for _ in range(2)]
    tables, seq_lens = pools[0].tables, torch.tensor(lens, dtype=torch.int32)
    q = torch.randn(len(lens), 8, 32)
    for pool in pools:                    # layer 0, layer 1: the same tables, another pool
        pool.tables = tables
    for pool in pools:
        out, lse = kernels.paged_attention_partial(q, pool.k_cache, pool.v_cache, tables,
                                                   seq_lens, 0.3, backend="torch", validate=False)
        assert_attention_close(out, lse, *decode_reference(q, pool, lens, 0.3), torch.float32)
    tables[[0, 2]] = tables[[2, 0]].clone()     # in place: sequences 0 and 2 swap blocks
    lens[0], lens[2] = 24, 29
    seq_lens[0], seq_lens[2] = 24, 29
    out, lse = kernels.paged_attention_partial(q, pools[1].k_cache, pools[1].v_cache, tables,
                                               seq_lens, 0.3, backend="torch", validate=False)
    assert_attention_close(out, lse, *decode_reference(q, pools[1], lens, 0.3), torch.float32)


# ---------------------------------------------------------------- prefill

PREFILL_CASES = [  # (ratio, block_size, head_dim, [(context, chunk) per sequence])
    (4, 16, 64, [(37, 20), (0, 1), (96, 1), (5, 13)]),
    (1, 1, 80, [(3, 9), (0, 7), (20, 1)]),
    (8, 8, 128, [(0, 33), (50, 1), (0, 1)]),
    (2, 32, 16, [(70, 30), (1, 2), (31, 1)]),
]


def run_prefill(backend, ratio, block_size, head_dim, seqs, dtype=torch.float32, **kw):
    """Writes each chunk's k/v with write_kv (as the engine does), then attends causally."""
    num_kv_heads = NUM_HEADS // ratio
    pool = make_pool([c + n for c, n in seqs], block_size, num_kv_heads, head_dim, dtype)
    slots = torch.cat([chunk_slots(pool, b, c, n) for b, (c, n) in enumerate(seqs)])
    k_new, v_new = (torch.randn(len(slots), num_kv_heads, head_dim).to(dtype).to(DEVICE)
                    for _ in range(2))
    kernels.write_kv(k_new, v_new, pool.k_cache, pool.v_cache, slots, backend=backend)
    q = torch.randn(len(slots), NUM_HEADS, head_dim).to(dtype).to(DEVICE)
    cu = torch.tensor([0] + [n for _, n in seqs], device=DEVICE).cumsum(0).int()
    kv_lens = torch.cat([torch.arange(c + 1, c + n + 1) for c, n in seqs]).int().to(DEVICE)
    scale = head_dim ** -0.5
    args = (q, pool.k_cache, pool.v_cache, pool.tables, cu, kv_lens, scale)
    if kw:
        from kernels.triton_attention import paged_prefill_partial
        out, lse = paged_prefill_partial(*args, **kw)
    else:
        out, lse = kernels.paged_prefill_partial(*args, backend=backend)
    ref = [causal_reference(q[cu[b]:cu[b + 1]], pool, b, c, n, scale)
           for b, (c, n) in enumerate(seqs)]
    assert_attention_close(out, lse, torch.cat([r[0] for r in ref]),
                           torch.cat([r[1] for r in ref]), dtype)


def chunk_slots(pool: Pool, b: int, context: int, num_new: int) -> torch.Tensor:
    pos = torch.arange(context, context + num_new, device=DEVICE)
    bs = pool.k_cache.shape[1]
    return pool.tables[b, pos // bs].long() * bs + pos % bs


def causal_reference(q, pool: Pool, b: int, context: int, num_new: int, scale):
    """SDPA of the chunk's queries over context + chunk, causal inside the chunk."""
    k, v = pool.contiguous(b, context + num_new)
    mask = torch.arange(context + num_new, device=DEVICE)[None, :] <= (
        context + torch.arange(num_new, device=DEVICE)[:, None])
    return sdpa_reference(q.transpose(0, 1), k, v, scale, mask)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("ratio,block_size,head_dim,seqs", PREFILL_CASES)
def test_prefill_matches_causal_sdpa(backend, ratio, block_size, head_dim, seqs):
    torch.manual_seed(100 * ratio + block_size)
    run_prefill(backend, ratio, block_size, head_dim, seqs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_bf16(backend):
    torch.manual_seed(11)
    run_prefill(backend, 4, 16, 64, [(40, 17), (9, 1)], torch.bfloat16)


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_prefill_triton_splits():
    torch.manual_seed(12)
    run_prefill("triton", 2, 16, 32, [(200, 9), (0, 1), (150, 1)], num_splits=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_many_sequences(backend):
    """More sequences than one search step of the kernel (128): tiles must find their owner."""
    torch.manual_seed(14)
    seqs = [(i % 7, 1) for i in range(150)] + [(10, 21), (0, 3)] + [(3, 1)] * 5
    run_prefill(backend, 8, 4, 16, seqs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_prefill_arbitrary_kv_lens_with_zeros(backend):
    """kv_lens need not be causal: any prefix of the table per token, 0 included."""
    torch.manual_seed(13)
    lens, bs, head_dim = [40, 25, 8], 8, 64
    pool = make_pool(lens, bs, 2, head_dim)
    q_lens = [4, 1, 3]
    kv_lens = [0, 40, 17, 0, 25, 8, 0, 1]
    q = torch.randn(sum(q_lens), NUM_HEADS, head_dim, device=DEVICE)
    cu = torch.tensor([0, 4, 5, 8], dtype=torch.int32, device=DEVICE)
    out, lse = kernels.paged_prefill_partial(
        q, pool.k_cache, pool.v_cache, pool.tables, cu,
        torch.tensor(kv_lens, dtype=torch.int32, device=DEVICE), 0.125, backend=backend)
    seq_of = [0, 0, 0, 0, 1, 2, 2, 2]
    for t, (b, n) in enumerate(zip(seq_of, kv_lens, strict=True)):
        k, v = pool.contiguous(b, n)
        ref_out, ref_lse = sdpa_reference(q[t][:, None], k, v, 0.125)
        assert_attention_close(out[t:t + 1], lse[t:t + 1], ref_out, ref_lse, torch.float32)


# ---------------------------------------------------------------- merge

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_parts", [2, 3, 5])
def test_merge_of_disjoint_block_sets_equals_full(backend, num_parts):
    """Deal each sequence's blocks to S shards (order kept), attend per shard, merge."""
    torch.manual_seed(num_parts)
    lens, bs, head_dim = [97, 37, 1, 0, 64], 8, 64
    pool = make_pool(lens, bs, 2, head_dim)
    q = torch.randn(len(lens), NUM_HEADS, head_dim, device=DEVICE)
    tables, shard_lens = deal_blocks(pool, lens, num_parts)
    parts = [kernels.paged_attention_partial(q, pool.k_cache, pool.v_cache, tables[s],
                                             shard_lens[s], 0.125, backend=backend)
             for s in range(num_parts)]
    out, lse = kernels.merge_attention_states(torch.stack([p[0] for p in parts]),
                                              torch.stack([p[1] for p in parts]), backend=backend)
    ref_out, ref_lse = decode_reference(q, pool, lens, 0.125)
    assert_attention_close(out, lse, ref_out, ref_lse, torch.float32)


def deal_blocks(pool: Pool, lens, num_parts):
    """-> tables [S, B, width], lens [S, B]: block i of a sequence goes to a random shard."""
    bs = pool.k_cache.shape[1]
    tables = torch.full((num_parts, *pool.tables.shape), -1, dtype=torch.int32, device=DEVICE)
    shard_lens = torch.zeros(num_parts, len(lens), dtype=torch.int32, device=DEVICE)
    for b, n in enumerate(lens):
        counts = [0] * num_parts
        for i in range(-(-n // bs)):
            s = int(torch.randint(num_parts, ()))
            tables[s, b, counts[s]] = pool.tables[b, i]
            counts[s] += 1
            shard_lens[s, b] += min(bs, n - i * bs)   # the partial last block stays last
    return tables, shard_lens


def merge_reference(outs, lses):
    lses = lses.double()
    lse = torch.logsumexp(lses, 0)
    w = torch.exp(lses - lse.nan_to_num(neginf=0.0)).nan_to_num(0.0)
    terms = torch.where(w[..., None] > 0, w[..., None] * outs.double(), 0.0)
    return terms.sum(0), lse


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_merge_ignores_neg_inf_partials_and_flattens_leading_dims(backend, dtype):
    torch.manual_seed(21)
    num_parts, lead, head_dim = 4, (5, 3, 2), 80
    outs = torch.randn(num_parts, *lead, head_dim).to(dtype).to(DEVICE)
    lses = (torch.randn(num_parts, *lead) * 3).to(DEVICE)
    dead = torch.rand(num_parts, *lead, device=DEVICE) < 0.4
    dead[:, 0, 0, 0] = True                     # one row with no tokens anywhere
    lses[dead] = float("-inf")
    outs[dead] = float("nan")                   # whatever a dead partial holds is ignored
    out, lse = kernels.merge_attention_states(outs, lses, backend=backend)
    ref_out, ref_lse = merge_reference(outs, lses)
    assert out.shape == (*lead, head_dim) and lse.shape == lead
    assert_attention_close(out, lse, ref_out, ref_lse, dtype)
    assert torch.all(out[0, 0, 0] == 0) and lse[0, 0, 0] == float("-inf")


@pytest.mark.parametrize("backend", BACKENDS)
def test_merge_all_neg_inf(backend):
    outs = torch.randn(3, 7, 4, 16, device=DEVICE)
    lses = torch.full((3, 7, 4), float("-inf"), device=DEVICE)
    out, lse = kernels.merge_attention_states(outs, lses, backend=backend)
    assert torch.all(out == 0) and torch.all(lse == float("-inf"))


# ---------------------------------------------------------------- write_kv

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("validate", [True, False])
def test_write_kv_is_exact_and_skips_minus_one(backend, dtype, block_size, validate):
    torch.manual_seed(block_size)
    num_blocks, num_kv_heads, head_dim, num_new = 20, 3, 80, 17
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache, v_cache = (torch.randn(shape).to(dtype).to(DEVICE) for _ in range(2))
    # non-contiguous sources: every other token of a bigger tensor
    k = torch.randn(2 * num_new, num_kv_heads, head_dim).to(dtype).to(DEVICE)[::2]
    v = torch.randn(2 * num_new, num_kv_heads, head_dim).to(dtype).to(DEVICE)[::2]
    slots = torch.randperm(num_blocks * block_size)[:num_new].to(DEVICE)
    slots[::4] = -1
    expect_k, expect_v = k_cache.clone(), v_cache.clone()
    keep = slots >= 0
    idx = (slots[keep] // block_size, slots[keep] % block_size)
    expect_k.index_put_(idx, k[keep])
    expect_v.index_put_(idx, v[keep])
    kernels.write_kv(k, v, k_cache, v_cache, slots, backend=backend, validate=validate)
    assert torch.equal(k_cache, expect_k) and torch.equal(v_cache, expect_v)


# ---------------------------------------------------------------- dispatch and errors

def test_auto_is_torch_on_cpu():
    assert kernels.registry.resolve("auto", torch.device("cpu")).__name__ == "kernels.reference"


def test_unknown_backend_names_the_choices():
    with pytest.raises(ValueError, match="unknown kernel backend 'cuda'.*torch"):
        kernels.merge_attention_states(torch.zeros(1, 2, 4), torch.zeros(1, 2), backend="cuda")


def decode_args(num_heads=8, num_kv_heads=2, head_dim=16, **over):
    args = {"q": torch.randn(3, num_heads, head_dim),
            "k_cache": torch.randn(4, 8, num_kv_heads, head_dim),
            "v_cache": torch.randn(4, 8, num_kv_heads, head_dim),
            "block_tables": torch.zeros(3, 2, dtype=torch.int32),
            "seq_lens": torch.ones(3, dtype=torch.int32), "scale": 0.25}
    args.update(over)
    return args


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("args,message", [
    (decode_args(num_heads=6, num_kv_heads=4), r"query heads H=6 is not a multiple .* H_kv=4"),
    (decode_args(block_tables=torch.zeros(3, 2)), r"block_tables must be int32"),
    (decode_args(seq_lens=torch.ones(2, dtype=torch.int32)), r"seq_lens must be \[B\]"),
    (decode_args(q=torch.randn(3, 8, 32)), r"head dim D of q \(32\)"),
    (decode_args(q=torch.randn(3, 8, 16, dtype=torch.float64)), r"q must be float16"),
    (decode_args(q=torch.randn(3, 8, 16).half()), r"q dtype torch.float16 differs"),
    (decode_args(q=torch.randn(3, 8, 16, device="meta")), r"one device.*q on meta"),
])
def test_decode_errors_name_the_argument(backend, args, message):
    with pytest.raises(ValueError, match=message):
        kernels.paged_attention_partial(**args, backend=backend)


def test_torch_backend_checks_table_values():
    args = decode_args(seq_lens=torch.tensor([1, 17, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"seq_lens\[1\]=17 needs 3 blocks .* only 2 columns"):
        kernels.paged_attention_partial(**args, backend="torch")
    args = decode_args(block_tables=torch.tensor([[0, -1], [1, -1], [2, 3]], dtype=torch.int32),
                       seq_lens=torch.tensor([1, 9, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"block_tables\[1, 1\] = -1 is not a block"):
        kernels.paged_attention_partial(**args, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_write_kv_errors(backend):
    cache = torch.zeros(2, 4, 2, 8)
    k = torch.zeros(3, 2, 8, dtype=torch.float16)
    with pytest.raises(ValueError, match="k dtype torch.float16 differs from the cache dtype"):
        kernels.write_kv(k, k, cache, cache.clone(), torch.zeros(3, dtype=torch.long),
                         backend=backend)
    with pytest.raises(ValueError, match=r"\(H_kv, D\) = \(3, 8\)"):
        kernels.write_kv(torch.zeros(3, 3, 8), torch.zeros(3, 3, 8), cache, cache.clone(),
                         torch.zeros(3, dtype=torch.long), backend=backend)


def test_torch_write_kv_rejects_slot_past_the_pool():
    cache = torch.zeros(2, 4, 2, 8)
    with pytest.raises(ValueError, match="slot 8 but the pool has only 8 slots"):
        kernels.write_kv(torch.zeros(1, 2, 8), torch.zeros(1, 2, 8), cache, cache.clone(),
                         torch.tensor([8]), backend="torch")


@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_triton_on_cpu_without_interpreter_says_so():
    code = ("import torch, kernels\n"
            "kernels.merge_attention_states(torch.zeros(1, 2, 4), torch.zeros(1, 2),"
            " backend='triton')\n")
    env = dict(os.environ, TRITON_INTERPRET="0")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=root, capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode != 0
    assert "ValueError" in proc.stderr and "TRITON_INTERPRET=1" in proc.stderr


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")
def test_kernels_compile_for_sm90_without_a_gpu():
    """The interpreter accepts code the compiler rejects: compile what the wrappers launch."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-m", "kernels.compile_check", "--arch", "90"],
                          env=dict(os.environ, TRITON_INTERPRET="0"), cwd=root,
                          capture_output=True, text=True, timeout=600, check=False)
    if proc.returncode == 2:
        pytest.skip(f"offline compilation unavailable here: {proc.stdout.strip()}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
