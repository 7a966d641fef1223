"""The controller actor: the gManager. Keeps the debt ledger from heartbeats and proposes
creditors to instances that run low. It is never on the per-token path: instances cache their
block tables and call it only to borrow (a chunk of blocks at a time).

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


class ControllerActor:
    def __init__(self, config: dict):
        from fabric.config import load_config

        cfg = load_config(config)
        self._config = config
        self.ledger = Ledger(min_free_fraction=cfg.lending.min_free_fraction)
        self.lending_enabled = cfg.lending.enabled
        self.lock = threading.Lock()
        self.num_calls = {"heartbeat": 0, "propose_creditors": 0}
        self.last_beat: dict[int, float] = {}      # rank -> when its newest beat arrived here

    def heartbeat(self, hb: dict) -> None:
        with self.lock:
            self.num_calls["heartbeat"] += 1
            beat = Heartbeat.from_dict(hb)
            if self.ledger.update(beat):            # a removed rank's beats change nothing
                self.last_beat[beat.instance_id] = time.monotonic()

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
            return {"calls": dict(self.num_calls), "ledger": self.ledger.snapshot()}
