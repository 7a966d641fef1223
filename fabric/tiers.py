"""KV tiers below the pool: a node's host memory and its local disk (see docs/tiers.md).

A cached prefix block the pool evicts goes down instead of being lost: its KV (every layer's
k and v of the block) is copied out and written back, batched and off the engine thread, to
the node's host tier; what the host tier evicts goes down to the disk tier. A request whose
prompt continues past the pool's cached prefix with blocks a lower tier holds brings them up
instead of computing them: all of them (load), none (recompute), or, computing from the head
while the loader brings blocks from the tail, the two meeting where they finish together
(compute-or-load). Blocks are named by the prefix cache's hashes, so a block found below holds
exactly the KV its tokens would compute.

Free of Ray: `actors/tierstore.py` hosts a node's `HostTier` and `DiskTier` in one actor, and
the instance's loader drives a `TierLoad` that the scheduler reads.
"""

from __future__ import annotations

import errno
import hashlib
import os
import struct
import threading
import time
import warnings
from collections import OrderedDict

import torch

from fabric.prefix_cache import HASH_BYTES

MAGIC = b"KVFBLK01"
HEADER = struct.Struct(f"<8s{HASH_BYTES}sQ{HASH_BYTES}s")   # magic, hash, length, checksum
SUFFIX = ".kv"


def checksum(payload: bytes) -> bytes:
    return hashlib.blake2b(payload, digest_size=HASH_BYTES).digest()


class HostTier:
    """Block payloads in memory up to `capacity` bytes, least recently used out first. A
    payload may be any value with its size given (the node's store keeps object-store
    references)."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.blocks: OrderedDict[bytes, tuple[object, int]] = OrderedDict()
        self.nbytes = 0

    def __contains__(self, h: bytes) -> bool:
        return h in self.blocks

    def __len__(self) -> int:
        return len(self.blocks)

    def put(self, h: bytes, payload, nbytes: int | None = None) -> list[tuple[bytes, object]]:
        """Keep `payload` as `h`; returns what had to leave (oldest first), for the tier below.
        A payload larger than the whole tier goes straight down."""
        size = len(payload) if nbytes is None else nbytes
        if h in self.blocks:
            self.blocks.move_to_end(h)
            return []
        if size > self.capacity:
            return [(h, payload)]
        out = []
        while self.nbytes + size > self.capacity:
            old, (data, n) = self.blocks.popitem(last=False)
            self.nbytes -= n
            out.append((old, data))
        self.blocks[h] = (payload, size)
        self.nbytes += size
        return out

    def get(self, h: bytes):
        entry = self.blocks.get(h)
        if entry is None:
            return None
        self.blocks.move_to_end(h)
        return entry[0]

    def remove(self, h: bytes) -> None:
        entry = self.blocks.pop(h, None)
        if entry is not None:
            self.nbytes -= entry[1]

    def clear(self) -> list[bytes]:
        gone = list(self.blocks)
        self.blocks.clear()
        self.nbytes = 0
        return gone


class DiskTier:
    """Block payloads as files in `path`, up to `capacity` bytes, least recently used out
    first. A file is written under a temporary name and renamed into place (never seen half
    written), and carries its hash, length and a checksum: a corrupt, truncated or vanished
    file is a miss, never wrong KV. A full disk or a removed directory makes writes fail
    (counted); the tier keeps answering with what it still has. Files left by an earlier run
    are found again at start."""

    def __init__(self, path: str, capacity: int):
        self.path, self.capacity = path, capacity
        self.index: OrderedDict[bytes, int] = OrderedDict()     # hash -> file size
        self.nbytes = 0
        self.errors = {"write_failed": 0, "corrupt": 0, "vanished": 0}
        self.dropped: list[bytes] = []      # hashes dropped since `take_dropped` (the index)
        self.fail_writes = 0        # fault injection: the next n writes find the disk full
        os.makedirs(path, exist_ok=True)
        self._scan()

    def _scan(self) -> None:
        found = []
        for name in os.listdir(self.path):
            full = os.path.join(self.path, name)
            if name.startswith("tmp-"):
                _unlink(full)                       # a write a crash cut short
                continue
            if not name.endswith(SUFFIX):
                continue
            try:
                h = bytes.fromhex(name[: -len(SUFFIX)])
                st = os.stat(full)
            except (ValueError, OSError):
                continue
            if len(h) == HASH_BYTES:
                found.append((st.st_mtime, h, st.st_size))
        for _, h, size in sorted(found):
            self.index[h] = size
            self.nbytes += size
        self._fit(0)

    def __contains__(self, h: bytes) -> bool:
        return h in self.index

    def __len__(self) -> int:
        return len(self.index)

    def _file(self, h: bytes) -> str:
        return os.path.join(self.path, h.hex() + SUFFIX)

    def put(self, h: bytes, payload: bytes) -> bool:
        """Write `payload` as `h` (False: it did not fit or the write failed)."""
        size = HEADER.size + len(payload)
        if h in self.index:
            self.index.move_to_end(h)
            return True
        if size > self.capacity:
            return False
        self._fit(size)
        data = HEADER.pack(MAGIC, h, len(payload), checksum(payload)) + payload
        tmp = os.path.join(self.path, f"tmp-{h.hex()}-{threading.get_ident()}")
        try:
            if self.fail_writes > 0:
                self.fail_writes -= 1
                raise OSError(errno.ENOSPC, "No space left on device (injected)")
            try:
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            except FileNotFoundError:               # the directory was removed: make it again
                os.makedirs(self.path, exist_ok=True)
                fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(tmp, self._file(h))
        except OSError:
            self.errors["write_failed"] += 1
            _unlink(tmp)
            return False
        self.index[h] = size
        self.nbytes += size
        return True

    def get(self, h: bytes) -> bytes | None:
        """The payload of `h`, or None: not here, or its file is gone, short or corrupt (then
        it is dropped)."""
        if h not in self.index:
            return None
        try:
            with open(self._file(h), "rb") as f:
                data = f.read()
        except OSError:
            self.errors["vanished"] += 1
            self._drop(h)
            return None
        payload = data[HEADER.size:]
        ok = len(data) >= HEADER.size
        if ok:
            magic, name, length, digest = HEADER.unpack_from(data)
            ok = magic == MAGIC and name == h and length == len(payload) and \
                digest == checksum(payload)
        if not ok:
            self.errors["corrupt"] += 1
            self._drop(h)
            return None
        self.index.move_to_end(h)
        return payload

    def _fit(self, size: int) -> list[bytes]:
        gone = []
        while self.index and self.nbytes + size > self.capacity:
            h = next(iter(self.index))
            self._drop(h)
            gone.append(h)
        return gone

    def _drop(self, h: bytes) -> None:
        size = self.index.pop(h, None)
        if size is not None:
            self.nbytes -= size
            self.dropped.append(h)
            _unlink(self._file(h))

    def take_dropped(self) -> list[bytes]:
        out, self.dropped = self.dropped, []
        return out

    def clear(self) -> list[bytes]:
        gone = list(self.index)
        for h in gone:
            self._drop(h)
        return gone


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


class TierLoad:
    """One request's blocks coming up from a lower tier: prompt positions `first ..
    first + len(hashes)` into pool `blocks` (allocated for it, one per position).

    The loader (a thread of the instance) fills them from the tail, one batch at a time, and
    moves `frontier` down after each batch is written: positions `frontier..end` hold their
    KV. The scheduler computes the prompt's head up to `meet` (none for a load-only request),
    never past `frontier`, then waits; when the compute and the frontier meet, the request
    takes the loaded blocks from that position on (`take`) and the rest go back to the pool
    once the loader no longer writes them."""

    def __init__(self, first: int, hashes: list[bytes], blocks: list[int], mode: str,
                 head_share: float = 1.0, predicted_s: float | None = None):
        assert len(hashes) == len(blocks) and mode in ("load", "compute_or_load")
        self.first, self.hashes, self.blocks, self.mode = first, hashes, blocks, mode
        self.started = time.perf_counter()
        self.predicted_s = predicted_s      # `TierCosts.parallel_s` of its blocks, at planning
        self.met_s: float | None = None     # from the start until the request took the blocks
        self.end = first + len(hashes)
        self.frontier = self.end
        # where the two should meet by the measured speeds: the prefill computes the head up
        # to there (a chunk is large: computing past it would redo what the loader brings)
        self.meet = first + (int(len(hashes) * head_share) if mode == "compute_or_load" else 0)
        self.done = False               # the loader has stopped writing
        self.stopped = False            # the request met the loader (or left)
        self.tiers: dict[str, int] = {}     # blocks loaded per tier
        self.seconds = 0.0              # loader time spent
        self._rest: list[int] | None = None
        self._lock = threading.Lock()

    # ---- the loader's side ---------------------------------------------------------------
    def should_stop(self) -> bool:
        with self._lock:
            return self.stopped

    def loaded(self, start: int) -> None:
        """Positions `start..end` are written."""
        with self._lock:
            self.frontier = min(self.frontier, start)

    def finish(self) -> list[int]:
        """The loader stops writing; returns blocks the request left to it (to free)."""
        with self._lock:
            self.done = True
            rest, self._rest = self._rest or [], None
            return rest

    # ---- the scheduler's side ------------------------------------------------------------
    def ready(self) -> bool:
        """May the request go on: compute-or-load always, load-only once the loader is done."""
        return self.mode == "compute_or_load" or self.done

    def take(self, at: int) -> tuple[list[bytes], list[int], list[int]]:
        """Stop the loader; the request, computed up to position `at` (>= frontier), goes on
        with the loaded blocks: returns their (hashes, blocks) from `at` on, and the blocks to
        free now (the others are freed at the loader's `finish`, once it writes no more)."""
        with self._lock:
            assert at >= self.frontier, "the loader has not written these positions"
            self.met_s = time.perf_counter() - self.started
            return self._stop(max(0, min(at, self.end) - self.first))

    def cancel(self) -> list[int]:
        """The request goes on without the loaded blocks (it left, was preempted, or nothing
        was loaded): returns the blocks to free now."""
        with self._lock:
            return self._stop(len(self.blocks))[2]

    def _stop(self, j: int):
        self.stopped = True
        rest = self.blocks[:j]
        if not self.done:
            self._rest, rest = rest, []
        return self.hashes[j:], self.blocks[j:], rest


def pack(k: torch.Tensor, v: torch.Tensor):
    """One block's KV over all layers (`[L, block_size, H_kv, D]` each) as one uint8 array (a
    buffer: Ray moves it without pickling, a reader maps it)."""
    return torch.stack([k, v]).contiguous().view(torch.uint8).reshape(-1).numpy()


def unpack(payload, shape: tuple, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The inverse of `pack`, over any buffer (bytes, a read-only array mapped from the object
    store: not copied, only read); None when it does not have this model's block size."""
    buf = memoryview(payload).cast("B")
    want = 2 * torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    if len(buf) != want:
        return None
    with warnings.catch_warnings():          # read-only buffers: torch warns, we only read
        warnings.simplefilter("ignore", UserWarning)
        both = torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(2, *shape)
    return both[0], both[1]


def run_load(ld: TierLoad, fetch, write_kv, shape: tuple, dtype: torch.dtype, batch: int,
             costs: "TierCosts | None" = None) -> None:
    """The loader: bring `ld`'s blocks up, tail first, `batch` at a time, until all are up,
    the request stops it, or a block is missing (the request computes the rest).
    `fetch(hashes)` gives (tier, payload) or None per block; `write_kv(blocks, k, v)` writes
    into the pool. The caller calls `ld.finish()` after, whatever happened."""
    t0 = time.perf_counter()
    try:
        end = ld.end
        while end > ld.first and not ld.should_stop():
            start = max(ld.first, end - batch)
            j0, j1 = start - ld.first, end - ld.first
            t = time.perf_counter()
            got = fetch(ld.hashes[j0:j1])
            kvs = [None if g is None else unpack(g[1], shape, dtype) for g in got]
            holes = [i for i, x in enumerate(kvs) if x is None]
            cut = holes[-1] + 1 if holes else 0        # the blocks after the last missing one
            if cut == len(kvs) or ld.should_stop():
                return
            got, kvs = got[cut:], kvs[cut:]
            write_kv(ld.blocks[j0 + cut:j1], torch.stack([x[0] for x in kvs], dim=1),
                     torch.stack([x[1] for x in kvs], dim=1))
            ld.loaded(start + cut)
            for tier, _ in got:
                ld.tiers[tier] = ld.tiers.get(tier, 0) + 1
            if costs is not None:
                tiers = {tier for tier, _ in got}
                costs.observe_load(tiers.pop() if len(tiers) == 1 else "disk", len(got),
                                   time.perf_counter() - t)
            if holes:
                return
            end = start
    finally:
        ld.seconds = time.perf_counter() - t0


class TierCosts:
    """How a request brings up blocks a lower tier holds, by measured speeds: the loader's
    seconds per block (per tier, from priors until measured), the instance's prefill seconds
    per token (`ReuseCosts`), a fixed call latency. Compute-or-load, computing and loading at
    once, would take the time of both rates added if the two ran fully in parallel; on a CPU
    they share the cores (the loader unpacks and writes blocks, the prefill computes), so that
    estimate is multiplied by `overlap`, the measured ratio of what compute-or-load runs took to
    what they were expected to take (1 until measured). It needs pool room for every block
    below up front, like a load."""

    ALPHA = 0.2
    PRIORS = {"host": 2e-3, "disk": 5e-3}
    OVERLAP_RANGE = (0.25, 8.0)     # one odd run (a step of other work between) moves it little

    def __init__(self):
        self.load_s_per_block = dict(self.PRIORS)
        self.call_s = 0.005
        self.overlap = 1.0
        self.overlap_runs = 0

    def observe_load(self, tier: str, blocks: int, seconds: float) -> None:
        if blocks > 0:
            v = seconds / blocks
            old = self.load_s_per_block.get(tier, v)
            self.load_s_per_block[tier] = (1 - self.ALPHA) * old + self.ALPHA * v

    def observe_both(self, predicted_s: float | None, seconds: float | None) -> None:
        """A compute-or-load run took `seconds` where `parallel_s` predicted `predicted_s`."""
        if predicted_s and predicted_s > 0 and seconds is not None and seconds >= 0:
            lo, hi = self.OVERLAP_RANGE
            r = min(hi, max(lo, seconds / predicted_s))
            self.overlap = (1 - self.ALPHA) * self.overlap + self.ALPHA * r
            self.overlap_runs += 1

    def estimates(self, tiers: list[str], block_size: int, prefill_s_per_token: float
                  ) -> dict[str, float]:
        """Seconds each way takes to make the KV of `tiers` (one entry per block) ready."""
        load, compute = self._sides(tiers, block_size, prefill_s_per_token)
        both = _parallel(load, compute) if tiers else 0.0
        return {"recompute": compute, "load": load, "compute_or_load": both * self.overlap}

    def parallel_s(self, tiers: list[str], block_size: int, prefill_s_per_token: float) -> float:
        """Compute-or-load's time were the loader and the prefill fully parallel: both rates
        added (what `observe_both` compares a run against)."""
        return _parallel(*self._sides(tiers, block_size, prefill_s_per_token)) if tiers else 0.0

    def _sides(self, tiers, block_size, prefill_s_per_token) -> tuple[float, float]:
        """(seconds to load `tiers`' blocks, seconds to compute them)."""
        load = self.call_s + sum(self.load_s_per_block.get(t, self.PRIORS["disk"]) for t in tiers)
        return load, len(tiers) * block_size * prefill_s_per_token

    def head_share(self, tiers: list[str], block_size: int, prefill_s_per_token: float) -> float:
        """The share of `tiers`' blocks compute-or-load should compute (from the head) so that
        the prefill and the loader finish together: per block, compute c and load l seconds,
        x * c = (1 - x) * l."""
        if not tiers:
            return 0.0
        load = sum(self.load_s_per_block.get(t, self.PRIORS["disk"]) for t in tiers) / len(tiers)
        compute = block_size * prefill_s_per_token
        return load / (load + compute)

    def choose(self, policy: str, tiers: list[str], block_size: int,
               prefill_s_per_token: float) -> str:
        if policy != "auto":
            return policy
        est = self.estimates(tiers, block_size, prefill_s_per_token)
        return min(est, key=est.get)


def _parallel(load: float, compute: float) -> float:
    """Seconds for two workers at these rates (seconds for all of it alone) splitting the work."""
    return 1.0 / (1.0 / max(load, 1e-9) + 1.0 / max(compute, 1e-9))


def tier_totals(instances: list[dict], nodes: list[dict], index: dict) -> dict:
    """`stats()["tiers"]`: per tier (pool, host, disk) blocks, bytes, hits and bytes moved,
    fabric-wide; each node's store and each instance's loads."""
    per = {"host": {}, "disk": {}}
    for name, acc in per.items():
        for n in nodes:
            _add(acc, n.get(name) or {})
    sides = [s.get("tiers", {}) for s in instances]
    pool = {"blocks_cached": sum(s["prefix_cache"]["blocks_cached"] for s in instances),
            "hits_tokens": sum(s["prefix_cache"]["hits"] for s in instances)
            - sum(t.get("loaded_tokens", 0) for t in sides)}
    keys = ("loads", "loaded_tokens", "computed_tokens", "blocks_down", "blocks_up", "dropped",
            "write_errors", "load_errors", "lookup_errors")
    return {"enabled": any(t.get("enabled") for t in sides), "pool": pool, **per,
            **{k: sum(t.get(k, 0) for t in sides) for k in keys},
            "index_blocks": index, "nodes": nodes,
            "per_instance": [{"id": s["id"], **t} for s, t in zip(instances, sides)]}


def _add(acc: dict, counts: dict) -> None:
    """Add the numbers of `counts` (and of its nested mappings) into `acc`."""
    for k, v in counts.items():
        if isinstance(v, dict):
            _add(acc.setdefault(k, {}), v)
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            acc[k] = acc.get(k, 0) + v
