"""Continuous batching with chunked prefill: every step, running requests go first (decode or
the next prefill chunk), then waiting ones join while the token budget and memory allow.

When memory runs out, the most recently admitted request is preempted: its blocks are freed and
it is recomputed from its tokens later (never lost, never an out-of-memory crash).

Prefix caching: a request admitted with no KV starts from the longest cached prefix of its
tokens (and, when its home leased one, from blocks of another instance's cache), so chunked
prefill starts at the first uncached token. Blocks after it that a lower tier holds come up
at admission (fabric/tiers.py): the prefill waits for them (load) or computes from the head
until it meets the loader coming from the tail (compute-or-load). Requests that share a prefix are scheduled for
sharing: while a running request computes prompt blocks a waiting one would need next, the
waiting one is held back (others go first), then reuses them instead of computing them again.
"""

from __future__ import annotations

import queue
import time
from collections import deque

from fabric.prefix_cache import extend_hashes
from fabric.rmanager import RManager
from fabric.sequence import Sequence
from fabric.tiers import TierLoad

SHARING_SCAN = 64     # waiting requests looked at per step past ones held back for sharing


class Scheduler:
    def __init__(self, rmanager: RManager, max_num_seqs: int, max_batch_tokens: int,
                 memory_wait_s: float = 0.0, reserve_on_admit: bool = False):
        self.rm = rmanager
        # Admit a request only when its whole length (prompt + max_new_tokens) fits in what this
        # instance holds or borrowed, net of what running requests will still need: with lending,
        # long requests then wait their turn instead of stalling or preempting each other.
        self.reserve_on_admit = reserve_on_admit
        self.memory_wait_s = memory_wait_s   # > 0 when memory may come by borrowing: stall first
        self.max_num_seqs = max_num_seqs
        self.max_batch_tokens = max_batch_tokens
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.salt: bytes | None = None        # set by the engine when prefix caching is on
        self.inflight: dict[bytes, int] = {}  # prompt block hash -> running requests computing it
        self.prefix = {"queries": 0, "hits": 0, "leased_hits": 0}   # tokens, first admissions
        self.unlease_fn = None                # (holder, blocks): a lease that is not used
        self.session_ttl_s = 0.0              # a session turn's TTL when it names none
        # blocks of tier loads the loader let go of (it writes them no more): freed next step
        self.load_returns: queue.SimpleQueue = queue.SimpleQueue()
        self.tiers = {"loaded_tokens": 0, "computed_tokens": 0, "loads": 0, "no_room": 0}
        self.start_load = None                # (TierLoad): the host's loader brings blocks up
        self.load_met = None                  # (TierLoad): a compute-or-load met its loader
        self.min_load_blocks = 1              # fewer blocks to bring up: computed

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its blocks (finished or aborted). A finished
        turn of a session with a time-to-live keeps its cached blocks protected."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._drop_inflight(seq)
        self.drop_lease(seq)
        self._drop_load(seq)
        ttl = self.session_ttl_s if seq.params.ttl_s is None else seq.params.ttl_s
        if seq.params.session_id and ttl > 0 and seq.finish_reason in ("stop", "length"):
            self.rm.keep_session(seq.req_id, seq.params.session_id, time.monotonic() + ttl)
        else:
            self.rm.free(seq.req_id)

    def num_committed(self) -> int:
        """Blocks running requests will still allocate before they reach their maximum length."""
        return sum(self._num_to_full(s) for s in self.running)

    def _num_to_full(self, seq: Sequence) -> int:
        """Blocks `seq` will still take (those its tier load holds already are not counted)."""
        return max(0, self.rm.num_missing(seq.req_id, seq.max_tokens) -
                   self.rm.loading.get(seq.req_id, 0))

    def _can_admit(self, seq: Sequence) -> bool:
        if not self.reserve_on_admit:
            return True
        room = self.rm.num_free + self.rm.num_spare - self.num_committed()
        return self._num_to_full(seq) <= room

    def num_blocks_wanted(self) -> int:
        """Blocks this instance should hold (free or spare) for the next `schedule()`: the
        shortfall is borrowed ahead of time, outside the step."""
        if self.reserve_on_admit:
            # a cached prefix does not lower this: its evictable blocks count as free now and
            # stop counting once the head pins them
            head = self._num_to_full(self.waiting[0]) if self.waiting else 0
            return self.num_committed() + head
        budget, wanted, seqs = self.max_batch_tokens, 0, 0
        for seq in [*self.running, *self.waiting]:
            if budget <= 0 or seqs >= self.max_num_seqs:
                break
            n = min(seq.num_tokens - seq.num_computed, budget)
            wanted += self.rm.num_missing(seq.req_id, seq.num_computed + n)
            budget -= n
            seqs += 1
        return wanted

    def schedule(self) -> list[tuple[Sequence, int]]:
        """Pick this step's (sequence, number of tokens to compute); their blocks are allocated."""
        self._free_load_returns()
        budget = self.max_batch_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:          # preempted by an earlier one in this loop
                continue
            n = self._follow_load(seq, budget)
            if n == 0:
                continue
            if self._allocate_or_preempt(seq, n, batch):
                batch.append((seq, n))
                budget -= n
        held = 0
        for seq in list(self.waiting):
            if budget <= 0 or len(self.running) >= self.max_num_seqs or held > SHARING_SCAN:
                break
            fresh = seq.num_computed == 0 and not self.rm.tables.get(seq.req_id)
            if fresh and self._waits_for_sharing(seq):
                held += 1
                continue
            if fresh:
                self._attach_prefix(seq)
                if self._can_admit(seq):
                    self._start_planned_load(seq, budget)
            n = self._follow_load(seq, budget)
            loading = n == 0 and seq.tier_load is not None     # load-only: admitted, waits
            if n == 0 and not loading or not self._can_admit(seq) or \
                    not (loading or self.rm.allocate(seq.req_id, seq.num_computed + n)):
                if fresh:                      # not admitted: its cached blocks are let go
                    self._drop_load(seq)
                    self.rm.free(seq.req_id)
                    seq.num_computed = seq.num_registered = 0
                break
            self.waiting.remove(seq)
            self.running.append(seq)
            if seq.scheduled_at is None:
                seq.scheduled_at = time.perf_counter()
            if fresh:
                self._admitted_fresh(seq)
            if not loading:
                batch.append((seq, n))
                budget -= n
        return batch

    # ---- prefix caching ------------------------------------------------------------------
    def _hashes(self, seq: Sequence) -> list[bytes]:
        """The hash chain of `seq`'s full blocks it could find cached (all its tokens but the
        last: that one is computed to give logits); extended as outputs grow."""
        want = (seq.num_tokens - 1) // self.rm.block_size
        if len(seq.block_hashes) < want:          # `seq.tokens` copies: only when it grew
            extend_hashes(seq.block_hashes, seq.tokens, self.rm.block_size, self.salt,
                          upto=seq.num_tokens - 1)
        return seq.block_hashes[:want]

    def _waits_for_sharing(self, seq: Sequence) -> bool:
        """True while a running request computes the next prompt block `seq` would reuse."""
        if self.salt is None or not self.inflight:
            return False
        hashes = self._hashes(seq)
        k = len(self.rm.cache.lookup(hashes))
        return k < len(hashes) and hashes[k] in self.inflight

    def _attach_prefix(self, seq: Sequence) -> None:
        """Start `seq` from its longest cached prefix: local blocks, then leased ones."""
        if self.salt is None:
            self.drop_lease(seq)
            return
        hashes = self._hashes(seq)
        k = self.rm.attach_cached(seq.req_id, hashes)
        if seq.lease is not None:
            holder, first, blocks = seq.lease
            seq.lease = None
            if first <= k < first + len(blocks):       # contiguous with the local hit
                use = blocks[k - first:]
                if blocks[: k - first] and self.unlease_fn is not None:
                    self.unlease_fn(holder, blocks[: k - first])
                self.rm.attach_leased(seq.req_id, holder, use)
                k += len(use)
            elif self.unlease_fn is not None:
                self.unlease_fn(holder, blocks)
        seq.num_computed = k * self.rm.block_size
        seq.num_registered = k

    def _admitted_fresh(self, seq: Sequence) -> None:
        """Count a first admission (a recompute after preemption, recovery or a hand-off that
        could not move the KV is never a hit), and note the prompt blocks it will compute."""
        if not seq.prefix_counted:
            seq.prefix_counted = True
            if seq.num_preemptions == 0:
                leased = self.rm.lease_span.get(seq.req_id, (0, 0))
                seq.cached_tokens = seq.num_computed
                self.prefix["queries"] += len(seq.prompt)
                self.prefix["hits"] += seq.cached_tokens
                self.prefix["leased_hits"] += (leased[1] - leased[0]) * self.rm.block_size
        if self.salt is not None:
            seq.inflight = seq.block_hashes[seq.num_registered: len(seq.prompt) // self.rm.block_size]
            for h in seq.inflight:
                self.inflight[h] = self.inflight.get(h, 0) + 1

    def computed(self, seq: Sequence) -> None:
        """After a step: `seq`'s newly full blocks are cached (and no longer in flight)."""
        if self.salt is None:
            return
        bs = self.rm.block_size
        full = seq.num_computed // bs
        if full <= seq.num_registered:
            return
        hashes = extend_hashes(seq.block_hashes, seq.tokens, bs, self.salt, upto=full * bs)
        self.rm.register_computed(seq.req_id, hashes[:full], seq.num_registered)
        done = full - seq.num_registered
        self._drop_inflight(seq, done)
        seq.num_registered = full

    def _drop_inflight(self, seq: Sequence, n: int | None = None) -> None:
        gone, seq.inflight = (seq.inflight, []) if n is None else (seq.inflight[:n], seq.inflight[n:])
        for h in gone:
            left = self.inflight.get(h, 0) - 1
            if left > 0:
                self.inflight[h] = left
            else:
                self.inflight.pop(h, None)

    # ---- KV tiers ----------------------------------------------------------------------------
    def _start_planned_load(self, seq: Sequence, budget: int) -> None:
        """At admission: if `seq`'s prompt continues its cached prefix with blocks its host
        found in a lower tier (`seq.tier_plan`: first position, their hashes, the way chosen,
        the share to compute from the head), take pool blocks for them and start the loader.
        Without room, they are computed."""
        plan, seq.tier_plan = seq.tier_plan, None
        if plan is None or self.start_load is None:
            return
        first, hashes, mode, head_share, predicted_s = plan
        bs = self.rm.block_size
        k, end = seq.num_computed // bs, first + len(hashes)
        if not first <= k < end or end - k < self.min_load_blocks:
            return                                 # the pool holds (nearly) all of them
        after = self.rm.blocks_for(min(budget, len(seq.prompt) - end * bs))
        if end - k + after > self.rm.num_free:
            self.tiers["no_room"] += 1
            seq.tier = {**seq.tier, "tier_policy": "recompute"}
            return
        blocks = self.rm.import_cached(end - k)
        self.rm.loading[seq.req_id] = len(blocks)
        seq.tier_load = TierLoad(k, hashes[k - first:], blocks, mode, head_share,
                                 predicted_s if k == first else None)
        self.start_load(seq.tier_load)

    def _follow_load(self, seq: Sequence, budget: int) -> int:
        """Tokens `seq` may compute this step, meeting its tier load (fabric/tiers.py): the
        head up to where the two should meet (`ld.meet`), then it waits for the loader; never
        past the loader's frontier; once there, the loaded blocks join its table. A loader
        that stopped early (a block missing below) leaves the rest to compute."""
        ld = seq.tier_load
        if ld is not None:
            if not ld.ready():
                return 0
            bs, frontier = self.rm.block_size, ld.frontier
            if ld.done and frontier >= ld.end:
                self._drop_load(seq)                       # nothing came up
            elif seq.num_computed >= frontier * bs and \
                    seq.num_computed != len(self.rm.tables.get(seq.req_id, ())) * bs:
                self._drop_load(seq)                       # not where the loaded blocks go
            elif seq.num_computed >= frontier * bs:
                start = seq.num_computed // bs
                hashes, blocks, rest = ld.take(start)
                self.rm.loading.pop(seq.req_id, None)
                self.rm.adopt_loaded(seq.req_id, hashes, blocks)
                self.rm.finish_import([], rest)
                seq.tier_load = None
                seq.num_computed += len(blocks) * bs
                seq.num_registered = seq.num_computed // bs
                self._drop_inflight(seq, len(blocks))
                self._count_load(seq, ld, loaded=len(blocks), computed=start - ld.first)
                if ld.mode == "compute_or_load" and self.load_met is not None:
                    self.load_met(ld)
            elif seq.num_computed >= ld.meet * bs and not ld.done:
                return 0                    # the head is computed: the loader brings the rest
            else:           # up to where they should meet (or, the loader done, its frontier)
                stop = frontier if ld.done else min(frontier, ld.meet)
                upto = min(stop * bs, (seq.num_computed + budget) // bs * bs)   # a block edge
                return max(0, upto - seq.num_computed)
        return min(seq.num_tokens - seq.num_computed, budget)

    def _count_load(self, seq: Sequence, ld, loaded: int, computed: int) -> None:
        bs = self.rm.block_size
        seq.tier = {"tier_policy": ld.mode, "tier_loaded_tokens": loaded * bs,
                    "tier_computed_tokens": max(0, computed) * bs,
                    "tier_load_s": round(ld.seconds, 6), "tier_blocks_read": dict(ld.tiers)}
        if seq.prefix_counted and seq.num_preemptions == 0:   # else counted at admission
            seq.cached_tokens += loaded * bs
            self.prefix["hits"] += loaded * bs
        self.tiers["loads"] += 1
        self.tiers["loaded_tokens"] += loaded * bs
        self.tiers["computed_tokens"] += max(0, computed) * bs

    def _drop_load(self, seq: Sequence) -> None:
        ld, seq.tier_load = seq.tier_load, None
        if ld is not None:
            self.rm.loading.pop(seq.req_id, None)
            self.rm.finish_import([], ld.cancel())
            seq.tier = {"tier_policy": ld.mode, "tier_loaded_tokens": 0,
                        "tier_computed_tokens": 0, "tier_load_s": round(ld.seconds, 6)}

    def _free_load_returns(self) -> None:
        while True:
            try:
                blocks = self.load_returns.get_nowait()
            except queue.Empty:
                return
            self.rm.finish_import([], blocks)

    def drop_lease(self, seq: Sequence) -> None:
        if seq.lease is not None:
            holder, _, blocks = seq.lease
            seq.lease = None
            if self.unlease_fn is not None:
                self.unlease_fn(holder, blocks)

    def _allocate_or_preempt(self, seq: Sequence, n: int, batch) -> bool:
        """Allocate for `seq`'s next chunk. Short of memory, a request first stalls (skips steps)
        for up to `memory_wait_s` while the host borrows; then preemption frees memory."""
        if self.rm.allocate(seq.req_id, seq.num_computed + n):
            seq.stalled_since = None
            return True
        if self.memory_wait_s > 0:
            now = time.perf_counter()
            seq.stalled_since = seq.stalled_since or now
            if now - seq.stalled_since < self.memory_wait_s:
                return False
        scheduled = {s for s, _ in batch}
        while not self.rm.allocate(seq.req_id, seq.num_computed + n):
            victims = [s for s in self.running if s is not seq and s not in scheduled]
            victim = victims[-1] if victims else seq
            self.preempt(victim)
            if victim is seq:
                return False
        return True

    def preempt(self, seq: Sequence) -> None:
        """Free `seq`'s blocks and queue it first, to be recomputed from its tokens."""
        self.running.remove(seq)
        self._drop_inflight(seq)
        self._drop_load(seq)
        self.rm.free(seq.req_id)
        seq.num_computed = seq.num_registered = 0
        seq.num_preemptions += 1
        seq.stalled_since = None
        self.waiting.appendleft(seq)
