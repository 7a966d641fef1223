"""Llama-architecture decoder (Mixtral when `args.num_experts > 0`), one flat token batch per step.

Parameter names follow the Hugging Face checkpoints, so loading is a name-for-name copy.
Attention is delegated to `attn(layer_idx, q, k, v) -> out`, supplied per step by the engine:
that is where the paged pool, and borrowed KV on other instances, come in. Linear layers run
through oneDNN with packed weights on the CPU once `Transformer.pack_linears` has run
(`fabric/model/linear.py`).
"""

from __future__ import annotations

import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from fabric.model.args import ModelArgs
from fabric.model.linear import Linear, PackedWeight, pack_linears, resolve
from fabric.model.rope import RotaryEmbedding, rotate

AttnFn = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and self.weight.dtype == torch.float32:   # one fused op, the
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # same bits
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = args.num_heads, args.num_kv_heads, args.head_dim
        bias = args.attention_bias
        self.q_proj = Linear(args.hidden_size, args.num_heads * args.head_dim, bias=bias)
        self.k_proj = Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.v_proj = Linear(args.hidden_size, args.num_kv_heads * args.head_dim, bias=bias)
        self.o_proj = Linear(args.num_heads * args.head_dim, args.hidden_size, bias=bias)

    def forward(self, x, cos_sin: tuple[torch.Tensor, torch.Tensor], attn: AttnFn):
        t = x.shape[0]
        q = self.q_proj(x).view(t, self.num_heads, self.head_dim)
        k = self.k_proj(x).view(t, self.num_kv_heads, self.head_dim)
        v = self.v_proj(x).view(t, self.num_kv_heads, self.head_dim)
        q, k = rotate(q, k, *cos_sin)
        out = attn(self.layer_idx, q, k, v)                  # [T, H, D]
        return self.o_proj(out.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_proj = Linear(hidden, inter, bias=False)
        self.up_proj = Linear(hidden, inter, bias=False)
        self.down_proj = Linear(inter, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Expert(nn.Module):
    """One Mixtral expert, with the checkpoint's names: w1 = gate, w3 = up, w2 = down."""

    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.w1 = Linear(hidden, inter, bias=False)
        self.w2 = Linear(inter, hidden, bias=False)
        self.w3 = Linear(hidden, inter, bias=False)

    def forward(self, x):
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class SparseMoE(nn.Module):
    """Mixtral routing: softmax over all experts, keep the top k, renormalise their weights."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.top_k = args.num_experts_per_tok
        self.gate = nn.Linear(args.hidden_size, args.num_experts, bias=False)
        self.experts = nn.ModuleList(Expert(args.hidden_size, args.intermediate_size)
                                     for _ in range(args.num_experts))
        self.register_buffer("tokens_per_expert", torch.zeros(args.num_experts, dtype=torch.int64),
                             persistent=False)   # measured load, read by the expert-placement planner

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float32)       # [T, E]
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)            # [T, k]
        weights = (weights / weights.sum(-1, keepdim=True)).to(x.dtype)
        out = torch.zeros_like(x)
        counts = torch.bincount(chosen.flatten(), minlength=len(self.experts))
        self.tokens_per_expert += counts
        for e in torch.nonzero(counts).flatten().tolist():
            rows, slot = torch.nonzero(chosen == e, as_tuple=True)
            out.index_add_(0, rows, self.experts[e](x[rows]) * weights[rows, slot, None])
        return out


class DecoderLayer(nn.Module):
    def __init__(self, args: ModelArgs, layer_idx: int):
        super().__init__()
        self.self_attn = Attention(args, layer_idx)
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        if args.is_moe:
            self.block_sparse_moe = SparseMoE(args)
        else:
            self.mlp = MLP(args.hidden_size, args.intermediate_size)

    def forward(self, x, cos_sin, attn):
        x = x + self.self_attn(self.input_layernorm(x), cos_sin, attn)
        ffn = self.block_sparse_moe if hasattr(self, "block_sparse_moe") else self.mlp
        return x + ffn(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(args, i) for i in range(args.num_layers))
        self.norm = RMSNorm(args.hidden_size, args.rms_norm_eps)


class Transformer(nn.Module):
    """`forward(input_ids [T], positions [T], attn) -> hidden [T, hidden]`; `logits(hidden) -> [N, V]`."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model = Decoder(args)
        self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)
        self.rope = RotaryEmbedding(args)
        self.head_packed: PackedWeight | None = None
        self.linear_kernel = "torch"        # "onednn" once every linear weight is packed
        self.packed_bytes = 0
        self._to_pack: list = []            # what begin_packing left to pack_some

    def pack_linears(self, kernel: str = "auto") -> str:
        """Pack every linear weight for oneDNN (`model.linear_kernel`: "auto" where it runs,
        "onednn", or "torch" for none); again after weights change. Returns the choice."""
        self.begin_packing(kernel)
        self.pack_some(float("inf"))
        return self.linear_kernel

    def begin_packing(self, kernel: str = "auto") -> str:
        """Choose the kernel now (a ConfigError-worthy ValueError where "onednn" cannot run)
        and drop any packed copies; the packing itself is left to `pack_some`. Returns the
        choice; `linear_kernel` says "onednn" only once every weight is packed."""
        head = self._head_weight()
        chosen = resolve(kernel, head.device, head.dtype)
        pack_linears(self, False)
        self.head_packed, self.linear_kernel, self.packed_bytes = None, "torch", 0
        self._to_pack = ([None] + [m for m in self.modules() if isinstance(m, Linear)]
                         if chosen == "onednn" else [])        # None: the lm_head
        return chosen

    def pack_some(self, budget_s: float) -> bool:
        """Pack weights left by `begin_packing` for about `budget_s` seconds (at least one);
        True once none is left. A layer already packed is used from its next call on."""
        pending = self._to_pack
        t0 = time.perf_counter()
        while pending:
            m = pending.pop(0)
            if m is None:
                self.head_packed = PackedWeight(self._head_weight())
                self.packed_bytes += self.head_packed.nbytes
            else:
                self.packed_bytes += pack_linears(m, True)
            if not pending:
                self.linear_kernel = "onednn"
            if time.perf_counter() - t0 >= budget_s:
                break
        return not pending

    @property
    def left_to_pack(self) -> int:
        """Weights `begin_packing` left that `pack_some` has not packed yet."""
        return len(self._to_pack)

    def _head_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.args.tie_word_embeddings else self.lm_head.weight

    @torch.inference_mode()
    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, attn: AttnFn) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        cos_sin = self.rope.gather(positions, x.dtype)       # once per step, for every layer
        for layer in self.model.layers:
            x = layer(x, cos_sin, attn)
        return self.model.norm(x)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self._head_weight()
        if self.head_packed is not None:
            return self.head_packed.linear(hidden, weight).float()
        return F.linear(hidden, weight).float()
