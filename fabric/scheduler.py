"""Continuous batching with chunked prefill: every step, running requests go first (decode or
the next prefill chunk), then waiting ones join while the token budget and memory allow.

When memory runs out, the most recently admitted request is preempted: its blocks are freed and
it is recomputed from its tokens later (never lost, never an out-of-memory crash).
"""

from __future__ import annotations

import time
from collections import deque

from fabric.rmanager import RManager
from fabric.sequence import Sequence


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

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Take `seq` out of the queues and free its blocks (finished or aborted)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.rm.free(seq.req_id)

    def num_committed(self) -> int:
        """Blocks running requests will still allocate before they reach their maximum length."""
        return sum(self._num_to_full(s) for s in self.running)

    def _num_to_full(self, seq: Sequence) -> int:
        return self.rm.num_missing(seq.req_id, seq.max_tokens)

    def _can_admit(self, seq: Sequence) -> bool:
        if not self.reserve_on_admit:
            return True
        room = self.rm.num_free + self.rm.num_spare - self.num_committed()
        return self._num_to_full(seq) <= room

    def num_blocks_wanted(self) -> int:
        """Blocks this instance should hold (free or spare) for the next `schedule()`: the
        shortfall is borrowed ahead of time, outside the step."""
        if self.reserve_on_admit:
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
        budget = self.max_batch_tokens
        batch: list[tuple[Sequence, int]] = []
        for seq in list(self.running):
            if budget == 0:
                break
            if seq not in self.running:          # preempted by an earlier one in this loop
                continue
            n = min(seq.num_tokens - seq.num_computed, budget)
            if self._allocate_or_preempt(seq, n, batch):
                batch.append((seq, n))
                budget -= n
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed, budget)
            if not self._can_admit(seq) or not self.rm.allocate(seq.req_id, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

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
        self.rm.free(seq.req_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.stalled_since = None
        self.waiting.appendleft(seq)
