"""Model weights published once per node and mapped, not loaded, by every replica there.

A `WeightStore` actor per node holds the node's copy in Ray's object store: one object for the
dense weights and one per (layer, expert), so expert placement can reason per expert. A replica
on that node `ray.get`s them: numpy arrays backed by the node's shared-memory object store,
read-only, wrapped by `torch.from_numpy` without a copy (`map_weights`).

Where the copy comes from is decided by the elastic manager, in this order: the node's own store
(map, nothing moves); a store on another node (Ray pulls the objects peer to peer: copied); the
checkpoint on disk, only when no live copy exists anywhere (loaded).
"""

from __future__ import annotations

import os
import re
import time
import warnings

import numpy as np
import torch

DENSE = "dense"
_EXPERT = re.compile(r"^model\.layers\.(\d+)\.block_sparse_moe\.experts\.(\d+)\.")
_TORCH_DTYPES = {"float32": torch.float32, "float64": torch.float64,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}


def group_of(name: str):
    """The object a tensor is published in: `(layer, expert)` for an expert's weights, else DENSE."""
    m = _EXPERT.match(name)
    return (int(m.group(1)), int(m.group(2))) if m else DENSE


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A numpy array holding `t`'s bytes (bfloat16 travels as int16: numpy has no bfloat16)."""
    t = t.detach().contiguous().cpu()
    if t.dtype == torch.bfloat16:
        t = t.view(torch.int16)
    return t.numpy()


def from_numpy(a: np.ndarray, dtype: str) -> torch.Tensor:
    """The tensor over `a`'s memory, no copy (a read-only array stays read-only: never written)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)       # "the given NumPy array is not writable"
        t = torch.from_numpy(a)
    return t.view(torch.bfloat16) if dtype == "bfloat16" else t


def split_state(state: dict[str, torch.Tensor], dtype: str):
    """Group a state dict into publishable numpy groups; a tensor shared by two names (tied
    embeddings) is kept once, the other name becomes an alias."""
    torch_dtype = _TORCH_DTYPES[dtype]
    groups: dict = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name in sorted(state):
        t = state[name]
        key = (t.data_ptr(), t.dtype, tuple(t.shape))
        if t.data_ptr() and key in seen:
            aliases[name] = seen[key]
            continue
        seen[key] = name
        groups.setdefault(group_of(name), {})[name] = to_numpy(t.to(torch_dtype))
    return groups, aliases


def group_bytes(group: dict[str, np.ndarray]) -> int:
    return sum(a.nbytes for a in group.values())


def checkpoint_bytes(path: str) -> int:
    """Bytes of the files a checkpoint load reads from disk: the safetensors files, or the
    one GGUF file."""
    from fabric.model.checkpoint import _safetensors_files
    from fabric.model.gguf import is_gguf

    if is_gguf(path):
        return os.path.getsize(path)
    return sum(os.path.getsize(f) for f in _safetensors_files(path))


def _shared_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process mapped shared from Ray's object store (Linux)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                parts = line.split()
                if "plasma" in line and len(parts) > 1 and "s" in parts[1]:
                    lo, hi = (int(x, 16) for x in parts[0].split("-"))
                    ranges.append((lo, hi))
    except OSError:
        pass
    return ranges


def all_shared(tensors: list[torch.Tensor]) -> bool:
    """True when every tensor's memory lies in a shared mapping of Ray's object store: the
    weights were mapped, not copied."""
    ranges = _shared_ranges()
    return bool(tensors) and all(any(lo <= t.data_ptr() < hi for lo, hi in ranges)
                                 for t in tensors)


class WeightStore:
    """One per node (a Ray actor pinned there): owns the node's published copy of the weights.
    The objects live as long as this actor; replicas on the node map them."""

    def __init__(self, model_config: dict):
        self.model_config = model_config
        self.refs: dict = {}
        self.sizes: dict = {}
        self.aliases: dict[str, str] = {}
        self.args = None

    def loaded(self) -> bool:
        return bool(self.refs)

    def load(self) -> dict:
        """Read the checkpoint (or generate a preset's weights from its seed) and publish it."""
        import ray

        from fabric.model.args import PRESETS
        from fabric.model.checkpoint import random_state_dict, read_args, read_state_dict

        t0 = time.perf_counter()
        m = self.model_config
        if m["path"] is not None:
            self.args = read_args(m["path"])
            state = read_state_dict(m["path"], self.args, m["dtype"])    # GGUF: dequantized to it
            from_disk = checkpoint_bytes(m["path"])
        else:
            self.args = PRESETS[m["preset"]]
            state = random_state_dict(self.args, m["seed"])
            from_disk = 0
        groups, self.aliases = split_state(state, m["dtype"])
        del state
        for key in sorted(groups, key=str):
            self.sizes[key] = group_bytes(groups[key])
            self.refs[key] = ray.put(groups.pop(key))
        return {"bytes_loaded_from_disk": from_disk, "bytes_copied": 0,
                "seconds": time.perf_counter() - t0}

    def copy_from(self, manifest: dict) -> dict:
        """Pull a peer node's copy, one object at a time (Ray moves it node to node), and
        publish it here, so this node's replicas keep mapping it when the peer leaves."""
        import ray

        t0 = time.perf_counter()
        self.args, self.aliases = manifest["args"], dict(manifest["aliases"])
        copied = 0
        for key, ref in manifest["refs"].items():
            group = ray.get(ref)
            self.sizes[key] = group_bytes(group)
            copied += self.sizes[key]
            self.refs[key] = ray.put(group)
            del group
        return {"bytes_loaded_from_disk": 0, "bytes_copied": copied,
                "seconds": time.perf_counter() - t0}

    def manifest(self) -> dict:
        """What a replica needs to map the weights: object refs by group, sizes, aliases, args."""
        return {"refs": dict(self.refs), "sizes": dict(self.sizes), "aliases": dict(self.aliases),
                "args": self.args, "dtype": self.model_config["dtype"]}


_MADV_POPULATE_READ = 22     # Linux >= 5.14: fill the page tables of a mapping in one call


def prefault(a: np.ndarray) -> bool:
    """Map `a`'s pages into this process now (no copy), so the first forward pass takes no page
    faults. Best effort: False where the kernel lacks MADV_POPULATE_READ."""
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        addr = a.__array_interface__["data"][0]
        start = addr - addr % 4096
        return libc.madvise(ctypes.c_void_p(start), ctypes.c_size_t(a.nbytes + addr - start),
                            _MADV_POPULATE_READ) == 0
    except (OSError, AttributeError):
        return False


def map_weights(manifest: dict) -> tuple[dict[str, torch.Tensor], int]:
    """The state dict over the node's published objects (zero-copy, page tables filled) and how
    many bytes it maps."""
    import ray

    keys = list(manifest["refs"])
    groups = ray.get([manifest["refs"][k] for k in keys])
    state: dict[str, torch.Tensor] = {}
    for group in groups:
        for name, a in group.items():
            if a.nbytes:
                prefault(a)
            state[name] = from_numpy(a, manifest["dtype"])
    for name, target in manifest["aliases"].items():
        state[name] = state[target]
    return state, sum(manifest["sizes"].values())
