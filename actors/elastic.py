"""The elastic manager actor (ElasticMoE on Ray): owns the replica set and scales it.

- Weights: one `WeightStore` per node publishes the model in Ray's object store; replicas map it.
  `weights_for(node)` is what a starting replica calls: the node's copy if there is one, else a
  peer node's copy pulled over (copied), else the checkpoint (loaded: only when no live copy
  exists anywhere).
- Scale up: start the new replicas while the others serve (they map weights and allocate KV),
  then pause everyone between two steps, rebuild the data plane with the new ranks, and switch
  traffic (the membership epoch the driver follows).
- Scale down (the highest ranks leave, so ranks stay 0..n-1): the leaving replicas stop
  admitting and lending, hand their requests' KV to the remaining ones, give back what they
  borrowed, have their debtors move lent blocks home; then the data plane is rebuilt without
  them and their model and KV memory is freed. They stay alive only to forward the results of
  requests they handed off, so every request is answered once, by the call that submitted it.
- Expert placement: on every event the planner assigns experts to the devices (nodes) serving
  them, moving the fewest bytes, balanced by measured expert load.
- Policies: with `autoscale.max_replicas` set, a loop applies `AutoscalePolicy` and, when the
  cluster has no room for a new replica, asks Ray's autoscaler (`request_resources`).
"""

from __future__ import annotations

import dataclasses
import itertools
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from autoscale.policy import AutoscalePolicy, ReplicaLoad
from autoscale.weights import WeightStore
from fabric.config import load_config
from fabric.errors import FabricError

PLACEMENT_GRACE_S = 3.0    # a new replica not started by then is short of room: ask the autoscaler
RETIRE_TIMEOUT_S = 600.0   # how long a retired replica may keep forwarding before it is killed


class ElasticManager:
    def __init__(self, config: dict, fabric_name: str, namespace: str, controller_name: str,
                 detached: bool = False):
        self.cfg = load_config(config)
        self.fabric_name, self.namespace, self.detached = fabric_name, namespace, detached
        self.controller_name = controller_name
        self.controller = ray.get_actor(controller_name, namespace=namespace)
        self.stores: dict[str, object] = {}          # node id -> WeightStore actor
        self.store_costs: dict[str, dict] = {}
        self.publish_lock = threading.Lock()
        self.scale_lock = threading.Lock()           # one scale event at a time
        self.names: list[str] = []                    # rank -> actor name
        self.handles: list = []
        self.epoch = 0
        self.events: list[dict] = []
        self.start_event: dict | None = None
        self.placement: dict = {}
        self.placement_report: dict = {}
        self.resources_requested = 0       # replicas' worth of resources asked of the autoscaler
        self.last_decision: dict | None = None
        self._serial = itertools.count(1)
        self.policy = AutoscalePolicy(self.cfg.autoscale) if self.cfg.autoscale.enabled else None
        self.stopped = False
        self._recover()

    def _recover(self) -> None:
        """After a restart (its node died), take the replica set from the controller and the
        weight stores by name; the event history starts over."""
        names = ray.get(self.controller.members.remote())
        if not names or not self._actor_exists(names[0]):
            return
        self.names = names
        self.handles = [ray.get_actor(n, namespace=self.namespace) for n in names]
        for node in ray.nodes():
            if node["Alive"] and self._actor_exists(self._store_name(node["NodeID"])):
                self.stores[node["NodeID"]] = ray.get_actor(self._store_name(node["NodeID"]),
                                                            namespace=self.namespace)
                self.store_costs[node["NodeID"]] = {"bytes_loaded_from_disk": 0,
                                                    "bytes_copied": 0, "recovered": True}
        self.epoch = time.time_ns()
        if self.policy is not None:
            threading.Thread(target=self._policy_loop, name="autoscale", daemon=True).start()

    def _actor_exists(self, name: str) -> bool:
        try:
            ray.get_actor(name, namespace=self.namespace)
            return True
        except ValueError:
            return False

    def _store_name(self, node_id: str) -> str:
        return f"kvfabric-{self.fabric_name}-weights-{node_id[:16]}"

    # ---- weights -------------------------------------------------------------------------
    def weights_for(self, node_id: str) -> tuple[dict, dict]:
        """The node's published weights for a replica starting there, and what publishing cost
        (charged once, to the first replica of the node)."""
        with self.publish_lock:          # one node publishes at a time: later ones copy
            if node_id in self.stores:
                try:
                    return ray.get(self.stores[node_id].manifest.remote(), timeout=60), \
                        {"bytes_copied": 0, "bytes_loaded_from_disk": 0}
                except Exception:                 # the store died: publish the node anew
                    self.stores.pop(node_id, None)
            store = ray.remote(WeightStore).options(
                name=self._store_name(node_id), namespace=self.namespace, get_if_exists=True,
                num_cpus=0, lifetime="detached" if self.detached else None,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(dataclasses.asdict(self.cfg.model))
            cost = None
            for peer_node, peer in [(n, s) for n, s in self.stores.items() if n != node_id]:
                try:             # a live copy exists: pull it node to node, never from disk
                    manifest = ray.get(peer.manifest.remote(), timeout=60)
                except Exception:            # that peer's node is gone: try the next
                    self.stores.pop(peer_node, None)
                    continue
                cost = ray.get(store.copy_from.remote(manifest))
                break
            if cost is None:
                cost = ray.get(store.load.remote())
            self.stores[node_id] = store
            self.store_costs[node_id] = cost
            return ray.get(store.manifest.remote()), cost

    # ---- membership ----------------------------------------------------------------------
    def start(self, count: int) -> dict:
        """Start the first `count` replicas and their data plane (called by `fabric.start`)."""
        t0 = time.perf_counter()
        with self.scale_lock:
            names = [f"kvfabric-{self.fabric_name}-instance-{i}" for i in range(count)]
            handles = self._launch(0, names)
            self._wait_ready(handles)
            ray.get(self.controller.set_members.remote(names))
            self._connect(handles, ["connect"] * count)
            self._publish(names, handles)
            costs = ray.get([h.weights_report.remote() for h in handles])
            self._replan_experts()
            self.start_event = self._event(0, count, t0, costs) | {"kind": "start"}
        if self.policy is not None:
            threading.Thread(target=self._policy_loop, name="autoscale", daemon=True).start()
        return self.members()

    def members(self) -> dict:
        return {"epoch": self.epoch, "names": list(self.names)}

    def _publish(self, names: list[str], handles: list) -> None:
        """The replica set the driver routes to (it follows `epoch`)."""
        self.names, self.handles = list(names), list(handles)
        self.epoch = time.time_ns()          # unique across manager restarts

    def _refresh_handles(self) -> None:
        """Handles by name: the controller may have replaced a dead replica under its name."""
        fresh = []
        for name, old in zip(self.names, self.handles):
            try:
                named = ray.get_actor(name, namespace=self.namespace)
            except ValueError:
                named = old
            # keep the creating handle while it names the same actor: dropping the owner's
            # handle would end a non-detached actor
            fresh.append(old if named._actor_id == old._actor_id else named)
        self.handles = fresh

    def _launch(self, first: int, names: list[str]) -> list:
        from actors.launch import new_instance

        return [new_instance(self.cfg, first + i, n, self.controller_name, self.namespace,
                             self.fabric_name, self.detached, manager_name=self._own_name())
                for i, n in enumerate(names)]

    def _own_name(self) -> str:
        return f"kvfabric-{self.fabric_name}-elastic"

    def _wait_ready(self, handles: list) -> None:
        """Wait for new replicas; when the cluster lacks room, ask Ray's autoscaler for it."""
        refs = [h.info.remote() for h in handles]
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=PLACEMENT_GRACE_S)
        if len(ready) < len(refs):
            a = self.cfg.autoscale
            if a.request_resources:
                self._request_resources(len(self.names) + len(handles))
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=a.scale_timeout_s)
        if len(ready) < len(refs):
            for h in handles:
                ray.kill(h)
            if self.resources_requested > len(self.names):
                self._request_resources(len(self.names))
            raise FabricError(f"no room in the cluster for {len(refs) - len(ready)} more "
                              f"replica(s) within autoscale.scale_timeout_s")
        ray.get(refs)                     # a replica that failed to start raises here

    def _request_resources(self, replicas: int) -> None:
        inst = self.cfg.instances
        bundle = {k: v for k, v in (("CPU", inst.num_cpus),
                                    ("GPU", 1 if inst.device == "cuda" else 0)) if v}
        if not bundle:
            return
        from ray.autoscaler.sdk import request_resources

        request_resources(bundles=[bundle] * replicas)
        self.resources_requested = replicas

    def _connect(self, handles: list, methods: list[str]) -> float:
        """Build the data plane over `handles`: new replicas `connect`; serving ones join the
        new group beside their current one (`prepare`) and then `switch` between two steps, so
        serving never stops for the rendezvous. Returns the longest pause of one replica."""
        from actors.launch import backend_of
        from fabric.rmanager import max_request_blocks

        c = self.cfg
        blocks = max_request_blocks(len(handles), c.instances.kv_blocks, c.lending.enabled,
                                    c.lending.max_lend_fraction, c.lending.min_free_fraction)
        addr, port = ray.get(handles[0].transport_address.remote())
        args = (len(handles), addr, port, backend_of(c), handles, blocks)
        ray.get([getattr(h, "connect" if m == "connect" else "prepare").remote(*args)
                 for h, m in zip(handles, methods)], timeout=180)
        serving = [h for h, m in zip(handles, methods) if m != "connect"]
        pauses = ray.get([h.switch.remote() for h in serving])
        self._closing = serving
        return max(pauses, default=0.0)

    def _close_old_planes(self, others: list = ()) -> None:
        """Every member has switched: close the old group (with the replicas that left it)."""
        refs = [h.close_old_transports.remote() for h in getattr(self, "_closing", [])]
        refs += [h.close_transport.remote() for h in others]
        ray.get(refs, timeout=60)
        self._closing = []

    # ---- scaling -------------------------------------------------------------------------
    def scale(self, replicas: int, reason: str = "manual") -> dict:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise FabricError(f"replicas must be an integer >= 1, got {replicas!r}")
        with self.scale_lock:
            self._refresh_handles()
            event = self._scale_locked(replicas, reason)
            if self.policy is not None:
                self.policy.reset()
            return event

    def _scale_locked(self, replicas: int, reason: str) -> dict:
        current = len(self.names)
        if replicas == current:
            return {}
        event = self._scale_up(replicas) if replicas > current else self._scale_down(replicas)
        event["reason"] = reason
        self.events.append(event)
        return event

    def _scale_up(self, target: int) -> dict:
        t0 = time.perf_counter()
        current = len(self.names)
        names = [f"kvfabric-{self.fabric_name}-instance-{i}.{next(self._serial)}"
                 for i in range(current, target)]
        new = self._launch(current, names)
        try:
            self._wait_ready(new)                   # the others serve meanwhile
            t_ready = time.perf_counter()
            handles = self.handles + new
            ray.get(self.controller.set_members.remote(self.names + names))
            pause_s = self._connect(handles, ["reconnect"] * current + ["connect"] * len(new))
        except Exception:              # nothing switched to the new ranks: forget them
            for h in new:
                ray.kill(h)
            ray.get(self.controller.set_members.remote(self.names))
            raise
        self._close_old_planes()
        self._publish(self.names + names, handles)        # traffic switches here
        costs = ray.get([h.weights_report.remote() for h in new])
        moved = self._replan_experts()
        return self._event(current, target, t0, costs) | {
            "kind": "up", "replica_ready_s": max(c["ready_s"] for c in costs),
            "bring_up_s": t_ready - t0, "pause_s": pause_s, "expert_bytes_moved": moved,
            "naive_expert_bytes_moved": self.placement_report.get("naive_bytes_moved", 0)}

    def _scale_down(self, target: int) -> dict:
        t0 = time.perf_counter()
        current = len(self.names)
        self._check_fits(target)
        keep, leave = self.handles[:target], self.handles[target:]
        names = self.names
        self._publish(names[:target], keep)          # no new requests go to the leavers
        targets = list(enumerate(keep))
        reports = []
        try:
            for h in reversed(leave):
                reports.append(ray.get(h.drain.remote(targets)))
        except Exception:
            for h in leave:
                h.cancel_drain.remote()
            self._publish(names, keep + leave)
            raise
        ray.get(self.controller.set_members.remote(names[:target]))
        pause_s = self._connect(keep, ["reconnect"] * len(keep))
        self._close_old_planes(leave)
        ray.get([h.retire.remote() for h in leave])
        if self.resources_requested > target:      # let the autoscaler take idle nodes back
            self._request_resources(target)
        threading.Thread(target=self._reap, args=(leave,), daemon=True).start()
        moved = self._replan_experts()
        total = lambda k: sum(r[k] for r in reports)   # noqa: E731
        return {"from": current, "to": target, "seconds": time.perf_counter() - t0,
                "bytes_mapped": 0, "bytes_copied": 0, "bytes_loaded_from_disk": 0,
                "kind": "down", "pause_s": pause_s, "expert_bytes_moved": moved,
                "naive_expert_bytes_moved": self.placement_report.get("naive_bytes_moved", 0),
                "requests_moved": total("moved"), "requests_recomputed": total("recomputed"),
                "requests_requeued": total("fresh"), "kv_bytes_moved": total("kv_bytes_moved"),
                "lent_blocks_relocated": total("lent_blocks_relocated"),
                "lent_blocks_returned": total("lent_blocks_returned"),
                "debtor_requests_recomputed": total("debtor_requests_recomputed")}

    def _check_fits(self, target: int) -> None:
        """Refuse to shrink below what a running request needs (it could never fit again)."""
        from fabric.rmanager import max_request_blocks

        c = self.cfg
        cap = max_request_blocks(target, c.instances.kv_blocks, c.lending.enabled,
                                 c.lending.max_lend_fraction, c.lending.min_free_fraction)
        largest = max(r["largest_request_blocks"] for r in ray.get(
            [h.load_report.remote() for h in self.handles]))
        if largest > cap:
            raise FabricError(f"cannot scale to {target} replicas: a running request needs "
                              f"{largest} KV blocks, more than {target} replica(s) can hold ({cap})")

    def _reap(self, leaving: list) -> None:
        """Kill retired replicas once they have forwarded every handed-off result."""
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        for h in leaving:
            idle_checks = 0
            while time.monotonic() < deadline and idle_checks < 3:   # idle for ~1.5 s in a row
                try:
                    idle_checks = idle_checks + 1 if ray.get(h.forwarding.remote(), timeout=10) == 0 else 0
                except Exception:
                    break
                time.sleep(0.5)
            try:
                ray.kill(h)
            except Exception:
                pass

    def _event(self, before: int, after: int, t0: float, costs: list[dict]) -> dict:
        return {"from": before, "to": after, "seconds": time.perf_counter() - t0,
                "bytes_mapped": sum(c["bytes_mapped"] for c in costs),
                "bytes_copied": sum(c["bytes_copied"] for c in costs),
                "bytes_loaded_from_disk": sum(c["bytes_loaded_from_disk"] for c in costs),
                "weights_shared": all(c["shared"] for c in costs)}

    # ---- expert placement ----------------------------------------------------------------
    def _replan_experts(self) -> int:
        """Assign each expert to one of the replicas now serving (a replica is one device: a GPU,
        or a CPU worker): fewest bytes moved, balanced by the measured load. Returns the bytes
        whose device changed (0 for dense models)."""
        from autoscale.placement import bytes_moved, naive_placement, plan_placement

        devices = list(self.names)
        store = next(iter(self.stores.values()), None)
        if store is None or not devices:
            return 0
        sizes = {k: n for k, n in ray.get(store.manifest.remote())["sizes"].items() if k != "dense"}
        if not sizes:
            return 0
        loads: dict = {}
        for rows in ray.get([h.expert_load.remote() for h in self.handles]):
            for layer, e, n in rows:
                loads[(layer, e)] = loads.get((layer, e), 0.0) + n
        old = self.placement
        new = plan_placement(old or None, devices, sizes, loads or None)
        moved = bytes_moved(old, new, sizes) if old else 0
        old_devices = sorted(set(old.values()))
        naive = bytes_moved(naive_placement(sizes, old_devices), naive_placement(sizes, devices),
                            sizes) if old else 0
        self.placement_report = {"devices": devices, "bytes_moved": moved,
                                 "naive_bytes_moved": naive}
        self.placement = new
        return moved

    # ---- policy --------------------------------------------------------------------------
    def _policy_loop(self) -> None:
        """Decide and scale under the scale lock, on the replica set as it is now: a manual
        scale in progress makes the policy skip its tick (and resets its timers)."""
        while not self.stopped:
            time.sleep(self.cfg.autoscale.interval_s)
            if not self.scale_lock.acquire(blocking=False):
                continue
            try:
                self._refresh_handles()
                reports = ray.get([h.load_report.remote() for h in self.handles], timeout=30)
                loads = [ReplicaLoad(float(max(0, r["ongoing"])), r["kv_utilization"],
                                     r["ttft_p90_s"]) for r in reports]
                d = self.policy.decide(len(reports), loads)
                self.last_decision = {"replicas": d.replicas, "wanted": d.wanted, "reason": d.reason}
                if d.replicas != len(self.names):
                    self._scale_locked(d.replicas, reason=f"policy: {d.reason}")
            except Exception as e:       # a failed scale is retried at the next decision
                self.last_decision = {"error": repr(e)}
            finally:
                self.scale_lock.release()

    # ---- observation ---------------------------------------------------------------------
    def stats(self) -> dict:
        return {"replicas": len(self.names), "scale_events": list(self.events),
                "start": self.start_event, "epoch": self.epoch,
                "policy": self.last_decision if self.policy is not None else None,
                "placement": {f"{l}.{e}": d for (l, e), d in sorted(self.placement.items())},
                "placement_report": self.placement_report,
                "expert_bytes_moved": {     # over all events so far
                    "planner": sum(e["expert_bytes_moved"] for e in self.events),
                    "naive": sum(e["naive_expert_bytes_moved"] for e in self.events)},
                "resources_requested": self.resources_requested,
                "weight_stores": {n: c for n, c in self.store_costs.items()}}

    def shutdown(self) -> None:
        self.stopped = True         # the driver stops the replicas; the stores go with this
        for s in self.stores.values():
            try:
                ray.kill(s)
            except Exception:
                pass
