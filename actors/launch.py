"""Creating instance actors and wiring their data plane: used by `fabric.start` and by the
controller when it replaces a dead instance."""

from __future__ import annotations

import ray

from actors.instance import InstanceActor
from actors.transport import transport_actor_options
from fabric.config import FabricConfig


def new_instance(cfg: FabricConfig, index: int, actor_name: str, controller_name: str,
                 namespace: str, fabric_name: str, detached: bool,
                 manager_name: str | None = None):
    """An instance actor (one GPU each on CUDA), spread over the cluster's nodes."""
    actor_cls = ray.remote(**transport_actor_options(max_concurrency=64, transport_threads=16))(
        InstanceActor)
    return actor_cls.options(
        name=actor_name, namespace=namespace, lifetime="detached" if detached else None,
        num_cpus=cfg.instances.num_cpus, num_gpus=1 if cfg.instances.device == "cuda" else 0,
        scheduling_strategy="SPREAD",
    ).remote(index, cfg.to_dict(), controller_name, namespace, fabric_name, manager_name)


def backend_of(cfg: FabricConfig) -> str:
    return {"auto": "torch"}.get(cfg.transport.backend, cfg.transport.backend)


def connect_instances(instances: list, backend: str, max_request_blocks: int,
                      methods: list[str] | None = None, timeout_s: float = 180.0) -> None:
    """Make `instances` ranks 0..n-1 of one transport group (a collective: all at once).
    `methods[i]` is "connect" for a new instance, "reconnect" for one already serving."""
    methods = methods or ["connect"] * len(instances)
    addr, port = ray.get(instances[0].transport_address.remote(), timeout=timeout_s)
    ray.get([getattr(a, m).remote(len(instances), addr, port, backend, instances,
                                  max_request_blocks) for a, m in zip(instances, methods)],
            timeout=timeout_s)
