"""Greedy and seeded sampling: temperature, then top-k, then top-p (nucleus)."""

from __future__ import annotations

import torch

from fabric.sequence import Sequence


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> list[int]:
    """logits [N, V] float32 (one row per sequence) -> next token id of each."""
    greedy = logits.argmax(dim=-1).tolist()
    out = []
    for row, seq in enumerate(seqs):
        p = seq.params
        if p.temperature <= 0:
            out.append(greedy[row])
            continue
        if seq.generator is None:
            seed = p.seed if p.seed is not None else hash(seq.req_id) & 0x7FFFFFFF
            seq.generator = torch.Generator().manual_seed(seed)
        probs = torch.softmax(logits[row].cpu().double() / p.temperature, dim=-1)
        out.append(int(torch.multinomial(filter_probs(probs, p.top_k, p.top_p), 1,
                                         generator=seq.generator)))
    return out


def filter_probs(probs: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Zero all but the `top_k` most likely tokens (0: all), then all but the smallest set whose
    mass reaches `top_p` (1: all); the most likely token always stays. Not renormalised
    (`torch.multinomial` takes weights)."""
    if top_k <= 0 and top_p >= 1.0:
        return probs
    sorted_p, order = probs.sort(descending=True)
    keep = torch.ones_like(sorted_p, dtype=torch.bool)
    if 0 < top_k < keep.numel():
        keep[top_k:] = False
    if top_p < 1.0:
        before = sorted_p.cumsum(0) - sorted_p           # mass of the more likely tokens
        keep &= before < top_p * sorted_p[keep].sum()    # of what top-k left
    keep[0] = True
    out = torch.zeros_like(probs)
    out[order[keep]] = sorted_p[keep]
    return out
