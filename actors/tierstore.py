"""A node's KV tiers below the pools (fabric/tiers.py): one actor per node, and each
instance's client of it.

`NodeTierStore` holds the node's host tier (block payloads in the node's Ray object store,
shared memory that instances on the node map to read; sized in bytes) and its disk tier (files in `tiers.disk_path`, one directory per node). Every instance
on the node writes its evicted prefix blocks there and reads them back; it is a detached named
actor pinned to the node, so it outlives any instance (a restarted instance finds its blocks
again) and ends with the fabric (`fab.shutdown`) or its node. It tells the controller's prefix
index which blocks it holds, and in which tier, like an instance does.

`TierClient` lives in an instance: a writer thread sends evicted blocks down in batches (the
engine thread only copies their KV out), and a loader thread per request brings blocks up into
the pool, tail first (`TierLoad`).
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time

import numpy as np
import ray
import torch

from fabric.messages import CONTROL_TIMEOUT_S
from fabric.threads import release_pool
from fabric.tiers import DiskTier, HostTier, TierCosts, TierLoad, pack, run_load

WRITE_BATCH = 8            # evicted blocks sent down per call, at most
WRITE_QUEUE_BLOCKS = 256   # blocks waiting to go down; past this the oldest are dropped
LOAD_BATCH = 4             # blocks brought up per call (tail first)
PUBLISH_S = 1.0            # how often the store tells the prefix index what it holds
LOOKUP_TIMEOUT_S = 5.0     # a request's lookup waits at most this (then: computed)
STORE_PREFIX = "tiers-"

log = logging.getLogger(__name__)


def _as_bytes(data) -> bytes:
    """A payload (an object-store reference, an array, bytes) as bytes, for a disk file."""
    if isinstance(data, ray.ObjectRef):
        data = ray.get(data)
    return data.tobytes() if isinstance(data, np.ndarray) else data


def store_name(fabric_name: str, node_id: str) -> str:
    return f"{fabric_name}-{STORE_PREFIX}{node_id[:16]}"


@ray.remote(num_cpus=0, max_concurrency=8)
class NodeTierStore:
    def __init__(self, node_id: str, host_bytes: int, disk_path: str | None, disk_bytes: int,
                 controller_name: str, namespace: str):
        self.node_id = node_id
        self.lock = threading.Lock()
        self.disk_lock = threading.Lock()
        self.host = HostTier(host_bytes) if host_bytes > 0 else None
        self.disk = None
        self.disk_error: str | None = None
        if disk_path and disk_bytes > 0:
            path = os.path.join(disk_path, f"node-{node_id[:16]}")
            try:
                self.disk = DiskTier(path, disk_bytes)
            except OSError as e:           # the tier is off; the host tier still works
                self.disk_error = f"{path}: {e}"
                log.error("disk tier at %s is unusable: %s", path, e)
        self.counters = {t: {"hits": 0, "bytes_up": 0, "bytes_down": 0, "evictions": 0}
                         for t in ("host", "disk")}
        self.counters["misses"] = 0
        self.events: list[tuple[bool, bytes, str]] = []    # (added?, hash, tier) for the index
        self.controller_name, self.namespace = controller_name, namespace
        self._gen, self._snapshot = 0, True
        self.stopped = False
        threading.Thread(target=self._publish_loop, name="tier-publish", daemon=True).start()

    # ---- writes (write-back from the pools) ----------------------------------------------
    # `lock` guards the host tier, counters and events; `disk_lock` the disk tier, whose file
    # I/O must not hold up reads of the host tier. Order: `lock` before `disk_lock`, never the
    # other way round.
    def put(self, hashes: list[bytes], payloads: list[np.ndarray]) -> int:
        """Keep blocks evicted from a pool (payloads: uint8 arrays, read in place from the
        caller's argument); returns how many some tier kept."""
        down: list[tuple[bytes, object]] = []
        with self.lock:
            for h, p in zip(hashes, payloads):
                down += self._put_host(h, p)
        if self.disk is not None and down:          # what the host tier let go of goes to disk
            with self.disk_lock:
                written = [(d, len(raw)) for d, data in down if d not in self.disk
                           for raw in [_as_bytes(data)] if self.disk.put(d, raw)]
                dropped = self.disk.take_dropped()
            with self.lock:
                for d, n in written:
                    self.counters["disk"]["bytes_down"] += n
                    self.events.append((True, d, "disk"))
                self._note_disk_drops(dropped)
        return sum(1 for h in hashes if self._holds(h))

    def _put_host(self, h: bytes, payload) -> list[tuple[bytes, object]]:
        """Into the host tier; returns what goes down to disk (all of it without a host tier)."""
        if self.host is None:
            return [(h, payload)]
        if h in self.host:
            self.host.get(h)
            return []
        down = self.host.put(h, ray.put(payload), len(payload))
        if h in self.host:
            self.counters["host"]["bytes_down"] += len(payload)
            self.events.append((True, h, "host"))
        for d, _ in down:
            if d != h:
                self.counters["host"]["evictions"] += 1
                self.events.append((False, d, "host"))
        return down

    def _holds(self, h: bytes) -> bool:
        return (self.host is not None and h in self.host) or \
            (self.disk is not None and h in self.disk.index)

    def _note_disk_drops(self, dropped: list[bytes]) -> None:
        for h in dropped:
            self.counters["disk"]["evictions"] += 1
            self.events.append((False, h, "disk"))

    # ---- reads ---------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[str]:
        """The tier of each leading block of `hashes` this node holds (stops at the first
        block it does not)."""
        out = []
        with self.lock:
            for h in hashes:
                if self.host is not None and h in self.host:
                    out.append("host")
                elif self.disk is not None and h in self.disk.index:
                    out.append("disk")
                else:
                    break
        return out

    def get(self, hashes: list[bytes]) -> list[tuple[str, object] | None]:
        """(tier, payload) of each block: an object-store reference from the host tier (the
        reader maps it), bytes from disk; None for one this node no longer has (or whose file
        is corrupt: never wrong KV)."""
        out: list = [None] * len(hashes)
        rest = []
        with self.lock:
            for i, h in enumerate(hashes):
                if self.host is not None and h in self.host:
                    self.counters["host"]["hits"] += 1
                    self.counters["host"]["bytes_up"] += self.host.blocks[h][1]
                    out[i] = ("host", self.host.get(h))
                else:
                    rest.append(i)
        read, dropped = {}, []
        if self.disk is not None and rest:
            with self.disk_lock:
                read = {i: self.disk.get(hashes[i]) for i in rest}
                dropped = self.disk.take_dropped()
        with self.lock:
            for i in rest:
                data = read.get(i)
                if data is None:
                    self.counters["misses"] += 1
                    continue
                self.counters["disk"]["hits"] += 1
                self.counters["disk"]["bytes_up"] += len(data)
                out[i] = ("disk", data)
            self._note_disk_drops(dropped)
        return out

    # ---- control -------------------------------------------------------------------------
    def stats(self) -> dict:
        with self.lock, self.disk_lock:
            out = {"node_id": self.node_id, "misses": self.counters["misses"]}
            for name, tier in (("host", self.host), ("disk", self.disk)):
                out[name] = None if tier is None else {
                    "blocks": len(tier), "bytes": tier.nbytes, "capacity_bytes": tier.capacity,
                    **self.counters[name]}
            if self.disk is not None:
                out["disk"]["errors"] = dict(self.disk.errors)
            elif self.disk_error:
                out["disk_error"] = self.disk_error
            return out

    def clear(self) -> int:
        """Drop every block of both tiers; returns how many."""
        with self.lock, self.disk_lock:
            n = 0
            for name, tier in (("host", self.host), ("disk", self.disk)):
                if tier is not None:
                    gone = tier.clear()
                    self.events += [(False, h, name) for h in gone]
                    n += len(gone)
            if self.disk is not None:
                self.disk.take_dropped()
            return n

    def inject_fault(self, what: str, times: int = 1) -> None:
        """Tests: "disk_full" makes the next `times` disk writes fail as on a full disk."""
        if what != "disk_full" or self.disk is None:
            raise ValueError(f"unknown fault {what!r} (or no disk tier)")
        self.disk.fail_writes = times

    def ping(self) -> bool:
        return True

    # ---- the prefix index ------------------------------------------------------------------
    def _publish_loop(self) -> None:
        """Every PUBLISH_S: the blocks added and dropped since the last batch, to the
        controller's index (a refused batch, or a controller that was away: a snapshot)."""
        controller = None
        while not self.stopped:
            time.sleep(PUBLISH_S)
            try:
                if controller is None:
                    controller = ray.get_actor(self.controller_name, namespace=self.namespace)
                with self.lock:
                    if self._snapshot:
                        self.events = []
                        added = [(h, "host") for h in (self.host.blocks if self.host else ())]
                        with self.disk_lock:
                            on_disk = list(self.disk.index) if self.disk else []
                        added += [(h, "disk") for h in on_disk if not (self.host and h in self.host)]
                        batch, base = (added, []), None
                    else:
                        events, self.events = self.events, []
                        if not events:
                            continue
                        batch = ([(h, t) for a, h, t in events if a],
                                 [(h, t) for a, h, t in events if not a])
                        base = self._gen
                    self._gen += 1
                    gen = self._gen
                ok = ray.get(controller.tier_events.remote(self.node_id, gen, base, *batch),
                             timeout=CONTROL_TIMEOUT_S)
                self._snapshot = not ok
            except Exception:                # controller away or restarting: snapshot later
                controller, self._snapshot = None, True


class TierClient:
    """An instance's handle on its node's tiers: writes evicted blocks down (a thread, in
    batches), looks up and loads blocks up (a thread per load)."""

    def __init__(self, store_fn, block_shape: tuple, dtype: torch.dtype, write_kv, returns):
        self.store_fn = store_fn             # () -> this node's store, started if it is not
        self.store = store_fn()
        self.shape, self.dtype = block_shape, dtype
        self.write_kv = write_kv             # (blocks, k, v): into this instance's pool
        self.returns = returns               # blocks a finished load gives back (scheduler)
        self.costs = TierCosts()
        self.queue: queue.Queue = queue.Queue()
        self.queued = 0                      # blocks in `queue` (under `_queued_lock`)
        self._queued_lock = threading.Lock()
        self.counters = {"blocks_down": 0, "dropped": 0, "write_errors": 0, "loads": 0,
                         "blocks_up": 0, "load_errors": 0, "lookup_errors": 0}
        self.stopped = False
        threading.Thread(target=self._writer, name="tier-writer", daemon=True).start()

    # ---- down ----------------------------------------------------------------------------
    def offer(self, hashes: list[bytes], k: torch.Tensor, v: torch.Tensor) -> None:
        """Evicted blocks (`k`, `v`: `[L, n, block_size, H_kv, D]` copies): send them down.
        Called on the engine thread: only queues."""
        self.queue.put((hashes, k, v))
        self._count(len(hashes))
        while self.queued > WRITE_QUEUE_BLOCKS:         # the tiers cannot keep up: drop oldest
            try:
                old = self.queue.get_nowait()
            except queue.Empty:
                break
            self._count(-len(old[0]))
            self.counters["dropped"] += len(old[0])

    def _count(self, n: int) -> None:
        with self._queued_lock:
            self.queued += n

    def _writer(self) -> None:
        while not self.stopped:
            try:
                item = self.queue.get(timeout=0.5)
            except queue.Empty:
                continue
            hashes, payloads = [], []
            while item is not None:
                h, k, v = item
                self._count(-len(h))
                hashes += h
                payloads += [pack(k[:, j], v[:, j]) for j in range(len(h))]
                release_pool()  # beside the engine loop (fabric/threads.py)
                item = None
                if len(hashes) < WRITE_BATCH:
                    try:
                        item = self.queue.get_nowait()
                    except queue.Empty:
                        pass
            try:
                ray.get(self._store().put.remote(hashes, payloads), timeout=CONTROL_TIMEOUT_S)
                self.counters["blocks_down"] += len(hashes)
            except Exception as e:
                self._lost(e)
                self.counters["write_errors"] += 1
                log.warning("tier write of %d blocks failed: %r", len(hashes), e)

    def _store(self):
        if self.store is None:               # the store died: the node's next one (empty)
            self.store = self.store_fn()
        return self.store

    def _lost(self, exc: Exception) -> None:
        if isinstance(exc, ray.exceptions.RayActorError):
            self.store = None

    # ---- up ------------------------------------------------------------------------------
    def lookup(self, hashes: list[bytes]) -> list[str]:
        try:
            return ray.get(self._store().lookup.remote(hashes), timeout=LOOKUP_TIMEOUT_S)
        except Exception as e:
            self._lost(e)
            self.counters["lookup_errors"] += 1
            return []

    def start_load(self, ld: TierLoad) -> None:
        self.counters["loads"] += 1
        threading.Thread(target=self._load, args=(ld,), name="tier-load", daemon=True).start()

    def _load(self, ld: TierLoad) -> None:
        def fetch(hashes):
            got = ray.get(self._store().get.remote(hashes), timeout=CONTROL_TIMEOUT_S)
            refs = [g[1] for g in got if g is not None and isinstance(g[1], ray.ObjectRef)]
            mapped = iter(ray.get(refs, timeout=CONTROL_TIMEOUT_S)) if refs else iter(())
            return [g if g is None or not isinstance(g[1], ray.ObjectRef) else (g[0], next(mapped))
                    for g in got]

        try:
            run_load(ld, fetch, self.write_kv, self.shape, self.dtype, LOAD_BATCH, self.costs)
            self.counters["blocks_up"] += sum(ld.tiers.values())
        except Exception as e:
            self._lost(e)
            self.counters["load_errors"] += 1
            log.warning("tier load failed: %r", e)
        finally:
            release_pool()      # a thread beside the engine loop (fabric/threads.py)
            rest = ld.finish()
            if rest:
                self.returns.put(rest)

    def stop(self) -> None:
        self.stopped = True


def get_store(controller_name: str, namespace: str, cfg) -> "ray.actor.ActorHandle":
    """This node's store for the fabric whose controller is `controller_name` (its name names
    the fabric), started if it is not running (a detached actor pinned to the node)."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    node_id = ray.get_runtime_context().get_node_id()
    store = NodeTierStore.options(
        name=store_name(controller_name, node_id), namespace=namespace, get_if_exists=True,
        lifetime="detached", scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
    ).remote(node_id, cfg.host_bytes, cfg.disk_path, cfg.disk_bytes, controller_name, namespace)
    ray.get(store.ping.remote(), timeout=CONTROL_TIMEOUT_S)
    return store


def list_stores(fabric_name: str, namespace: str) -> list:
    """Handles of the running stores of fabric `fabric_name` (one per node that has one)."""
    out = []
    for a in ray.util.list_named_actors(all_namespaces=True):
        if a["namespace"] == namespace and a["name"].startswith(f"{fabric_name}-{STORE_PREFIX}"):
            try:
                out.append(ray.get_actor(a["name"], namespace=namespace))
            except ValueError:                  # ended meanwhile
                pass
    return out


def kill_stores(fabric_name: str, namespace: str) -> int:
    """End every node's store of fabric `fabric_name` (its host tier is lost; disk files stay)."""
    stores = list_stores(fabric_name, namespace)
    for s in stores:
        try:
            ray.kill(s, no_restart=True)
        except Exception:
            pass
    return len(stores)


def store_stats(stores: list) -> list[dict]:
    """Each store's stats; a store that does not answer (its node died) is left out."""
    out = []
    for s in stores:
        try:
            out.append(ray.get(s.stats.remote(), timeout=CONTROL_TIMEOUT_S))
        except Exception:
            pass
    return out
