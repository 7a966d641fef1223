"""The 'triton' backend: Triton kernels (CUDA, or CPU under TRITON_INTERPRET=1)."""

from kernels.triton_attention import paged_attention_partial, paged_prefill_partial
from kernels.triton_merge import merge_attention_states
from kernels.triton_write_kv import write_kv

__all__ = [
           "merge_attention_states",
           "paged_attention_partial",
           "paged_prefill_partial",
           "write_kv",
]
