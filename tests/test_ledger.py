"""The gManager's ledger and the typed control messages: pure Python, no Ray, no torch."""

from __future__ import annotations

import math
import random

import msgpack
import pytest

from fabric.ledger import Edge, Ledger, reserve_blocks
from fabric.messages import (
    MESSAGE_TYPES,
    BorrowRequest,
    CreditorProposal,
    Heartbeat,
    RebalanceOrder,
    ReleaseBlocks,
    ReserveReply,
    ReserveRequest,
    decode,
    encode,
)


def hb(iid: int, *, total: int = 100, used: int = 0, lent: dict | None = None,
       borrowed: dict | None = None, cap: int | None = None, load: float = 0.0,
       waiting: int = 0, seq: int = 1, free: int | None = None) -> Heartbeat:
    """A consistent heartbeat: `used` local blocks hold the instance's own requests."""
    lent, borrowed = dict(lent or {}), dict(borrowed or {})
    return Heartbeat(instance_id=iid, node=f"node{iid}", blocks_total=total,
                     blocks_free=total - used - sum(lent.values()) if free is None else free,
                     blocks_lent=sum(lent.values()), blocks_borrowed=sum(borrowed.values()),
                     lend_cap=total if cap is None else cap, load=load, num_waiting=waiting,
                     creditors=borrowed, debtors=lent, seq=seq)


def ledger_of(*beats: Heartbeat, min_free_fraction: float = 0.1) -> Ledger:
    led = Ledger(min_free_fraction=min_free_fraction)
    for b in beats:
        assert led.update(b)
    return led


# ---- heartbeats --------------------------------------------------------------------------------
def test_newest_seq_wins_stale_and_duplicate_ignored():
    led = ledger_of(hb(0, used=10, seq=5))
    assert not led.update(hb(0, used=50, seq=4))
    assert not led.update(hb(0, used=50, seq=5))
    assert led.heartbeat(0).blocks_free == 90
    assert led.update(hb(0, used=50, seq=6))
    assert led.heartbeat(0).blocks_free == 50


# ---- lendable ----------------------------------------------------------------------------------
def test_lendable_is_min_of_reserve_and_cap_never_negative():
    led = ledger_of(hb(0, used=30), hb(1, used=0, cap=20), hb(2, used=95), hb(3, lent={2: 15}, cap=20))
    assert led.reserve(0) == 10
    assert led.lendable(0) == 60          # free 70 - reserve 10
    assert led.lendable(1) == 20          # cap binds
    assert led.lendable(2) == 0           # free 5 < reserve 10
    assert led.lendable(3) == 5           # cap 20 - lent 15
    assert led.lendable(99) == 0          # unknown
    assert led.can_lend(3, 5) and not led.can_lend(3, 6) and not led.can_lend(2)


def test_a_debtor_cannot_lend():
    led = ledger_of(hb(0, borrowed={1: 4}), hb(1, lent={0: 4}))
    assert led.is_debtor(0) and led.lendable(0) == 0
    # Known as a debtor only through its creditor's (newer) view.
    led = ledger_of(hb(0), hb(1, lent={0: 4}))
    assert led.is_debtor(0) and led.lendable(0) == 0


@pytest.mark.parametrize("seed", range(20))
def test_reserve_and_lendable_agree_with_the_rmanager(seed):
    from fabric.rmanager import RManager

    rng = random.Random(seed)
    total, frac = rng.randint(1, 300), rng.choice([0.0, 0.05, 0.1, 0.3, 0.5])
    rm = RManager(0, total, 16, max_lend_fraction=rng.random(), min_free_fraction=frac)
    rm.lend(7, rng.randint(0, rm.lendable()))
    rm.allocate("r", rng.randint(0, rm.num_free) * 16, may_borrow=False)
    beat = Heartbeat(0, "n", rm.num_blocks, rm.num_free, rm.num_lent, rm.num_borrowed, rm.lend_cap,
                     0.0, 0, rm.creditors(), rm.debtors(), 1)
    led = ledger_of(beat, min_free_fraction=frac)
    assert reserve_blocks(total, frac) == rm.min_free
    assert led.lendable(0) == rm.lendable()
    led.check_integrity()


# ---- proposals ---------------------------------------------------------------------------------
def test_propose_prefers_most_lendable_then_least_load_then_id():
    led = ledger_of(hb(0, used=90), hb(1, used=40, load=0), hb(2, used=20, load=5),
                    hb(3, used=20, load=1), hb(4, used=20, load=1))
    assert led.propose_creditors(0, 10) == [(3, 10)]
    led.cancel(0, 3)
    led = ledger_of(hb(0, used=90), hb(1, used=40), hb(2, used=20, load=5),
                    hb(3, used=20, load=5))
    assert led.propose_creditors(0, 10) == [(2, 10)]


def test_propose_splits_across_creditors_when_none_alone_suffices():
    led = ledger_of(hb(0, used=90), hb(1, used=60), hb(2, used=50), hb(3, used=85))
    assert led.propose_creditors(0, 75) == [(2, 40), (1, 30), (3, 5)]
    assert led.num_borrow_events == 1 and led.num_blocks_granted == 75


def test_propose_never_self_debtor_or_excluded_and_all_or_nothing():
    led = ledger_of(hb(0, used=10), hb(1, borrowed={2: 5}), hb(2, lent={1: 5}), hb(3, used=80))
    assert led.propose_creditors(0, 20, exclude=[2]) == []      # 3 alone has 10; 1 is a debtor
    assert led.snapshot()["pending"] == [] and led.num_borrow_events == 0
    assert led.propose_creditors(0, 10, exclude=[2]) == [(3, 10)]
    led.cancel(0, 3)
    assert led.propose_creditors(0, 100) == []   # 2 (85 lendable) + 3 (10) cannot cover 100
    assert led.propose_creditors(3, 50) == [(2, 50)]              # most lendable: 2 (85) > 0 (80)
    led.cancel(3, 2)
    assert led.propose_creditors(3, 50, exclude=[2]) == [(0, 50)]  # never 3 itself nor 1
    assert led.propose_creditors(3, 0) == []
    with pytest.raises(ValueError, match="num_blocks"):
        led.propose_creditors(3, -1)


def test_a_debtor_with_a_pending_grant_is_not_proposed_as_creditor():
    led = ledger_of(hb(0), hb(1), hb(2, used=95))
    assert led.propose_creditors(2, 10) == [(0, 10)]
    assert led.is_debtor(2)
    assert led.propose_creditors(0, 10) == [(1, 10)]   # 0 is now a creditor, may still borrow
    assert led.propose_creditors(1, 5) == []           # 0 and 2 both have pending grants in


def test_pending_grants_prevent_double_counting_until_newer_heartbeat():
    led = ledger_of(hb(0, used=95), hb(1, used=95), hb(2, used=50, seq=7))
    assert led.lendable(2) == 40
    assert led.propose_creditors(0, 30) == [(2, 30)]
    assert led.lendable(2) == 10
    assert led.propose_creditors(1, 30) == []          # only 10 left, not 40 again
    assert led.propose_creditors(1, 10) == [(2, 10)]
    assert led.lendable(2) == 0
    assert not led.update(hb(2, used=50, seq=7))       # stale: pending stays
    assert led.lendable(2) == 0
    # The creditor lent 40 blocks; its newer heartbeat shows them and pending is dropped.
    assert led.update(hb(2, used=50, lent={0: 30, 1: 10}, seq=8))
    assert led.snapshot()["pending"] == [] and led.lendable(2) == 0


def test_confirm_and_cancel_settle_pending_partially():
    led = ledger_of(hb(0, used=95), hb(1, used=50))
    led.propose_creditors(0, 20)
    assert led.num_pending_out(1) == 20
    assert led.confirm(0, 1, 12) == 12 and led.num_pending_out(1) == 8
    assert led.cancel(0, 1) == 8 and led.num_pending_out(1) == 0
    assert led.cancel(0, 1) == 0
    assert (led.num_blocks_confirmed, led.num_blocks_cancelled) == (12, 8)
    assert not led.is_debtor(0)


def _random_fabric(rng: random.Random, n: int) -> Ledger:
    beats = {i: {"total": rng.randint(8, 200), "lent": {}, "borrowed": {}} for i in range(n)}
    for b in beats.values():
        b["cap"] = rng.randint(0, b["total"])
        b["used"] = rng.randint(0, b["total"])
        b["load"] = float(rng.randint(0, 5))
    debtors = rng.sample(range(n), rng.randint(0, n // 2))
    for d in debtors:                       # debtors borrow from non-debtors within their caps
        for c in rng.sample([c for c in range(n) if c not in debtors], min(2, n - len(debtors))):
            b = beats[c]
            room = min(b["total"] - b["used"] - sum(b["lent"].values()),
                       b["cap"] - sum(b["lent"].values()))
            k = rng.randint(0, max(0, room))
            if k:
                b["lent"][d] = k
                beats[d]["borrowed"][c] = k
    return ledger_of(*(hb(i, **b) for i, b in beats.items()),
                     min_free_fraction=rng.choice([0.0, 0.1, 0.25]))


@pytest.mark.parametrize("seed", range(40))
def test_random_proposals_respect_lendable_and_never_double_count(seed):
    rng = random.Random(seed)
    led = _random_fabric(rng, rng.randint(2, 9))
    led.check_integrity()
    assert led.edges_consistent() == []
    start = {i: led.lendable(i) for i in led.instances}
    given = {i: 0 for i in led.instances}
    for _ in range(30):
        debtor, need = rng.choice(led.instances), rng.randint(1, 120)
        exclude = rng.sample(led.instances, rng.randint(0, 2))
        before = {i: led.lendable(i) for i in led.instances}
        was_debtor = {i: led.is_debtor(i) for i in led.instances}
        grants = led.propose_creditors(debtor, need, exclude)
        if not grants:
            assert sum(n for c, n in before.items() if c != debtor and c not in exclude) < need
            continue
        assert sum(n for _, n in grants) == need
        assert len({c for c, _ in grants}) == len(grants)
        for c, n in grants:
            assert c != debtor and c not in exclude and not was_debtor[c]
            assert 0 < n <= before[c]
            given[c] += n
    assert all(given[i] <= start[i] for i in led.instances)


# ---- a small simulated fabric: the books move, heartbeats follow -------------------------------
class _Sim:
    """Authoritative books of a few instances, rManager-like, to drive the ledger."""

    def __init__(self, rng: random.Random, n: int, frac: float):
        self.total = {i: rng.randint(20, 80) for i in range(n)}
        self.cap = {i: int(0.8 * t) for i, t in self.total.items()}
        self.used = {i: 0 for i in range(n)}
        self.lent: dict[tuple[int, int], int] = {}       # (debtor, creditor) -> blocks
        self.frac, self.seq = frac, 0

    def free(self, i):
        return self.total[i] - self.used[i] - sum(n for (_, c), n in self.lent.items() if c == i)

    def lendable(self, i):
        if any(d == i for d, _ in self.lent):
            return 0
        lent = sum(n for (_, c), n in self.lent.items() if c == i)
        return max(0, min(self.free(i) - reserve_blocks(self.total[i], self.frac), self.cap[i] - lent))

    def heartbeat(self, i):
        self.seq += 1
        return hb(i, total=self.total[i], used=self.used[i], cap=self.cap[i], seq=self.seq,
                  lent={d: n for (d, c), n in self.lent.items() if c == i},
                  borrowed={c: n for (d, c), n in self.lent.items() if d == i})


@pytest.mark.parametrize("seed", range(30))
def test_simulated_fabric_stays_consistent_and_reservations_fit(seed):
    rng = random.Random(seed)
    sim = _Sim(rng, rng.randint(2, 6), rng.choice([0.05, 0.1, 0.2]))
    led = Ledger(min_free_fraction=sim.frac)
    for i in sim.total:
        led.update(sim.heartbeat(i))
    for _ in range(60):
        i = rng.choice(list(sim.total))
        op = rng.random()
        if op < 0.4:                                     # a request grows locally
            sim.used[i] += min(sim.free(i), rng.randint(0, 15))
        elif op < 0.55:                                  # a request finishes
            sim.used[i] -= rng.randint(0, sim.used[i])
        elif op < 0.65 and sim.lent:                     # a debtor releases borrowed blocks
            edge = rng.choice(sorted(sim.lent))
            sim.lent[edge] -= rng.randint(1, sim.lent[edge])
            sim.lent = {e: n for e, n in sim.lent.items() if n}
        else:                                            # borrow through the ledger
            grants = led.propose_creditors(i, rng.randint(1, 20))
            for c, n in grants:
                ok = n <= sim.lendable(c)                # the creditor's reservation
                assert ok, "fresh heartbeats + pending grants: a reservation must fit"
                sim.lent[(i, c)] = sim.lent.get((i, c), 0) + n
                led.confirm(i, c, n)
        for j in sim.total:                              # heartbeats every step
            led.update(sim.heartbeat(j))
        led.check_integrity()
        assert led.edges_consistent() == []
        assert {(e.debtor, e.creditor): e.num_blocks for e in led.edges()} == sim.lent


# ---- admission ---------------------------------------------------------------------------------
def test_capacity_boundary_exactly_at_the_limit_and_one_over():
    # Empty: home 0's whole pool (100) + 1 lends min(64 - 7, 40) = 40 + 2 lends min(30 - 3, 90) = 27.
    led = ledger_of(hb(0, total=100, used=100), hb(1, total=64, cap=40, used=50),
                    hb(2, total=30, used=0))
    assert led.max_request_blocks(home=0) == 167
    assert led.capacity_for_request(167, home=0)
    assert not led.capacity_for_request(168, home=0)
    # Best home: 0 as home gives 167; 1 gives 64 + (90) + 27 = 181; 2 gives 30 + 90 + 40 = 160.
    assert led.max_request_blocks() == 181
    assert led.capacity_for_request(181) and not led.capacity_for_request(182)
    assert led.max_request_blocks(home=2, lending=False) == 30
    assert led.max_request_blocks(lending=False) == 100
    with pytest.raises(ValueError, match="unknown instance 9"):
        led.capacity_for_request(1, home=9)
    assert Ledger().max_request_blocks() == 0


# ---- rebalancing -------------------------------------------------------------------------------
def test_two_cycle_is_cancelled_by_the_smaller_edge():
    led = ledger_of(hb(0, lent={1: 3}, borrowed={1: 5}, used=90),
                    hb(1, lent={0: 5}, borrowed={0: 3}, used=90))
    orders = [o for o in led.plan_rebalance() if o.kind == "cancel_cycle"]
    assert orders == [RebalanceOrder("cancel_cycle", 0, 1, 3, [0, 1]),
                      RebalanceOrder("cancel_cycle", 1, 0, 3, [0, 1])]


def test_three_cycle_is_cancelled_and_remainder_returns_home():
    # 0 borrows 4 from 1, 1 borrows 6 from 2, 2 borrows 2 from 0.
    led = ledger_of(hb(0, borrowed={1: 4}, lent={2: 2}, used=40),
                    hb(1, borrowed={2: 6}, lent={0: 4}, used=95),
                    hb(2, borrowed={0: 2}, lent={1: 6}, used=80))
    orders = led.plan_rebalance()
    cyc = [o for o in orders if o.kind == "cancel_cycle"]
    assert {(o.debtor, o.creditor, o.num_blocks) for o in cyc} == {(0, 1, 2), (1, 2, 2), (2, 0, 2)}
    assert all(o.cycle == [0, 1, 2] for o in cyc)
    # Left: 0->1: 2 (0 has room) and 1->2: 4 (1 has none).
    assert [o for o in orders if o.kind == "return_home"] == [
        RebalanceOrder("return_home", 0, 1, 2, [])]


def test_no_false_cycle_on_a_dag():
    # 0 -> 1, 0 -> 2, 1 -> 2 is a DAG (1 borrowing while lending is not a cycle).
    led = ledger_of(hb(0, borrowed={1: 3, 2: 4}, used=100),
                    hb(1, borrowed={2: 5}, lent={0: 3}, used=92),
                    hb(2, lent={0: 4, 1: 5}, used=80))
    assert [o for o in led.plan_rebalance() if o.kind == "cancel_cycle"] == []


@pytest.mark.parametrize("seed", range(30))
def test_random_graphs_cycles_iff_not_a_dag(seed):
    rng = random.Random(seed)
    n = rng.randint(2, 7)
    order = list(range(n))
    rng.shuffle(order)
    acyclic = rng.random() < 0.5
    edges = {}
    for _ in range(rng.randint(1, 12)):
        a, b = rng.sample(range(n), 2)
        if acyclic and order.index(a) > order.index(b):
            a, b = b, a
        edges[(a, b)] = rng.randint(1, 9)
    beats = [hb(i, total=200, used=150,
                borrowed={c: k for (d, c), k in edges.items() if d == i},
                lent={d: k for (d, c), k in edges.items() if c == i}) for i in range(n)]
    orders = ledger_of(*beats).plan_rebalance()
    cyc = [o for o in orders if o.kind == "cancel_cycle"]
    if acyclic:
        assert cyc == []
    left = dict(edges)
    for o in cyc:
        ring = list(zip(o.cycle, o.cycle[1:] + o.cycle[:1], strict=True))
        assert (o.debtor, o.creditor) in ring and o.cycle[0] == min(o.cycle)
        left[(o.debtor, o.creditor)] -= o.num_blocks
        assert left[(o.debtor, o.creditor)] >= 0
    remaining = {e for e, k in left.items() if k > 0}
    assert not _has_cycle(remaining)       # every cycle got cancelled


def _has_cycle(edges) -> bool:
    nodes = {x for e in edges for x in e}
    while nodes:                            # peel sinks: a DAG peels to nothing
        sinks = {x for x in nodes if not any(d == x and c in nodes for d, c in edges)}
        if not sinks:
            return True
        nodes -= sinks
    return False


def test_return_home_when_space_frees_smallest_edges_first():
    led = ledger_of(hb(0, borrowed={1: 8, 2: 3, 3: 20}, used=70),   # free 30 - reserve 10 = 20
                    hb(1, lent={0: 8}), hb(2, lent={0: 3}), hb(3, lent={0: 20}))
    assert led.plan_rebalance() == [RebalanceOrder("return_home", 0, 2, 3, []),
                                    RebalanceOrder("return_home", 0, 1, 8, []),
                                    RebalanceOrder("return_home", 0, 3, 9, [])]


def test_no_return_home_without_room_or_with_waiting_requests():
    lenders = [hb(1, lent={0: 8})]
    assert ledger_of(hb(0, borrowed={1: 8}, used=90), *lenders).plan_rebalance() == []
    assert ledger_of(hb(0, borrowed={1: 8}, used=50, waiting=2), *lenders).plan_rebalance() == []
    led = ledger_of(hb(0, borrowed={1: 8}, used=50), *lenders)
    assert led.plan_rebalance() == [RebalanceOrder("return_home", 0, 1, 8, [])]


# ---- membership --------------------------------------------------------------------------------
def test_remove_instance_clears_every_edge_to_and_from_it():
    led = ledger_of(hb(0, borrowed={1: 5}, lent={2: 4}, used=20),
                    hb(1, lent={0: 5}), hb(2, borrowed={0: 4, 3: 2}), hb(3, lent={2: 2}))
    assert led.propose_creditors(0, 3) == [(3, 3)]
    edges = led.remove_instance(0)
    assert edges == [Edge(0, 1, 5), Edge(2, 0, 4)]
    assert led.instances == [1, 2, 3]
    assert led.heartbeat(1).debtors == {} and led.heartbeat(1).blocks_lent == 0
    assert led.heartbeat(2).creditors == {3: 2} and led.heartbeat(2).blocks_borrowed == 2
    assert led.edges() == [Edge(2, 3, 2)]
    assert led.snapshot()["pending"] == [] and led.lendable(3) == 88
    led.check_integrity()
    assert not led.update(hb(0, seq=99))                 # late beat from the dead: ignored
    assert led.update(hb(1, lent={0: 5}, seq=2))         # survivor not yet told: stripped
    assert led.heartbeat(1).debtors == {} and led.heartbeat(1).blocks_lent == 0
    led.check_integrity()
    assert led.propose_creditors(0, 1) == []
    led.readmit(0)
    assert led.update(hb(0, seq=1)) and 0 in led.instances


# ---- books -------------------------------------------------------------------------------------
def test_check_integrity_and_edges_consistent_report_bad_books():
    good = hb(0, borrowed={1: 4})
    led = ledger_of(good, hb(1, lent={0: 3}))
    led.check_integrity()
    assert [tuple(m) for m in led.edges_consistent()] == [(0, 1, 4, 3)]
    assert led.edges() == [Edge(0, 1, 3)]
    bad = [Heartbeat(**{**_fields(good), "blocks_borrowed": 5}),
           Heartbeat(**{**_fields(good), "blocks_free": 101}),
           Heartbeat(**{**_fields(good), "lend_cap": 0, "blocks_lent": 1, "debtors": {2: 1},
                        "blocks_free": 90}),
           Heartbeat(**{**_fields(good), "creditors": {0: 4}})]
    for b in bad:
        with pytest.raises(AssertionError, match="instance 0"):
            ledger_of(b).check_integrity()
    assert ledger_of(hb(0, borrowed={7: 1})).edges_consistent() == [(0, 7, 1, None)]


def _fields(b: Heartbeat) -> dict:
    return {k: getattr(b, k) for k in Heartbeat.__dataclass_fields__}


def test_snapshot_is_plain_and_encodable():
    led = ledger_of(hb(0, borrowed={1: 4}, used=10), hb(1, lent={0: 4}))
    led.propose_creditors(0, 2)  # 0 is a debtor: only 1 may lend
    snap = led.snapshot()
    assert msgpack.unpackb(msgpack.packb(snap), strict_map_key=False) == snap
    assert snap["edges"] == [{"debtor": 0, "creditor": 1, "num_blocks": 4}]
    assert snap["pending"] == [{"debtor": 0, "creditor": 1, "num_blocks": 2}]
    row = snap["instances"][1]
    assert (row["id"], row["blocks_lent"], row["lendable"]) == (1, 4, 84)
    assert snap["num_borrow_events"] == 1 and snap["num_blocks_granted"] == 2


def test_bad_min_free_fraction():
    with pytest.raises(ValueError, match="min_free_fraction"):
        Ledger(min_free_fraction=1.0)


# ---- messages ----------------------------------------------------------------------------------
def _random_messages(rng: random.Random):
    def ints(k):
        return [rng.randint(0, 1000) for _ in range(k)]

    yield hb(rng.randint(0, 9), borrowed={1: 3}, lent={2: 5}, load=rng.random() * 4,
             seq=rng.randint(1, 10**9))
    yield BorrowRequest(rng.randint(0, 9), rng.randint(1, 99), ints(rng.randint(0, 3)))
    grants = [(rng.randint(0, 9), rng.randint(1, 9)) for _ in range(rng.randint(0, 3))]
    yield CreditorProposal(1, grants)
    yield ReserveRequest(1, rng.randint(1, 50), rng.randint(0, 2**40))
    yield ReserveReply(rng.random() < 0.5, ints(rng.randint(0, 5)), rng.choice(["", "over cap"]))
    yield ReleaseBlocks(3, ints(rng.randint(0, 5)))
    yield RebalanceOrder("cancel_cycle", 0, 1, 3, [0, 1, 2])
    yield RebalanceOrder("return_home", 2, 1, 3, [])


@pytest.mark.parametrize("seed", range(10))
def test_messages_round_trip(seed):
    seen = set()
    for msg in _random_messages(random.Random(seed)):
        assert type(msg).from_dict(msg.to_dict()) == msg
        assert decode(encode(msg)) == msg
        seen.add(type(msg).__name__)
    assert seen == set(MESSAGE_TYPES)


def test_grants_come_back_as_tuples_and_ints_pass_for_floats():
    msg = decode(msgpack.packb({"type": "CreditorProposal", "debtor": 1, "grants": [[2, 3]]}))
    assert msg.grants == [(2, 3)] and isinstance(msg.grants[0], tuple)
    d = hb(0).to_dict()
    d["load"] = 3
    assert Heartbeat.from_dict(d).load == 3.0 and isinstance(Heartbeat.from_dict(d).load, float)


def _packed(**fields) -> bytes:
    return msgpack.packb(fields)


@pytest.mark.parametrize("data, match", [
    (_packed(type="Nope", x=1), "unknown control message type 'Nope'"),
    (_packed(debtor=1, block_ids=[]), "'type' field"),
    (msgpack.packb([1, 2]), "'type' field"),
    (b"\xc1\x00\xff", "not valid msgpack"),
    (b"", "not valid msgpack"),
    (_packed(type="ReleaseBlocks", debtor=1), "missing field.*block_ids"),
    (_packed(type="ReleaseBlocks", debtor=1, block_ids=[], extra=2), "unknown field.*extra"),
    (_packed(type="ReleaseBlocks", debtor="1", block_ids=[]), "ReleaseBlocks.debtor must be int"),
    (_packed(type="ReleaseBlocks", debtor=True, block_ids=[]), "debtor must be int, got bool"),
    (_packed(type="ReleaseBlocks", debtor=1.0, block_ids=[]), "debtor must be int"),
    (_packed(type="ReleaseBlocks", debtor=1, block_ids=[1, "x"]), r"block_ids\[1\] must be int"),
    (_packed(type="ReleaseBlocks", debtor=1, block_ids={1: 2}), "block_ids must be a list"),
    (_packed(type="ReserveReply", ok=1, block_ids=[], reason=""), "ok must be bool"),
    (_packed(type="CreditorProposal", debtor=1, grants=[[1, 2, 3]]), "must have 2 items"),
    (_packed(type="RebalanceOrder", kind="teleport", debtor=0, creditor=1, num_blocks=1,
             cycle=[]), "kind must be one of"),
    (msgpack.packb({"type": "ReleaseBlocks", "debtor": 1, "block_ids": [b"\x01"]}), "must be int"),
    (b"\x81\x91\x01\x02", "not valid msgpack"),                      # a list as a map key
    (msgpack.packb({"type": "ReleaseBlocks"}) + b"\x00", "not valid msgpack"),  # trailing bytes
])
def test_decode_rejects_malformed_input(data, match):
    with pytest.raises(ValueError, match=match):
        decode(data)


def test_heartbeat_rejects_bad_maps_and_non_finite_load():
    d = hb(0, borrowed={1: 2}).to_dict()
    with pytest.raises(ValueError, match="creditors key must be int"):
        Heartbeat.from_dict({**d, "creditors": {"1": 2}})
    with pytest.raises(ValueError, match=r"debtors\[2\] must be int"):
        Heartbeat.from_dict({**d, "debtors": {2: 1.5}})
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="load must be a finite number"):
            decode(encode(hb(0, load=bad)))
    with pytest.raises(ValueError, match="must be a dict"):
        Heartbeat.from_dict([1, 2])


def test_decode_rejects_oversize_and_non_bytes():
    big = encode(ReleaseBlocks(1, list(range(100_000))))
    assert len(big) > 1 << 18
    assert decode(big, max_bytes=len(big)).block_ids[-1] == 99_999
    with pytest.raises(ValueError, match="exceeds the limit of 1024"):
        decode(big, max_bytes=1024)
    with pytest.raises(ValueError, match="expects bytes"):
        decode("not bytes")  # type: ignore[arg-type]


def test_rebalance_order_kind_checked_and_encode_refuses_foreign_objects():
    with pytest.raises(ValueError, match="kind must be one of"):
        RebalanceOrder("swap", 0, 1, 1, [])  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not a fabric control message"):
        encode({"type": "Heartbeat"})  # type: ignore[arg-type]


def test_propose_with_min_blocks_takes_what_is_there_but_not_less():
    ledger = ledger_of(hb(0), hb(1, used=80), hb(2, used=85))      # lendable 10 and 5
    assert ledger.propose_creditors(0, 20) == []                  # all or nothing
    grants = ledger.propose_creditors(0, 20, min_blocks=12)
    assert sorted(grants) == [(1, 10), (2, 5)]
    assert ledger.propose_creditors(0, 8, min_blocks=1) == []     # nothing left to lend
