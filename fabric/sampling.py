"""Greedy and seeded temperature sampling."""

from __future__ import annotations

import torch

from fabric.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [N, V] float32 (one row per sequence) -> next token id of each."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, seq in enumerate(seqs):
        t = seq.params.temperature
        if t <= 0:
            out.append(greedy[row])
            continue
        if seq.generator is None:
            seed = seq.params.seed if seq.params.seed is not None else hash(seq.req_id) & 0x7FFFFFFF
            seq.generator = torch.Generator().manual_seed(seed)
        probs = torch.softmax(logits[row].cpu().double() / t, dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=seq.generator)))
    return out
