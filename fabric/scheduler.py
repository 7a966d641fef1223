"""Continuous batching with chunked prefill: every step, running requests go first (decode or
the next prefill chunk), then waiting ones join while the token budget and memory allow.

When memory runs out, the most recently admitted request is preempted: its blocks are freed and
it is recomputed from its tokens later (never lost, never an out-of-memory crash).
"""

from __future__ import annotations

from collections import deque

from fabric.rmanager import RManager
from fabric.sequence import Sequence


class Scheduler:
    def __init__(self, rmanager: RManager, max_num_seqs: int, max_batch_tokens: int):
        self.rm = rmanager
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

    def num_blocks_wanted(self) -> int:
        """Blocks the next `schedule()` would allocate: the shortfall to borrow ahead of time."""
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
            if not self.rm.allocate(seq.req_id, seq.num_computed + n):
                break
            self.waiting.popleft()
            self.running.append(seq)
            batch.append((seq, n))
            budget -= n
        return batch

    def _allocate_or_preempt(self, seq: Sequence, n: int, batch) -> bool:
        scheduled = {s for s, _ in batch}
        while not self.rm.allocate(seq.req_id, seq.num_computed + n):
            victims = [s for s in self.running if s is not seq and s not in scheduled]
            victim = victims[-1] if victims else seq
            self._preempt(victim)
            if victim is seq:
                return False
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.rm.free(seq.req_id)
        seq.num_computed = 0
        seq.num_preemptions += 1
        self.waiting.appendleft(seq)
