"""A request as the engine sees it: tokens so far, how many have KV, timings."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from fabric.context import BlockTable


@dataclass(slots=True)
class SamplingParams:
    max_new_tokens: int = 16
    temperature: float = 0.0
    seed: int | None = None
    ignore_eos: bool = False
    top_p: float = 1.0                   # nucleus sampling; 1 = off
    top_k: int = 0                       # keep the k most likely tokens; 0 = off
    stop: tuple = ()                     # strings that end generation (cut from the text)
    stop_token_ids: tuple = ()           # token ids that end generation (kept in `tokens`)
    # a turn of a session (multi-turn chat, agent): its KV stays protected in the pool for
    # `ttl_s` seconds after it ends, for the session's next turn (fabric/prefix_cache.py)
    session_id: str | None = None
    ttl_s: float | None = None           # None: the fabric's prefix_cache.session_ttl_s

    @classmethod
    def from_request(cls, r: dict) -> "SamplingParams":
        """From a request mapping (the keys of `Fabric.submit`); values are checked later, by
        `check_request`. A single stop string may be given as a string."""
        return cls(r.get("max_new_tokens", 16), r.get("temperature", 0.0), r.get("seed"),
                   r.get("ignore_eos", False), r.get("top_p", 1.0), r.get("top_k", 0),
                   _as_tuple(r.get("stop")), _as_tuple(r.get("stop_token_ids")),
                   r.get("session_id"), r.get("ttl_s"))

    def to_request(self) -> dict:
        return {"max_new_tokens": self.max_new_tokens, "temperature": self.temperature,
                "seed": self.seed, "ignore_eos": self.ignore_eos, "top_p": self.top_p,
                "top_k": self.top_k, "stop": list(self.stop),
                "stop_token_ids": list(self.stop_token_ids), "session_id": self.session_id,
                "ttl_s": self.ttl_s}


def _as_tuple(value) -> tuple:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)


@dataclass(eq=False)
class Sequence:
    req_id: str
    prompt: list[int]
    params: SamplingParams
    output: list[int] = field(default_factory=list)
    num_computed: int = 0                  # tokens whose KV is in the cache
    finish_reason: str | None = None
    arrival: float = field(default_factory=time.perf_counter)
    scheduled_at: float | None = None      # its first step (`queued_s` ends here)
    prefix_fetch_s: float = 0.0            # before admission: a peer's prefix, a tier lookup
    first_token_at: float | None = None
    finished_at: float | None = None
    num_preemptions: int = 0
    stalled_since: float | None = None     # waiting for memory since (perf_counter)
    generator: torch.Generator | None = None
    detok: object = None                   # fabric.detokenize.Detokenizer, set by the engine
    # prefix caching (fabric/prefix_cache.py), kept by the scheduler and engine
    block_hashes: list = field(default_factory=list)   # hash chain of its full blocks
    num_registered: int = 0                # leading blocks known to the cache (or leased)
    inflight: list = field(default_factory=list)       # hashes of prompt blocks it computes
    cached_tokens: int = 0                 # prompt tokens served from a cache at admission
    prefix_counted: bool = False           # its first admission was counted in the stats
    lease: tuple | None = None             # (holder, first block, block ids) pinned there
    # KV tiers (fabric/tiers.py): prompt blocks coming up from the node's host or disk tier
    tier_plan: tuple | None = None         # (first position, hashes, way, head share,
                                           #  parallel seconds): found below
    tier_load: object = None               # fabric.tiers.TierLoad while it runs
    tier: dict = field(default_factory=dict)   # how its prefix came up, for `metrics`
    block_table: BlockTable = field(default_factory=BlockTable)   # its table's tensor, per step

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.output

    def token_range(self, start: int, stop: int) -> list[int]:
        """`tokens[start:stop]`, without copying the whole of `tokens` (every step does this)."""
        p = len(self.prompt)
        if start >= p:
            return self.output[start - p: stop - p]
        if stop <= p:
            return self.prompt[start:stop]
        return self.prompt[start:] + self.output[:stop - p]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)

    @property
    def token_view(self) -> "TokenView":
        """`tokens` as `len` and slices only, without building the whole list."""
        return TokenView(self)

    @property
    def max_tokens(self) -> int:
        return len(self.prompt) + self.params.max_new_tokens

    @property
    def is_finished(self) -> bool:
        return self.finish_reason is not None

    def metrics(self) -> dict:
        end = self.finished_at or time.perf_counter()
        ttft = (self.first_token_at or end) - self.arrival
        n = len(self.output)
        tpot = (end - self.first_token_at) / (n - 1) if self.first_token_at and n > 1 else 0.0
        queued = (self.scheduled_at or end) - self.arrival
        return {"ttft_s": ttft, "tpot_s": tpot, "latency_s": end - self.arrival, "queued_s": queued,
                "prefix_fetch_s": self.prefix_fetch_s,
                "num_prompt_tokens": len(self.prompt), "num_output_tokens": n,
                "num_preemptions": self.num_preemptions, "cached_tokens": self.cached_tokens,
                **self.tier}


class TokenView:
    """A sequence's tokens (prompt + output) for readers that take `len` and slices: each
    slice is built from the two lists (`Sequence.token_range`), never the whole concatenation.
    The detokenizer reads a few tokens per generated token through one."""
    __slots__ = ("seq",)

    def __init__(self, seq: Sequence):
        self.seq = seq

    def __len__(self) -> int:
        return self.seq.num_tokens

    def __getitem__(self, index: slice) -> list[int]:
        start, stop, step = index.indices(len(self))
        if step != 1:
            raise ValueError("a token view takes slices with step 1")
        return self.seq.token_range(start, max(start, stop))
