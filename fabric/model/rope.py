"""Rotary position embeddings (rotate-half layout, as Hugging Face Llama/Mixtral), with scaling."""

from __future__ import annotations

import math

import torch

from fabric.model.args import ModelArgs


def inv_frequencies(args: ModelArgs) -> torch.Tensor:
    dim = args.head_dim
    inv_freq = 1.0 / (args.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").double() / dim))
    kind = args.rope_scaling.get("rope_type", "default") if args.rope_scaling else "default"
    if kind == "linear":
        inv_freq = inv_freq / float(args.rope_scaling["factor"])
    elif kind == "llama3":
        inv_freq = _llama3(inv_freq, args.rope_scaling)
    return inv_freq.float()


def _llama3(inv_freq: torch.Tensor, s: dict) -> torch.Tensor:
    factor, low, high = float(s["factor"]), float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_len = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_len / low, old_len / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(torch.nn.Module):
    """cos/sin tables for every position, built once; a step gathers its positions' rows once
    (`gather`) and every layer rotates its q and k with them (`rotate`).

    The sin table is stored with its first half negated, so rotating is x * cos +
    roll(x, D/2) * sin: the same products as Hugging Face's rotate_half, exactly, in fewer ops."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        positions = torch.arange(args.max_position_embeddings, dtype=torch.float32, device="cpu")
        freqs = torch.outer(positions, inv_frequencies(args))        # [P, D/2]
        emb = torch.cat([freqs, freqs], dim=-1)                      # [P, D]
        sin = emb.sin()
        sin[:, : freqs.shape[1]].neg_()
        self.register_buffer("cos", emb.cos(), persistent=False)
        self.register_buffer("sin", sin, persistent=False)

    def gather(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, signed sin [T, 1, D] of `positions` [T], in `dtype`, broadcasting over heads."""
        return (self.cos[positions].unsqueeze(1).to(dtype),
                self.sin[positions].unsqueeze(1).to(dtype))


def rotate(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
    """q [T, H, D], k [T, H_kv, D] rotated by `RotaryEmbedding.gather`'s cos, sin (one pass over
    both: they are joined along the heads, rotated, and split again as views)."""
    qk = torch.cat([q, k], dim=1)
    qk = qk * cos + qk.roll(qk.shape[-1] // 2, dims=-1) * sin
    return qk[:, : q.shape[1]], qk[:, q.shape[1]:]
