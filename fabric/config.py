"""Fabric configuration: frozen dataclasses inside, validated once at the YAML/dict edge.

Every field error raises `ConfigError` naming the dotted field, e.g. `instances.kv_blocks`.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from typing import Any

from fabric.errors import ConfigError

PRESETS = ("tiny-llama", "tiny-moe", "smollm2-135m-instruct")
FILE_PRESETS = ("smollm2-135m-instruct",)   # a real checkpoint file: resolved to `path` here
DTYPES = ("float32", "float64", "bfloat16", "float16")
DEVICES = ("cpu", "cuda")
TRANSPORTS = ("auto", "torch", "ray")
REMOTE_PREFIX = ("auto", "lease", "copy", "recompute")
PREFILL_POLICIES = ("auto", "compute_or_load", "load", "recompute")   # fabric/tiers.py
LINEAR_KERNELS = ("auto", "onednn", "torch")          # fabric/model/linear.py


def _positive(path: str, value: float) -> None:
    if value <= 0:
        raise ConfigError(f"{path} must be > 0, got {value}")


def _one_of(path: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ConfigError(f"{path} must be one of {list(allowed)}, got {value!r}")


def _fraction(path: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{path} must be within [0, 1], got {value}")


@dataclass(frozen=True)
class ModelConfig:
    preset: str | None = "tiny-llama"
    path: str | None = None
    dtype: str = "float32"
    seed: int = 0
    # linear layers: "onednn" (weights packed once, a second copy of them), "torch" (F.linear),
    # "auto" (oneDNN on the CPU where it runs for the dtype, else torch)
    linear_kernel: str = "auto"

    def validate(self, prefix: str) -> None:
        if self.path is None:
            if self.preset is None:
                raise ConfigError(f"{prefix}.preset or {prefix}.path must be set")
            _one_of(f"{prefix}.preset", self.preset, PRESETS)
            if self.preset in FILE_PRESETS:
                # Resolved once, here: the driver's check, the tokenizer, every instance and
                # weight store read this path (the config travels as a dict with it set).
                from fabric.model.args import preset_path

                object.__setattr__(self, "path", preset_path(self.preset, f"{prefix}.preset"))
        elif self.path.lower().endswith(".gguf"):
            if not os.path.isfile(self.path):
                raise ConfigError(f"{prefix}.path: {self.path!r} is not a file (a .gguf path "
                                  f"must name an existing GGUF file)")
        elif not os.path.isdir(self.path):
            raise ConfigError(f"{prefix}.path: {self.path!r} is not a directory (nor a .gguf "
                              f"file)")
        _one_of(f"{prefix}.dtype", self.dtype, DTYPES)
        _one_of(f"{prefix}.linear_kernel", self.linear_kernel, LINEAR_KERNELS)


@dataclass(frozen=True)
class InstancesConfig:
    count: int = 2
    device: str = "cpu"
    kv_blocks: int = 64
    block_size: int = 16
    max_num_seqs: int = 32          # requests in one running batch
    max_batch_tokens: int = 256     # tokens per step: prefill is chunked to fit
    num_cpus: float | None = None   # Ray CPUs (and torch threads) per instance; None: `cpus`
    startup_timeout_s: float = 600.0     # from placement on a node to ready (weights, KV pool)
    max_queued_requests: int = 4096      # waiting requests per instance; more: "queue full"
    standbys: int = 1               # warm standby replica processes per node for scale-up; 0: none

    def validate(self, prefix: str) -> None:
        for name in ("count", "kv_blocks", "block_size", "max_num_seqs", "max_batch_tokens",
                     "startup_timeout_s", "max_queued_requests"):
            _positive(f"{prefix}.{name}", getattr(self, name))
        _one_of(f"{prefix}.device", self.device, DEVICES)
        if self.num_cpus is not None and self.num_cpus < 0:
            raise ConfigError(f"{prefix}.num_cpus must be >= 0, got {self.num_cpus}")
        if self.standbys < 0:
            raise ConfigError(f"{prefix}.standbys must be >= 0, got {self.standbys}")

    def cpus(self, node_cpus: list[float], replicas: int) -> float:
        """`num_cpus`, or when it is None the Ray CPUs of the smallest node (`node_cpus`: each
        node's; nodes without CPUs are left out) shared by the replicas each node gets, at least
        1: one instance on a 2-core node takes both cores."""
        if self.num_cpus is not None:
            return self.num_cpus
        nodes = [c for c in node_cpus if c > 0] or [1.0]
        per_node = -(-replicas // len(nodes))
        return float(max(1, int(min(nodes) // per_node)))

    def torch_threads(self) -> int:
        """An instance's torch threads: its CPUs, rounded, at least 1 and at most the cores this
        process may run on (Ray's logical CPUs can exceed them)."""
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        return max(1, min(round(self.num_cpus or 1), cores or 1))


@dataclass(frozen=True)
class LendingConfig:
    enabled: bool = True
    max_lend_fraction: float = 0.95  # at most this share of an instance's pool is lent out
    min_free_fraction: float = 0.03  # lending never takes an instance below this free share
    heartbeat_s: float = 0.5

    def validate(self, prefix: str) -> None:
        _fraction(f"{prefix}.max_lend_fraction", self.max_lend_fraction)
        _fraction(f"{prefix}.min_free_fraction", self.min_free_fraction)
        _positive(f"{prefix}.heartbeat_s", self.heartbeat_s)


@dataclass(frozen=True)
class TransportConfig:
    backend: str = "auto"   # auto = torch.distributed over gloo (GPU tensors go through host memory)
    max_message_bytes: int = 256 << 20   # largest data-plane message; bulk KV moves are chunked

    def validate(self, prefix: str) -> None:
        _one_of(f"{prefix}.backend", self.backend, TRANSPORTS)
        if self.max_message_bytes < 16 << 10:
            raise ConfigError(f"{prefix}.max_message_bytes must be >= 16384, got "
                              f"{self.max_message_bytes}")


@dataclass(frozen=True)
class PrefixCacheConfig:
    """KV reuse (see docs/prefix-cache.md): cached prefix blocks, the fabric-wide index and
    cache-aware routing."""
    enabled: bool = True
    routing: bool = True                # cache-aware routing (else round robin)
    overlap_weight: float = 1.0         # cost = overlap_weight x prefill blocks + decode blocks
    balance_threshold: float = 1.5      # busier than this x (mean outstanding + 1): no affinity
    remote: str = "auto"                # another instance's cached prefix: auto by measured
                                        # cost, or always lease / copy / recompute
    min_remote_blocks: int = 2          # fewer extra cached blocks elsewhere: just compute
    session_ttl_s: float = 30.0         # a session's turn naming no ttl_s keeps its KV this long

    def validate(self, prefix: str) -> None:
        if not 0 <= self.session_ttl_s <= 86400:
            raise ConfigError(f"{prefix}.session_ttl_s must be within [0, 86400], got "
                              f"{self.session_ttl_s}")
        if self.overlap_weight < 0:
            raise ConfigError(f"{prefix}.overlap_weight must be >= 0, got {self.overlap_weight}")
        if self.balance_threshold < 1:
            raise ConfigError(f"{prefix}.balance_threshold must be >= 1, got "
                              f"{self.balance_threshold}")
        _one_of(f"{prefix}.remote", self.remote, REMOTE_PREFIX)
        if self.min_remote_blocks < 1:
            raise ConfigError(f"{prefix}.min_remote_blocks must be >= 1, got "
                              f"{self.min_remote_blocks}")


@dataclass(frozen=True)
class TiersConfig:
    """KV tiers below the pools, per node (see docs/tiers.md): evicted prefix blocks go down to
    host memory, then to local disk, and come back up instead of being recomputed."""
    host_bytes: int = 0                 # the node's host tier (0: none)
    disk_path: str | None = None        # the node's disk tier: a directory (None: none)
    disk_bytes: int = 0                 # ... and its size
    prefill: str = "auto"               # blocks below: auto (by measured speeds),
                                        # compute_or_load, load, recompute
    min_load_blocks: int = 2            # fewer blocks below: just compute them

    @property
    def enabled(self) -> bool:
        return self.host_bytes > 0 or (self.disk_path is not None and self.disk_bytes > 0)

    def validate(self, prefix: str) -> None:
        for name in ("host_bytes", "disk_bytes", "min_load_blocks"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        if self.disk_bytes > 0 and not self.disk_path:
            raise ConfigError(f"{prefix}.disk_path is needed when {prefix}.disk_bytes > 0")
        if self.disk_path is not None and not self.disk_path.strip():
            raise ConfigError(f"{prefix}.disk_path must be a directory path, got ''")
        _one_of(f"{prefix}.prefill", self.prefill, PREFILL_POLICIES)


@dataclass(frozen=True)
class AutoscaleConfig:
    """Elastic replicas (instances). Automatic scaling runs when `max_replicas` is set; the
    Serve-like keys have Ray Serve's meanings (see autoscale/policy.py and docs/elastic.md)."""
    min_replicas: int = 1
    max_replicas: int | None = None         # None: no automatic scaling (fab.scale still works)
    initial_replicas: int | None = None     # None: instances.count
    target_ongoing_requests: float = 8.0    # per replica
    upscale_delay_s: float = 3.0
    downscale_delay_s: float = 30.0
    kv_utilization_high: float = 0.9
    kv_utilization_low: float = 0.3
    ttft_slo_s: float | None = None
    interval_s: float = 1.0                 # how often the policy looks at the replicas
    request_resources: bool = True          # ask Ray's autoscaler for room a replica lacks
    scale_timeout_s: float = 300.0          # how long a new replica may wait for room

    def validate(self, prefix: str) -> None:
        _positive(f"{prefix}.min_replicas", self.min_replicas)
        if self.max_replicas is not None and self.max_replicas < self.min_replicas:
            raise ConfigError(
                f"{prefix}.max_replicas ({self.max_replicas}) must be >= "
                f"{prefix}.min_replicas ({self.min_replicas})")
        if self.initial_replicas is not None:
            _positive(f"{prefix}.initial_replicas", self.initial_replicas)
            if not self.min_replicas <= self.initial_replicas <= (self.max_replicas or 1 << 30):
                raise ConfigError(f"{prefix}.initial_replicas ({self.initial_replicas}) must lie "
                                  f"within [min_replicas, max_replicas]")
        _positive(f"{prefix}.target_ongoing_requests", self.target_ongoing_requests)
        for name in ("upscale_delay_s", "downscale_delay_s"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{prefix}.{name} must be >= 0, got {getattr(self, name)}")
        _fraction(f"{prefix}.kv_utilization_high", self.kv_utilization_high)
        _fraction(f"{prefix}.kv_utilization_low", self.kv_utilization_low)
        if self.kv_utilization_low >= self.kv_utilization_high:
            raise ConfigError(f"{prefix}.kv_utilization_low must be < {prefix}.kv_utilization_high")
        if self.ttft_slo_s is not None:
            _positive(f"{prefix}.ttft_slo_s", self.ttft_slo_s)
        _positive(f"{prefix}.interval_s", self.interval_s)
        _positive(f"{prefix}.scale_timeout_s", self.scale_timeout_s)

    @property
    def enabled(self) -> bool:
        return self.max_replicas is not None


@dataclass(frozen=True)
class FabricConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    instances: InstancesConfig = field(default_factory=InstancesConfig)
    lending: LendingConfig = field(default_factory=LendingConfig)
    transport: TransportConfig = field(default_factory=TransportConfig)
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    prefix_cache: PrefixCacheConfig = field(default_factory=PrefixCacheConfig)
    tiers: TiersConfig = field(default_factory=TiersConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def validate(self, prefix: str) -> None:
        a = self.autoscale
        if a.enabled and a.initial_replicas is None and \
                not a.min_replicas <= self.instances.count <= a.max_replicas:
            raise ConfigError(f"instances.count ({self.instances.count}) must lie within "
                              f"[autoscale.min_replicas, autoscale.max_replicas] (or set "
                              f"autoscale.initial_replicas)")

    @property
    def initial_replicas(self) -> int:
        return self.autoscale.initial_replicas or self.instances.count


def load_config(config: "str | os.PathLike | dict | FabricConfig | None") -> FabricConfig:
    """Build a validated `FabricConfig` from None (defaults), a dict, a YAML path or a config."""
    if config is None:
        return build(FabricConfig, {}, "")
    if isinstance(config, FabricConfig):
        return build(FabricConfig, config.to_dict(), "")
    if isinstance(config, (str, os.PathLike)):
        return build(FabricConfig, _read_yaml(os.fspath(config)), "")
    if isinstance(config, dict):
        return build(FabricConfig, config, "")
    raise ConfigError(f"config must be a path, a dict or a FabricConfig, got {type(config).__name__}")


def _read_yaml(path: str) -> dict:
    import yaml

    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} does not exist")
    with open(path) as f:
        try:
            data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    return {} if data is None else data


def build(cls: type, data: Any, prefix: str):
    """Construct dataclass `cls` from `data`, checking keys and types; errors name the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {type(data).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key {where!r} (known: {sorted(fields)})")
    hints = typing.get_type_hints(cls)
    values = {}
    for name, value in data.items():
        path = f"{prefix}.{name}" if prefix else name
        values[name] = _coerce(hints[name], value, path)
    obj = cls(**values)
    if hasattr(obj, "validate"):
        obj.validate(prefix)
    return obj


def _coerce(hint: Any, value: Any, path: str) -> Any:
    if dataclasses.is_dataclass(hint):
        return build(hint, {} if value is None else value, path)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (inner,) = [o for o in options if o is not type(None)]
        return _coerce(inner, value, path)
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path} must be a boolean, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path} must be an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path} must be a number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path} must be a string, got {value!r}")
        return value
    raise ConfigError(f"{path}: unsupported field type {hint}")  # a bug in this module, not user input
