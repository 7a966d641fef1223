"""rManager: the KV block books of one instance (see docs/architecture.md).

It owns the block table of every request homed here (entries local or on creditors), the blocks
it *lent* (held here for other instances' requests) and the blocks it *borrowed* (held for it
elsewhere). Borrowing is delegated to `borrow_fn`, which the hosting actor wires to the
controller and a creditor; the engine alone (one process, no Ray) never borrows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from fabric.block_pool import BlockPool
from fabric.ledger import reserve_blocks

BorrowFn = Callable[[int], "list[BlockRef]"]
ReleaseFn = Callable[[int, "list[int]"], None]


@dataclass(frozen=True, slots=True)
class BlockRef:
    instance: int
    block: int


class RManager:
    def __init__(self, instance_id: int, num_blocks: int, block_size: int,
                 max_lend_fraction: float = 0.95, min_free_fraction: float = 0.03):
        self.instance_id = instance_id
        self.block_size = block_size
        self.pool = BlockPool(num_blocks)
        self.lend_cap = int(max_lend_fraction * num_blocks)
        self.min_free = reserve_blocks(num_blocks, min_free_fraction)
        self.tables: dict[str, list[BlockRef]] = {}
        self.lent: dict[int, set[int]] = {}          # debtor -> block ids here held for it
        self.spare: dict[int, list[int]] = {}        # creditor -> reserved ids not in any table
        self.num_remote_in_tables: dict[int, int] = {}
        self.borrow_fn: BorrowFn | None = None
        self.release_fn: ReleaseFn | None = None
        self.num_borrow_events = 0

    # ---- queries -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self.pool.num_blocks

    @property
    def num_free(self) -> int:
        return self.pool.num_free

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
        return max(0, min(self.pool.num_free - self.min_free, self.lend_cap - self.num_lent))

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
        local = min(n, self.pool.num_free)
        remote = self._take_spare(n - local)
        if len(remote) < n - local and may_borrow and self.borrow_fn is not None:
            self._borrow(n - local - len(remote))
            remote += self._take_spare(n - local - len(remote))
        if local + len(remote) < n:
            self._return_spare(remote)
            return False
        table = self.tables.setdefault(req_id, [])
        table += [BlockRef(self.instance_id, b) for b in self.pool.allocate(local)]
        table += remote
        for ref in remote:
            self.num_remote_in_tables[ref.instance] = self.num_remote_in_tables.get(ref.instance, 0) + 1
        return True

    def free(self, req_id: str) -> None:
        """Drop `req_id`'s table: local blocks to the pool, borrowed ones back to the spares."""
        table = self.tables.pop(req_id, [])
        self.pool.free([r.block for r in table if r.instance == self.instance_id])
        remote = [r for r in table if r.instance != self.instance_id]
        for ref in remote:
            self.num_remote_in_tables[ref.instance] -= 1
        self._return_spare(remote)

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
        ids = self.pool.allocate(n)
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
        """Free everything lent to a dead `debtor`; returns how many blocks came back."""
        ids = self.lent.pop(debtor, set())
        self.pool.free(list(ids))
        return len(ids)

    def forget_instance(self, dead: int) -> None:
        """`dead` is gone: drop the spare blocks it held for us (requests with blocks there must
        have been freed first) and anything lent to it."""
        assert not any(r.instance == dead for t in self.tables.values() for r in t), \
            "free the requests with blocks on a dead instance first"
        self.spare.pop(dead, None)
        self.num_remote_in_tables.pop(dead, None)
        if dead in self.lent:
            self.drop_debtor(dead)

    def holds_for(self, debtor: int, ids) -> bool:
        held = self.lent.get(debtor, ())
        return all(i in held for i in ids)

    def check_integrity(self) -> None:
        self.pool.check_integrity()
        used_local = sum(r.instance == self.instance_id for t in self.tables.values() for r in t)
        assert used_local + self.num_lent + self.pool.num_free == self.pool.num_blocks, \
            "local blocks are lost or double counted"
        for c, n in self.num_remote_in_tables.items():
            in_tables = sum(r.instance == c for t in self.tables.values() for r in t)
            assert in_tables == n, f"remote count for creditor {c} is {n}, tables hold {in_tables}"


def max_request_blocks(num_instances: int, kv_blocks: int, lending: bool,
                       max_lend_fraction: float, min_free_fraction: float) -> int:
    """The largest request an empty fabric of equal instances holds: the home's whole pool plus
    what each other instance may lend (never its reserve, never past its cap)."""
    if not lending or num_instances <= 1:
        return kv_blocks
    lendable = min(kv_blocks - reserve_blocks(kv_blocks, min_free_fraction),
                   int(max_lend_fraction * kv_blocks))
    return kv_blocks + (num_instances - 1) * max(0, lendable)
