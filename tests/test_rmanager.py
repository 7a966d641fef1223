"""rManager and block pool books, on CPU with no runtime."""

import random

import pytest

from fabric.block_pool import BlockPool
from fabric.rmanager import BlockRef, RManager


def test_block_pool_all_or_nothing_and_double_free():
    pool = BlockPool(5)
    ids = pool.allocate(3)
    assert len(set(ids)) == 3 and pool.num_free == 2
    with pytest.raises(MemoryError):
        pool.allocate(3)
    assert pool.num_free == 2
    pool.free(ids[:1])
    with pytest.raises(ValueError, match="freed twice"):
        pool.free(ids[:1])
    pool.check_integrity()


def test_lending_caps_and_no_recursive_borrowing():
    rm = RManager(0, num_blocks=20, block_size=4, max_lend_fraction=0.5, min_free_fraction=0.1)
    assert rm.lendable() == 10                      # cap 10, reserve 2
    ids = rm.lend(1, 6)
    assert len(ids) == 6 and rm.num_lent == 6 and rm.lendable() == 4
    more = rm.lend(1, 9)                            # only 4 more under the cap
    assert len(more) == 4 and rm.lendable() == 0
    rm.reclaim(1, more)
    assert rm.allocate("r", 4 * 12)                 # own request takes 12 of the 14 free
    assert rm.lendable() == 0                       # reserve of 2 is kept
    rm.reclaim(1, ids[:2])
    with pytest.raises(ValueError, match="did not borrow"):
        rm.reclaim(1, ids[:1])
    debtor = RManager(1, 4, 4)
    debtor.borrow_fn = lambda n: [BlockRef(0, b) for b in rm.lend(1, n)]
    rm.free("r")
    assert debtor.allocate("x", 4 * 6)               # 4 local + 2 borrowed
    assert debtor.is_debtor and debtor.lendable() == 0 and debtor.lend(2, 1) == []
    rm.check_integrity()
    debtor.check_integrity()


def test_allocate_is_all_or_nothing_and_books_balance():
    rng = random.Random(0)
    lender = RManager(1, 16, 4, max_lend_fraction=1.0, min_free_fraction=0.0)
    rm = RManager(0, 8, 4)
    rm.borrow_fn = lambda n: [BlockRef(1, b) for b in lender.lend(0, min(n, 3))]
    rm.release_fn = lambda c, ids: lender.reclaim(0, ids)
    live = {}
    for step in range(300):
        if live and rng.random() < 0.4:
            req = rng.choice(sorted(live))
            rm.free(req)
            del live[req]
        else:
            req = f"r{step}"
            n = rng.randint(1, 40)
            before = (rm.num_free, rm.num_spare, dict(rm.tables))
            if rm.allocate(req, n):
                live[req] = n
                assert len(rm.tables[req]) == -(-n // 4)
            else:
                assert req not in rm.tables and before[0] == rm.num_free
        rm.check_integrity()
        lender.check_integrity()
        assert rm.num_borrowed == lender.num_lent
    for req in list(live):
        rm.free(req)
    rm.release_spares()
    assert rm.num_free == 8 and lender.num_lent == 0 and lender.num_free == 16
