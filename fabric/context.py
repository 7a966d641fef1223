"""Per-step metadata, built once per step (`Engine.step`) and read by every layer.

For each instance that holds KV of this step's requests (the home, and creditors), a `Shard`
says which query tokens attend there, over which physical blocks, how many of those blocks'
tokens each query may see (causality), and which new k/v must be written there.

Built in one vectorised pass over the step's block tables, each kept as a tensor that grows by
appending (`BlockTable`), so no Python loop per step runs over a request's context. This is also
where the step's metadata is checked, once, so that the kernels need not check it per layer.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import accumulate, chain, repeat

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


class BlockTable:
    """A request's block table as a tensor [n, 2] of (instance, block), kept across steps: a
    step converts (and checks) only the entries appended since the last one. A table also
    changes in other ways (freed on preemption, rewritten by a hand-off, started from a cached
    prefix), so `tensor` first compares the entries it converted with the table's (a C-level
    list compare, by object identity) and starts over where they differ."""
    __slots__ = ("refs", "data")

    def __init__(self):
        self.refs: list[BlockRef] = []
        self.data = torch.empty((0, 2), dtype=torch.long)

    def tensor(self, table: list[BlockRef], home_id: int, num_blocks: int) -> torch.Tensor:
        """`table` as [len(table), 2]; `ValueError` if it names a block of instance `home_id`
        outside its pool of `num_blocks` (the kernels run unchecked per layer)."""
        n, m = len(self.refs), len(table)
        if m < n or (table if m == n else table[:n]) != self.refs:
            n, self.refs = 0, []
        if m > n:
            new = table[n:]
            bad = [r.block for r in new if r.instance == home_id and not 0 <= r.block < num_blocks]
            if bad:
                raise ValueError(f"a block table names blocks {bad} outside this pool "
                                 f"(0..{num_blocks - 1})")
            if m > len(self.data):
                grown = torch.empty((max(m, 2 * len(self.data)), 2), dtype=torch.long)
                grown[:n] = self.data[:n]
                self.data = grown
            self.data[n:m] = torch.tensor([(r.instance, r.block) for r in new], dtype=torch.long)
            self.refs += new
        return self.data[:m]


@dataclass(slots=True)
class SeqChunk:
    """One request's share of a step: tokens[start:start+len(token_ids)] and its block table
    (`cached`: the request's `BlockTable`, which keeps its tensor across steps)."""
    token_ids: list[int]
    start: int
    table: list[BlockRef]
    sample: bool
    cached: BlockTable = field(default_factory=BlockTable)


def build_context(chunks: list[SeqChunk], home_id: int, block_size: int, num_blocks: int,
                  device: str | torch.device = "cpu") -> StepContext:
    """The step's metadata; `ValueError` if a table does not cover its tokens or names a block
    outside this instance's pool of `num_blocks`. Python work here is per request; per token and
    per block it is tensor ops (and C-level list building)."""
    lens = [len(ch.token_ids) for ch in chunks]
    for b, (ch, n) in enumerate(zip(chunks, lens)):
        if len(ch.table) * block_size < ch.start + n:
            raise ValueError(f"request {b} of the step has {len(ch.table)} blocks of "
                             f"{block_size} tokens, too few for its tokens up to {ch.start + n}")
    tables = [ch.cached.tensor(ch.table, home_id, num_blocks) for ch in chunks]
    ends = list(accumulate(lens))
    firsts = [0, *accumulate(len(t) for t in tables)][:-1]       # of each table in `flat`
    pos = torch.tensor(list(chain.from_iterable(range(ch.start, ch.start + n)
                                                for ch, n in zip(chunks, lens))))
    entry = pos // block_size                                    # each token's table entry
    offset = pos % block_size
    flat = torch.cat(tables)
    token_refs = flat[torch.tensor(list(chain.from_iterable(map(repeat, firsts, lens)))) + entry]
    slots = token_refs[:, 1] * block_size + offset
    cu = torch.tensor([0, *ends], dtype=torch.int32)
    is_decode = len(pos) == len(chunks)
    if bool((flat[:, 0] == home_id).all()):      # all KV at home: its shard is the whole step
        table = torch.nn.utils.rnn.pad_sequence([t[:, 1] for t in tables], batch_first=True,
                                                padding_value=-1)
        home = Shard(home_id, None, table.to(torch.int32), (pos + 1).to(torch.int32), cu,
                     torch.arange(len(pos)), slots, is_decode)
        remote = {}
    else:
        padded = torch.nn.utils.rnn.pad_sequence(tables, batch_first=True, padding_value=-1)
        step = _Step(padded[..., 0], padded[..., 1],
                     torch.tensor(list(chain.from_iterable(map(repeat, range(len(lens)), lens)))),
                     torch.tensor(lens), entry, offset, token_refs[:, 0], slots, block_size,
                     is_decode)
        home = step.shard(home_id, True)
        others = torch.unique(flat[:, 0][flat[:, 0] != home_id]).tolist()
        remote = {i: step.shard(i, False) for i in others}
    ctx = StepContext(torch.tensor(list(chain.from_iterable(ch.token_ids for ch in chunks))),
                      pos, torch.tensor([e - 1 for e, ch in zip(ends, chunks) if ch.sample],
                                        dtype=torch.long), home, remote)
    return _to(ctx, device) if str(device) != "cpu" else ctx


@dataclass(slots=True)
class _Step:
    """A step whose KV is on several instances: its tables, padded (`inst`, `block` [B, M],
    -1 = none), and its query tokens (each [T]): request `seq`, table `entry`, `offset` in that
    block, and where its new k/v go (`dest` instance, `slots` there)."""
    inst: torch.Tensor
    block: torch.Tensor
    seq: torch.Tensor
    lens: torch.Tensor
    entry: torch.Tensor
    offset: torch.Tensor
    dest: torch.Tensor
    slots: torch.Tensor
    block_size: int
    is_decode: bool

    def shard(self, instance: int, home: bool) -> Shard:
        """What attends on `instance`: every request at the home, else those with blocks there."""
        mine, block, seq, entry, offset = (self.inst == instance, self.block, self.seq,
                                           self.entry, self.offset)
        token_idx = None
        if not home:
            rows = mine.any(1)
            mine, block = mine[rows], block[rows]
            token_idx = rows[seq].nonzero().flatten()
            seq = (torch.cumsum(rows, 0) - 1)[seq[token_idx]]
            entry, offset = entry[token_idx], offset[token_idx]
        rank = torch.cumsum(mine, 1)                  # entries on `instance` up to each column
        table = torch.full((len(mine), max(int(rank[:, -1].max()), 1)), -1, dtype=torch.int32)
        r, c = mine.nonzero(as_tuple=True)
        table[r, rank[r, c] - 1] = block[r, c].to(torch.int32)
        # a token sees all of its table's earlier entries (full) and its own up to itself
        here = mine[seq, entry]
        kv_lens = (rank[seq, entry] - here.long()) * self.block_size + here * (offset + 1)
        cu = torch.zeros(len(mine) + 1, dtype=torch.int32)
        cu[1:] = torch.cumsum(self.lens if home else self.lens[rows], 0)
        written = self.dest == instance
        return Shard(instance, token_idx, table, kv_lens.to(torch.int32), cu,
                     written.nonzero().flatten(), self.slots[written], self.is_decode)


def _to(ctx: StepContext, device) -> StepContext:
    def move(s: Shard) -> Shard:
        return Shard(s.instance, None if s.token_idx is None else s.token_idx.to(device),
                     s.block_tables.to(device), s.kv_lens.to(device), s.cu_seqlens.to(device),
                     s.write_idx.to(device), s.write_slots.to(device), s.is_decode)
    return StepContext(ctx.input_ids.to(device), ctx.positions.to(device), ctx.logits_idx.to(device),
                       move(ctx.home), {i: move(s) for i, s in ctx.remote.items()})
