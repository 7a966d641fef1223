"""DistAttention: attention of one step over KV that may live on several instances.

The home computes the partial over its own blocks; each creditor computes the partial over the
blocks it holds for this home's requests (one batched call per creditor per layer, only the
queries travel); the partials and their log-sum-exps are merged exactly.
"""

from __future__ import annotations

from typing import Protocol

import torch

import kernels
from fabric.context import Shard, StepContext
from fabric.kv_cache import KVCache


class RemotePartials(Protocol):
    """Runs `partial_on_shard` on creditors. Implemented by the actors' transport.

    `submit` sends the jobs and returns at once, so the home computes its own partial meanwhile;
    the returned handle's `result()` is `{creditor: (out [T_s, H, D], lse [T_s, H])}`."""

    def submit(self, layer: int, jobs: dict[int, "PartialJob"]):
        ...


class PartialJob:
    """What travels to a creditor for one layer: queries, new k/v to write, its block tables."""
    __slots__ = ("q", "k_new", "v_new", "shard")

    def __init__(self, q, k_new, v_new, shard: Shard):
        self.q, self.k_new, self.v_new, self.shard = q, k_new, v_new, shard


def partial_on_shard(kv: KVCache, layer: int, q: torch.Tensor, k_new: torch.Tensor,
                     v_new: torch.Tensor, shard: Shard, scale: float, backend: str = "auto"):
    """Write this shard's new k/v, then attend `q` [T_s, H, D] over its blocks -> (out, lse)."""
    k_cache, v_cache = kv.layer(layer)
    if shard.write_slots.numel():
        kernels.write_kv(k_new, v_new, k_cache, v_cache, shard.write_slots, backend=backend)
    if shard.is_decode:
        return kernels.paged_attention_partial(q, k_cache, v_cache, shard.block_tables,
                                               shard.kv_lens, scale, backend=backend)
    return kernels.paged_prefill_partial(q, k_cache, v_cache, shard.block_tables, shard.cu_seqlens,
                                         shard.kv_lens, scale, backend=backend)


def serve_partial(rm, kv: KVCache, src: int, layer: int, q, k_new, v_new, write_slots,
                  block_tables, kv_lens, cu_seqlens, is_decode: bool, scale: float,
                  backend: str = "auto"):
    """The creditor side of one layer: instance `src`'s queries over the blocks this instance
    (books `rm`, pool `kv`) holds for it. `src` may write only blocks lent to it and read those
    or blocks of this cache pinned for it; anything else is refused (`ValueError`)."""
    used = block_tables[block_tables >= 0].tolist()
    written = (write_slots // rm.block_size).tolist()
    if not rm.holds_for(src, written) or not rm.holds_for(src, used, read_only=True):
        raise ValueError(f"instance {src} touched blocks it did not borrow here")
    dev = kv.k.device
    shard = Shard(rm.instance_id, None, block_tables.to(dev), kv_lens.to(dev), cu_seqlens.to(dev),
                  None, write_slots.to(dev), bool(is_decode))
    return partial_on_shard(kv, layer, q.to(dev), k_new.to(dev), v_new.to(dev), shard, scale, backend)


class DistAttention:
    """The `attn(layer, q, k, v)` callable the model calls, for one step."""

    def __init__(self, kv: KVCache, ctx: StepContext, scale: float, remote: RemotePartials | None,
                 backend: str = "auto"):
        self.kv, self.ctx, self.scale, self.remote, self.backend = kv, ctx, scale, remote, backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        home = self.ctx.home
        if not self.ctx.remote:
            out, _ = partial_on_shard(self.kv, layer, q, k[home.write_idx], v[home.write_idx], home,
                                      self.scale, self.backend)
            return out
        jobs = {inst: PartialJob(q[s.token_idx], k[s.write_idx], v[s.write_idx], s)
                for inst, s in self.ctx.remote.items()}
        pending = self.remote.submit(layer, jobs)  # type: ignore[union-attr]
        out, lse = partial_on_shard(self.kv, layer, q, k[home.write_idx], v[home.write_idx], home,
                                    self.scale, self.backend)
        return self._merge(out, lse, pending.result())

    def _merge(self, out, lse, results) -> torch.Tensor:
        outs = out.new_zeros((len(results) + 1, *out.shape))
        lses = lse.new_full((len(results) + 1, *lse.shape), float("-inf"))
        outs[0], lses[0] = out, lse
        for i, (inst, (o, s)) in enumerate(sorted(results.items()), start=1):
            idx = self.ctx.remote[inst].token_idx
            outs[i, idx] = o.to(out.dtype)
            lses[i, idx] = s.float()
        merged, _ = kernels.merge_attention_states(outs, lses, backend=self.backend)
        return merged
