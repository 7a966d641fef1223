"""The gManager's logic: the global debt ledger built from instance heartbeats (the controller's
side of lending; see docs/architecture.md).

The controller actor hosts one `Ledger`; it is never on the per-token path. The ledger is
*advisory*: each instance's rManager owns its books and is the authority on what it may lend
(`RManager.lend` refuses past its own `lendable()`). Heartbeats are not atomic across instances,
so the ledger may briefly over- or under-estimate; an over-estimate costs a refused reservation,
which the debtor re-plans with that creditor excluded, never a lost or double-lent block.

Words: a *debt edge* (debtor, creditor, n) means the debtor's requests hold n KV blocks on the
creditor. An instance is a *debtor* while it borrows from anyone (or has a grant pending).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, replace
from typing import NamedTuple

from fabric.messages import Heartbeat, RebalanceOrder


class Edge(NamedTuple):
    debtor: int
    creditor: int
    num_blocks: int


class EdgeMismatch(NamedTuple):
    """The two sides' views of one edge disagree (None: that side has sent no heartbeat)."""

    debtor: int
    creditor: int
    debtor_view: int | None       # debtor's creditors[creditor]
    creditor_view: int | None     # creditor's debtors[debtor]


@dataclass(slots=True)
class _Pending:
    debtor: int
    creditor: int
    num_blocks: int
    seq: int                      # the creditor's newest heartbeat seq when proposed


def reserve_blocks(blocks_total: int, min_free_fraction: float) -> int:
    """Blocks an instance keeps for its own requests: never lent. Same formula as the rManager's
    `min_free`, so ledger and rManager agree to the block."""
    return math.ceil(min_free_fraction * blocks_total)


class Ledger:
    """Global debt ledger: newest heartbeat per instance, pending grants, counters.

    Not thread-safe: the hosting actor holds a lock around every call.
    """

    def __init__(self, min_free_fraction: float = 0.1):
        if not 0.0 <= min_free_fraction < 1.0:
            raise ValueError(f"min_free_fraction must be in [0, 1), got {min_free_fraction}")
        self.min_free_fraction = min_free_fraction
        self._hbs: dict[int, Heartbeat] = {}
        self._last_seq: dict[int, int] = {}       # survives remove_instance: late beats stay stale
        self._removed: set[int] = set()
        self._pending: list[_Pending] = []
        self.num_borrow_events = 0                # proposals that granted anything
        self.num_blocks_granted = 0               # blocks in those proposals
        self.num_blocks_confirmed = 0
        self.num_blocks_cancelled = 0

    # ---- heartbeats and membership -------------------------------------------------------------
    def update(self, hb: Heartbeat) -> bool:
        """Take `hb` if it is the newest from its instance. Returns False (and changes nothing)
        for a stale or duplicate seq, or for a removed instance (until `readmit`). Edges to
        removed instances are stripped from `hb`. Pending grants on this creditor proposed
        before this seq are dropped: the heartbeat is assumed to show them."""
        iid = hb.instance_id
        if iid in self._removed or hb.seq <= self._last_seq.get(iid, -1):
            return False
        self._hbs[iid] = self._strip_removed(hb)
        self._last_seq[iid] = hb.seq
        self._pending = [p for p in self._pending if not (p.creditor == iid and p.seq < hb.seq)]
        return True

    def remove_instance(self, instance_id: int) -> list[Edge]:
        """Drop a dead instance and every debt edge to or from it; return those edges (the
        survivor's view of an edge when it has one). Survivors' books are adjusted: lent or
        borrowed counts fall by the dropped edges, but free counts only rise when a survivor
        reports it freed the blocks. Later heartbeats from the id are ignored until `readmit`."""
        edges = self._edges_touching(instance_id)
        self._hbs.pop(instance_id, None)
        self._removed.add(instance_id)
        self._hbs = {i: self._strip_removed(hb) for i, hb in self._hbs.items()}
        self._pending = [p for p in self._pending if instance_id not in (p.debtor, p.creditor)]
        return edges

    def readmit(self, instance_id: int) -> None:
        """Let a removed id join again (e.g. a restarted instance whose seq starts over)."""
        self._removed.discard(instance_id)
        self._last_seq.pop(instance_id, None)

    @property
    def instances(self) -> list[int]:
        return sorted(self._hbs)

    def heartbeat(self, instance_id: int) -> Heartbeat | None:
        return self._hbs.get(instance_id)

    # ---- queries -------------------------------------------------------------------------------
    def reserve(self, instance_id: int) -> int:
        return reserve_blocks(self._hbs[instance_id].blocks_total, self.min_free_fraction)

    def num_pending_out(self, creditor: int) -> int:
        return sum(p.num_blocks for p in self._pending if p.creditor == creditor)

    def num_pending_in(self, debtor: int) -> int:
        return sum(p.num_blocks for p in self._pending if p.debtor == debtor)

    def is_debtor(self, instance_id: int) -> bool:
        """Borrows from anyone by any view: its own heartbeat, a creditor's, or a pending grant."""
        hb = self._hbs.get(instance_id)
        if hb is not None and (hb.blocks_borrowed > 0 or any(hb.creditors.values())):
            return True
        if any(o.debtors.get(instance_id, 0) > 0 for o in self._hbs.values()):
            return True
        return self.num_pending_in(instance_id) > 0

    def lendable(self, creditor: int) -> int:
        """Blocks `creditor` may still lend: min(free - reserve, lend_cap - lent) minus grants
        pending on it, never negative. 0 for an unknown instance and for a debtor (no recursive
        borrowing, as the rManager enforces)."""
        hb = self._hbs.get(creditor)
        if hb is None or self.is_debtor(creditor):
            return 0
        room = min(hb.blocks_free - self.reserve(creditor), hb.lend_cap - hb.blocks_lent)
        return max(0, room - self.num_pending_out(creditor))

    def can_lend(self, creditor: int, num_blocks: int = 1) -> bool:
        return num_blocks <= self.lendable(creditor)

    def edges(self) -> list[Edge]:
        """Debt edges both sides agree on, at the smaller of the two views (conservative:
        heartbeats are not atomic). An edge one side has not reported yet is left out."""
        out = []
        for d, c in self._edge_pairs():
            n = min(self._debtor_view(d, c) or 0, self._creditor_view(d, c) or 0)
            if n > 0:
                out.append(Edge(d, c, n))
        return out

    def edges_consistent(self) -> list[EdgeMismatch]:
        """Edges whose two views differ. Expected briefly (heartbeats are not atomic); a
        mismatch that persists across several heartbeat periods is a bookkeeping bug."""
        out = []
        for d, c in self._edge_pairs():
            dv, cv = self._debtor_view(d, c), self._creditor_view(d, c)
            if dv != cv:
                out.append(EdgeMismatch(d, c, dv, cv))
        return out

    # ---- admission -----------------------------------------------------------------------------
    def max_request_blocks(self, home: int | None = None, *, lending: bool = True) -> int:
        """Most blocks one request could hold in an EMPTY fabric: its home's whole pool plus
        what every other instance may lend when empty, min(total - reserve, lend_cap). With
        `home=None`, the best home. Counts only instances that have sent a heartbeat (0 when
        none has: wait for the first heartbeats before admitting)."""
        if home is not None and home not in self._hbs:
            raise ValueError(f"unknown instance {home}: no heartbeat received")
        homes = [home] if home is not None else list(self._hbs)
        lend = {i: self._lendable_when_empty(hb) if lending else 0 for i, hb in self._hbs.items()}
        total = sum(lend.values())
        return max((self._hbs[h].blocks_total + total - lend[h] for h in homes), default=0)

    def capacity_for_request(self, num_blocks_needed: int, home: int | None = None, *,
                             lending: bool = True) -> bool:
        """Could a request needing `num_blocks_needed` blocks fit in an empty fabric? The
        admission check: reject with `CapacityError` when False (the caller raises it)."""
        return num_blocks_needed <= self.max_request_blocks(home, lending=lending)

    # ---- proposals -----------------------------------------------------------------------------
    def propose_creditors(self, debtor: int, num_blocks: int, exclude: Iterable[int] = (),
                          min_blocks: int | None = None) -> list[tuple[int, int]]:
        """Creditors for `num_blocks` blocks: [(creditor, n)], the n summing to `num_blocks`,
        or [] when the fabric cannot cover all of them (nothing is recorded then). With
        `min_blocks`, as many as the fabric can lend up to `num_blocks`, or [] below `min_blocks`
        (a debtor asks for a chunk ahead but must have its shortfall).

        Candidates: known, not `debtor`, not in `exclude`, not debtors themselves; preferred by
        most lendable, then least load, then lowest id; split greedily across several when
        none alone suffices. The grants stay pending (subtracted from the creditors' lendable,
        and making `debtor` count as a debtor) until the creditor's next heartbeat, `confirm`
        or `cancel`. A removed debtor gets []."""
        if num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        if num_blocks == 0 or debtor in self._removed:
            return []
        cands = self._candidates(debtor, set(exclude))
        if min_blocks is not None:
            num_blocks = min(num_blocks, sum(n for _, n in cands))
            if num_blocks < max(min_blocks, 1):
                return []
        grants = self._greedy(cands, num_blocks)
        if not grants:
            return []
        for c, n in grants:
            self._pending.append(_Pending(debtor, c, n, self._last_seq[c]))
        self.num_borrow_events += 1
        self.num_blocks_granted += num_blocks
        return grants

    def confirm(self, debtor: int, creditor: int, num_blocks: int | None = None) -> int:
        """The creditor reserved (part of) a pending grant: stop counting it as pending (the
        creditor's heartbeat will show it as lent). Returns the blocks taken off pending."""
        n = self._settle(debtor, creditor, num_blocks)
        self.num_blocks_confirmed += n
        return n

    def cancel(self, debtor: int, creditor: int, num_blocks: int | None = None) -> int:
        """A pending grant will not be used (refused or no longer needed): free it for others.
        `num_blocks=None` settles everything pending for the pair."""
        n = self._settle(debtor, creditor, num_blocks)
        self.num_blocks_cancelled += n
        return n

    # ---- rebalancing ---------------------------------------------------------------------------
    def plan_rebalance(self) -> list[RebalanceOrder]:
        """Orders that restore locality, computed from the agreed `edges()`; changes nothing.

        First debt cycles (A borrows from B ... borrows from A, found by graph search): each is
        cancelled by min(edge) blocks as one swap, one "cancel_cycle" order per edge. Then
        "return_home" for debtors with free room (free - reserve), smallest edges first so
        whole edges vanish (fewer creditors per request). A debtor with waiting requests or a
        pending grant is skipped: its room is spoken for. Not idempotent: call it again only
        once heartbeats show the previous round's orders done, or they are issued twice."""
        graph = {(e.debtor, e.creditor): e.num_blocks for e in self.edges()}
        orders = self._cancel_cycles(graph)
        return orders + self._return_home(graph)

    # ---- stats and checks ----------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Plain-value view for stats: instances, agreed edges, pending grants, counters."""
        return {
            "instances": [self._instance_row(hb) for _, hb in sorted(self._hbs.items())],
            "edges": [e._asdict() for e in self.edges()],
            "pending": [{"debtor": p.debtor, "creditor": p.creditor, "num_blocks": p.num_blocks}
                        for p in self._pending],
            "removed": sorted(self._removed),
            "num_borrow_events": self.num_borrow_events,
            "num_blocks_granted": self.num_blocks_granted,
            "num_blocks_confirmed": self.num_blocks_confirmed,
            "num_blocks_cancelled": self.num_blocks_cancelled,
        }

    def check_integrity(self) -> None:
        """Raise AssertionError listing every per-instance inconsistency: negative counts,
        free + lent > total, lent > lend_cap, lend_cap > total, sum(creditors) != borrowed,
        sum(debtors) != lent, self edges. Cross-instance edge agreement is not checked here
        (heartbeats are not atomic): see `edges_consistent()`."""
        problems = [p for _, hb in sorted(self._hbs.items()) for p in _heartbeat_problems(hb)]
        problems += [f"pending grant {p} is not positive" for p in self._pending
                     if p.num_blocks <= 0]
        if problems:
            raise AssertionError("ledger books are inconsistent: " + "; ".join(problems))

    # ---- internals -----------------------------------------------------------------------------
    def _strip_removed(self, hb: Heartbeat) -> Heartbeat:
        cred = {c: n for c, n in hb.creditors.items() if c not in self._removed}
        debt = {d: n for d, n in hb.debtors.items() if d not in self._removed}
        if len(cred) == len(hb.creditors) and len(debt) == len(hb.debtors):
            return hb
        return replace(hb, creditors=cred, debtors=debt,
                       blocks_borrowed=hb.blocks_borrowed - sum(hb.creditors.values()) + sum(cred.values()),
                       blocks_lent=hb.blocks_lent - sum(hb.debtors.values()) + sum(debt.values()))

    def _edges_touching(self, iid: int) -> list[Edge]:
        found: dict[tuple[int, int], int] = {}
        own = self._hbs.get(iid)
        if own is not None:
            found.update({(iid, c): n for c, n in own.creditors.items()})
            found.update({(d, iid): n for d, n in own.debtors.items()})
        for other, hb in self._hbs.items():    # survivors' views win: they are their books
            if other != iid and iid in hb.debtors:
                found[(iid, other)] = hb.debtors[iid]
            if other != iid and iid in hb.creditors:
                found[(other, iid)] = hb.creditors[iid]
        return [Edge(d, c, n) for (d, c), n in sorted(found.items()) if n > 0]

    def _edge_pairs(self) -> list[tuple[int, int]]:
        pairs = {(i, c) for i, hb in self._hbs.items() for c, n in hb.creditors.items() if n}
        pairs |= {(d, i) for i, hb in self._hbs.items() for d, n in hb.debtors.items() if n}
        return sorted(pairs)

    def _debtor_view(self, debtor: int, creditor: int) -> int | None:
        hb = self._hbs.get(debtor)
        return None if hb is None else hb.creditors.get(creditor, 0)

    def _creditor_view(self, debtor: int, creditor: int) -> int | None:
        hb = self._hbs.get(creditor)
        return None if hb is None else hb.debtors.get(debtor, 0)

    def _lendable_when_empty(self, hb: Heartbeat) -> int:
        reserve = reserve_blocks(hb.blocks_total, self.min_free_fraction)
        return max(0, min(hb.blocks_total - reserve, hb.lend_cap))

    def _candidates(self, debtor: int, exclude: set[int]) -> list[tuple[int, int]]:
        cands = [(c, self.lendable(c)) for c in self._hbs if c != debtor and c not in exclude]
        cands = [(c, n) for c, n in cands if n > 0]
        return sorted(cands, key=lambda cn: (-cn[1], self._hbs[cn[0]].load, cn[0]))

    @staticmethod
    def _greedy(cands: list[tuple[int, int]], need: int) -> list[tuple[int, int]]:
        if sum(n for _, n in cands) < need:
            return []
        grants = []
        for c, n in cands:
            take = min(n, need)
            grants.append((c, take))
            need -= take
            if need == 0:
                break
        return grants

    def _settle(self, debtor: int, creditor: int, num_blocks: int | None) -> int:
        if num_blocks is not None and num_blocks < 0:
            raise ValueError(f"num_blocks must be >= 0, got {num_blocks}")
        left = math.inf if num_blocks is None else num_blocks
        settled = 0
        for p in self._pending:
            if p.debtor == debtor and p.creditor == creditor and left > 0:
                take = int(min(p.num_blocks, left))
                p.num_blocks -= take
                settled += take
                left -= take
        self._pending = [p for p in self._pending if p.num_blocks > 0]
        return settled

    def _cancel_cycles(self, graph: dict[tuple[int, int], int]) -> list[RebalanceOrder]:
        orders = []
        while (cycle := _find_cycle(graph)) is not None:
            ring = list(zip(cycle, cycle[1:] + cycle[:1], strict=True))
            m = min(graph[e] for e in ring)
            for d, c in ring:
                orders.append(RebalanceOrder("cancel_cycle", d, c, m, list(cycle)))
                graph[(d, c)] -= m
                if graph[(d, c)] == 0:
                    del graph[(d, c)]
        return orders

    def _return_home(self, graph: dict[tuple[int, int], int]) -> list[RebalanceOrder]:
        orders = []
        for d in sorted({d for d, _ in graph}):
            hb = self._hbs[d]
            if hb.num_waiting > 0 or self.num_pending_in(d) > 0:
                continue
            room = hb.blocks_free - self.reserve(d)
            for n, c in sorted((n, c) for (dd, c), n in graph.items() if dd == d):
                if room <= 0:
                    break
                take = min(room, n)
                orders.append(RebalanceOrder("return_home", d, c, take, []))
                room -= take
        return orders

    def _instance_row(self, hb: Heartbeat) -> dict:
        return {"id": hb.instance_id, "node": hb.node, "blocks_total": hb.blocks_total,
                "blocks_free": hb.blocks_free, "blocks_lent": hb.blocks_lent,
                "blocks_borrowed": hb.blocks_borrowed, "lend_cap": hb.lend_cap,
                "lendable": self.lendable(hb.instance_id), "load": hb.load,
                "num_waiting": hb.num_waiting, "seq": hb.seq}


def _find_cycle(graph: dict[tuple[int, int], int]) -> list[int] | None:
    """One simple cycle of the debtor -> creditor graph, rotated to start at its smallest id;
    deterministic (nodes and successors visited in id order). None for a DAG."""
    succ: dict[int, list[int]] = {}
    for d, c in sorted(graph):
        succ.setdefault(d, []).append(c)
    state: dict[int, int] = {}                # 1 = on the current path, 2 = done
    for start in sorted(succ):
        if start not in state:
            found = _dfs(start, succ, state, [])
            if found is not None:
                i = found.index(min(found))
                return found[i:] + found[:i]
    return None


def _dfs(node: int, succ: dict[int, list[int]], state: dict[int, int],
         path: list[int]) -> list[int] | None:
    # Recursion depth <= number of instances: fine for fabric sizes.
    state[node] = 1
    path.append(node)
    for nxt in succ.get(node, ()):
        if state.get(nxt) == 1:
            return path[path.index(nxt):]
        if nxt not in state and (found := _dfs(nxt, succ, state, path)) is not None:
            return found
    path.pop()
    state[node] = 2
    return None


def _heartbeat_problems(hb: Heartbeat) -> list[str]:
    i = f"instance {hb.instance_id}"
    counts = {"blocks_total": hb.blocks_total, "blocks_free": hb.blocks_free,
              "blocks_lent": hb.blocks_lent, "blocks_borrowed": hb.blocks_borrowed,
              "lend_cap": hb.lend_cap, "num_waiting": hb.num_waiting}
    out = [f"{i}: {k} = {v} < 0" for k, v in counts.items() if v < 0]
    if hb.blocks_free + hb.blocks_lent > hb.blocks_total:
        out.append(f"{i}: free {hb.blocks_free} + lent {hb.blocks_lent} > total {hb.blocks_total}")
    if hb.blocks_lent > hb.lend_cap:
        out.append(f"{i}: lent {hb.blocks_lent} > lend_cap {hb.lend_cap}")
    if hb.lend_cap > hb.blocks_total:
        out.append(f"{i}: lend_cap {hb.lend_cap} > total {hb.blocks_total}")
    if sum(hb.creditors.values()) != hb.blocks_borrowed:
        out.append(f"{i}: creditors sum to {sum(hb.creditors.values())}, "
                   f"blocks_borrowed is {hb.blocks_borrowed}")
    if sum(hb.debtors.values()) != hb.blocks_lent:
        out.append(f"{i}: debtors sum to {sum(hb.debtors.values())}, blocks_lent is {hb.blocks_lent}")
    if hb.instance_id in hb.creditors or hb.instance_id in hb.debtors:
        out.append(f"{i}: has a debt edge to itself")
    out += [f"{i}: edge to {k} is {v} < 0" for k, v in {**hb.creditors, **hb.debtors}.items() if v < 0]
    return out
