"""The elastic manager actor (ElasticMoE on Ray): owns the replica set and scales it.

- Membership: the manager is its only owner (rank -> replica actor, which ranks are dead, who
  replaces whom). It keeps a record in Ray's GCS key-value store, so that a restarted manager
  recovers the set. The controller keeps the ledger only; the manager tells it when a rank
  leaves or is taken by a new replica.
- Liveness: a replica is *starting* until its constructor returns; while it constructs it
  reports what it is doing (`report_phase`), and only `instances.startup_timeout_s` (from
  placement on a node) or `autoscale.scale_timeout_s` (waiting for a node with room) end a
  start, with a `FabricError` naming the rank, its node and its phase. Once serving, a replica
  is watched two ways: a `lifeline` call kept open on it fails the moment the actor dies, and a
  rank whose heartbeats (as the controller saw them; a rank that never beat is not judged) stop
  for `SILENT_BEATS` periods is pinged. A dead rank leaves the ledger, its lenders take their
  blocks back, and a replacement is started under the scale lock (serialised with scale
  events), then joins a data plane built beside the old one.

- Weights: one `WeightStore` per node publishes the model in Ray's object store; replicas map it.
  `weights_for(node)` is what a starting replica calls: the node's copy if there is one, else a
  peer node's copy pulled over (copied), else the checkpoint (loaded: only when no live copy
  exists anywhere).
- Scale up: start the new replicas while the others serve (they map weights and allocate KV),
  then pause everyone between two steps, rebuild the data plane with the new ranks, and switch
  traffic (the membership epoch the driver follows).
- Warm standbys: `instances.standbys` instance processes per node (CPU only) that imported torch,
  the model code and the tokenizer and wait, taking no Ray resources and serving nothing (not
  members: no routing, no stats, no liveness watch). A scale-up (or a replacement) reserves an
  instance's CPUs on a ready standby's node (a placement group named after it, freed when it is
  killed) and has it take the rank (`take_rank`): it maps the weights and joins the data plane like a cold
  replica, without the second or two of starting Python and importing torch. A standby that
  died or fails to adopt is dropped and the rank starts cold; used and dead ones are replaced.
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

import collections
import dataclasses
import itertools
import json
import logging
import threading
import time

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from autoscale.policy import AutoscalePolicy, ReplicaLoad
from autoscale.weights import WeightStore
from fabric.config import load_config
from fabric.errors import FabricError
from fabric.messages import CONTROL_TIMEOUT_S

PLACEMENT_GRACE_S = 3.0    # a new replica not placed by then is short of room: ask the autoscaler
RETIRE_TIMEOUT_S = 600.0   # how long a retired replica may keep forwarding before it is killed
SILENT_BEATS = 6           # heartbeat periods of silence before a serving replica is pinged
PING_TIMEOUT_S = 30.0      # a pinged replica that does not answer within this is dead
LIFELINE_S = 60.0          # each lifeline call returns after this and is renewed
REPLACE_PLACEMENT_S = 30.0  # a replacement not placed by then: no room now, retried later
REPLACE_RETRY_S = 30.0     # seconds between two tries to replace a dead replica
RESERVE_TIMEOUT_S = 1.0    # a standby's node that cannot reserve an instance's CPUs by then: skipped
STANDBY_CHECK_S = 10.0     # how often the watchdog replaces dead standbys (and fills new nodes)
SWITCH_TIMEOUT_S = 180.0   # a data-plane rendezvous or switch

log = logging.getLogger(__name__)


class ElasticManager:
    def __init__(self, config: dict, fabric_name: str, namespace: str, controller_name: str,
                 detached: bool = False):
        self.cfg = load_config(config)
        self.fabric_name, self.namespace, self.detached = fabric_name, namespace, detached
        self.controller_name = controller_name
        self.controller = ray.get_actor(controller_name, namespace=namespace)
        self.stores: dict[str, object] = {}          # node id -> WeightStore actor
        self.store_costs: dict[str, dict] = {}
        self.publish_lock = threading.Lock()          # stores, publishing, reading
        self.publishing: dict[str, threading.Event] = {}   # node id -> set once it published
        self.reading: threading.Event | None = None   # a node reads the checkpoint: set when done
        self.scale_lock = threading.Lock()           # one scale event at a time
        self.names: list[str] = []                    # rank -> actor name
        self.handles: list = []
        self.dead: set[int] = set()                   # ranks found dead, not yet replaced
        self.num_replaced = 0
        self.replace_error: str | None = None         # why the last replacement failed
        self._next_replace = 0.0
        self.member_lock = threading.Lock()           # names, handles and dead change together
        self.phases: dict[str, dict] = {}             # starting replica name -> its phase
        self.phase_lock = threading.Lock()
        self.standbys: list[tuple] = []               # (name, node id, handle, ready ref)
        self.standby_lock = threading.Lock()
        self._next_standby_check = 0.0
        self.epoch = 0
        self.events: list[dict] = []
        self.scaling: dict | None = None    # {"from", "to", "reason"} while a scale is under way
        self.start_event: dict | None = None
        self.placement: dict = {}
        self.placement_report: dict = {}
        self.resources_requested = 0       # replicas' worth of resources asked of the autoscaler
        self.last_decision: dict | None = None
        self._serial = itertools.count(time.time_ns() // 1000 % 10**10)   # unique past restarts
        self.policy = AutoscalePolicy(self.cfg.autoscale) if self.cfg.autoscale.enabled else None
        self.stopped = False
        self._recover()
        threading.Thread(target=self._watch, name="watchdog", daemon=True).start()

    # ---- the membership record -------------------------------------------------------------
    def _record_key(self) -> bytes:
        return f"kvfabric/{self.fabric_name}/members".encode()

    def _save_record(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_put

        record = {"names": self.names, "dead": sorted(self.dead)}   # a restart takes a new epoch
        _internal_kv_put(self._record_key(), json.dumps(record).encode(), overwrite=True,
                         namespace=self.namespace)

    def _load_record(self) -> dict | None:
        from ray.experimental.internal_kv import _internal_kv_get

        raw = _internal_kv_get(self._record_key(), namespace=self.namespace)
        return json.loads(raw) if raw else None

    def _recover(self) -> None:
        """After a restart (its node died), take the replica set from the record and the weight
        stores by name; replicas that are gone count as dead (the watchdog replaces them); the
        event history starts over."""
        if not ray.get_runtime_context().was_current_actor_reconstructed:
            return                 # a new fabric: a record left by an earlier one is stale
        record = self._load_record()
        if not record or not record["names"]:
            return
        self.names, self.dead = list(record["names"]), set(record["dead"])
        self.handles = []
        for i, n in enumerate(self.names):
            try:
                self.handles.append(ray.get_actor(n, namespace=self.namespace))
            except ValueError:
                self.handles.append(None)
                self.dead.add(i)
        for node in ray.nodes():
            if node["Alive"] and self._actor_exists(self._store_name(node["NodeID"])):
                self.stores[node["NodeID"]] = ray.get_actor(self._store_name(node["NodeID"]),
                                                            namespace=self.namespace)
                self.store_costs[node["NodeID"]] = {"bytes_loaded_from_disk": 0,
                                                    "bytes_copied": 0, "recovered": True}
        self._kill_standbys()
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
        (charged once, to the first replica of the node). Nodes publish side by side: the
        first reads the checkpoint, the others copy it node to node once it is out (never from
        disk twice); replicas of a node that is publishing wait for it."""
        wait_s = self.cfg.instances.startup_timeout_s      # a checkpoint may take minutes
        deadline = time.monotonic() + wait_s
        while True:
            with self.publish_lock:
                store = self.stores.get(node_id)
                busy = self.publishing.get(node_id)
                if store is None and busy is None:
                    busy = self.publishing[node_id] = threading.Event()
                    break                                   # this call publishes the node
            if store is not None:
                try:
                    return ray.get(store.manifest.remote(), timeout=60), \
                        {"bytes_copied": 0, "bytes_loaded_from_disk": 0}
                except Exception:                 # the store died: publish the node anew
                    with self.publish_lock:
                        if self.stores.get(node_id) is store:
                            self.stores.pop(node_id)
                    continue
            if not busy.wait(max(0.0, deadline - time.monotonic())):
                raise TimeoutError(f"node {node_id[:16]}: its weights were not published "
                                   f"within instances.startup_timeout_s={wait_s:g}")
        try:
            return self._publish_weights(node_id, deadline)
        finally:
            with self.publish_lock:
                self.publishing.pop(node_id).set()

    def _publish_weights(self, node_id: str, deadline: float) -> tuple[dict, dict]:
        """Publish the weights on `node_id`: its store's process starts at once; then it copies
        a published peer's, or reads the checkpoint if no node has it nor is reading it, or
        waits for the node that is."""
        store = ray.remote(WeightStore).options(
            name=self._store_name(node_id), namespace=self.namespace, get_if_exists=True,
            num_cpus=0, lifetime="detached" if self.detached else None,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        ).remote(dataclasses.asdict(self.cfg.model))

        def left() -> float:
            return max(1.0, deadline - time.monotonic())

        while True:
            if time.monotonic() > deadline:
                raise TimeoutError(f"node {node_id[:16]}: no copy of the weights to publish "
                                   f"within instances.startup_timeout_s")
            with self.publish_lock:
                peers = [(n, s) for n, s in self.stores.items() if n != node_id]
                reading = self.reading
                if not peers and reading is None:
                    reading = self.reading = threading.Event()
                    from_disk = True
                else:
                    from_disk = False
            if from_disk:
                try:
                    return self._published(node_id, store, store.load.remote(), left)
                finally:
                    with self.publish_lock:
                        self.reading = None
                    reading.set()
            if not peers:                     # another node is reading the checkpoint
                reading.wait(left())
                continue
            for peer_node, peer in peers:     # a live copy exists: pull it node to node
                try:
                    manifest = ray.get(peer.manifest.remote(), timeout=60)
                except Exception:             # that peer's node is gone: try the next
                    with self.publish_lock:
                        if self.stores.get(peer_node) is peer:
                            self.stores.pop(peer_node)
                    continue
                return self._published(node_id, store, store.copy_from.remote(manifest), left)

    def _published(self, node_id: str, store, filling, left) -> tuple[dict, dict]:
        """Wait for `store` to fill (`filling`: its load or copy call), record it as `node_id`'s
        copy, and return its manifest and what filling it cost."""
        cost = ray.get(filling, timeout=left())
        with self.publish_lock:
            self.stores[node_id], self.store_costs[node_id] = store, cost
        return ray.get(store.manifest.remote(), timeout=left()), cost

    # ---- membership ----------------------------------------------------------------------
    def start(self, count: int) -> dict:
        """Start the first `count` replicas and their data plane (called by `fabric.start`)."""
        t0 = time.perf_counter()
        with self.scale_lock:
            names = [f"kvfabric-{self.fabric_name}-instance-{i}" for i in range(count)]
            handles = self._launch(list(range(count)), names)
            # standbys warm up (a process, torch, the tokenizer) beside the replicas' start,
            # not over the first requests after it
            self._refill_standbys(starting=True)
            try:
                self._wait_ready(handles, names)      # kills the replicas when it fails
            except BaseException:
                self._drop_standbys()
                raise
            self._connect(handles, ["connect"] * count)
            self._publish(names, handles)
            costs = ray.get([h.weights_report.remote() for h in handles], timeout=CONTROL_TIMEOUT_S)
            self._replan_experts()
            self.start_event = self._event(0, count, t0, costs) | {"kind": "start"}
        if self.policy is not None:
            threading.Thread(target=self._policy_loop, name="autoscale", daemon=True).start()
        return self.members()

    def members(self) -> dict:
        """The replica set the driver routes to: names by rank, the epoch it follows, and the
        ranks found dead (not yet replaced)."""
        with self.member_lock:
            return {"epoch": self.epoch, "names": list(self.names), "dead": sorted(self.dead)}

    def _publish(self, names: list[str], handles: list) -> None:
        """The replica set the driver routes to (it follows `epoch`)."""
        with self.member_lock:
            self.names, self.handles = list(names), list(handles)
            self.dead = {i for i in self.dead if i < len(names)}
            self.epoch = time.time_ns()          # unique across manager restarts
            self._save_record()

    def _launch(self, ranks: list[int], names: list[str]) -> list:
        from actors.launch import new_instance

        return [new_instance(self.cfg, r, n, self.controller_name, self.namespace,
                             self.fabric_name, self.detached, manager_name=self._own_name())
                for r, n in zip(ranks, names)]

    def _own_name(self) -> str:
        return f"kvfabric-{self.fabric_name}-elastic"

    def _instance_name(self, rank: int) -> str:
        return f"kvfabric-{self.fabric_name}-instance-{rank}.{next(self._serial)}"

    def _kill(self, handle, name: str) -> None:
        """Kill a replica or standby, and free the CPUs reserved for it if it was adopted."""
        from ray.util.placement_group import get_placement_group, remove_placement_group

        for end in (lambda: ray.kill(handle),
                    lambda: remove_placement_group(get_placement_group(self._reservation(name)))):
            try:
                end()
            except Exception:        # gone already; or started cold: nothing reserved
                pass

    # ---- warm standbys -------------------------------------------------------------------
    def _standby_prefix(self) -> str:
        return f"kvfabric-{self.fabric_name}-instance-warm."

    def _reservation(self, name: str) -> str:
        return f"{name}-cpus"

    def _kill_standbys(self) -> None:
        """Every standby by its name, an earlier life's too (unknown to this one), but not the
        adopted ones that serve."""
        for n in ray.util.list_named_actors():
            if n.startswith(self._standby_prefix()) and n not in self.names:
                try:
                    self._kill(ray.get_actor(n, namespace=self.namespace), n)
                except ValueError:          # it just died
                    pass

    def _drop_standbys(self) -> None:
        """Kill every standby and forget them."""
        with self.standby_lock:
            self._kill_standbys()
            self.standbys = []

    def _standby_state(self, standby: tuple) -> str:
        """"starting" (still importing), "ready" or "dead"."""
        ready = standby[3]
        if not ray.wait([ready], timeout=0)[0]:
            return "starting"
        try:
            ray.get(ready)
            return "ready"
        except Exception:
            return "dead"

    def _refill_standbys(self, starting: bool = False) -> None:
        """Keep `instances.standbys` standbys on every node with an instance's CPUs, from the
        fabric's start (`starting`: the replicas are launched, not yet serving); dead ones are
        dropped. CPU only: a GPU standby would hold its GPU."""
        from actors.launch import new_standby

        inst = self.cfg.instances
        if not inst.standbys or inst.device == "cuda" or self.stopped or \
                not (self.names or starting):
            return
        with self.standby_lock:
            for s in [s for s in self.standbys if self._standby_state(s) == "dead"]:
                self.standbys.remove(s)
                self._kill(s[2], s[0])
            have = collections.Counter(s[1] for s in self.standbys)
            for node in ray.nodes():
                if not node["Alive"] or node["Resources"].get("CPU", 0.0) < inst.num_cpus:
                    continue
                for _ in range(inst.standbys - have[node["NodeID"]]):
                    name = f"{self._standby_prefix()}{next(self._serial)}"
                    h = new_standby(self.cfg, node["NodeID"], name, self.controller_name,
                                    self.namespace, self.fabric_name, self.detached,
                                    self._own_name())
                    self.standbys.append((name, node["NodeID"], h, h.__ray_ready__.remote()))

    def _take_standbys(self, n: int) -> list[tuple[str, object]]:
        """Up to `n` ready standbys, (name, handle), each with an instance's CPUs reserved on
        its node; one whose node has no room now stays for a later event."""
        taken = []
        with self.standby_lock:
            for s in [s for s in self.standbys if self._standby_state(s) == "ready"]:
                if len(taken) < n and self._reserve(s[1], s[0]):
                    self.standbys.remove(s)
                    taken.append((s[0], s[2]))
        return taken

    def _reserve(self, node_id: str, name: str) -> bool:
        """Hold an instance's CPUs on `node_id` for the standby `name` (it waited outside Ray's
        accounting); False when the node has no room within RESERVE_TIMEOUT_S."""
        from ray.util.placement_group import placement_group, remove_placement_group

        if not self._bundle():
            return True
        pg = placement_group([self._bundle()], strategy="STRICT_PACK",
                             name=self._reservation(name),
                             lifetime="detached" if self.detached else None,
                             bundle_label_selector=[{"ray.io/node-id": node_id}])
        if pg.wait(RESERVE_TIMEOUT_S):
            return True
        remove_placement_group(pg)
        return False

    def _bring_up(self, ranks: list[int], placement_timeout_s: float | None = None
                  ) -> tuple[list, list, int]:
        """Ready replicas for `ranks`: (handles, names, how many were standbys). Ready standbys
        adopt the first ranks while their nodes have room; the others start cold, as does a rank
        whose standby fails to adopt (it is killed). Everything started is killed on failure."""
        warm = self._take_standbys(len(ranks))
        adopting = [(r, n, h, h.take_rank.remote(r)) for r, (n, h) in zip(ranks, warm)]
        cold = ranks[len(warm):]
        names = [self._instance_name(r) for r in cold]
        handles = self._launch(cold, names)            # they start while the standbys adopt
        got: dict[int, tuple] = {}
        try:
            for r, n, h, ref in adopting:
                try:
                    self._wait_ready([h], [n], placement_timeout_s, [ref])
                    got[r] = (h, n)
                except Exception as e:              # killed by `_wait_ready`: start it cold
                    log.warning("elastic manager: standby %s failed to adopt rank %d (%s); "
                                "starting it cold", n, r, e)
                    cold.append(r)
                    names.append(self._instance_name(r))
                    handles += self._launch([r], names[-1:])
            self._wait_ready(handles, names, placement_timeout_s)
        except BaseException:
            for h, n in list(got.values()) + list(zip(handles, names)):
                self._kill(h, n)
            raise
        got |= dict(zip(cold, zip(handles, names)))
        return [got[r][0] for r in ranks], [got[r][1] for r in ranks], len(ranks) - len(cold)

    # ---- start-up ------------------------------------------------------------------------
    def report_phase(self, name: str, rank: int, phase: str, node: str, ip: str) -> None:
        """A starting replica says what it is doing (named in a start-up timeout)."""
        now = time.monotonic()
        with self.phase_lock:
            entry = self.phases.setdefault(name, {"rank": rank, "placed_at": now})
            entry.update(phase=phase, node=node, ip=ip, since=now)

    def _wait_ready(self, handles: list, names: list[str], placement_timeout_s: float | None = None,
                    refs: list | None = None) -> None:
        """Wait for new replicas to be constructed (`refs`: the calls that construct them, by
        default `info` once the constructor ran). One not placed on a node (no phase reported)
        within `placement_timeout_s` (default `autoscale.scale_timeout_s`) found no room (Ray's
        autoscaler is asked for some after PLACEMENT_GRACE_S); one placed has
        `instances.startup_timeout_s` to finish. Either ends in a `FabricError` naming the rank,
        its node and what it was doing; every new replica is then killed."""
        a, inst = self.cfg.autoscale, self.cfg.instances
        placement_timeout_s = placement_timeout_s or a.scale_timeout_s
        t0 = time.monotonic()
        pending = dict(zip(refs or [h.info.remote() for h in handles], names))
        asked = False
        try:
            while pending:
                ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=1.0)
                for ref in ready:
                    pending.pop(ref)
                    ray.get(ref)                 # a replica whose constructor raised: here
                now = time.monotonic()
                for name in pending.values():
                    with self.phase_lock:
                        phase = dict(self.phases.get(name) or {})
                    if not phase:
                        if not asked and now - t0 > PLACEMENT_GRACE_S and a.request_resources:
                            self._request_resources(len(self.names) + len(handles))
                            asked = True
                        if now - t0 > placement_timeout_s:
                            raise FabricError(
                                f"no room in the cluster for replica {name}: not placed on any "
                                f"node within {placement_timeout_s:g} s (autoscale.scale_timeout_s;"
                                f" it needs {self._bundle()})")
                    elif now - phase["placed_at"] > inst.startup_timeout_s:
                        raise FabricError(
                            f"replica rank {phase['rank']} ({name}) did not start within "
                            f"instances.startup_timeout_s = {inst.startup_timeout_s:g} s: on node "
                            f"{phase['node']} ({phase['ip']}) it has been {phase['phase']} for "
                            f"{now - phase['since']:.0f} s")
        except BaseException:
            for h, name in zip(handles, names):
                self._kill(h, name)
            if self.resources_requested > len(self.names):
                self._request_resources(len(self.names))
            raise
        finally:
            with self.phase_lock:
                for name in names:
                    self.phases.pop(name, None)

    def _bundle(self) -> dict:
        inst = self.cfg.instances
        return {k: v for k, v in (("CPU", inst.num_cpus),
                                  ("GPU", 1 if inst.device == "cuda" else 0)) if v}

    def _request_resources(self, replicas: int) -> None:
        bundle = self._bundle()
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
        addr, port = ray.get(handles[0].transport_address.remote(), timeout=CONTROL_TIMEOUT_S)
        args = (len(handles), addr, port, backend_of(c), handles, blocks)
        ray.get([getattr(h, "connect" if m == "connect" else "prepare").remote(*args)
                 for h, m in zip(handles, methods)], timeout=SWITCH_TIMEOUT_S)
        serving = [h for h, m in zip(handles, methods) if m != "connect"]
        pauses = ray.get([h.switch.remote() for h in serving], timeout=SWITCH_TIMEOUT_S)
        self._closing = serving
        return max(pauses, default=0.0)

    def _close_old_planes(self, others: list = ()) -> None:
        """Every member has switched: close the old group (with the replicas that left it)."""
        refs = [h.close_old_transports.remote() for h in getattr(self, "_closing", [])]
        refs += [h.close_transport.remote() for h in others]
        ray.get(refs, timeout=CONTROL_TIMEOUT_S)
        self._closing = []

    # ---- liveness ------------------------------------------------------------------------
    def _watch(self) -> None:
        """Notice dead replicas within seconds even when no request touches them, and replace
        them when the cluster has room."""
        lifelines: dict = {}                     # open lifeline call -> (rank, actor id)
        while not self.stopped:
            try:
                self._watch_once(lifelines)
            except Exception:
                log.exception("elastic manager: watchdog round failed")
                time.sleep(1.0)

    def _watch_once(self, lifelines: dict) -> None:
        with self.member_lock:
            members = [(i, h) for i, h in enumerate(self.handles)
                       if h is not None and i not in self.dead]
        armed = set(lifelines.values())
        for i, h in members:
            if (i, h._actor_id.hex()) not in armed:
                lifelines[h.lifeline.remote(LIFELINE_S)] = (i, h._actor_id.hex())
        beat = self.cfg.lending.heartbeat_s
        if lifelines:
            ready, _ = ray.wait(list(lifelines), num_returns=len(lifelines), timeout=beat)
        else:
            ready = []
            time.sleep(beat)
        for ref in ready:
            rank, actor_id = lifelines.pop(ref)
            try:
                ray.get(ref)                     # returned: renewed next round if still a member
            except ray.exceptions.RayActorError:
                self._on_death(rank, actor_id, "its actor died")
            except Exception:
                pass
        try:
            ages = ray.get(self.controller.beat_ages.remote(), timeout=PING_TIMEOUT_S)
        except Exception:                        # the controller restarts: lifelines still watch
            ages = {}
        for i, h in members:
            if ages.get(i, 0.0) > SILENT_BEATS * beat and not self._answers(h):
                self._on_death(i, h._actor_id.hex(), f"silent for {ages[i]:.0f} s")
        if time.monotonic() >= self._next_standby_check:
            self._next_standby_check = time.monotonic() + STANDBY_CHECK_S
            self._refill_standbys()
        if self.dead and time.monotonic() >= self._next_replace and \
                self.scale_lock.acquire(blocking=False):
            try:
                self._replace_dead_locked()
            finally:
                self.scale_lock.release()

    def _answers(self, handle) -> bool:
        """Alive and healthy: a replica that gave up serving (unhealthy) counts as dead."""
        try:
            return ray.get(handle.health.remote(), timeout=PING_TIMEOUT_S)["healthy"]
        except Exception:
            return False

    def report_dead(self, rank: int, actor_id: str | None = None) -> bool:
        """An instance or a driver found rank `rank` (the actor `actor_id`) unreachable: checked
        here before it counts. True when the rank is now dead."""
        with self.member_lock:
            if rank >= len(self.handles) or self.handles[rank] is None:
                return rank in self.dead
            handle = self.handles[rank]
        if actor_id is not None and handle._actor_id.hex() != actor_id:
            return False                         # already replaced
        if self._answers(handle):
            return False
        self._on_death(rank, handle._actor_id.hex(), "reported unreachable")
        return True

    def _on_death(self, rank: int, actor_id: str, why: str) -> None:
        """Rank `rank` died: out of the ledger, its lenders take their blocks back; the
        watchdog replaces it."""
        with self.member_lock:
            handle = self.handles[rank] if rank < len(self.handles) else None
            if handle is None or handle._actor_id.hex() != actor_id or rank in self.dead:
                return                            # left, replaced, or already known
            self.dead.add(rank)
            self._save_record()
            live = [h for i, h in enumerate(self.handles) if i not in self.dead and h is not None]
        log.warning("elastic manager: rank %d (%s) is dead: %s", rank, self.names[rank], why)
        self._next_replace = 0.0
        try:
            self.controller.remove_instance.remote(rank)
            for h in live:
                h.drop_debtor.remote(rank)
        except Exception:
            pass

    def _replace_dead_locked(self) -> bool:
        """Start new replicas for the dead ranks (under the scale lock) and rebuild the data
        plane with them; the live replicas switch between two steps. False when the cluster
        has no room now (retried after REPLACE_RETRY_S)."""
        dead = sorted(self.dead)
        if not dead:
            return True
        self._next_replace = time.monotonic() + REPLACE_RETRY_S
        for i in dead:
            self._kill(self.handles[i], self.names[i])   # a half-dead process frees its resources
        fresh, names = [], []
        try:
            fresh, names, _ = self._bring_up(dead, placement_timeout_s=min(
                REPLACE_PLACEMENT_S, self.cfg.autoscale.scale_timeout_s))
            ray.get([self.controller.readmit.remote(i) for i in dead], timeout=CONTROL_TIMEOUT_S)
            handles, all_names = list(self.handles), list(self.names)
            for i, h, n in zip(dead, fresh, names):
                handles[i], all_names[i] = h, n
            self._connect(handles, ["connect" if i in dead else "reconnect"
                                    for i in range(len(handles))])
        except Exception as e:
            self.replace_error = f"{type(e).__name__}: {e}"
            log.warning("elastic manager: replacing ranks %s failed: %s", dead, e)
            for h, n in zip(fresh, names):
                self._kill(h, n)
            return False
        self._close_old_planes()
        with self.member_lock:
            self.dead -= set(dead)
        self._publish(all_names, handles)
        self.num_replaced += len(dead)
        self.replace_error = None
        self._refill_standbys()
        return True

    # ---- scaling -------------------------------------------------------------------------
    def scale(self, replicas: int, reason: str = "manual") -> dict:
        if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 1:
            raise FabricError(f"replicas must be an integer >= 1, got {replicas!r}")
        with self.scale_lock:
            event = self._scale_locked(replicas, reason)
            if self.policy is not None:
                self.policy.reset()
            return event

    def _scale_locked(self, replicas: int, reason: str) -> dict:
        if self.dead and not self._replace_dead_locked():
            raise FabricError(f"cannot scale while rank(s) {sorted(self.dead)} are dead and "
                              f"cannot be replaced: {self.replace_error}")
        current = len(self.names)
        if replicas == current:
            return {}
        # the replica set switches part-way through: until the event is recorded, stats say a
        # scale is under way, so that `replicas` and `scale_events` are never read as settled
        self.scaling = {"from": current, "to": replicas, "reason": reason}
        try:
            event = self._scale_up(replicas) if replicas > current else self._scale_down(replicas)
            event["reason"] = reason
            self.events.append(event)
        finally:
            self.scaling = None
        return event

    def _scale_up(self, target: int) -> dict:
        t0 = time.perf_counter()
        current = len(self.names)
        ranks = list(range(current, target))
        new, names = [], []
        try:
            new, names, warm = self._bring_up(ranks)     # the others serve meanwhile
            t_ready = time.perf_counter()
            handles = self.handles + new
            ray.get([self.controller.readmit.remote(r) for r in ranks], timeout=CONTROL_TIMEOUT_S)
            pause_s = self._connect(handles, ["reconnect"] * current + ["connect"] * len(new))
        except Exception:              # nothing switched to the new ranks: forget them
            for h, n in zip(new, names):
                self._kill(h, n)
            for r in ranks:
                self.controller.remove_instance.remote(r)
            raise
        self._close_old_planes()
        self._publish(self.names + names, handles)        # traffic switches here
        costs = ray.get([h.weights_report.remote() for h in new], timeout=CONTROL_TIMEOUT_S)
        moved = self._replan_experts()
        self._refill_standbys()
        return self._event(current, target, t0, costs) | {
            "kind": "up", "replica_ready_s": max(c["ready_s"] for c in costs),
            "bring_up_s": t_ready - t0, "warm_replicas": warm, "pause_s": pause_s,
            "expert_bytes_moved": moved,
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
                reports.append(ray.get(h.drain.remote(targets), timeout=RETIRE_TIMEOUT_S))
        except Exception:
            for h in leave:
                h.cancel_drain.remote()
            self._publish(names, keep + leave)
            raise
        ray.get([self.controller.remove_instance.remote(r) for r in range(target, current)],
                timeout=CONTROL_TIMEOUT_S)
        pause_s = self._connect(keep, ["reconnect"] * len(keep))
        self._close_old_planes(leave)
        ray.get([h.retire.remote() for h in leave], timeout=CONTROL_TIMEOUT_S)
        if self.resources_requested > target:      # let the autoscaler take idle nodes back
            self._request_resources(target)
        threading.Thread(target=self._reap, args=(leave, names[target:]), daemon=True).start()
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
            [h.load_report.remote() for h in self.handles], timeout=CONTROL_TIMEOUT_S))
        if largest > cap:
            raise FabricError(f"cannot scale to {target} replicas: a running request needs "
                              f"{largest} KV blocks, more than {target} replica(s) can hold ({cap})")

    def _reap(self, leaving: list, names: list[str]) -> None:
        """Kill retired replicas once they have forwarded every handed-off result."""
        deadline = time.monotonic() + RETIRE_TIMEOUT_S
        for h, name in zip(leaving, names):
            idle_checks = 0
            while time.monotonic() < deadline and idle_checks < 3:   # idle for ~1.5 s in a row
                try:
                    idle_checks = idle_checks + 1 if ray.get(h.forwarding.remote(), timeout=10) == 0 else 0
                except Exception:
                    break
                time.sleep(0.5)
            self._kill(h, name)

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
        sizes = {k: n for k, n in ray.get(store.manifest.remote(), timeout=CONTROL_TIMEOUT_S)[
            "sizes"].items() if k != "dense"}
        if not sizes:
            return 0
        loads: dict = {}
        for rows in ray.get([h.expert_load.remote() for h in self.handles], timeout=CONTROL_TIMEOUT_S):
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
                if self.dead:                      # the watchdog replaces them first
                    continue
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
        with self.phase_lock:
            starting = {n: dict(p) for n, p in self.phases.items()}
        return {"replicas": len(self.names), "scale_events": list(self.events),
                "scaling": self.scaling,
                "dead": sorted(self.dead), "replaced": self.num_replaced,
                "replace_error": self.replace_error, "starting": starting,
                "start": self.start_event, "epoch": self.epoch,
                "policy": self.last_decision if self.policy is not None else None,
                "placement": {f"{l}.{e}": d for (l, e), d in sorted(self.placement.items())},
                "placement_report": self.placement_report,
                "expert_bytes_moved": {     # over all events so far
                    "planner": sum(e["expert_bytes_moved"] for e in self.events),
                    "naive": sum(e["naive_expert_bytes_moved"] for e in self.events)},
                "resources_requested": self.resources_requested,
                "standbys": [{"name": s[0], "node": s[1], "state": self._standby_state(s)}
                             for s in list(self.standbys)],
                "weight_stores": {n: c for n, c in self.store_costs.items()}}

    def shutdown(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_del

        self.stopped = True         # the driver stops the replicas; the stores go with this
        try:
            _internal_kv_del(self._record_key(), namespace=self.namespace)
        except Exception:
            pass
        self._drop_standbys()        # and the standbys and the reservations
        for pg in ray.util.placement_group_table().values():
            if pg["name"].startswith(self._standby_prefix()) and pg["state"] != "REMOVED":
                ray.util.remove_placement_group(ray.util.get_placement_group(pg["name"]))
        for s in self.stores.values():
            try:
                ray.kill(s)
            except Exception:
                pass
