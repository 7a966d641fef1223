"""Deterministic, seeded benchmark workloads: prompts as lists of token ids.

Standard library only, so that the project's venv and a peer engine's venv (`.venv-peers`,
see `bench/peers/`) both import it and run exactly the same prompts. Token ids are drawn with
`random.Random(seed)` from `range(1000, vocab_size - 1000)`, clear of the special ids that
vocabularies keep at both ends.

- `shared_prefix`: every request is one common prefix plus its own random suffix; all are
  submitted at once. Keys: `name`, `prompts`, `max_new_tokens`.
- `multi_turn`: sessions of user messages; turn k's prompt is `next_prompt(history, message)`,
  the history being the session's earlier prompts and the engine's answers to them, so it
  can only be built while running. Keys: `name`, `sessions` (per session, one message per
  turn), `turns`, `max_new_tokens`.

`run(workload, generate)` drives either one through an engine; `quick(fn)` builds the
`--quick` size (`QUICK`): shared_prefix 8 requests, prefix 512, own 32, gen 16; multi_turn
2 sessions x 3 turns, first message 128, later messages 32, gen 16.

Serving workloads (`SERVING`, for `bench.serving`): requests with their own output length and
arrival time, read through `requests(workload)` as (arrival_s, prompt, max_new_tokens).

- `fixed`: `num_requests` prompts of `prompt_tokens`, `gen_tokens` each, all at time 0
  (`--quick`: 8 x (128 + 32); default 32 x (256 + 64)).
- `one_request`: one prompt alone, for single-request decode speed (quick 64 + 64; 128 + 128).
- `burstgpt`: BurstGPT-like traffic: gamma inter-arrival times (shape < 1: bursts), prompt
  and output lengths Zipf-like (Pareto tails), clipped to bounds (quick 8 requests; 32).
"""

from __future__ import annotations

import random
from typing import Callable

TokenIds = list[int]
Generate = Callable[[list[TokenIds]], list[TokenIds]]


def _tokens(rng: random.Random, n: int, vocab_size: int) -> TokenIds:
    return [rng.randrange(1000, vocab_size - 1000) for _ in range(n)]


def shared_prefix(num_requests: int = 32, prefix_tokens: int = 1024, own_tokens: int = 64,
                  gen_tokens: int = 32, vocab_size: int = 49152, seed: int = 0) -> dict:
    """`num_requests` prompts: the same `prefix_tokens` prefix, then `own_tokens` of each own."""
    rng = random.Random(seed)
    prefix = _tokens(rng, prefix_tokens, vocab_size)
    prompts = [prefix + _tokens(rng, own_tokens, vocab_size) for _ in range(num_requests)]
    return {"name": "shared_prefix", "prompts": prompts, "max_new_tokens": gen_tokens}


def multi_turn(num_sessions: int = 4, turns: int = 4, first_tokens: int = 256,
               turn_tokens: int = 64, gen_tokens: int = 32, vocab_size: int = 49152,
               seed: int = 0) -> dict:
    """`num_sessions` sessions of `turns` user messages: `first_tokens`, then `turn_tokens` each."""
    rng = random.Random(seed)
    sessions = [[_tokens(rng, first_tokens if t == 0 else turn_tokens, vocab_size)
                 for t in range(turns)] for _ in range(num_sessions)]
    return {"name": "multi_turn", "sessions": sessions, "turns": turns,
            "max_new_tokens": gen_tokens}


def next_prompt(history: TokenIds, message: TokenIds) -> TokenIds:
    """The prompt of a session's next turn: everything so far, then the new message."""
    return history + message


def fixed(num_requests: int = 32, prompt_tokens: int = 256, gen_tokens: int = 64,
          vocab_size: int = 49152, seed: int = 0, name: str = "fixed") -> dict:
    """`num_requests` random prompts of `prompt_tokens`, all arriving at once."""
    rng = random.Random(seed)
    return {"name": name, "prompts": [_tokens(rng, prompt_tokens, vocab_size)
                                      for _ in range(num_requests)],
            "max_new_tokens": [gen_tokens] * num_requests, "arrival_s": [0.0] * num_requests}


def one_request(prompt_tokens: int = 128, gen_tokens: int = 128, vocab_size: int = 49152,
                seed: int = 1) -> dict:
    """One request alone: what a single sequence's decode costs, without batching."""
    return fixed(1, prompt_tokens, gen_tokens, vocab_size, seed, name="one_request")


def _zipf_length(rng: random.Random, low: int, high: int, alpha: float) -> int:
    """A Pareto-tailed length (most near `low`, a few long), clipped to [low, high]."""
    return min(high, int(low * rng.paretovariate(alpha)))


def burstgpt(num_requests: int = 32, rate: float = 1.0, burstiness: float = 0.5,
             prompt_range: tuple[int, int] = (32, 512), gen_range: tuple[int, int] = (8, 128),
             vocab_size: int = 49152, seed: int = 0) -> dict:
    """BurstGPT-like requests: inter-arrival times gamma(shape `burstiness`, mean 1 / `rate`
    seconds), prompt lengths Zipf-like with exponent 1.2, output lengths with 1.5."""
    rng = random.Random(seed)
    t, arrivals, prompts, gens = 0.0, [], [], []
    for _ in range(num_requests):
        arrivals.append(t)
        t += rng.gammavariate(burstiness, 1.0 / (rate * burstiness))
        prompts.append(_tokens(rng, _zipf_length(rng, *prompt_range, 1.2), vocab_size))
        gens.append(_zipf_length(rng, *gen_range, 1.5))
    return {"name": "burstgpt", "prompts": prompts, "max_new_tokens": gens,
            "arrival_s": arrivals}


def requests(workload: dict) -> list[tuple[float, TokenIds, int]]:
    """A serving workload's requests as (arrival_s, prompt, max_new_tokens), in arrival order."""
    return list(zip(workload["arrival_s"], workload["prompts"], workload["max_new_tokens"]))


SERVING: dict[str, Callable[..., dict]] = {"fixed": fixed, "one_request": one_request,
                                           "burstgpt": burstgpt}

WORKLOADS: dict[str, Callable[..., dict]] = {"shared_prefix": shared_prefix,
                                             "multi_turn": multi_turn}

QUICK: dict[str, dict] = {
    "shared_prefix": dict(num_requests=8, prefix_tokens=512, own_tokens=32, gen_tokens=16),
    "multi_turn": dict(num_sessions=2, turns=3, first_tokens=128, turn_tokens=32,
                       gen_tokens=16),
    "fixed": dict(num_requests=8, prompt_tokens=128, gen_tokens=32),
    "one_request": dict(prompt_tokens=64, gen_tokens=64),
    "burstgpt": dict(num_requests=8, prompt_range=(32, 256), gen_range=(8, 64)),
}


def quick(workload_fn: Callable[..., dict], **overrides) -> dict:
    """The `--quick` size of `workload_fn`'s workload (`QUICK`), with any `overrides`."""
    return workload_fn(**{**QUICK[workload_fn.__name__], **overrides})


def run(workload: dict, generate: Generate) -> tuple[list[TokenIds], list[TokenIds]]:
    """Run `workload` through `generate` (a batch of prompts, all submitted at once, to the
    generated token ids of each); returns (prompts, outputs) per request. shared_prefix is one
    batch; multi_turn is one batch per turn, every session's answer appended to its history
    before the next turn, requests ordered turn by turn, then session by session."""
    if workload["name"] == "shared_prefix":
        prompts = workload["prompts"]
        return prompts, generate(prompts)
    histories: list[TokenIds] = [[] for _ in workload["sessions"]]
    all_prompts: list[TokenIds] = []
    all_outputs: list[TokenIds] = []
    for k in range(workload["turns"]):
        prompts = [next_prompt(h, s[k]) for h, s in zip(histories, workload["sessions"])]
        outputs = generate(prompts)
        histories = [p + o for p, o in zip(prompts, outputs)]
        all_prompts += prompts
        all_outputs += outputs
    return all_prompts, all_outputs
