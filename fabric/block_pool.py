"""Physical KV block ids of one instance: a free list, no tensors, no torch."""

from __future__ import annotations


class BlockPool:
    """Hands out block ids 0..num_blocks-1. `allocate` takes all or nothing."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._free = list(range(num_blocks - 1, -1, -1))   # pop() gives low ids first
        self._is_free = [True] * num_blocks

    @property
    def num_free(self) -> int:
        return len(self._free)

    def is_free(self, block: int) -> bool:
        return self._is_free[block]

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def allocate(self, n: int) -> list[int]:
        if not self.can_allocate(n):
            raise MemoryError(f"asked for {n} blocks, {len(self._free)} free")
        ids = [self._free.pop() for _ in range(n)]
        for i in ids:
            self._is_free[i] = False
        return ids

    def free(self, ids: list[int]) -> None:
        for i in ids:
            if self._is_free[i]:
                raise ValueError(f"block {i} freed twice")
            self._is_free[i] = True
            self._free.append(i)

    def check_integrity(self) -> None:
        assert len(set(self._free)) == len(self._free), "duplicate ids in the free list"
        assert sum(self._is_free) == len(self._free), "free flags disagree with the free list"
