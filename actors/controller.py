"""The controller actor: the gManager. Keeps the debt ledger from heartbeats and proposes
creditors to instances that run low. It is never on the per-token path: instances cache their
block tables and call it only to borrow (a chunk of blocks at a time).

It also keeps the fabric-wide prefix index (block hashes each instance caches, published in
batches beside the heartbeats) and routes requests by cached prefix and load
(`fabric/routing.py`); a restarted controller's empty index only causes misses.

It keeps the ledger only. Membership (which replica holds which rank, who is dead, who
replaces whom) belongs to the elastic manager (`actors/elastic.py`), which tells the ledger
when a rank leaves (`remove_instance`) or a new replica takes a rank (`readmit`). A restarted
controller starts with an empty ledger and rebuilds it from the next heartbeats.
"""

from __future__ import annotations

import threading
import time

from fabric.ledger import Ledger
from fabric.messages import Heartbeat
from fabric.routing import Load, PrefixIndex, TierIndex, route


class ControllerActor:
    def __init__(self, config: dict):
        from fabric.config import load_config

        cfg = load_config(config)
        self._config = config
        self.ledger = Ledger(min_free_fraction=cfg.lending.min_free_fraction)
        self.lending_enabled = cfg.lending.enabled
        self.prefix_cfg = cfg.prefix_cache
        self.lock = threading.Lock()
        self.num_calls = {"heartbeat": 0, "propose_creditors": 0, "prefix_events": 0, "route": 0,
                          "tier_events": 0}
        self.index = PrefixIndex()
        self.tier_index = TierIndex()               # blocks in each node's host / disk tier
        self.node_of: dict[int, str] = {}           # rank -> node, from its heartbeats
        self.loads: dict[int, Load] = {}
        self.last_beat: dict[int, float] = {}      # rank -> when its newest beat arrived here

    def heartbeat(self, hb: dict) -> None:
        with self.lock:
            self.num_calls["heartbeat"] += 1
            beat = Heartbeat.from_dict(hb)
            if self.ledger.update(beat):            # a removed rank's beats change nothing
                self.last_beat[beat.instance_id] = time.monotonic()
                self.loads[beat.instance_id] = Load(beat.load, beat.blocks_total - beat.blocks_free)
                self.node_of[beat.instance_id] = beat.node

    def prefix_events(self, instance_id: int, gen: int, base: int | None, added: list[bytes],
                      removed: list[bytes]) -> bool:
        """Blocks `instance_id` cached and evicted since generation `base` (None: its whole
        cache). False: the batch does not follow what the index holds; send a snapshot."""
        with self.lock:
            self.num_calls["prefix_events"] += 1
            if instance_id not in self.last_beat:   # removed, or not beating here yet
                return False
            return self.index.apply(instance_id, gen, base, added, removed)

    def tier_events(self, node: str, gen: int, base: int | None, added: list, removed: list) -> bool:
        """Blocks `node`'s tier store took in and let go ([(hash, tier)]) since generation
        `base` (None: all it holds). False: send a snapshot."""
        with self.lock:
            self.num_calls["tier_events"] += 1
            return self.tier_index.apply(node, gen, base, added, removed)

    def route(self, requests: list[tuple[list[bytes], int]], live: list[int]) -> list[tuple]:
        """Homes for requests ([(prompt block hashes, total blocks)]) among `live` ranks:
        [(home, cached blocks there, (source instance, blocks) or None)]."""
        c = self.prefix_cfg
        with self.lock:
            self.num_calls["route"] += 1
            routes = route(requests, live, self.loads, self.index, c.overlap_weight,
                           c.balance_threshold, c.min_remote_blocks, affinity=c.enabled,
                           tiers=self.tier_index, node_of=self.node_of)
        return [(r.home, r.cached_blocks, r.source) for r in routes]

    def propose_creditors(self, debtor: int, num_blocks: int, exclude: list[int],
                          min_blocks: int | None = None) -> list[tuple[int, int]]:
        with self.lock:
            self.num_calls["propose_creditors"] += 1
            if not self.lending_enabled:
                return []
            return [tuple(g) for g in self.ledger.propose_creditors(debtor, num_blocks, exclude, min_blocks)]

    def settle(self, debtor: int, creditor: int, num_granted: int, num_refused: int) -> None:
        """The creditor's answer to a proposal: granted blocks are confirmed, the rest cancelled."""
        with self.lock:
            if num_granted:
                self.ledger.confirm(debtor, creditor, num_granted)
            if num_refused:
                self.ledger.cancel(debtor, creditor, num_refused)

    def config(self) -> dict:
        return self._config

    def remove_instance(self, instance_id: int) -> None:
        """Rank `instance_id` died or left: drop it and every debt edge touching it from the
        ledger; its later beats are ignored until `readmit`."""
        with self.lock:
            self.ledger.remove_instance(instance_id)
            self.last_beat.pop(instance_id, None)
            self.index.remove_instance(instance_id)
            self.loads.pop(instance_id, None)
            self.node_of.pop(instance_id, None)

    def readmit(self, instance_id: int) -> None:
        """A new replica takes rank `instance_id`: its beats count from now on."""
        with self.lock:
            self.ledger.readmit(instance_id)

    def beat_ages(self) -> dict[int, float]:
        """Seconds since the newest heartbeat of each rank that has beaten to this controller
        (a rank that never beat here is absent: it is starting, or the controller restarted)."""
        now = time.monotonic()
        with self.lock:
            return {i: now - t for i, t in self.last_beat.items()}

    def stats(self) -> dict:
        with self.lock:
            return {"calls": dict(self.num_calls), "ledger": self.ledger.snapshot(),
                    "prefix_index_blocks": len(self.index),
                    "tier_index_blocks": self.tier_index.blocks_per_tier()}
