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


WORKLOADS: dict[str, Callable[..., dict]] = {"shared_prefix": shared_prefix,
                                             "multi_turn": multi_turn}

QUICK: dict[str, dict] = {
    "shared_prefix": dict(num_requests=8, prefix_tokens=512, own_tokens=32, gen_tokens=16),
    "multi_turn": dict(num_sessions=2, turns=3, first_tokens=128, turn_tokens=32,
                       gen_tokens=16),
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
