"""The inference-instance actor: hosts one `Engine`, its KV pool and rManager.

Threads inside the actor (a threaded Ray actor):
- the engine loop: borrows ahead when its requests need more blocks than it has (Ray calls to
  the controller and a creditor, never under the books lock), then runs one step under the lock;
- the transport's service thread: answers creditors' attention micro-tasks over the blocks this
  instance lends, concurrently with its own steps (disjoint blocks; never takes the lock);
- Ray call threads: `generate` (waits for its requests) on the default group; control calls
  (`lend`, `reclaim`, `abort`, `info`, `stats`, `health`, ...) on a group of their own, so that
  many long `generate`/`stream` calls cannot starve them; and a heartbeat thread feeding the
  controller's ledger.

Liveness: while its constructor runs, the instance tells the elastic manager what it is doing
(`report_phase`: loading weights, allocating the KV pool, ...); the manager bounds start-up with
`instances.startup_timeout_s` and judges silence only after the first heartbeat. The engine loop
is guarded: an exception outside a step fails the waiting requests with a `FabricError` saying
what broke; repeated faults make the instance unhealthy (it stops beating and refuses requests;
the manager replaces it).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import queue
import random
import threading
import time

import ray
import torch

from fabric.config import FabricConfig, load_config
from fabric.distattn import CreditorSteps, PartialJob, serve_partial
from fabric.engine import Engine
from fabric.errors import CapacityError, FabricError, RequestError
from fabric.messages import CONTROL_TIMEOUT_S, Heartbeat
from fabric.model import load_model
from fabric.prefix_cache import model_salt, prompt_hashes
from fabric.rmanager import BlockRef
from fabric.sequence import SamplingParams
from fabric.threads import release_pool
from actors.handoff import HandoffMixin
from actors.metrics import InstanceMetrics
from actors.tierstore import TierClient, get_store
from actors.transport import TransportHost
from actors.waiters import Waiter, text_of

BORROW_CHUNK = 8      # blocks borrowed at least per borrow event: keeps control calls off the token path
MEMORY_WAIT_S = 2.0    # a request short of blocks waits this long for a borrow before preemption
BORROW_RETRY_S = 0.05  # after a failed borrow, wait this long before asking the controller again
MAX_LOOP_FAULTS = 3    # engine-loop faults in a row (no good step between) that make it unhealthy
PREFIX_QUIET_BEATS = 10   # with nothing cached or evicted, tell the prefix index this often anyway
CONTROL_GROUP = "control"      # concurrency group of control calls
LIFELINE_GROUP = "lifeline"    # the elastic manager's death watch (`lifeline`)
# Fault injection for tests: the constructor sleeps this many seconds (a slow checkpoint load).
STARTUP_DELAY_ENV = "KV_FABRIC_TESTING_STARTUP_DELAY_S"
# The linear weights' oneDNN copies (model.linear_kernel) are made by the engine thread once the
# instance is up, so they add nothing to its start: about this many seconds of packing between
# steps while it serves, more while it is idle.
PACK_BUSY_S = 0.005
PACK_IDLE_S = 0.05

log = logging.getLogger(__name__)


class InstanceActor(HandoffMixin, TransportHost):
    def __init__(self, instance_id: int, config: dict, controller_name: str, namespace: str,
                 fabric_name: str = "", manager_name: str | None = None, name: str = "",
                 standby: bool = False):
        if standby:     # a warm process until `take_rank`: torch, model code and tokenizer loaded
            import autoscale.weights, fabric.model.checkpoint  # noqa: F401, E401
            from fabric.tokenizer import load_tokenizer

            load_tokenizer(load_config(config).model)       # kept (per process) for adoption
            self._standby_args = (config, controller_name, namespace, fabric_name, manager_name,
                                  name)
            return
        self.cfg: FabricConfig = load_config(config)
        torch.set_num_threads(self.cfg.instances.torch_threads())   # the cores Ray gives it
        self.id, self.name = instance_id, name
        self.controller = ray.get_actor(controller_name, namespace=namespace)
        self.manager = ray.get_actor(manager_name, namespace=namespace) if manager_name else None
        delay = float(os.environ.get(STARTUP_DELAY_ENV) or 0)
        if delay > 0:         # one report: calls to a threaded actor may run out of order
            self._phase(f"in a start-up delay of {delay:g} s ({STARTUP_DELAY_ENV})")
            time.sleep(delay)
        else:
            self._phase("constructing")
        self.weights: dict = {}
        self.engine = self._build_engine()
        self._phase("loading the tokenizer")
        self._attach_tokenizer()
        self._phase("starting its threads")
        self.metrics = InstanceMetrics(instance_id, fabric_name)
        self.lock = threading.RLock()     # the books: held while they change, never across a network wait
        self.step_lock = threading.Lock()  # a step in flight: taken before `lock` by calls that pull its blocks
        self.partial_steps = CreditorSteps()   # debtors' steps checked here (serve_transport)
        self.inbox: queue.Queue = queue.Queue()
        self.waiters: dict[str, Waiter] = {}
        self.cancelled: set[str] = set()
        self.dead_peers: set[int] = set()
        self.paused = threading.Event()
        self.parked = threading.Event()       # the engine loop saw `paused` and is between steps
        self.draining = False                 # leaving the fabric: lends nothing, admits nothing
        self.handoff_targets: list = []
        self.handed_to: dict = {}             # request id -> the instance it was handed to
        self.target_free: list[int] = []      # free blocks of the handoff targets, this drain
        self.inbox_lock = threading.Lock()    # `draining` and the inbox change together
        self.recent_ttft: list[tuple[float, float]] = []
        self.num_recoveries = 0
        self.wake = threading.Event()
        self.stopped = False
        self.transport = None
        self.peers: list = []
        self.num_controller_calls = 0
        self.num_blocks_borrowed_total = 0
        self.num_remote_partials_served = 0
        self.serve_seconds = 0.0
        self.started = time.perf_counter()
        self._hb_seq = 0
        self._borrow_retry_at = 0.0
        self.num_loop_faults = 0              # engine-loop faults so far
        self.loop_faults_in_row = 0           # ... since the last good step
        self.last_fault: str | None = None
        self.unhealthy: str | None = None     # why this instance gave up serving
        self._faults: dict[str, int] = {}     # injected faults (tests): point -> times left
        self.lifetime = threading.Event()     # set when the instance stops
        # prefix reuse across instances: leases waiting for admission, the index generation
        self.engine.rm.unlease_fn = self.engine.scheduler.unlease_fn = self._unpin_remote
        self.waiting_leases: dict[str, tuple] = {}
        self.remote_prefix = {"lease": 0, "copy": 0, "recompute": 0, "blocks_copied": 0,
                              "blocks_leased": 0}
        self._prefix_gen, self._prefix_snapshot, self._prefix_quiet = 0, True, 0
        self._prefix_pending: tuple | None = None     # (ref, generation, sent at)
        self.engine.scheduler.session_ttl_s = self.cfg.prefix_cache.session_ttl_s
        # KV tiers below the pool (actors/tierstore.py): the node's host and disk tiers
        self.tiers: TierClient | None = None
        self.waiting_loads: dict[str, tuple] = {}     # request -> its tier plan, until admitted
        if self.cfg.tiers.enabled and self.cfg.prefix_cache.enabled:
            self._phase("connecting to its node's KV tiers")
            tiers_cfg = self.cfg.tiers
            self.tiers = TierClient(lambda: get_store(controller_name, namespace, tiers_cfg),
                                    self.engine.block_shape, self.engine.kv.k.dtype,
                                    self.engine.kv.write_blocks, self.engine.scheduler.load_returns)
            self.engine.set_tier_sink(self.tiers.offer)
            self.engine.scheduler.start_load = self.tiers.start_load
            self.engine.scheduler.load_met = lambda ld: self.tiers.costs.observe_both(
                ld.predicted_s, ld.met_s)
            self.engine.scheduler.min_load_blocks = max(1, self.cfg.tiers.min_load_blocks)
        release_pool()          # this thread's torch work is done: the engine thread's cores
        threading.Thread(target=self._loop, name="engine-loop", daemon=True).start()

    def take_rank(self, instance_id: int) -> None:
        """A warm standby becomes replica rank `instance_id`: the construction a cold replica
        does, without starting a process and importing torch first."""
        self.__init__(instance_id, *self._standby_args)

    def _attach_tokenizer(self) -> None:
        """The checkpoint's tokenizer (text of each output: stop strings, streamed text) and
        the ids that end generation."""
        from fabric.tokenizer import generation_eos_ids, load_tokenizer

        self.engine.tokenizer = load_tokenizer(self.cfg.model)
        self.engine.eos_token_ids |= set(generation_eos_ids(self.cfg.model))

    def _phase(self, what: str) -> None:
        """Tell the elastic manager what start-up is doing (named in a start-up timeout)."""
        if self.manager is None:
            return
        ctx = ray.get_runtime_context()
        try:
            self.manager.report_phase.remote(self.name, self.id, what, ctx.get_node_id(),
                                             ray.util.get_node_ip_address())
        except Exception:     # the manager restarts: the next report gets through
            pass

    def _build_engine(self) -> Engine:
        """The model (weights mapped from the node's published copy when the fabric has an
        elastic manager, else loaded), then the KV pool. `self.weights` says what it cost."""
        m, inst = self.cfg.model, self.cfg.instances
        device = "cuda" if inst.device == "cuda" else "cpu"
        t0 = time.perf_counter()
        if self.manager is not None:
            from autoscale.weights import all_shared, map_weights
            from fabric.model.checkpoint import build_model

            self._phase("waiting for its node's copy of the weights (published once per node)")
            manifest, cost = ray.get(self.manager.weights_for.remote(
                ray.get_runtime_context().get_node_id()), timeout=inst.startup_timeout_s)
            t_manifest = time.perf_counter()
            self._phase("mapping the weights")
            state, mapped = map_weights(manifest)
            t_map = time.perf_counter()
            self._phase("building the model")
            model = build_model(manifest["args"], state, m.dtype, device, m.linear_kernel,
                                pack=False)
            t_build = time.perf_counter()
            self.weights = {"bytes_mapped": mapped if device == "cpu" else 0,
                            "bytes_copied": cost["bytes_copied"] + (mapped if device != "cpu" else 0),
                            "bytes_loaded_from_disk": cost["bytes_loaded_from_disk"],
                            "manifest_s": t_manifest - t0, "map_s": t_map - t_manifest,
                            "build_s": t_build - t_map}
        else:
            self._phase("loading the weights")
            model = load_model(m.preset, m.path, m.dtype, m.seed, device, m.linear_kernel, pack=False)
            from autoscale.weights import checkpoint_bytes

            self.weights = {"bytes_mapped": 0, "bytes_copied": 0,
                            "bytes_loaded_from_disk": checkpoint_bytes(m.path) if m.path else 0}
        lend = self.cfg.lending
        self._phase("allocating the KV pool")
        engine = Engine(model, inst.kv_blocks, inst.block_size, instance_id=self.id,
                        max_num_seqs=inst.max_num_seqs, max_batch_tokens=inst.max_batch_tokens,
                        max_lend_fraction=lend.max_lend_fraction, min_free_fraction=lend.min_free_fraction,
                        prefix_cache=self.cfg.prefix_cache.enabled,
                        prefix_salt=model_salt(self.cfg.model))
        self.weights["ready_s"] = time.perf_counter() - t0    # weights + model + KV pool
        self.weights["shared"] = device == "cpu" and self.manager is not None and \
            all_shared(list(model.parameters()))
        return engine

    # ---- set-up --------------------------------------------------------------------------
    @ray.method(concurrency_group=CONTROL_GROUP)
    def info(self) -> dict:
        args = self.engine.args
        return {"id": self.id, "node": ray.get_runtime_context().get_node_id(),
                "ip": ray.util.get_node_ip_address(), "vocab_size": args.vocab_size,
                "eos_token_id": args.eos_token_id, "max_position_embeddings": args.max_position_embeddings,
                "architecture": args.architecture, "kv_blocks": self.engine.rm.num_blocks,
                "block_size": self.engine.rm.block_size, "lend_cap": self.engine.rm.lend_cap,
                "min_free": self.engine.rm.min_free, "num_layers": args.num_layers,
                "num_kv_heads": args.num_kv_heads, "head_dim": args.head_dim,
                "dtype_bytes": self.engine.kv.k.element_size()}

    def connect(self, world_size: int, master_addr: str, master_port: int, backend: str,
                peers: list, max_request_blocks: int) -> bool:
        """Join the fabric's data plane (all instances call this concurrently)."""
        self.peers = peers
        self.engine.max_request_blocks = max_request_blocks
        self.setup_transport(self.id, world_size, master_addr, master_port, backend, peers,
                             **self._transport_options(backend))
        self.engine.remote = TransportPartials(self.transport, self.lock)
        if self.cfg.lending.enabled:
            self.engine.rm.release_fn = self._release
            self.engine.scheduler.memory_wait_s = MEMORY_WAIT_S
            self.engine.scheduler.reserve_on_admit = True
        ray.get(self.controller.heartbeat.remote(self.heartbeat()),   # in the ledger before serving
                timeout=CONTROL_TIMEOUT_S)
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        return True

    def _transport_options(self, backend: str) -> dict:
        cap = self.cfg.transport.max_message_bytes
        options = {"max_message_bytes": cap}
        if backend == "torch":                      # frames never larger than a message
            options["inline_bytes"] = min(1 << 20, cap)
        return options

    def reconnect(self, world_size: int, master_addr: str, master_port: int, backend: str,
                  peers: list, max_request_blocks: int) -> bool:
        """Rejoin a rebuilt data plane (a replacement instance joined): between two steps, the
        old transport is closed and a new one built with every rank at once."""
        self.paused.set()
        try:
            with self.step_lock:          # between two steps; the books do not change
                self.peers = peers
                self.engine.max_request_blocks = max_request_blocks
                self.setup_transport(self.id, world_size, master_addr, master_port, backend,
                                     peers, **self._transport_options(backend))
                self.engine.remote = TransportPartials(self.transport, self.lock)
                self.dead_peers.clear()
        finally:
            if not self.draining:             # a leaving replica stays parked
                self.paused.clear()
            self.wake.set()
        return True

    def prepare(self, world_size: int, master_addr: str, master_port: int, backend: str,
                peers: list, max_request_blocks: int) -> bool:
        """Join the next data plane (members changed) while still serving on the current one."""
        self.prepare_transport(self.id, world_size, master_addr, master_port, backend, peers,
                               **self._transport_options(backend))
        self._next_plane = (list(peers), max_request_blocks)
        return True

    def switch(self) -> float:
        """Move to the prepared data plane between two steps; returns how long stepping paused."""
        t0 = time.perf_counter()
        self.pause()
        try:
            with self.step_lock:          # between two steps; the books do not change
                self.swap_transport()
                self.peers, self.engine.max_request_blocks = self._next_plane
                self.engine.remote = TransportPartials(self.transport, self.lock)
                self.dead_peers.clear()
        finally:
            self.resume()
        return time.perf_counter() - t0

    # ---- requests ------------------------------------------------------------------------
    def generate(self, requests: list[dict]) -> list[dict]:
        """Run `requests` ({id, prompt, max_new_tokens, temperature, seed, ignore_eos}) to the end.
        A bad request yields {"id", "error", "error_type"} without touching the others."""
        waiters = [self._enqueue(r, stream=False) for r in requests]
        self.wake.set()
        for w in waiters:
            w.event.wait()
        return [w.slot for w in waiters]

    def stream(self, request: dict):
        """Yield each token id as it is made, then the final result dict (a Ray streaming
        generator: call with `.options(num_returns="streaming")`)."""
        w = self._enqueue(request, stream=True)
        self.wake.set()
        while (tok := w.tokens.get()) is not None:
            yield tok
        yield w.slot

    @ray.method(concurrency_group=CONTROL_GROUP)
    def abort(self, req_id: str) -> bool:
        """Cancel a request: its blocks, local and borrowed, are freed at once. A request handed
        to another instance (this one is leaving) is cancelled there. An id that is not running
        here is not remembered (it may be used again later)."""
        target = self.handed_to.get(req_id)
        if target is not None:
            return ray.get(target.abort.remote(req_id), timeout=CONTROL_TIMEOUT_S)
        with self.step_lock, self.lock:        # never under a step: it frees the step's blocks
            seq = self.engine.seqs.get(req_id)
            if seq is None:
                if req_id in self.waiters:            # still in the inbox: dropped on admission
                    self.cancelled.add(req_id)
            else:
                self.engine.abort(req_id)
                rm = self.engine.rm
                rm.release_spares(keep=max(0, self.engine.scheduler.num_blocks_wanted() - rm.num_free))
        w = self.waiters.pop(req_id, None)
        if w is None:
            return False
        w.done(id=req_id, tokens=list(seq.output) if seq else [], finish_reason="abort",
               metrics=seq.metrics() if seq else {}, home=self.id,
               **(text_of(seq) if seq else {}))
        return True

    def _enqueue(self, r: dict, stream: bool) -> Waiter:
        w = Waiter(stream)                  # its `arrival`: the request's TTFT counts from here
        with self.inbox_lock:
            if not self.draining:
                return self._enqueue_here(r, w)
        return self._forward_fresh(r, w)       # routed here just before this replica left

    def _enqueue_here(self, r: dict, w: Waiter) -> Waiter:
        try:
            if self.unhealthy is not None:
                raise FabricError(f"instance {self.id} is unhealthy ({self.unhealthy}): it "
                                  f"takes no requests until it is replaced")
            params = SamplingParams.from_request(r)
            self.engine.validate(r["prompt"], params)
            if r["id"] in self.waiters:
                raise RequestError(f"request id {r['id']!r} is already running here")
            queued = self.inbox.qsize() + len(self.engine.scheduler.waiting)
            if queued >= self.cfg.instances.max_queued_requests:
                raise CapacityError(f"fabric queue full: instance {self.id} already has {queued} "
                                    f"requests waiting (instances.max_queued_requests)")
            self.waiters[r["id"]] = w
            t0 = time.perf_counter()
            if r.get("prefix_source") is not None:
                lease = self._reuse_remote_prefix(r["prompt"], params, r["prefix_source"])
                if lease is not None:
                    self.waiting_leases[r["id"]] = lease
            if self.tiers is not None and r["id"] not in self.waiting_leases:
                self._plan_tier_load(r["id"], r["prompt"])
            self.inbox.put((r["id"], r["prompt"], params, w.arrival, time.perf_counter() - t0))
        except FabricError as e:
            w.done(id=r["id"], error=str(e), error_type=type(e).__name__)
        return w

    def pause(self, timeout_s: float = 30.0) -> bool:
        """Stop stepping (between two steps) until `reconnect` or `resume`; True once parked."""
        if not self.paused.is_set():
            self.parked.clear()                 # a stale "parked" must not answer for this pause
        self.paused.set()
        self.wake.set()
        return self.parked.wait(timeout_s)

    def resume(self) -> None:
        self.paused.clear()
        self.wake.set()

    def _loop(self) -> None:
        """The engine thread. Nothing may end it but `stopped`: a fault fails the requests it
        touches with an error that says what broke, and the loop goes on."""
        while not self.stopped:
            try:
                self._loop_once()
            except Exception as e:
                self._loop_fault(e)

    def _loop_once(self) -> None:
        if self.paused.is_set():           # rejoining the data plane, or handing off
            self.parked.set()
            time.sleep(0.005)
            return
        self.parked.clear()
        self._maybe_fault("engine_loop")
        self._admit()
        if self.engine.model.left_to_pack:   # the linears' oneDNN copies, a few at a time, here
            self.engine.model.pack_some(PACK_BUSY_S if self.engine.has_unfinished() else PACK_IDLE_S)
        if not self.engine.has_unfinished():
            self._release_idle_spares()
            self.wake.wait(0.05)
            self.wake.clear()
            return
        self._borrow_ahead()
        # The step holds `step_lock` throughout and the books lock except while it waits for
        # creditors' partials (`TransportPartials`): control calls that only add to the books or
        # read them (lend, reclaim, pin, stats...) run meanwhile, since the step's blocks are all
        # held by its requests; those that free a running request's blocks (abort) take
        # `step_lock` first and so wait for the step's end.
        with self.step_lock, self.lock:
            try:
                steps_before = self.engine.num_steps
                new, finished = self.engine.step()
            except Exception as e:
                failed_peers = getattr(e, "failed_peers", None)
                if not failed_peers:         # never lose requests silently
                    self._fail_all(e)
                    return
                raised, error = getattr(e, "raised_peers", []), e
            else:
                failed_peers = None
                if self.engine.num_steps > steps_before:
                    self.loop_faults_in_row = 0
        if failed_peers:
            if raised:                        # a creditor's handler raised: a bug, not a fault
                self._fail_requests_on(raised, error)
            if set(failed_peers) - set(raised):
                self._recover_from([p for p in failed_peers if p not in raised])
            return
        if self.engine.num_steps == steps_before:     # all waiting for memory
            self.wake.wait(0.01)
            self.wake.clear()
        for seq, tok in new:
            w = self.waiters.get(seq.req_id)
            if w is not None and w.tokens is not None:     # [token, new text]
                w.tokens.put([tok, seq.detok.take_delta(seq.is_finished) if seq.detok else ""])
        for seq in finished:
            self._finish(seq)

    def _loop_fault(self, exc: Exception) -> None:
        """An exception outside `engine.step()`: fail every waiting request with it (their
        callers would otherwise wait forever); after MAX_LOOP_FAULTS in a row, give up serving."""
        self.num_loop_faults += 1
        self.loop_faults_in_row += 1
        self.last_fault = f"{type(exc).__name__}: {exc}"
        log.exception("instance %d: engine loop fault", self.id)
        if self.loop_faults_in_row >= MAX_LOOP_FAULTS:
            self.unhealthy = f"{self.loop_faults_in_row} engine-loop faults in a row, the last " \
                             f"{self.last_fault}"
        try:
            self._fail_waiting(f"the engine loop of instance {self.id} failed: {self.last_fault}")
        except Exception:
            log.exception("instance %d: failing requests after a loop fault", self.id)
        time.sleep(0.05)

    def _fail_waiting(self, error: str) -> None:
        """Fail every request whose caller waits here (running, queued, or not yet admitted),
        except those handed to another instance."""
        while True:
            try:
                self.inbox.get_nowait()
            except queue.Empty:
                break
        for req_id in list(self.waiting_leases):
            self._drop_lease(self.waiting_leases.pop(req_id, None))
        self.waiting_loads.clear()
        with self.lock:
            for req_id in list(self.engine.seqs):
                self.engine.abort(req_id)
            rm = self.engine.rm
            rm.release_spares(keep=0)
        for req_id in [r for r in list(self.waiters) if r not in self.handed_to]:
            w = self.waiters.pop(req_id, None)
            self.cancelled.discard(req_id)
            if w is not None:
                w.done(id=req_id, error=error, error_type="FabricError")

    def _fail_requests_on(self, peers: list[int], exc: Exception) -> None:
        """Fail the running requests with KV on `peers`, whose attention handler raised."""
        with self.lock:
            rm = self.engine.rm
            hit = [s.req_id for s in list(self.engine.scheduler.running)
                   if any(r.instance in peers for r in rm.tables.get(s.req_id, ()))]
            for req_id in hit:
                self.engine.abort(req_id)
            rm.release_spares(keep=max(0, self.engine.scheduler.num_blocks_wanted() - rm.num_free))
        for req_id in hit:
            w = self.waiters.pop(req_id, None)
            if w is not None:
                w.done(id=req_id, error=f"instance {self.id}: attention on a creditor failed "
                       f"for request {req_id}: {exc}", error_type="FabricError")

    def _maybe_fault(self, point: str) -> None:
        if self._faults.get(point, 0) > 0:
            self._faults[point] -= 1
            raise RuntimeError(f"fault injected at {point!r} (testing)")

    @ray.method(concurrency_group=CONTROL_GROUP)
    def inject_fault(self, point: str, times: int = 1) -> None:
        """Testing aid: raise at `point` the next `times` times it is reached. Points:
        "engine_loop" (the engine thread, outside a step), "serve_attention" (this instance's
        handler for creditors' attention calls)."""
        if point not in ("engine_loop", "serve_attention"):
            raise ValueError(f"unknown fault point {point!r}")
        self._faults[point] = int(times)
        self.wake.set()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def health(self) -> dict:
        return {"id": self.id, "healthy": self.unhealthy is None, "reason": self.unhealthy,
                "loop_faults": self.num_loop_faults, "last_fault": self.last_fault}

    @ray.method(concurrency_group=LIFELINE_GROUP)
    def lifeline(self, timeout_s: float) -> bool:
        """Returns when the instance stops (True) or after `timeout_s` (False); the elastic
        manager keeps one call open per replica: it fails at once when the actor dies."""
        return self.lifetime.wait(timeout_s)

    def _recover_from(self, peers: list[int]) -> None:
        """A creditor stopped answering: requests with KV there are recomputed from their tokens
        on healthy instances (their other blocks are kept or returned); a dead creditor is
        forgotten here, in the ledger, and in the books of those that lent to it."""
        dead = [p for p in peers if not self._is_alive(p)]
        with self.lock:
            sched, rm = self.engine.scheduler, self.engine.rm
            for seq in list(sched.running):
                if any(r.instance in peers for r in rm.tables.get(seq.req_id, ())):
                    sched.preempt(seq)
            for p in dead:
                rm.forget_instance(p)
            self.partial_steps.books_changed()
            self.num_recoveries += 1
        for p in dead:
            self.dead_peers.add(p)
            if self.manager is not None:    # it drops the rank everywhere and replaces it
                try:
                    self.manager.report_dead.remote(p, self.peers[p]._actor_id.hex())
                except Exception:
                    pass

    def _is_alive(self, peer: int) -> bool:
        try:
            ray.get(self.peers[peer].info.remote(), timeout=10)
            return True
        except Exception:
            return False

    def _tell_controller(self, method: str, *args) -> None:
        try:
            getattr(self.controller, method).remote(*args)
        except Exception:
            pass      # restarting: the next heartbeats rebuild its ledger

    @ray.method(concurrency_group=CONTROL_GROUP)
    def drop_debtor(self, debtor: int) -> int:
        """`debtor` died: take back every block lent to it."""
        with self.lock:
            n = self.engine.rm.drop_debtor(debtor)
            self.partial_steps.books_changed()
        self.dead_peers.add(debtor)
        self._beat_now()
        return n

    def _admit(self) -> None:
        while True:
            try:
                req_id, prompt, params, arrival, fetch_s = self.inbox.get_nowait()
            except queue.Empty:
                return
            lease = self.waiting_leases.pop(req_id, None)
            plan = self.waiting_loads.pop(req_id, None)
            if req_id in self.cancelled:
                self.cancelled.discard(req_id)
                self._drop_lease(lease)
                continue
            try:
                with self.lock:
                    self.engine.add_request(prompt, params, req_id=req_id, arrival=arrival,
                                            prefix_fetch_s=fetch_s)
                    seq = self.engine.seqs[req_id]
                    seq.lease = lease
                    if plan is not None and plan[2] != "recompute":
                        seq.tier_plan = plan
                    elif plan is not None:
                        seq.tier = {"tier_policy": "recompute"}
            except FabricError as e:
                self._drop_lease(lease)
                w = self.waiters.pop(req_id, None)
                if w is not None:
                    w.done(id=req_id, error=str(e), error_type=type(e).__name__)

    def _finish(self, seq) -> None:
        self.cancelled.discard(seq.req_id)
        w = self.waiters.pop(seq.req_id, None)
        if w is None:
            return
        m = seq.metrics()
        w.done(id=seq.req_id, tokens=list(seq.output), finish_reason=seq.finish_reason,
               metrics=m, home=self.id, **text_of(seq))
        self.metrics.observe_request(m["ttft_s"], m["tpot_s"])
        self.recent_ttft = [*self.recent_ttft[-255:], (time.monotonic(), m["ttft_s"])]

    def _fail_all(self, exc: Exception) -> None:
        """A step raised: fail the admitted requests with the error (never lose them silently)."""
        log.error("instance %d: a step failed: %r", self.id, exc)
        for req_id in list(self.engine.seqs):
            self.engine.abort(req_id)
            self.cancelled.discard(req_id)
            w = self.waiters.pop(req_id, None)
            if w is not None:
                w.done(id=req_id, error=f"instance {self.id}: a step failed: "
                       f"{type(exc).__name__}: {exc}", error_type="FabricError")

    # ---- borrowing (debtor side) ---------------------------------------------------------
    def _borrow_ahead(self) -> None:
        if not self.cfg.lending.enabled or self.transport is None:
            return
        with self.lock:
            rm = self.engine.rm
            short = self.engine.scheduler.num_blocks_wanted() - rm.num_free - rm.num_spare
        if short <= 0 or time.perf_counter() < self._borrow_retry_at:
            return
        try:
            ok = self._borrow(max(short, BORROW_CHUNK), short)
        except Exception:          # the controller restarts, or a creditor died: try again later
            ok = False
        if not ok:
            # Hold nothing while waiting: spares kept for a request that cannot start yet make
            # this instance a debtor (so it lends nothing) and, with several instances doing
            # the same, each would wait for blocks another holds. Keep only what running
            # requests still need; retry after a jittered pause so two waiters do not collide.
            with self.lock:
                rm = self.engine.rm
                rm.release_spares(keep=max(0, self.engine.scheduler.num_committed() - rm.num_free))
            self._borrow_retry_at = time.perf_counter() + BORROW_RETRY_S * (0.5 + random.random())

    def _borrow(self, n: int, at_least: int) -> bool:
        """Ask the controller for creditors of up to `n` blocks (no fewer than `at_least`), and
        reserve on each before any byte moves; a refused reservation is re-planned with that
        creditor excluded. True when at least `at_least` blocks came."""
        exclude: list[int] = []
        got: list[BlockRef] = []
        for _ in range(3):
            self.num_controller_calls += 1
            grants = ray.get(self.controller.propose_creditors.remote(
                self.id, n - len(got), exclude, max(1, at_least - len(got))),
                timeout=CONTROL_TIMEOUT_S)
            if not grants:
                break
            for creditor, k in grants:
                if creditor >= len(self.peers):     # joining: not on this data plane yet
                    self.controller.settle.remote(self.id, creditor, 0, k)
                    exclude.append(creditor)
                    continue
                ids = ray.get(self.peers[creditor].lend.remote(self.id, k), timeout=CONTROL_TIMEOUT_S)
                self.controller.settle.remote(self.id, creditor, len(ids), k - len(ids))
                if len(ids) < k:
                    exclude.append(creditor)
                got += [BlockRef(creditor, b) for b in ids]
            if len(got) >= at_least:
                break
        if len(got) < at_least:               # all or nothing (see _borrow_ahead)
            self._give_back(got)
            return False
        if got:
            with self.lock:
                self.engine.rm.add_borrowed(got)
            self.num_blocks_borrowed_total += len(got)
        return len(got) >= at_least

    def _give_back(self, refs: list[BlockRef]) -> None:
        by_creditor: dict[int, list[int]] = {}
        for ref in refs:
            by_creditor.setdefault(ref.instance, []).append(ref.block)
        for creditor, ids in by_creditor.items():
            self._release(creditor, ids)

    def _release(self, creditor: int, ids: list[int]) -> None:
        self.peers[creditor].reclaim.remote(self.id, ids)

    def _release_idle_spares(self) -> None:
        with self.lock:
            if self.engine.rm.num_spare:
                self.engine.rm.release_spares(keep=0)

    # ---- lending (creditor side) ---------------------------------------------------------
    @ray.method(concurrency_group=CONTROL_GROUP)
    def lend(self, debtor: int, n: int) -> list[int]:
        if self.draining:
            return []
        with self.lock:
            ids = self.engine.rm.lend(debtor, n)
        self._beat_now()
        return ids

    @ray.method(concurrency_group=CONTROL_GROUP)
    def reclaim(self, debtor: int, ids: list[int]) -> None:
        with self.lock:
            self.engine.rm.reclaim(debtor, ids)
            self.partial_steps.books_changed()
        self._beat_now()

    def _beat_now(self) -> None:
        """The books changed: tell the ledger now rather than at the next periodic beat."""
        self._tell_controller("heartbeat", self.heartbeat())

    def serve_transport(self, src: int, meta: dict, tensors: list[torch.Tensor]):
        """A debtor's attention micro-task over blocks this instance holds for it; or, when
        replicas leave, KV blocks moving between instances (see actors/handoff.py). The serving
        thread hands back its OpenMP team when it falls idle (actors/transport.py)."""
        if meta.get("op") in ("kv_read", "kv_stage"):
            return self.serve_kv(src, meta, tensors)
        if meta.get("op") != "attn":
            raise ValueError(f"unknown op {meta.get('op')!r}")
        self._maybe_fault("serve_attention")
        t0 = time.perf_counter()
        if len(tensors) not in (3, 7):
            raise ValueError(f"an attention call carries q, k, v and, for a step's first layer, "
                             f"its slots, tables, kv_lens and cu_seqlens: 3 or 7 tensors, got "
                             f"{len(tensors)}")
        e = self.engine
        q, k, v, *described = tensors
        out, lse = serve_partial(e.rm, e.kv, src, int(meta["layer"]), q, k, v,
                                 *(described or [None] * 4), bool(meta.get("decode")), e.scale,
                                 e.backend, self.partial_steps, meta.get("step"))
        self.num_remote_partials_served += 1
        self.serve_seconds += time.perf_counter() - t0
        return {}, [out, lse]

    # ---- prefix reuse across instances ----------------------------------------------------
    def _publish_prefix(self) -> None:
        """Tell the fabric-wide prefix index what this instance cached and evicted since the
        last batch (its whole cache after a refused or lost batch: a restarted controller).
        Never on the token path, and never blocking the heartbeat: at most one batch is in
        flight, and its answer is read at a later beat."""
        if self._prefix_pending is not None:
            ref, gen, sent_at = self._prefix_pending
            ready, _ = ray.wait([ref], timeout=0)
            if not ready and time.monotonic() - sent_at < CONTROL_TIMEOUT_S:
                return                          # still in flight: events keep accumulating
            self._prefix_pending = None
            try:
                ok = bool(ready) and ray.get(ref, timeout=0) is True
            except Exception:
                ok = False
            if ok:
                self._prefix_gen, self._prefix_snapshot = gen, False
            else:
                self._prefix_snapshot = True
        with self.lock:
            cache = self.engine.rm.cache
            if not cache.enabled:
                return
            events = cache.take_events()
            if self._prefix_snapshot:
                base, added, removed = None, cache.snapshot(), []
            else:
                net = dict((h, add) for add, h in events)       # the last event of a hash wins
                base = self._prefix_gen
                added = [h for h, add in net.items() if add]
                removed = [h for h, add in net.items() if not add]
        if base is not None and not added and not removed:
            self._prefix_quiet += 1
            if self._prefix_quiet < PREFIX_QUIET_BEATS:
                return
        self._prefix_quiet = 0
        gen = self._prefix_gen + 1
        try:
            ref = self.controller.prefix_events.remote(self.id, gen, base, added, removed)
            self._prefix_pending = (ref, gen, time.monotonic())
        except Exception:
            self._prefix_snapshot = True

    def _reuse_remote_prefix(self, prompt: list[int], params: SamplingParams, source) -> tuple | None:
        """The router says instance `source[0]` caches `source[1]` leading blocks of `prompt`,
        more than this one. Lease them (attend there), copy them here, or recompute, by
        measured cost (`prefix_cache.remote`). Returns a lease for the request, or None."""
        holder, nblocks = int(source[0]), int(source[1])
        cfg, rm, engine = self.cfg.prefix_cache, self.engine.rm, self.engine
        if holder == self.id or holder >= len(self.peers) or holder in self.dead_peers \
                or engine.scheduler.salt is None:
            return None
        hashes = prompt_hashes(prompt, rm.block_size, engine.scheduler.salt)[:nblocks]
        with self.lock:
            local = len(rm.cache.lookup(hashes))
            need = rm.blocks_for(len(prompt) + params.max_new_tokens) - local
            room = rm.num_free - engine.scheduler.num_committed() >= need
        extra = len(hashes) - local
        if extra < cfg.min_remote_blocks:
            return None
        how = cfg.remote if cfg.remote != "auto" else engine.reuse_costs.choose(
            extra * rm.block_size, extra * engine.kv.bytes_per_block, params.max_new_tokens, room)
        if how == "recompute":
            self.remote_prefix["recompute"] += 1
            return None
        t0 = time.perf_counter()
        try:
            pinned = ray.get(self.peers[holder].pin_prefix.remote(self.id, hashes[local:]),
                             timeout=CONTROL_TIMEOUT_S)
        except Exception:
            return None
        engine.reuse_costs.observe_call(time.perf_counter() - t0)
        if not pinned:
            return None
        if how == "lease":
            self.remote_prefix["lease"] += 1
            self.remote_prefix["blocks_leased"] += len(pinned)
            return (holder, local, pinned)
        try:
            self._copy_cached(holder, hashes[local:local + len(pinned)], pinned)
        finally:
            self._unpin_remote(holder, pinned)
        return None

    def _copy_cached(self, holder: int, hashes: list[bytes], pinned: list[int]) -> None:
        """Copy the KV of `pinned` blocks of `holder`'s cache into this pool (cached here,
        evictable) over the data plane."""
        rm = self.engine.rm
        with self.lock:
            blocks = rm.import_cached(len(pinned))
        if not blocks:
            return
        written: list[bytes] = []
        t0 = time.perf_counter()
        try:
            k, v = self._read_lent_from(holder, pinned)
            with self.lock:
                self.engine.kv.write_blocks(blocks, k, v)
            written = hashes
        except Exception:
            log.warning("instance %d: copying cached prefix blocks from %d failed", self.id,
                        holder, exc_info=True)
        finally:
            with self.lock:
                rm.finish_import(written, blocks)
        if written:
            self.engine.reuse_costs.observe_copy(len(blocks) * self.engine.kv.bytes_per_block,
                                                 time.perf_counter() - t0)
            self.remote_prefix["copy"] += 1
            self.remote_prefix["blocks_copied"] += len(blocks)

    def _unpin_remote(self, holder: int, blocks: list[int]) -> None:
        if holder < len(self.peers) and holder not in self.dead_peers:
            try:
                self.peers[holder].unpin_prefix.remote(self.id, list(blocks))
            except Exception:
                pass

    def _drop_lease(self, lease) -> None:
        if lease is not None:
            self._unpin_remote(lease[0], lease[2])

    # ---- KV tiers ----------------------------------------------------------------------------
    def _plan_tier_load(self, req_id: str, prompt: list[int]) -> None:
        """Prompt blocks that the node's tiers hold past the pool's cached prefix: plan to
        bring them up, or to compute them, as `tiers.prefill` and the measured speeds choose
        (fabric/tiers.py). The scheduler starts the load at admission, with room. The plan
        covers the pool's cached blocks too: by admission the pool may have evicted them
        (down to the tiers); the loader stops at the first block it does not find."""
        eng, cfg, bs = self.engine, self.cfg.tiers, self.engine.rm.block_size
        hashes = prompt_hashes(prompt, bs, eng.scheduler.salt)
        with self.lock:
            k = len(eng.rm.cache.lookup(hashes))
        want = max(1, cfg.min_load_blocks)
        below = self.tiers.lookup(hashes[k:]) if len(hashes) - k >= want else []
        if len(below) < want and k < want:
            return
        tiers, per_token = below or ["host"] * k, eng.reuse_costs.est["prefill_s_per_token"]
        costs = self.tiers.costs
        mode = costs.choose(cfg.prefill, tiers, bs, per_token)
        self.waiting_loads[req_id] = (0, hashes[: k + len(below)], mode,
                                      costs.head_share(tiers, bs, per_token),
                                      costs.parallel_s(tiers, bs, per_token))

    @ray.method(concurrency_group=CONTROL_GROUP)
    def tier_stats(self) -> dict:
        """This instance's side of the tiers (its node's store has the rest)."""
        if self.tiers is None:
            return {"enabled": False}
        return {"enabled": True, **self.tiers.counters, **self.engine.scheduler.tiers,
                "load_s_per_block": dict(self.tiers.costs.load_s_per_block),
                "compute_or_load_overlap": self.tiers.costs.overlap,
                "compute_or_load_runs": self.tiers.costs.overlap_runs}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def pin_prefix(self, reader: int, hashes: list[bytes]) -> list[int]:
        """Pin the longest cached prefix of `hashes` for `reader` (read-only: it attends over
        them here, or copies them); returns the block ids."""
        if self.draining or self.stopped:
            return []
        with self.lock:
            return self.engine.rm.pin(reader, hashes)

    @ray.method(concurrency_group=CONTROL_GROUP)
    def unpin_prefix(self, reader: int, blocks: list[int]) -> None:
        with self.lock:
            try:
                self.engine.rm.unpin(reader, blocks)
            except ValueError:     # dropped already (the reader was declared dead)
                log.warning("instance %d: stray unpin from %d", self.id, reader)
            self.partial_steps.books_changed()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def reset_prefix_cache(self) -> int:
        """Evict every cached block no request uses; returns how many."""
        with self.lock:
            return self.engine.reset_prefix_cache()

    def prefix_stats(self) -> dict:
        return self.engine.prefix_stats() | {"remote": dict(self.remote_prefix),
                                             "reuse_costs": dict(self.engine.reuse_costs.est)}

    # ---- books for the controller and stats ------------------------------------------------
    def _heartbeats(self) -> None:
        last = time.perf_counter()
        while not self.stopped and self.unhealthy is None:   # unhealthy: fall silent
            try:
                self.controller.heartbeat.remote(self.heartbeat())
                now = time.perf_counter()
                self._refresh_metrics(now - last)
                last = now
            except Exception:
                pass
            self._publish_prefix()
            time.sleep(self.cfg.lending.heartbeat_s)

    def _refresh_metrics(self, seconds: float) -> None:
        rm, sched = self.engine.rm, self.engine.scheduler
        self.metrics.refresh(total=rm.num_blocks, free=rm.num_free, lent=rm.num_lent,
                             borrowed=rm.num_borrowed, waiting=len(sched.waiting),
                             running=len(sched.running), generated=self.engine.num_generated,
                             borrow_events=rm.num_borrow_events, seconds=seconds,
                             prefix={k: self.engine.scheduler.prefix[k] for k in ("queries", "hits")})

    def heartbeat(self) -> dict:
        with self.lock:
            rm = self.engine.rm
            self._hb_seq += 1
            return Heartbeat(instance_id=self.id, node=ray.get_runtime_context().get_node_id(),
                             blocks_total=rm.num_blocks, blocks_free=rm.num_free,
                             blocks_lent=rm.num_lent, blocks_borrowed=rm.num_borrowed,
                             lend_cap=0 if self.draining else rm.lend_cap, load=float(self.engine.scheduler.num_unfinished),
                             num_waiting=len(self.engine.scheduler.waiting),
                             creditors=rm.creditors(), debtors=rm.debtors(), seq=self._hb_seq).to_dict()

    @ray.method(concurrency_group=CONTROL_GROUP)
    def stats(self) -> dict:
        with self.lock:
            rm = self.engine.rm
            rm.check_integrity()
            return {"id": self.id, "node": ray.get_runtime_context().get_node_id(),
                    "blocks_total": rm.num_blocks, "blocks_free": rm.num_free,
                    "blocks_lent": rm.num_lent, "blocks_borrowed": rm.num_borrowed,
                    "num_running": len(self.engine.scheduler.running),
                    "num_waiting": len(self.engine.scheduler.waiting),
                    "num_generated": self.engine.num_generated, "num_steps": self.engine.num_steps,
                    "borrow_events": rm.num_borrow_events,
                    "blocks_borrowed_total": self.num_blocks_borrowed_total,
                    "controller_calls": self.num_controller_calls,
                    "remote_partials_served": self.num_remote_partials_served,
                    "recoveries": self.num_recoveries, "dead_peers": sorted(self.dead_peers),
                    "loop_faults": self.num_loop_faults, "unhealthy": self.unhealthy,
                    "serve_seconds": self.serve_seconds, "prefix_cache": self.prefix_stats(),
                    "tiers": self.tier_stats(),
                    "remote_wait_seconds": getattr(self.engine.remote, "wait_seconds", 0.0),
                    "transport": self.transport.stats() if self.transport else {}}

    @ray.method(concurrency_group=CONTROL_GROUP)
    def shutdown(self) -> None:
        self.stopped = True
        self.lifetime.set()
        self.wake.set()
        if self.tiers is not None:
            self.tiers.stop()
        if self.transport is not None:
            self.transport.close()


class TransportPartials:
    """`RemotePartials` over the fabric's transport: one batched call per creditor per layer,
    sent before the home computes its own partial and collected after it. A step's shard (block
    tables, lengths, write slots) goes to each creditor once, with its first layer, under a step
    id; later layers carry only q and the new k/v. The books lock is let go while the replies
    are awaited, so control calls never wait on the network (see `InstanceActor._loop_once`)."""

    def __init__(self, transport, books_lock=None):
        self.transport, self.books_lock = transport, books_lock
        self.wait_seconds = 0.0
        self._ids = itertools.count(1)
        self._described: dict[int, tuple[object, int]] = {}    # creditor -> (shard, step id)

    def submit(self, layer: int, jobs: dict[int, PartialJob]) -> "_Partials":
        calls = []
        for inst, job in jobs.items():
            shard, tensors = job.shard, [job.q, job.k_new, job.v_new]
            described = self._described.get(inst)
            if described is None or described[0] is not shard:    # a new step's first layer
                described = self._described[inst] = (shard, next(self._ids))
                tensors += [shard.write_slots, shard.block_tables, shard.kv_lens, shard.cu_seqlens]
            calls.append((inst, {"op": "attn", "layer": layer, "step": described[1],
                                 "decode": shard.is_decode}, tensors))
        return _Partials(self, list(jobs), self.transport.start_many(calls))


class _Partials:
    def __init__(self, owner: TransportPartials, insts: list[int], pending):
        self.owner, self.insts, self.pending = owner, insts, pending

    def result(self) -> dict:
        t0 = time.perf_counter()
        try:
            with _let_go(self.owner.books_lock):
                replies = self.pending.result()
        except Exception:
            for i in self.insts:          # what they kept is unknown: describe the step again
                self.owner._described.pop(i, None)
            raise
        self.owner.wait_seconds += time.perf_counter() - t0
        return {i: tuple(r[1]) for i, r in zip(self.insts, replies)}


@contextlib.contextmanager
def _let_go(lock):
    """Release `lock` (an RLock, however deep this thread holds it) for the duration, if this
    thread holds it; as `threading.Condition.wait` does, with the same RLock methods."""
    if lock is None or not lock._is_owned():
        yield
        return
    state = lock._release_save()
    try:
        yield
    finally:
        lock._acquire_restore(state)
