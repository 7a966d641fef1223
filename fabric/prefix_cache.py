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

Sessions (a multi-turn chat, an agent's tool calls) may keep their blocks for a time-to-live
between turns: a finished turn's cached blocks are *protected* until the session's next turn
uses them or the TTL expires, then they become evictable like any other. Protected blocks give
way only under pressure, after every evictable block, the session nearest to its expiry first
(`session_evictions` counts them): a pinned session never keeps a request from being admitted.
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
        self.protected: dict[int, str] = {}          # block -> session keeping it
        self.sessions: dict[str, tuple[float, list[int]]] = {}   # session -> (expiry, blocks)
        self.num_session_evictions = 0               # protected blocks taken under pressure
        self.num_session_expiries = 0

    def __len__(self) -> int:
        return len(self.block_of)

    @property
    def num_evictable(self) -> int:
        """Blocks the pool may take back: evictable ones, and protected ones under pressure."""
        return len(self.evictable) + len(self.protected)

    def is_idle(self, block: int) -> bool:
        """Cached and used by no request (evictable or protected by a session)."""
        return block in self.evictable or block in self.protected

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
        """A request uses cached `block` again: it is no longer evictable (nor protected)."""
        self.evictable.pop(block, None)
        self.protected.pop(block, None)

    def protect(self, session: str, blocks: list[int], expires_at: float) -> None:
        """Keep `session`'s idle cached `blocks` out of eviction until `expires_at` (or its
        next turn); what an earlier turn of the session protected is let go."""
        self.release_session(session)
        mine = [b for b in blocks if b in self.evictable]
        for b in mine:
            del self.evictable[b]
            self.protected[b] = session
        self.sessions[session] = (expires_at, mine)

    def release_session(self, session: str) -> None:
        """`session`'s protected blocks become evictable (most recently used end, tail first:
        a prefix's head, which later blocks need, is evicted last)."""
        _, blocks = self.sessions.pop(session, (0.0, []))
        for b in reversed(blocks):
            if self.protected.get(b) == session:
                del self.protected[b]
                self.evictable[b] = None

    def expire(self, now: float) -> int:
        """Let go of every session whose time-to-live ran out; returns how many."""
        gone = [s for s, (t, _) in self.sessions.items() if t <= now]
        for s in gone:
            self.release_session(s)
        self.num_session_expiries += len(gone)
        return len(gone)

    def evict(self, n: int) -> list[tuple[int, bytes]]:
        """Take up to `n` idle blocks out of the cache: evictable ones least recently used
        first, then (under pressure) protected ones, the session nearest expiry first.
        Returns (block, hash) of each, for the tiers below to keep."""
        out = []
        while self.evictable and len(out) < n:
            block, _ = self.evictable.popitem(last=False)
            out.append((block, self._forget(block)))
        if len(out) < n and self.protected:
            for s in sorted(self.sessions, key=lambda s: self.sessions[s][0]):
                if len(out) >= n:
                    break
                self.release_session(s)
                while self.evictable and len(out) < n:
                    block, _ = self.evictable.popitem(last=False)
                    out.append((block, self._forget(block)))
                    self.num_session_evictions += 1
        self.num_evictions += len(out)
        return out

    def drop(self, block: int) -> None:
        """`block` is overwritten or leaves this instance: it is no longer cached."""
        if block in self.hash_of:
            self.evictable.pop(block, None)
            self.protected.pop(block, None)
            self._forget(block)

    def _forget(self, block: int) -> bytes:
        h = self.hash_of.pop(block)
        del self.block_of[h]
        self.events.append((False, h))
        return h

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
        assert all(b in self.hash_of and b not in self.evictable for b in self.protected), \
            "a protected block is not cached, or also evictable"


class ReuseCosts:
    """Measured costs that choose how a request uses cached prefix blocks another instance
    holds: lease them (attend there, every decode step pays a split step), copy them over the
    data plane into this pool, or recompute them. Each estimate starts from a prior and follows
    what this instance measures (exponential moving averages)."""

    PRIORS = {"prefill_s_per_token": 1e-3, "split_extra_s": 0.02, "copy_s_per_byte": 1e-9,
              "call_s": 0.005}
    ALPHA = 0.2

    def __init__(self):
        self.est = dict(self.PRIORS)
        self.measured = {k: 0 for k in self.PRIORS}
        self._local_decode_s: float | None = None

    def _observe(self, key: str, value: float) -> None:
        n = self.measured[key]
        self.est[key] = value if n == 0 else (1 - self.ALPHA) * self.est[key] + self.ALPHA * value
        self.measured[key] = n + 1

    def observe_step(self, prefill_tokens: int, split: bool, seconds: float) -> None:
        if prefill_tokens >= 32 and not split:
            self._observe("prefill_s_per_token", seconds / prefill_tokens)
        elif prefill_tokens == 0 and not split:
            self._local_decode_s = seconds if self._local_decode_s is None else \
                0.8 * self._local_decode_s + 0.2 * seconds
        elif prefill_tokens == 0 and self._local_decode_s is not None:
            self._observe("split_extra_s", max(0.0, seconds - self._local_decode_s))

    def observe_copy(self, nbytes: int, seconds: float) -> None:
        self._observe("copy_s_per_byte", seconds / max(1, nbytes))

    def observe_call(self, seconds: float) -> None:
        self._observe("call_s", seconds)

    def estimates(self, tokens: int, nbytes: int, decode_steps: int) -> dict[str, float]:
        e = self.est
        return {"recompute": tokens * e["prefill_s_per_token"],
                "copy": 2 * e["call_s"] + nbytes * e["copy_s_per_byte"],
                "lease": e["call_s"] + decode_steps * e["split_extra_s"]}

    def choose(self, tokens: int, nbytes: int, decode_steps: int, room: bool) -> str:
        """The cheapest way; without `room` for the blocks here, only a lease avoids waiting
        for memory (or borrowing it)."""
        if not room:
            return "lease"
        est = self.estimates(tokens, nbytes, decode_steps)
        return min(est, key=est.get)
