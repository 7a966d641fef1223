"""kv-fabric: a distributed KV-cache fabric for LLM inference on Ray.

    import fabric
    fab = fabric.start()                       # embedded local Ray, built-in tiny model
    results = fab.generate(["Hello"], max_new_tokens=16)
    fab.stats(); fab.shutdown()

`ray` is imported only when a fabric starts, so the core imports without it.
"""

from fabric.config import FabricConfig, load_config
from fabric.errors import CapacityError, ConfigError, FabricError, RequestError
from fabric.result import Result

__all__ = ["start", "connect", "Fabric", "FabricConfig", "Result", "load_config",
           "FabricError", "ConfigError", "RequestError", "CapacityError"]


def start(config=None, *, address=None, name=None, detached=False):
    """Start a fabric (controller + instance actors) and return its `Fabric` handle.

    config: YAML path, dict, `FabricConfig` or None (built-in local default).
    address: None = embedded local Ray; "auto" = a running cluster; "ray://host:port" = Ray client.
    """
    from fabric.api import start as _start

    return _start(config, address=address, name=name, detached=detached)


def connect(name, *, address=None):
    """Reach a named, detached fabric started by another driver."""
    from fabric.api import connect as _connect

    return _connect(name, address=address)


def __getattr__(attr):
    if attr == "Fabric":
        from fabric.api import Fabric

        return Fabric
    raise AttributeError(f"module 'fabric' has no attribute {attr!r}")
