"""The one-instance engine: a model, its paged KV pool, an rManager and a scheduler.

Free of Ray: each instance actor hosts one, and tests drive it in one process. With
`remote` set (by the actor), requests whose blocks live on other instances attend there.
"""

from __future__ import annotations

import itertools
import time

import torch

from fabric.context import SeqChunk, build_context
from fabric.detokenize import Detokenizer
from fabric.distattn import DistAttention, RemotePartials
from fabric.errors import CapacityError, FabricError, RequestError
from fabric.kv_cache import KVCache
from fabric.model import Transformer
from fabric.prefix_cache import HASH_BYTES, ReuseCosts
from fabric.rmanager import BlockRef, RManager
from fabric.sampling import sample
from fabric.scheduler import Scheduler
from fabric.sequence import SamplingParams, Sequence


class Engine:
    def __init__(self, model: Transformer, kv_blocks: int, block_size: int, *, instance_id: int = 0,
                 max_num_seqs: int = 32, max_batch_tokens: int = 256, max_lend_fraction: float = 0.95,
                 min_free_fraction: float = 0.03, backend: str = "auto",
                 prefix_cache: bool = True, prefix_salt: bytes | None = None):
        args = model.args
        self.model, self.args, self.backend = model, args, backend
        self.instance_id = instance_id
        self.device = next(model.parameters()).device
        dtype = next(model.parameters()).dtype
        self.kv = KVCache(args.num_layers, kv_blocks, block_size, args.num_kv_heads, args.head_dim,
                          dtype, self.device)
        self.rm = RManager(instance_id, kv_blocks, block_size, max_lend_fraction, min_free_fraction,
                           prefix_cache)
        self.scheduler = Scheduler(self.rm, max_num_seqs, max_batch_tokens)
        if prefix_cache:      # the salt names the model: same tokens, other weights, other KV
            self.scheduler.salt = prefix_salt or salt_of_args(args)
        self.scale = args.head_dim ** -0.5
        self.remote: RemotePartials | None = None
        self.max_request_blocks = kv_blocks      # the fabric raises it to what lending allows
        # the hosting actor sets these from the checkpoint: text of each output (stop strings,
        # streamed text) and the ids that end generation (the generation config's EOS)
        self.tokenizer = None
        self.eos_token_ids: set[int] = {args.eos_token_id} if args.eos_token_id is not None else set()
        self.seqs: dict[str, Sequence] = {}
        self._ids = itertools.count()
        self.num_generated = 0
        self.num_steps = 0
        self.reuse_costs = ReuseCosts()     # how to use another instance's cached prefix
        self.tier_sink = None               # (hashes, k, v) of evicted cached blocks: tiers below

    # ---- KV tiers ----------------------------------------------------------------------------
    def set_tier_sink(self, sink) -> None:
        """Evicted cached blocks go to `sink(hashes, k, v)` (k, v: `[L, n, block_size, H_kv,
        D]` copies, made before the pool reuses the blocks) instead of being lost."""
        self.tier_sink = sink
        self.rm.spill_fn = self._spill if sink is not None else None

    def _spill(self, victims: list[tuple[int, bytes]]) -> None:
        k, v = self.kv.read_blocks([b for b, _ in victims])
        self.tier_sink([h for _, h in victims], k, v)

    @property
    def block_shape(self) -> tuple:
        """One block's k (or v) over all layers: what a tier stores per block, twice."""
        a = self.args
        return (a.num_layers, self.rm.block_size, a.num_kv_heads, a.head_dim)

    # ---- requests ------------------------------------------------------------------------
    def validate(self, prompt: list[int], params: SamplingParams) -> None:
        """Raise `RequestError` / `CapacityError` for a request that must not be admitted."""
        check_request(prompt, params, self.args.vocab_size, self.args.max_position_embeddings)
        if params.stop and self.tokenizer is None:
            raise RequestError("stop strings need a tokenizer, and this checkpoint has none")
        check_capacity(len(prompt) + params.max_new_tokens, self.rm.block_size, self.max_request_blocks)

    def add_request(self, prompt: list[int], params: SamplingParams, req_id: str | None = None,
                    arrival: float | None = None, prefix_fetch_s: float = 0.0) -> str:
        """Queue a request; `arrival` (`time.perf_counter()` in this process) is when it reached
        the instance, so that its TTFT counts what happened before admission (a prefix copied
        or leased from a peer, a tier lookup, the inbox); default: now. `prefix_fetch_s`: the
        part of that spent fetching or looking up its prefix (reported in `metrics`)."""
        self.validate(prompt, params)
        req_id = req_id if req_id is not None else f"{self.instance_id}-{next(self._ids)}"
        if req_id in self.seqs:
            raise RequestError(f"request id {req_id!r} is already in use")
        seq = Sequence(req_id, list(prompt), params, prefix_fetch_s=prefix_fetch_s)
        if arrival is not None:
            seq.arrival = arrival
        self.attach_detokenizer(seq)
        self.seqs[req_id] = seq
        self.scheduler.add(seq)
        return req_id

    def attach_detokenizer(self, seq: Sequence, state: dict | None = None) -> None:
        """Give `seq` its incremental detokenizer (`state`: where a hand-off left it)."""
        if self.tokenizer is not None:
            seq.detok = Detokenizer(self.tokenizer, len(seq.prompt), seq.params.stop)
            if state:
                seq.detok.restore(state)

    def abort(self, req_id: str) -> None:
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            seq.finish_reason = "abort"
            self.scheduler.remove(seq)

    def prefix_stats(self) -> dict:
        """Prefix-cache counters of this engine: `queries` and `hits` in prompt tokens at first
        admission (a recompute is never a hit), cached and evictable blocks, evictions."""
        rm, p = self.rm, self.scheduler.prefix
        return {"enabled": self.scheduler.salt is not None, "queries": p["queries"],
                "hits": p["hits"], "leased_hits": p["leased_hits"],
                "hit_rate": p["hits"] / p["queries"] if p["queries"] else 0.0,
                "blocks_cached": len(rm.cache), "blocks_evictable": rm.cache.num_evictable,
                "evictions": rm.cache.num_evictions,
                "sessions": len(rm.cache.sessions), "blocks_protected": len(rm.cache.protected),
                "session_expiries": rm.cache.num_session_expiries,
                "session_evictions_under_pressure": rm.cache.num_session_evictions,
                "blocks_pinned_for_others": sum(len(p) for p in rm.leases.values())}

    def reset_prefix_cache(self) -> int:
        """Evict every cached block no request uses; returns how many."""
        return self.rm.clear_cache()

    def has_unfinished(self) -> bool:
        return self.scheduler.num_unfinished > 0

    # ---- hand-off (elastic scale-down; actors/handoff.py moves the data) -------------------
    def export(self, req_ids: list[str] | None = None) -> list[dict]:
        """What a hand-off carries of each request (`req_ids`; default all, running first):
        tokens, sampling and detokenizer state, timings, how many tokens have KV, and where
        the KV of their blocks is (`blocks`, in table order: read by `read_kv`). A lease, a
        tier plan and a tier load in flight are this instance's and stay here (`handed_off`
        lets them go); the target computes what they would have brought. Under the books lock."""
        seqs = [*self.scheduler.running, *self.scheduler.waiting] if req_ids is None else \
            [self.seqs[r] for r in req_ids]
        states = []
        for seq in seqs:
            nb = self.rm.blocks_for(seq.num_computed)
            blocks = self.rm.tables[seq.req_id][:nb] if nb else []
            states.append(_state_of(seq) | {"blocks": blocks})
        return states

    def read_kv(self, blocks: list[BlockRef], read_remote) -> tuple:
        """The KV of `blocks` (`[L, n, block_size, H_kv, D]` each, in their order, on the CPU):
        this pool's read here, the others' by `read_remote(instance, ids) -> (k, v)` (over the
        data plane); (None, None) for no blocks. Without the books lock, while no step runs:
        the blocks stay their requests'."""
        if not blocks:
            return None, None
        kv = self.kv
        k = torch.empty((kv.k.shape[0], len(blocks), *kv.k.shape[2:]), dtype=kv.k.dtype)
        v = torch.empty_like(k)
        by_owner: dict[int, list[int]] = {}
        for pos, ref in enumerate(blocks):
            by_owner.setdefault(ref.instance, []).append(pos)
        for owner, positions in by_owner.items():
            ids = [blocks[p].block for p in positions]
            bk, bv = kv.read_blocks(ids) if owner == self.instance_id else read_remote(owner, ids)
            k[:, positions], v[:, positions] = bk.cpu(), bv.cpu()
        return k, v

    def read_for(self, reader: int, ids: list[int]) -> tuple:
        """The KV of blocks held here for `reader` (lent, or pinned as a cached prefix), which
        it moves in a hand-off or copies; `ValueError` for any other block."""
        if not self.rm.holds_for(reader, ids, read_only=True):
            raise ValueError(f"instance {reader} asked for blocks it did not borrow here")
        return self.kv.read_blocks(ids)

    def adopt(self, state: dict, k=None, v=None) -> dict:
        """Take over a request another instance handed off (`state`: its `export`, or
        `fresh_state`; `k`, `v`: the KV of its computed tokens, or None). The KV goes into free
        local blocks and the request runs on from where it was; without room (or KV) it is
        recomputed from its tokens. Returns {"moved_blocks", "recomputed"}. Under the books lock."""
        seq = _sequence_of(state)
        if seq.num_computed == 0:
            self.validate(seq.prompt, seq.params)      # new here: checked as on admission
        if seq.req_id in self.seqs:
            raise FabricError(f"request {seq.req_id!r} is already running here")
        self.attach_detokenizer(seq, state.get("detok"))
        rm, sched = self.rm, self.scheduler
        nb = rm.blocks_for(seq.num_computed)
        moved = k is not None and 0 < nb <= rm.num_free
        if moved:
            rm.allocate(seq.req_id, seq.num_computed, may_borrow=False)   # local blocks only
            self.kv.write_blocks([r.block for r in rm.tables[seq.req_id]], k, v)
            sched.running.append(seq)
            sched.computed(seq)                # its full blocks are cached here from now on
        else:
            recomputed = seq.num_computed > 0
            seq.num_computed = 0
            seq.num_preemptions += int(recomputed)
            sched.waiting.appendleft(seq)
        self.seqs[seq.req_id] = seq
        return {"moved_blocks": nb if moved else 0, "recomputed": not moved and nb > 0}

    def handed_off(self, req_id: str) -> None:
        """`req_id` runs on another instance now: forget it here (`Scheduler.remove` frees its
        blocks, unpins its lease and cancels its tier load in flight)."""
        seq = self.seqs.pop(req_id, None)
        if seq is not None:
            self.scheduler.remove(seq)

    def plan_relocation(self, creditor: int) -> tuple[list, int]:
        """`creditor` is leaving. Leases of its cache that waiting requests have not used yet
        are dropped, and running requests that cannot move are preempted (recomputed later):
        no room here, or they read its cache. Returns the others' moves, as (seq, table
        positions, block ids there), and how many were preempted. Under the books lock; the
        caller reads each move's KV from `creditor` without it, then `relocate`s."""
        rm, sched = self.rm, self.scheduler
        for seq in sched.waiting:
            if seq.lease is not None and seq.lease[0] == creditor:
                sched.drop_lease(seq)
        moves, preempted, room = [], 0, rm.num_free
        for seq in list(sched.running):
            table = rm.tables.get(seq.req_id, [])
            pos = [i for i, r in enumerate(table) if r.instance == creditor]
            if not pos:
                continue
            a, b = rm.lease_span.get(seq.req_id, (0, 0))
            if len(pos) > room or any(a <= i < b for i in pos):
                sched.preempt(seq)
                preempted += 1
                continue
            room -= len(pos)
            moves.append((seq, pos, [table[i].block for i in pos]))
        return moves, preempted

    def relocate(self, creditor: int, move: tuple, k, v) -> str:
        """Apply a move of `plan_relocation` with its KV, read from `creditor` since then
        without the books lock, so checked again: "moved" (the caller gives the old blocks
        back), "gone" (the request ended or was recomputed meanwhile) or "preempted" (the room
        was taken meanwhile: recomputed later). Under the books lock."""
        seq, positions, old = move
        table = self.rm.tables.get(seq.req_id, [])
        if [table[i] for i in positions if i < len(table)] != [BlockRef(creditor, b) for b in old]:
            return "gone"
        new = self.rm.move_home(seq.req_id, creditor, positions)
        if new is None:
            self.scheduler.preempt(seq)
            return "preempted"
        self.kv.write_blocks(new, k, v)
        return "moved"

    # ---- the step ------------------------------------------------------------------------
    def step(self) -> tuple[list[tuple[Sequence, int]], list[Sequence]]:
        """One forward pass. Returns (new tokens as (seq, token)), finished sequences)."""
        if self.rm.cache.sessions:
            self.rm.cache.expire(time.monotonic())
        batch = self.scheduler.schedule()
        if not batch:
            return [], []
        t0 = time.perf_counter()
        chunks = [SeqChunk(seq.token_range(seq.num_computed, seq.num_computed + n), seq.num_computed,
                           self.rm.tables[seq.req_id], seq.num_computed + n == seq.num_tokens,
                           seq.block_table)
                  for seq, n in batch]
        ctx = build_context(chunks, self.instance_id, self.rm.block_size, self.kv.num_blocks,
                            self.device)
        attn = DistAttention(self.kv, ctx, self.scale, self.remote, self.backend)
        hidden = self.model(ctx.input_ids, ctx.positions, attn)
        logits = self.model.logits(hidden[ctx.logits_idx])
        self.num_steps += 1
        prefill = sum(n for seq, n in batch if n > 1 or seq.num_computed < len(seq.prompt))
        self.reuse_costs.observe_step(prefill, bool(ctx.remote), time.perf_counter() - t0)
        for seq, n in batch:
            seq.num_computed += n
            self.scheduler.computed(seq)
        sampled = [seq for (seq, _), ch in zip(batch, chunks) if ch.sample]
        return self._append(sampled, sample(logits, sampled))

    def _append(self, seqs: list[Sequence], tokens: list[int]):
        now = time.perf_counter()
        new, finished = [], []
        for seq, tok in zip(seqs, tokens):
            seq.output.append(tok)
            seq.first_token_at = seq.first_token_at or now
            new.append((seq, tok))
            self.num_generated += 1
            reason = self._finish_reason(seq, tok)
            if reason:
                seq.finish_reason, seq.finished_at = reason, now
                self.scheduler.remove(seq)
                del self.seqs[seq.req_id]
                finished.append(seq)
        return new, finished

    def _finish_reason(self, seq: Sequence, tok: int) -> str | None:
        stopped = seq.detok is not None and seq.detok.step(seq.token_view)
        if stopped or tok in seq.params.stop_token_ids or \
                (not seq.params.ignore_eos and tok in self.eos_token_ids):
            return "stop"
        if len(seq.output) >= seq.params.max_new_tokens:
            return "length"
        return None

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Sequence]:
        """Run `prompts` to completion on this engine alone (tests, benchmarks)."""
        ids = [self.add_request(p, params) for p in prompts]
        done: dict[str, Sequence] = {}
        while self.has_unfinished():
            for seq in self.step()[1]:
                done[seq.req_id] = seq
        return [done[i] for i in ids]


def fresh_state(req_id: str, prompt: list[int], params: SamplingParams,
                arrival: float | None = None) -> dict:
    """What a hand-off carries of a request never admitted (the target checks it as on
    admission); `arrival` as in `Engine.add_request`."""
    seq = Sequence(req_id, list(prompt), params)
    if arrival is not None:
        seq.arrival = arrival
    return _state_of(seq)


def _state_of(seq: Sequence) -> dict:
    """A request as a hand-off carries it (plain values: it crosses Ray); times as ages, since
    clocks differ between processes."""
    now = time.perf_counter()
    gen = seq.generator
    return {"id": seq.req_id, "prompt": list(seq.prompt), "output": list(seq.output),
            **seq.params.to_request(), "detok": seq.detok.state() if seq.detok else None,
            "num_computed": seq.num_computed, "num_preemptions": seq.num_preemptions,
            "cached_tokens": seq.cached_tokens, "prefix_counted": seq.prefix_counted,
            "tier": dict(seq.tier), "age_s": now - seq.arrival,
            "first_token_age_s": None if seq.first_token_at is None else now - seq.first_token_at,
            "scheduled_age_s": None if seq.scheduled_at is None else now - seq.scheduled_at,
            "prefix_fetch_s": seq.prefix_fetch_s,
            "generator": None if gen is None else bytes(gen.get_state().numpy())}


def _sequence_of(state: dict) -> Sequence:
    """The request of a hand-off's `state`, with no blocks yet: its hashes are recomputed here
    (`Scheduler.computed`), nothing of the leaving instance's cache or tiers comes with it."""
    now = time.perf_counter()
    params = SamplingParams.from_request(state)
    seq = Sequence(state["id"], list(state["prompt"]), params, output=list(state["output"]),
                   num_computed=state["num_computed"], num_preemptions=state["num_preemptions"])
    seq.cached_tokens, seq.prefix_counted = state["cached_tokens"], state["prefix_counted"]
    seq.tier = dict(state["tier"])
    seq.arrival = now - state["age_s"]
    if state["first_token_age_s"] is not None:
        seq.first_token_at = now - state["first_token_age_s"]
    if state.get("scheduled_age_s") is not None:
        seq.scheduled_at = now - state["scheduled_age_s"]
    seq.prefix_fetch_s = float(state.get("prefix_fetch_s") or 0.0)
    if state["generator"] is not None:
        seq.generator = torch.Generator()
        seq.generator.set_state(torch.frombuffer(bytearray(state["generator"]), dtype=torch.uint8))
    return seq


def salt_of_args(args) -> bytes:
    """A prefix-cache salt for an engine built without a fabric config (tests, benchmarks)."""
    import hashlib

    return hashlib.blake2b(repr(args).encode(), digest_size=HASH_BYTES).digest()


def check_request(prompt, params: SamplingParams, vocab_size: int, max_positions: int) -> None:
    if not isinstance(prompt, (list, tuple)):
        raise RequestError(f"prompt must be a list of token ids or a string, got {type(prompt).__name__}")
    if len(prompt) == 0:
        raise RequestError("prompt is empty")
    for tok in prompt:
        if isinstance(tok, bool) or not isinstance(tok, int):
            raise RequestError(f"prompt token {tok!r} is not an integer id")
        if not 0 <= tok < vocab_size:
            raise RequestError(f"prompt token {tok} is outside the vocabulary ({vocab_size})")
    n = params.max_new_tokens
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {n!r}")
    if len(prompt) + n > max_positions:
        raise RequestError(f"prompt ({len(prompt)} tokens) + max_new_tokens ({n}) exceeds the "
                           f"model's maximum position {max_positions}")
    seed = params.seed
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)
                             or not -2**63 <= seed < 2**64):
        raise RequestError(f"seed must be an integer in [-2**63, 2**64), got {seed!r}")
    if not isinstance(params.ignore_eos, bool):
        raise RequestError(f"ignore_eos must be a boolean, got {params.ignore_eos!r}")
    t = params.temperature
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not t >= 0 or t != t or t == float("inf"):
        raise RequestError(f"temperature must be a finite number >= 0, got {t!r}")
    check_filters(params, vocab_size)
    check_session(params)


MAX_SESSION_ID_CHARS, MAX_TTL_S = 256, 86400.0


def check_session(params: SamplingParams) -> None:
    s, ttl = params.session_id, params.ttl_s
    if s is not None and (not isinstance(s, str) or not 0 < len(s) <= MAX_SESSION_ID_CHARS):
        raise RequestError(f"session_id must be a non-empty string of at most "
                           f"{MAX_SESSION_ID_CHARS} characters, got {s!r}")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, (int, float))
                            or not 0 <= ttl <= MAX_TTL_S):
        raise RequestError(f"ttl_s must be a number of seconds in [0, {MAX_TTL_S:g}], got {ttl!r}")
    if ttl is not None and s is None:
        raise RequestError("ttl_s needs a session_id: it says how long that session's KV is kept")


MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256


def check_filters(params: SamplingParams, vocab_size: int) -> None:
    """top_p, top_k, stop strings and stop token ids of a request."""
    p, k = params.top_p, params.top_k
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 < p <= 1:
        raise RequestError(f"top_p must be a number in (0, 1], got {p!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < -1:
        raise RequestError(f"top_k must be an integer >= 0 (0 or -1: off), got {k!r}")
    if len(params.stop) > MAX_STOP_STRINGS:
        raise RequestError(f"at most {MAX_STOP_STRINGS} stop strings, got {len(params.stop)}")
    for s in params.stop:
        if not isinstance(s, str) or not 0 < len(s) <= MAX_STOP_CHARS:
            raise RequestError(f"stop strings must be non-empty strings of at most "
                               f"{MAX_STOP_CHARS} characters, got {s!r}")
    for t in params.stop_token_ids:
        if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < vocab_size:
            raise RequestError(f"stop token id {t!r} is not an id of the vocabulary ({vocab_size})")


def check_capacity(num_tokens: int, block_size: int, max_blocks: int) -> None:
    need = -(-num_tokens // block_size)
    if need > max_blocks:
        raise CapacityError(f"request needs {need} KV blocks ({num_tokens} tokens of prompt and "
                            f"max_new_tokens) but at most {max_blocks} blocks of {block_size} "
                            f"tokens can hold one request")
