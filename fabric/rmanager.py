"""rManager: the KV block books of one instance (see docs/architecture.md).

It owns the block table of every request homed here (entries local or on creditors), the blocks
it *lent* (held here for other instances' requests) and the blocks it *borrowed* (held for it
elsewhere). Borrowing is delegated to `borrow_fn`, which the hosting actor wires to the
controller and a creditor; the engine alone (one process, no Ray) never borrows.

Prefix caching: a local block has a reference count (the request tables that hold it, plus
read-only pins of other instances reading it as a cached prefix). A block whose count drops to
0 is freed, unless it holds a cached prefix block: then it stays in the cache, evictable, and
the pool takes it back (least recently used first) only when it runs out of free blocks. So
`num_free` counts free and evictable blocks alike. A table may also start with *leased*
entries: read-only blocks of another instance's cache that this request attends over there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fabric.block_pool import BlockPool
from fabric.ledger import reserve_blocks
from fabric.prefix_cache import PrefixCache

BorrowFn = Callable[[int], "list[BlockRef]"]
ReleaseFn = Callable[[int, "list[int]"], None]
UnleaseFn = Callable[[int, "list[int]"], None]
SpillFn = Callable[["list[tuple[int, bytes]]"], None]


@dataclass(frozen=True, slots=True)
class BlockRef:
    instance: int
    block: int


class RManager:
    def __init__(self, instance_id: int, num_blocks: int, block_size: int,
                 max_lend_fraction: float = 0.95, min_free_fraction: float = 0.03,
                 prefix_cache: bool = True):
        self.instance_id = instance_id
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.cache = PrefixCache(prefix_cache)
        self.refs = [0] * num_blocks                 # users of each local block (tables, pins)
        self.leases: dict[int, dict[int, int]] = {}  # reader instance -> block -> read pins
        self.lease_span: dict[str, tuple[int, int]] = {}  # request -> leased table positions
        self.importing: set[int] = set()             # blocks receiving copied cached KV
        self.loading: dict[str, int] = {}            # request -> import blocks its tier load holds
        self.lend_cap = int(max_lend_fraction * num_blocks)
        self.min_free = reserve_blocks(num_blocks, min_free_fraction)
        self.tables: dict[str, list[BlockRef]] = {}
        self.lent: dict[int, set[int]] = {}          # debtor -> block ids here held for it
        self.spare: dict[int, list[int]] = {}        # creditor -> reserved ids not in any table
        self.num_remote_in_tables: dict[int, int] = {}
        self.borrow_fn: BorrowFn | None = None
        self.release_fn: ReleaseFn | None = None
        self.unlease_fn: UnleaseFn | None = None
        # evicted cached blocks (block, hash), called before the pool reuses them: the engine
        # copies their KV out for the tiers below (fabric/tiers.py)
        self.spill_fn: SpillFn | None = None
        self.num_borrow_events = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        """Blocks a new allocation may take: free ones and evictable cached ones."""
        return self.pool.num_free + self.cache.num_evictable

    @property
    def num_lent(self) -> int:
        return sum(len(s) for s in self.lent.values())

    @property
    def num_spare(self) -> int:
        return sum(len(s) for s in self.spare.values())

    @property
    def num_borrowed(self) -> int:
        return self.num_spare + sum(self.num_remote_in_tables.values())

    @property
    def is_debtor(self) -> bool:
        return self.num_borrowed > 0

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def num_missing(self, req_id: str, num_tokens: int) -> int:
        return max(0, self.blocks_for(num_tokens) - len(self.tables.get(req_id, ())))

    def lendable(self) -> int:
        """Blocks this instance may still lend: never below its reserve, never past its cap,
        and never while it borrows itself (no recursive borrowing)."""
        if self.is_debtor:
            return 0
        return max(0, min(self.num_free - self.min_free, self.lend_cap - self.num_lent))

    def can_lend(self, n: int) -> bool:
        return n <= self.lendable()

    def creditors(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for c, ids in self.spare.items():
            out[c] = out.get(c, 0) + len(ids)
        for c, n in self.num_remote_in_tables.items():
            out[c] = out.get(c, 0) + n
        return {c: n for c, n in out.items() if n}

    def debtors(self) -> dict[int, int]:
        return {d: len(ids) for d, ids in self.lent.items() if ids}

    # ---- request blocks ------------------------------------------------------------------
    def allocate(self, req_id: str, num_tokens: int, may_borrow: bool = True) -> bool:
        """Grow `req_id`'s table to hold `num_tokens` tokens: local blocks first, then spare
        borrowed ones, then a new borrow. All or nothing: on failure nothing changes."""
        n = self.num_missing(req_id, num_tokens)
        if n == 0:
            return True
        local = min(n, self.num_free)
        remote = self._take_spare(n - local)
        if len(remote) < n - local and may_borrow and self.borrow_fn is not None:
            self._borrow(n - local - len(remote))
            remote += self._take_spare(n - local - len(remote))
        if local + len(remote) < n:
            self._return_spare(remote)
            return False
        table = self.tables.setdefault(req_id, [])
        table += [BlockRef(self.instance_id, b) for b in self.take_local(local)]
        table += remote
        for ref in remote:
            self.num_remote_in_tables[ref.instance] = self.num_remote_in_tables.get(ref.instance, 0) + 1
        return True

    def take_local(self, n: int) -> list[int]:
        """`n` local blocks for a request table (reference count 1), evicting the least
        recently used cached blocks when too few are free."""
        ids = self._take(n)
        for b in ids:
            self.refs[b] = 1
        return ids

    def _take(self, n: int) -> list[int]:
        short = n - self.pool.num_free
        if short > 0:
            self._evict(short, spill=True)
        return self.pool.allocate(n)

    def _evict(self, n: int, spill: bool) -> int:
        victims = self.cache.evict(n)
        if spill and victims and self.spill_fn is not None:
            self.spill_fn(victims)
        self.pool.free([b for b, _ in victims])
        return len(victims)

    def free(self, req_id: str) -> None:
        """Drop `req_id`'s table: local blocks lose a user (the last one frees the block, or
        parks it as evictable cache: tail blocks first in eviction order), borrowed ones go
        back to the spares, leased ones are unpinned on their holder."""
        if req_id not in self.tables:
            return
        own = self._own_entries(req_id)
        table = self.tables.pop(req_id)
        a, b = self.lease_span.pop(req_id, (0, 0))
        leased = table[a:b]
        for ref in reversed(own):
            if ref.instance == self.instance_id:
                self._unref(ref.block)
        remote = [r for r in own if r.instance != self.instance_id]
        for ref in remote:
            self.num_remote_in_tables[ref.instance] -= 1
        self._return_spare(remote)
        if leased and self.unlease_fn is not None:
            self.unlease_fn(leased[0].instance, [r.block for r in leased])

    def move_home(self, req_id: str, creditor: int, positions: list[int]) -> list[int] | None:
        """`creditor` is leaving: entries `positions` of `req_id`'s table, blocks borrowed
        there, become local blocks, returned (the caller writes their KV and gives the old ones
        back). None, with nothing changed, when there is no room."""
        if len(positions) > self.num_free:
            return None
        table = self.tables[req_id]
        a, b = self.lease_span.get(req_id, (0, 0))
        assert all(table[i].instance == creditor and not a <= i < b for i in positions), \
            "only borrowed entries move home (leased ones are read-only)"
        new = self.take_local(len(positions))
        for i, blk in zip(positions, new):
            table[i] = BlockRef(self.instance_id, blk)
        self.num_remote_in_tables[creditor] -= len(positions)
        return new

    def _unref(self, block: int) -> None:
        self.refs[block] -= 1
        if self.refs[block] == 0 and not self.cache.park(block):
            self.pool.free([block])

    def _ref(self, block: int) -> None:
        if self.refs[block] == 0:
            self.cache.unpark(block)
        self.refs[block] += 1

    # ---- prefix cache ----------------------------------------------------------------------
    def attach_cached(self, req_id: str, hashes: list[bytes]) -> int:
        """Start `req_id`'s (empty) table with the longest cached prefix of `hashes`; returns
        how many blocks it reuses."""
        assert not self.tables.get(req_id), "a cached prefix starts an empty table"
        blocks = self.cache.lookup(hashes)
        for b in blocks:
            self._ref(b)
        if blocks:
            self.tables[req_id] = [BlockRef(self.instance_id, b) for b in blocks]
        return len(blocks)

    def attach_leased(self, req_id: str, holder: int, blocks: list[int]) -> None:
        """Append read-only blocks of `holder`'s cache (pinned there for this instance) to
        `req_id`'s table; the request attends over them on `holder` and never writes them."""
        table = self.tables.setdefault(req_id, [])
        assert req_id not in self.lease_span, "one leased span per request"
        self.lease_span[req_id] = (len(table), len(table) + len(blocks))
        table += [BlockRef(holder, b) for b in blocks]

    def register_computed(self, req_id: str, hashes: list[bytes], first: int) -> None:
        """Blocks `first..len(hashes)` of `req_id`'s table are full and computed: cache the
        local ones under their hashes."""
        table = self.tables[req_id]
        for j in range(first, len(hashes)):
            ref = table[j]
            if ref.instance == self.instance_id:
                self.cache.register(hashes[j], ref.block)

    def import_cached(self, n: int) -> list[int]:
        """`n` local blocks to receive KV copied from another instance's cache (none when
        there is no room); they are cached, evictable, by `finish_import`."""
        if n > self.num_free:
            return []
        ids = self.take_local(n)
        self.importing.update(ids)
        return ids

    def finish_import(self, hashes: list[bytes], blocks: list[int]) -> None:
        """The KV of `hashes` is written into `blocks[:len(hashes)]`: cache those; the rest
        (the holder had fewer) are freed."""
        for j, b in enumerate(blocks):
            self.importing.discard(b)
            if j < len(hashes):
                self.cache.register(hashes[j], b)
            self._unref(b)

    def adopt_loaded(self, req_id: str, hashes: list[bytes], blocks: list[int]) -> None:
        """Imported `blocks`, holding the KV of `hashes` (loaded from a lower tier), extend
        `req_id`'s table: they are cached and used by it."""
        table = self.tables.setdefault(req_id, [])
        for h, b in zip(hashes, blocks):
            self.importing.discard(b)
            self.cache.register(h, b)       # False: cached already elsewhere; this stays private
            table.append(BlockRef(self.instance_id, b))

    def pin(self, reader: int, hashes: list[bytes]) -> list[int]:
        """Pin the longest cached prefix of `hashes` for `reader`'s attention (read-only)."""
        blocks = self.cache.lookup(hashes)
        pins = self.leases.setdefault(reader, {})
        for b in blocks:
            self._ref(b)
            pins[b] = pins.get(b, 0) + 1
        return blocks

    def unpin(self, reader: int, blocks: list[int]) -> None:
        pins = self.leases.get(reader, {})
        for b in blocks:
            if pins.get(b, 0) <= 0:
                raise ValueError(f"instance {reader} unpinned block {b} it had not pinned")
            pins[b] -= 1
            if pins[b] == 0:
                del pins[b]
            self._unref(b)

    def clear_cache(self) -> int:
        """Evict every unused cached block (blocks in use stay cached; nothing goes down to
        the tiers); returns how many."""
        for s in list(self.cache.sessions):
            self.cache.release_session(s)
        return self._evict(self.cache.num_evictable, spill=False)

    def keep_session(self, req_id: str, session: str, expires_at: float) -> None:
        """`req_id` (a turn of `session`) finishes: its local cached blocks, idle once its
        table is freed, stay protected until the session's next turn or `expires_at`."""
        if req_id not in self.tables:
            return
        blocks = [r.block for r in self._own_entries(req_id)
                  if r.instance == self.instance_id and r.block in self.cache.hash_of]
        self.free(req_id)
        self.cache.protect(session, blocks, expires_at)

    def release_spares(self, keep: int = 0) -> int:
        """Give spare borrowed blocks back to their creditors, keeping at most `keep`."""
        released = 0
        for creditor in sorted(self.spare):
            ids = self.spare[creditor]
            give = ids[keep:] if keep else ids
            keep = max(0, keep - len(ids))
            if give and self.release_fn is not None:
                self.release_fn(creditor, list(give))
                del ids[len(ids) - len(give):]
                released += len(give)
        self.spare = {c: ids for c, ids in self.spare.items() if ids}
        return released

    def drop_spares(self, creditor: int) -> list[int]:
        """The spare blocks borrowed from `creditor`, off the books (it is leaving: the caller
        gives them back)."""
        return self.spare.pop(creditor, [])

    def add_borrowed(self, refs: list[BlockRef]) -> None:
        """Blocks reserved for this instance on creditors become spares for its requests."""
        if refs:
            self.num_borrow_events += 1
        self._return_spare(refs)

    def _borrow(self, n: int) -> None:
        refs = self.borrow_fn(n)  # type: ignore[misc]
        if refs:
            self.num_borrow_events += 1
        self._return_spare(refs)

    def _take_spare(self, n: int) -> list[BlockRef]:
        out: list[BlockRef] = []
        for creditor in sorted(self.spare):
            ids = self.spare[creditor]
            while ids and len(out) < n:
                out.append(BlockRef(creditor, ids.pop(0)))
        return out

    def _return_spare(self, refs: list[BlockRef]) -> None:
        for ref in refs:
            self.spare.setdefault(ref.instance, []).append(ref.block)

    # ---- lending -------------------------------------------------------------------------
    def lend(self, debtor: int, n: int) -> list[int]:
        """Reserve up to `n` local blocks for `debtor`: as many as `lendable()` allows, maybe
        none (the ledger's view lags; the debtor re-plans the rest elsewhere)."""
        n = min(n, self.lendable())
        if n <= 0:
            return []
        ids = self._take(n)
        self.lent.setdefault(debtor, set()).update(ids)
        return ids

    def reclaim(self, debtor: int, ids: list[int]) -> None:
        """`debtor` gives blocks back."""
        held = self.lent.get(debtor, set())
        bad = [i for i in ids if i not in held]
        if bad:
            raise ValueError(f"instance {debtor} returned block {bad[0]} it did not borrow")
        held.difference_update(ids)
        self.pool.free(list(ids))

    def drop_debtor(self, debtor: int) -> int:
        """Free everything lent to a dead `debtor`, and its read pins; returns how many lent
        blocks came back."""
        ids = self.lent.pop(debtor, set())
        self.pool.free(list(ids))
        for b, n in self.leases.pop(debtor, {}).items():
            for _ in range(n):
                self._unref(b)
        return len(ids)

    def forget_instance(self, dead: int) -> None:
        """`dead` is gone: drop the spare blocks it held for us (requests with blocks there must
        have been freed first) and anything lent to it."""
        assert not any(r.instance == dead for t in self.tables.values() for r in t), \
            "free the requests with blocks on a dead instance first"
        self.spare.pop(dead, None)
        self.num_remote_in_tables.pop(dead, None)
        if dead in self.lent or dead in self.leases:
            self.drop_debtor(dead)

    def holds_for(self, debtor: int, ids, read_only: bool = False) -> bool:
        """Every block of `ids` is lent to `debtor` (or, `read_only`, pinned for it)."""
        held = self.lent.get(debtor, ())
        pins = self.leases.get(debtor, {}) if read_only else {}
        return all(i in held or i in pins for i in ids)

    def check_integrity(self) -> None:
        """The books add up: every local block is free, evictable cache, lent, or used, and its
        reference count is the number of table entries and pins that hold it."""
        self.pool.check_integrity()
        self.cache.check_integrity()
        users = [0] * self.pool.num_blocks
        remote: dict[int, int] = {}
        for req_id in self.tables:
            for r in self._own_entries(req_id):
                if r.instance == self.instance_id:
                    users[r.block] += 1
                else:
                    remote[r.instance] = remote.get(r.instance, 0) + 1
        for pins in self.leases.values():
            for blk, n in pins.items():
                users[blk] += n
        for blk in self.importing:
            users[blk] += 1
        assert users == self.refs, "reference counts drift from the tables and pins"
        used = sum(1 for n in users if n)
        lent = set().union(*self.lent.values()) if self.lent else set()
        for blk in range(self.pool.num_blocks):
            kinds = (users[blk] > 0) + (blk in lent) + self.pool.is_free(blk) + \
                self.cache.is_idle(blk)
            assert kinds == 1, f"local block {blk} is in {kinds} states (used/lent/free/idle cache)"
        assert used + self.num_lent + self.pool.num_free + self.cache.num_evictable == \
            self.pool.num_blocks, "local blocks are lost or double counted"
        for c, n in self.num_remote_in_tables.items():
            assert remote.get(c, 0) == n, \
                f"remote count for creditor {c} is {n}, tables hold {remote.get(c, 0)}"

    def _own_entries(self, req_id: str) -> list[BlockRef]:
        """`req_id`'s table without its leased (read-only, another cache's) entries."""
        t = self.tables[req_id]
        a, b = self.lease_span.get(req_id, (0, 0))
        return t[:a] + t[b:]


def max_request_blocks(num_instances: int, kv_blocks: int, lending: bool,
                       max_lend_fraction: float, min_free_fraction: float) -> int:
    """The largest request an empty fabric of equal instances holds: the home's whole pool plus
    what each other instance may lend (never its reserve, never past its cap)."""
    if not lending or num_instances <= 1:
        return kv_blocks
    lendable = min(kv_blocks - reserve_blocks(kv_blocks, min_free_fraction),
                   int(max_lend_fraction * kv_blocks))
    return kv_blocks + (num_instances - 1) * max(0, lendable)
