"""Handing requests and KV blocks between instances, for elastic scale-down.

A leaving instance (`drain`) stops lending and admitting, exports each of its requests (tokens,
sampling state, timings, and the KV of every computed token, its own blocks and those it
borrowed, read from its creditors over the data plane), sends the KV to a remaining instance
over the data plane, and that instance `adopt`s the request: it writes the KV into free blocks of its own and
continues the request from where it was. Only when the target has no room for the KV is the
request recomputed from its tokens (same tokens for greedy and seeded sampling). The leaving
instance keeps the caller's request open and forwards what the new home produces, so every
request is answered exactly once, by the call that submitted it.

Blocks a leaving instance lent to others are moved back to their debtors (`relocate_from`).
Mixed into `InstanceActor`; uses its engine, lock, waiters and peers. The engine does the books
(`Engine.export`, `adopt`, `handed_off`, `plan_relocation`, `relocate`); this side moves the
data over the network and calls it under the instance's locks.
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time

import ray
import torch

from actors.waiters import Waiter
from fabric.engine import fresh_state
from fabric.errors import FabricError
from fabric.messages import CONTROL_TIMEOUT_S
from fabric.sequence import SamplingParams
from fabric.threads import beside_engine

STAGED_KV_TTL_S = 300.0   # KV staged for an adopt that never comes is dropped after this

log = logging.getLogger(__name__)


class HandoffMixin:
    # ---- the leaving side ----------------------------------------------------------------
    @beside_engine
    def drain(self, targets: list[tuple[int, object]]) -> dict:
        """Leave the fabric: hand every request to `targets` ([(id, handle)]), give borrowed
        blocks back, and have debtors move blocks lent to them off this instance."""
        t0 = time.perf_counter()
        self.handoff_targets, self.target_free = list(targets), []
        with self.inbox_lock:                       # from now on _enqueue hands requests on
            self.draining = True
        self._beat_now()                            # lend_cap 0: the ledger proposes it no more
        if not self.pause():
            raise FabricError(f"instance {self.id} did not stop stepping: drain called off")
        report = {"moved": 0, "recomputed": 0, "fresh": 0, "kv_blocks_moved": 0,
                  "kv_bytes_moved": 0, "lent_blocks_relocated": 0, "lent_blocks_returned": 0,
                  "debtor_requests_recomputed": 0}
        report["fresh"] += self._hand_on_inbox()
        with self.step_lock:        # no abort meanwhile; the books lock only to read the books
            with self.lock:
                states = self.engine.export()
            exports = [(state, *self.engine.read_kv(state["blocks"], self._read_lent_from))
                       for state in states]
        for state, k, v in exports:
            if state["id"] not in self.engine.seqs:      # aborted meanwhile
                continue
            w = self.waiters.get(state["id"])
            info = self._handoff(state, k, v, w)
            with self.lock:
                self.engine.handed_off(state["id"])
            report["moved" if info["moved_blocks"] else "recomputed" if info["recomputed"]
                   else "fresh"] += 1
            report["kv_blocks_moved"] += info["moved_blocks"]
            report["kv_bytes_moved"] += info["moved_blocks"] * self.engine.kv.bytes_per_block
        report["fresh"] += self._hand_on_inbox()        # raced in before `draining` was seen
        with self.lock:
            self.engine.rm.release_spares(keep=0)
            # debtors, and readers of this cache's blocks (their requests recompute them)
            debtors = sorted(set(self.engine.rm.debtors()) | set(self.engine.rm.leases))
        for d in debtors:
            r = ray.get(self.peers[d].relocate_from.remote(self.id), timeout=CONTROL_TIMEOUT_S)
            report["lent_blocks_relocated"] += r["moved"]
            report["lent_blocks_returned"] += r["returned"]
            report["debtor_requests_recomputed"] += r["preempted"]
        with self.lock:
            rm = self.engine.rm
            report["lent_left"], report["borrowed_left"] = rm.num_lent, rm.num_borrowed
        report["seconds"] = time.perf_counter() - t0
        return report

    def _hand_on_inbox(self) -> int:
        """Requests never admitted here go to a remaining instance as new ones. On a failure the
        request goes back to the inbox (the drain is then called off and this one serves it)."""
        n = 0
        while True:
            try:
                item = self.inbox.get_nowait()
            except queue.Empty:
                return n
            req_id, prompt, params, arrival, _ = item     # the new home fetches its own
            w = self.waiters.get(req_id)
            if w is None or req_id in self.cancelled:
                self._let_go_of_plans(req_id)
                continue
            try:
                self._handoff(fresh_state(req_id, prompt, params, arrival), None, None, w)
            except Exception:
                self.inbox.put(item)
                raise
            self._let_go_of_plans(req_id)          # the new home makes its own
            n += 1

    def _let_go_of_plans(self, req_id: str) -> None:
        """A request that leaves before admission unpins the prefix it leased elsewhere and
        forgets its tier plan (a plan holds no blocks)."""
        self._drop_lease(self.waiting_leases.pop(req_id, None))
        self.waiting_loads.pop(req_id, None)

    def cancel_drain(self) -> None:
        """A scale-down was called off: serve (and lend) again."""
        with self.inbox_lock:
            self.draining = False
        self.resume()

    def retire(self) -> dict:
        """After `drain` and leaving the data plane: stop, and free the model and KV memory.
        The actor lives on only while it forwards results of requests it handed off."""
        self.stopped = True
        self.lifetime.set()
        self.wake.set()
        with self.step_lock, self.lock:
            left = len(self.engine.seqs)
            self.engine.model = None
            self.engine.kv = None
        gc.collect()
        return {"requests_left": left, "forwarding": len(self.handed_to)}

    @ray.method(concurrency_group="control")
    def forwarding(self) -> int:
        """Requests whose caller still waits here (handed on or being handed on)."""
        return len(self.waiters)

    def _read_lent_from(self, creditor: int, ids: list[int]):
        """Blocks `creditor` holds for this instance, over the data plane (in messages of at
        most `transport.max_message_bytes`)."""
        parts = [self.transport.call(creditor, {"op": "kv_read"}, [torch.tensor(chunk)])[1]
                 for chunk in _chunks(ids, self._blocks_per_message())]
        return torch.cat([k for k, _ in parts], dim=1), torch.cat([v for _, v in parts], dim=1)

    def _blocks_per_message(self) -> int:
        """KV blocks that fit in one data-plane message (k and v, all layers, with room for the
        envelope)."""
        room = self.transport.max_message_bytes - 4096
        return max(1, room // self.engine.kv.bytes_per_block)

    def serve_kv(self, src: int, meta: dict, tensors: list):
        """Data-plane side of a handoff: `kv_read` returns blocks lent to `src`; `kv_stage`
        keeps a request's KV until `src` asks this instance to `adopt` the request."""
        if meta["op"] == "kv_read":
            return {}, list(self.engine.read_for(src, tensors[0].tolist()))
        k, v = tensors                          # blocks [first, first + n) of the request's KV
        staged = self.__dict__.setdefault("staged_kv", {})
        now = time.monotonic()
        for req in [r for r, entry in staged.items() if now - entry["at"] > STAGED_KV_TTL_S]:
            del staged[req]                     # its adopt never came: free the memory
        entry = staged.setdefault(str(meta["req"]), {"parts": {}, "total": int(meta["total"])})
        entry["parts"][int(meta["first"])] = (k, v)
        entry["at"] = now
        return {}, []

    def _pick_target(self, num_blocks: int) -> int:
        """The remaining instance with the most free blocks (KV moves rather than recomputes).
        Their free blocks are asked once per drain, then counted down as requests move."""
        if not self.target_free:
            reports = ray.get([h.load_report.remote() for _, h in self.handoff_targets],
                              timeout=CONTROL_TIMEOUT_S)
            self.target_free = [r["free_blocks"] for r in reports]
        free = self.target_free
        return max(range(len(free)), key=lambda i: (free[i] >= num_blocks, free[i], -i))

    def _handoff(self, state: dict, k, v, w) -> dict:
        """Send the KV over the data plane, then have the target adopt the request (a Ray call:
        a streaming generator that carries its tokens back)."""
        i = self._pick_target(0 if k is None else k.shape[1])
        rank, target = self.handoff_targets[i]
        if k is not None:
            step, total = self._blocks_per_message(), k.shape[1]
            for first in range(0, total, step):
                self.transport.call(rank, {"op": "kv_stage", "req": state["id"], "first": first,
                                           "total": total},
                                    [k[:, first:first + step], v[:, first:first + step]])
            state = state | {"staged": True}
        gen = target.adopt.options(num_returns="streaming").remote(state, None, None)
        info = ray.get(next(gen), timeout=CONTROL_TIMEOUT_S)
        self.target_free[i] -= info["moved_blocks"]
        if w is not None:
            self.handed_to[state["id"]] = target      # forwarding until its result is passed on
            self._forwarder().put((state["id"], w, gen))
        return info

    def _forwarder(self) -> queue.Queue:
        """The one thread that passes handed-off requests' tokens and results on to their
        callers (however many requests are handed off)."""
        if "_forward_queue" not in self.__dict__:
            self._forward_queue = queue.Queue()
            threading.Thread(target=self._forward_all, name="forwarder", daemon=True).start()
        return self._forward_queue

    def _forward_all(self) -> None:
        live: dict = {}                         # generator -> (request id, waiter)
        while True:
            try:
                self._forward_round(live)
            except Exception:                   # never end: callers wait on this thread
                log.exception("instance %s: forwarding round failed", self.id)
                time.sleep(0.1)

    def _forward_round(self, live: dict) -> None:
        """Take newly handed-off requests (wait for one when none is live), then pass on what
        the ready ones have produced."""
        block = not live
        try:
            while True:
                req_id, w, gen = self._forward_queue.get(block=block)
                live[gen] = (req_id, w)
                block = False
        except queue.Empty:
            pass
        ready, _ = ray.wait(list(live), num_returns=1, timeout=0.05)
        for gen in ready:
            req_id, w = live[gen]
            if self._forward_one(req_id, w, gen):
                del live[gen]
                self.waiters.pop(req_id, None)
                self.handed_to.pop(req_id, None)

    def _forward_one(self, req_id: str, w, gen) -> bool:
        """Pass on the next item of `gen`; True once the request has ended."""
        try:
            item = ray.get(next(gen), timeout=CONTROL_TIMEOUT_S)
        except StopIteration:
            w.done(id=req_id, error=f"request {req_id} ended without a result", error_type="FabricError")
            return True
        except Exception as e:
            w.done(id=req_id, error=f"handoff of request {req_id} failed: {e!r}",
                   error_type="FabricError")
            return True
        if isinstance(item, dict):
            w.done(**item)
            return True
        if w.tokens is not None:
            w.tokens.put(item)
        return False

    def _forward_fresh(self, r: dict, w):
        """A request that reached this instance after it started leaving: run it elsewhere."""
        try:
            params = SamplingParams.from_request(r)
            self.waiters[r["id"]] = w
            self._handoff(fresh_state(r["id"], r["prompt"], params, w.arrival), None, None, w)
        except Exception as e:
            self.waiters.pop(r["id"], None)
            w.done(id=r["id"], error=f"could not hand request {r['id']} on: {e!r}",
                   error_type="FabricError")
        return w

    # ---- the receiving side --------------------------------------------------------------
    def adopt(self, state: dict, k, v):
        """Take over a request (a streaming generator): first {"moved_blocks", "recomputed"},
        then each new token id, then the final result dict."""
        w = Waiter(stream=True)
        try:
            info = self._adopt(state, k, v, w)
        except FabricError as e:
            info = {"moved_blocks": 0, "recomputed": False}
            w.done(id=state["id"], error=str(e), error_type=type(e).__name__)
        self.wake.set()
        yield info
        while (tok := w.tokens.get()) is not None:
            yield tok
        yield w.slot

    @beside_engine
    def _adopt(self, state: dict, k, v, w) -> dict:
        if state.get("staged"):
            k, v = _assemble(self.__dict__.get("staged_kv", {}).pop(state["id"], None))
        if self.draining or self.stopped:
            raise FabricError(f"instance {self.id} is leaving: it adopts no request")
        with self.lock:
            if state["id"] in self.waiters:
                raise FabricError(f"request {state['id']!r} is already running here")
            info = self.engine.adopt(state, k, v)
            self.waiters[state["id"]] = w
        return info

    # ---- creditors and debtors -------------------------------------------------------------
    @beside_engine
    def relocate_from(self, creditor: int) -> dict:
        """`creditor` is leaving: copy every block of ours it holds into free blocks here (a
        request that does not fit is recomputed later) and give its blocks back. Returns the
        blocks moved, the spare (unused) ones returned, and the requests preempted."""
        was_paused = self.paused.is_set()
        if not was_paused:
            self.pause()
        moved = returned = preempted = 0
        try:
            # No step and no abort meanwhile (`step_lock`); the books lock is let go while KV is
            # read from the creditor, so each move is checked again before it is applied.
            with self.step_lock:
                with self.lock:
                    moves, preempted = self.engine.plan_relocation(creditor)
                    for req_id, lease in list(self.waiting_leases.items()):
                        if lease[0] == creditor:     # not admitted yet: recomputed instead
                            self._drop_lease(self.waiting_leases.pop(req_id))
                for move in moves:              # (seq, table positions, block ids there)
                    old = move[2]
                    k, v = self._read_lent_from(creditor, old)
                    with self.lock:
                        done = self.engine.relocate(creditor, move, k, v)
                        if done == "moved":
                            self._release(creditor, old)
                            moved += len(old)
                        elif done == "preempted":
                            preempted += 1
                with self.lock:
                    spare = self.engine.rm.drop_spares(creditor)
                    if spare:
                        self._release(creditor, spare)
                    returned = len(spare)
        finally:
            if not was_paused:
                self.resume()
        self._beat_now()
        return {"moved": moved, "returned": returned, "preempted": preempted}

    # ---- reports for the elastic manager -------------------------------------------------
    @ray.method(concurrency_group="control")
    def load_report(self) -> dict:
        """Load for the autoscaling policy and for placing handed-off requests."""
        now = time.monotonic()
        recent = sorted(t for at, t in self.recent_ttft if now - at < 30.0)
        with self.lock:
            rm = self.engine.rm
            largest = max((rm.blocks_for(s.max_tokens) for s in self.engine.seqs.values()), default=0)
            return {"id": self.id, "ongoing": max(0, len(self.waiters) - len(self.handed_to)),
                    "kv_utilization": 1.0 - rm.num_free / rm.num_blocks,
                    "free_blocks": rm.num_free,
                    "ttft_p90_s": recent[int(0.9 * (len(recent) - 1))] if recent else None,
                    "largest_request_blocks": largest, "draining": self.draining}

    @ray.method(concurrency_group="control")
    def expert_load(self) -> list[list[int]]:
        """Tokens routed to each expert so far, as [layer, expert, tokens] rows."""
        rows = []
        for layer, block in enumerate(self.engine.model.model.layers):
            moe = getattr(block, "block_sparse_moe", None)
            if moe is not None:
                rows += [[layer, e, int(n)] for e, n in enumerate(moe.tokens_per_expert.tolist())]
        return rows

    @ray.method(concurrency_group="control")
    def weights_report(self) -> dict:
        model = self.engine.model
        return dict(self.weights, linear_kernel=model.linear_kernel, packed_bytes=model.packed_bytes)

    def touch_weights(self) -> float:
        """Touch every page of the weights once (as a first forward pass does); returns the
        seconds. A lazily read checkpoint pays its disk reads here, mapped weights their page
        faults (none when `map_weights` pre-faulted them)."""
        t0 = time.perf_counter()
        with torch.no_grad():
            for p in self.engine.model.parameters():
                flat = p.detach().reshape(-1)
                flat[:: max(1, 4096 // flat.element_size())].sum()   # one element per page
        return time.perf_counter() - t0


def _chunks(items: list, n: int) -> list[list]:
    return [items[i:i + n] for i in range(0, len(items), n)]


def _assemble(entry: dict | None):
    """A staged request's KV from its parts, in block order; (None, None) when any is missing
    (the request is then recomputed, never served with holes)."""
    if entry is None:
        return None, None
    parts = [entry["parts"][first] for first in sorted(entry["parts"])]
    k = torch.cat([p[0] for p in parts], dim=1)
    v = torch.cat([p[1] for p in parts], dim=1)
    if k.shape[1] != entry["total"]:
        return None, None
    return k, v
