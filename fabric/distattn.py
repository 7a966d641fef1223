"""DistAttention: attention of one step over KV that may live on several instances.

The home computes the partial over its own blocks; each creditor computes the partial over the
blocks it holds for this home's requests (one batched call per creditor per layer, only the
queries travel); the partials and their log-sum-exps are merged exactly.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
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
                     v_new: torch.Tensor, shard: Shard, scale: float, backend: str = "auto",
                     validate: bool = True):
    """Write this shard's new k/v, then attend `q` [T_s, H, D] over its blocks -> (out, lse).
    `validate=False`: the shard was checked once for the step (`build_context`), so the kernels
    skip their per-call checks (and the host syncs they cost)."""
    k_cache, v_cache = kv.layer(layer)
    if shard.write_slots.numel():
        kernels.write_kv(k_new, v_new, k_cache, v_cache, shard.write_slots, backend=backend,
                         validate=validate)
    if shard.is_decode:
        return kernels.paged_attention_partial(q, k_cache, v_cache, shard.block_tables,
                                               shard.kv_lens, scale, backend=backend,
                                               validate=validate)
    return kernels.paged_prefill_partial(q, k_cache, v_cache, shard.block_tables, shard.cu_seqlens,
                                         shard.kv_lens, scale, backend=backend, validate=validate)


def serve_partial(rm, kv: KVCache, src: int, layer: int, q, k_new, v_new, write_slots,
                  block_tables, kv_lens, cu_seqlens, is_decode: bool, scale: float,
                  backend: str = "auto", steps: "CreditorSteps | None" = None, step=None):
    """The creditor side of one layer: instance `src`'s queries over the blocks this instance
    (books `rm`, pool `kv`) holds for it. `src` may write only blocks lent to it and read those
    or blocks of this cache pinned for it; anything else is refused (`ValueError`).

    With `steps`, the shard description is checked once per step: a call that carries it (the
    step's first layer) is kept as `step`; one without it (`block_tables` None: only q, k, v
    travel) uses what was kept for `src`'s `step`, and is refused if there is none."""
    if block_tables is None:
        if steps is None:
            raise ValueError(f"instance {src} sent no shard description")
        shard = steps.shard(rm, src, step)
    else:
        generation = steps.begin(src) if steps is not None else 0
        shard = check_shard(rm, src, write_slots, block_tables, kv_lens, cu_seqlens,
                            bool(is_decode), kv.k.device)
        if steps is not None:
            steps.keep(src, step, shard, generation)
    dev = kv.k.device
    q, k_new, v_new = q.to(dev), k_new.to(dev), v_new.to(dev)
    if q.shape[0] != shard.kv_lens.shape[0] or k_new.shape[0] != shard.write_slots.shape[0]:
        raise ValueError(f"instance {src} sent {q.shape[0]} queries and {k_new.shape[0]} new "
                         f"k/v for a shard of {shard.kv_lens.shape[0]} and "
                         f"{shard.write_slots.shape[0]}")
    return partial_on_shard(kv, layer, q, k_new, v_new, shard, scale, backend)


def check_shard(rm, src: int, write_slots, block_tables, kv_lens, cu_seqlens, is_decode: bool,
                device) -> Shard:
    """`src`'s shard of one step, checked against the books in one vectorised pass (the
    creditor is the edge for a peer's metadata): it writes only blocks lent to it, reads only
    those or blocks pinned for it, and every block a query reads is in its table. In numpy,
    where a tiny array operation costs a fraction of one in torch."""
    for name, t, dims in (("write_slots", write_slots, 1), ("block_tables", block_tables, 2),
                          ("kv_lens", kv_lens, 1), ("cu_seqlens", cu_seqlens, 1)):
        if t.dim() != dims or t.dtype not in (torch.int32, torch.int64):
            raise ValueError(f"{name} must be a {dims}-d integer tensor, got {t.dtype} "
                             f"{tuple(t.shape)}")
    tables, lens, cu = (t.cpu().numpy().astype(np.int64) for t in (block_tables, kv_lens, cu_seqlens))
    rows, width = tables.shape
    per_row = cu[1:] - cu[:-1]
    if cu.shape[0] != rows + 1 or cu[0] != 0 or cu[-1] != lens.shape[0] or \
            (is_decode and lens.shape[0] != rows) or (rows and per_row.min() < 0):
        raise ValueError(f"cu_seqlens {cu.tolist()} does not split {lens.shape[0]} queries over "
                         f"{rows} block tables")
    _check_owned(rm, src, tables, write_slots.cpu().numpy())
    used = tables >= 0
    table_len = np.where(used.all(1), width, used.argmin(1))     # entries before the first -1
    needed = (lens + rm.block_size - 1) // rm.block_size           # blocks each query reads
    if lens.size and (lens.min() < 0 or (needed > np.repeat(table_len, per_row)).any()):
        raise ValueError(f"instance {src}'s kv_lens reach past its block tables")
    return Shard(rm.instance_id, None, block_tables.to(device), kv_lens.to(device),
                 cu_seqlens.to(device), None, write_slots.to(device), is_decode)


def _check_owned(rm, src: int, tables: np.ndarray, slots: np.ndarray) -> None:
    """Blocks read (table entries >= 0) are lent to `src` or pinned for it; blocks written are
    lent to it. Index `n` stands for any block outside the pool."""
    n = rm.num_blocks
    held = np.zeros(n + 1, dtype=np.uint8)      # 1: readable (pinned), 2: lent
    held[list(rm.leases.get(src, {}))] = 1      # list(): one pass under the GIL, the books
    held[list(rm.lent.get(src, ()))] = 2        # may change on another thread
    read = np.minimum(tables[tables >= 0], n)
    written = np.minimum(slots.astype(np.uint64) // rm.block_size, n)   # negative: huge
    if not (held[read] > 0).all() or not (held[written] == 2).all():
        raise ValueError(f"instance {src} touched blocks it did not borrow here")


class CreditorSteps:
    """A creditor's record of each debtor's current step: its checked shard, kept from the
    step's first layer for the others. The books may shrink meanwhile (a block given back or
    unpinned): `books_changed` makes the next layer of every kept step check again."""

    def __init__(self):
        self._kept: dict[int, tuple[object, Shard, int]] = {}   # src -> (step, shard, generation)
        self._generation = 0

    def begin(self, src: int) -> int:
        """`src` describes a new step: drop its last one (a refused step leaves nothing kept).
        Returns the generation of the books the new step is checked against."""
        self._kept.pop(src, None)
        return self._generation

    def keep(self, src: int, step, shard: Shard, generation: int) -> None:
        self._kept[src] = (step, shard, generation)

    def books_changed(self) -> None:
        self._generation += 1

    def shard(self, rm, src: int, step) -> Shard:
        kept = self._kept.get(src)
        if kept is None or step is None or kept[0] != step:
            raise ValueError(f"instance {src} names step {step!r}, which it did not describe here")
        _, shard, generation = kept
        if generation != self._generation:
            generation = self._generation
            _check_owned(rm, src, shard.block_tables.cpu().numpy(), shard.write_slots.cpu().numpy())
            self.keep(src, step, shard, generation)
        return shard


class DistAttention:
    """The `attn(layer, q, k, v)` callable the model calls, for one step. Its context was
    checked once when it was built (`build_context`): the kernels skip their per-layer checks."""

    def __init__(self, kv: KVCache, ctx: StepContext, scale: float, remote: RemotePartials | None,
                 backend: str = "auto"):
        self.kv, self.ctx, self.scale, self.remote, self.backend = kv, ctx, scale, remote, backend

    def __call__(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        home = self.ctx.home
        if not self.ctx.remote:
            out, _ = partial_on_shard(self.kv, layer, q, k[home.write_idx], v[home.write_idx], home,
                                      self.scale, self.backend, validate=False)
            return out
        jobs = {inst: PartialJob(q[s.token_idx], k[s.write_idx], v[s.write_idx], s)
                for inst, s in self.ctx.remote.items()}
        pending = self.remote.submit(layer, jobs)  # type: ignore[union-attr]
        out, lse = partial_on_shard(self.kv, layer, q, k[home.write_idx], v[home.write_idx], home,
                                    self.scale, self.backend, validate=False)
        return self._merge(out, lse, pending.result())

    def _merge(self, out, lse, results) -> torch.Tensor:
        outs = out.new_zeros((len(results) + 1, *out.shape))
        lses = lse.new_full((len(results) + 1, *lse.shape), float("-inf"))
        outs[0], lses[0] = out, lse
        for i, (inst, (o, s)) in enumerate(sorted(results.items()), start=1):
            idx = self.ctx.remote[inst].token_idx
            outs[i, idx] = o.to(out.dtype)
            lses[i, idx] = s.float()
        merged, _ = kernels.merge_attention_states(outs, lses, backend=self.backend, validate=False)
        return merged
