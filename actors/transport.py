"""Data-plane transport: blocking request/response calls between the fabric's endpoints.

A home instance sends each creditor, at every layer, a small request (query, new k/v, metadata)
and waits for the partial attention that comes back, while the creditor serves its own forward
pass and calls others in turn (the home included). So every endpoint serves incoming requests on
its own threads, concurrently with its outgoing calls, and A calling B while B calls A is normal.

Backends, chosen by name (`create_transport`):
- "torch": `torch.distributed` point-to-point over a private gloo group (see `TorchTransport`).
  gloo moves CPU memory only, on CPU and GPU instances alike: tensors on a GPU are copied into
  the host frame buffer before sending and arrive as CPU tensors. There is no NCCL path.
- "ray": a Ray actor method of the destination (`_transport_handle`, see `TransportHost`).

A message is `meta` (plain values, msgpack, never pickle) plus a list of tensors packed into one
buffer (`actors.messages`). Received tensors are CPU tensors; a handler moves them to its device.

No message is larger than `max_message_bytes` (envelope and tensors; 256 MiB by default), in
either direction and on both backends: a sender refuses a bigger one with `WireError` before
anything is sent, and a receiver refuses a peer's frame that announces more (see
`TorchTransport` for what that does to the link).
"""

from __future__ import annotations

import datetime
import itertools
import logging
import os
import socket
import struct
import threading
import traceback
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import ray
import torch
import torch.distributed as dist

from actors.messages import WireError, decode, decode_split, encode, encode_split
from fabric.errors import FabricError
from fabric.threads import release_pool

log = logging.getLogger(__name__)

DEFAULT_MAX_MESSAGE_BYTES = 256 << 20   # envelope + tensors of one message, either direction

Tensors = list[torch.Tensor]
Reply = tuple[dict, Tensors]
Request = tuple[int, dict, Tensors]
Handler = Callable[[int, dict, Tensors], Reply]


class TransportError(FabricError):
    """A call failed: the peer's handler raised, the peer has closed or died, or it did not answer
    in time. `remote_traceback` holds the peer's traceback when its handler raised."""

    def __init__(self, message: str, remote_traceback: str | None = None):
        super().__init__(message)
        self.remote_traceback = remote_traceback


class Transport:
    """One endpoint (`rank` in 0..world_size-1) of a request/response group.

    - `start(handler)`: serve incoming requests from now on. `handler(src, meta, tensors)` returns
      `(meta, tensors)`. It runs on the transport's threads, never on the caller's: requests from
      one source are served one at a time, in order; requests from different sources may be served
      concurrently, so the handler must be thread-safe. An exception in it is sent back and raised
      in the caller as `TransportError`; this endpoint keeps serving.
    - `call(dst, meta, tensors)`: blocking request/response. Safe from any number of threads at
      once. A call to `rank` itself runs the handler inline.
    - `call_many(requests)`: send all requests, then collect all replies (in request order), so the
      destinations work in parallel. If any fails, all are still collected, then the first error
      is raised.
    - `stats()`: bytes_sent, bytes_received (wire bytes, both directions of calls and serving),
      num_calls (made), num_served, num_errors (calls that raised), num_refused (incoming frames
      or calls refused for their announced sizes, see `max_message_bytes`).
    - `close(wait_s=0)`: make no more calls; answer later requests with an error. Never blocks on
      peers unless `wait_s` > 0 (then waits up to that long for the peers to close too).

    Don't call the transport from inside a handler: two handlers calling each other's endpoints
    can wait on each other forever.
    """

    rank: int
    world_size: int

    def start(self, handler: Handler) -> None:
        raise NotImplementedError

    def call(self, dst: int, meta: dict, tensors: Tensors) -> Reply:
        return self.call_many([(dst, meta, tensors)])[0]

    def call_many(self, requests: list[Request]) -> list[Reply]:
        raise NotImplementedError

    def stats(self) -> dict:
        raise NotImplementedError

    def close(self, wait_s: float = 0.0) -> None:
        raise NotImplementedError

    def is_serving(self) -> bool:
        """Whether threads of this endpoint still serve requests (they do until peers close)."""
        return False


def create_transport(name: str, **kwargs) -> Transport:
    """The backend called `name` ("torch" or "ray"), built with `kwargs` (see each class)."""
    if name not in TRANSPORTS:
        raise ValueError(f"transport backend {name!r} is unknown; "
                         f"choose one of {sorted(TRANSPORTS)}")
    return TRANSPORTS[name](**kwargs)


def find_free_port() -> int:
    """A TCP port free on this node right now (another process may still take it before use)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def local_addr_towards(addr: str) -> str:
    """This node's IP address on the route to `addr` (a UDP connect sends no packet)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect((addr, 9))
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


# ---- shared by the backends ------------------------------------------------------------------
class _Endpoint(Transport):
    def __init__(self, rank: int, world_size: int, timeout_s: float, max_message_bytes: int):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside the group of {world_size}")
        if isinstance(max_message_bytes, bool) or not isinstance(max_message_bytes, int) \
                or max_message_bytes < 1:
            raise ValueError(f"max_message_bytes must be a positive integer, got "
                             f"{max_message_bytes!r}")
        self.rank, self.world_size, self.timeout_s = rank, world_size, timeout_s
        self.max_message_bytes = max_message_bytes
        self.handler: Handler | None = None
        self.started = threading.Event()
        self.closed = False
        self._lock = threading.Lock()
        self._counts = dict(bytes_sent=0, bytes_received=0, num_calls=0, num_served=0, num_errors=0,
                            num_refused=0)

    def start(self, handler: Handler) -> None:
        self.handler = handler
        self.started.set()

    def stats(self) -> dict:
        with self._lock:
            return dict(self._counts)

    def _count(self, **deltas: int) -> None:
        with self._lock:
            for k, v in deltas.items():
                self._counts[k] += v

    def _check_call(self, dst: int) -> None:
        if self.closed:
            raise TransportError(f"rank {self.rank}: the transport is closed")
        if not 0 <= dst < self.world_size:
            raise TransportError(f"rank {self.rank}: destination {dst} is outside the group "
                                 f"of {self.world_size}")

    def _check_outgoing(self, dst: int, nbytes: int, what: str) -> None:
        """A message this endpoint is about to send must fit the group's cap (the receiver
        would refuse it, see `TorchTransport`): a `WireError` here, before any byte moves."""
        if nbytes > self.max_message_bytes:
            raise WireError(f"rank {self.rank}: {what} to rank {dst} is {nbytes} bytes, more "
                            f"than max_message_bytes={self.max_message_bytes}")

    def _serve(self, src: int, meta: dict, tensors: Tensors) -> tuple[bool, dict, Tensors]:
        """Run the handler: (ok, meta, tensors); on failure meta = {"error", "traceback"}."""
        if self.closed:
            return False, {"error": f"rank {self.rank} has closed its transport"}, []
        if not self.started.wait(self.timeout_s):
            return False, {"error": f"rank {self.rank} has no handler (start was not called)"}, []
        try:
            out_meta, out_tensors = self.handler(src, meta, tensors)
            self._count(num_served=1)
            return True, out_meta, list(out_tensors)
        except Exception as e:
            error = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
            return False, error, []

    def _call_local(self, meta: dict, tensors: Tensors) -> Reply:
        # Through the codec, so the handler and the caller never share tensors (as over a wire).
        buf, n = encode(meta, tensors)
        ok, out_meta, out_tensors = self._serve(self.rank, *decode(buf, n))
        if not ok:
            raise self._remote_error(self.rank, out_meta)
        buf, n = encode(out_meta, out_tensors)
        return decode(buf, n)

    def _remote_error(self, dst: int, meta: dict) -> TransportError:
        return TransportError(f"rank {dst} failed to serve a call from rank {self.rank}: "
                              f"{meta.get('error')}", meta.get("traceback"))

    def start_many(self, requests: list[Request]) -> "PendingCalls":
        """Send every request now and return at once; `.result()` collects the replies (in
        request order), so the caller works while the destinations do."""
        pending = []
        for dst, meta, tensors in requests:
            try:
                pending.append(self._start_call(dst, meta, tensors))
            except Exception as e:
                pending.append(e if isinstance(e, (TransportError, WireError)) else
                               TransportError(f"rank {self.rank}: call to rank {dst} failed: {e}"))
        return PendingCalls(self, pending, [dst for dst, _, _ in requests])

    def call_many(self, requests: list[Request]) -> list[Reply]:
        return self.start_many(requests).result()

    def _start_call(self, dst: int, meta: dict, tensors: Tensors):
        raise NotImplementedError

    def _finish_call(self, pending) -> Reply:
        raise NotImplementedError

    def _collect(self, pending: list, finish: Callable, dsts: list[int] | None = None) -> list[Reply]:
        """Finish every pending call even after a failure (no reply is left in flight). The
        error raised carries `failed_peers`: the destinations whose calls failed, and
        `raised_peers`: those of them whose handler raised (they answered: a bug, not a fault)."""
        replies, first_error, failed, raised = [], None, [], []
        for i, p in enumerate(pending):
            try:
                if isinstance(p, Exception):
                    raise p
                replies.append(finish(p))
            except Exception as e:
                self._count(num_errors=1)
                first_error = first_error or e
                if dsts is not None:
                    failed.append(dsts[i])
                    if getattr(e, "remote_traceback", None) is not None:
                        raised.append(dsts[i])
        if first_error is not None:
            first_error.failed_peers, first_error.raised_peers = failed, raised
            raise first_error
        return replies


class PendingCalls:
    """Calls in flight from `start_many`; `result()` waits for all of them, once."""

    def __init__(self, endpoint: _Endpoint, pending: list, dsts: list[int]):
        self._endpoint, self._pending, self._dsts = endpoint, pending, dsts

    def result(self) -> list[Reply]:
        pending, self._pending = self._pending, []
        return self._endpoint._collect(pending, self._endpoint._finish_call, self._dsts)


# ---- torch.distributed (gloo) ----------------------------------------------------------------
# Frame header: 8 little-endian int64 = 64 bytes, at the front of every frame.
_HEADER = struct.Struct("<8q")   # magic, kind, call id, src, envelope len, body len, inline, 0
HEADER_BYTES = _HEADER.size
_MAGIC = 0x6B762D666162   # "kv-fab"
REQUEST, REPLY, ERROR, BYE = 1, 2, 3, 4
# gloo tags are C ints. Tag 1 carries every request frame; each call gets its own id c and tags
# 4c (request body), 4c+1 (reply frame), 4c+2 (reply body), so nothing of one call can match a
# receive of another, whichever threads send or receive them, in any order.
TAG_REQUEST = 1
_MAX_CALL_ID = (2**31 - 1) // 4 - 1
_FOREVER = datetime.timedelta(days=365)   # gloo's clock is int64 ns: keep far below 292 years


def _tag(call_id: int, part: int) -> int:
    return 4 * call_id + part


def frame_problem(kind: int, call_id: int, env_len: int, body_len: int, inline: int, *,
                  kinds: tuple[int, ...], inline_bytes: int, max_message_bytes: int,
                  expected_call_id: int | None = None) -> tuple[str | None, bool]:
    """Check a frame header's fields: (what is wrong or None, whether the frame's message can
    still be taken off the wire). A frame is *receivable* when it carries its whole message
    (inline) or announces a body this endpoint may receive (0 <= body_len <= max_message_bytes)
    on a known call's tags; a receivable bad frame leaves the link usable. `expected_call_id`:
    the call a reply frame answers (None for a request frame, whose id must be valid)."""
    if inline not in (0, 1):
        return f"inline flag {inline} is neither 0 nor 1", False
    if expected_call_id is None and not 1 <= call_id <= _MAX_CALL_ID:
        return f"call id {call_id} is outside 1..{_MAX_CALL_ID}", False
    receivable = bool(inline) or 0 <= body_len <= max_message_bytes
    frame_room = inline_bytes - HEADER_BYTES
    if env_len < 0 or body_len < 0:
        return "a size is negative", receivable
    if body_len > max_message_bytes:
        return f"the body is larger than max_message_bytes={max_message_bytes}", receivable
    if env_len > body_len:
        return "the envelope is longer than the body", receivable
    if inline and body_len > frame_room:
        return f"an inline body is longer than the {frame_room} bytes a frame holds", receivable
    if kind not in kinds:
        return f"kind {kind} is not one of {list(kinds)}", receivable
    if expected_call_id is not None and call_id != expected_call_id:
        return f"it answers call {call_id}, not call {expected_call_id}", receivable
    return None, True


@dataclass
class _Pending:
    dst: int
    call_id: int = 0
    reply: object = None           # gloo Work of the pre-posted reply frame
    frame: torch.Tensor | None = None
    sends: list = field(default_factory=list)
    keep: tuple = ()               # send buffers: alive until their sends complete
    local: tuple | None = None     # (meta, tensors) of a call to this endpoint itself


class TorchTransport(_Endpoint):
    """Request/response over `torch.distributed` point-to-point on a private gloo group.

    Set-up: every rank constructs one concurrently (it blocks until all `world_size` have joined,
    at most `connect_timeout_s`); rank 0 hosts the rendezvous store on `master_addr:master_port`
    (pick the port on rank 0's node with `find_free_port`). `local_addr` is the address peers reach
    this rank at (default: this node's address on the route to `master_addr`; the environment
    variable GLOO_SOCKET_IFNAME picks an interface instead). `inline_bytes` (frame size) and
    `max_message_bytes` (largest message, >= `inline_bytes`) must be the same on every rank.

    Why it is built this way (measured on torch 2.13 / gloo; `python -m bench.transport` times
    round trips):
    - A private `ProcessGroupGloo`, not `init_process_group`: the default group is global to the
      process; a private one lets a process host several endpoints, rebuild one after `close`, and
      leaves the default group to whoever else needs it.
    - gloo supports tags (C ints), any-source receives, receiving into a larger buffer than was
      sent, and concurrent send/recv from several threads on one group. A send only completes once
      the receiver has posted a matching receive (rendezvous), and a *timed-out wait closes the
      link to that peer for good*. So the group's own timeout is "forever" (an idle service thread
      must not time out) and only callers wait with `timeout_s`.
    - One service thread per peer, each blocked in a receive from that peer on the request tag,
      not one thread with an any-source receive: a receive from a peer fails when that peer dies or
      closes its side (an any-source receive would wait forever; gloo cannot interrupt it, nor can
      a rank send to itself to wake it), so each thread ends with its peer. Requests from different
      peers are served in parallel.
    - Every frame lands in a receive posted *before* it was sent: the caller posts its reply
      receive before sending the request, a service thread posts its next request receive before
      serving the current one. In a bare gloo ping-pong of 32 KB here, posting each receive only
      after one's own send had completed gave a median round trip of 4 ms (most round trips
      stalled for one scheduler tick); posting it before sending gave 0.044 ms.
    - A frame is one message of at most `inline_bytes`: header, msgpack envelope and all tensors
      packed together. A larger message sends a header-only frame, then its body on the call's own
      tag (the receiver learns the size from the header, so that receive is posted late).
    - The receiver allocates nothing a header asks for before checking it (`frame_problem`):
      sizes that are negative, inconsistent (an envelope longer than the body, an inline body
      longer than a frame) or above `max_message_bytes` make a `WireError` naming the peer and
      the sizes. What happens next follows from gloo's rendezvous: an announced body moves only
      once the receiver posts a receive for it, in one piece, into a buffer at least that large;
      until then it waits on the sender. It cannot be received in parts, nor skipped: left alone,
      it keeps the sender's send pending and would match the next receive on its tag. So
        * a bad frame whose message is all there (inline), or whose body may be received (at most
          `max_message_bytes`, taken off the wire and thrown away), is answered with that error
          (raised in the caller as `TransportError`), and the peer is served on as before;
        * a body that must not be received (negative or above the cap), a bad magic number, an
          invalid call id or inline flag leave the peer's frame stream in an unknown state. The
          receiver then drops that peer alone, with a logged warning (`dropped_peers()` says
          why): it neither serves nor calls it any more, and sends it a goodbye so that its calls
          here fail at once rather than after `timeout_s`. The other peers are not affected.
      A sender checks its own messages against the cap before sending (`WireError`, nothing
      sent), so only a corrupt or hostile peer meets the second case. A reply frame that fails
      the check is treated the same way on the caller's side.
    - Tensors on a GPU are staged through host memory: `encode` copies them into the CPU frame
      buffer (gloo sends CPU memory only) and the receiver gets CPU tensors. There is no NCCL
      path. One could be added without changing the scheme above by keeping the frames on gloo
      and moving only the bodies on an NCCL group, in the order of the headers (NCCL has neither
      tags nor any-source receives); it is not built.
    """

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, *,
                 peers=None, local_addr: str | None = None, timeout_s: float = 300.0,
                 connect_timeout_s: float = 120.0, inline_bytes: int = 1 << 20,
                 max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(rank, world_size, timeout_s, max_message_bytes)
        if inline_bytes < 4096:
            raise ValueError(f"inline_bytes must be >= 4096, got {inline_bytes}")
        if max_message_bytes < inline_bytes:
            raise ValueError(f"max_message_bytes ({max_message_bytes}) must be >= inline_bytes "
                             f"({inline_bytes})")
        self.inline_bytes = inline_bytes
        self._wait_s = datetime.timedelta(seconds=timeout_s)
        self._ids = itertools.count(1)
        self._closed_peers: set[int] = set()   # said goodbye: they call us no more
        self._dead_peers: set[int] = set()     # link broken: nothing more goes either way
        self._dropped: dict[int, str] = {}     # sent frames we could not take: why (see above)
        self._bye_sent: set[int] = set()
        self._threads: list[threading.Thread] = []
        self._byes: list = []
        self._store = dist.TCPStore(master_addr, master_port, world_size, is_master=rank == 0,
                                    timeout=datetime.timedelta(seconds=connect_timeout_s))
        self._check_same_frames()
        self._pg = self._group(local_addr or local_addr_towards(master_addr))

    def _check_same_frames(self) -> None:
        # A reply frame must fit the receive its caller posted, and a message one rank may send
        # must be one its peers accept: one frame size and one cap for the group.
        for name in ("inline_bytes", "max_message_bytes"):
            mine = getattr(self, name)
            if self.rank == 0:
                self._store.set(f"kv-fabric/transport/{name}", str(mine))
            theirs = int(self._store.get(f"kv-fabric/transport/{name}"))
            if theirs != mine:
                raise ValueError(f"rank {self.rank}: {name} is {mine} here but {theirs} on "
                                 f"rank 0; every rank of a group needs the same")

    def _group(self, local_addr: str):
        opts = dist.ProcessGroupGloo._Options()
        if os.environ.get("GLOO_SOCKET_IFNAME"):
            iface = os.environ["GLOO_SOCKET_IFNAME"].split(",")[0]
            opts._devices = [dist.ProcessGroupGloo.create_device(interface=iface)]
        else:
            opts._devices = [dist.ProcessGroupGloo.create_device(hostname=local_addr)]
        opts._timeout = _FOREVER
        store = dist.PrefixStore("kv-fabric/transport", self._store)
        return dist.ProcessGroupGloo(store, self.rank, self.world_size, opts)

    def dropped_peers(self) -> dict[int, str]:
        """Peers this rank stopped serving and calling because of a frame it could not take
        (see the class notes), each with the error that made it stop."""
        return dict(self._dropped)

    # ---- serving -------------------------------------------------------------------------
    def start(self, handler: Handler) -> None:
        super().start(handler)
        for src in range(self.world_size):
            if src != self.rank:
                t = threading.Thread(target=self._serve_peer, args=(src,), daemon=True,
                                     name=f"transport-{self.rank}-serves-{src}")
                t.start()
                self._threads.append(t)

    def _serve_peer(self, src: int) -> None:
        recv, frame = self._post_frame(src, TAG_REQUEST)
        while True:
            try:
                recv.wait()                      # forever: an idle peer is normal
                kind, call_id, env_len, body_len, inline = self._parse(frame, src)
                if kind == BYE:
                    self._closed_peers.add(src)
                    return
                bad = self._check_frame("request", src, kind, call_id, env_len, body_len, inline)
                body = None
                if bad is None or not inline:    # a split body is taken off the wire even if bad
                    body = self._body(src, frame, call_id, 0, body_len, inline)
                recv, frame = self._post_frame(src, TAG_REQUEST)   # before serving (fast path)
                self._count(bytes_received=HEADER_BYTES + (body.numel() if body is not None else 0))
                if bad is not None:
                    self._count(num_refused=1)
                    log.warning("%s", bad)
                    ok, meta, tensors = False, {"error": str(bad)}, []
                else:
                    try:
                        ok, meta, tensors = self._serve(src, *decode(body, env_len))
                    except WireError as e:
                        ok, meta, tensors = False, {"error": str(e)}, []
                self._send_reply(src, ok, call_id, meta, tensors)
                if not recv.is_completed():      # idle: hand back the OpenMP team, off the
                    release_pool()               # caller's wait (fabric/threads.py)
            except _Unreceivable as e:           # nothing more of this peer can be trusted
                self._drop_peer(src, e.error)
                return
            except Exception as e:                # the peer died or the link broke
                if not self.closed:
                    log.warning("rank %d stops serving rank %d: %s", self.rank, src, e)
                self._dead_peers.add(src)
                return

    def _check_frame(self, what: str, src: int, kind: int, call_id: int, env_len: int,
                     body_len: int, inline: int, expected_call_id: int | None = None
                     ) -> WireError | None:
        """The error for a bad frame header, or None; raises `_Unreceivable` when the rest of the
        frame cannot be taken off the wire (see the class notes)."""
        kinds = (REQUEST,) if expected_call_id is None else (REPLY, ERROR)
        problem, receivable = frame_problem(kind, call_id, env_len, body_len, inline, kinds=kinds,
                                            inline_bytes=self.inline_bytes,
                                            max_message_bytes=self.max_message_bytes,
                                            expected_call_id=expected_call_id)
        if problem is None:
            return None
        error = WireError(f"rank {self.rank}: a {what} frame from rank {src} announces "
                          f"body_len={body_len}, env_len={env_len}, inline={inline}: {problem}")
        if not receivable:
            raise _Unreceivable(error)
        return error

    def _drop_peer(self, peer: int, error: Exception) -> None:
        """Neither serve nor call `peer` any more; say goodbye so its calls here fail at once."""
        self._count(num_refused=1)
        self._dropped[peer] = str(error)
        log.warning("rank %d drops rank %d (no more calls either way): %s", self.rank, peer, error)
        self._send_bye(peer)

    # ---- calling -------------------------------------------------------------------------
    def _start_call(self, dst: int, meta: dict, tensors: Tensors) -> _Pending:
        self._check_call(dst)
        self._count(num_calls=1)
        if dst == self.rank:
            return _Pending(dst, local=(meta, tensors))
        if dst in self._closed_peers:
            raise TransportError(f"rank {self.rank}: rank {dst} has closed its transport")
        if dst in self._dropped:
            raise TransportError(f"rank {self.rank}: rank {dst} was dropped after a frame that "
                                 f"could not be taken: {self._dropped[dst]}")
        if dst in self._dead_peers:
            raise TransportError(f"rank {self.rank}: rank {dst} is unreachable (it died, or an "
                                 f"earlier call to it timed out)")
        buf, env_len = encode(meta, tensors, reserve=HEADER_BYTES)
        self._check_outgoing(dst, buf.numel() - HEADER_BYTES, "a request")
        call_id = next(self._ids) % _MAX_CALL_ID + 1
        reply, frame = self._post_frame(dst, _tag(call_id, 1))  # posted before the request is sent
        try:
            sends, keep = self._send_encoded(dst, REQUEST, call_id, TAG_REQUEST, _tag(call_id, 0),
                                             buf, env_len)
        except RuntimeError as e:
            raise TransportError(f"rank {self.rank}: sending to rank {dst} failed: {e}") from None
        return _Pending(dst, call_id, reply, frame, sends, keep)

    def _finish_call(self, p: _Pending) -> Reply:
        if p.local is not None:
            return self._call_local(*p.local)
        try:
            for w in p.sends:
                w.wait(self._wait_s)
            p.reply.wait(self._wait_s)
            kind, call_id, env_len, body_len, inline = self._parse(p.frame, p.dst)
            bad = self._check_frame("reply", p.dst, kind, call_id, env_len, body_len, inline,
                                    p.call_id)
            body = None
            if bad is None or not inline:
                body = self._body(p.dst, p.frame, p.call_id, 2, body_len, inline)
        except RuntimeError as e:
            raise TransportError(f"rank {self.rank}: call to rank {p.dst} failed (no reply within "
                                 f"{self.timeout_s} s, or the peer is gone; a timed-out link stays "
                                 f"closed): {e}") from None
        except _Unreceivable as e:
            self._drop_peer(p.dst, e.error)
            raise e.error from None
        self._count(bytes_received=HEADER_BYTES + (body.numel() if body is not None else 0))
        if bad is not None:
            self._count(num_refused=1)
            raise bad
        meta, tensors = decode(body, env_len)
        if kind == ERROR:
            raise self._remote_error(p.dst, meta)
        return meta, tensors

    # ---- frames --------------------------------------------------------------------------
    def _post_frame(self, src: int, tag: int):
        frame = torch.empty(self.inline_bytes, dtype=torch.uint8)
        return self._pg.recv([frame], src, tag), frame

    def _parse(self, frame: torch.Tensor, src: int) -> tuple[int, int, int, int, int]:
        magic, kind, call_id, _, env_len, body_len, inline, _ = _HEADER.unpack_from(frame.numpy())
        if magic != _MAGIC:
            raise _Unreceivable(WireError(f"rank {self.rank}: a frame from rank {src} has a bad "
                                          f"magic number"))
        return kind, call_id, env_len, body_len, inline

    def _body(self, src: int, frame: torch.Tensor, call_id: int, part: int, body_len: int,
              inline: int) -> torch.Tensor:
        """The frame's message body; `body_len` was checked (`_check_frame`) before this."""
        if inline:
            return frame[HEADER_BYTES:HEADER_BYTES + body_len]
        body = torch.empty(body_len, dtype=torch.uint8)
        self._pg.recv([body], src, _tag(call_id, part)).wait(self._wait_s)
        return body

    def _send_reply(self, dst: int, ok: bool, call_id: int, meta: dict, tensors: Tensors) -> None:
        kind = REPLY if ok else ERROR
        try:
            buf, env_len = encode(meta, tensors, reserve=HEADER_BYTES)
            self._check_outgoing(dst, buf.numel() - HEADER_BYTES, "a reply")
        except WireError as e:           # a handler's reply that cannot travel
            kind, (buf, env_len) = ERROR, encode({"error": str(e)}, [], reserve=HEADER_BYTES)
        sends, _ = self._send_encoded(dst, kind, call_id, _tag(call_id, 1), _tag(call_id, 2),
                                      buf, env_len)
        for w in sends:                  # the caller posted its receive: this returns quickly
            w.wait(self._wait_s)

    def _send_encoded(self, dst: int, kind: int, call_id: int, frame_tag: int, body_tag: int,
                      buf: torch.Tensor, env_len: int) -> tuple[list, tuple]:
        body_len = buf.numel() - HEADER_BYTES
        inline = buf.numel() <= self.inline_bytes
        header = np.frombuffer(_HEADER.pack(_MAGIC, kind, call_id, self.rank, env_len, body_len,
                                            int(inline), 0), dtype=np.uint8)
        self._count(bytes_sent=buf.numel())
        if inline:
            buf.numpy()[:HEADER_BYTES] = header
            return [self._pg.send([buf], dst, frame_tag)], (buf,)
        head = torch.from_numpy(header.copy())
        return [self._pg.send([head], dst, frame_tag),
                self._pg.send([buf[HEADER_BYTES:]], dst, body_tag)], (head, buf)

    def _send_bye(self, dst: int) -> None:
        """Goodbye to `dst` (once): its service thread for this rank ends. Not waited on: the
        thread takes it when it can."""
        if dst in self._bye_sent or dst in self._dead_peers:
            return
        self._bye_sent.add(dst)
        try:
            self._byes.append(self._send_encoded(dst, BYE, 0, TAG_REQUEST, 0,
                                                 *encode({}, [], reserve=HEADER_BYTES)))
        except RuntimeError:
            pass

    # ---- shutdown ------------------------------------------------------------------------
    def close(self, wait_s: float = 0.0) -> None:
        """Tell every peer this rank is gone (their service threads for it end) and stop calling.
        This rank's own service threads end when their peers close or die; until then they
        answer requests with an error. With `wait_s` > 0, wait that long for them."""
        if not self.closed:
            self.closed = True
            for dst in range(self.world_size):
                if dst != self.rank:
                    self._send_bye(dst)
        for t in self._threads:
            t.join(wait_s)

    def is_serving(self) -> bool:
        return any(t.is_alive() for t in self._threads)


class _Unreceivable(Exception):
    """A frame whose rest cannot be taken off the wire: its peer is dropped (`error` says why)."""

    def __init__(self, error: WireError):
        super().__init__(str(error))
        self.error = error


# ---- Ray actor calls -------------------------------------------------------------------------
class RayTransport(_Endpoint):
    """Request/response through a Ray actor method of the destination.

    `peers[r]` is rank r's actor (a handle, or a name looked up with `ray.get_actor` on first use,
    in `namespace`); its `method` (default `_transport_handle`, see `TransportHost`) must forward
    to this class's `handle_ray_call`. The envelope travels as bytes and the tensors as one numpy
    uint8 array. No thread of its own: requests are served on the hosting actor's threads, so
    the actor must be threaded with threads to spare for incoming calls while its own calls wait
    (`TransportHost` gives the method its own concurrency group for that).

    `max_message_bytes` caps a message's envelope plus tensors as on the torch backend: a
    sender refuses a bigger one with `WireError`, and `handle_ray_call` answers a bigger call
    with an error (the caller gets `TransportError`). Here the bytes have already arrived through
    Ray's object transfer when the check runs (Ray's own limits bound that), so the cap keeps
    oversized work from the handler, not memory from Ray; every call stands alone, so the peer
    is served on as before.
    """

    def __init__(self, rank: int, world_size: int, peers: list, *, master_addr=None,
                 master_port=None, method: str = "_transport_handle", namespace: str | None = None,
                 timeout_s: float = 300.0, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES):
        super().__init__(rank, world_size, timeout_s, max_message_bytes)
        if len(peers) != world_size:
            raise ValueError(f"peers has {len(peers)} entries, world_size is {world_size}")
        self.peers, self.method, self.namespace = list(peers), method, namespace

    def _peer(self, dst: int):
        if isinstance(self.peers[dst], str):
            self.peers[dst] = ray.get_actor(self.peers[dst], namespace=self.namespace)
        return self.peers[dst]

    def _start_call(self, dst: int, meta: dict, tensors: Tensors):
        self._check_call(dst)
        self._count(num_calls=1)
        if dst == self.rank:
            return dst, (meta, tensors)
        envelope, region = encode_split(meta, tensors)
        self._check_outgoing(dst, len(envelope) + region.numel(), "a request")
        self._count(bytes_sent=len(envelope) + region.numel())
        method = getattr(self._peer(dst), self.method)
        return dst, method.remote(self.rank, envelope, region.numpy())

    def _finish_call(self, p) -> Reply:
        dst, ref = p
        if isinstance(ref, tuple):
            return self._call_local(*ref)
        try:
            ok, envelope, payload = ray.get(ref, timeout=self.timeout_s)
        except Exception as e:
            raise TransportError(f"rank {self.rank}: call to rank {dst} failed: "
                                 f"{type(e).__name__}: {e}") from None
        problem = self._message_problem("reply", dst, envelope, payload)
        if problem is not None:
            self._count(num_refused=1)
            raise problem
        self._count(bytes_received=len(envelope) + payload.nbytes)
        meta, tensors = decode_split(envelope, _from_numpy(payload))
        if not ok:
            raise self._remote_error(dst, meta)
        return meta, tensors

    def _message_problem(self, what: str, src: int, envelope, payload) -> WireError | None:
        if not isinstance(envelope, bytes) or not isinstance(payload, np.ndarray) \
                or payload.dtype != np.uint8 or payload.ndim != 1:
            return WireError(f"rank {self.rank}: a {what} from rank {src} is not (bytes, 1-d "
                             f"uint8 array): {type(envelope).__name__}, "
                             f"{getattr(payload, 'dtype', type(payload).__name__)}")
        n = len(envelope) + payload.nbytes
        if n > self.max_message_bytes:
            return WireError(f"rank {self.rank}: a {what} from rank {src} is {n} bytes "
                             f"(envelope {len(envelope)}, tensors {payload.nbytes}), more than "
                             f"max_message_bytes={self.max_message_bytes}")
        return None

    def handle_ray_call(self, src: int, envelope: bytes, payload: np.ndarray):
        """Serve one call arriving through the hosting actor: returns (ok, envelope, payload)."""
        problem = self._message_problem("call", src, envelope, payload)
        if problem is not None:
            self._count(num_refused=1)
            log.warning("%s", problem)
            envelope, region = encode_split({"error": str(problem)}, [])
            return False, envelope, region.numpy()
        self._count(bytes_received=len(envelope) + payload.nbytes)
        try:
            try:
                ok, meta, tensors = self._serve(src, *decode_split(envelope, _from_numpy(payload)))
            finally:
                release_pool()           # Ray's thread: before the reply (fabric/threads.py)
            envelope, region = encode_split(meta, tensors)
            self._check_outgoing(src, len(envelope) + region.numel(), "a reply")
        except WireError as e:
            ok, (envelope, region) = False, encode_split({"error": str(e)}, [])
        self._count(bytes_sent=len(envelope) + region.numel())
        return ok, envelope, region.numpy()

    def close(self, wait_s: float = 0.0) -> None:
        self.closed = True


def _from_numpy(a: np.ndarray) -> torch.Tensor:
    # Ray hands large arrays over zero-copy from the object store, read-only: copy those, so the
    # tensors a handler gets are its own (and writable, as over gloo).
    return torch.from_numpy(a if a.flags.writeable else a.copy())


TRANSPORTS: dict[str, type[Transport]] = {"torch": TorchTransport, "ray": RayTransport}


# ---- hosting in a Ray actor ------------------------------------------------------------------
TRANSPORT_GROUP = "transport"


def transport_actor_options(max_concurrency: int = 8, transport_threads: int = 8) -> dict:
    """`ray.remote` options for a `TransportHost` actor: threaded, and a concurrency group of its
    own for incoming Ray-backend calls, so they are served even when all other threads wait."""
    return {"max_concurrency": max_concurrency,
            "concurrency_groups": {TRANSPORT_GROUP: transport_threads}}


class TransportHost:
    """Mixin for a Ray actor class hosting one endpoint: `ray.remote(**transport_actor_options())`.

    The class defines `serve_transport(src, meta, tensors) -> (meta, tensors)`. The driver calls
    `connect_group(actors, backend)`, which calls `setup_transport` on all actors concurrently.
    """

    transport: Transport | None = None

    def serve_transport(self, src: int, meta: dict, tensors: Tensors) -> Reply:
        raise NotImplementedError

    def transport_address(self) -> tuple[str, int]:
        """(node IP, free port) of this actor: rank 0's is the group's rendezvous address."""
        return ray.util.get_node_ip_address(), find_free_port()

    def setup_transport(self, rank: int, world_size: int, master_addr: str, master_port: int,
                        backend: str, peers: list, **options) -> bool:
        if self.transport is not None:
            self.close_transport()
        if backend == "torch":
            options.setdefault("local_addr", ray.util.get_node_ip_address())
        self.transport = create_transport(backend, rank=rank, world_size=world_size,
                                          master_addr=master_addr, master_port=master_port,
                                          peers=peers, **options)
        _ready(self).set()
        self.transport.start(self.serve_transport)   # calls that arrive first wait for this
        return True

    def prepare_transport(self, rank: int, world_size: int, master_addr: str, master_port: int,
                          backend: str, peers: list, **options) -> bool:
        """Join a new group beside the current one (a collective, like `setup_transport`): it
        serves at once, but this actor keeps calling on the current group until
        `swap_transport`. Lets a fabric change members without stopping to rebuild."""
        if backend == "torch":
            options.setdefault("local_addr", ray.util.get_node_ip_address())
        fresh = create_transport(backend, rank=rank, world_size=world_size, master_addr=master_addr,
                                 master_port=master_port, peers=peers, **options)
        fresh.start(self.serve_transport)
        self.__dict__["_next_transport"] = fresh
        return True

    def swap_transport(self) -> None:
        """Call on the prepared group from now on; the old one serves until `close_old_transports`."""
        old, self.transport = self.transport, self.__dict__.pop("_next_transport")
        if old is not None:
            self.__dict__.setdefault("_old_transports", []).append(old)

    def close_old_transports(self, wait_s: float = 0.0) -> bool:
        olds = self.__dict__.pop("_old_transports", [])
        for t in olds:
            t.close(wait_s)
        return not any(t.is_serving() for t in olds)

    def close_transport(self, wait_s: float = 0.0) -> bool:
        """Close the endpoint (kept, so that late calls get a clear "closed" error); True once its
        service threads have ended, which needs every peer to have closed too."""
        if self.transport is None:
            return True
        self.transport.close(wait_s)
        return not self.transport.is_serving()

    def transport_stats(self) -> dict:
        return self.transport.stats() if self.transport is not None else {}

    @ray.method(concurrency_group=TRANSPORT_GROUP)
    def _transport_handle(self, src: int, envelope: bytes, payload: np.ndarray):
        transport = self.transport
        if transport is None and _ready(self).wait(60.0):
            transport = self.transport    # a peer finished set-up before this actor did
        if transport is None:
            envelope, region = encode_split({"error": "no transport is set up here"}, [])
            return False, envelope, region.numpy()
        return transport.handle_ray_call(src, envelope, payload)


_ready_lock = threading.Lock()


def _ready(host) -> threading.Event:
    with _ready_lock:
        if "_transport_ready" not in host.__dict__:
            host._transport_ready = threading.Event()
        return host._transport_ready


def connect_group(actors: list, backend: str = "torch", timeout_s: float = 120.0,
                  **options) -> None:
    """Make `actors` (TransportHost actors) ranks 0..n-1 of one transport group."""
    addr, port = ray.get(actors[0].transport_address.remote(), timeout=timeout_s)
    ray.get([a.setup_transport.remote(r, len(actors), addr, port, backend, actors, **options)
             for r, a in enumerate(actors)], timeout=timeout_s)


def close_group(actors: list, wait_s: float = 10.0) -> bool:
    """Close every actor's endpoint concurrently; True if all service threads ended."""
    return all(ray.get([a.close_transport.remote(wait_s) for a in actors], timeout=wait_s + 30))
