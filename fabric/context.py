"""Per-step metadata, built once per step (`Engine.step`) and read by every layer.

For each instance that holds KV of this step's requests (the home, and creditors), a `Shard`
says which query tokens attend there, over which physical blocks, how many of those blocks'
tokens each query may see (causality), and which new k/v must be written there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from fabric.rmanager import BlockRef


@dataclass(slots=True)
class Shard:
    instance: int
    token_idx: torch.Tensor | None     # [T_s] rows of the step's q that attend here; None = all
    block_tables: torch.Tensor         # [B_s, M] int32, -1 = unused
    kv_lens: torch.Tensor              # [T_s] int32: visible tokens of the table per query token
    cu_seqlens: torch.Tensor           # [B_s + 1] int32
    write_idx: torch.Tensor            # [W] rows of the step's k/v written here
    write_slots: torch.Tensor          # [W] int64 slot = block * block_size + offset
    is_decode: bool


@dataclass(slots=True)
class StepContext:
    input_ids: torch.Tensor            # [T]
    positions: torch.Tensor            # [T]
    logits_idx: torch.Tensor           # [N] rows whose hidden state is sampled
    home: Shard
    remote: dict[int, Shard] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass(slots=True)
class SeqChunk:
    """One request's share of a step: tokens[start:start+len(token_ids)] and its block table."""
    token_ids: list[int]
    start: int
    table: list[BlockRef]
    sample: bool


def build_context(chunks: list[SeqChunk], home_id: int, block_size: int,
                  device: str | torch.device = "cpu") -> StepContext:
    ids, pos, logits_idx, owners = [], [], [], {}
    row = 0
    for b, ch in enumerate(chunks):
        n = len(ch.token_ids)
        ids += ch.token_ids
        pos += range(ch.start, ch.start + n)
        if ch.sample:
            logits_idx.append(row + n - 1)
        for ref in ch.table:
            owners.setdefault(ref.instance, set()).add(b)
        row += n
    is_decode = all(len(ch.token_ids) == 1 for ch in chunks)
    home = _shard(chunks, home_id, list(range(len(chunks))), block_size, is_decode, True)
    remote = {inst: _shard(chunks, inst, sorted(rows), block_size, is_decode, False)
              for inst, rows in sorted(owners.items()) if inst != home_id}
    ctx = StepContext(torch.tensor(ids, dtype=torch.long), torch.tensor(pos, dtype=torch.long),
                      torch.tensor(logits_idx, dtype=torch.long), home, remote)
    return _to(ctx, device) if str(device) != "cpu" else ctx


def _shard(chunks, inst, rows, block_size, is_decode, is_home) -> Shard:
    starts, acc = [], 0
    for ch in chunks:
        starts.append(acc)
        acc += len(ch.token_ids)
    tables, kv_lens, cu, token_idx, write_idx, write_slots = [], [], [0], [], [], []
    for b in rows:
        ch = chunks[b]
        logical = [j for j, r in enumerate(ch.table) if r.instance == inst]
        tables.append([ch.table[j].block for j in logical])
        first = torch.tensor(logical, dtype=torch.long) * block_size
        p = torch.arange(ch.start, ch.start + len(ch.token_ids))
        kv_lens.append((p[:, None] + 1 - first[None, :]).clamp(0, block_size).sum(1))
        cu.append(cu[-1] + len(ch.token_ids))
        token_idx.append(torch.arange(starts[b], starts[b] + len(ch.token_ids)))
        for i, q in enumerate(p.tolist()):
            ref = ch.table[q // block_size]
            if ref.instance == inst:
                write_idx.append(starts[b] + i)
                write_slots.append(ref.block * block_size + q % block_size)
    width = max([len(t) for t in tables] + [1])
    table = torch.full((len(rows), width), -1, dtype=torch.int32)
    for r, t in enumerate(tables):
        table[r, : len(t)] = torch.tensor(t, dtype=torch.int32)
    return Shard(
        instance=inst,
        token_idx=None if is_home else torch.cat(token_idx),
        block_tables=table,
        kv_lens=torch.cat(kv_lens).to(torch.int32) if kv_lens else torch.zeros(0, dtype=torch.int32),
        cu_seqlens=torch.tensor(cu, dtype=torch.int32),
        write_idx=torch.tensor(write_idx, dtype=torch.long),
        write_slots=torch.tensor(write_slots, dtype=torch.long),
        is_decode=is_decode,
    )


def _to(ctx: StepContext, device) -> StepContext:
    def move(s: Shard) -> Shard:
        return Shard(s.instance, None if s.token_idx is None else s.token_idx.to(device),
                     s.block_tables.to(device), s.kv_lens.to(device), s.cu_seqlens.to(device),
                     s.write_idx.to(device), s.write_slots.to(device), s.is_decode)
    return StepContext(ctx.input_ids.to(device), ctx.positions.to(device), ctx.logits_idx.to(device),
                       move(ctx.home), {i: move(s) for i, s in ctx.remote.items()})
