"""The KV pool of one instance: allocated once, per layer `[num_blocks, block_size, H_kv, D]`."""

from __future__ import annotations

import torch


class KVCache:
    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int,
                 head_dim: int, dtype: torch.dtype, device: str | torch.device = "cpu"):
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size = block_size
        self.num_blocks = num_blocks

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.k[idx], self.v[idx]

    @property
    def bytes_per_block(self) -> int:
        per = self.k[:, 0].numel() * self.k.element_size()
        return 2 * per

    def read_blocks(self, ids: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Copies of blocks `ids` over all layers: `[L, n, block_size, H_kv, D]` each (for migration)."""
        idx = torch.tensor(ids, dtype=torch.long, device=self.k.device)
        return self.k[:, idx].contiguous(), self.v[:, idx].contiguous()

    def write_blocks(self, ids: list[int], k: torch.Tensor, v: torch.Tensor) -> None:
        idx = torch.tensor(ids, dtype=torch.long, device=self.k.device)
        self.k[:, idx] = k.to(self.k.device, self.k.dtype)
        self.v[:, idx] = v.to(self.v.device, self.v.dtype)
