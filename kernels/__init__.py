"""Attention math on paged KV: one API, backends chosen by name.

`backend="auto"` runs the Triton kernels on CUDA tensors and the torch implementation on CPU;
`"torch"` and `"triton"` force one (Triton on CPU tensors needs TRITON_INTERPRET=1, set before
the first Triton call). Triton is imported only when its backend is first used.

Every function checks its arguments (shapes, dtypes, devices; the torch backend also values,
which syncs the host with a GPU). `validate=False` skips those checks: for a caller that checked
its metadata once (the engine, per step, in `fabric.context.build_context`) and then calls once
per layer; bad input is then undefined behaviour, not an error.

Layout shared by every function: a KV pool per layer is `k_cache`, `v_cache`
[num_blocks, block_size, H_kv, D]; slot = block_id * block_size + offset. Query head h reads KV
head h // (H // H_kv) (GQA); KV heads are never expanded in memory.
"""

from __future__ import annotations

import torch

from kernels import registry

__all__ = [
    "merge_attention_states",
    "paged_attention_partial",
    "paged_prefill_partial",
    "registry",
    "write_kv",
]


def paged_attention_partial(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                            block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                            backend: str = "auto",
                            validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode attention over the KV held in these blocks, as a mergeable partial.

    q [B, H, D]; k_cache, v_cache [num_blocks, block_size, H_kv, D]; block_tables
    [B, max_blocks] int32 (-1 = unused); seq_lens [B] int32: query b sees the first seq_lens[b]
    tokens of its table, in table order. Returns out [B, H, D] in q.dtype, normalised over those
    tokens, and lse [B, H] float32 (natural log; -inf, with out 0, where seq_lens is 0).
    """
    impl = registry.resolve(backend, q.device)
    return impl.paged_attention_partial(q, k_cache, v_cache, block_tables, seq_lens, scale,
                                        validate=validate)


def paged_prefill_partial(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          block_tables: torch.Tensor, cu_seqlens_q: torch.Tensor,
                          kv_lens: torch.Tensor, scale: float, backend: str = "auto",
                          validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked-prefill (or mixed-batch) attention over paged KV, as a mergeable partial.

    q [T, H, D]: the query tokens of B sequences concatenated; cu_seqlens_q [B + 1] int32
    (sequence b owns rows cu[b]:cu[b+1]); block_tables [B, max_blocks] int32; kv_lens [T] int32:
    token t sees the first kv_lens[t] tokens of its sequence's table. For a chunk, write its k/v
    first and pass kv_lens = context_len + i + 1 (causal inside the chunk). Returns out [T, H, D]
    in q.dtype and lse [T, H] float32 (-inf, with out 0, where kv_lens is 0).
    """
    impl = registry.resolve(backend, q.device)
    return impl.paged_prefill_partial(q, k_cache, v_cache, block_tables, cu_seqlens_q, kv_lens,
                                      scale, validate=validate)


def merge_attention_states(outs: torch.Tensor, lses: torch.Tensor, backend: str = "auto",
                           validate: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of S partials of the same queries.

    outs [S, ..., D] (e.g. [S, B, H, D] or [S, T, H, D]); lses [S, ...] float32. Returns
    out [..., D] in outs.dtype and lse [...] float32: LSE = logsumexp_i(lse_i),
    out = sum_i exp(lse_i - LSE) * o_i. Partials with lse -inf contribute nothing (even if their
    out is NaN); if all are -inf, out is 0 and lse is -inf.
    """
    impl = registry.resolve(backend, outs.device)
    return impl.merge_attention_states(outs, lses, validate=validate)


def write_kv(k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor, backend: str = "auto", validate: bool = True) -> None:
    """Copies new tokens' k, v [N, H_kv, D] into the caches in place, exactly (same dtype).

    slot_mapping [N] int64: slot = block_id * block_size + offset; slot -1 skips that token.
    """
    impl = registry.resolve(backend, k.device)
    impl.write_kv(k, v, k_cache, v_cache, slot_mapping, validate=validate)
