"""The one-instance engine: a model, its paged KV pool, an rManager and a scheduler.

Free of Ray: each instance actor hosts one, and tests drive it in one process. With
`remote` set (by the actor), requests whose blocks live on other instances attend there.
"""

from __future__ import annotations

import itertools
import time


from fabric.context import SeqChunk, build_context
from fabric.detokenize import Detokenizer
from fabric.distattn import DistAttention, RemotePartials
from fabric.errors import CapacityError, RequestError
from fabric.kv_cache import KVCache
from fabric.model import Transformer
from fabric.prefix_cache import HASH_BYTES, ReuseCosts
from fabric.rmanager import RManager
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

    def add_request(self, prompt: list[int], params: SamplingParams, req_id: str | None = None) -> str:
        self.validate(prompt, params)
        req_id = req_id if req_id is not None else f"{self.instance_id}-{next(self._ids)}"
        if req_id in self.seqs:
            raise RequestError(f"request id {req_id!r} is already in use")
        seq = Sequence(req_id, list(prompt), params)
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
        stopped = seq.detok is not None and seq.detok.step(seq.tokens)
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
