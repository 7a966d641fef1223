"""Prefix caching: full KV blocks named by a hash chain, kept after their requests end.

A block's hash covers its parent's hash, its token ids and a salt naming the model, so two
blocks with the same hash hold the same KV wherever and whenever they were computed. The
hash is BLAKE2b over fixed-width integers: the same in every process and every run (never
Python's `hash`, which is salted per process).

`PrefixCache` keeps the books of one instance's cached blocks: hash -> block, and the blocks
no request uses any more (reference count 0) in least-recently-used order. Those are free
for the pool to take back (evicted) when it runs short; until then a new request whose
prompt starts with the same tokens reuses them instead of recomputing. It also records what
was added and evicted since the last heartbeat, for the fabric-wide prefix index.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict

HASH_BYTES = 16
ROOT = b"\x00" * HASH_BYTES           # the parent of a prompt's first block


def model_salt(model_cfg) -> bytes:
    """What makes KV of the same tokens differ: the checkpoint, its dtype and seed."""
    ident = f"{model_cfg.preset}|{model_cfg.path}|{model_cfg.dtype}|{model_cfg.seed}"
    return hashlib.blake2b(ident.encode(), digest_size=HASH_BYTES).digest()


def hash_block(parent: bytes, tokens, salt: bytes) -> bytes:
    h = hashlib.blake2b(parent, digest_size=HASH_BYTES, key=salt)
    h.update(struct.pack(f"<{len(tokens)}q", *tokens))
    return h.digest()


def extend_hashes(hashes: list[bytes], tokens, block_size: int, salt: bytes,
                  upto: int | None = None) -> list[bytes]:
    """Append to `hashes` the hash of every further full block of `tokens` (up to `upto`
    tokens); returns `hashes`."""
    n = len(tokens) if upto is None else min(upto, len(tokens))
    for j in range(len(hashes), n // block_size):
        parent = hashes[-1] if hashes else ROOT
        hashes.append(hash_block(parent, tokens[j * block_size:(j + 1) * block_size], salt))
    return hashes


def prompt_hashes(tokens, block_size: int, salt: bytes) -> list[bytes]:
    """Hashes of the blocks a request could find cached: its full blocks, not counting the
    last token (which is always computed, to give the logits of the first new token)."""
    return extend_hashes([], tokens, block_size, salt, upto=max(0, len(tokens) - 1))


class PrefixCache:
    """hash <-> local block id, and the evictable (unreferenced) cached blocks in LRU order."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.block_of: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()   # oldest first
        self.events: list[tuple[bool, bytes]] = []   # (added?, hash) since `take_events`
        self.num_evictions = 0

    def __len__(self) -> int:
        return len(self.block_of)

    @property
    def num_evictable(self) -> int:
        return len(self.evictable)

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """Blocks of the longest cached prefix of `hashes` (a chain: stops at the first miss)."""
        out = []
        for h in hashes:
            b = self.block_of.get(h)
            if b is None:
                break
            out.append(b)
        return out

    def register(self, h: bytes, block: int) -> bool:
        """`block` (in use, computed) now holds the KV named `h`; False when another block
        holds it already (this one then stays private and is freed as usual)."""
        if not self.enabled or h in self.block_of or block in self.hash_of:
            return False
        self.block_of[h] = block
        self.hash_of[block] = h
        self.events.append((True, h))
        return True

    def park(self, block: int) -> bool:
        """The last user of `block` let go: keep it as evictable cache if it is cached (most
        recently used end); False when it is not cached (the caller frees it)."""
        if block not in self.hash_of:
            return False
        self.evictable[block] = None
        self.evictable.move_to_end(block)
        return True

    def unpark(self, block: int) -> None:
        """A request uses cached `block` again: it is no longer evictable."""
        self.evictable.pop(block, None)

    def evict(self, n: int) -> list[int]:
        """Take up to `n` evictable blocks (least recently used first) out of the cache."""
        out = []
        while self.evictable and len(out) < n:
            block, _ = self.evictable.popitem(last=False)
            self._forget(block)
            out.append(block)
        self.num_evictions += len(out)
        return out

    def drop(self, block: int) -> None:
        """`block` is overwritten or leaves this instance: it is no longer cached."""
        if block in self.hash_of:
            self.evictable.pop(block, None)
            self._forget(block)

    def _forget(self, block: int) -> None:
        h = self.hash_of.pop(block)
        del self.block_of[h]
        self.events.append((False, h))

    def take_events(self) -> list[tuple[bool, bytes]]:
        """Additions and evictions since the last call, in order, for the fabric-wide index."""
        events, self.events = self.events, []
        return events

    def snapshot(self) -> list[bytes]:
        return list(self.block_of)

    def check_integrity(self) -> None:
        assert len(self.block_of) == len(self.hash_of), "cache maps disagree"
        for h, b in self.block_of.items():
            assert self.hash_of.get(b) == h, f"block {b} and its hash disagree"
        assert all(b in self.hash_of for b in self.evictable), "an evictable block is not cached"
