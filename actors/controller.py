"""The controller actor: the gManager. Keeps the debt ledger from heartbeats and proposes
creditors to instances that run low. It is never on the per-token path: instances cache their
block tables and call it only to borrow (a chunk of blocks at a time)."""

from __future__ import annotations

import threading
import time

import ray

from fabric.ledger import Ledger
from fabric.messages import Heartbeat


REPLACE_TIMEOUT_S = 60.0   # how long a replacement may wait for room in the cluster
SILENT_BEATS = 6      # heartbeats missed before the controller checks whether an instance died


class ControllerActor:
    def __init__(self, config: dict, instance_names: list[str] | None = None,
                 namespace: str | None = None, fabric_name: str = "", detached: bool = False):
        from fabric.config import load_config

        cfg = load_config(config)
        self._config, self.cfg = config, cfg
        self.fabric_name, self.detached = fabric_name, detached
        self.num_replaced = 0
        self.instance_names, self.namespace = list(instance_names or []), namespace
        self.heartbeat_s = cfg.lending.heartbeat_s
        self.last_beat: dict[int, float] = {}
        self.dead: set[int] = set()
        min_free_fraction, lending_enabled = cfg.lending.min_free_fraction, cfg.lending.enabled
        self.ledger = Ledger(min_free_fraction=min_free_fraction)
        self.lending_enabled = lending_enabled
        self.lock = threading.Lock()
        self.num_calls = {"heartbeat": 0, "propose_creditors": 0}
        # a restarted controller hears nothing from an instance that died meanwhile: start every
        # clock now so that such an instance is pinged after the silence window too
        self.last_beat = {i: time.monotonic() for i in range(len(self.instance_names))}
        self.watching = bool(self.instance_names)
        if self.watching:
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def heartbeat(self, hb: dict) -> None:
        with self.lock:
            self.num_calls["heartbeat"] += 1
            beat = Heartbeat.from_dict(hb)
            if beat.instance_id >= len(self.instance_names):
                return                        # a replica that has left (scale-down): not ours
            self.ledger.update(beat)
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

    def members(self) -> list[str]:
        """The replica actor names, by rank (a restarted elastic manager reads them here)."""
        with self.lock:
            return list(self.instance_names)

    def remove_instance(self, instance_id: int) -> None:
        """`instance_id` died (found by an instance, the driver or the watchdog): drop it from
        the ledger, have its lenders take their blocks back, and replace it when there is room."""
        with self.lock:
            if instance_id in self.dead:
                return
            self.dead.add(instance_id)
            self.ledger.remove_instance(instance_id)
        if self.instance_names:
            threading.Thread(target=self._after_death, args=(instance_id,), daemon=True).start()

    def _watch(self) -> None:
        """Notice dead instances within seconds even when no request touches them: a silent
        instance is pinged; if it is gone, it leaves the ledger and the others take back what
        they lent it."""
        while True:
            time.sleep(self.heartbeat_s)
            now = time.monotonic()
            with self.lock:
                silent = [i for i, t in self.last_beat.items()
                          if i not in self.dead and i < len(self.instance_names)
                          and now - t > SILENT_BEATS * self.heartbeat_s]
            for i in silent:
                if not self._answers(i):
                    self.remove_instance(i)

    def _handle(self, i: int):
        return ray.get_actor(self.instance_names[i], namespace=self.namespace)

    def _answers(self, i: int) -> bool:
        try:
            ray.get(self._handle(i).info.remote(), timeout=5)
            return True
        except Exception:
            return False

    def _after_death(self, dead: int) -> None:
        for i in range(len(self.instance_names)):
            if i != dead and i not in self.dead:
                try:
                    self._handle(i).drop_debtor.remote(dead)
                except Exception:
                    pass
        self._replace(dead)

    def _replace(self, dead: int) -> bool:
        """Start a new instance in the dead one's place when the cluster has room, then rebuild
        the data plane with it (the live instances pause between steps to rejoin)."""
        from actors.launch import backend_of, connect_instances, new_instance
        from fabric.rmanager import max_request_blocks

        name = self.instance_names[dead]
        try:
            ray.kill(self._handle(dead))            # frees the name (and a half-dead process)
        except Exception:
            pass
        fresh = new_instance(self.cfg, dead, name, self._own_name(), self.namespace,
                             self.fabric_name, self.detached, manager_name=self._manager_name())
        try:
            ray.get(fresh.info.remote(), timeout=REPLACE_TIMEOUT_S)
        except Exception:                            # no room now: stay without it
            ray.kill(fresh)
            return False
        handles = [fresh if i == dead else self._handle(i) for i in range(len(self.instance_names))]
        live = [i for i in range(len(handles)) if i == dead or i not in self.dead]
        if len(live) != len(handles):
            return False                             # another loss in flight: next round
        c = self.cfg
        blocks = max_request_blocks(len(handles), c.instances.kv_blocks, c.lending.enabled,
                                    c.lending.max_lend_fraction, c.lending.min_free_fraction)
        methods = ["connect" if i == dead else "reconnect" for i in range(len(handles))]
        connect_instances(handles, backend_of(c), blocks, methods)
        with self.lock:
            self.dead.discard(dead)
            self.ledger.readmit(dead)
            self.num_replaced += 1
        return True

    def _manager_name(self) -> str | None:
        """The elastic manager, when the fabric has one: a replacement maps its weights."""
        name = f"kvfabric-{self.fabric_name}-elastic"
        try:
            ray.get_actor(name, namespace=self.namespace)
            return name
        except ValueError:
            return None

    def set_members(self, names: list[str]) -> None:
        """The elastic manager changed the replica set: ranks past the new end leave the
        ledger (and the watchdog); new ranks are (re)admitted before they first beat."""
        now = time.monotonic()
        with self.lock:
            old = len(self.instance_names)
            for i in range(len(names), old):
                self.ledger.remove_instance(i)
                self.last_beat.pop(i, None)
                self.dead.discard(i)
            for i in range(old, len(names)):
                self.ledger.readmit(i)
                self.dead.discard(i)
                self.last_beat[i] = now
            self.instance_names = list(names)
        if names and not self.watching:
            self.watching = True
            threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    def _own_name(self) -> str:
        return f"kvfabric-{self.fabric_name}-controller"     # as fabric.api names it

    def stats(self) -> dict:
        with self.lock:
            return {"calls": dict(self.num_calls), "dead": sorted(self.dead),
                    "replaced": self.num_replaced, "ledger": self.ledger.snapshot()}
