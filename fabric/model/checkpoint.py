"""Build a model from a Hugging Face checkpoint directory, a GGUF file or a built-in preset;
write checkpoints.

A checkpoint is `config.json` plus `model.safetensors`, or shards listed in
`model.safetensors.index.json`; or one `.gguf` file (`fabric/model/gguf.py`). Tensors are
checked name by name and shape by shape, so a broken checkpoint fails with a `ConfigError`
that names the tensor, never a half-built model.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading

import torch

from fabric.errors import ConfigError
from fabric.model import gguf
from fabric.model.args import FILE_PRESETS, PRESETS, ModelArgs, preset_path
from fabric.model.llama import Transformer

DTYPES = {"float32": torch.float32, "float64": torch.float64,
          "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(preset: str | None = "tiny-llama", path: str | None = None, dtype: str = "float32",
               seed: int = 0, device: str = "cpu", linear_kernel: str = "auto",
               pack: bool = True) -> Transformer:
    """The model of a `model:` config section, in eval mode on `device`. A file preset
    (`smollm2-135m-instruct`) is its checkpoint file: the config edge has already resolved it
    to `path`, and this does the same for a direct call."""
    if path is None and preset in FILE_PRESETS:
        path = preset_path(preset)
    if path is not None:
        args = read_args(path)
        state = read_state_dict(path, args, dtype)
    else:
        args = PRESETS[preset]
        state = random_state_dict(args, seed)
    return build_model(args, state, dtype, device, linear_kernel, pack)


_NO_INIT_LOCK = threading.RLock()


@contextlib.contextmanager
def _no_init():
    """Skip parameter initialisation while building on the meta device: every tensor is
    replaced by the checkpoint's, and initialising meta tensors goes through torch's reference
    kernels, whose first use imports torch._dynamo (about a second in a fresh process)."""
    with _NO_INIT_LOCK:                 # the patch is process-wide: one builder at a time
        saved = [(cls, cls.reset_parameters) for cls in (torch.nn.Linear, torch.nn.Embedding)]
        for cls, _ in saved:
            cls.reset_parameters = lambda self: None
        try:
            yield
        finally:
            for cls, fn in saved:
                cls.reset_parameters = fn


def build_model(args: ModelArgs, state: dict[str, torch.Tensor], dtype: str = "float32",
                device: str = "cpu", linear_kernel: str = "auto", pack: bool = True) -> Transformer:
    """The model on `device` in eval mode, its linear weights packed as `linear_kernel` says
    (`model.linear_kernel`: fabric/model/linear.py); `pack` False leaves the packing to
    `model.pack_some` (the kernel is still checked here)."""
    with torch.device("meta"), _no_init():
        model = Transformer(args)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    _check_tensors(expected, state)
    model.load_state_dict(state, assign=True, strict=True)
    model.rope = type(model.rope)(args)           # buffers were on meta
    for layer in model.model.layers:
        moe = getattr(layer, "block_sparse_moe", None)
        if moe is not None:
            moe.tokens_per_expert = torch.zeros(args.num_experts, dtype=torch.int64)
    model = model.to(device=device, dtype=DTYPES[dtype]).eval()
    try:
        model.begin_packing(linear_kernel)
        if pack:
            model.pack_some(float("inf"))
    except ValueError as e:
        raise ConfigError(str(e)) from None
    return model


def _check_tensors(expected: dict, state: dict) -> None:
    missing = sorted(set(expected) - set(state))
    if missing:
        raise ConfigError(f"model.path: checkpoint is missing tensor {missing[0]!r}"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    extra = sorted(set(state) - set(expected))
    if extra:
        raise ConfigError(f"model.path: checkpoint has unexpected tensor {extra[0]!r}")
    for name, shape in expected.items():
        if tuple(state[name].shape) != tuple(shape):
            raise ConfigError(f"model.path: tensor {name!r} has shape {tuple(state[name].shape)}, "
                              f"expected {tuple(shape)}")


def check_checkpoint(path: str) -> ModelArgs:
    """Check a checkpoint from its config and tensor headers only (no weights are read), so a
    driver can refuse a broken one with a `ConfigError` before any actor starts."""
    from safetensors import safe_open

    if gguf.is_gguf(path):
        return gguf.check(path)
    args = read_args(path)
    shapes = {}
    for file in _safetensors_files(path):
        try:
            with safe_open(file, "pt") as f:
                shapes.update({k: tuple(f.get_slice(k).get_shape()) for k in f.keys()})
        except Exception as e:
            raise ConfigError(f"model.path: {os.path.basename(file)} is not a readable "
                              f"safetensors file: {e}") from None
    state = _normalise_names({k: torch.empty(v, device="meta") for k, v in shapes.items()}, args)
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    with torch.device("meta"), _no_init():
        expected = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    _check_tensors(expected, state)
    return args


def read_args(path: str) -> ModelArgs:
    if gguf.is_gguf(path):
        return gguf.read_args(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise ConfigError(f"model.path: {path!r} has no config.json")
    try:
        with open(cfg_path) as f:
            hf = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"model.path: config.json is not valid JSON: {e}") from None
    try:
        return ModelArgs.from_hf_config(hf)
    except KeyError as e:
        raise ConfigError(f"model.path: config.json lacks {e.args[0]!r}") from None


def read_state_dict(path: str, args: ModelArgs,
                    dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors in this project's names. `dtype` matters for a GGUF file only
    (dequantized straight to it, one tensor at a time); safetensors come as stored."""
    from safetensors.torch import load_file

    if gguf.is_gguf(path):
        return gguf.read_state_dict(path, args, dtype)

    files = _safetensors_files(path)
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(file))
        except Exception as e:      # safetensors' own error types, and OSError
            raise ConfigError(f"model.path: {os.path.basename(file)} is not a readable "
                              f"safetensors file: {e}") from None
    state = _normalise_names(state, args)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state.get("model.embed_tokens.weight")
    return state


def _safetensors_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        try:
            with open(index) as f:
                weight_map = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"model.path: model.safetensors.index.json is not valid JSON: "
                              f"{e}") from None
        weight_map = weight_map.get("weight_map") if isinstance(weight_map, dict) else None
        if not (isinstance(weight_map, dict) and weight_map
                and all(isinstance(v, str) for v in weight_map.values())):
            raise ConfigError("model.path: model.safetensors.index.json has no \"weight_map\" "
                              "object of tensor names to file names")
        names = sorted(set(weight_map.values()))
        if any(os.path.basename(n) != n or n in ("", ".", "..") for n in names):
            raise ConfigError("model.path: model.safetensors.index.json names a file outside "
                              "the checkpoint directory")
        files = [os.path.join(path, n) for n in names]
    else:
        files = [os.path.join(path, "model.safetensors")]
    for file in files:
        if not os.path.isfile(file):
            raise ConfigError(f"model.path: checkpoint file {os.path.basename(file)!r} is missing")
    return files


def _normalise_names(state: dict, args: ModelArgs) -> dict:
    """Accept transformers 5's fused-expert layout too, by splitting it into per-expert tensors."""
    out = {}
    for name, t in state.items():
        if ".mlp.experts.gate_up_proj" in name:
            prefix = name.split(".mlp.experts.")[0] + ".block_sparse_moe.experts."
            inter = t.shape[1] // 2
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w1.weight"] = t[e, :inter]
                out[f"{prefix}{e}.w3.weight"] = t[e, inter:]
        elif ".mlp.experts.down_proj" in name:
            prefix = name.split(".mlp.experts.")[0] + ".block_sparse_moe.experts."
            for e in range(t.shape[0]):
                out[f"{prefix}{e}.w2.weight"] = t[e]
        elif args.is_moe and ".mlp.gate.weight" in name:
            out[name.replace(".mlp.gate.", ".block_sparse_moe.gate.")] = t
        else:
            out[name] = t
    return out


def random_state_dict(args: ModelArgs, seed: int) -> dict[str, torch.Tensor]:
    """Random weights from a fixed seed, scaled so that logits are well spread (greedy is stable)."""
    with torch.device("meta"), _no_init():
        shapes = {k: v.shape for k, v in Transformer(args).state_dict().items()}
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in sorted(shapes.items()):
        if name.endswith("norm.weight") or "layernorm" in name:
            state[name] = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif name.endswith(".bias"):
            state[name] = 0.1 * torch.randn(shape, generator=gen)
        elif "embed_tokens" in name:
            state[name] = torch.randn(shape, generator=gen)
        else:
            state[name] = torch.randn(shape, generator=gen) / math.sqrt(shape[-1])
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def save_checkpoint(model: Transformer, path: str) -> None:
    """Write `config.json` and `model.safetensors` that Hugging Face `transformers` loads."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(model.args.to_hf_config(), f, indent=2)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.args.tie_word_embeddings:
        state.pop("lm_head.weight")
    save_file(state, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
