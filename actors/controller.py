"""The controller actor: the gManager. Keeps the debt ledger from heartbeats and proposes
creditors to instances that run low. It is never on the per-token path: instances cache their
block tables and call it only to borrow (a chunk of blocks at a time)."""

from __future__ import annotations

import threading

from fabric.ledger import Ledger
from fabric.messages import Heartbeat


class ControllerActor:
    def __init__(self, config: dict):
        from fabric.config import load_config

        cfg = load_config(config)
        self._config = config
        min_free_fraction, lending_enabled = cfg.lending.min_free_fraction, cfg.lending.enabled
        self.ledger = Ledger(min_free_fraction=min_free_fraction)
        self.lending_enabled = lending_enabled
        self.lock = threading.Lock()
        self.num_borrow_events = 0
        self.num_blocks_borrowed_total = 0
        self.num_calls = {"heartbeat": 0, "propose_creditors": 0}
        self.scale_events: list[dict] = []
        self.replicas = 0

    def heartbeat(self, hb: dict) -> None:
        with self.lock:
            self.num_calls["heartbeat"] += 1
            self.ledger.update(Heartbeat.from_dict(hb))

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
                self.num_borrow_events += 1
                self.num_blocks_borrowed_total += num_granted
            if num_refused:
                self.ledger.cancel(debtor, creditor, num_refused)

    def config(self) -> dict:
        return self._config

    def remove_instance(self, instance_id: int) -> None:
        with self.lock:
            self.ledger.remove_instance(instance_id)

    def stats(self) -> dict:
        with self.lock:
            return {"lending": {"borrow_events": self.num_borrow_events,
                                "blocks_borrowed_total": self.num_blocks_borrowed_total},
                    "calls": dict(self.num_calls),
                    "ledger": self.ledger.snapshot()}
