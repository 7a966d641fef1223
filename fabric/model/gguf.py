"""Read a GGUF file (llama.cpp's format): `ModelArgs` from its metadata, the state dict
dequantized, in this project's (Hugging Face) parameter names.

Only the `llama` architecture of llama.cpp is read (Llama, Mistral and, with `expert_count` set,
Mixtral). Two things differ from a Hugging Face checkpoint besides the names:

- llama.cpp's converter permutes the rows of `q_proj` and `k_proj` (per head, from the
  rotate-half layout of Hugging Face to interleaved pairs); `unpermute_rows` undoes it exactly
  as transformers' GGUF loader does (`LlamaTensorProcessor._reverse_permute_weights`), with the
  key/value head count for `k_proj`.
- Quantized tensors are dequantized with `gguf.quants.dequantize` (float32, the numbers
  transformers gets too), then cast to the configured dtype, one tensor at a time.

Every check of the file (not a GGUF, an architecture or quantization type this loader does not
read, a missing or unexpected tensor, a shape that does not fit the metadata) raises a
`ConfigError` naming it, before any tensor is dequantized where possible.
"""

from __future__ import annotations

import functools
import math
import os
import re
from typing import NamedTuple

import numpy as np
import torch

from fabric.errors import ConfigError
from fabric.model.args import ModelArgs

SUFFIX = ".gguf"
ARCHITECTURE = "llama"      # llama.cpp's name; Mistral and Mixtral files use it too

_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LAYER = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
          "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
          "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
          "ffn_gate_inp": "block_sparse_moe.gate"}
_EXPERT = {"ffn_gate": "w1", "ffn_down": "w2", "ffn_up": "w3"}   # Mixtral experts
_BLK = re.compile(r"^blk\.(\d+)\.(\w+?)(?:\.(\d+))?\.(weight|bias)$")
_EXPS = re.compile(r"^(ffn_gate|ffn_down|ffn_up)_exps$")            # all experts in one tensor


def is_gguf(path) -> bool:
    return isinstance(path, (str, os.PathLike)) and os.fspath(path).lower().endswith(SUFFIX)


# ---- the file ------------------------------------------------------------------------------------
# The header is parsed here rather than by `gguf.GGUFReader`, which builds numpy views for every
# string of the vocabulary (about 5 s for SmolLM2's 98k tokens and merges, in each process that
# opens the file: the driver's check, each weight store). Long arrays are skipped, not decoded;
# tensor data are views of one read-only mapping, in the layout `gguf.quants.dequantize` takes.
_MAGIC = b"GGUF"
_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q",
            11: "<q", 12: "<d"}                     # GGUFValueType -> struct format
_NUMPY = {0: np.uint8, 1: np.int8, 2: np.uint16, 3: np.int16, 4: np.uint32, 5: np.int32,
          6: np.float32, 7: np.bool_, 10: np.uint64, 11: np.int64, 12: np.float64}
_STRING, _ARRAY = 8, 9
_KEEP_ITEMS = 1024          # arrays longer than this keep only their length (the vocabulary)


class LongArray(int):
    """A metadata array too long to keep (the vocabulary): its length."""


class Tensor(NamedTuple):
    name: str
    tensor_type: object     # gguf.GGMLQuantizationType
    shape: tuple            # GGUF order: innermost dimension first
    offset: int             # in the file
    file: "GGUFFile"

    @property
    def data(self) -> np.ndarray:
        """float32/float16 values, or the raw blocks of a quantized type ([rows, bytes])."""
        return self.file.tensor_data(self)


class GGUFFile:
    """A GGUF file's metadata (`fields`: key -> value) and tensors, read from one mapping."""

    def __init__(self, path: str):
        import mmap
        import struct

        from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

        self.path = path
        with open(path, "rb") as f:
            self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        mm, self._off = self._mm, 0

        def take(fmt: str):
            (value,) = struct.unpack_from(fmt, mm, self._off)
            self._off += struct.calcsize(fmt)
            return value

        def string() -> str:
            n = take("<Q")
            raw = mm[self._off:self._off + n]
            if len(raw) != n:
                raise ValueError("truncated string")
            self._off += n
            return raw.decode("utf-8", errors="replace")

        def value(vtype: int):
            if vtype == _STRING:
                return string()
            if vtype == _ARRAY:
                etype, count = take("<I"), take("<Q")
                if etype == _STRING:
                    if count <= _KEEP_ITEMS:
                        return [string() for _ in range(count)]
                    for _ in range(count):           # skip: lengths only
                        n = take("<Q")
                        self._off += n
                    return LongArray(count)
                if etype not in _NUMPY:
                    raise ValueError(f"array of value type {etype}")
                items = np.frombuffer(mm, _NUMPY[etype], count, self._off)
                self._off += items.nbytes
                return items.tolist() if count <= _KEEP_ITEMS else LongArray(count)
            if vtype not in _SCALARS:
                raise ValueError(f"unknown value type {vtype}")
            return take(_SCALARS[vtype])

        if mm[:4] != _MAGIC:
            raise ValueError("no GGUF magic number")
        self._off = 4
        self.version = take("<I")
        if self.version not in (2, 3):
            raise ValueError(f"GGUF version {self.version} (read: 2, 3; a big-endian file "
                             f"shows as a huge number)")
        n_tensors, n_fields = take("<Q"), take("<Q")
        self.fields: dict = {}
        for _ in range(n_fields):
            key = string()
            self.fields[key] = value(take("<I"))
        infos = []
        for _ in range(n_tensors):
            name = string()
            dims = tuple(take("<Q") for _ in range(take("<I")))
            infos.append((name, GGMLQuantizationType(take("<I")), dims, take("<Q")))
        align = self.fields.get("general.alignment", 32)
        start = -(-self._off // align) * align
        self.tensors = [Tensor(n, q, d, start + o, self) for n, q, d, o in infos]
        for t in self.tensors:
            block, type_size = GGML_QUANT_SIZES.get(t.tensor_type, (1, 0))
            nbytes = math.prod(t.shape) // block * type_size
            if t.offset + nbytes > len(mm):
                raise ValueError(f"tensor {t.name!r} lies past the end of the file (truncated)")

    def tensor_data(self, t: Tensor) -> np.ndarray:
        from gguf import GGMLQuantizationType as Q
        from gguf.quants import quant_shape_to_byte_shape

        shape = tuple(reversed(t.shape))
        plain = {Q.F32: np.float32, Q.F16: np.float16, Q.F64: np.float64, Q.I8: np.int8,
                 Q.I16: np.int16, Q.I32: np.int32, Q.I64: np.int64}
        if t.tensor_type in plain:
            dtype = plain[t.tensor_type]
        else:
            dtype, shape = np.uint8, quant_shape_to_byte_shape(shape, t.tensor_type)
        return np.frombuffer(self._mm, dtype, math.prod(shape), t.offset).reshape(shape)


@functools.lru_cache(maxsize=2)
def _open(path: str, mtime_ns: int, size: int) -> GGUFFile:
    try:
        return GGUFFile(path)
    except Exception as e:        # bad magic, truncated header, ...: all mean "not a GGUF file"
        raise ConfigError(f"model.path: {os.path.basename(path)!r} is not a readable GGUF "
                          f"file: {e}") from None


def reader(path: str) -> GGUFFile:
    """The parsed file, opened once per process while it is unchanged."""
    path = os.path.realpath(os.fspath(path))
    if not os.path.isfile(path):
        raise ConfigError(f"model.path: GGUF file {path!r} does not exist")
    st = os.stat(path)
    return _open(path, st.st_mtime_ns, st.st_size)


_REQUIRED = object()


def metadata(r: GGUFFile, key: str, default=_REQUIRED):
    if key not in r.fields:
        if default is _REQUIRED:
            raise ConfigError(f"model.path: GGUF metadata lacks {key!r}")
        return default
    return r.fields[key]


def _array_len(r: GGUFFile, key: str) -> int | None:
    v = r.fields.get(key)
    return None if v is None else (int(v) if isinstance(v, LongArray) else len(v))


def tensor_shape(t) -> tuple[int, ...]:
    """A tensor's shape in torch/numpy order (GGUF lists dimensions innermost first)."""
    return tuple(int(d) for d in reversed(t.shape))


# ---- metadata -> ModelArgs -------------------------------------------------------------------
def read_args(path: str) -> ModelArgs:
    r = reader(path)
    arch = metadata(r, "general.architecture")
    if arch != ARCHITECTURE:
        raise ConfigError(f"model.path: GGUF architecture {arch!r} is not supported "
                          f"(supported: {ARCHITECTURE!r}: Llama, Mistral, Mixtral)")
    key = lambda name, default=_REQUIRED: metadata(r, f"{arch}.{name}", default)  # noqa: E731
    names = {t.name for t in r.tensors}
    if "rope_freqs.weight" in names:
        raise ConfigError("model.path: GGUF tensor 'rope_freqs.weight' (per-frequency rope "
                          "factors, as Llama 3.1 files carry) is not supported")
    hidden, heads = _count(key("embedding_length"), "embedding_length"), \
        _count(key("attention.head_count"), "attention.head_count")
    kv_heads = _count(key("attention.head_count_kv", heads), "attention.head_count_kv")
    head_dim = _count(key("attention.key_length", hidden // heads), "attention.key_length")
    if key("attention.value_length", head_dim) != head_dim:
        raise ConfigError(f"model.path: GGUF {arch}.attention.value_length "
                          f"{key('attention.value_length')} differs from key_length {head_dim}")
    rope_dim = key("rope.dimension_count", head_dim)
    if rope_dim != head_dim:
        raise ConfigError(f"model.path: GGUF {arch}.rope.dimension_count {rope_dim} is not the "
                          f"head dimension {head_dim} (partial rotary is not supported)")
    if key("expert_shared_count", 0):
        raise ConfigError(f"model.path: GGUF {arch}.expert_shared_count (shared experts) is "
                          f"not supported")
    experts = key("expert_count", 0)
    vocab = key("vocab_size", None) or _array_len(r, "tokenizer.ggml.tokens")
    if vocab is None:
        emb = next((t for t in r.tensors if t.name == "token_embd.weight"), None)
        if emb is None:
            raise ConfigError("model.path: GGUF file has no vocabulary size and no tensor "
                              "'token_embd.weight'")
        vocab = tensor_shape(emb)[0]
    return ModelArgs(
        architecture="MixtralForCausalLM" if experts else "LlamaForCausalLM",
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=_count(key("feed_forward_length"), "feed_forward_length"),
        num_layers=_count(key("block_count"), "block_count"),
        num_heads=heads,
        num_kv_heads=kv_heads,
        head_dim=head_dim,
        rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(key("rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(r, arch),
        max_position_embeddings=_count(key("context_length"), "context_length"),
        tie_word_embeddings="output.weight" not in names,
        attention_bias="blk.0.attn_q.bias" in names,
        num_experts=int(experts),
        num_experts_per_tok=int(key("expert_used_count", 2)) if experts else 2,
        bos_token_id=metadata(r, "tokenizer.ggml.bos_token_id", None),
        eos_token_id=metadata(r, "tokenizer.ggml.eos_token_id", None),
    )


def _count(value, name: str) -> int:
    if isinstance(value, list):              # per-layer counts: only a uniform one is read
        if not value or len(set(value)) != 1:
            raise ConfigError(f"model.path: GGUF {ARCHITECTURE}.{name} differs between layers "
                              f"({sorted(set(value))}): not supported")
        value = value[0]
    if not isinstance(value, int) or value <= 0:
        raise ConfigError(f"model.path: GGUF {ARCHITECTURE}.{name} must be a positive integer, "
                          f"got {value!r}")
    return value


def _rope_scaling(r, arch: str) -> dict:
    kind = metadata(r, f"{arch}.rope.scaling.type", None)
    factor = metadata(r, f"{arch}.rope.scaling.factor", None)
    if kind is None and metadata(r, f"{arch}.rope.scale_linear", None) is not None:
        kind, factor = "linear", metadata(r, f"{arch}.rope.scale_linear")
    if kind in (None, "none") or (kind == "linear" and factor in (None, 1.0)):
        return {}
    if kind != "linear":              # llama.cpp writes llama3 scaling as rope_freqs, not here
        raise ConfigError(f"model.path: GGUF rope scaling {kind!r} is not supported "
                          f"(supported: none, linear)")
    return {"rope_type": "linear", "factor": float(factor)}


# ---- names -------------------------------------------------------------------------------------
def hf_names(gguf_name: str, args: ModelArgs) -> list[tuple[str, int | None]]:
    """This project's name(s) for a GGUF tensor: `[(name, expert index or None)]`; a merged
    expert tensor (`blk.N.ffn_gate_exps.weight`) gives one name per expert. Unknown: []."""
    top, _, suffix = gguf_name.rpartition(".")
    if top in _TOP and suffix == "weight":
        return [(f"{_TOP[top]}.weight", None)]
    m = _BLK.match(gguf_name)
    if m is None:
        return []
    layer, part, expert, suffix = m.groups()
    prefix = f"model.layers.{layer}."
    if args.is_moe:
        exps = _EXPS.match(part)
        if exps and suffix == "weight":
            return [(f"{prefix}block_sparse_moe.experts.{e}.{_EXPERT[exps.group(1)]}.weight", e)
                    for e in range(args.num_experts)]
        if expert is not None and part in _EXPERT and suffix == "weight":   # older files
            return [(f"{prefix}block_sparse_moe.experts.{expert}.{_EXPERT[part]}.weight", None)]
        if part in ("ffn_gate", "ffn_up", "ffn_down"):
            return []
    elif part == "ffn_gate_inp":
        return []
    if expert is not None or part not in _LAYER:
        return []
    return [(f"{prefix}{_LAYER[part]}.{suffix}", None)]


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (`convert_hf_to_gguf.py` `LlamaModel.permute`):
    per head, rows stored as interleaved rotary pairs go back to the rotate-half layout.
    Exactly transformers' `_reverse_permute_weights`; `n_head` is the KV head count for k."""
    dim = w.shape[0] // n_head // 2
    return w.reshape(n_head, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)


def _heads_to_unpermute(name: str, args: ModelArgs) -> int | None:
    if ".self_attn.q_proj." in name:
        return args.num_heads
    if ".self_attn.k_proj." in name:
        return args.num_kv_heads
    return None


# ---- checks --------------------------------------------------------------------------------------
def _dequantizable(qtype) -> bool:
    from gguf import GGMLQuantizationType as Q
    from gguf import quants

    if qtype in (Q.F32, Q.F16):
        return True
    traits = getattr(quants, "_type_traits", None)
    return traits is None or qtype in traits       # unknown layout of gguf: try, fail at load


def _plan(r, args: ModelArgs) -> list[tuple]:
    """`[(GGUF tensor, [(our name, expert index or None)])]`, every tensor checked: a known name,
    a type gguf dequantizes, a shape fitting the metadata; then no tensor of the model missing."""
    from fabric.model.checkpoint import _no_init
    from fabric.model.llama import Transformer

    with torch.device("meta"), _no_init():
        expected = {k: tuple(v.shape) for k, v in Transformer(args).state_dict().items()}
    if args.tie_word_embeddings:
        expected.pop("lm_head.weight")
    plan, seen = [], set()
    for t in r.tensors:
        targets = hf_names(t.name, args)
        if not targets or any(n not in expected for n, _ in targets):
            raise ConfigError(f"model.path: GGUF tensor {t.name!r} is not a tensor of this "
                              f"{args.architecture} (unexpected)")
        if not _dequantizable(t.tensor_type):
            raise ConfigError(f"model.path: GGUF tensor {t.name!r} has quantization type "
                              f"{t.tensor_type.name}, which gguf {_gguf_version()} cannot "
                              f"dequantize")
        name, expert = targets[0]
        want = ((args.num_experts,) if expert is not None else ()) + expected[name]
        if tensor_shape(t) != want:
            raise ConfigError(f"model.path: GGUF tensor {t.name!r} has shape {tensor_shape(t)}, "
                              f"expected {want} from the file's metadata")
        plan.append((t, targets))
        seen.update(n for n, _ in targets)
    missing = sorted(set(expected) - seen)
    if missing:
        raise ConfigError(f"model.path: GGUF file lacks tensor {gguf_name(missing[0])!r} "
                          f"({missing[0]})" + (f" and {len(missing) - 1} more"
                                               if len(missing) > 1 else ""))
    return plan


def gguf_name(name: str) -> str:
    """The GGUF name of one of this project's tensors (for messages)."""
    inverse_top = {v: k for k, v in _TOP.items()}
    base, _, suffix = name.rpartition(".")
    if base in inverse_top:
        return f"{inverse_top[base]}.{suffix}"
    m = re.match(r"^model\.layers\.(\d+)\.(.+)\.(weight|bias)$", name)
    if m is None:
        return name
    layer, part, suffix = m.groups()
    e = re.match(r"^block_sparse_moe\.experts\.(\d+)\.(w[123])$", part)
    if e:
        inverse = {v: k for k, v in _EXPERT.items()}
        return f"blk.{layer}.{inverse[e.group(2)]}_exps.{suffix}"
    inverse = {v: k for k, v in _LAYER.items()}
    return f"blk.{layer}.{inverse.get(part, part)}.{suffix}"


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("gguf")
    except PackageNotFoundError:
        return "?"


def check(path: str) -> ModelArgs:
    """Metadata and every tensor's name, type and shape, without dequantizing anything."""
    r = reader(path)
    args = read_args(path)
    _plan(r, args)
    return args


# ---- tensors -------------------------------------------------------------------------------------
def read_state_dict(path: str, args: ModelArgs | None = None,
                    dtype: str | None = None) -> dict[str, torch.Tensor]:
    """The state dict in this project's names, dequantized and cast to `dtype` (default: float32)
    one tensor at a time; tied embeddings give `lm_head.weight` the embedding tensor itself."""
    from gguf.quants import dequantize

    from fabric.model.checkpoint import DTYPES

    r = reader(path)
    args = args or read_args(path)
    torch_dtype = DTYPES[dtype or "float32"]
    state: dict[str, torch.Tensor] = {}
    for t, targets in _plan(r, args):
        raw = t.data
        try:
            full = dequantize(raw, t.tensor_type).reshape(tensor_shape(t))
        except (NotImplementedError, ValueError) as e:
            raise ConfigError(f"model.path: GGUF tensor {t.name!r} ({t.tensor_type.name}) "
                              f"cannot be dequantized: {e}") from None
        for name, expert in targets:
            w = full if expert is None else full[expert]
            heads = _heads_to_unpermute(name, args)
            if heads is not None:
                w = unpermute_rows(w, heads)
            if np.may_share_memory(w, raw) or not w.flags.writeable:
                w = np.array(w)                # never keep a view of the read-only mapping
            state[name] = torch.from_numpy(np.ascontiguousarray(w)).to(torch_dtype)
        del full
    if args.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    return state


def eos_token_ids(path: str) -> list[int]:
    """The ids that end generation in llama.cpp's sense: EOS, and end-of-turn / end-of-message
    where the file names them."""
    r = reader(path)
    ids = [metadata(r, f"tokenizer.ggml.{k}_token_id", None) for k in ("eos", "eot", "eom")]
    return list(dict.fromkeys(i for i in ids if i is not None))


def metadata_value(path: str, key: str, default=None):
    return metadata(reader(path), key, default)


# ---- GGUF -> Hugging Face directory ------------------------------------------------------------
def convert(src: str, out_dir: str, dtype: str = "float32") -> dict:
    """Write `src` as a Hugging Face checkpoint directory that `transformers` and this fabric
    both load: `config.json`, `model.safetensors` (dequantized to `dtype`; a tied `lm_head` is
    left out, as transformers writes it), `generation_config.json` (EOS ids) and, when the file
    has a vocabulary, the tokenizer files with the chat template (`save_pretrained`)."""
    import json

    from safetensors.torch import save_file

    from fabric.model.checkpoint import DTYPES
    from fabric.tokenizer import chat_template, generation_eos_ids, load_tokenizer

    if dtype not in DTYPES:
        raise ConfigError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ConfigError(f"output {out_dir!r} exists and is not a directory")
    args = read_args(src)
    state = read_state_dict(src, args, dtype)
    if args.tie_word_embeddings:
        state.pop("lm_head.weight")
    model_cfg = {"preset": None, "path": src}
    tokenizer = load_tokenizer(model_cfg)
    eos = generation_eos_ids(model_cfg)
    pad = metadata_value(src, "tokenizer.ggml.padding_token_id")
    os.makedirs(out_dir, exist_ok=True)
    config = {**args.to_hf_config(), "torch_dtype": dtype}
    if pad is not None:
        config["pad_token_id"] = pad
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config, f, indent=2)
    generation = {"bos_token_id": args.bos_token_id,
                  "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
                  "pad_token_id": pad}
    with open(os.path.join(out_dir, "generation_config.json"), "w") as f:
        json.dump({k: v for k, v in generation.items() if v is not None}, f, indent=2)
    save_file({k: v.contiguous() for k, v in state.items()},
              os.path.join(out_dir, "model.safetensors"), metadata={"format": "pt"})
    if tokenizer is not None:
        tokenizer.save_pretrained(out_dir)
    return {"path": out_dir, "architecture": args.architecture, "num_layers": args.num_layers,
            "parameters": sum(t.numel() for t in state.values()), "dtype": dtype,
            "tokenizer": tokenizer is not None,
            "chat_template": chat_template(tokenizer) is not None, "eos_token_ids": eos}
