"""The fabric-wide prefix index and cache-aware routing (kept by the controller, off the token
path). Free of Ray: the controller actor hosts one `Router`.

Index: instances publish the hashes of blocks they cache and evict, in batches with their
heartbeats (`apply`). Each batch names the generation it follows; a batch that does not follow
what the index holds (lost message, restarted controller) is refused and the instance sends
its whole cache next. A lost or stale index only causes misses: an instance serves KV only
for hashes it really holds, checked when a request arrives.

Routing (`route`): a request goes where `overlap_weight x prefill_blocks + decode_blocks` is
least (the cost of Dynamo's KV router), where prefill_blocks are the prompt blocks not cached
there and decode_blocks the KV blocks it holds for running requests (plus what this call sent
it) and the blocks this request would add there. So requests of one call that share a prefix
longer than a request's own blocks go to the same instance (the prefix is computed once). An
instance
busier than `balance_threshold x (mean outstanding requests + 1)` gets no credit for its cache,
so a hot prefix does not pile all traffic on one instance. Requests of one call that share a
prefix are counted as cached where the first of them went (they are computed once there).

KV tiers: each node's tier store publishes the blocks its host and disk tiers hold (`TierIndex`).
Blocks that continue an instance's cached prefix in its node's tiers count as TIER_CREDIT of
a cached block there: loading them costs less than computing them, but is not free.
"""

from __future__ import annotations

from dataclasses import dataclass

TIER_CREDIT = 0.5     # a block in the home node's host or disk tier, against one in its pool


@dataclass(slots=True)
class Load:
    outstanding: float = 0.0     # requests running or waiting
    blocks_used: int = 0         # KV blocks held for running requests


class PrefixIndex:
    def __init__(self):
        self.holders: dict[bytes, set[int]] = {}
        self.of: dict[int, set[bytes]] = {}
        self.gen: dict[int, int] = {}

    def apply(self, instance: int, gen: int, base: int | None, added: list[bytes],
              removed: list[bytes]) -> bool:
        """Apply one batch from `instance`: `base` None = a whole snapshot in `added`; else the
        generation this batch follows. False: refused, send a snapshot."""
        if base is None:
            self.remove_instance(instance)
        elif self.gen.get(instance) != base:
            return False
        mine = self.of.setdefault(instance, set())
        for h in removed:
            if h in mine:
                mine.discard(h)
                holders = self.holders.get(h)
                if holders is not None:
                    holders.discard(instance)
                    if not holders:
                        del self.holders[h]
        for h in added:
            mine.add(h)
            self.holders.setdefault(h, set()).add(instance)
        self.gen[instance] = gen
        return True

    def remove_instance(self, instance: int) -> None:
        for h in self.of.pop(instance, ()):
            holders = self.holders.get(h)
            if holders is not None:
                holders.discard(instance)
                if not holders:
                    del self.holders[h]
        self.gen.pop(instance, None)

    def match(self, hashes: list[bytes]) -> dict[int, int]:
        """Instance -> how many leading blocks of `hashes` it caches (only those with any)."""
        out: dict[int, int] = {}
        alive = set(self.holders.get(hashes[0], ())) if hashes else set()
        for j, h in enumerate(hashes):
            holders = self.holders.get(h, set())
            for inst in [i for i in alive if i not in holders]:
                out[inst] = j
                alive.discard(inst)
            if not alive:
                break
        else:
            for inst in alive:
                out[inst] = len(hashes)
        return out

    def __len__(self) -> int:
        return len(self.holders)


class TierIndex:
    """Which blocks each node's tiers hold, and in which tier ("host", "disk"), published by
    the node's store in batches like an instance's (a batch that does not follow is refused;
    the store sends a snapshot next)."""

    def __init__(self):
        self.tiers: dict[str, dict[bytes, set[str]]] = {}     # node -> hash -> tiers
        self.gen: dict[str, int] = {}

    def apply(self, node: str, gen: int, base: int | None, added, removed) -> bool:
        if base is None:
            self.tiers.pop(node, None)
        elif self.gen.get(node) != base:
            return False
        mine = self.tiers.setdefault(node, {})
        for h, t in removed:
            held = mine.get(h)
            if held is not None:
                held.discard(t)
                if not held:
                    del mine[h]
        for h, t in added:
            mine.setdefault(h, set()).add(t)
        self.gen[node] = gen
        return True

    def run(self, node: str | None, hashes: list[bytes], start: int) -> int:
        """How many blocks of `hashes` from `start` on `node`'s tiers hold, in a row."""
        mine = self.tiers.get(node) if node is not None else None
        if not mine:
            return 0
        n = 0
        for h in hashes[start:]:
            if h not in mine:
                break
            n += 1
        return n

    def tier_of(self, node: str, h: bytes) -> set[str]:
        return set(self.tiers.get(node, {}).get(h, ()))

    def remove_node(self, node: str) -> None:
        self.tiers.pop(node, None)
        self.gen.pop(node, None)

    def __len__(self) -> int:
        return sum(len(m) for m in self.tiers.values())

    def blocks_per_tier(self) -> dict[str, int]:
        out = {"host": 0, "disk": 0}
        for m in self.tiers.values():
            for held in m.values():
                for t in held:
                    out[t] = out.get(t, 0) + 1
        return out


@dataclass(slots=True)
class Route:
    home: int
    cached_blocks: int               # leading prompt blocks cached at home (index or this call)
    source: tuple[int, int] | None   # (instance, blocks): a better-cached instance elsewhere


def route(requests: list[tuple[list[bytes], int]], live: list[int], loads: dict[int, Load],
          index: PrefixIndex, overlap_weight: float = 1.0, balance_threshold: float = 1.5,
          min_remote_blocks: int = 2, affinity: bool = True, tiers: TierIndex | None = None,
          node_of: dict[int, str] | None = None) -> list[Route]:
    """Homes for `requests` ([(prompt block hashes, total blocks)]) among `live` ranks. What
    each route adds is counted in `loads` (the next heartbeat of that instance replaces it);
    `tiers` and `node_of` (rank -> node) credit blocks in a home node's tiers."""
    if not live:
        raise ValueError("no live instance to route to")
    load = {i: loads.setdefault(i, Load()) for i in live}
    placed: dict[int, set[bytes]] = {i: set() for i in live}    # hashes sent there this call
    out = []
    for n, (hashes, total) in enumerate(requests):
        indexed = index.match(hashes) if affinity and hashes else {}
        mean = sum(x.outstanding for x in load.values()) / len(load)
        best, best_key, best_cached = live[0], None, 0
        for k, i in enumerate(live):
            cached = max(indexed.get(i, 0), _leading(hashes, placed[i])) if affinity else 0
            if load[i].outstanding + 1 > balance_threshold * (mean + 1):
                cached = 0                                      # too busy for affinity
            below = tiers.run((node_of or {}).get(i), hashes, cached) \
                if tiers is not None and affinity and cached < len(hashes) else 0
            # compute to do there, KV held there, and the KV this request would add there
            # (overlap_weight 0: load alone decides, a cache saves nothing)
            adds = total - (cached if overlap_weight > 0 else 0)
            saved = cached + TIER_CREDIT * below
            cost = overlap_weight * (len(hashes) - saved) + load[i].blocks_used + max(0, adds)
            key = (cost, load[i].outstanding, (k - n) % len(live))   # ties: spread
            if best_key is None or key < best_key:
                best, best_key, best_cached = i, key, cached
        source = None
        if indexed:
            holder = max(indexed, key=lambda i: (indexed[i], -load.get(i, Load()).outstanding))
            if holder != best and indexed[holder] - best_cached >= min_remote_blocks:
                source = (holder, indexed[holder])
        out.append(Route(best, best_cached, source))
        load[best].outstanding += 1
        load[best].blocks_used += max(0, total - best_cached)
        placed[best].update(hashes)
    return out


def _leading(hashes: list[bytes], have: set[bytes]) -> int:
    n = 0
    for h in hashes:
        if h not in have:
            break
        n += 1
    return n
